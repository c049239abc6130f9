"""ch4_kl_lab: the smoke run's summary shows k1 and k3 unbiased (|bias| < 1e-12 by exact enumeration), k2
biased with a bias growing with the KL (upward along +d, downward along -d for the default seed), k1's
expected gradient as a loss ~0 while the KL's is not, k2's equal to grad KL(pi || ref) and k3's to
grad KL(ref || pi); every row of its table recomputed here with numpy float64 formulas written in this
file; the Monte-Carlo means approach the exact ones as --samples grows; files written; flags checked."""
import json
import math

import numpy as np
import pytest

from minilife import runs
from minilife.chapters import ch4_kl_lab as L
from minilife.common import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("kl_lab")
    return out, L.main(["--smoke", "--out", str(out)])


def numpy_row(ref, direction, s):
    """One policy of the family, from its definition: pi = softmax(log ref + s d) (the same as
    softmax(z + s d), a softmax ignoring constant shifts), everything else by enumeration in float64."""
    q = np.asarray(ref, dtype=np.float64)
    z = np.log(q) + s * np.asarray(direction, dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    kl, reverse = float(np.sum(p * np.log(p / q))), float(np.sum(q * np.log(q / p)))
    log_r = np.log(q / p)  # at each outcome x
    values = {"k1": -log_r, "k2": log_r ** 2 / 2, "k3": (np.exp(log_r) - 1) - log_r}
    row = {"kl": kl, "reverse_kl": reverse}
    for kind, k in values.items():
        mean = float(np.sum(p * k))
        row.update({f"{kind}_mean": mean, f"{kind}_bias": mean - kl,
                    f"{kind}_std": math.sqrt(float(np.sum(p * (k - mean) ** 2)))})
    lr = np.log(p / q)
    row["k2_bias_predicted"] = float(np.sum(q * (lr - np.sum(q * lr)) ** 3)) / 6
    # gradients wrt the logits z: d log p(x) / dz = onehot(x) - p, so
    # E_p[grad k1] = E_p[onehot - p] = 0;  grad KL(p || q) = p * (log(p / q) - KL);  grad KL(q || p) = p - q
    grad_kl, grad_reverse = p * (lr - kl), p - q
    row.update({"grad_kl_pi_ref": float(np.linalg.norm(grad_kl)), "grad_kl_ref_pi": float(np.linalg.norm(grad_reverse))})
    return row, grad_kl, grad_reverse


def test_k1_and_k3_are_unbiased_and_k2_is_biased_growing_with_the_kl(smoke):
    _, s = smoke
    rows = s["rows"]
    assert len(rows) == 2 * 5 and s["max_abs_bias_k1"] < 1e-12 and s["max_abs_bias_k3"] < 1e-12
    assert all(abs(r["k1_bias"]) < 1e-12 and abs(r["k3_bias"]) < 1e-12 for r in rows)
    for family, sign in (("+d", 1), ("-d", -1)):
        fam = [r for r in rows if r["family"] == family]
        assert [r["s"] for r in fam] == pytest.approx([0, 0.75, 1.5, 2.25, 3.0])
        kls, bias = [r["kl"] for r in fam], [r["k2_bias"] for r in fam]
        assert kls[0] == 0 and all(a < b for a, b in zip(kls, kls[1:]))  # the KL grows with s
        assert bias[0] == 0 and all(sign * b > 0 for b in bias[1:])  # biased: up along +d, down along -d
        assert all(abs(a) < abs(b) for a, b in zip(bias[1:], bias[2:]))  # and growing with the KL
        assert s["k2_bias_monotone"][family]
    up = [r["k2_bias"] for r in rows if r["family"] == "+d"]
    assert up[-1] > 0.5  # far from ref the bias is a large share of the KL (1.49 nats at s = 3)


def test_estimators_as_losses(smoke):
    _, s = smoke
    moved = [r for r in s["rows"] if r["s"] > 0]
    assert s["max_grad_k1"] < 1e-12 and all(r["grad_k1"] < 1e-12 for r in s["rows"])  # k1: zero expected gradient
    assert all(r["grad_kl_pi_ref"] > 0.05 for r in moved)  # ... while the KL's gradient is not zero
    assert all(r["cos_k2_kl"] == pytest.approx(1, abs=1e-9) for r in moved)  # k2: grad KL(pi || ref)
    assert all(r["grad_k2"] == pytest.approx(r["grad_kl_pi_ref"], rel=1e-9) for r in moved)
    assert all(r["cos_k3_reverse_kl"] == pytest.approx(1, abs=1e-9) for r in moved)  # k3: grad KL(ref || pi)
    assert min(r["cos_k3_kl"] for r in moved) < 0.8  # which is another direction far from ref
    assert all(r["cos_k2_kl"] is None for r in s["rows"] if r["s"] == 0)  # pi = ref: no direction to compare


@pytest.mark.parametrize("index", [1, 4, 8])
def test_a_row_equals_the_float64_formulas_written_here(smoke, index):
    _, s = smoke
    got = s["rows"][index]
    want, grad_kl, grad_reverse = numpy_row(s["reference"], s["direction"], (1 if got["family"] == "+d" else -1) * got["s"])
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-13), key
    cos = float(grad_kl @ grad_reverse / (np.linalg.norm(grad_kl) * np.linalg.norm(grad_reverse)))
    assert got["cos_k3_kl"] == pytest.approx(cos, rel=1e-9)


def test_the_k2_bias_follows_kappa3_over_6_near_the_reference(smoke):
    _, s = smoke
    near = [r for r in s["rows"] if 0 < r["kl"] < 0.1]
    assert near and all(np.sign(r["k2_bias"]) == np.sign(r["k2_bias_predicted"]) for r in near)
    assert all(r["k2_bias"] == pytest.approx(r["k2_bias_predicted"], rel=0.4) for r in near)


def test_monte_carlo_agrees_with_the_exact_numbers(smoke):
    _, s = smoke
    for r in s["rows"]:
        assert all(abs(r[f"mc_{k}_z"]) < 4.5 for k in ("k1", "k2", "k3")), r
        assert r["mc_grad_k1"] < 5 * r["mc_grad_k1_rms"]
    assert s["max_abs_mc_z"] < 4.5


def test_sampled_means_approach_the_exact_means_as_samples_grow(tmp_path):
    errors = {}
    for n in (100, 100_000):
        out = L.main(["--smoke", "--points", "3", "--samples", str(n), "--no-plots", "--out", str(tmp_path / str(n))])
        errors[n] = max(abs(r[f"mc_{k}_mean"] - r[f"{k}_mean"]) for r in out["rows"] for k in ("k1", "k2", "k3"))
        grads = max(r["mc_grad_k1"] for r in out["rows"])
        assert grads < 5 * math.sqrt(1 / n)  # k1's sampled loss gradient: noise of size 1/sqrt(N) only
    assert errors[100_000] < errors[100] / 5  # ~sqrt(1000) = 32x smaller in expectation


def test_files_and_summary(smoke):
    out, s = smoke
    assert json.loads((out / "summary.json").read_text())["max_abs_bias_k1"] == s["max_abs_bias_k1"]
    assert [(r["family"], r["s"]) for r in read_jsonl(out / "metrics.jsonl")] == [(r["family"], r["s"]) for r in s["rows"]]
    for name in ("kl_bias.png", "kl_std.png", "kl_grad.png"):
        assert (out / name).stat().st_size > 1000, name
    assert s["config"]["samples"] == 4000 and s["config"]["points"] == 5


def test_without_monte_carlo(tmp_path):
    s = L.main(["--smoke", "--samples", "0", "--no-plots", "--out", str(tmp_path)])
    assert "mc_k1_mean" not in s["rows"][0] and "max_abs_mc_z" not in s
    assert not (tmp_path / "kl_bias.png").exists()


@pytest.mark.parametrize("argv,flag", [(["--points", "1"], "--points"), (["--max-scale", "0"], "--max-scale"),
                                       (["--max-scale", "inf"], "--max-scale"), (["--vocab", "1"], "--vocab"),
                                       (["--samples", "-1"], "--samples")])
def test_bad_flags_are_usage_errors_naming_the_flag(usage_error, argv, flag):
    assert flag in usage_error(L.main, ["--smoke"] + argv)


def test_help_and_the_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        L.main(["--help"])
    assert e.value.code == 0 and "--samples" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        runs.cli(L.main, L.CHAPTER, ["--smoke", "--points", "0"])
    assert e.value.code == 2

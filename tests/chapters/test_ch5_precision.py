"""ch5_precision: format constants, fp16 gradient underflow and its rescue by loss scaling, bf16 without.

References: the IEEE-754 binary16 / bfloat16 / binary32 definitions (max = (2 - 2^-m) * 2^emax,
smallest normal 2^(1 - bias), smallest subnormal 2^(1 - bias - m), eps 2^-m), written here as
numbers; the fp32 gradient of the same batch; torch's own ``.half()`` cast and the round-to-nearest
rule (|x| <= 2^-25 flushes) for the flushed-entry count; hand-worked flush statistics.
"""
import numpy as np
import pytest
import torch

from minilife.chapters import ch5_precision as P
from minilife.train import BatchSource
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_format_table_matches_ieee_definitions():
    rows = {r["format"]: r for r in P.format_table()}
    expected = {  # (exponent bits, mantissa bits, max, smallest normal, smallest subnormal, eps)
        "fp16": (5, 10, (2 - 2 ** -10) * 2.0 ** 15, 2.0 ** -14, 2.0 ** -24, 2.0 ** -10),
        "bf16": (8, 7, (2 - 2 ** -7) * 2.0 ** 127, 2.0 ** -126, 2.0 ** -133, 2.0 ** -7),
        "fp32": (8, 23, (2 - 2 ** -23) * 2.0 ** 127, 2.0 ** -126, 2.0 ** -149, 2.0 ** -23),
    }
    for name, (e, m, mx, normal, sub, eps) in expected.items():
        r = rows[name]
        assert (r["exponent_bits"], r["mantissa_bits"]) == (e, m)
        assert (r["max"], r["smallest_normal"], r["smallest_subnormal"], r["eps"]) == (mx, normal, sub, eps)  # exact


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 128, 4000).astype(np.uint16)
    model = GPT(ModelConfig.preset("micro", vocab_size=128, context_length=32))
    return model, BatchSource(tokens, 4, 32, seed=0).micro_batch(0)


def test_fp16_underflow_without_scaling_and_rescue_with_it(model_and_batch):
    model, batch = model_and_batch
    (row,), _ = P.underflow_table(model, batch, [16], 2.0 ** 16)
    # gradients x 2^-16 sit mostly below fp16's smallest subnormal 6e-8: a large share flushes to zero
    assert row["fp16"]["flushed_fraction"] > 0.1
    # x 2^16 puts them back in range: nothing (beyond a rare exact cancellation) flushes
    assert row["fp16_static_scale"]["flushed_fraction"] < 1e-3
    assert row["fp16_static_scale"]["nonfinite_fraction"] == 0.0
    assert row["fp16_static_scale"]["rel_error"] < 0.02  # fp16 rounding (eps 1e-3) through a backward pass
    assert row["bf16"]["flushed_fraction"] < 1e-3  # bf16 keeps fp32's range
    assert row["fp16_cast"]["flushed_fraction"] > 0.1  # the storage effect alone already loses many


def test_fp16_cast_flush_count_matches_ieee_rounding_and_torch_cast(model_and_batch):
    """The cast column against two independent counts: torch's own ``.half()`` of the fp32 gradient,
    and the float64 rule of round-to-nearest-even -- |x| <= 2^-25 (half the smallest subnormal 2^-24,
    a tie rounding to the even 0) becomes 0 in fp16."""
    model, batch = model_and_batch
    model.zero_grad(set_to_none=True)
    _, loss = model(batch.inputs, batch.targets, **batch.attention)  # mean loss, plain fp32
    loss.backward()
    ref = [p.grad.detach().clone() * 2.0 ** -16 for p in model.parameters()]  # x 2^-16 is exact
    model.zero_grad(set_to_none=True)
    nonzero = sum(int((r != 0).sum()) for r in ref)
    by_torch = sum(int(((r != 0) & (r.half() == 0)).sum()) for r in ref)
    by_rule = sum(int(((r != 0) & (r.double().abs() <= 2.0 ** -25)).sum()) for r in ref)
    assert by_torch == by_rule > 0.1 * nonzero  # the IEEE rule is torch's cast, entry for entry
    (row,), _ = P.underflow_table(model, batch, [16], 2.0 ** 16)
    assert row["fp16_cast"]["flushed_fraction"] == by_torch / nonzero  # same integer counts: exact
    assert row["fp16_cast"]["nonfinite_fraction"] == 0.0  # x 2^-16 cannot overflow


def test_flush_stats_hand_worked():
    ref = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0])]
    got = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([float("inf")])]
    st = P.flush_stats(ref, got)
    assert st["flushed_fraction"] == 1 / 3  # 2.0 -> 0 among the 3 non-zero reference entries
    assert st["nonfinite_fraction"] == 1 / 4  # the inf, among all 4 entries
    # over finite entries only: sqrt((2 - 0)^2 / (1 + 4 + 9)), computed in float64
    assert st["rel_error"] == pytest.approx((4 / 14) ** 0.5, rel=1e-12)


def test_static_scale_too_large_overflows(model_and_batch):
    model, batch = model_and_batch
    (row,), _ = P.underflow_table(model, batch, [0], 2.0 ** 30)
    assert row["fp16_static_scale"]["nonfinite_fraction"] > 0  # x 2^30 pushes gradients past 65504


def test_main_smoke(smoke_data_dir, tmp_path):
    s = P.main(["--smoke", "--data-dir", smoke_data_dir, "--out", str(tmp_path)])
    by_e = {r["e"]: r for r in s["underflow"]}
    assert by_e[16]["fp16"]["flushed_fraction"] > 0.1 and by_e[16]["fp16_static_scale"]["flushed_fraction"] < 1e-3
    t = s["training"]
    assert all(np.isfinite(v["last_loss"]) for v in t.values())
    # the chapter's claim holds at smoke size too: the scaler backs off (skips), then fp16 with dynamic
    # scaling ends below fp16 without it, and within 0.2 nats of fp32 (measured 4.81 / 5.03 / 4.71)
    dyn, none, fp32 = t["fp16, dynamic scaling"], t["fp16, no scaling"], t["fp32"]
    assert 0 < dyn["skipped_steps"] < 5 and dyn["last_loss"] < none["last_loss"] - 0.1
    assert dyn["last_loss"] - fp32["last_loss"] < 0.2
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "loss_scale.png").is_file()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        P.main(["--help"])
    assert e.value.code == 0 and "--static-scale-exponent" in capsys.readouterr().out


@pytest.mark.parametrize("flags, named", [
    (["--train-steps", "0"], "--train-steps"),
    (["--warm-steps", "-1"], "--warm-steps"),
    (["--lr", "0"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--scaler-growth-interval", "0"], "--scaler-growth-interval"),
    (["--shrink-exponents"], "--shrink-exponents"),
    (["--preset", "huge"], "--preset"),
])
def test_nonsense_flags_are_usage_errors_naming_the_flag(flags, named, usage_error):
    assert named in usage_error(P.main, ["--smoke"] + flags)

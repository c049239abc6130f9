"""ch5_accumulation: k micro-batches == one big batch (float64), and the naive mean's error when ragged.

Reference: one forward of the concatenated batch and torch's own ``F.cross_entropy(reduction="mean")``
(its mean over all non-ignored tokens), in float64. Only summation order differs from the accumulated
gradient, so a relative tolerance of 1e-12 (float64 eps 2.2e-16 times sums of ~1e3 terms, with
margin) separates "equal" from the naive method's O(1) relative error.
"""
import numpy as np
import pytest
import torch

from minilife.chapters import ch5_accumulation as A
from minilife.train import BatchSource
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, K, B = 97, 16, 4, 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, V, 5000).astype(np.uint16)
    model = GPT(ModelConfig.preset("micro", vocab_size=V, context_length=T)).double()
    src = BatchSource(tokens, B, T, seed=0)
    micro = [src.micro_batch(i) for i in range(K)]
    ragged = A.make_ragged(micro, 0.1, 0, torch.Generator().manual_seed(0))
    return model, micro, ragged


def test_ragged_micro_batches_really_are_ragged(setup):
    _, micro, ragged = setup
    counts = [A.n_targets(m) for m in ragged]
    assert [A.n_targets(m) for m in micro] == [B * T] * K
    assert counts[0] > 3 * counts[-1] > 0  # the first keeps ~all tokens, the last ~10%


@pytest.mark.parametrize("case", ["equal", "ragged"])
def test_token_weighted_accumulation_equals_big_batch_float64(setup, case):
    model, micro, ragged = setup
    r = A.compare_step(model, micro if case == "equal" else ragged)["token-weighted"]
    assert r["rel_grad_diff"] < 1e-12  # summation order only (see module docstring)
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-12)


def test_naive_mean_is_right_only_for_equal_token_counts(setup):
    model, micro, ragged = setup
    equal = A.compare_step(model, micro)["naive mean"]
    assert equal["rel_grad_diff"] < 1e-12  # equal counts: mean of means == mean
    wrong = A.compare_step(model, ragged)["naive mean"]
    assert wrong["rel_grad_diff"] > 1e-2  # short micro-batches are over-weighted: an O(1) error
    assert abs(wrong["loss"] - wrong["ref_loss"]) > 1e-4


def test_weights_stay_equal_over_several_adamw_steps(setup):
    model, _, ragged = setup
    drift = A.train_side_by_side(model, [ragged, ragged[::-1], ragged], lr=1e-3)
    # AdamW divides by sqrt(v)+eps: rounding-level gradient differences stay at lr * 1e-12 at most
    assert max(drift["token-weighted"]) < 1e-12
    assert drift["naive mean"][-1] > 1e-4  # ~lr per step on many weights


def test_main_smoke(smoke_data_dir, tmp_path):
    s = A.main(["--smoke", "--data-dir", smoke_data_dir, "--out", str(tmp_path)])
    rows = {(r["case"], r["method"]): r for r in s["rows"]}
    assert rows[("ragged", "token-weighted")]["rel_grad_diff"] < 1e-12
    assert rows[("ragged", "naive mean")]["rel_grad_diff"] > 1e-2
    assert (tmp_path / "weight_drift.png").is_file() and (tmp_path / "summary.json").is_file()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        A.main(["--help"])
    assert e.value.code == 0 and "--micro-batches" in capsys.readouterr().out


@pytest.mark.parametrize("flags, named", [
    (["--micro-batches", "1"], "--micro-batches"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--shortest", "0"], "--shortest"),
    (["--context-length", "2"], "--context-length"),
])
def test_nonsense_flags_are_usage_errors_naming_the_flag(flags, named, usage_error):
    assert named in usage_error(A.main, ["--smoke"] + flags)

"""ch5_checkpointing: resume after a kill is bitwise exact only with everything restored; gradient
checkpointing holds fewer activation bytes and leaves the gradients unchanged.

References: the uninterrupted run (bitwise, tolerance 0: CPU float32 kernels are deterministic for a
fixed thread count), the same step without checkpointing, and tensor sizes numel * itemsize.
"""
import numpy as np
import pytest
import torch

from minilife.chapters import ch5_checkpointing as C
from minilife.train import BatchSource
from minilife.measure import LiveTensorBytes
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 128, 4000).astype(np.uint16)


def test_live_bytes_counts_allocations_and_frees():
    with LiveTensorBytes() as meter:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)  # (10, 100): a view, no new storage
        c = torch.ones(250, dtype=torch.float64)
        assert meter.live == 1000 * 4 + 250 * 8
        del a, b
        assert meter.live == 250 * 8
        del c
    assert (meter.live, meter.peak) == (0, 1000 * 4 + 250 * 8)


def test_resume_exact_only_when_everything_is_restored(tokens, tmp_path):
    cfg = C.CheckpointingConfig(steps=6, kill_at=3)
    src = BatchSource(tokens, 4, 32, seed=0)
    model_cfg = ModelConfig.preset("micro", vocab_size=128, context_length=32, dropout=0.1)
    rows = {r["variant"]: r for r in C.resume_experiment(cfg, src, model_cfg, 6, 3, tmp_path, torch.device("cpu"))}
    full = rows.pop("full (weights+optimizer+RNG+data+step)")
    assert full["bitwise_equal"] and full["max_abs_diff"] == 0.0  # tolerance 0
    for name, r in rows.items():  # each missing piece changes the trajectory
        assert not r["bitwise_equal"] and r["max_abs_diff"] > 1e-6, name


def test_gradient_checkpointing_saves_activation_memory_same_grads(tokens):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("micro", vocab_size=128, context_length=64))
    batch = BatchSource(tokens, 8, 64, seed=0).micro_batch(0)
    r = C.gradient_checkpointing_experiment(model, batch, repeats=1)
    # off: every block's intermediates are held; on: only block inputs (2 blocks) + head
    assert r["held_after_forward_on"] < 0.6 * r["held_after_forward_off"]
    assert r["peak_on"] < r["peak_off"]
    assert r["max_abs_grad_diff"] == 0.0  # recomputation runs the same kernels on the same inputs
    assert model.cfg.gradient_checkpointing is False  # restored


def test_main_smoke(smoke_data_dir, tmp_path):
    s = C.main(["--smoke", "--data-dir", smoke_data_dir, "--out", str(tmp_path)])
    assert s["resume_exact"] and s["resume"][0]["max_abs_diff"] == 0.0
    assert s["gradient_checkpointing"]["held_after_forward_on"] < s["gradient_checkpointing"]["held_after_forward_off"]
    assert (tmp_path / "summary.json").is_file()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--help"])
    assert e.value.code == 0 and "--kill-at" in capsys.readouterr().out


@pytest.mark.parametrize("flags, named", [
    (["--steps", "1"], "--steps"),
    (["--steps", "6", "--kill-at", "6"], "--kill-at"),
    (["--kill-at", "6"], "--kill-at"),  # smoke default steps is 6
    (["--kill-at", "0"], "--kill-at"),
    (["--lr", "0"], "--lr"),
    (["--gc-repeats", "0"], "--gc-repeats"),
    (["--dropout", "1.0"], "--dropout"),
    (["--gc-preset", "huge"], "--gc-preset"),
])
def test_nonsense_flags_are_usage_errors_naming_the_flag(flags, named, usage_error):
    assert named in usage_error(C.main, ["--smoke"] + flags)

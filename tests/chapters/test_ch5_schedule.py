"""ch5_schedule: the spike metric, the smoke run of all three experiments, early stopping's bookkeeping."""
import math

import numpy as np
import pytest
import torch

from minilife.chapters import ch5_schedule as S
from minilife.train import BatchSource
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spike_is_largest_rise_above_running_min():
    assert S.spike([5.0, 4.0, 3.0, 2.5]) == 0.0
    assert S.spike([5.0, 4.0, 6.5, 3.0, 3.5]) == 2.5  # 6.5 - 4.0; the later 0.5 rise is smaller


def test_run_applies_the_schedule_then_the_plateau_override():
    """The LR each step actually used: the schedule until an evaluation returns a new LR, that LR after;
    a ``None`` return keeps the override. Hand-worked: evaluations after steps 2 and 4."""
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 50, 2000).astype(np.uint16)
    src = BatchSource(tokens, 2, 16, seed=0)
    model = GPT(ModelConfig.preset("micro", vocab_size=50, context_length=16))
    seen = []

    def on_eval(step, v):
        seen.append(step)
        return 1e-4 if step == 2 else None

    h = S.run(model, src, 5, lambda s: 1e-3 * (s + 1), grad_clip=1.0, val=src, eval_every=2, eval_batches=1,
              on_eval=on_eval)
    assert h["lr"] == [1e-3, 2e-3, 1e-4, 1e-4, 1e-4] and seen == [2, 4] == h["val_step"]
    assert h["step"] == [1, 2, 3, 4, 5] and h["diverged_at"] is None


def test_main_smoke(smoke_data_dir, tmp_path):
    s = S.main(["--smoke", "--data-dir", smoke_data_dir, "--out", str(tmp_path)])
    assert set(s["warmup"]) == {"no warmup", "warmup 1"}
    es = s["early_stopping"]
    assert es["best_step"] is not None and es["best_step"] % 2 == 0  # evaluated every 2 steps
    # the restored weights are the best ones: evaluated on the same fixed val batches, the same number
    assert es["restored_val_loss"] == pytest.approx(es["best_val_loss"], abs=1e-6)  # float32 re-run noise bound
    assert all(math.isfinite(v["final_val_loss"]) for v in s["plateau"].values())
    for name in ("warmup.png", "plateau_val.png", "plateau_lr.png", "early_stopping.png", "summary.json"):
        assert (tmp_path / name).is_file(), name


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--help"])
    assert e.value.code == 0 and "--high-lr" in capsys.readouterr().out


@pytest.mark.parametrize("flags, named", [
    (["--steps", "-3"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--high-lr", "0"], "--high-lr"),
    (["--plateau-lr", "-0.1"], "--plateau-lr"),
    (["--overfit-lr", "nan"], "--overfit-lr"),
    (["--steps", "10", "--warmup-steps", "11"], "--warmup-steps"),
    (["--eval-every", "0"], "--eval-every"),
    (["--stop-patience", "0"], "--stop-patience"),
    (["--preset", "huge"], "--preset"),
])
def test_nonsense_flags_are_usage_errors_naming_the_flag(flags, named, usage_error):
    assert named in usage_error(S.main, ["--smoke"] + flags)

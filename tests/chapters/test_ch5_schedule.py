"""ch5_schedule: the spike metric, the smoke run of all three experiments, early stopping's bookkeeping."""
import math

import pytest
import torch

from minilife.chapters import ch5_schedule as S

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spike_is_largest_rise_above_running_min():
    assert S.spike([5.0, 4.0, 3.0, 2.5]) == 0.0
    assert S.spike([5.0, 4.0, 6.5, 3.0, 3.5]) == 2.5  # 6.5 - 4.0; the later 0.5 rise is smaller


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

"""warmup_cosine_lr against an independent closed form and its properties; PlateauScheduler against
torch's ReduceLROnPlateau; EarlyStopping on hand-worked sequences."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.optim import EarlyStopping, PlateauScheduler, warmup_cosine_lr


def _reference_lr(step, max_lr, warmup, total, min_lr):
    """Independent form: warmup is the line through (-1, 0) and (W-1, max_lr); decay uses
    (1 + cos(pi x)) / 2 = cos^2(pi x / 2)."""
    if step < warmup:
        return float(np.interp(step, [-1, warmup - 1], [0.0, max_lr]))
    if step >= total:
        return min_lr
    x = (step - warmup) / (total - warmup)
    return min_lr + (max_lr - min_lr) * math.cos(math.pi * x / 2) ** 2


@pytest.mark.parametrize("step", [0, 1, 9, 10, 11, 55, 99, 100, 101, 5000])
def test_matches_closed_form(step):
    kw = dict(max_lr=6e-4, warmup_steps=10, total_steps=100, min_lr=6e-5)
    expected = _reference_lr(step, 6e-4, 10, 100, 6e-5)
    assert warmup_cosine_lr(step, **kw) == pytest.approx(expected, rel=1e-12, abs=1e-18)  # float64 rounding


def test_hand_worked_values():
    kw = dict(max_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.0)
    assert warmup_cosine_lr(0, **kw) == 0.25  # first warmup step: max_lr / W
    assert warmup_cosine_lr(3, **kw) == 1.0  # last warmup step reaches max_lr
    assert warmup_cosine_lr(9, **kw) == pytest.approx(0.5, abs=1e-15)  # half-way through the decay: cos(pi/2) = 0
    assert warmup_cosine_lr(14, **kw) == 0.0


@given(warmup=st.integers(0, 50), decay=st.integers(0, 200),
       max_lr=st.floats(1e-6, 1.0), min_frac=st.floats(0.0, 1.0))
def test_properties(warmup, decay, max_lr, min_frac):
    total, min_lr = warmup + decay, max_lr * min_frac
    lrs = [warmup_cosine_lr(s, max_lr=max_lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr)
           for s in range(total + 5)]
    tol = 1e-12 * max_lr  # float rounding in the cosine
    assert all(min(min_lr, lrs[0]) - tol <= lr <= max_lr + tol for lr in lrs)  # bounded
    assert all(a <= b + tol for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # warmup non-decreasing
    assert all(a + tol >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # decay non-increasing
    assert lrs[total] == min_lr and lrs[-1] == min_lr  # end value, constant after
    if warmup:
        assert lrs[0] == pytest.approx(max_lr / warmup) and lrs[warmup - 1] == pytest.approx(max_lr)


@pytest.mark.parametrize("kwargs, word", [
    (dict(step=-1), "step"), (dict(warmup_steps=20, total_steps=10), "warmup_steps"),
    (dict(min_lr=1.0), "min_lr"),
])
def test_bad_arguments(kwargs, word):
    kw = dict(step=0, max_lr=0.1, warmup_steps=2, total_steps=10, min_lr=0.0) | kwargs
    step = kw.pop("step")
    with pytest.raises(ValueError, match=word):
        warmup_cosine_lr(step, **kw)


@pytest.mark.parametrize("seed", range(4))
def test_plateau_matches_torch(seed):
    rng = np.random.default_rng(seed)
    # a loss that falls, then plateaus with noise, then falls a bit again
    losses = np.concatenate([np.linspace(3, 2, 10), 2 + 0.01 * rng.standard_normal(25), np.linspace(1.99, 1.5, 5),
                             1.5 + 0.001 * rng.standard_normal(20)])
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=3, threshold=1e-3,
                                                     threshold_mode="rel", cooldown=0, min_lr=0.01)
    ours = PlateauScheduler(0.1, factor=0.5, patience=3, threshold=1e-3, min_lr=0.01)
    for i, loss in enumerate(losses):
        ref.step(loss)
        assert ours.step(loss) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), f"evaluation {i}"
        if i == 20:  # resume mid-way
            state = ours.state_dict()
            ours = PlateauScheduler(0.1, factor=0.5, patience=3, threshold=1e-3, min_lr=0.01)
            ours.load_state_dict(state)
    assert ours.num_reductions >= 2  # the sequence really exercised the reductions and the floor


def test_plateau_sets_optimizer_lr():
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [param]}], lr=1.0)
    sched = PlateauScheduler(1.0, factor=0.1, patience=0, optimizer=opt)
    sched.step(1.0)
    assert opt.param_groups[0]["lr"] == 1.0
    sched.step(1.0)  # no improvement, patience 0 -> reduce
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_early_stopping():
    stopper = EarlyStopping(patience=3, min_delta=0.01)
    losses = [3.0, 2.5, 2.495, 2.6, 2.2, 2.3, 2.195, 2.25]  # 2.495 and 2.195 are within min_delta: no improvement
    decisions = [stopper.should_stop(loss, step=100 * i) for i, loss in enumerate(losses)]
    assert decisions == [False, False, False, False, False, False, False, True]
    assert stopper.best == 2.2 and stopper.best_step == 400
    resumed = EarlyStopping(patience=3, min_delta=0.01)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.should_stop(2.3) is True and resumed.best_step == 400


def test_early_stopping_nan_is_not_an_improvement():
    stopper = EarlyStopping(patience=2)
    assert not stopper.should_stop(1.0)
    assert not stopper.should_stop(float("nan"))
    assert stopper.should_stop(float("nan"))
    assert stopper.best_step == 0
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)

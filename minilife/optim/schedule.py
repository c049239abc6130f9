"""Learning-rate schedules and early stopping.

What it implements
- ``warmup_cosine_lr(step, ...)``: a pure function of the step, so resuming from a checkpoint needs
  only the step number. Linear warmup (Goyal et al. 2017) then half-cosine decay (Loshchilov &
  Hutter 2017, SGDR, eq. 5 without restarts):
      step < W:        lr = max_lr * (step + 1) / W                       (max_lr / W at step 0, max_lr at W-1)
      W <= step < S:   lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * (step - W) / (S - W))) / 2
      step >= S:       lr = min_lr
  with W = warmup_steps and S = total_steps (the absolute step where the cosine reaches min_lr).
- ``PlateauScheduler``: reduce-on-plateau. After ``patience`` evaluations without a relative
  improvement larger than ``threshold``, multiply the lr by ``factor`` (never below ``min_lr``).
  The same rule as torch.optim.lr_scheduler.ReduceLROnPlateau in "min"/"rel" mode, without cooldown.
- ``EarlyStopping``: stop once the validation loss has not improved by more than ``min_delta`` for
  ``patience`` evaluations in a row; remembers the best loss and the step it was seen at.

Both classes have state_dict()/load_state_dict() so a resumed run continues the same decisions.
What it leaves out: step decay, linear decay, warmup-stable-decay (WSD), cyclic schedules.
"""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, *, max_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (0-based) for linear warmup + cosine decay (formula above)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if not 0.0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    # exercise: warmup_cosine
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # end exercise: warmup_cosine


class PlateauScheduler:
    """Reduce the learning rate when a monitored loss stops improving.

    ``lr = sched.step(val_loss)`` after each evaluation; if an ``optimizer`` is given its groups' lr
    are set to the new value when it changes. An evaluation improves when
    val_loss < best * (1 - threshold) (relative threshold, as torch's default); NaN never improves."""

    def __init__(self, lr: float, *, factor: float = 0.5, patience: int = 3, threshold: float = 1e-4,
                 min_lr: float = 0.0, optimizer=None):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"PlateauScheduler factor must be in (0, 1), got {factor}")
        if patience < 0 or threshold < 0 or min_lr < 0 or lr < 0:
            raise ValueError(f"PlateauScheduler: lr, patience, threshold and min_lr must be >= 0, got "
                             f"lr={lr}, patience={patience}, threshold={threshold}, min_lr={min_lr}")
        self.lr, self.factor, self.patience, self.threshold, self.min_lr = lr, factor, patience, threshold, min_lr
        self.optimizer, self.best, self.num_reductions = optimizer, math.inf, 0
        self.num_bad = 0  # evaluations since the last improvement

    def step(self, val_loss: float) -> float:
        val_loss = float(val_loss)
        if val_loss < self.best * (1.0 - self.threshold):
            self.best, self.num_bad = val_loss, 0
        else:
            self.num_bad += 1
        if self.num_bad > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if new_lr < self.lr:
                self.lr = new_lr
                self.num_reductions += 1
                if self.optimizer is not None:
                    for group in self.optimizer.param_groups:
                        group["lr"] = new_lr
            self.num_bad = 0
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "num_bad": self.num_bad, "num_reductions": self.num_reductions}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.num_bad, self.num_reductions = int(state["num_bad"]), int(state["num_reductions"])


class EarlyStopping:
    """Patience on the validation loss.

    ``if stopper.should_stop(val_loss, step): break``. An evaluation improves when
    val_loss < best - min_delta; a NaN loss never improves (a diverged run runs out of patience).
    ``best`` and ``best_step`` say which checkpoint to keep."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        if patience < 1 or min_delta < 0:
            raise ValueError(f"EarlyStopping needs patience >= 1 and min_delta >= 0, got "
                             f"patience={patience}, min_delta={min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_step = math.inf, None
        self.num_bad, self.num_calls = 0, 0

    def should_stop(self, val_loss: float, step: int | None = None) -> bool:
        """Record one evaluation (``step`` defaults to the evaluation count) and say whether to stop."""
        step = self.num_calls if step is None else step
        self.num_calls += 1
        val_loss = float(val_loss)
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.num_bad = val_loss, step, 0
        else:
            self.num_bad += 1
        return self.num_bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "num_bad": self.num_bad, "num_calls": self.num_calls}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = float(state["best"]), state["best_step"]
        self.num_bad, self.num_calls = int(state["num_bad"]), int(state["num_calls"])

"""Dynamic loss scaling for fp16 training: a scale that finds itself.

What it implements (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2; the scheme of
torch.amp.GradScaler): the loss is multiplied by a scale S before ``backward()`` so that small
gradients stay above fp16's smallest normal number; the gradients are divided by S again before the
optimizer step. When any gradient overflows (inf/NaN) the step is skipped and S halves; after
``growth_interval`` good steps in a row S doubles, so it settles just below the overflow line.

What it leaves out: per-parameter-group scales, the fused unscale kernels, and bf16 (whose exponent
range is fp32's: it needs no scaling). Chapter 5 (``ch5_precision``) shows why the scale is needed.
"""
from __future__ import annotations

import torch

__all__ = ["DynamicLossScaler"]


class DynamicLossScaler:
    """Loss scaling that finds its own scale: halve on overflow (and skip that step), double after
    ``growth_interval`` consecutive good steps.

    Use: ``scaler.scale(loss).backward(); ok = scaler.unscale_(params); if ok: opt.step();
    scaler.update(ok)``.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.scale_value, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.good_steps, self.skipped = growth_interval, 0, 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    @torch.no_grad()
    def unscale_(self, params) -> bool:
        """Divide every gradient by the scale (in fp32); True if all of them are finite."""
        finite = True
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.scale_value)
                finite = finite and bool(torch.isfinite(p.grad).all())
        return finite

    def update(self, finite: bool) -> None:
        # exercise: loss_scaling
        if not finite:
            self.scale_value *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.good_steps = 0
        # end exercise: loss_scaling

"""Gradient clipping by the global L2 norm (Pascanu et al. 2013, "On the difficulty of training
recurrent neural networks", Algorithm 1).

    norm = sqrt(sum over parameters of sum(g^2))
    if norm > max_norm:  g <- g * max_norm / (norm + 1e-6)      (every gradient, in place)

The direction of the full gradient is kept; only its length is capped. Parameters without a gradient
(frozen, or unused in this step) are skipped. The pre-clip norm is returned as a Python float so a
training loop can log it; spikes in it are the early warning of a loss spike.

Non-finite norms: if any gradient holds inf or NaN, the norm is inf or NaN. Scaling by
max_norm / inf would turn every gradient into 0 or NaN and hide the cause, so the gradients are
left untouched and the inf/NaN norm is returned: the caller decides (skip the step, lower the loss
scale, stop). torch.nn.utils.clip_grad_norm_ would scale them instead (unless error_if_nonfinite).

What it leaves out: other norm types (max-norm, L1), per-parameter clipping, clipping by value,
sharded (distributed) norms.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable

import torch


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    parameters: tensors (e.g. model.parameters()); a single tensor is accepted too.
    Returns the global norm before clipping (0.0 when no parameter has a gradient)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    for i, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"clip_grad_norm: parameters[{i}] is {type(p).__name__}, expected a tensor")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0].device
    # one norm per tensor (in the widest of their dtypes, at least float32), then the norm of those norms
    dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
    per_tensor = [torch.linalg.vector_norm(g, 2, dtype=dtype).to(device) for g in grads]
    norm = float(torch.linalg.vector_norm(torch.stack(per_tensor), 2))
    if not math.isfinite(norm):
        return norm  # leave the gradients as they are (see module docstring)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm

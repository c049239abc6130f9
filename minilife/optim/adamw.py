"""AdamW written from its update equations, as a ``torch.optim.Optimizer``.

Follows Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", Algorithm 2, with the
schedule multiplier folded into the learning rate (as torch.optim.AdamW does). For each parameter
p with gradient g at step t = 1, 2, ...:

    p   <- p - lr * wd * p                      decoupled weight decay (not added to g)
    m   <- beta1 * m + (1 - beta1) * g          first moment (Kingma & Ba 2015, Algorithm 1)
    v   <- beta2 * v + (1 - beta2) * g^2        second moment
    m^  =  m / (1 - beta1^t)                    bias correction: m, v start at 0
    v^  =  v / (1 - beta2^t)
    p   <- p - lr * m^ / (sqrt(v^) + eps)

Decoupling matters: in Adam + L2 the decay term passes through the 1/sqrt(v^) scaling, so weights
with large gradients are decayed less; here every weight shrinks by the same factor (1 - lr * wd).

Per-group hyperparameters (lr, betas, eps, weight_decay) use the standard Optimizer param-group
mechanics, so GPT.param_groups can exempt norms and embeddings from decay, schedules can set
group["lr"], and state_dict()/load_state_dict() round-trip. The update is a plain per-tensor loop
(no foreach/fused multi-tensor kernels) so it reads like the equations.

What it leaves out: AMSGrad, sparse gradients, maximize, complex parameters, capturable/fused modes.
"""
from __future__ import annotations

import math

import torch


class AdamW(torch.optim.Optimizer):
    """AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2).

    State per parameter: ``step`` (int), ``exp_avg`` (m) and ``exp_avg_sq`` (v), each shaped like p."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hyperparameters(g["lr"], g["betas"], g["eps"], g["weight_decay"],
                               where=f"param group {len(self.param_groups) - 1}")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("minilife AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                # exercise: adamw_step
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)  # decoupled decay
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                bias1, bias2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
                # lr * (m / bias1) / (sqrt(v / bias2) + eps), arranged as torch does to avoid a temporary
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)
                # end exercise: adamw_step
        return loss


def _check_hyperparameters(lr, betas, eps, weight_decay, where: str = "AdamW") -> None:
    """Reject values that silently break the update (negative lr, beta >= 1, ...) with a clear error."""
    if not lr >= 0.0:
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"{where}: eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}")

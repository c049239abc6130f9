"""Reference math for the kernels: attention and cross-entropy written the obvious way.

What it implements
- ``attention_naive``: softmax(Q K^T * scale + mask) V with the whole (T, S) score matrix in memory
  (Vaswani et al. 2017, eq. 1). Memory is O(B*H*T*S); that is the cost flash attention removes.
- ``cross_entropy_naive``: mean/sum/none negative log-likelihood of the target token, with
  ``ignore_index`` and label smoothing (Szegedy et al. 2016), matching ``F.cross_entropy``'s semantics.

Both are plain torch, written as formulas (no ``F.scaled_dot_product_attention``, no
``F.cross_entropy``: those stay available as *independent* second references). They keep the input
dtype, so tests call them on float64 copies to get a ground truth that fp32/fp16 kernels are compared
against.

What it leaves out: dropout on the attention probabilities, ALiBi/RoPE (applied to q, k before this),
class weights in the loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["attention_naive", "cross_entropy_naive"]


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: Optional[float] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention, materialising the full score matrix.

    q: (B, H, T, D), k: (B, H, S, D), v: (B, H, S, Dv) -> (B, H, T, Dv), same dtype as q.
    causal: query i may attend key j only when j <= i (top-left aligned, like SDPA's ``is_causal``).
    sm_scale: multiplies the scores; default 1/sqrt(D).
    mask: optional bool tensor broadcastable to (B, H, T, S), True = may attend; combined with
    ``causal`` by AND. A query row that may attend nothing gets an all-zero output (and zero
    gradient) instead of NaN."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention_naive: q, k, v must be 4-D (B, H, T, D); got q{tuple(q.shape)}, "
                         f"k{tuple(k.shape)}, v{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention_naive: shapes do not match: q{tuple(q.shape)}, k{tuple(k.shape)}, "
                         f"v{tuple(v.shape)} (need q/k head dims equal and k/v lengths equal)")
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)

    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)  # (T, S)
    if causal:
        allowed = torch.tril(allowed)  # j <= i
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention_naive: mask must be a bool tensor (True = may attend), got {mask.dtype}")
        allowed = allowed & mask  # broadcast to (B, H, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))

    # softmax written out; the row max is taken over allowed scores only, and a row with none
    # allowed uses max 0 so that exp(-inf - 0) = 0 and the row sums to 0 (output 0, not NaN).
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, H, T, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # (B, H, T, S)
    denom = weights.sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return probs @ v  # (B, H, T, Dv)


def cross_entropy_naive(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy from logits, written as log-softmax + gather.

    logits: (N, V) float; targets: (N,) integer class ids in [0, V) or ``ignore_index``.
    Per row: loss_i = (1 - eps) * (-log p_i[t_i]) + eps * mean_v(-log p_i[v]), eps = label_smoothing;
    rows whose target is ``ignore_index`` contribute 0 and are not counted.
    reduction: "none" -> (N,) (0 at ignored rows); "sum" -> scalar; "mean" -> sum / (number of
    non-ignored rows), which is NaN when every row is ignored (as in ``F.cross_entropy``).
    Returned in logits' dtype."""
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy_naive: logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy_naive: targets must be (N,) with N={logits.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"cross_entropy_naive: targets must be integer class ids, got {targets.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy_naive: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy_naive: label_smoothing must be in [0, 1], got {label_smoothing}")
    V = logits.shape[1]
    keep = targets != ignore_index  # (N,)
    bad = keep & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"cross_entropy_naive: targets[{i}] = {int(targets[i])} is outside [0, {V}) "
                         f"and is not ignore_index={ignore_index}")

    # log p = logits - logsumexp(logits), with the row max subtracted for stability
    row_max = logits.amax(dim=1, keepdim=True)  # (N, 1)
    lse = row_max + torch.log(torch.exp(logits - row_max).sum(dim=1, keepdim=True))  # (N, 1)
    log_probs = logits - lse  # (N, V)

    safe_targets = torch.where(keep, targets, torch.zeros_like(targets)).long()  # (N,)
    nll = -log_probs.gather(1, safe_targets[:, None])[:, 0]  # (N,)
    if label_smoothing > 0.0:
        smooth = -log_probs.mean(dim=1)  # (N,) cross-entropy against the uniform distribution
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    losses = torch.where(keep, nll, torch.zeros_like(nll))  # (N,)

    if reduction == "mean":
        return losses.sum() / keep.sum().to(losses.dtype)
    return losses if reduction == "none" else losses.sum()

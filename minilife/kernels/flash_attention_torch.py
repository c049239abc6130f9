"""Flash attention in plain torch: tiled, online softmax, O(T) extra memory (FlashAttention-2).

What it implements
- ``flash_attention_torch(q, k, v, causal=True, sm_scale=None)``: the FlashAttention-2 algorithm
  (Dao 2023, Algorithms 1 and 2) written with torch ops on tiles, as an ``autograd.Function``.
  * Forward: for each block of queries, walk over blocks of keys keeping a running row max ``m``,
    running denominator ``l`` and un-normalised output ``acc``; when a new tile raises the max, the old
    ``l`` and ``acc`` are rescaled by ``exp(m_old - m_new)``. At the end ``O = acc / l`` and the row
    log-sum-exp ``L = m + log l`` is saved: it is all the backward pass needs of the softmax.
  * Backward: ``D = rowsum(dO * O)``; then for each key block and each query block, the
    probabilities are *recomputed* from the saved ``L`` (``P = exp(S - L)``), and
    ``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D)``, ``dQ += dS K * scale``,
    ``dK += dS^T Q * scale``. No (T, T) matrix is ever stored.
- ``check_qkv``: the input checks shared with the Triton version (shapes, dtypes, devices).

Only (B, H, Bq, Bk) tiles are alive at a time, so peak memory grows like T * block instead of T^2 —
the point of the algorithm, measured with ``minilife.measure.peak_tensor_bytes``; on a GPU the Triton
kernels in ``flash_attention.py`` also get the speed (tiles stay in on-chip SRAM). Here the Python
loop over tiles makes it slower than the naive version for small T: it exists to be read, and to
check the Triton kernels tile by tile.

Accumulation is in float32 for fp16/bf16/fp32 inputs (float64 stays float64); outputs and
gradients are returned in the input dtype. What it leaves out: dropout, custom masks, different
query/key lengths (T must equal S; use ``reference.attention_naive`` for those).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["flash_attention_torch", "check_qkv"]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn: str,
              dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise a clear error unless q, k, v are (B, H, T, D) tensors of one shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{fn}: {name} has dtype {str(t.dtype).replace('torch.', '')}; "
                            f"supported: {names}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{fn}: q, k, v must have the same shape (B, H, T, D); got q{tuple(q.shape)}, "
                         f"k{tuple(k.shape)}, v{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"{fn}: sequence length T and head dim D must be > 0, got shape {tuple(q.shape)}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _causal_keep(q_start: int, q_end: int, k_start: int, k_end: int, device) -> torch.Tensor:
    """(Bq, Bk) bool tile: True where key index <= query index."""
    rows = torch.arange(q_start, q_end, device=device)[:, None]  # (Bq, 1)
    cols = torch.arange(k_start, k_end, device=device)[None, :]  # (1, Bk)
    return cols <= rows


class _FlashAttentionTorch(torch.autograd.Function):
    """autograd wrapper: forward returns (O, LSE); backward recomputes P from LSE tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, block_q: int, block_k: int):
        B, H, T, D = q.shape
        acc_t = _acc_dtype(q.dtype)
        out = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B, H, T, dtype=acc_t, device=q.device)  # (B, H, T)
        for q0 in range(0, T, block_q):
            q1 = min(q0 + block_q, T)
            qi = q[:, :, q0:q1].to(acc_t)  # (B, H, Bq, D)
            m = torch.full((B, H, q1 - q0), float("-inf"), dtype=acc_t, device=q.device)  # running max
            l = torch.zeros(B, H, q1 - q0, dtype=acc_t, device=q.device)  # running denominator
            acc = torch.zeros(B, H, q1 - q0, D, dtype=acc_t, device=q.device)  # un-normalised O
            k_end = q1 if causal else T  # keys after the last query of the block are all masked
            for k0 in range(0, k_end, block_k):
                k1 = min(k0 + block_k, k_end)
                s = (qi @ k[:, :, k0:k1].to(acc_t).transpose(-2, -1)) * sm_scale  # (B, H, Bq, Bk)
                if causal and k1 - 1 > q0:  # only tiles touching the diagonal need the mask
                    s = s.masked_fill(~_causal_keep(q0, q1, k0, k1, q.device), float("-inf"))
                # exercise: online_softmax
                m_new = torch.maximum(m, s.amax(dim=-1))  # (B, H, Bq)
                # a row that has seen only masked keys so far keeps m = -inf; use 0 there so that
                # exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                p = torch.exp(s - m_safe[..., None])  # (B, H, Bq, Bk)
                alpha = torch.exp(m - m_safe)  # (B, H, Bq) rescales what was accumulated so far
                l = alpha * l + p.sum(dim=-1)
                acc = alpha[..., None] * acc + p @ v[:, :, k0:k1].to(acc_t)  # (B, H, Bq, D)
                m = m_new
                # end exercise: online_softmax
            out[:, :, q0:q1] = (acc / l[..., None]).to(q.dtype)
            lse[:, :, q0:q1] = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.sm_scale, ctx.block_q, ctx.block_k = causal, sm_scale, block_q, block_k
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, block_q, block_k = ctx.causal, ctx.sm_scale, ctx.block_q, ctx.block_k
        B, H, T, D = q.shape
        acc_t = _acc_dtype(q.dtype)
        d_out = d_out.to(acc_t)
        delta = (d_out * out.to(acc_t)).sum(dim=-1)  # (B, H, T): D_i = rowsum(dO_i * O_i)
        dq = torch.zeros(B, H, T, D, dtype=acc_t, device=q.device)
        dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
        for k0 in range(0, T, block_k):  # FA-2 order: outer loop over key blocks
            k1 = min(k0 + block_k, T)
            kj, vj = k[:, :, k0:k1].to(acc_t), v[:, :, k0:k1].to(acc_t)  # (B, H, Bk, D) each
            q_start = (k0 // block_q) * block_q if causal else 0  # earlier queries cannot see these keys
            for q0 in range(q_start, T, block_q):
                q1 = min(q0 + block_q, T)
                qi = q[:, :, q0:q1].to(acc_t)  # (B, H, Bq, D)
                s = (qi @ kj.transpose(-2, -1)) * scale  # (B, H, Bq, Bk)
                p = torch.exp(s - lse[:, :, q0:q1, None])  # (B, H, Bq, Bk) recomputed probabilities
                if causal and k1 - 1 > q0:
                    p = p.masked_fill(~_causal_keep(q0, q1, k0, k1, q.device), 0.0)
                do_i = d_out[:, :, q0:q1]  # (B, H, Bq, D)
                dv[:, :, k0:k1] += p.transpose(-2, -1) @ do_i  # (B, H, Bk, Bq) @ (B, H, Bq, D)
                dp = do_i @ vj.transpose(-2, -1)  # (B, H, Bq, Bk)
                ds = p * (dp - delta[:, :, q0:q1, None])  # softmax backward
                dq[:, :, q0:q1] += (ds @ kj) * scale
                dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ qi) * scale  # (B, H, Bk, Bq) @ (B, H, Bq, D)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                          sm_scale: Optional[float] = None, block_q: int = 64, block_k: int = 64,
                          return_lse: bool = False):
    """Tiled online-softmax attention (FlashAttention-2) in plain torch, differentiable.

    q, k, v: (B, H, T, D) of one dtype (float16, bfloat16, float32, float64) -> O: (B, H, T, D).
    causal: query i attends keys j <= i. sm_scale: default 1/sqrt(D).
    block_q, block_k: tile sizes (any positive ints; the last tile of a row/column may be partial).
    return_lse: also return the row log-sum-exp of the scaled, masked scores, (B, H, T) float32
    (float64 for float64 inputs), as ``(O, LSE)``."""
    fn = "flash_attention_torch"
    check_qkv(q, k, v, fn, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if block_q < 1 or block_k < 1:
        raise ValueError(f"{fn}: block_q and block_k must be >= 1, got {block_q}, {block_k}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    out, lse = _FlashAttentionTorch.apply(q, k, v, bool(causal), scale, int(block_q), int(block_k))
    return (out, lse) if return_lse else out

"""Flash attention as Triton kernels (FlashAttention-2, Dao 2023), forward and backward.

What it implements
- ``flash_attention(q, k, v, causal=True, sm_scale=None)`` with q, k, v: (B, H, T, D) -> (B, H, T, D),
  differentiable. Four kernels (in ``flash_attention_triton.py``), one program per (tile, batch*head):
  * ``fwd``: a program owns BLOCK_M query rows and loops over key tiles with the online softmax
    (running max / denominator, exp2 with the scale folded into log2(e)); writes O and the row
    log-sum-exp LSE (natural log, fp32) for the backward pass.
  * ``bwd_preprocess``: D_i = rowsum(dO_i * O_i).
  * ``bwd_dkdv``: a program owns BLOCK_N keys and loops over query tiles, recomputing
    P = exp(S - LSE) and accumulating dV += P^T dO and dK += dS^T Q, dS = P * (dO V^T - D).
  * ``bwd_dq``: a program owns BLOCK_M queries and loops over key tiles accumulating dQ += dS K.
  This is the two-kernel backward of FA-2 (S and P are recomputed twice) rather than the atomic-add
  variant: no atomics, so the gradients are deterministic run to run.
- Causal (query i sees keys j <= i) and full attention; any T (edge tiles are masked loads/stores);
  head dims 1..128, padded in-kernel to a power of two >= 16 (masked loads), so 16/32/64/128 run
  unpadded; fp32/fp16/bf16 storage with fp32 accumulation. fp32 inputs use IEEE dot products (exact
  to fp32, but no tensor cores: use bf16/fp16 for speed, as ``minilife.measure.bench_attention`` does).
- Where Triton cannot run (CPU without TRITON_INTERPRET=1, triton missing, MPS) the call falls back
  to ``flash_attention_torch`` (same algorithm, plain torch) after a one-time RuntimeWarning.

Details that are easy to get wrong, handled here: the (batch*head) base offset is int64 (B*H*T*D can
pass 2^31); the causal mask is applied on every tile (so the diagonal tile is right for any
BLOCK_M/BLOCK_N); a row whose tile is fully masked gets m = -inf and is guarded (no inf - inf);
rows past T (padding of the last tile) are masked out of P in the backward kernels, so whatever
LSE value is loaded for them never matters, and they are never stored.

Inputs that are not contiguous are copied with ``.contiguous()`` (the kernels assume a (B, H, T, D)
row-major layout). On CUDA the block sizes are autotuned; under the interpreter autotuning is off and
a fixed 64 x 64 tile is used (interpreter cost ~ programs x loop iterations). The interpreter's tl.dot
multiplies bf16 *bit patterns* (triton-lang/triton#11584), so there (only) bf16 tiles are upcast to
fp32 after loading, with P and dS still rounded to bf16 as on the GPU. Leaves out: dropout,
custom masks, KV-cache decoding (T_q != T_k), ALiBi — the model uses SDPA for those.
"""
from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Optional

import torch

from minilife.kernels import import_triton, interpreting, triton_available, triton_runnable, warn_once
from minilife.kernels.flash_attention_torch import check_qkv, flash_attention_torch

__all__ = ["flash_attention", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


def _kernels() -> ModuleType:
    """The kernel module, imported on first use (with triton). Triton fixes interpreted vs compiled
    for the whole process (see ``minilife.kernels``): a changed TRITON_INTERPRET raises here."""
    import_triton()  # a clear ImportError first, if triton is missing
    kernels = importlib.import_module("minilife.kernels.flash_attention_triton")
    if kernels.INTERPRETED != interpreting():
        raise RuntimeError(
            f"flash_attention: the Triton kernels were loaded with TRITON_INTERPRET="
            f"{int(kernels.INTERPRETED)} but it is now {int(interpreting())}; triton fixes this mode "
            "for the whole process when it is first imported: set TRITON_INTERPRET before that")
    return kernels


def _launch(kernel_name: str, n_rows: int, bh: int, args: tuple, blocks: Optional[tuple[int, int]],
            **meta) -> None:
    """Launch kernel over (cdiv(T, tile), B*H); autotuned on CUDA unless blocks are given."""
    triton, _ = import_triton()
    ks, tile = _kernels(), "BLOCK_N" if kernel_name == "bwd_dkdv" else "BLOCK_M"
    tuned = getattr(ks, kernel_name + "_tuned")
    if blocks is None and tuned is not None:
        tuned[lambda cfg: (triton.cdiv(n_rows, cfg[tile]), bh)](*args, **meta)
    else:
        sizes = dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1]) if blocks is not None else dict(BLOCK_M=64, BLOCK_N=64)
        getattr(ks, kernel_name)[(triton.cdiv(n_rows, sizes[tile]), bh)](*args, **sizes, **meta)


class _FlashAttentionTriton(torch.autograd.Function):
    """autograd wrapper around the four kernels; tensors are contiguous (B, H, T, D)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, blocks):
        triton, _ = import_triton()
        B, H, T, D = q.shape
        ctx.meta = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
                        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32: fp32 inputs only
                        UPCAST=_kernels().INTERPRETED and q.dtype == torch.bfloat16)
        out = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # (B, H, T)
        _launch("fwd", T, B * H, (q, k, v, out, lse, sm_scale * _LOG2E, T), blocks, **ctx.meta)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sm_scale, ctx.blocks = sm_scale, blocks
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        triton, _ = import_triton()
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        d_out = d_out.contiguous()
        delta = torch.empty_like(lse)  # (B, H, T) fp32
        rows = ctx.blocks[0] if ctx.blocks is not None else 64
        _kernels().bwd_preprocess[(triton.cdiv(T, rows), B * H)](
            out, d_out, delta, T, HEAD_DIM=D, BLOCK_D=ctx.meta["BLOCK_D"], BLOCK_M=rows)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _launch("bwd_dkdv", T, B * H, (q, k, v, d_out, lse, delta, dk, dv, ctx.sm_scale, T), ctx.blocks, **ctx.meta)
        _launch("bwd_dq", T, B * H, (q, k, v, d_out, lse, delta, dq, ctx.sm_scale, T), ctx.blocks, **ctx.meta)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: Optional[float] = None, *, return_lse: bool = False,
                    blocks: Optional[tuple[int, int]] = None):
    """Flash attention with Triton kernels; differentiable.

    q, k, v: (B, H, T, D), one dtype in {float16, bfloat16, float32}, one device, 1 <= D <= 128.
    Returns O: (B, H, T, D) in the input dtype, or ``(O, LSE)`` with ``return_lse=True`` where LSE
    (B, H, T) float32 is the natural-log log-sum-exp of each row's scaled, masked scores.
    causal: query i attends keys j <= i. sm_scale: default 1/sqrt(D).
    blocks: (BLOCK_M, BLOCK_N) powers of two >= 16 to force tile sizes (tests use small tiles to
    exercise multi-tile loops); default: autotuned on CUDA, (64, 64) under the interpreter.
    Non-contiguous inputs are copied to contiguous. If Triton cannot run on q's device, this warns
    once and runs ``flash_attention_torch`` (same math, plain torch) instead."""
    fn = "flash_attention"
    check_qkv(q, k, v, fn, (torch.float16, torch.bfloat16, torch.float32))
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim D={D} is larger than the supported {MAX_HEAD_DIM} "
                         "(tiles would not fit in on-chip memory); use flash_attention_torch")
    if blocks is not None:
        if (len(blocks) != 2 or any(int(b) < 16 or int(b) & (int(b) - 1) for b in blocks)):
            raise ValueError(f"{fn}: blocks must be two powers of two >= 16, got {blocks}")
        blocks = (int(blocks[0]), int(blocks[1]))
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if not triton_runnable(q.device):
        why = ("the 'triton' package is not installed" if not triton_available() else
               f"Triton kernels cannot run on device '{q.device.type}' "
               "(CPU needs TRITON_INTERPRET=1; MPS is unsupported)")
        warn_once(f"flash_attention:{q.device.type}",
                  f"flash_attention: {why}; falling back to flash_attention_torch (same algorithm "
                  "in plain torch, slower).")
        return flash_attention_torch(q, k, v, causal=causal, sm_scale=scale, return_lse=return_lse)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if interpreting() and blocks is None:
        blocks = (64, 64)
    out, lse = _FlashAttentionTriton.apply(q, k, v, bool(causal), scale, blocks)
    return (out, lse) if return_lse else out


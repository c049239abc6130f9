"""Flash attention as Triton kernels (FlashAttention-2, Dao 2023), forward and backward.

What it implements
- ``flash_attention(q, k, v, causal=True, sm_scale=None)`` with q, k, v: (B, H, T, D) -> (B, H, T, D),
  differentiable. Four kernels, one program per (tile, batch*head):
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
  unpadded; fp32/fp16/bf16 storage with fp32 accumulation (fp32 uses IEEE dot products, not TF32).
- Where Triton cannot run (CPU without TRITON_INTERPRET=1, triton missing, MPS) the call falls back
  to ``flash_attention_torch`` (same algorithm, plain torch) after a one-time RuntimeWarning.

Details that are easy to get wrong, handled here: the (batch*head) base offset is int64 (B*H*T*D can
pass 2^31); the causal mask is applied on every tile (so the diagonal tile is right for any
BLOCK_M/BLOCK_N); a row whose tile is fully masked gets m = -inf and is guarded (no inf - inf);
rows past T (padding of the last tile) are masked out of P in the backward kernels, so whatever
LSE value is loaded for them never matters, and they are never stored.

Inputs that are not contiguous are copied with ``.contiguous()`` (the kernels assume a (B, H, T, D)
row-major layout). On CUDA the block sizes are autotuned; under the interpreter autotuning is off and
one large fixed tile is used (interpreter cost ~ programs x loop iterations). Leaves out: dropout,
custom masks, KV-cache decoding (T_q != T_k), ALiBi — the model uses SDPA for those.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch

from minilife.kernels import import_triton, interpreting, triton_available, triton_runnable, warn_once
from minilife.kernels.flash_attention_torch import check_qkv, flash_attention_torch

__all__ = ["flash_attention", "bench_attention", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_KERNELS: dict[bool, SimpleNamespace] = {}  # interpreting? -> kernels (triton reads the flag at @jit)


def _build_kernels() -> SimpleNamespace:
    """Define the @triton.jit kernels (lazily: triton is imported only when a kernel first runs)."""
    triton, tl = import_triton()

    @triton.jit
    def fwd(Q, K, V, O, LSE, qk_scale, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        base = bh * T * HEAD_DIM  # int64: start of this (batch, head) in the (B*H, T, D) tensors
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM  # (1, BLOCK_D) masks the head-dim padding
        q = tl.load(Q + base + rows[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=(rows[:, None] < T) & d_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:  # interpreter + bf16 only: its tl.dot multiplies bf16 bit patterns (triton#11584)
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # un-normalised output
        hi = tl.minimum((start_m + 1) * BLOCK_M, T) if CAUSAL else T
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n  # (BLOCK_N,)
            kv_off = base + cols[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
            kv_ok = (cols[:, None] < T) & d_ok
            k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row so far
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            # P is rounded to the storage dtype for the second matmul, as FA-2 does (the trailing
            # .to(v.dtype) is a no-op unless UPCAST, where it keeps the dot in fp32)
            p = p.to(V.dtype.element_ty).to(v.dtype)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        row_ok = rows < T
        tl.store(O + base + rows[:, None] * HEAD_DIM + offs_d[None, :],
                 (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
        lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # back to natural log
        tl.store(LSE + bh * T + rows, lse, mask=row_ok)

    @triton.jit
    def bwd_preprocess(O, DO, DELTA, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr):
        bh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        off = bh * T * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
        ok = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(O + off, mask=ok, other=0.0).to(tl.float32)
        do = tl.load(DO + off, mask=ok, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * T + rows, tl.sum(o * do, 1), mask=rows < T)

    @triton.jit
    def bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, T, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        start_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        base = bh * T * HEAD_DIM
        cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the keys this program owns
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM
        kv_off = base + cols[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        kv_ok = (cols[:, None] < T) & d_ok
        k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
        v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
        if UPCAST:  # interpreter + bf16 only (triton#11584)
            k, v = k.to(tl.float32), v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier queries see none
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + offs_m  # (BLOCK_M,)
            q_off = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
            q_ok = (rows[:, None] < T) & d_ok
            q = tl.load(Q + q_off, mask=q_ok, other=0.0)
            do = tl.load(DO + q_off, mask=q_ok, other=0.0)
            if UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # (BLOCK_M, BLOCK_N)
            keep = (rows[:, None] < T) & (cols[None, :] < T)
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, tl.math.exp2((s - lse[:, None]) * 1.4426950408889634), 0.0)
            dv += tl.dot(tl.trans(p.to(DO.dtype.element_ty).to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, T, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        base = bh * T * HEAD_DIM
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the queries this program owns
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM
        q_off = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
        q_ok = (rows[:, None] < T) & d_ok
        q = tl.load(Q + q_off, mask=q_ok, other=0.0)
        do = tl.load(DO + q_off, mask=q_ok, other=0.0)
        if UPCAST:  # interpreter + bf16 only (triton#11584)
            q, do = q.to(tl.float32), do.to(tl.float32)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum((start_m + 1) * BLOCK_M, T) if CAUSAL else T
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_off = base + cols[:, None] * HEAD_DIM + offs_d[None, :]
            kv_ok = (cols[:, None] < T) & d_ok
            k = tl.load(K + kv_off, mask=kv_ok, other=0.0)
            v = tl.load(V + kv_off, mask=kv_ok, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            keep = (rows[:, None] < T) & (cols[None, :] < T)
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, tl.math.exp2((s - lse[:, None]) * 1.4426950408889634), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * dp
            dq += tl.dot(ds.to(K.dtype.element_ty).to(k.dtype), k, input_precision=PRECISION)
        tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)

    kernels = SimpleNamespace(fwd=fwd, bwd_preprocess=bwd_preprocess, bwd_dkdv=bwd_dkdv, bwd_dq=bwd_dq)
    if not interpreting():  # compiled: let triton pick tile sizes per (T, D, causal)
        cfgs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 1))]
        key = ["T", "HEAD_DIM", "CAUSAL"]
        kernels.fwd_tuned = triton.autotune(cfgs, key=key)(fwd)
        kernels.bwd_dkdv_tuned = triton.autotune(cfgs, key=key)(bwd_dkdv)
        kernels.bwd_dq_tuned = triton.autotune(cfgs, key=key)(bwd_dq)
    return kernels


def _kernels() -> SimpleNamespace:
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = _build_kernels()
    return _KERNELS[mode]


def _launch(kernel_name: str, n_rows: int, bh: int, args: tuple, blocks: Optional[tuple[int, int]],
            **meta) -> None:
    """Launch kernel over (cdiv(T, tile), B*H); autotuned on CUDA unless blocks are given."""
    triton, _ = import_triton()
    ks = _kernels()
    tile = "BLOCK_N" if kernel_name == "bwd_dkdv" else "BLOCK_M"
    if blocks is None and hasattr(ks, kernel_name + "_tuned"):
        grid = lambda cfg: (triton.cdiv(n_rows, cfg[tile]), bh)  # noqa: E731
        getattr(ks, kernel_name + "_tuned")[grid](*args, **meta)
        return
    block_m, block_n = blocks if blocks is not None else (64, 64)
    grid = (triton.cdiv(n_rows, block_m if tile == "BLOCK_M" else block_n), bh)
    getattr(ks, kernel_name)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **meta)


class _FlashAttentionTriton(torch.autograd.Function):
    """autograd wrapper around the four kernels; tensors are contiguous (B, H, T, D)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, sm_scale: float, blocks):
        B, H, T, D = q.shape
        block_d = max(16, triton_next_pow2(D))
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only affects fp32 inputs
        upcast = interpreting() and q.dtype == torch.bfloat16
        out = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # (B, H, T)
        _launch("fwd", T, B * H, (q, k, v, out, lse, sm_scale * _LOG2E, T), blocks,
                HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, PRECISION=precision, UPCAST=upcast)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.sm_scale, ctx.blocks = causal, sm_scale, blocks
        ctx.meta = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, PRECISION=precision, UPCAST=upcast)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        d_out = d_out.contiguous()
        delta = torch.empty_like(lse)  # (B, H, T) fp32
        pre_block = ctx.blocks[0] if ctx.blocks is not None else 64
        triton, _ = import_triton()
        _kernels().bwd_preprocess[(triton.cdiv(T, pre_block), B * H)](
            out, d_out, delta, T, HEAD_DIM=D, BLOCK_D=ctx.meta["BLOCK_D"], BLOCK_M=pre_block)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = ctx.meta
        _launch("bwd_dkdv", T, B * H, (q, k, v, d_out, lse, delta, dk, dv, ctx.sm_scale, T), ctx.blocks, **meta)
        _launch("bwd_dq", T, B * H, (q, k, v, d_out, lse, delta, dq, ctx.sm_scale, T), ctx.blocks, **meta)
        return dq, dk, dv, None, None, None


def triton_next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


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
    once and runs ``flash_attention_torch`` (same math, plain torch) instead.
    """
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


def bench_attention(device: str = "auto", seq_len: Optional[int] = None, batch: int = 1, heads: int = 8,
                    head_dim: int = 64, repeats: int = 5) -> list[dict]:
    """Causal attention forward+backward, ours vs references; returns one dict per (pair, metric).

    CUDA (default T=4096, bf16): Triton ``flash_attention`` vs SDPA and vs ``attention_naive``:
    wall time (synchronised) and peak ``torch.cuda.max_memory_allocated`` above the inputs.
    CPU (default T=1024, fp32): ``flash_attention_torch`` vs ``attention_naive``: wall time and peak
    tensor bytes from ``peak_tensor_bytes`` (dispatch-mode count of live tensor storage).
    One warm-up call each (compiles and autotunes), then ``repeats`` interleaved rounds. Row keys:
    case, metric ("time_ms" | "peak_MiB"), ours, reference, ours_min, ours_median, ref_min,
    ref_median, ratio_min (= ours_min / ref_min), ratio_median (= ours_median / ref_median).
    """
    import statistics
    import time

    import torch.nn.functional as F

    from minilife.common import pick_device
    from minilife.kernels.flash_attention_torch import peak_tensor_bytes
    from minilife.kernels.reference import attention_naive

    dev = pick_device(device)
    cuda = dev.type == "cuda"
    T = seq_len or (4096 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(batch, heads, T, head_dim, generator=gen).to(dev, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    attn = {"attention_naive": lambda: attention_naive(q, k, v, causal=True)}
    if cuda:
        attn["flash_attention (triton)"] = lambda: flash_attention(q, k, v, causal=True)
        attn["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        pairs = [("flash_attention (triton)", "sdpa"), ("flash_attention (triton)", "attention_naive")]
    else:
        attn["flash_attention_torch"] = lambda: flash_attention_torch(q, k, v, causal=True)
        pairs = [("flash_attention_torch", "attention_naive")]
    runs = {name: (lambda f=f: torch.autograd.grad(f(), (q, k, v), d_out)) for name, f in attn.items()}

    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize(dev)
                peaks[name].append((torch.cuda.max_memory_allocated(dev) - base) / 2**20)
            times[name].append((time.perf_counter() - t0) * 1e3)
    if not cuda:  # memory is deterministic on CPU: measure once
        peaks = {name: [peak_tensor_bytes(run) / 2**20] for name, run in runs.items()}

    rows = []
    case = f"causal attention fwd+bwd B={batch} H={heads} T={T} D={head_dim} {str(dtype)[6:]} {dev.type}"
    for ours, ref in pairs:
        for metric, values in (("time_ms", times), ("peak_MiB", peaks)):
            o_min, o_med = min(values[ours]), statistics.median(values[ours])
            r_min, r_med = min(values[ref]), statistics.median(values[ref])
            rows.append(dict(case=case, metric=metric, ours=ours, reference=ref, ours_min=o_min,
                             ours_median=o_med, ref_min=r_min, ref_median=r_med,
                             ratio_min=o_min / r_min, ratio_median=o_med / r_med))
    return rows

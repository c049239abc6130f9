"""The Triton kernels behind ``flash_attention`` (FlashAttention-2, Dao 2023, Algorithms 1 and 2).

Imported lazily by ``minilife.kernels.flash_attention`` (never at ``import minilife``). Whether the
kernels are compiled or interpreted is decided by TRITON_INTERPRET when triton and this module are
imported, and recorded in ``INTERPRETED``. All tensors are contiguous (B*H, T, D)
row-major; one program handles one (tile, batch*head); scores are kept in log2 units in the forward
(exp2, scale folded with log2(e)) and LSE is stored in natural log, fp32.

- ``fwd``: a query tile, online softmax over key tiles -> O, LSE.
- ``bwd_preprocess``: D_i = rowsum(dO_i * O_i).
- ``bwd_dkdv``: a key tile, loop over query tiles: dV += P^T dO, dK += dS^T Q (scaled).
- ``bwd_dq``: a query tile, loop over key tiles: dQ += dS K (scaled).
  With dS = P * (dO V^T - D) and P recomputed from LSE. Two backward kernels, no atomics.
- ``*_tuned``: autotuned versions for compiled mode (None under the interpreter, where autotuning
  is off and the wrapper passes fixed tiles).

Leaves out what the wrapper in ``flash_attention.py`` leaves out (see its docstring): dropout, custom
masks, KV-cache decoding (T_q != T_k), ALiBi; no input checks here, the wrapper does them.
"""
import triton
import triton.language as tl

from minilife.kernels import interpreting

INTERPRETED = interpreting()  # @triton.jit below reads the same variable


@triton.jit
def _load_rows(ptr, base, idx, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``idx`` of one (T, HEAD_DIM) matrix as a (len(idx), BLOCK_D) tile; 0 past T / HEAD_DIM."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + base + idx[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(idx[:, None] < T) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:  # interpreter + bf16 only: its tl.dot multiplies bf16 bit patterns (triton#11584)
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(ptr, base, idx, x, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write tile x (len(idx), BLOCK_D) to rows ``idx``, cast to ptr's dtype, skipping padding."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(ptr + base + idx[:, None] * HEAD_DIM + offs_d[None, :], x.to(ptr.dtype.element_ty),
             mask=(idx[:, None] < T) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _load_query_rows(Q, DO, LSE, DELTA, bh, rows, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr):
    """What the backward needs of query rows ``rows``: q, dO tiles and their LSE and D values.

    Past T the LSE and D read as 0; those rows are masked out of P, so the value never matters."""
    q = _load_rows(Q, bh * T * HEAD_DIM, rows, T, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(DO, bh * T * HEAD_DIM, rows, T, HEAD_DIM, BLOCK_D, UPCAST)
    lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
    return q, do, lse, delta


@triton.jit
def _recompute_p(q, k, lse, rows, cols, sm_scale, T, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """P = exp(Q K^T * scale - LSE) for one (query tile, key tile); 0 where masked or past T."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # (BLOCK_M, BLOCK_N)
    keep = (rows[:, None] < T) & (cols[None, :] < T)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return tl.where(keep, tl.math.exp2((s - lse[:, None]) * 1.4426950408889634), 0.0)


@triton.jit
def fwd(Q, K, V, O, LSE, qk_scale, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM  # int64: start of this (batch, head) in the (B*H, T, D) tensors
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the queries this program owns
    q = _load_rows(Q, base, rows, T, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # un-normalised output
    hi = tl.minimum((start_m + 1) * BLOCK_M, T) if CAUSAL else T  # later keys are all masked
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, base, cols, T, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(V, base, cols, T, HEAD_DIM, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        keep = cols[None, :] < T
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row so far: no inf-inf
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        # P is rounded to the storage dtype for the second matmul, as FA-2 does (the trailing
        # .to(v.dtype) is a no-op unless UPCAST, where it keeps the dot in fp32)
        p = p.to(V.dtype.element_ty).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    _store_rows(O, base, rows, acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], T, HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # back to natural log
    tl.store(LSE + bh * T + rows, lse, mask=rows < T)


@triton.jit
def bwd_preprocess(O, DO, DELTA, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(O, bh * T * HEAD_DIM, rows, T, HEAD_DIM, BLOCK_D, False).to(tl.float32)
    do = _load_rows(DO, bh * T * HEAD_DIM, rows, T, HEAD_DIM, BLOCK_D, False).to(tl.float32)
    tl.store(DELTA + bh * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, T, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the keys this program owns
    k = _load_rows(K, base, cols, T, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V, base, cols, T, HEAD_DIM, BLOCK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier queries see none
    for start_m in range(lo, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, bh, rows, T, HEAD_DIM, BLOCK_D, UPCAST)
        p = _recompute_p(q, k, lse, rows, cols, sm_scale, T, CAUSAL, PRECISION)  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p.to(DO.dtype.element_ty).to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(q.dtype)), q, input_precision=PRECISION)
    _store_rows(DK, base, cols, dk * sm_scale, T, HEAD_DIM, BLOCK_D)
    _store_rows(DV, base, cols, dv, T, HEAD_DIM, BLOCK_D)


@triton.jit
def bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, T, HEAD_DIM: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * HEAD_DIM
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the queries this program owns
    q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, bh, rows, T, HEAD_DIM, BLOCK_D, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum((start_m + 1) * BLOCK_M, T) if CAUSAL else T
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, base, cols, T, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(V, base, cols, T, HEAD_DIM, BLOCK_D, UPCAST)
        p = _recompute_p(q, k, lse, rows, cols, sm_scale, T, CAUSAL, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty).to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ, base, rows, dq * sm_scale, T, HEAD_DIM, BLOCK_D)


if INTERPRETED:
    fwd_tuned = bwd_dkdv_tuned = bwd_dq_tuned = None
else:  # compiled: let triton pick tile sizes per (T, D, causal); outputs are overwritten, so re-runs are safe
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 128, 8, 1))]
    fwd_tuned, bwd_dkdv_tuned, bwd_dq_tuned = (triton.autotune(_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL"])(kernel)
                                               for kernel in (fwd, bwd_dkdv, bwd_dq))

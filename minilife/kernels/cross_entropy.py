"""Cross-entropy over a large vocabulary as two Triton kernels (forward and backward).

What it implements
- ``cross_entropy(logits (N, V), targets (N,), ignore_index=-100, reduction="mean",
  label_smoothing=0.0, num_tokens=None)``: an ``autograd.Function`` with the semantics of
  ``F.cross_entropy`` for class-index targets, plus ``num_tokens`` (below).
- Forward kernel, one program per block of ``ROWS`` rows (1 row for a big vocabulary; several when
  V is small, so a tile still holds ~4k elements): a single pass over the vocabulary in blocks of
  ``BLOCK_V`` keeps per row a running max ``m`` and a running sum ``s = sum_j exp(x_j - m)`` (rescaled
  by ``exp(m_old - m_new)`` when the max grows: the "online softmax" of Milakov & Gimelshein 2018), so
  ``lse = m + log s`` costs one read of the row and no (N, V) temporary. It saves ``lse`` (N,) and
  ``rest = 1 - p_target`` (N,) for the backward pass.
- Backward kernel, same tiling, one more read and one write: ``dL/dx_j = scale_i * (p_j - q_j)`` with
  ``p = exp(x - lse)`` recomputed from the saved ``lse`` and ``q = (1 - eps) * onehot(t) + eps / V``
  the smoothed target, ``scale_i`` = upstream gradient / denominator (0 for ignored rows).
- Label smoothing as in ``F.cross_entropy`` (Szegedy et al. 2016, sec. 7):
  ``loss_i = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j)``.
- ``num_tokens``: with ``reduction="mean"`` divide the summed loss by this count instead of the
  number of non-ignored targets in *this* call. Passing the global count of a gradient-accumulation
  step makes the accumulated micro-batch gradients equal the big-batch gradient exactly.

Numerical care (each is tested against float64 math)
- Row offsets are ``row.to(int64) * stride``: at V = 128k an int32 ``row * V`` wraps after 16k rows.
- A confidently right token (p_t -> 1): ``p_t - 1`` computed as ``exp(x_t - lse) - 1`` rounds to 0 in
  fp32 once ``1 - p_t < 6e-8``, losing the whole gradient of the target column; ``F.cross_entropy``
  in fp32 does exactly that. We accumulate ``rest = sum_{j != t} exp(x_j - m) / s`` during the
  forward pass, which keeps full relative precision, and use ``-rest`` for the target column and
  ``-log(1 - rest) = rest + rest^2/2 + rest^3/3`` for the loss when ``rest < 1e-3``.
- Logits are read in their storage dtype (fp32, fp16, bf16) and all math is fp32. The loss is
  returned in **float32** (``F.cross_entropy`` returns the logits dtype; a sum over many tokens in
  fp16 overflows at 65504); the gradient is returned in the logits dtype.
- All targets ignored with ``reduction="mean"``: the loss is NaN (0/0) and the gradient is zero,
  exactly what ``F.cross_entropy`` does. Use ``num_tokens`` to avoid the NaN in accumulation loops.

Where Triton cannot run (CPU without ``TRITON_INTERPRET=1``, MPS, no triton) the same two steps run
as plain torch (``_forward_rows_torch`` / ``_backward_rows_torch``: same formulas, same saved tensors)
after a one-time warning; ``with pure_torch():`` selects that path on purpose. Non-contiguous rows
are handled through the row stride; a column stride other than 1 is copied with ``.contiguous()``.

What it leaves out: class weights, probability ("soft") targets, z-loss, computing the gradient in
place of the logits during forward (Liger does this; it silently destroys logits the caller may still
use); ``minilife.kernels.fused_linear_ce`` avoids the logits altogether instead.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from minilife.kernels import import_triton, interpreting, triton_runnable, warn_once

__all__ = ["cross_entropy", "pure_torch", "use_triton"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A program handles a tile of ROWS rows x BLOCK_V columns per loop step: BLOCK_V is the next power of
# two >= V capped at MAX_BLOCK_V, and small vocabularies stack several rows so a tile holds about
# MAX_TILE elements. The interpreter costs (programs x loop steps), so it gets bigger tiles; tests
# lower the caps to run the online LSE over many blocks and several row blocks.
MAX_BLOCK_V, MAX_TILE = 4096, 4096
MAX_BLOCK_V_INTERPRETED, MAX_ROWS_INTERPRETED = 16384, 8
# Below this value of 1 - p_target the loss uses the series for -log(1 - r) (error < r^4/4).
_SERIES_BELOW = 1e-3

_KERNELS: dict[bool, dict] = {}  # interpreting? -> kernels (Triton reads the flag when @jit runs)
_FORCE_TORCH = False


@contextlib.contextmanager
def pure_torch():
    """Inside this block the losses here and in fused_linear_ce take their pure-torch path even where
    Triton can run (to compare the two paths; no warning is given for it)."""
    global _FORCE_TORCH
    old, _FORCE_TORCH = _FORCE_TORCH, True
    try:
        yield
    finally:
        _FORCE_TORCH = old


def use_triton(device: torch.device) -> bool:
    """Take the Triton path on ``device``? (it can run there, and ``pure_torch`` is not active)"""
    return not _FORCE_TORCH and triton_runnable(device)


def _build_kernels() -> dict:
    """Define the Triton kernels (first call only: triton is imported here, never at import time).

    ``tl`` and ``_row_offset`` become module globals: Triton's interpreter re-executes kernel source
    with the module's globals, so names a kernel uses cannot live in a closure."""
    global tl, _row_offset
    triton, tl = import_triton()

    @triton.jit
    def _row_offset(rows, stride_row):
        """Element offsets of ``rows``: a 64-bit product, so row * stride cannot wrap past 2^31."""
        return rows.to(tl.int64) * stride_row

    @triton.jit
    def ce_forward_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, lse_ptr, rest_ptr, N, V,
                          ignore_index, eps, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
                          SMOOTHING: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = rows < N
        x_rows = logits_ptr + _row_offset(rows, stride_row)  # (ROWS,) row pointers
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
        keep = target != ignore_index
        target = tl.where(keep, target, -1)  # an ignored row excludes no column from the sums
        x_target = tl.load(x_rows + target, mask=keep, other=0.0).to(tl.float32)  # (ROWS,)
        m = tl.full((ROWS,), -float("inf"), tl.float32)  # running max
        s_rest = tl.zeros((ROWS,), tl.float32)  # running sum of exp(x_j - m) over columns j != target
        x_sum = tl.zeros((ROWS,), tl.float32)  # sum of logits, for label smoothing
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
            tile = row_ok[:, None] & (cols < V)[None, :]  # (ROWS, BLOCK_V)
            x = tl.load(x_rows[:, None] + cols[None, :], mask=tile, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
            e = tl.where(cols[None, :] == target[:, None], 0.0, tl.exp(x - m_safe[:, None]))
            s_rest = s_rest * tl.exp(m - m_safe) + tl.sum(e, axis=1)
            if SMOOTHING:
                x_sum += tl.sum(tl.where(tile, x, 0.0), axis=1)
            m = m_new
        m = tl.where(m == -float("inf"), 0.0, m)
        s = s_rest + tl.where(keep, tl.exp(x_target - m), 0.0)
        s = tl.where(row_ok, s, 1.0)  # padding rows of the last block: keep log/divide finite
        lse = m + tl.log(s)
        rest = s_rest / s  # 1 - p_target, to full relative precision
        series = rest * (1.0 + rest * (0.5 + rest / 3.0))
        nll = tl.where(rest < 1e-3, series, lse - x_target)
        if SMOOTHING:
            nll = (1.0 - eps) * nll + eps * (lse - x_sum / V)
        tl.store(loss_ptr + rows, tl.where(keep, nll, 0.0), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(rest_ptr + rows, rest, mask=row_ok)

    @triton.jit
    def ce_backward_kernel(logits_ptr, stride_row, grad_ptr, stride_grad_row, targets_ptr, lse_ptr,
                           rest_ptr, scale_ptr, stride_scale, N, V, ignore_index, eps,
                           ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = rows < N
        x_rows = logits_ptr + _row_offset(rows, stride_row)
        g_rows = grad_ptr + _row_offset(rows, stride_grad_row)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
        keep = target != ignore_index
        scale = tl.load(scale_ptr + rows.to(tl.int64) * stride_scale, mask=row_ok, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        rest = tl.load(rest_ptr + rows, mask=row_ok, other=0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tile = row_ok[:, None] & (cols < V)[None, :]  # (ROWS, BLOCK_V)
            x = tl.load(x_rows[:, None] + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            p = tl.exp(x - lse[:, None])
            # p_j - q_j; the target column is (p_t - 1) + eps = eps - rest
            g = tl.where(cols[None, :] == target[:, None], (eps - rest)[:, None], p) - eps / V
            g = tl.where(keep[:, None], g * scale[:, None], 0.0)
            tl.store(g_rows[:, None] + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=tile)

    return {"row_offset": _row_offset, "forward": ce_forward_kernel, "backward": ce_backward_kernel}


def _kernels() -> dict:
    mode = interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = _build_kernels()
    return _KERNELS[mode]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _launch_config(N: int, V: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps) for an (N, V) problem."""
    if interpreting():
        return min(MAX_ROWS_INTERPRETED, _next_pow2(N)), min(MAX_BLOCK_V_INTERPRETED, _next_pow2(V)), 4
    block = min(MAX_BLOCK_V, _next_pow2(V))
    rows = max(1, min(_next_pow2(N), MAX_TILE // block))
    return rows, block, (16 if block >= 4096 else 8 if rows * block >= 1024 else 4)


# the two steps, as plain torch and as Triton launches (same formulas, same saved tensors)
def _forward_rows_torch(logits, targets, ignore_index, eps):
    x = logits.float()  # (N, V)
    keep = targets != ignore_index  # (N,)
    t = torch.where(keep, targets, torch.zeros_like(targets)).long()[:, None]  # (N, 1)
    m = x.amax(dim=1, keepdim=True)  # (N, 1)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.sub(x, m).exp_()  # (N, V), the one temporary of this step
    e_target = e.gather(1, t)  # (N, 1)
    s_rest = e.scatter_(1, t, 0.0).sum(dim=1, keepdim=True)  # (N, 1)
    s = s_rest + e_target
    lse = (m + torch.log(s))[:, 0]  # (N,)
    rest = (s_rest / s)[:, 0]  # (N,) = 1 - p_target
    series = rest * (1.0 + rest * (0.5 + rest / 3.0))
    nll = torch.where(rest < _SERIES_BELOW, series, lse - x.gather(1, t)[:, 0])
    if eps > 0.0:
        nll = (1.0 - eps) * nll + eps * (lse - x.mean(dim=1))
    return torch.where(keep, nll, torch.zeros_like(nll)), lse, rest


def _backward_rows_torch(logits, targets, lse, rest, row_scale, ignore_index, eps, out):
    V = logits.shape[1]
    keep = targets != ignore_index  # (N,)
    t = torch.where(keep, targets, torch.zeros_like(targets)).long()[:, None]  # (N, 1)
    if out is logits and out.dtype == torch.float32:
        g = logits.sub_(lse[:, None]).exp_()  # (N, V) p, computed in the caller's buffer
    else:
        g = torch.exp(logits.float() - lse[:, None])  # (N, V) p
    g.scatter_(1, t, (eps - rest)[:, None].to(g.dtype))  # target column: p_t - 1 + eps = eps - rest
    if eps > 0.0:
        g.sub_(eps / V)
    scale = torch.where(keep, row_scale.float(), torch.zeros_like(lse))  # (N,)
    g.mul_(scale[:, None]).masked_fill_(~keep[:, None], 0.0)
    return out if g is out else out.copy_(g)


def forward_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, eps: float,
                 triton: Optional[bool] = None):
    """Per-row loss (N,), lse (N,) and rest = 1 - p_target (N,), all float32 (0 loss at ignored rows).

    logits (N, V) with unit column stride, targets (N,) validated. Triton where it runs, else torch
    (``triton``: the caller's decision, default ``use_triton(logits.device)``)."""
    N, V = logits.shape
    if N == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=logits.device)
        return empty, empty.clone(), empty.clone()
    if not (use_triton(logits.device) if triton is None else triton):
        return _forward_rows_torch(logits, targets, ignore_index, eps)
    loss, lse, rest = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    rows, block, warps = _launch_config(N, V)
    _kernels()["forward"][(-(-N // rows),)](
        logits, logits.stride(0), targets, loss, lse, rest, N, V, ignore_index, eps,
        ROWS=rows, BLOCK_V=block, SMOOTHING=eps > 0.0, num_warps=warps)
    return loss, lse, rest


def backward_rows(logits, targets, lse, rest, row_scale, ignore_index: int, eps: float,
                  out: Optional[torch.Tensor] = None, triton: Optional[bool] = None) -> torch.Tensor:
    """Gradient of sum_i row_scale_i * loss_i wrt logits (N, V), written into ``out`` (default: new).

    row_scale (N,) float (any stride, 0 allowed). ``out`` may be ``logits`` itself (in place)."""
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    if N == 0:
        return out
    if not (use_triton(logits.device) if triton is None else triton):
        return _backward_rows_torch(logits, targets, lse, rest, row_scale, ignore_index, eps, out)
    rows, block, warps = _launch_config(N, V)
    _kernels()["backward"][(-(-N // rows),)](
        logits, logits.stride(0), out, out.stride(0), targets, lse, rest, row_scale,
        row_scale.stride(0), N, V, ignore_index, eps, ROWS=rows, BLOCK_V=block, num_warps=warps)
    return out


# argument checks shared with fused_linear_ce
def check_targets(fn: str, targets: torch.Tensor, N: int, V: int, ignore_index: int,
                  device: torch.device) -> None:
    """Raise a clear error for a wrong shape/dtype/device or a target id outside [0, V)."""
    if targets.dim() != 1 or targets.shape[0] != N:
        raise ValueError(f"{fn}: targets must have shape ({N},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: targets must be integer class ids, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"{fn}: targets are on {targets.device} but the inputs are on {device}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))  # (N,)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: targets[{i}] = {int(targets[i])} is outside [0, {V}) and is not "
                         f"ignore_index={ignore_index}")


def check_options(fn: str, reduction: str, label_smoothing: float,
                  num_tokens: Union[int, float, torch.Tensor, None]) -> Optional[float]:
    """Validate the loss options; return num_tokens as a float (or None)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{fn}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if num_tokens is not None and reduction != "mean":
        raise ValueError(f"{fn}: num_tokens only applies to reduction='mean' (got reduction={reduction!r})")
    if num_tokens is not None and not float(num_tokens) > 0:
        raise ValueError(f"{fn}: num_tokens must be > 0, got {num_tokens}")
    return None if num_tokens is None else float(num_tokens)


def mean_denominator(targets: torch.Tensor, ignore_index: int, num_tokens: Optional[float]) -> torch.Tensor:
    """The divisor of reduction='mean': num_tokens, else the non-ignored count (a 0-d float32 tensor)."""
    if num_tokens is not None:
        return torch.tensor(num_tokens, dtype=torch.float32, device=targets.device)
    return (targets != ignore_index).sum().to(torch.float32)


# the autograd function and the public entry point
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, eps, num_tokens):
        triton = use_triton(logits.device)  # one decision for forward and backward
        loss_rows, lse, rest = forward_rows(logits, targets, ignore_index, eps, triton)  # (N,) each
        ctx.save_for_backward(logits, targets, lse, rest)
        ctx.options = (ignore_index, reduction, eps, triton)
        if reduction == "mean":
            ctx.denominator = mean_denominator(targets, ignore_index, num_tokens)
            return loss_rows.sum() / ctx.denominator
        return loss_rows if reduction == "none" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse, rest = ctx.saved_tensors
        ignore_index, reduction, eps, triton = ctx.options
        scale = grad_out.float()  # (N,) for "none", else a scalar
        if reduction == "mean":
            scale = scale / ctx.denominator
        row_scale = scale if reduction == "none" else scale.expand(logits.shape[0])  # (N,), stride 0 if expanded
        return (backward_rows(logits, targets, lse, rest, row_scale, ignore_index, eps, triton=triton),) + (None,) * 5


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  num_tokens: Union[int, float, torch.Tensor, None] = None) -> torch.Tensor:
    """Cross-entropy of (N, V) logits against (N,) class ids; Triton kernels where they can run.

    reduction: "mean" (sum / non-ignored count, or / ``num_tokens`` when given), "sum", or "none"
    (float32 (N,), 0 at ignored rows). Returns float32. Gradient flows to ``logits`` only."""
    fn = "cross_entropy"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a 2-D tensor (N, V), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: logits dtype {logits.dtype} is not supported (float32, float16, bfloat16; "
                        "use minilife.kernels.reference.cross_entropy_naive for float64)")
    N, V = logits.shape
    if V == 0:
        raise ValueError(f"{fn}: logits have V = 0 classes")
    check_targets(fn, targets, N, V, ignore_index, logits.device)
    n_tok = check_options(fn, reduction, label_smoothing, num_tokens)
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernels walk columns with unit stride
    if not _FORCE_TORCH and not triton_runnable(logits.device):
        warn_once("cross_entropy-torch", f"minilife.kernels.cross_entropy: Triton cannot run on "
                  f"{logits.device.type} here (no CUDA, TRITON_INTERPRET unset, or no triton); using the "
                  "pure-torch version of the same math")
    return _CrossEntropy.apply(logits, targets, int(ignore_index), reduction, float(label_smoothing), n_tok)

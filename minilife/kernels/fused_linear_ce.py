"""LM head + cross-entropy, chunk by chunk over tokens, so the (N, V) logits never exist at once.

What it implements
- ``fused_linear_cross_entropy(hidden (N, C), weight (V, C), targets (N,), ignore_index=-100,
  reduction="mean", label_smoothing=0.0, num_tokens=None, chunk_size=None)`` = the loss of
  ``F.cross_entropy(hidden @ weight.T, targets, ...)`` (float32 scalar, or (N,) for "none").
- For each chunk of ``chunk_size`` rows: ``logits_c = hidden_c @ weight.T`` (matmul in the inputs'
  dtype, fp32 accumulation inside the matmul), the per-row loss and log-sum-exp from
  ``minilife.kernels.cross_entropy`` (its Triton kernel where Triton runs, its pure-torch twin
  otherwise), then at once ``dlogits_c`` written *into the logits buffer*, ``grad_hidden_c =
  dlogits_c @ weight`` and ``grad_weight += dlogits_c.T @ hidden_c`` (fp32 accumulator).
  Peak extra memory is one or two chunk-sized buffers (chunk_size x V; the torch path needs a
  temporary for exp) plus the gradients themselves, instead of about three (N, V) tensors (logits,
  log-softmax, its gradient) for the materialised version.

Gradients in the forward pass (the Liger-Kernel approach, Hsu et al. 2024) vs recomputation
- "mean"/"sum": the loss is ``grad_output`` times a fixed linear combination of the rows, so the
  gradients for ``grad_output = 1`` are computed during forward and backward only multiplies them by
  the scalar ``grad_output``. Cost: 3 matmuls of 2NVC FLOPs, the same as materialising logits.
  The price: forward does the backward's work even when no backward follows (it is skipped when no
  input requires grad), and a second ``backward()`` through the same graph raises an error, because
  the stored gradients are scaled in place and released.
- "none": each row's upstream gradient is unknown until backward, and ``grad_weight`` mixes all
  rows, so it cannot be rescaled afterwards. Forward keeps only the per-row losses and backward
  recomputes each chunk's logits (4 matmuls in all). Documented cost of that flexibility.
- The mean's divisor (non-ignored count or ``num_tokens``) is known before the first chunk, so each
  chunk's gradient is already scaled correctly; an all-ignored "mean" gives NaN loss and zero
  gradients, like ``F.cross_entropy``.

Chunk size: by default the largest power of two with chunk_size * V <= max(N * C, 2**24) elements
(at least 1 row): a chunk of logits costs about as much memory as ``hidden`` itself (Liger's rule)
but never less than 16M elements, because every chunk also reads and writes the whole (V, C)
``grad_weight`` accumulator: chunks of a few dozen rows make that traffic dominate (one measurement
on CPU at N=4096, C=768, V=50257: 128-row chunks took ~1.6x the time of 512-row chunks).

Under ``torch.autocast`` both inputs are cast to the autocast dtype first, as ``F.linear`` would be.

What it leaves out: a bias on the head, class weights, soft targets, z-loss, tensor-parallel vocab
shards. ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13, chunked when given
``LinearCrossEntropyOptions``) is the same idea; tests and ``minilife.measure.bench_loss`` use it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from minilife.kernels.cross_entropy import (SUPPORTED_DTYPES, backward_rows, check_options, check_targets,
                                            forward_rows, mean_denominator, use_triton)

__all__ = ["fused_linear_cross_entropy", "default_chunk_size"]


def default_chunk_size(N: int, C: int, V: int) -> int:
    """Rows per chunk: the largest power of two with rows * V <= max(N * C, 2**24), at least 1."""
    budget = max(N * C, 1 << 24)
    rows = max(1, budget // max(V, 1))
    return min(max(N, 1), 1 << (rows.bit_length() - 1))


def _chunk_pass(hidden, weight, targets, ignore_index, eps, chunk_size, row_scale, need_h, need_w, losses=None):
    """One pass over chunks of rows: the per-row losses into ``losses`` (when given) and, when
    ``need_h``/``need_w``, the gradients of sum_i row_scale_i * loss_i -> (grad_hidden (N, C) or None,
    grad_weight (V, C) in weight's dtype or None)."""
    N, triton = hidden.shape[0], use_triton(hidden.device)  # decided once, not per chunk
    grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                   if need_h else None)  # (N, C), contiguous
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                   if need_w else None)  # (V, C) fp32 accumulator
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h_c, t_c = hidden[start:end], targets[start:end]  # (n, C), (n,)
        logits_c = h_c @ weight.t()  # (n, V)
        loss_c, lse_c, rest_c = forward_rows(logits_c, t_c, ignore_index, eps, triton)
        if losses is not None:
            losses[start:end] = loss_c
        if not (need_h or need_w):
            continue
        # dL/dlogits for this chunk, written over the logits (they are not needed any more)
        dlogits = backward_rows(logits_c, t_c, lse_c, rest_c, row_scale[start:end], ignore_index,
                                eps, out=logits_c, triton=triton)  # (n, V)
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[start:end])  # (n, C)
        if grad_weight is not None:  # += dlogits.T (V, n) @ h_c (n, C)
            if dlogits.dtype == torch.float32:
                grad_weight.addmm_(dlogits.t(), h_c)
            else:  # one product in the input dtype (fp32 accumulate inside the matmul), summed in fp32
                grad_weight.add_(dlogits.t() @ h_c)
        del logits_c, dlogits
    return grad_hidden, (grad_weight.to(weight.dtype) if grad_weight is not None else None)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, eps, num_tokens, chunk_size,
                grad_enabled):
        N = hidden.shape[0]
        ctx.options = (ignore_index, reduction, eps, chunk_size)
        grads_now = grad_enabled and reduction != "none"  # grad mode is always off inside forward
        if reduction == "mean":
            denominator = mean_denominator(targets, ignore_index, num_tokens)
            row_scale = (1.0 / denominator).expand(N)  # (N,), stride 0
        else:
            row_scale = torch.ones((), dtype=torch.float32, device=hidden.device).expand(N)  # (N,)
        losses = torch.empty(N, dtype=torch.float32, device=hidden.device)  # (N,)
        ctx.grads = _chunk_pass(hidden, weight, targets, ignore_index, eps, chunk_size, row_scale,
                                grads_now and ctx.needs_input_grad[0], grads_now and ctx.needs_input_grad[1], losses)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, targets)
            return losses
        total = losses.sum()
        return total if reduction == "sum" else total / denominator

    @staticmethod
    def backward(ctx, grad_out):
        ignore_index, reduction, eps, chunk_size = ctx.options
        if reduction == "none":  # recompute each chunk's logits and apply the per-row upstream gradient (N,)
            hidden, weight, targets = ctx.saved_tensors
            return _chunk_pass(hidden, weight, targets, ignore_index, eps, chunk_size, grad_out.float(),
                               *ctx.needs_input_grad[:2]) + (None,) * 7
        if getattr(ctx, "grads", None) is None:
            raise RuntimeError("fused_linear_cross_entropy: backward() ran twice through the same graph; the "
                               "gradients were computed in forward and are consumed by the first backward")
        grads, ctx.grads = ctx.grads, None  # (grad_hidden, grad_weight), each None when not needed
        scale = grad_out.float()
        return tuple(g if g is None else g.mul_(scale.to(g.dtype)) for g in grads) + (None,) * 7


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0,
                               num_tokens: Union[int, float, torch.Tensor, None] = None,
                               chunk_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without materialising the logits.

    hidden (N, C) and weight (V, C): same float dtype (fp32, fp16, bf16) and device; targets (N,)
    integer ids in [0, V) or ``ignore_index``. Options as in ``minilife.kernels.cross_entropy``.
    chunk_size: rows per chunk (default: ``default_chunk_size(N, C, V)``). Returns float32."""
    fn = "fused_linear_cross_entropy"
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        amp_dtype = torch.get_autocast_dtype(hidden.device.type)  # what F.linear would compute in
        hidden, weight = hidden.to(amp_dtype), weight.to(amp_dtype)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{fn}: {name} dtype {t.dtype} is not supported (float32, float16, bfloat16)")
    N, C = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != C:
        raise ValueError(f"{fn}: hidden is (N={N}, C={C}) but weight is {tuple(weight.shape)}; expected (V, {C})")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{fn}: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
                         f"{weight.device}) must share dtype and device")
    if V == 0:
        raise ValueError(f"{fn}: weight has V = 0 rows (classes)")
    check_targets(fn, targets, N, V, ignore_index, hidden.device)
    n_tok = check_options(fn, reduction, label_smoothing, num_tokens)
    if chunk_size is None:
        chunk_size = default_chunk_size(N, C, V)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), reduction,
                                          float(label_smoothing), n_tok, chunk_size, torch.is_grad_enabled())


"""Measuring code: how much tensor memory it holds, and how two implementations compare in time and memory.

What it implements
- ``LiveTensorBytes``: a ``TorchDispatchMode`` that sees every op run inside it (forward, backward,
  recomputation), adds the bytes of each *new* tensor storage an op returns, and subtracts them when
  a weakref finaliser sees the storage freed. ``.live`` is the running total, ``.peak`` its maximum.
  An output that shares a storage with one of the op's inputs (a view, an in-place or ``out=``
  result) allocated nothing and is skipped, also when that storage existed before counting began.
  A custom op with a Python body (``torch.library.custom_op``, e.g. torch's chunked
  ``F.linear_cross_entropy``) runs with the mode still on, so the ops inside it count too.
- ``peak_tensor_bytes(fn)``: the peak of that count while ``fn()`` runs.
- ``peak_memory_bytes(fn, device)``: on CUDA the caching allocator's own peak above what was
  allocated before; elsewhere ``peak_tensor_bytes`` (torch keeps no CPU allocator statistics).
- ``interleaved_times(fns, repeats)``: seconds per call of several functions, run in rounds whose
  order rotates, so drifting machine load hits every side alike. Every ``bench/`` script times with it.
- ``compare(case, ours, refs, sides, device, repeats)``: one warm-up each, interleaved timings of ours
  and every reference, then peak memory; rows of min / median per side and the ratios ours / reference.
- The kernels' comparisons, for chapter 5 and ``bench/kernels.py``: ``linear_ce_sides``, ``ce_sides``
  (forward + backward closures on shared inputs), ``bench_loss`` and ``bench_attention`` (``compare``).

What it leaves out: allocator slack and fragmentation, scratch buffers *inside* one aten kernel,
Python objects. It counts tensors only, the same way for both sides of a comparison, and is exact
and repeatable -- unlike process RSS, which glibc's malloc keeps high after frees.
"""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode  # documented home of the class
from torch.utils._pytree import tree_flatten  # no public pytree module in torch 2.13

from minilife.kernels.cross_entropy import cross_entropy
from minilife.kernels.flash_attention import flash_attention
from minilife.kernels.flash_attention_torch import flash_attention_torch
from minilife.kernels.fused_linear_ce import default_chunk_size, fused_linear_cross_entropy
from minilife.kernels.reference import attention_naive

__all__ = ["LiveTensorBytes", "peak_tensor_bytes", "peak_memory_bytes", "interleaved_times", "compare", "MiB",
           "linear_ce_sides", "ce_sides", "bench_loss", "bench_attention"]

MiB = 2.0**20


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive (``.live``) and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}  # storage data_ptr -> nbytes, for storages we counted

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func.namespace not in ("aten", "prim", "prims") and all(t.device.type == "cpu" for t in tensors):
            # a custom op with a Python body (torch.library.custom_op, e.g. F.linear_cross_entropy's
            # chunked path): run its CPU kernel with this mode still on, so its insides are counted
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._sizes or key in inputs:  # reuses a counted or an input storage
                continue
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Run ``fn()`` and return the peak number of bytes of tensors it allocated and held at once."""
    with LiveTensorBytes() as meter:
        fn()
    return meter.peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what existed before it (CUDA: the allocator's
    peak; any other device: ``peak_tensor_bytes``)."""
    if device.type != "cuda":
        return peak_tensor_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int,
                      sync: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` rounds, each calling every function once, the
    order rotated by one each round. ``sync`` (e.g. a CUDA synchronize) runs before and after each call."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def compare(case: str, ours: str, refs: Union[str, Sequence[str]], sides: Mapping[str, Callable[[], object]],
            device: torch.device, repeats: int) -> list[dict]:
    """Time and peak memory of ``sides[ours]`` vs each ``sides[ref]`` (closures running the whole op), timed
    in the same interleaved rounds. Two rows per reference (``time_ms``, ``peak_MiB``): min / median of each
    side, ``ratio_min`` / ``ratio_median`` = ours / reference. Memory is measured after the timings."""
    names = [ours] + ([refs] if isinstance(refs, str) else list(refs))
    for name in names:
        sides[name]()  # warm-up: compiles kernels, touches the allocator
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    seconds = interleaved_times({name: sides[name] for name in names}, repeats, sync)
    times = {name: [s * 1e3 for s in values] for name, values in seconds.items()}
    peaks = {name: [peak_memory_bytes(sides[name], device) / MiB] for name in names}
    rows = []
    for ref in names[1:]:
        for metric, values in (("time_ms", times), ("peak_MiB", peaks)):
            o_min, o_med = min(values[ours]), statistics.median(values[ours])
            r_min, r_med = min(values[ref]), statistics.median(values[ref])
            rows.append(dict(case=case, metric=metric, ours=ours, reference=ref, ours_min=o_min, ours_median=o_med,
                             ref_min=r_min, ref_median=r_med, ratio_min=o_min / r_min, ratio_median=o_med / r_med))
    return rows


# ------------------------------------------------------------------------------------------------
# the kernels' comparisons: closures running forward + backward on shared inputs


def linear_ce_sides(N: int, V: int, C: int, dtype, device, chunk: Optional[int] = None,
                    seed: int = 0) -> dict[str, Callable[[], object]]:
    """LM head + loss, forward + backward: "fused" (``fused_linear_cross_entropy``, ``chunk`` rows per
    chunk or its default rule), "materialised" (``hidden @ W.T`` then ``F.cross_entropy``) and, where
    torch has it, ``F.linear_cross_entropy``'s chunked path with its own chunk rule ("torch chunked",
    default ``LinearCrossEntropyOptions``) and with the fused side's rows per chunk ("..., our chunk")."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(V, C, generator=g) / C**0.5).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    losses = {"fused": lambda: fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk),
              "materialised": lambda: F.cross_entropy(hidden @ weight.t(), targets)}  # (N, V) logits
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13
        for name, opt in (("torch chunked", torch.nn.LinearCrossEntropyOptions()),  # torch's own chunk rule
                          ("torch chunked, our chunk", torch.nn.LinearCrossEntropyOptions(
                              chunking_method=None, batch_chunk_size=chunk or default_chunk_size(N, C, V)))):
            losses[name] = lambda opt=opt: F.linear_cross_entropy(hidden, weight, targets, options=opt)
    return {name: (lambda f=f: torch.autograd.grad(f(), (hidden, weight))) for name, f in losses.items()}


def ce_sides(N: int, V: int, dtype, device, seed: int = 0) -> dict[str, Callable[[], object]]:
    """Cross-entropy on (N, V) logits, forward + backward: "triton" (``cross_entropy``) and "torch"."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return {"triton": lambda: torch.autograd.grad(cross_entropy(logits, targets), (logits,)),
            "torch": lambda: torch.autograd.grad(F.cross_entropy(logits, targets), (logits,))}


def bench_loss(device: torch.device, *, tokens: int, vocab: int, hidden: int, dtype, repeats: int,
               triton_ce: bool) -> list[dict]:
    """Fused linear + CE vs the other ``linear_ce_sides`` (and, if ``triton_ce``, Triton CE vs torch's)."""
    tag = f"{str(dtype)[6:]} {device.type}"
    sides = linear_ce_sides(tokens, vocab, hidden, dtype, device)
    rows = compare(f"linear + CE fwd+bwd N={tokens} C={hidden} V={vocab} {tag}", "fused",
                   [name for name in sides if name != "fused"], sides, device, repeats)
    if triton_ce:
        rows += compare(f"cross-entropy fwd+bwd N={tokens} V={vocab} {tag}", "triton", "torch",
                        ce_sides(tokens, vocab, dtype, device), device, repeats)
    return rows


def bench_attention(device: torch.device, seq_len: Optional[int] = None, batch: int = 1, heads: int = 8,
                    head_dim: int = 64, repeats: int = 5) -> list[dict]:
    """Causal attention forward + backward, ``compare`` rows. CUDA (default T=4096, bf16): Triton
    ``flash_attention`` vs SDPA and ``attention_naive``; CPU (T=1024, fp32): ``flash_attention_torch`` vs naive."""
    cuda = device.type == "cuda"
    T = seq_len or (4096 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(batch, heads, T, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    attn = {"attention_naive": lambda: attention_naive(q, k, v, causal=True)}
    if cuda:
        ours, refs = "flash_attention (triton)", ["sdpa", "attention_naive"]
        attn[ours] = lambda: flash_attention(q, k, v, causal=True)
        attn["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        ours, refs = "flash_attention_torch", ["attention_naive"]
        attn[ours] = lambda: flash_attention_torch(q, k, v, causal=True)
    runs = {name: (lambda f=f: torch.autograd.grad(f(), (q, k, v), d_out)) for name, f in attn.items()}
    case = f"causal attention fwd+bwd B={batch} H={heads} T={T} D={head_dim} {str(dtype)[6:]} {device.type}"
    return compare(case, ours, refs, runs, device, repeats)

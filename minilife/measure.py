"""Measuring code: how much tensor memory it holds, and how two implementations compare in time and memory.

What it implements
- ``LiveTensorBytes``: a ``TorchDispatchMode`` that sees every op run inside it (forward, backward,
  recomputation), adds the bytes of each *new* tensor storage an op returns, and subtracts them when
  a weakref finaliser sees the storage freed. ``.live`` is the running total, ``.peak`` its maximum.
  An output that shares a storage with one of the op's inputs (a view, an in-place or ``out=``
  result) allocated nothing and is skipped, also when that storage existed before counting began.
- ``peak_tensor_bytes(fn)``: the peak of that count while ``fn()`` runs.
- ``peak_memory_bytes(fn, device)``: on CUDA the caching allocator's own peak above what was
  allocated before; elsewhere ``peak_tensor_bytes`` (torch keeps no CPU allocator statistics).
- ``interleaved_times(fns, repeats)``: seconds per call of several functions, run in rounds whose
  order rotates, so drifting machine load hits every side alike. Every ``bench/`` script times with it.
- ``compare(case, ours, ref, sides, device, repeats)``: one warm-up each, interleaved timings, then
  peak memory; rows of min / median per side and the ratios ours / reference (the kernels' benches).

What it leaves out: allocator slack and fragmentation, scratch buffers *inside* one aten kernel,
Python objects. It counts tensors only, the same way for both sides of a comparison, and is exact
and repeatable -- unlike process RSS, which glibc's malloc keeps high after frees.
"""
from __future__ import annotations

import statistics
import time
import weakref
from typing import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "peak_tensor_bytes", "peak_memory_bytes", "interleaved_times", "compare", "MiB"]

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
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
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


def compare(case: str, ours: str, ref: str, sides: Mapping[str, Callable[[], object]], device: torch.device,
            repeats: int) -> list[dict]:
    """Time and peak memory of ``sides[ours]`` vs ``sides[ref]`` (closures running the whole op).

    Returns two rows (metric ``time_ms`` and ``peak_MiB``) with min / median of each side and
    ``ratio_min`` / ``ratio_median`` = ours / reference. Memory is measured after the timings, so the
    CPU counter's bookkeeping never enters a timing.
    """
    for name in (ours, ref):
        sides[name]()  # warm-up: compiles kernels, touches the allocator
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    seconds = interleaved_times({ours: sides[ours], ref: sides[ref]}, repeats, sync)
    times = {name: [s * 1e3 for s in values] for name, values in seconds.items()}
    peaks = {name: [peak_memory_bytes(sides[name], device) / MiB] for name in (ours, ref)}
    rows = []
    for metric, values in (("time_ms", times), ("peak_MiB", peaks)):
        o_min, o_med = min(values[ours]), statistics.median(values[ours])
        r_min, r_med = min(values[ref]), statistics.median(values[ref])
        rows.append(dict(case=case, metric=metric, ours=ours, reference=ref, ours_min=o_min, ours_median=o_med,
                         ref_min=r_min, ref_median=r_med, ratio_min=o_min / r_min, ratio_median=o_med / r_med))
    return rows

"""Hand-written kernels (attention, cross-entropy) and the helpers that decide whether Triton can run.

What it implements
- ``interpreting()``: True when ``TRITON_INTERPRET=1`` is set, i.e. Triton kernels run on the CPU
  through Triton's numpy interpreter (slow, but exact enough to test the kernels without a GPU).
- ``triton_runnable(device)``: can a Triton kernel run on tensors living on ``device``? Yes on CUDA
  (when triton is installed), yes on CPU only under the interpreter, otherwise no. Callers then fall
  back to their pure-torch version (with a warning), never to a silently wrong answer.
- ``import_triton()``: the one place that imports triton. It is imported lazily (only when a kernel is
  launched), so ``import minilife`` never needs triton or touches CUDA.
- ``warn_once(key, msg)``: a fallback warning printed once per process and reason.

What it leaves out: kernels for MPS/ROCm-specific paths (Triton's AMD backend may work but is untested).

About ``TRITON_INTERPRET`` (checked on triton 3.9): triton reads it when a ``@triton.jit`` function
is *defined* (``triton.jit`` then returns an ``InterpretedFunction`` instead of a ``JITFunction``),
and triton's own library (``tl.max``, ``tl.sum``, ``tl.cdiv``...) is defined that way when ``triton``
is first imported. So the mode is fixed for the whole process at the first ``import triton``: set it
before that (tests do it at the top of the module, before importing minilife.kernels). Our kernel
modules import triton lazily and raise a clear error if the variable changed after they were loaded.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

__all__ = ["interpreting", "triton_available", "triton_runnable", "import_triton", "warn_once"]

_WARNED: set[str] = set()


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set to a true value ('1', 'true', 'yes', 'on')."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_runnable(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors on ``device``? On CUDA when triton is installed, on the CPU
    only when interpreting (TRITON_INTERPRET=1) as well, never elsewhere (MPS)."""
    device = torch.device(device)
    if not triton_available() or device.type not in ("cuda", "cpu"):
        return False
    return torch.cuda.is_available() if device.type == "cuda" else interpreting()


def import_triton() -> tuple[ModuleType, ModuleType]:
    """Import and return ``(triton, triton.language)``; clear ImportError if triton is missing."""
    try:
        triton = importlib.import_module("triton")
        tl = importlib.import_module("triton.language")
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "minilife.kernels: the Triton kernels need the 'triton' package "
            f"(import failed: {e}). Install triton, or use the pure-torch versions "
            "(attn_impl='math'/'sdpa', loss_impl='torch')."
        ) from e
    return triton, tl


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

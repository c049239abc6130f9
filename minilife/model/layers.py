"""The small building blocks of the transformer: RMSNorm, rotary position embeddings, SwiGLU, embeddings.

What it implements
- ``RMSNorm`` (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4):
  y = x / sqrt(mean(x^2) + eps) * g. Computed in float32 (or float64 when the input is float64) and
  cast back, so bf16/fp16 activations do not lose the mean of squares to rounding.
- Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 13-15): each adjacent pair of channels
  (0,1), (2,3), ... of a head is rotated by the angle pos * theta^(-2i/D), i = 0..D/2-1. The dot
  product of a rotated query and key then depends on their positions only through the offset
  (m - n). ``rope_cos_sin`` takes arbitrary integer positions; ``RotaryEmbedding`` is a table of
  cos/sin for positions 0..max_positions-1, indexed by (T,) or per-row (B, T) positions.
- ``SwiGLU`` feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
  FFN(x) = W2 (silu(W1 x) * W3 x), no biases (as in LLaMA).
- ``TokenEmbedding``: a (V, C) lookup table that rejects ids outside [0, V) with a clear error
  instead of an index error from deep inside the kernel; ``check_tensor``, the shape/dtype check
  every model module uses for its inputs.

What it leaves out: learned/absolute position embeddings, RoPE scaling variants (NTK, YaRN),
partial rotary dimensions, biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned gain (no bias, no mean removal).

    x: (..., C) -> (..., C), same dtype as x."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"RMSNorm eps must be > 0, got {eps}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exercise: rmsnorm
        xf = x.to(_compute_dtype(x.dtype))
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)
        # end exercise: rmsnorm

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# rotary position embeddings
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles pos * theta^(-2i/D), i = 0..D/2-1, for integer ``positions`` (any shape
    P, e.g. (T,) or (B, T)). Formed in float64 (pos * freq loses precision in float32 for large
    positions), then cast to ``dtype``. Returns cos, sin of shape (*P, D/2)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got head_dim={head_dim}")
    # exercise: rope
    freqs = theta ** (-2.0 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = positions.to(torch.float64).unsqueeze(-1) * freqs.to(positions.device)  # (*P, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)
    # end exercise: rope


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` by the angles whose cos/sin are given.

    x: (B, H, T, D); cos, sin: (T, D/2) shared by the batch, or (B, T, D/2) per sequence.
    Pair (x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos). Returns (B, H, T, D)."""
    B, H, T, D = x.shape
    if cos.dim() == 3:  # per-sequence positions
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, D/2) -> (B, 1, T, D/2): broadcast over heads
    # exercise: rope
    ct = _compute_dtype(x.dtype)
    pairs = x.to(ct).view(B, H, T, D // 2, 2)  # (B, H, T, D/2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]  # each (B, H, T, D/2)
    cos, sin = cos.to(ct), sin.to(ct)
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)  # (B, H, T, D/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (B, H, T, D)
    # end exercise: rope


class RotaryEmbedding(nn.Module):
    """cos/sin table for positions 0..max_positions-1: ``forward(positions)`` with integer positions
    (T,) or (B, T), each in [0, max_positions), or a slice (a view, no copy), returns cos, sin of shape
    (T, D/2) or (B, T, D/2), ready for ``apply_rope``. The table is a non-persistent buffer (recomputed,
    not saved in checkpoints) that follows the module's ``.to(device)``; indexing it needs no device sync."""

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        cos, sin = rope_cos_sin(torch.arange(max_positions), head_dim, theta)  # (T_max, D/2) each
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def forward(self, positions: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cached[positions], self.sin_cached[positions]


# feed-forward and embeddings
def default_ffn_hidden(n_embd: int, multiple_of: int = 32) -> int:
    """SwiGLU hidden width: 8/3 * C (keeps the parameter count of a 4C GELU MLP), rounded up."""
    return multiple_of * math.ceil(8 * n_embd / 3 / multiple_of)


class SwiGLU(nn.Module):
    """Gated feed-forward: W2 (silu(W1 x) * W3 x). x: (..., C) -> (..., C); hidden width F."""

    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(n_embd, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, n_embd, bias=False)  # down (a residual projection)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def check_tensor(x, name: str, shape: tuple, kind: str = "integer") -> None:
    """Raise a ValueError unless ``x`` is a tensor of ``shape`` (a str entry such as "B" matches any
    size) with "integer" or "bool" entries."""
    is_tensor = isinstance(x, torch.Tensor)
    if not (is_tensor and x.dim() == len(shape) and all(isinstance(s, str) or s == n for s, n in zip(shape, x.shape))
            and (x.dtype == torch.bool) == (kind == "bool") and not x.dtype.is_floating_point):
        got = f"{x.dtype} of shape {tuple(x.shape)}" if is_tensor else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape ({', '.join(map(str, shape))}) with {kind} entries, "
                         f"got {got}")


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "token id",
                    ignore_index: int | None = None) -> None:
    """Raise unless ``ids`` (any shape) is an int32/int64 tensor with values in [0, vocab_size)
    (entries equal to ``ignore_index`` excepted). One device sync; skipped while torch.compile traces."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}s must be an integer tensor (int64), got dtype {ids.dtype}")
    if ids.numel() and not torch.compiler.is_compiling():  # the check is a graph break under compile
        bad = (ids < 0) | (ids >= vocab_size)
        if ignore_index is not None:
            bad &= ids != ignore_index
        if bool(bad.any()):
            first = int(ids[bad][0])
            raise ValueError(f"{what} {first} is outside the vocabulary [0, {vocab_size}) "
                             f"(vocab_size={vocab_size}); {int(bad.sum())} id(s) out of range")


class TokenEmbedding(nn.Module):
    """Lookup table (V, C): ids (B, T) long -> vectors (B, T, C). Ids outside [0, V) raise a ValueError
    (``check_token_ids``: one device sync per call, far clearer than a CUDA device-side assert)."""

    def __init__(self, vocab_size: int, n_embd: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, n_embd))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        check_token_ids(idx, self.vocab_size)
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"

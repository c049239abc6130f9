"""Multi-head self-attention with rotary positions, three interchangeable paths and a KV cache.

What it implements (Vaswani et al. 2017, "Attention Is All You Need", eq. 1):
    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + M) V,   M = 0 where allowed, -inf where not.
- ``attention_math``: that formula written out with an explicit boolean mask (the readable path,
  and the one to step through in a debugger).
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels when available).
- ``triton``: ``minilife.kernels.flash_attention.flash_attention`` (imported lazily, only when
  chosen). It handles plain "causal" and "full" attention without dropout; custom boolean masks,
  prefix-LM and padding masks, KV-cache decoding steps and attention dropout fall back to sdpa.
- Masks: "causal" (token i sees j <= i), "full" (bidirectional, for masked LM), a boolean (B, T, T)
  tensor (True = may attend), or ``prefix_lengths`` (B,) for a prefix LM (Raffel et al. 2020, T5
  sec. 3.2.1): bidirectional over the first p_b tokens, causal after, i.e. allowed = (j <= i) | (j < p_b).
  Any of them combines with a padding mask (B, T) (True = real token): padded keys are never attended.
- ``KVCache``: per-layer preallocated keys/values for generation; the new queries are the last of the
  cached + new keys (their RoPE positions are the caller's: GPT continues each row's count).

What it leaves out: grouped-query / multi-query attention, sliding windows, attention biases (ALiBi),
paged caches.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilife.model.layers import apply_rope, check_tensor

ATTN_IMPLS = ("math", "sdpa", "triton")

# What a block receives after ``build_attention_mask``: "causal", "full" or a bool (B, 1, T, T) tensor.
MaskSpec = Union[str, torch.Tensor]


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """Bool (Tq, Tk), True where query i may see key j. Queries are the *last* Tq of the Tk positions
    (the KV-cache case), so query i sits at absolute position i + (Tk - Tq) and sees j <= that."""
    # exercise: causal_attention
    q_pos = torch.arange(t_q, device=device).unsqueeze(1) + (t_k - t_q)  # (Tq, 1)
    k_pos = torch.arange(t_k, device=device).unsqueeze(0)  # (1, Tk)
    return k_pos <= q_pos  # (Tq, Tk)
    # end exercise: causal_attention


def prefix_lm_mask(prefix_lengths: torch.Tensor, t: int) -> torch.Tensor:
    """Bool (B, T, T) for a prefix LM: query i sees key j when j <= i or j < prefix_lengths[b]."""
    pos = torch.arange(t, device=prefix_lengths.device)
    causal = pos.view(1, t, 1) >= pos.view(1, 1, t)  # (1, T, T): j <= i
    in_prefix = pos.view(1, 1, t) < prefix_lengths.view(-1, 1, 1)  # (B, 1, T): key j inside the prefix
    return causal | in_prefix  # (B, T, T)


def build_attention_mask(attn_mask, prefix_lengths, batch: int, t: int, device, padding_mask=None,
                         past: int = 0) -> MaskSpec:
    """Check and combine the user's mask arguments into "causal" | "full" | bool (B, 1, T, past + T).

    attn_mask: None (= "causal") | "causal" | "full" | bool (B, T, T) or (T, T) with True = may attend.
    prefix_lengths: None or integer (B,) with 0 <= p <= T; only combines with a causal attn_mask.
    Every query row of a tensor mask must allow at least one key (otherwise softmax gives NaN).
    padding_mask: None or bool (B, past + T), True = real token (HF's attention_mask): padded keys are
    never attended, and a padded query attends every key (its output is don't-care; a softmax over no
    key would be NaN). past: positions already in a KV cache, before the T queries; causal only."""
    if past and (prefix_lengths is not None or attn_mask not in (None, "causal")):
        raise ValueError("KV-cache decoding supports causal attention only")
    if isinstance(attn_mask, str) and attn_mask not in ("causal", "full"):
        raise ValueError(f"attn_mask must be 'causal', 'full' or a bool tensor, got {attn_mask!r}")
    mask = "causal" if attn_mask is None else attn_mask
    if prefix_lengths is not None:
        if attn_mask not in (None, "causal"):
            raise ValueError("prefix_lengths builds its own mask; pass attn_mask=None or 'causal' with it")
        p = torch.as_tensor(prefix_lengths, device=device)
        check_tensor(p, "prefix_lengths", (batch,))
        if p.numel() and (int(p.min()) < 0 or int(p.max()) > t):
            raise ValueError(f"prefix_lengths must lie in [0, {t}] (sequence length {t}), "
                             f"got min {int(p.min())} max {int(p.max())}")
        mask = prefix_lm_mask(p, t).unsqueeze(1)  # (B, T, T) -> (B, 1, T, T)
    elif not isinstance(mask, str):
        if isinstance(mask, torch.Tensor) and mask.shape == (t, t):
            mask = mask.expand(batch, t, t)  # (T, T) -> (B, T, T)
        check_tensor(mask, "attn_mask", (batch, t, t), "bool")
        empty_rows = ~mask.any(dim=-1)  # (B, T)
        if bool(empty_rows.any()):
            b, i = (int(v) for v in empty_rows.nonzero()[0])
            raise ValueError(f"attn_mask row (batch {b}, query {i}) allows no key; softmax over nothing is NaN")
        mask = mask.to(device).unsqueeze(1)  # (B, T, T) -> (B, 1, T, T)
    if padding_mask is None:
        return mask
    check_tensor(padding_mask, "padding_mask", (batch, past + t), "bool")
    keep = padding_mask.to(device)  # (B, past + T)
    if isinstance(mask, str):  # (T, past + T); "full" has past = 0
        mask = causal_mask(t, past + t, device) | (mask == "full")
    return (mask & keep[:, None, None, :]) | ~keep[:, None, past:, None]  # (B, 1, T, past + T)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D), masked) V written out.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); mask: bool broadcastable to (B, H, Tq, Tk), True = may
    attend, or None for no mask. Softmax is taken in float32 (or float64). Returns (B, H, Tq, D)."""
    # exercise: causal_attention
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    # end exercise: causal_attention
    if dropout_p > 0.0 and training:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, Tq, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, impl: str,
           dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Dispatch to one attention path. q: (B, H, Tq, D); k, v: (B, H, Tk, D); mask: "causal" (with
    Tq == Tk), "full", or bool broadcastable to (B, H, Tq, Tk). Returns (B, H, Tq, D)."""
    p = dropout_p if training else 0.0
    if impl == "math":
        if isinstance(mask, str):
            mask = causal_mask(q.shape[2], k.shape[2], q.device) if mask == "causal" else None
        return attention_math(q, k, v, mask, p, training)
    if impl == "triton" and isinstance(mask, str) and p == 0.0:
        from minilife.kernels.flash_attention import flash_attention  # lazy: triton only when chosen
        return flash_attention(q, k, v, causal=(mask == "causal"), sm_scale=None)
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    # sdpa, and the triton path's fallback for tensor masks / dropout
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=(mask == "causal"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class KVCache:
    """Preallocated keys and values of one attention layer for incremental decoding.

    k, v: (B, H, T_max, D). ``length`` is how many positions are filled; ``append`` writes the new
    keys/values after them and returns views of everything filled so far."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=torch.float32):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new, v_new: (B, H, T, D). Returns k, v: (B, H, length + T, D)."""
        t = k_new.shape[2]
        if self.length + t > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {self.length} cached + {t} new > capacity {self.k.shape[2]}")
        self.k[:, :, self.length:self.length + t] = k_new
        self.v[:, :, self.length:self.length + t] = v_new
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, RoPE on q and k, attention, output projection.

    ``forward(x, cos, sin, mask, cache=None)``: x (B, T, C); cos, sin (T, D/2) or (B, T, D/2) for the
    tokens' positions; mask a ``MaskSpec`` for T queries over the T keys (with a cache: over its L + T
    keys, the queries being the last T; "causal" then means they see all before them). Returns (B, T, C)."""

    def __init__(self, n_embd: int, n_head: int, attn_impl: str = "sdpa", dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.n_head, self.head_dim, self.attn_impl, self.dropout = n_head, n_embd // n_head, attn_impl, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)  # a residual projection
        self.resid_dropout = nn.Dropout(dropout)
        self.prefix = None  # prefix tuning's learned keys/values (minilife.model.peft.inject_prefix) go here

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: MaskSpec = "causal",
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the T queries are the last of the L + T keys
            k, v = cache.append(k, v)  # (B, H, L + T, D)
            if isinstance(mask, str) and mask == "causal" and k.shape[2] > T:
                mask = causal_mask(T, k.shape[2], x.device)  # (T, L + T); a tensor mask: triton falls back
        if self.prefix is not None:  # (B, H, P + Tk, D) each; mask bool (B|1, 1, T, P + Tk)
            k, v, mask = self.prefix(k, v, mask, T)
        y = attend(q, k, v, mask, self.attn_impl, self.dropout, self.training)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_dropout(self.proj(y))

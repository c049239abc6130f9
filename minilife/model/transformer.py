"""The decoder-only transformer: ModelConfig, Block, GPT (forward with loss, generate).

What it implements
- A pre-norm transformer (x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))), a final RMSNorm and a
  linear LM head, tied to the token embedding by default (Press & Wolf 2017). Rotary positions, so
  there is no position table. This is the LLaMA layout (Touvron et al. 2023) at toy sizes.
- Initialisation as in GPT-2 (Radford et al. 2019, sec. 2.3) and nanoGPT: every weight ~ N(0, 0.02),
  and the projections that write into the residual stream (attention ``proj``, FFN ``w2``) scaled
  by 1/sqrt(2 * n_layer), since each layer adds two residual branches and their variance accumulates.
- ``forward(idx, targets)`` -> (logits, loss). Loss: ``F.cross_entropy`` (loss_impl "torch"), the
  Triton cross-entropy kernel ("triton") or the fused linear + cross-entropy kernel ("fused", which
  never materialises the (N, V) logits, so it returns logits=None when targets are given). Every
  projection is called as a module, so a wrapper (LoRA) is honoured on every path; "fused" reads
  lm_head.weight and so refuses any head but a plain nn.Linear.
- Masks for the three objectives of ``minilife.model.objectives`` (causal, full, prefix LM, any boolean
  (B, T, T) mask; see ``minilife.model.attention``), each combined with an optional padding mask (B, T);
  RoPE positions per row, by default counting each row's real tokens from 0.
- Activation (gradient) checkpointing of each block with ``torch.utils.checkpoint``
  (use_reentrant=False): activations inside a block are recomputed in the backward pass.
- ``generate``: a batch of prompts of any lengths, per-row stop ids, temperature (0 = greedy), top-k,
  a preallocated KV cache, a seedable generator. Weights tied differently from the model are refused.

What it leaves out: biases, learned position tables, mixture of experts, grouped-query attention,
weight-tying variants, beam search / nucleus sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minilife.model.attention import ATTN_IMPLS, CausalSelfAttention, KVCache, MaskSpec, build_attention_mask
from minilife.model.layers import (RMSNorm, RotaryEmbedding, SwiGLU, TokenEmbedding, check_tensor, check_token_ids,
                                   default_ffn_hidden)

LOSS_IMPLS = ("torch", "triton", "fused")
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class ModelConfig:
    """Shape and implementation choices of the GPT. ``ModelConfig.preset("tiny")`` is the CPU default."""
    vocab_size: int = 2048
    context_length: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_hidden: Optional[int] = None  # SwiGLU hidden width; None -> 8/3 * n_embd rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # "math" | "sdpa" | "triton"
    loss_impl: str = "torch"  # "torch" | "triton" | "fused"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim = n_embd / n_head = {self.head_dim} is odd; "
                             "RoPE rotates channel pairs and needs an even head_dim")
        if self.ffn_hidden is not None and (not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0):
            raise ValueError(f"ModelConfig.ffn_hidden must be None or a positive integer, got {self.ffn_hidden!r}")
        for name, allowed in (("attn_impl", ATTN_IMPLS), ("loss_impl", LOSS_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"ModelConfig: norm_eps and rope_theta must be > 0, "
                             f"got norm_eps={self.norm_eps}, rope_theta={self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU hidden width actually used (``ffn_hidden`` or its default)."""
        return self.ffn_hidden if self.ffn_hidden is not None else default_ffn_hidden(self.n_embd)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """Named sizes: "micro" (tests, smoke runs), "tiny" (CPU default), "small", "gpt2-small"
        (GPT-2 124M shape: 12 layers, 12 heads, C=768, V=50257, T=1024), "gpt2-medium" (24, 16, 1024)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS = {
    "micro": ModelConfig(vocab_size=512, context_length=64, n_layer=2, n_head=2, n_embd=64),
    "tiny": ModelConfig(),
    "small": ModelConfig(vocab_size=8192, context_length=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2-small": ModelConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(vocab_size=50257, context_length=1024, n_layer=24, n_head=16, n_embd=1024),
}


class Generation(NamedTuple):
    """What ``GPT.generate`` returns, each (B, T0 + N): tokens (long), the padded prompts then the new
    ids (pad_id after a row's stop); completion_mask (bool), True exactly at the new tokens that count
    (the stop id included); prompt_mask (bool), True at real prompt tokens. ``padding_mask`` (their
    union) is what to pass back to the model to score the sequences."""
    tokens: torch.Tensor
    completion_mask: torch.Tensor
    prompt_mask: torch.Tensor

    @property
    def padding_mask(self) -> torch.Tensor:
        return self.prompt_mask | self.completion_mask


class Block(nn.Module):
    """One pre-norm transformer layer. x: (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.attn_impl, cfg.dropout)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.n_embd, cfg.ffn_dim, cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: MaskSpec = "causal",
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class GPT(nn.Module):
    """Decoder-only language model. See the module docstring for the architecture."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = TokenEmbedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one (V, C) matrix for reading and writing tokens
        self.register_load_state_dict_pre_hook(GPT._check_tying)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere, residual projections N(0, 0.02 / sqrt(2 * n_layer)), norm gains 1."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm gains
            else:
                resid = name.endswith(("attn.proj.weight", "ffn.w2.weight"))
                nn.init.normal_(p, mean=0.0, std=resid_std if resid else 0.02)

    def _check_tying(self, state_dict, prefix, *_) -> None:
        """load_state_dict pre-hook: refuse weights whose embedding/head tying differs from the model's
        (an untied head loaded into a tied model would silently overwrite the embedding)."""
        emb, head = state_dict.get(prefix + "tok_emb.weight"), state_dict.get(prefix + "lm_head.weight")
        if emb is not None and head is not None:
            tied = emb.shape == head.shape and torch.equal(emb, head)
            if tied != self.cfg.tie_embeddings:
                raise RuntimeError(f"the state dict's embeddings are {'tied' if tied else 'untied'} (tok_emb.weight "
                                   f"{'==' if tied else '!='} lm_head.weight) but this model has tie_embeddings="
                                   f"{self.cfg.tie_embeddings}; build it with ModelConfig(tie_embeddings={tied})")

    def hidden(self, idx: torch.Tensor, *, padding_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, attn_mask=None, prefix_lengths: torch.Tensor | None = None,
               caches: list[KVCache] | None = None) -> torch.Tensor:
        """Final-normed hidden states. idx: (B, T) long -> (B, T, C).

        padding_mask: bool (B, T), True = real token (HF's attention_mask); with ``caches`` holding L
        positions it is (B, L + T), covering those too. Padded keys are never attended; outputs at
        padded positions are don't-care. positions: long (B, T) RoPE positions in [0, context_length);
        by default each row counts its real tokens (cumsum - 1), so its first real token is at 0
        whatever the padding side. With ``caches`` (one KVCache per layer) the T tokens follow the L."""
        check_tensor(idx, "idx", ("B", "T"))
        (B, T), T_max = idx.shape, self.cfg.context_length
        L = caches[0].length if caches else 0
        if L + T > T_max:
            raise ValueError(f"idx has T={T} tokens (+ {L} cached) but the model's context_length is {T_max}; "
                             f"crop the input to at most {T_max} tokens")
        mask = build_attention_mask(attn_mask, prefix_lengths, B, T, idx.device, padding_mask, past=L)
        if positions is None and padding_mask is None:
            positions = slice(L, L + T)  # T contiguous positions: a view of the RoPE table, no copy
        elif positions is None:
            positions = (padding_mask.long().cumsum(1)[:, L:] - 1).clamp(min=0).to(idx.device)  # (B, T)
        else:
            check_tensor(positions, "positions", (B, T))
            if bool(((positions < 0) | (positions >= T_max)).any()):
                raise ValueError(f"positions must lie in [0, context_length={T_max})")
        cos, sin = self.rope(positions)  # (T, D/2) or (B, T, D/2) each
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        use_ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled() and not caches
        for i, block in enumerate(self.blocks):
            args = (x, cos, sin, mask, caches[i] if caches else None)
            x = checkpoint(block, *args, use_reentrant=False) if use_ckpt else block(*args)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                padding_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None, attn_mask=None,
                prefix_lengths: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean"):
        """idx: (B, T) long; targets: (B, T) long or None (entries equal to ignore_index are skipped;
        padded positions are not skipped by themselves). Masks and positions as in ``hidden``.

        Returns (logits (B, T, V) or None, loss or None). loss is a scalar for reduction "mean"/"sum"
        and (B, T) for "none" (0 at ignored positions). logits is None only for loss_impl="fused"
        with targets given."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if targets is not None:
            check_tensor(targets, "targets", tuple(idx.shape))
            if self.cfg.loss_impl == "torch":  # the kernels check their own targets; F.cross_entropy
                check_token_ids(targets, self.cfg.vocab_size, "target", ignore_index)  # would give an IndexError
            if self.cfg.loss_impl == "fused" and type(self.lm_head) is not nn.Linear:
                raise ValueError(f"loss_impl='fused' reads lm_head.weight directly and would skip the "
                                 f"{type(self.lm_head).__name__} around lm_head; use loss_impl='torch'")
        h = self.hidden(idx, padding_mask=padding_mask, positions=positions, attn_mask=attn_mask,
                        prefix_lengths=prefix_lengths)  # (B, T, C)
        B, T, C = h.shape
        if targets is None:
            return self.lm_head(h), None
        flat_targets = targets.reshape(B * T)  # (B*T,)
        opts, logits = dict(ignore_index=ignore_index, reduction=reduction), None
        if self.cfg.loss_impl == "fused":
            from minilife.kernels.fused_linear_ce import fused_linear_cross_entropy  # lazy: triton
            loss = fused_linear_cross_entropy(h.reshape(B * T, C), self.lm_head.weight, flat_targets, **opts)
        else:
            logits = self.lm_head(h)  # (B, T, V)
            flat_logits = logits.reshape(B * T, -1)  # (B*T, V)
            if self.cfg.loss_impl == "triton":
                from minilife.kernels.cross_entropy import cross_entropy  # lazy: triton
                loss = cross_entropy(flat_logits, flat_targets, **opts)
            else:  # upcast: bf16 logits lose too much in log-sum-exp
                upcast = flat_logits.to(torch.promote_types(logits.dtype, torch.float32))
                loss = F.cross_entropy(upcast, flat_targets, **opts)
        return logits, (loss.view(B, T) if reduction == "none" else loss)  # "none": (B*T,) -> (B, T)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None, *,
                 padding_mask: torch.Tensor | None = None, eos_id: int | Sequence[int] | None = None,
                 pad_id: int = 0) -> Generation:
        """Sample up to ``max_new_tokens`` tokens after each prompt -> ``Generation``, (B, T0 + N) each.

        prompts: token-id lists (left-padded here with ``pad_id``) or a (B, T0) long tensor with an optional
        bool ``padding_mask`` (True = real token; left padding). A row stops after a stop id (``eos_id``:
        an int or a list), then emits pad_id, masked out; decoding ends once every row has stopped.
        temperature 0 = greedy; top_k keeps the k most likely tokens; ``generator`` (any device) makes
        sampling reproducible. Runs in eval mode, restoring the mode after. Without a cache the input is
        cropped to the last context_length tokens each step (a sliding window); with a cache, once the
        window is full, decoding continues the same way without it, so both paths give the same tokens."""
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k <= 0):
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 (0 = greedy) and top_k None or > 0, "
                             f"got {max_new_tokens}, {temperature}, {top_k}")
        device = next(self.parameters()).device
        if isinstance(prompts, torch.Tensor):
            idx, keep = prompts, torch.ones_like(prompts, dtype=torch.bool) if padding_mask is None else padding_mask
        else:  # left-pad: every row's last prompt token sits in the last column
            if padding_mask is not None:
                raise ValueError("padding_mask goes with a (B, T0) tensor of prompts; lists are padded here")
            T0 = max(map(len, prompts), default=0)
            idx = torch.tensor([[pad_id] * (T0 - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
            keep = torch.tensor([[False] * (T0 - len(p)) + [True] * len(p) for p in prompts], device=device)
        check_tensor(idx, "prompts", ("B", "T0"))
        check_tensor(keep, "padding_mask", tuple(idx.shape), "bool")
        idx, keep = idx.to(device), keep.to(device)
        if not (idx.shape[1] and bool(keep[:, -1].all())):  # the last column's logits give the first new token
            raise ValueError("generate needs non-empty, left-padded prompts: each row's last token must be real")
        was_training = self.training
        self.eval()
        try:
            return self._decode(idx, keep, max_new_tokens, temperature, top_k, use_cache, generator, eos_id, pad_id)
        finally:
            self.train(was_training)

    def _decode(self, tokens, keep, max_new_tokens, temperature, top_k, use_cache, generator, eos_id, pad_id):
        """The decoding loop of ``generate``. tokens, keep: (B, T0) -> Generation of (B, T0 + N)."""
        (B, T0), T_max, p = tokens.shape, self.cfg.context_length, next(self.parameters())
        caches = ([KVCache(B, self.cfg.n_head, T_max, self.cfg.head_dim, p.device, p.dtype) for _ in self.blocks]
                  if use_cache and T0 < T_max else None)
        stop_ids = torch.tensor([] if eos_id is None else eos_id, dtype=torch.long, device=p.device).reshape(-1)  # (S,)
        done = torch.zeros(B, 1, dtype=torch.bool, device=p.device)  # (B, 1): row has emitted a stop id
        for _ in range(max_new_tokens):
            if caches is not None and tokens.shape[1] <= T_max:
                h = self.hidden(tokens[:, caches[0].length:], padding_mask=keep, caches=caches)  # (B, T_new, C)
            else:
                caches = None
                h = self.hidden(tokens[:, -T_max:], padding_mask=keep[:, -T_max:])  # (B, min(T, T_max), C)
            logits = self.lm_head(h[:, -1, :])  # (B, V)
            next_id = self._sample(logits.to(torch.promote_types(logits.dtype, torch.float32)), temperature, top_k,
                                   generator).masked_fill(done, pad_id)  # (B, 1)
            tokens, keep = torch.cat((tokens, next_id), dim=1), torch.cat((keep, ~done), dim=1)
            done = done | torch.isin(next_id, stop_ids)
            if eos_id is not None and bool(done.all()):
                break
        generated = torch.arange(tokens.shape[1], device=p.device) >= T0  # (T0 + N,)
        return Generation(tokens, keep & generated, keep & ~generated)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
        """logits: (B, V) -> next token ids (B, 1)."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        if generator is not None and generator.device != probs.device:  # e.g. a CPU generator, CUDA model
            return torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(probs.device)
        return torch.multinomial(probs, num_samples=1, generator=generator)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix once). non_embedding=True leaves out the token table, the
        count Kaplan et al. (2020) use for scaling laws (an untied LM head is still counted)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups: 2-D weight matrices decay; norm gains, biases and the token
        embedding (and a tied LM head, which is the same tensor) do not. Frozen parameters are left out."""
        decay, no_decay = [], []
        for p in self.parameters():  # yields a shared (tied) tensor once
            if p.requires_grad:
                (decay if p.dim() >= 2 and p is not self.tok_emb.weight else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

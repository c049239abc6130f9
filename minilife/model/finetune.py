"""What trains when a pretrained GPT is fine-tuned: one switch over full fine-tuning and the PEFT family.

What it implements
- ``apply_method(model, method, ...)``: "full" (every weight trains), "lora" / "dora" (``model.lora``),
  "adapter" (bottleneck adapters) or "prefix" (prefix tuning) (``model.peft``); every method but "full"
  freezes the base weights. Returns a one-line description for logs and summaries.
- New-token rows (``TokenRows``): a chat template adds role tokens to a pretrained vocabulary; their
  embedding rows start untrained, and a frozen base could never learn to read them or to emit the
  end-of-turn token. So with every PEFT method the rows of the new ids (the last ``k`` of the (V, C)
  matrix) train as their own small (k, C) parameter, shared by the embedding and a tied LM head (an
  untied head gets its own rows). The rest of the matrix stays frozen; this is what PEFT libraries call
  trainable token indices. The count appears in the trainable parameters (k * C, e.g. 4 * 128).
- ``optimizer_groups``: AdamW groups of exactly the trainable tensors: the GPT's own decay / no-decay split
  for "full", the adapters (no weight decay unless asked) plus the token rows (never decayed) otherwise.
- ``export_model``: a plain GPT with the update folded in (LoRA/DoRA merged, token rows written back),
  the portable artifact later chapters load; None for adapters and prefixes, which add computation that
  no plain GPT weight can hold.

What it leaves out: QLoRA (quantised base weights), IA3, prompt tuning, training norms alongside adapters.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from minilife.model.lora import inject_lora, merge_lora
from minilife.model.peft import (adapter_layers, adapter_param_groups, inject_adapters, inject_prefix,
                                 trainable_parameters)

METHODS = ("full", "lora", "dora", "adapter", "prefix")
__all__ = ["METHODS", "TokenRows", "apply_method", "export_model", "optimizer_groups", "trainable_parameters"]


class TokenRows(nn.Module):
    """Trainable rows for the ids >= ``first`` of a frozen token matrix, around the embedding (``kind`` "embed":
    idx (B, T) -> (B, T, C)) or around the LM head ("head": h (B, T, C) -> logits (B, T, V), the last V - first
    logits computed from the rows). ``rows`` (k, C) may be one Parameter shared by both (tied weights)."""

    def __init__(self, base: nn.Module, first: int, rows: nn.Parameter, kind: str):
        super().__init__()
        self.base, self.first, self.rows, self.kind = base, first, rows, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "head":
            logits = self.base(x)  # (B, T, V)
            return torch.cat([logits[..., :self.first], x @ self.rows.t()], dim=-1)  # (B, T, first + k)
        base = self.base(x)  # (B, T, C); the base embedding checks the ids
        new = x >= self.first  # (B, T): ids that are new tokens
        picked = self.rows[(x - self.first).clamp(min=0)]  # (B, T, C)
        return torch.where(new.unsqueeze(-1), picked.to(base.dtype), base)


def train_token_rows(model: nn.Module, first: int) -> int:
    """Wrap ``model.tok_emb`` and ``model.lm_head`` so the rows of ids >= ``first`` train; returns their count."""
    weight = model.tok_emb.weight
    k = weight.shape[0] - first
    if k <= 0:
        return 0
    rows = nn.Parameter(weight.detach()[first:].clone())  # (k, C)
    tied = model.lm_head.weight is weight if isinstance(model.lm_head, nn.Linear) else model.cfg.tie_embeddings
    head_rows = rows if tied else nn.Parameter(_head_weight(model.lm_head).detach()[first:].clone())
    model.tok_emb = TokenRows(model.tok_emb, first, rows, "embed")
    model.lm_head = TokenRows(model.lm_head, first, head_rows, "head")
    return rows.numel() + (0 if tied else head_rows.numel())


def _head_weight(module: nn.Module) -> torch.Tensor:
    while not isinstance(module, nn.Linear):
        module = module.base
    return module.weight


def apply_method(model: nn.Module, method: str, *, rank: int = 8, alpha: float = 16.0, rslora: bool = False,
                 targets: list[str] | tuple[str, ...] = ("attn.qkv", "attn.proj", "ffn.*"), adapter_size: int = 16,
                 prefix_len: int = 8, first_new_id: int | None = None) -> str:
    """Make ``method`` the thing that trains in ``model`` (in place); returns a description for the logs.
    ``first_new_id``: the first id the chat template added (its rows train with every PEFT method)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return "full fine-tuning"
    if method in ("lora", "dora"):
        inject_lora(model, list(targets), rank=rank, alpha=alpha, rslora=rslora, dora=method == "dora")
        text = f"{method.upper()} r={rank} alpha={alpha:g}{' (rsLoRA)' if rslora else ''} on {' '.join(targets)}"
    elif method == "adapter":
        inject_adapters(model, bottleneck=adapter_size)
        text = f"bottleneck adapters of width {adapter_size}"
    else:
        inject_prefix(model, prefix_len)
        text = f"prefix tuning, {prefix_len} key/value vectors per layer"
    n_rows = train_token_rows(model, first_new_id) if first_new_id is not None else 0
    return text + (f" + {n_rows} new-token embedding values" if n_rows else "")


def optimizer_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups over exactly the trainable tensors (see the module docstring)."""
    if not any(True for _ in adapter_layers(model)):
        return model.param_groups(weight_decay)
    rows = {id(m.rows): m.rows for m in model.modules() if isinstance(m, TokenRows)}
    return adapter_param_groups(model, weight_decay) + ([{"params": list(rows.values()), "weight_decay": 0.0}]
                                                        if rows else [])


def export_model(model: nn.Module) -> nn.Module | None:
    """A plain GPT equal to ``model`` (a copy with LoRA/DoRA merged and the token rows written back), or
    ``model`` itself after full fine-tuning; None when bottleneck adapters or prefixes hold part of it."""
    if not any(True for _ in adapter_layers(model)) and not isinstance(model.tok_emb, TokenRows):
        return model
    plain = copy.deepcopy(model)
    merge_lora(plain)
    if any(type(layer).__name__ != "LoRALinear" for _, layer in adapter_layers(plain)):
        return None
    emb, head = plain.tok_emb, plain.lm_head
    if isinstance(emb, TokenRows):  # write the trained rows back into the (frozen) matrix
        with torch.no_grad():
            emb.base.weight[emb.first:] = emb.rows
            _head_weight(head.base)[head.first:] = head.rows  # the same tensor when tied
        plain.tok_emb, plain.lm_head = emb.base, head.base
    for name, layer in reversed(list(adapter_layers(plain))):  # LoRA merged: each wrapper -> its base Linear
        parent, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(parent), leaf, layer.base)
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain

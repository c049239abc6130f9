"""Parameter-efficient fine-tuning: what every method shares, bottleneck adapters and prefix tuning.

What it implements
- ``AdapterLayer``: the base of every PEFT module in minilife (LoRA and DoRA live in ``minilife.model.lora``).
  Its trainable parts sit in ``adapters`` (name -> module); ``active`` names the one in use (one at a
  time, model-wide, ``set_adapter``); ``enabled`` is False inside ``adapters_disabled``, where every
  such layer computes exactly what the base model computes (chapter 4's frozen reference model);
  ``reference_model`` gives that reference, or a frozen copy when one is kept, for a block.
- The shared helpers: ``match_linears`` (fnmatch targets against qualified names or their dotted
  suffixes), ``mark_only_adapters_trainable``, ``trainable_parameters``, ``adapter_param_groups``,
  ``base_state_dict`` (the plain model's weights, e.g. after ``merge_lora``, for export).
- Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", sec. 2.1):
  after a sublayer's output projection, y -> y + W_up act(W_down y + b_down) + b_up, with W_up and b_up
  zero at init so the adapted model starts as the base model.
- Prefix tuning (Li & Liang 2021, "Prefix-Tuning", sec. 4.1): P learned key and value vectors per layer
  and head, put before the sequence's keys and values; every query may attend to them. They carry no
  RoPE rotation (they sit at no position). ``CausalSelfAttention`` calls ``layer.prefix(k, v, mask, T)``
  right before attention when one is set.

What it leaves out: the prefix MLP reparameterisation and initialising prefixes from real tokens' activations
(Li & Liang sec. 4.3), training the layer norms alongside bottleneck adapters (Houlsby et al.), parallel
adapters, prompt tuning of input embeddings, and IA3.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilife.model.attention import CausalSelfAttention, MaskSpec, causal_mask


def check_adapter_name(name: str) -> None:
    """Adapter names key an nn.ModuleDict: a Python identifier such as "default" or "chat"."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be a Python identifier, got {name!r}")


class AdapterLayer(nn.Module):
    """Base of the PEFT modules: ``adapters`` (nn.ModuleDict, name -> trainable part), ``active`` (the
    name in use, or None), ``enabled`` (False: act as the base) and ``merged`` (LoRA sets it while its
    update is folded into the weight; adapters then cannot be switched or turned off)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.enabled = True
        self.merged = False

    @property
    def adapter_on(self) -> bool:
        return self.enabled and self.active is not None

    def check_new(self, name: str, where: str) -> None:
        """Raise unless ``name`` is a valid, new adapter name for this layer (called ``where``)."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"layer {where!r} already has an adapter named {name!r}; pick another name")
        if self.merged:
            raise ValueError(f"layer {where!r} holds a merged adapter; call unmerge_lora(model) first")

    def add(self, name: str, adapter: nn.Module, where: str) -> None:
        """Register ``adapter`` under the new ``name`` and make it active."""
        self.check_new(name, where)
        self.adapters[name] = adapter
        self.active = name


def base_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of the Linear inside any stack of PEFT wrappers (``.base`` of ``.base`` ...)."""
    while isinstance(module, AdapterLayer):
        module = module.base
    return module.weight


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(qualified name, layer) of every AdapterLayer in ``model``, in module order."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer))


# --------------------------------------------------------------------------------------------
# finding targets


def _logical_names(model: nn.Module) -> dict[str, str | None]:
    """{qualified module name: logical name}: a PEFT wrapper's ``.base`` takes the wrapper's name
    ("blocks.0.attn.proj.base" -> "blocks.0.attn.proj"); modules inside adapters map to None."""
    logical: dict[str, str | None] = {"": ""}
    for name, module in model.named_modules():
        if name:
            parent, _, leaf = name.rpartition(".")
            up, wrapper = logical[parent], isinstance(model.get_submodule(parent), AdapterLayer)
            if up is None or (wrapper and leaf == "adapters"):
                logical[name] = None
            else:
                logical[name] = up if wrapper and leaf == "base" else f"{up}.{leaf}".lstrip(".")
    return logical


def linear_sites(model: nn.Module) -> dict[str, str]:
    """{logical name: qualified name} of every nn.Linear that may be a target (not those inside adapters)."""
    logical = _logical_names(model)
    return {logical[n]: n for n, m in model.named_modules() if isinstance(m, nn.Linear) and logical[n] is not None}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys (wrappers' ".base" removed, adapters left out): with
    LoRA merged first (``merge_lora``) it loads into a plain model; unmerged adapters are simply absent."""
    logical = _logical_names(model)
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if logical[module] is not None:
            out[f"{logical[module]}.{leaf}".lstrip(".")] = value
    return out


def name_matches(name: str, pattern: str) -> bool:
    """fnmatch ``pattern`` against the dotted ``name`` or any dotted suffix of it ("attn.qkv" matches
    "blocks.0.attn.qkv"; "*.proj" and "blocks.0.ffn.*" match as fnmatch does)."""
    pieces = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(pieces[i:]), pattern) for i in range(len(pieces)))


def match_linears(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """{pattern: [logical names of the Linears it matches]}; a pattern matching none raises a ValueError
    naming it and listing a few Linear names that exist."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("targets must name at least one pattern, got none")
    sites = list(linear_sites(model))
    found = {p: [n for n in sites if name_matches(n, p)] for p in patterns}
    for pattern, names in found.items():
        if not names:
            raise ValueError(f"target {pattern!r} matches no nn.Linear of the model; some that exist: "
                             f"{', '.join(sites[:8])}{' ...' if len(sites) > 8 else ''}")
    return found


def replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Put ``new`` where ``qualified_name`` points (its parent's attribute)."""
    parent, _, leaf = qualified_name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


# --------------------------------------------------------------------------------------------
# what every method shares


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter except those inside an AdapterLayer's ``adapters`` (all names). Every
    ``inject_*`` calls this, so after injection only adapter parameters require grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in layer.adapters.parameters():
            p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied tensor (embedding = LM head) is counted once."""
    params = list(model.parameters())  # yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of the trainable adapter parameters: weights (LoRA's A and B, W_down, W_up,
    prefixes) get ``weight_decay`` (default 0: no decay unless asked); DoRA magnitudes and biases never do."""
    decay, no_decay = {}, {}
    for _, layer in adapter_layers(model):
        for name, p in layer.adapters.named_parameters():
            if p.requires_grad:
                (no_decay if name.rpartition(".")[2] in ("magnitude", "bias") else decay)[id(p)] = p
    decay, no_decay = list(decay.values()), list(no_decay.values())
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _refuse_merged(model: nn.Module, what: str) -> list[tuple[str, AdapterLayer]]:
    """The model's adapter layers; raise if one holds a merged update (it cannot be switched)."""
    layers = list(adapter_layers(model))
    merged = next((name for name, layer in layers if layer.merged), None)
    if merged is not None:
        raise ValueError(f"{what}: layer {merged!r} has its adapter merged into the weight; "
                         f"call unmerge_lora(model) first")
    return layers


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one in every layer that has it; layers without it are switched
    off (one fine-tune active at a time, across methods). None switches every adapter off."""
    layers = _refuse_merged(model, "set_adapter")
    if name is not None and not any(name in layer.adapters for _, layer in layers):
        known = sorted({n for _, layer in layers for n in layer.adapters})
        raise ValueError(f"set_adapter: no layer has an adapter named {name!r}; the model has {known}")
    for _, layer in layers:
        layer.active = name if name in layer.adapters else None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block every adapter layer (LoRA, DoRA, bottleneck, prefix) computes what the base
    model computes; on exit (an exception too) each layer's previous state comes back."""
    layers = _refuse_merged(model, "adapters_disabled")
    before = [layer.enabled for _, layer in layers]
    try:
        for _, layer in layers:
            layer.enabled = False
        yield model
    finally:
        for (_, layer), was in zip(layers, before):
            layer.enabled = was



@contextlib.contextmanager
def reference_model(policy: nn.Module, frozen: nn.Module | None = None):
    """The reference model of RLHF and DPO for the block: ``frozen`` (a frozen copy of the starting model)
    when given, else ``policy`` itself with its adapters disabled -- the same function without a
    second copy of the weights in memory."""
    if frozen is not None:
        yield frozen
    else:
        with adapters_disabled(policy) as base:
            yield base

# --------------------------------------------------------------------------------------------
# bottleneck adapters (Houlsby et al. 2019)


class Bottleneck(nn.Module):
    """y (..., C) -> W_up gelu(W_down y + b_down) + b_up (..., C); hidden width ``bottleneck``.
    W_up and b_up start at zero, so the residual y + Bottleneck(y) starts as y."""

    def __init__(self, dim: int, bottleneck: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(y)))


class BottleneckLayer(AdapterLayer):
    """A sublayer's output projection followed by a residual bottleneck: x -> y + Bottleneck(y), y = base(x)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., C)
        return y + self.adapters[self.active](y) if self.adapter_on else y


def inject_adapters(model: nn.Module, targets: Sequence[str] = ("attn.proj", "ffn.w2"), bottleneck: int = 16,
                    *, adapter: str = "default") -> list[str]:
    """Put a bottleneck adapter named ``adapter`` after every Linear ``targets`` match (patterns as in
    ``name_matches``; default: the two residual projections of each block). The new adapter becomes the
    active one (``set_adapter``); everything but the adapters is frozen. Returns the adapted layers' names."""
    if not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive integer, got {bottleneck!r}")
    names = list(dict.fromkeys(n for found in match_linears(model, targets).values() for n in found))
    check_adapter_name(adapter)
    for name in names:  # check every layer before changing the model
        if isinstance(model.get_submodule(name), BottleneckLayer):
            model.get_submodule(name).check_new(adapter, name)
    for name in names:
        outer = model.get_submodule(name)
        weight = base_weight(outer)  # (out, in)
        if not isinstance(outer, BottleneckLayer):
            outer = BottleneckLayer(outer)
            replace_module(model, name, outer)
        outer.add(adapter, Bottleneck(weight.shape[0], bottleneck, weight.device, weight.dtype), name)
    set_adapter(model, adapter)
    mark_only_adapters_trainable(model)
    return names


# --------------------------------------------------------------------------------------------
# prefix tuning (Li & Liang 2021)


class PrefixVectors(nn.Module):
    """P learned keys and values per head: ``keys``, ``values`` (H, P, D), initialised N(0, 0.02)."""

    def __init__(self, n_head: int, n_prefix: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        self.keys = nn.Parameter(0.02 * torch.randn(n_head, n_prefix, head_dim, device=device, dtype=dtype))
        self.values = nn.Parameter(0.02 * torch.randn(n_head, n_prefix, head_dim, device=device, dtype=dtype))


def prefix_mask(mask: MaskSpec, n_prefix: int, t_q: int, t_k: int, device=None) -> torch.Tensor:
    """Any MaskSpec over Tk keys -> bool (B|1, 1, Tq, P + Tk) with the P prefix columns allowed.

    mask: "causal" (Tq <= Tk; the queries are the last Tq of the Tk positions, the KV-cache case),
    "full", or a bool tensor broadcastable to (B, 1, Tq, Tk), True = may attend."""
    if isinstance(mask, str):
        if mask not in ("causal", "full") or (mask == "causal" and t_q > t_k):
            raise ValueError(f"prefix_mask: mask must be 'causal' (with Tq={t_q} <= Tk={t_k}), 'full' or "
                             f"a bool tensor, got {mask!r}")
        mask = causal_mask(t_q, t_k, device) if mask == "causal" else torch.ones(t_q, t_k, dtype=torch.bool,
                                                                                  device=device)  # (Tq, Tk)
    if mask.dtype != torch.bool or mask.dim() > 4:
        raise ValueError(f"prefix_mask: a tensor mask must be bool with at most 4 dims, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    keys = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (.., Tq, Tk) -> 4 dims
    keys = keys.expand(keys.shape[0], 1, t_q, t_k)  # (B|1, 1, Tq, Tk)
    seen = torch.ones(keys.shape[0], 1, t_q, n_prefix, dtype=torch.bool, device=keys.device)  # (B|1, 1, Tq, P)
    return torch.cat((seen, keys), dim=-1)  # (B|1, 1, Tq, P + Tk)


class PrefixTuning(AdapterLayer):
    """Set as ``CausalSelfAttention.prefix``: ``forward(k, v, mask, t_q)`` with k, v (B, H, Tk, D) after
    RoPE (and the KV cache) returns (B, H, P + Tk, D) each and the mask as ``prefix_mask`` makes it; when
    off it returns its inputs unchanged."""

    def forward(self, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, t_q: int):
        if not self.adapter_on:
            return k, v, mask
        prefix = self.adapters[self.active]
        B, t_k = k.shape[0], k.shape[2]
        pk = prefix.keys.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1)  # (H, P, D) -> (B, H, P, D)
        pv = prefix.values.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1)  # (H, P, D) -> (B, H, P, D)
        mask = prefix_mask(mask, prefix.keys.shape[1], t_q, t_k, k.device)  # (B|1, 1, Tq, P + Tk)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2), mask  # (B, H, P + Tk, D) each


def inject_prefix(model: nn.Module, n_prefix: int, *, adapter: str = "default") -> list[str]:
    """Give every attention layer ``n_prefix`` learned keys and values per head (named ``adapter``, made the
    active one); freezes everything but the adapters. n_prefix = 0 is allowed (the model then equals the base).
    Returns the attention layers' names."""
    if not isinstance(n_prefix, int) or n_prefix < 0:
        raise ValueError(f"n_prefix must be an integer >= 0, got {n_prefix!r}")
    check_adapter_name(adapter)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CausalSelfAttention)}
    if not layers:
        raise ValueError("inject_prefix: the model has no CausalSelfAttention layer")
    for name, attn in layers.items():  # check every layer before changing the model
        if attn.prefix is not None:
            attn.prefix.check_new(adapter, f"{name}.prefix")
    for name, attn in layers.items():
        if attn.prefix is None:
            attn.prefix = PrefixTuning()
        w = base_weight(attn.qkv)  # (3C, C): the prefixes take its device and dtype
        attn.prefix.add(adapter, PrefixVectors(attn.n_head, n_prefix, attn.head_dim, w.device, w.dtype), name)
    set_adapter(model, adapter)
    mark_only_adapters_trainable(model)
    return list(layers)

"""LoRA and DoRA: trainable low-rank updates of frozen nn.Linear layers, several named adapters per layer.

What it implements
- LoRA (Hu et al. 2021, "LoRA", eq. 3): h = W0 x + s B A x with W0 (out, in) frozen, A (r, in)
  Kaiming-uniform (nn.Linear's own init, bound 1/sqrt(in)), B (out, r) zero, so the adapted model starts
  as the base model. s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, "A Rank
  Stabilization Scaling Factor"). Dropout acts on the adapter's input only.
- DoRA (Liu et al. 2024, "DoRA", eq. 5): W' = m (W0 + s B A) / ||W0 + s B A||, the norm taken per output
  row of the (out, in) weight, the magnitude m (out,) initialised to ||W0|| so DoRA starts as the base.
  The norm is computed exactly and gradients flow through it (the paper's sec. 4.3 detaches it to save
  memory; we do not).
- Fused projections: the target "attn.qkv:q,v" splits the layer's output into equal slices named by a
  layout (``FUSED_LAYOUTS``, keyed by the layer's own attribute name: "qkv" -> q, k, v; pass
  ``fused_layouts`` for others) and adapts only the listed slices, each with its own A and B, as if W_q
  and W_v were separate layers; the other slices' rows get no update. "attn.qkv" alone adapts all rows
  with one A, B.
  With DoRA on a fused layer only the adapted slices get magnitudes.
- ``inject_lora``; ``merge_lora`` / ``unmerge_lora``: W := W0 + s B A (or DoRA's W') formed in float32
  and cast back to the weight's dtype; a copy of W0 is kept while merged, so unmerging restores it bit
  for bit; merging twice or unmerging an unmerged model does nothing; a tied weight is refused.
  ``save_adapter`` / ``load_adapter``: one adapter's tensors and config, nothing of the base.
  Switching, disabling, freezing, counting and optimizer groups are ``minilife.model.peft``'s and work
  for every method; they are re-exported here.

What it leaves out: quantised bases (QLoRA), LoRA on embeddings, other initialisations (PiSSA, LoftQ),
per-layer rank budgets (AdaLoRA), LoRA+ learning rates, and weighted mixes of several adapters.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilife.checkpoint import CheckpointError, _atomic_torch_save, verify_checkpoint
from minilife.model.peft import (AdapterLayer, adapter_param_groups, adapters_disabled, check_adapter_name,
                                 linear_sites, mark_only_adapters_trainable, match_linears, replace_module,
                                 set_adapter, trainable_parameters)

__all__ = ["FUSED_LAYOUTS", "LoRAAdapter", "LoRALinear", "inject_lora", "merge_lora", "unmerge_lora",
           "save_adapter", "load_adapter", "set_adapter", "adapters_disabled", "mark_only_adapters_trainable",
           "adapter_param_groups", "trainable_parameters"]

FUSED_LAYOUTS = {"qkv": ("q", "k", "v")}  # layer attribute name -> names of its equal output slices
FORMAT, FORMAT_VERSION = "minilife-lora-adapter", 1


class LoRAAdapter(nn.Module):
    """One named update of a LoRALinear. The (out, in) weight is N equal output slices of S rows (N = 1
    unless a layout is given); P of them are adapted, ``index`` (P,) says which.
    A (P, r, in), B (P, S, r); with DoRA also ``magnitude`` (P, S)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, dropout: float, rslora: bool, dora: bool,
                 parts: list[str] | None, layout: list[str] | None):
        super().__init__()
        self.config = dict(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora, parts=parts,
                           layout=layout)
        chosen = [layout.index(p) for p in parts] if parts else list(range(len(layout) if layout else 1))
        self.n_slices, self.scaling = len(layout) if layout else 1, alpha / (math.sqrt(rank) if rslora else rank)
        self.register_buffer("index", torch.tensor(chosen, device=weight.device), persistent=False)
        new = dict(device=weight.device, dtype=weight.dtype)
        self.A = nn.Parameter(torch.empty(len(chosen), rank, weight.shape[1], **new))
        for a in self.A:  # each (r, in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(len(chosen), weight.shape[0] // self.n_slices, rank, **new))
        self.register_parameter("magnitude", nn.Parameter(self.rows(weight).float().norm(dim=-1).to(weight.dtype))
                                if dora else None)  # (P, S): ||W0|| per row
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        c = self.config
        return (f"rank={c['rank']}, alpha={c['alpha']}, scaling={self.scaling:.4g}, dora={c['dora']}"
                + (f", parts={c['parts']}" if c["parts"] else ""))

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The adapted slices of the (out, in) weight: (P, S, in)."""
        return weight.view(self.n_slices, -1, weight.shape[1]).index_select(0, self.index)  # (N, S, in) -> (P, S, in)

    def updated_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """float32 (P, S, in): W0 + s B A on the adapted slices."""
        # exercise: lora_merge
        return self.rows(weight).float() + self.scaling * (self.B.float() @ self.A.float())
        # end exercise: lora_merge

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's m / ||W0 + s B A|| per adapted row: (P, S) float32 (the exact norm, not detached)."""
        return self.magnitude.float() / self.updated_rows(weight).norm(dim=-1)

    def adapted_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """float32 (P, S, in): the rows that replace the adapted slices when merging (W0 + s B A, or W')."""
        rows = self.updated_rows(weight)
        return rows if self.magnitude is None else rows * self.magnitude_scale(weight).unsqueeze(-1)


class LoRALinear(AdapterLayer):
    """A frozen nn.Linear (``.base``; a tied LM head stays tied) plus named LoRA/DoRA adapters, one active.
    x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_on:
            return self.base(x)
        adapter, weight = self.adapters[self.active], self.base.weight
        y = F.linear(x, weight).unflatten(-1, (adapter.n_slices, -1))  # (..., out) -> (..., N, S)
        # exercise: lora_forward
        low = torch.einsum("...i,pri->...pr", adapter.dropout(x), adapter.A)  # (..., P, r)
        update = adapter.scaling * torch.einsum("...pr,psr->...ps", low, adapter.B)  # (..., P, S)
        chosen = y.index_select(-2, adapter.index) + update  # (..., P, S): W0 x + s B A x
        # end exercise: lora_forward
        if adapter.magnitude is not None:
            chosen = chosen * adapter.magnitude_scale(weight).to(chosen.dtype)  # (P, S) broadcast: W' x
        y = y.index_copy(-2, adapter.index, chosen).flatten(-2)  # (..., N, S) -> (..., out)
        return y if self.base.bias is None else y + self.base.bias

    @torch.no_grad()
    def merge(self) -> bool:
        """Fold the active adapter into the weight (float32 arithmetic, cast back); keeps a copy of the
        weight so ``unmerge`` restores it bit for bit. False (nothing done) if merged or no adapter is on."""
        if self.merged or not self.adapter_on:
            return False
        adapter, weight = self.adapters[self.active], self.base.weight
        self.register_buffer("unmerged_weight", weight.detach().clone(), persistent=False)
        rows = adapter.adapted_rows(weight).to(weight.dtype)  # (P, S, in)
        weight.view(adapter.n_slices, -1, weight.shape[1]).index_copy_(0, adapter.index, rows)  # (N, S, in) view
        self.merged = True
        return True

    @torch.no_grad()
    def unmerge(self) -> bool:
        """Restore the weight saved by ``merge``; False (nothing done) if not merged."""
        if not self.merged:
            return False
        self.base.weight.copy_(self.unmerged_weight)
        self.unmerged_weight, self.merged = None, False
        return True


# --------------------------------------------------------------------------------------------
# injection


def _parse_target(target: str) -> tuple[str, list[str] | None]:
    """"pattern" -> (pattern, None); "pattern:a,b" -> (pattern, ["a", "b"])."""
    pattern, sep, parts = target.partition(":")
    names = [p.strip() for p in parts.split(",")] if sep else None
    if not pattern or (sep and (not all(names) or len(set(names)) != len(names))):
        raise ValueError(f"target {target!r}: write 'pattern' or 'pattern:part,part' (e.g. 'attn.qkv:q,v') "
                         f"with distinct part names")
    return pattern, names


def _check_config(name: str, out_features: int, rank, alpha, dropout, parts, layouts) -> list[str] | None:
    """Validate one layer's LoRA settings; return its slice layout (None for a whole-output adapter)."""
    if not isinstance(rank, int) or rank <= 0 or not alpha > 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"need an integer rank > 0, alpha > 0 and dropout in [0, 1), "
                         f"got rank={rank!r}, alpha={alpha!r}, dropout={dropout!r}")
    if parts is None:
        return None
    leaf = name.rpartition(".")[2]
    layout = layouts.get(leaf)
    if layout is None:
        raise ValueError(f"layer {name!r}: parts {parts} given but no fused layout is known for {leaf!r} "
                         f"(known: {sorted(layouts)}); pass fused_layouts={{{leaf!r}: (...)}}")
    if set(parts) - set(layout) or out_features % len(layout):
        raise ValueError(f"layer {name!r}: parts {parts} must come from its layout {list(layout)}, whose "
                         f"{len(layout)} slices must divide out_features={out_features}")
    return list(layout)


def _lora_at(model: nn.Module, name: str, sites: dict[str, str]) -> LoRALinear:
    """The LoRALinear at logical layer ``name``, wrapping its Linear first if needed."""
    real = sites[name]
    parent_name, _, leaf = real.rpartition(".")
    parent = model.get_submodule(parent_name)
    if leaf == "base" and isinstance(parent, LoRALinear):
        return parent
    wrapper = LoRALinear(model.get_submodule(real))
    replace_module(model, real, wrapper)
    return wrapper


def inject_lora(model: nn.Module, targets, rank: int = 8, alpha: float = 16, dropout: float = 0.0, *,
                rslora: bool = False, dora: bool = False, adapter: str = "default",
                fused_layouts: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Add adapter ``adapter`` to every nn.Linear a target matches and return their names.

    targets: fnmatch patterns against a module's qualified name or any dotted suffix ("attn.qkv",
    "blocks.0.ffn.*", "*.proj"), each optionally with ":part,part" for a fused layer ("attn.qkv:q,v").
    A pattern matching no Linear raises a ValueError naming it. Layers already wrapped get a second
    adapter. The new adapter becomes the active one model-wide (``set_adapter``) and every parameter but
    the adapters' is frozen (``mark_only_adapters_trainable``)."""
    layouts = FUSED_LAYOUTS if fused_layouts is None else fused_layouts
    specs = [_parse_target(t) for t in ([targets] if isinstance(targets, str) else targets)]
    found, plan = match_linears(model, [pattern for pattern, _ in specs]), {}
    for pattern, parts in specs:
        for name in found[pattern]:
            if plan.setdefault(name, parts) != parts:
                raise ValueError(f"layer {name!r} is matched by targets with different parts: {plan[name]} and {parts}")
    sites, wrapped, configs = linear_sites(model), _lora_layers(model), {}
    check_adapter_name(adapter)
    for name, parts in plan.items():  # check every layer before changing the model
        if name in wrapped:
            wrapped[name].check_new(adapter, name)
        out_features = model.get_submodule(sites[name]).weight.shape[0]
        layout = _check_config(name, out_features, rank, alpha, dropout, parts, layouts)
        configs[name] = dict(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, dora=dora, parts=parts,
                             layout=layout)
    for name, config in configs.items():
        layer = _lora_at(model, name, sites)
        layer.add(adapter, LoRAAdapter(layer.base.weight, **config), name)
    set_adapter(model, adapter)
    mark_only_adapters_trainable(model)
    return list(configs)


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{logical layer name: LoRALinear} in module order."""
    layers = {}
    for name, real in linear_sites(model).items():
        parent_name, _, leaf = real.rpartition(".")
        parent = model.get_submodule(parent_name)
        if leaf == "base" and isinstance(parent, LoRALinear):
            layers[name] = parent
    return layers


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA layer's active adapter into its weight (in float32, cast back to the weight's
    dtype); merged layers then run as plain Linears. Already-merged layers are left as they are (no-op).
    A layer whose weight is shared with another module (the LM head tied to the embedding) raises a
    ValueError before anything is merged: its update cannot live in a matrix the embedding reads too.
    Returns the names of the layers merged now."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    layers = _lora_layers(model)
    for name, layer in layers.items():
        shared = owners[id(layer.base.weight)]
        if len(shared) > 1 and layer.adapter_on and not layer.merged:
            raise ValueError(f"merge_lora: layer {name!r} shares its weight: {shared} (tied embeddings); merging "
                             f"would change every one. Leave it out of the LoRA targets, or switch its adapter off")
    return [name for name, layer in layers.items() if layer.merge()]


def unmerge_lora(model: nn.Module) -> list[str]:
    """Restore every merged layer's weight exactly (no-op for unmerged ones). Returns the unmerged names."""
    return [name for name, layer in _lora_layers(model).items() if layer.unmerge()]


# --------------------------------------------------------------------------------------------
# adapter-only files


def save_adapter(model: nn.Module, path, name: str = "default") -> Path:
    """Write adapter ``name`` alone (its tensors, its config per layer and each base weight's shape) to
    ``path``, atomically (temp file + os.replace). Returns the path."""
    layers = {n: layer for n, layer in _lora_layers(model).items() if name in layer.adapters}
    if not layers:
        raise ValueError(f"save_adapter: no LoRA layer has an adapter named {name!r}")
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "targets": list(layers),
               "layers": {n: dict(layer.adapters[name].config, base_shape=list(layer.base.weight.shape))
                          for n, layer in layers.items()},
               "tensors": {n: {k: t.detach().cpu().clone() for k, t in layer.adapters[name].state_dict().items()}
                           for n, layer in layers.items()}}
    path = Path(path)
    _atomic_torch_save(payload, path)
    return path


def _read_adapter_file(path: Path) -> dict:
    """The payload of a ``save_adapter`` file; a CheckpointError naming it if missing, corrupt or foreign."""
    verify_checkpoint(path)  # missing, truncated or bit-flipped
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged member, or a pickle weights_only refuses
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot be read as a LoRA adapter file (corrupt?): {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a minilife LoRA adapter file of version {FORMAT_VERSION} "
                              f"(was it written by save_adapter?)")
    return payload


def load_adapter(model: nn.Module, path, name: str | None = None) -> list[str]:
    """Load a ``save_adapter`` file into ``model`` as adapter ``name`` (default: the saved name), injecting
    it where needed (an adapter of that name already there is replaced), make it active and freeze the
    rest. A layer missing from the model or of another shape raises a CheckpointError (a ValueError)
    naming the file, the first such layer and both shapes, before anything is changed. Returns the layers."""
    path = Path(path)
    payload = _read_adapter_file(path)
    name = payload["name"] if name is None else name
    sites = linear_sites(model)
    for layer_name, config in payload["layers"].items():
        if layer_name not in sites:
            raise CheckpointError(f"{path}: layer {layer_name!r} of the adapter is not a Linear of this model "
                                  f"(it has e.g. {', '.join(list(sites)[:6])})")
        shape = list(model.get_submodule(sites[layer_name]).weight.shape)
        if shape != config["base_shape"]:
            raise CheckpointError(f"{path}: layer {layer_name!r}: the adapter was saved for a base weight of shape "
                                  f"{tuple(config['base_shape'])}, this model's is {tuple(shape)}")
    for layer_name, config in payload["layers"].items():
        layer = _lora_at(model, layer_name, sites)
        if layer.merged:
            raise ValueError(f"load_adapter: layer {layer_name!r} holds a merged adapter; call unmerge_lora first")
        if name in layer.adapters:
            del layer.adapters[name]
        settings = {k: config[k] for k in ("rank", "alpha", "dropout", "rslora", "dora", "parts", "layout")}
        layer.add(name, LoRAAdapter(layer.base.weight, **settings), layer_name)
        try:
            layer.adapters[name].load_state_dict(payload["tensors"][layer_name])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: layer {layer_name!r}: its tensors do not fit its config: "
                                  f"{str(e).strip().splitlines()[0]}") from None
    set_adapter(model, name)
    mark_only_adapters_trainable(model)
    return list(payload["layers"])

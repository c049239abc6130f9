"""The bill for training a language model: parameters, memory, FLOPs, time, money, Chinchilla tokens.

What it implements
- ``param_count(cfg)``: the exact parameter count of ``minilife.model.transformer.GPT`` for a
  ``ModelConfig`` (pre-norm LLaMA layout: fused QKV, SwiGLU, RMSNorm gains, no biases, RoPE, tied or
  untied LM head) -- equal to ``GPT(cfg).num_params()``.
- ``memory_bill(model, MemoryOptions)``: weights + gradients + (optional fp32 master weights) + Adam
  moments + activations, with every assumption a field of ``MemoryOptions`` (dtypes, moment count,
  trainable params for LoRA, batch, sequence, gradient checkpointing, or a stated activation figure).
  ``NOTES_SCENARIOS`` are the lifecycle notes' two figures with the assumptions that reproduce them.
- Activations, two ways (``activation_terms``): "fused" is the minimum a well-fused implementation
  must keep for backward (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", sec. 4.1, adapted to RMSNorm + SwiGLU, no dropout, flash attention so no
  T x T matrices); "autograd" is what plain PyTorch autograd keeps for *our* block op by op (fp32),
  which is more -- the chapter shows the measured bytes equal that accounting.
- FLOPs: ``train_flops`` = 6 N D (Kaplan et al. 2020, sec. 2.1: forward 2N per token, backward twice
  that), and ``flops_per_token`` = 6 N_matmul + 12 L T C, the count PaLM uses for MFU (Chowdhery et
  al. 2022, App. B) and Chinchilla's App. F spells out: both attention matmuls (Q K^T and P V) over the
  full context, forward + backward. (Kaplan's Table 1 counts 2 L T C per forward token, i.e. only one
  of the two attention matmuls.) ``train_time_cost``: FLOPs / (peak x MFU) -> GPU-hours -> dollars.
- Chinchilla (Hoffmann et al. 2022): ~20 tokens per parameter; for a FLOP budget C = 6 N D with
  D = 20 N, N = sqrt(C / 120).
- Measurement: ``measure_state_bytes`` (parameters, gradients, optimizer state: sum of tensor
  nbytes) and ``measure_saved_activations`` (bytes autograd saves during a forward, via
  ``torch.autograd.graph.saved_tensors_hooks``), to check the predictions against real tensors.

What it leaves out: sharding (ZeRO, tensor/pipeline parallel divide these bills by the GPU count),
KV-cache / inference memory beyond the weights, allocator fragmentation and CUDA context overhead,
and GQA/MoE shapes (``ModelConfig`` has neither; a nominal parameter count can be used instead).
Bytes are decimal (1 GB = 1e9 bytes), as the notes use them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from minilife.model.transformer import ModelConfig

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
ID_BYTES = 16  # per token: int64 input ids (embedding backward) + int64 targets (the loss)


# parameters
def param_count(cfg: ModelConfig) -> int:
    """Exact parameters of GPT(cfg): V C (+ V C untied head) + L (4 C^2 + 3 C F + 2 C) + C."""
    C, F, V, L = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size, cfg.n_layer
    per_layer = 3 * C * C + C * C + 3 * C * F + 2 * C  # qkv, proj, SwiGLU w1 w3 w2, two norm gains
    return V * C * (1 if cfg.tie_embeddings else 2) + L * per_layer + C  # + final norm gain


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters used in a matmul per token: every block's weight matrices plus the LM head (the
    input embedding is a lookup, and norm gains are elementwise). Tied or not, the head is counted."""
    C, F = cfg.n_embd, cfg.ffn_dim
    return cfg.n_layer * (4 * C * C + 3 * C * F) + cfg.vocab_size * C


def lora_param_count(cfg: ModelConfig, rank: int, targets: tuple[str, ...] = ("qkv", "proj")) -> int:
    """Trainable LoRA parameters (Hu et al. 2021): A (r, in) + B (out, r) per adapted matrix per layer.
    Targets name our Linear layers: qkv (C -> 3C), proj (C -> C), w1/w3 (C -> F), w2 (F -> C)."""
    C, F = cfg.n_embd, cfg.ffn_dim
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "w1": (C, F), "w3": (C, F), "w2": (F, C)}
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"lora targets {sorted(unknown)} unknown; choose from {sorted(shapes)}")
    return cfg.n_layer * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


# activations
def activation_terms(cfg: ModelConfig, seq: int, kind: str = "fused") -> list[tuple[str, int, str]]:
    """Elements kept for backward per token per layer: [(tensor, elements, why)].

    kind "fused": the minimum (each matmul's input, Q/K/V/output for flash attention, the SwiGLU
    gate and up). kind "autograd": what PyTorch autograd keeps for minilife's block in fp32, op by op
    (attn_impl "sdpa" or "math"; the "math" path also keeps the H x T softmax per token)."""
    C, F, H = cfg.n_embd, cfg.ffn_dim, cfg.n_head
    if kind == "fused":
        return [("norm inputs (2 norms)", 2 * C, "x for each RMSNorm backward (+ a scalar rstd)"),
                ("QKV and FFN matmul inputs", 2 * C, "the normalised x each input matmul needs for dW"),
                ("Q, K, V", 3 * C, "flash attention recomputes softmax from these"),
                ("attention output", C, "input of the output projection"),
                ("SwiGLU gate, up, product", 3 * F, "silu'(gate), up, and the input of W2")]
    if kind != "autograd":
        raise ValueError(f"activation kind must be 'fused' or 'autograd', got {kind!r}")
    if cfg.dropout:
        raise ValueError("the autograd accounting assumes dropout=0 (dropout masks are not counted)")
    norm = ("RMSNorm x, x*rstd, output (x2)", 6 * C + 2, "each elementwise op keeps its own inputs")
    ffn = ("SwiGLU gate, silu(gate), up, product", 4 * F, "silu keeps its input, the product both factors")
    merged = ("heads merged for the output projection", C, "transpose+reshape copies (B,H,T,D) -> (B,T,C)")
    if cfg.attn_impl == "math":
        return [norm, ffn, merged,
                ("rotated Q, K and a contiguous V", 3 * C, "matmul inputs (V copied to a contiguous batch)"),
                ("softmax probabilities", H * seq, "(B, H, T, T): H x T per token")]
    return [norm, ffn, merged,
            ("fused QKV output", 3 * C, "sdpa keeps V as a view, so the whole (B,T,3C) buffer stays alive"),
            ("rotated Q, K and attention output", 3 * C + H, "sdpa's saved q, k, out and logsumexp (H)")]


def activation_bytes(cfg: ModelConfig, *, batch: int, seq: int, dtype: str = "bf16", kind: str = "fused",
                     checkpointing: bool = False, recompute_peak: bool = True) -> int:
    """Bytes of activations held for backward for a (batch, seq) step.

    Without checkpointing: L x per-layer terms + the tail (final norm, LM-head input, fp32 log-probs
    of the loss, token ids). With checkpointing only each block's input (C) is kept; during backward
    one block is recomputed at a time, so the peak adds one layer's terms (``recompute_peak``)."""
    tokens, b = batch * seq, DTYPE_BYTES[dtype]
    C, V = cfg.n_embd, cfg.vocab_size
    per_layer = sum(n for _, n, _ in activation_terms(cfg, seq, kind))
    if kind == "autograd":
        if dtype != "fp32":
            raise ValueError("the autograd accounting is exact for fp32 only (autocast adds cast copies)")
        tail = (3 * C + 1 + V) * b + ID_BYTES  # final RMSNorm (x, x*rstd, out, rstd), log-softmax output
        fixed = cfg.n_layer * seq * seq if cfg.attn_impl == "math" and not checkpointing else 0  # bool masks
        fixed += 4  # the loss's scalar total_weight
    else:
        tail = 2 * C * b + V * 4 + ID_BYTES  # final norm input, head input, fp32 log-probs
        fixed = 0
    layers = cfg.n_layer * (C * b if checkpointing else per_layer * b)
    peak = per_layer * b if checkpointing and recompute_peak else 0
    return tokens * (layers + peak + tail) + fixed


# the memory bill
@dataclass(frozen=True)
class MemoryOptions:
    """Every assumption behind a training-memory bill."""
    weights: str = "bf16"  # dtype of the weights the forward pass reads
    grads: str = "bf16"
    master_weights: bool = False  # an extra fp32 copy kept by the optimizer (mixed precision)
    moments: str = "fp32"  # dtype of each Adam moment
    n_moments: int = 2  # 2 Adam(W) m and v, 1 SGD with momentum, 0 plain SGD
    trainable_params: Optional[int] = None  # None = full fine-tuning; else a frozen base + this many adapter params
    include_activations: bool = True
    activations_gb: Optional[float] = None  # a stated figure instead of the estimate
    activations_dtype: str = "bf16"
    activation_kind: str = "fused"  # "fused" (minimum) | "autograd" (minilife's block, fp32)
    batch: int = 1
    seq: int = 2048
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("weights", "grads", "moments", "activations_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"MemoryOptions.{name}={getattr(self, name)!r}: choose from {sorted(DTYPE_BYTES)}")
        for name in ("batch", "seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"MemoryOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.trainable_params is not None and self.trainable_params < 0:
            raise ValueError(f"MemoryOptions.trainable_params must be >= 0, got {self.trainable_params}")
        if self.activation_kind not in ("fused", "autograd"):
            raise ValueError(f"MemoryOptions.activation_kind must be 'fused' or 'autograd', got {self.activation_kind!r}")
        if self.n_moments not in (0, 1, 2):
            raise ValueError(f"MemoryOptions.n_moments must be 0, 1 or 2, got {self.n_moments}")


@dataclass
class MemoryBill:
    """Bytes per item of a training step's memory. ``total`` sums them; ``gb()`` in decimal GB."""
    n_params: int
    trainable: int
    weights: float
    grads: float
    master: float
    moments: float
    activations: float
    options: MemoryOptions = field(repr=False)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.moments + self.activations

    def gb(self) -> dict[str, float]:
        return {k: getattr(self, k) / GB for k in ("weights", "grads", "master", "moments", "activations", "total")}


def memory_bill(model: Union[ModelConfig, int, float], opts: MemoryOptions = MemoryOptions()) -> MemoryBill:
    """The memory bill of one training step. ``model``: a ModelConfig (exact parameter count, and the
    shape the activation estimate needs) or a nominal parameter count (then activations must be
    excluded or given as ``opts.activations_gb``). Gradients, master weights and moments exist only
    for the trainable parameters. With ``opts.trainable_params`` (LoRA) the base weights are frozen
    but still read by the forward pass, and the adapters add their own weights.
    (Activations are counted as for full fine-tuning: LoRA still backpropagates through every layer.)"""
    cfg = model if isinstance(model, ModelConfig) else None
    n = param_count(cfg) if cfg is not None else int(model)
    if n < 1:
        raise ValueError(f"memory_bill: model must be a ModelConfig or a parameter count >= 1, got {model!r}")
    trainable = n if opts.trainable_params is None else int(opts.trainable_params)
    if not opts.include_activations:
        act = 0.0
    elif opts.activations_gb is not None:
        act = opts.activations_gb * GB
    elif cfg is None:
        raise ValueError("activations need a ModelConfig (layers, width, vocab); with a bare parameter "
                         "count pass MemoryOptions(activations_gb=...) or include_activations=False")
    else:
        act = float(activation_bytes(cfg, batch=opts.batch, seq=opts.seq, dtype=opts.activations_dtype,
                                     kind=opts.activation_kind, checkpointing=opts.gradient_checkpointing))
    # exercise: memory_bill
    adapters = trainable if opts.trainable_params is not None else 0
    return MemoryBill(n_params=n, trainable=trainable, weights=(n + adapters) * DTYPE_BYTES[opts.weights],
                      grads=trainable * DTYPE_BYTES[opts.grads], master=trainable * 4 if opts.master_weights else 0,
                      moments=trainable * opts.n_moments * DTYPE_BYTES[opts.moments], activations=act, options=opts)
    # end exercise: memory_bill


# Precision recipes (``--precision`` in ch1): bytes per trainable parameter before activations.
PRECISIONS = {
    "fp32": MemoryOptions(weights="fp32", grads="fp32", moments="fp32", activations_dtype="fp32"),  # 16 B
    "mixed": MemoryOptions(weights="bf16", grads="bf16", master_weights=True, moments="fp32"),  # 16 B (ZeRO)
    "bf16": MemoryOptions(weights="bf16", grads="bf16", moments="bf16"),  # 8 B: pure 16-bit incl. moments
}

# The lifecycle notes' two figures and the assumptions under which they come out (nominal N).
NOTES_SCENARIOS = {
    "notes-8b-72gb": dict(
        n_params=8_000_000_000, expected_gb=72,
        source="notes 002 (sec. 1.3): full fine-tuning of Llama-3-8B, '~72 GB'",
        options=MemoryOptions(weights="fp16", grads="fp16", moments="bf16", activations_gb=8.0),
        why="16 (fp16 weights) + 16 (fp16 grads) + 32 (Adam m, v at 2 bytes each) + 8 (activations, "
            "stated) = 72. The text says Adam keeps fp32 states, but 32 GB for 8B parameters is 4 bytes "
            "per parameter for both moments: only 16-bit moments give it (fp32 moments: 104 GB)."),
    "notes-7b-84gb": dict(
        n_params=7_000_000_000, expected_gb=84,
        source="notes 003 (sec. 2.3): 7B with Adam in bf16/fp32 mixed states, '~84 GB before activations'",
        options=MemoryOptions(weights="bf16", grads="bf16", moments="fp32", include_activations=False),
        why="14 (bf16 weights) + 14 (bf16 grads) + 28 + 28 (fp32 m and v) = 84, no activations, no fp32 "
            "master copy (real mixed precision adds one: +28 GB = 112 GB)."),
}


# compute, time, money, Chinchilla
def train_flops(n_params: float, tokens: float) -> float:
    """Training FLOPs ~= 6 N D (forward 2 N per token, backward 4 N)."""
    if not (n_params >= 0 and tokens >= 0):
        raise ValueError(f"train_flops: n_params={n_params} and tokens={tokens} must be >= 0")
    return 6.0 * n_params * tokens


def flops_per_token(cfg: ModelConfig, seq: int) -> dict[str, float]:
    """Training FLOPs per token at context ``seq``: dense 6 N_matmul plus attention 12 L T C
    (Q K^T and P V over the full T x T, forward + backward; causal masking could skip half)."""
    dense = 6.0 * matmul_param_count(cfg)
    attention = 12.0 * cfg.n_layer * seq * cfg.n_embd
    return {"dense": dense, "attention": attention, "total": dense + attention}


def train_time_cost(flops: float, *, peak_flops: float, mfu: float = 0.4, n_gpus: int = 1,
                    usd_per_gpu_hour: float = 2.5) -> dict[str, float]:
    """Wall time and cost of ``flops`` on ``n_gpus`` with per-GPU ``peak_flops`` at utilisation ``mfu``."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if peak_flops <= 0 or n_gpus < 1:
        raise ValueError(f"peak_flops must be > 0 and n_gpus >= 1, got {peak_flops}, {n_gpus}")
    gpu_hours = flops / (peak_flops * mfu) / 3600.0
    return {"gpu_hours": gpu_hours, "wall_days": gpu_hours / n_gpus / 24.0, "usd": gpu_hours * usd_per_gpu_hour}


def chinchilla_tokens(n_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal training tokens, D ~= 20 N (Hoffmann et al. 2022)."""
    return tokens_per_param * n_params


def chinchilla_optimal(compute_flops: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(N, D) spending ``compute_flops`` = 6 N D with D = 20 N: N = sqrt(C / (6 * 20))."""
    if not (compute_flops >= 0 and tokens_per_param > 0):  # a bare "math domain error" otherwise
        raise ValueError(f"chinchilla_optimal: compute_flops={compute_flops} must be >= 0 and "
                         f"tokens_per_param={tokens_per_param} > 0")
    n = math.sqrt(compute_flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


# measuring real tensors
def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr())


def measure_state_bytes(model: torch.nn.Module, optimizer=None) -> dict[str, int]:
    """Bytes actually held by parameters (a tied tensor once), their gradients, and the optimizer
    state, split into moments (tensors shaped like their parameter) and the rest (step counters)."""
    params = list({id(p): p for p in model.parameters()}.values())
    out = {"params": sum(p.nbytes for p in params),
           "grads": sum(p.grad.nbytes for p in params if p.grad is not None), "moments": 0, "other_state": 0}
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    out["moments" if v.shape == p.shape else "other_state"] += v.nbytes
    return out


def measure_saved_activations(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> dict:
    """Run ``model(idx, targets)`` (idx, targets: (B, T) long) and count the bytes autograd saves for
    backward: each storage once (views share it), parameters and buffers excluded. Returns
    {"bytes", "tensors", "loss"} (call ``loss.backward()`` afterwards if you need gradients)."""
    fixed = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in fixed and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    return {"bytes": sum(seen.values()), "tensors": len(seen), "loss": loss}

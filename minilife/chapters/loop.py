"""The pieces of one training step, shared by ch2_pretrain and the chapter 5 experiments.

``ch2_pretrain.main`` is the training loop written out; this module holds the parts it is built from,
so chapter 5 can rearrange them (other schedules, a kill-and-resume, precision and accumulation
comparisons) without copying code:
- ``load_data``: tokenizer + train/val token arrays from ``ch2_data.ensure_data``, with the
  vocabulary of shards and tokenizer checked against each other.
- ``BatchSource``: micro-batch ``i`` is a pure function of (seed, stream, i) -- random windows shaped
  for the causal, prefix or masked objective (``minilife.model.objectives``). The data position of
  a run is then one integer, and a resumed run sees exactly the batches it would have seen.
- ``accumulate_gradients``: k micro-batches, each contributing sum(token losses) / N with N the
  scored tokens of the *whole* step, so the summed gradient is exactly the big batch's mean-loss
  gradient, ragged micro-batches included (chapter 5.3 shows the naive per-micro-batch mean's error).
- ``optimizer_step``: set the LR, accumulate, check the loss is finite (``check_finite`` names the
  step and the last good checkpoint), clip the global norm (the pre-clip norm is returned), update.
- ``evaluate``: token-weighted mean loss on fixed batches; ``unigram_entropy``: the loss of the best
  model that ignores context, H(p) = -sum_v p_v ln p_v over the training tokens' frequencies.
- ``sample_text``: a seeded sample continuation of a prompt.
- ``check_flags``: the chapters' shared flag validation (a ValueError naming ``--the-flag``, which
  ``config_from_args`` turns into a usage error).

What it leaves out: data loading in background workers (the token arrays are memory-mapped and a
batch is a few slices), distributed samplers.

Follows: the mean-loss identity sum_i S_i / N = (sum_i S_i) / N for accumulation; the optimizer
(AdamW, Loshchilov & Hutter 2019) and the clipping (Pascanu et al. 2013) come from ``minilife.optim``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from minilife.checkpoint import check_finite
from minilife.data.bpe import Tokenizer
from minilife.data.pack import get_batch, load_tokens, read_meta
from minilife.model import objectives
from minilife.model.objectives import ObjectiveBatch
from minilife.model.transformer import GPT, PRESETS
from minilife.optim.clip import clip_grad_norm

IGNORE_INDEX = -100
OBJECTIVES = ("causal", "prefix", "mlm")


# --------------------------------------------------------------------------------------------
# flags


def check_flags(cfg, *, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None,
                presets: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError("--flag-name must be ...")`` for the first config field below its bound
    (``at_least``: >=, ``above``: >; NaN fails both) or naming an unknown ModelConfig preset.
    Fields left at None (a default filled in later) pass."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for bounds, op, ok in ((at_least or {}, ">=", lambda v, lo: v >= lo), (above or {}, ">", lambda v, lo: v > lo)):
        for name, low in bounds.items():
            v = getattr(cfg, name)
            if v is not None and not ok(v, low):
                raise ValueError(f"{flag(name)} must be {op} {low:g}, got {v}")
    for name in presets:
        v = getattr(cfg, name)
        if v is not None and v not in PRESETS:
            raise ValueError(f"{flag(name)} {v!r}: choose one of {sorted(PRESETS)}")


# --------------------------------------------------------------------------------------------
# data: micro-batches as a pure function of their index


def n_targets(batch: ObjectiveBatch) -> int:
    """How many positions of ``batch`` are scored (targets != -100)."""
    return int((batch.targets != IGNORE_INDEX).sum())


class BatchSource:
    """Random windows of a token array, shaped for one objective.

    Micro-batch ``i`` is drawn with a generator seeded from (seed, stream, i): the same index always
    gives the same batch, so the data position of a run is simply how many micro-batches it has used.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context_length: int, *, objective: str = "causal",
                 seed: int = 0, stream: int = 0, mask_id: int | None = None, vocab_size: int | None = None,
                 special_ids: tuple[int, ...] = (), device: torch.device | str = "cpu"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if len(tokens) < context_length + 2:
            raise ValueError(f"only {len(tokens)} tokens: too few for context_length={context_length}")
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.objective, self.seed, self.stream, self.device = objective, seed, stream, torch.device(device)
        if objective == "mlm" and (mask_id is None or vocab_size is None):
            raise ValueError("objective 'mlm' needs mask_id and vocab_size")
        self.mask_id, self.vocab_size, self.special_ids = mask_id, vocab_size, tuple(special_ids)

    def micro_batch(self, index: int) -> ObjectiveBatch:
        """Micro-batch ``index``: inputs, targets (B, T) long on ``device`` (+ the objective's attention args)."""
        g = torch.Generator().manual_seed((self.seed * 4 + self.stream) * 1_000_000_007 + index)
        x, y = get_batch(self.tokens, self.batch_size, self.context_length, device="cpu", generator=g)  # (B, T)
        window = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1): y is x shifted by one
        if self.objective == "causal":
            batch = objectives.causal_lm_batch(window)
        elif self.objective == "prefix":
            batch = objectives.prefix_lm_batch(window, generator=g, ignore_index=IGNORE_INDEX)
        else:
            batch = objectives.masked_lm_batch(x, self.mask_id, self.vocab_size, special_ids=self.special_ids,
                                               generator=g, ignore_index=IGNORE_INDEX)
        move = (lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v)
        return ObjectiveBatch(batch.inputs.to(self.device), batch.targets.to(self.device),
                              {k: move(v) for k, v in batch.attention.items()})


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H(p) in nats of the token frequencies p: the cross-entropy of the best context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------
# the pieces of one optimizer step


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for precision 'bf16'; a no-op context for 'fp32'."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=(precision == "bf16"))


def batch_loss_sum(model: GPT, batch: ObjectiveBatch, precision: str = "fp32") -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the scored tokens of one micro-batch (inputs, targets
    (B, T)), a 0-d tensor."""
    with autocast_context(batch.inputs.device, precision):
        _, loss_sum = model(batch.inputs, batch.targets, ignore_index=IGNORE_INDEX, reduction="sum",
                            **batch.attention)
    return loss_sum.to(torch.promote_types(loss_sum.dtype, torch.float32))  # bf16 -> fp32; fp64 stays


def accumulate_gradients(model: GPT, micro_batches: list[ObjectiveBatch], precision: str = "fp32") -> tuple[float, int]:
    """Backward through k micro-batches (inputs, targets (B, T) each) so that the summed .grad equals
    that of one big batch (k*B, T).

    Each micro-batch contributes sum_tokens(loss) / N, N = scored tokens in *all* k micro-batches:
    sum_i (S_i / N) = (sum_i S_i) / N, the big batch's mean. Returns (mean loss, N).
    """
    n_total = sum(n_targets(b) for b in micro_batches)
    if n_total == 0:
        raise ValueError("no scored tokens in this optimizer step (every target is ignore_index)")
    total = 0.0
    for b in micro_batches:
        loss_sum = batch_loss_sum(model, b, precision)
        (loss_sum / n_total).backward()
        total += float(loss_sum.detach())
    return total / n_total, n_total


@dataclass
class StepResult:
    """What one optimizer step reports."""
    loss: float
    grad_norm: float  # global L2 norm before clipping
    n_tokens: int
    lr: float


def optimizer_step(model: GPT, optimizer: torch.optim.Optimizer, micro_batches: list[ObjectiveBatch], *, lr: float,
                   grad_clip: float = 1.0, precision: str = "fp32", step: int = 0,
                   last_good: Path | None = None) -> StepResult:
    """One full step: set the LR, accumulate gradients, check the loss, clip, update, zero the grads.

    A non-finite loss or gradient norm raises ``NonFiniteLossError`` (naming ``step`` and
    ``last_good``) *before* the update, so neither the weights nor the last checkpoint are touched.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, n_tokens = accumulate_gradients(model, micro_batches, precision)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)  # drop the poisoned gradients with the step
        check_finite(loss, step, last_good)  # raises, naming the step and the last good checkpoint
    grad_norm = clip_grad_norm(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        check_finite(grad_norm, step, last_good)  # raises, naming the gradient norm's value
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, float(grad_norm), n_tokens, lr)


def train_steps(model: GPT, optimizer: torch.optim.Optimizer, source: BatchSource, steps: range,
                lr_at: Callable[[int], float], *, grad_accum: int = 1, grad_clip: float = 1.0,
                precision: str = "fp32") -> list[StepResult]:
    """Run optimizer steps ``steps`` (absolute step numbers, so a resumed range continues the data
    and the schedule) with micro-batches step*grad_accum .. step*grad_accum + grad_accum - 1."""
    return [optimizer_step(model, optimizer, [source.micro_batch(s * grad_accum + i) for i in range(grad_accum)],
                           lr=lr_at(s), grad_clip=grad_clip, precision=precision, step=s) for s in steps]


@torch.no_grad()
def evaluate(model: GPT, source: BatchSource, n_batches: int, precision: str = "fp32") -> float:
    """Token-weighted mean loss over micro-batches 0..n_batches-1 of ``source`` (the same every call):
    sum of token losses / number of scored tokens, over all (B, T) batches together."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(n_batches):
        b = source.micro_batch(i)
        total += float(batch_loss_sum(model, b, precision))
        count += n_targets(b)
    model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------
# data and tokenizer on disk, sampling


def load_data(smoke: bool = False, data_dir: str | None = None) -> tuple[Path, Tokenizer, np.ndarray, np.ndarray]:
    """(data dir, tokenizer, train tokens, val tokens), building them with ch2_data if missing, and
    checking that shards and tokenizer agree on the vocabulary."""
    from minilife.chapters.ch2_data import ensure_data

    data_dir = Path(ensure_data(smoke=smoke, data_dir=data_dir)).resolve()
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    shards = data_dir / "shards"
    meta = read_meta(shards)
    if int(meta["vocab_size"]) != tokenizer.vocab_size:
        raise ValueError(f"{shards / 'meta.json'}: shards were packed with vocab_size={meta['vocab_size']} "
                         f"but {data_dir / 'tokenizer.json'} has vocab_size={tokenizer.vocab_size}; "
                         f"rebuild the data with ch2_data")
    train, val = load_tokens(shards, "train"), load_tokens(shards, "val")
    top = int(max(train.max(), val.max()))
    if top >= tokenizer.vocab_size:
        raise ValueError(f"{shards}: token id {top} >= tokenizer vocab_size {tokenizer.vocab_size}")
    return data_dir, tokenizer, train, val


def mlm_mask_id(tokenizer: Tokenizer) -> int:
    """The id MLM puts in place of a masked token: a '<|mask|>' special if the tokenizer has one,
    else the end-of-text id (a token the model never has to predict inside a window)."""
    specials = tokenizer.special_tokens or {}
    if "<|mask|>" in specials:
        return specials["<|mask|>"]
    if tokenizer.eot_id is None:
        raise ValueError("MLM needs a mask token: the tokenizer has neither <|mask|> nor <|endoftext|>")
    return tokenizer.eot_id


@torch.no_grad()
def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """Decode ``max_new_tokens`` sampled after ``prompt`` (temperature 0.8, top-k 40, seeded)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [0])
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T0)
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=0.8, top_k=40, generator=g)  # (1, T0 + n)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())

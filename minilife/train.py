"""What every training chapter builds its loop from: batches, the summed loss, evaluation, sampling.

The chapters write their loops out (forward, loss, ``backward()``, clipping, the optimizer and
schedule step are in the chapter's text); this module holds what those loops share:
- ``BatchSource``: micro-batch ``i`` is a pure function of (seed, stream, i) -- random windows shaped
  for the causal, prefix or masked objective (``minilife.model.objectives``). The data position of
  a run is then one integer, and a resumed run sees exactly the batches it would have seen.
- ``n_targets`` / ``batch_loss_sum``: the scored tokens of a micro-batch and the *summed* (not
  averaged) cross-entropy over them, under bf16 autocast if asked. Dividing each micro-batch's sum
  by the scored tokens of the whole optimizer step gives exactly the big batch's mean-loss gradient,
  ragged micro-batches included (chapter 5.3 shows the naive per-micro-batch mean going wrong).
- ``evaluate``: token-weighted mean loss on fixed batches; ``unigram_entropy``: the loss of the best
  model that ignores context, H(p) = -sum_v p_v ln p_v over the training tokens' frequencies.
- ``sample_text``: a seeded sample continuation of a prompt; ``mlm_mask_id``: the MLM's [MASK] id.
- ``epoch_batch``: for loops over a list of examples (pairs, conversations), the indices of step k's
  batch: a seeded permutation per epoch, cut in batches (the last one of an epoch may be short), so
  a resumed run sees exactly the batches it would have seen.

What it leaves out: data loading in background workers (the token arrays are memory-mapped and a
batch is a few slices), distributed samplers, a Trainer class (the loop belongs to the chapter).
"""
from __future__ import annotations

import numpy as np
import torch

from minilife.data.bpe import Tokenizer
from minilife.data.pack import get_batch
from minilife.model import objectives
from minilife.model.objectives import ObjectiveBatch

IGNORE_INDEX = -100
OBJECTIVES = ("causal", "prefix", "mlm")


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
        if objective == "mlm" and (mask_id is None or vocab_size is None):
            raise ValueError("objective 'mlm' needs mask_id and vocab_size")
        self.tokens, self.batch_size, self.context_length = tokens, batch_size, context_length
        self.objective, self.seed, self.stream, self.device = objective, seed, stream, torch.device(device)
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


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for precision 'bf16'; a no-op context for 'fp32'."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=(precision == "bf16"))


def batch_loss_sum(model: torch.nn.Module, batch: ObjectiveBatch, precision: str = "fp32") -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the scored tokens of one micro-batch (inputs, targets
    (B, T)), a 0-d tensor in fp32 (or fp64 for a float64 model)."""
    with autocast_context(batch.inputs.device, precision):
        _, loss_sum = model(batch.inputs, batch.targets, ignore_index=IGNORE_INDEX, reduction="sum",
                            **batch.attention)
    return loss_sum.to(torch.promote_types(loss_sum.dtype, torch.float32))  # bf16 -> fp32; fp64 stays


@torch.no_grad()
def evaluate(model: torch.nn.Module, source: BatchSource, n_batches: int, precision: str = "fp32") -> float:
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
def sample_text(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """Decode ``max_new_tokens`` sampled after ``prompt`` (temperature 0.8, top-k 40, seeded)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [0])
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.8, top_k=40, generator=g)
    return tokenizer.decode(out.tokens[0].tolist())  # (1, T0 + n) -> text


def epoch_batch(step: int, n_items: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices (b,) long of step ``step``'s batch over ``n_items`` examples: epoch e = step // ceil(n / bs)
    shuffles with a generator seeded by (seed, e), and the step takes its slice of that permutation."""
    if n_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"need n_items >= 1, batch_size >= 1 and step >= 0, got {n_items}, {batch_size}, {step}")
    steps_per_epoch = -(-n_items // batch_size)  # ceil
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # (n,)
    return perm[k * batch_size:(k + 1) * batch_size]

"""Supervised fine-tuning data: chat JSONL, encoding with truncation, padded and packed batches, the summed loss.

What it implements
- ``read_chat_jsonl`` / ``write_chat_jsonl``: one {"messages": [{"role", "content"}, ...]} object per
  line; every error names ``file:line`` (``skip_bad`` skips and counts bad lines instead).
- ``encode_conversation`` / ``encode_dataset``: ``minilife.align.chat.render_chat`` cut to ``max_len``
  tokens (the head is kept); an example whose every trained token was cut is dropped and counted.
- ``pad_batch`` (right or left padding) and ``pack_batch`` (several conversations per row, best fit
  decreasing, a block-diagonal causal mask and positions restarting at 0 per conversation, so a packed token sees
  exactly what it would see alone: Krell et al. 2021, "Efficient Sequence Packing without
  Cross-contamination"). Both give an ``SFTBatch``; labels are the next token where the loss mask
  says so and IGNORE_INDEX elsewhere, so no label ever crosses from one conversation into the next.
- ``sft_loss_sum``: the *summed* cross-entropy of a batch and its trained-token count. The SFT loss is
  the token-weighted mean L = (1/N) sum_i -log p(y_i | y_<i) over the N trained tokens of the whole
  optimizer step, so with accumulation each micro-batch contributes loss_sum / N_step:

      micro, n_step = split_step(step_examples, micro_batch_size, pad_id)
      for mb in micro:
          loss_sum, _ = sft_loss_sum(model, mb.to(device))
          (loss_sum / n_step).backward()

  which equals one big batch's mean exactly (a per-micro-batch mean would weight ragged batches wrong).
- ``sft_eval_loss``: the same token-weighted mean over fixed batches, without gradients (the val loss).
Every batch holds at least one trained token: an empty one raises instead of giving a silent 0 or NaN.

What it leaves out: loading in background workers, length-grouped sampling, training the prompt
tokens too (a variant some papers use), the training loop itself (the chapter's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from minilife.align.chat import CHAT_TEMPLATE, ChatTemplate, check_messages, render_chat
from minilife.common import write_jsonl_atomic
from minilife.data.bpe import Tokenizer
from minilife.data.checks import read_records
from minilife.train import IGNORE_INDEX

Conversation = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


@dataclass(frozen=True, eq=False)
class SFTExample:
    """One encoded conversation: ids (T,) long, loss_mask (T,) bool (True = trained), whether it was
    truncated, and the messages it was encoded from (the same list object, to trace it back)."""
    ids: torch.Tensor
    loss_mask: torch.Tensor
    truncated: bool = False
    messages: Conversation | None = None

    def __post_init__(self):
        if self.ids.dim() != 1 or self.ids.shape != self.loss_mask.shape or self.loss_mask.dtype != torch.bool:
            raise ValueError(f"SFTExample needs ids (T,) and a bool loss_mask (T,), got ids {tuple(self.ids.shape)}, "
                             f"loss_mask {self.loss_mask.dtype} {tuple(self.loss_mask.shape)}")

    @property
    def n_trained(self) -> int:
        """Trained tokens that can be a label: token 0 has no predecessor to predict it."""
        return int(self.loss_mask[1:].sum())


@dataclass(frozen=True, eq=False)
class SFTBatch:
    """input_ids, labels (B, T) long (labels = next token or IGNORE_INDEX); padding_mask (B, T) bool
    (True = real token); packed only (None when padded): attn_mask (B, T, T) bool, positions (B, T) long."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    padding_mask: torch.Tensor
    attn_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def to(self, device) -> "SFTBatch":
        return SFTBatch(*(None if t is None else t.to(device) for t in
                          (self.input_ids, self.labels, self.padding_mask, self.attn_mask, self.positions)))

    @property
    def n_trained(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------- JSONL

def read_chat_jsonl(path, *, skip_bad: bool = False) -> tuple[list[Conversation], int]:
    """Conversations of a chat JSONL file and how many bad lines were skipped. A bad line (not UTF-8, not
    JSON, no "messages", a bad message, see ``message_errors``) raises ValueError("file:line: ...") unless
    ``skip_bad``; a file without any conversation is an error either way. Blank lines are ignored."""
    return read_records(path, _conversation, skip_bad=skip_bad, what="conversations")


def _conversation(row, where: str) -> Conversation:
    """One line's {"messages": [...]} checked -> the list of {"role", "content"} messages."""
    if not isinstance(row, dict) or "messages" not in row:
        raise ValueError(f'{where}: expected an object with a "messages" list')
    check_messages(row["messages"], where)
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


def write_chat_jsonl(path, conversations: Sequence[Conversation]) -> Path:
    """Write conversations as {"messages": [...]} lines (atomically), readable by ``read_chat_jsonl``."""
    for i, messages in enumerate(conversations):
        check_messages(messages, f"conversation {i}")
    return write_jsonl_atomic(path, ({"messages": list(m)} for m in conversations))


# ---------------------------------------------------------------------------------------- encoding

def encode_conversation(tokenizer: Tokenizer, messages: Conversation, max_len: int,
                        template: ChatTemplate = CHAT_TEMPLATE) -> SFTExample:
    """Render a conversation and keep its first ``max_len`` tokens (truncated=True if any were cut).
    The model reads max_len - 1 of them (the last token is only a label): max_len = context_length + 1
    fills the context. The result may have no trained token left; ``encode_dataset`` drops those."""
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 (an input and its label), got {max_len!r}")
    ids, mask = render_chat(tokenizer, messages, template)
    return SFTExample(torch.tensor(ids[:max_len], dtype=torch.long), torch.tensor(mask[:max_len], dtype=torch.bool),
                      truncated=len(ids) > max_len, messages=messages)


def encode_dataset(tokenizer: Tokenizer, conversations: Sequence[Conversation], max_len: int,
                   template: ChatTemplate = CHAT_TEMPLATE) -> tuple[list[SFTExample], dict[str, int]]:
    """Encode every conversation; drop those truncated down to no trained token. Returns (examples in
    the input order, counts {"kept", "truncated" (of the kept), "dropped"})."""
    encoded = [encode_conversation(tokenizer, m, max_len, template) for m in conversations]
    kept = [e for e in encoded if e.n_trained > 0]
    if not kept:
        raise ValueError(f"encode_dataset: none of the {len(encoded)} conversations keeps a trained token "
                         f"within max_len={max_len}")
    return kept, {"kept": len(kept), "truncated": sum(e.truncated for e in kept), "dropped": len(encoded) - len(kept)}


# ---------------------------------------------------------------------------------------- batches

def _inputs_and_labels(examples: Sequence[SFTExample], where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: inputs ids[:-1] and labels (next token where trained, else IGNORE_INDEX), (T-1,) each."""
    if not examples or not all(isinstance(e, SFTExample) for e in examples):
        raise ValueError(f"{where}: needs a non-empty list of SFTExample")
    if sum(e.n_trained for e in examples) == 0:
        raise ValueError(f"{where}: these {len(examples)} examples hold no trained token; the loss would be 0/0")
    short = next((i for i, e in enumerate(examples) if len(e.ids) < 2), None)
    if short is not None:
        raise ValueError(f"{where}: example {short} has {len(examples[short].ids)} token(s); it needs 2 or more")
    return [(e.ids[:-1], torch.where(e.loss_mask[1:], e.ids[1:], IGNORE_INDEX)) for e in examples]


def pad_batch(examples: Sequence[SFTExample], pad_id: int, side: str = "right") -> SFTBatch:
    """One row per example, padded with ``pad_id`` on ``side`` to the longest: (B, T - 1) with T the
    longest example. Positions are left to the GPT's default (each row's real tokens count from 0)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    pairs = _inputs_and_labels(examples, "pad_batch")
    B, T = len(pairs), max(len(x) for x, _ in pairs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    padding_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (x, y) in enumerate(pairs):
        cols = slice(0, len(x)) if side == "right" else slice(T - len(x), T)
        input_ids[b, cols], labels[b, cols], padding_mask[b, cols] = x, y, True
    return SFTBatch(input_ids, labels, padding_mask)


def pack_batch(examples: Sequence[SFTExample], max_len: int, pad_id: int) -> SFTBatch:
    """Several examples per row (best fit decreasing: longest first, each into the fullest row it fits),
    each example's max_len - 1 input positions kept together. Rows are (B, T) with T the fullest row
    (<= max_len - 1), padded at the end.
    attn_mask (B, T, T): token i sees token j iff j <= i in the same example (the trailing padding is
    a block of its own, so every row of the mask allows a key); positions restart at 0 per example."""
    pairs = _inputs_and_labels(examples, "pack_batch")
    capacity = max_len - 1
    long = next((i for i, (x, _) in enumerate(pairs) if len(x) > capacity), None)
    if long is not None:
        raise ValueError(f"pack_batch: example {long} has {len(pairs[long][0]) + 1} tokens > max_len={max_len}; "
                         f"encode with the same max_len")
    rows: list[list[int]] = []  # indices of the examples in each row
    fill: list[int] = []
    for i in sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0])):  # best fit decreasing: longest first,
        x = pairs[i][0]  # each into the row it fills most tightly
        fits = [r for r, used in enumerate(fill) if used + len(x) <= capacity]
        r = min(fits, key=lambda r: capacity - fill[r]) if fits else len(rows)
        if r == len(rows):  # no row has room: open a new one
            rows.append([])
            fill.append(0)
        rows[r].append(i)
        fill[r] += len(x)
    B, T = len(rows), max(fill)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which example of the row; -1 = trailing padding
    for r, members in enumerate(rows):
        start = 0
        for s, i in enumerate(members):
            x, y = pairs[i]
            cols = slice(start, start + len(x))
            input_ids[r, cols], labels[r, cols], segment[r, cols] = x, y, s
            positions[r, cols] = torch.arange(len(x))
            start += len(x)
    same_example = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): j <= i
    return SFTBatch(input_ids, labels, segment >= 0, same_example & causal, positions)


def collate(examples: Sequence[SFTExample], pad_id: int, *, pack_len: int | None = None,
            side: str = "right") -> SFTBatch:
    """``pack_batch(examples, pack_len, pad_id)`` when ``pack_len`` is given, else ``pad_batch``."""
    return pad_batch(examples, pad_id, side) if pack_len is None else pack_batch(examples, pack_len, pad_id)


def sft_loss_sum(model, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """(sum of -log p over the batch's trained tokens (scalar tensor), number of trained tokens).
    Divide by the trained tokens of the whole optimizer step (see the module docstring)."""
    n_trained = batch.n_trained
    if n_trained == 0:
        raise ValueError("sft_loss_sum: the batch has no trained token (all labels are IGNORE_INDEX)")
    _, loss_sum = model(batch.input_ids, batch.labels, padding_mask=batch.padding_mask, positions=batch.positions,
                        attn_mask=batch.attn_mask, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, n_trained


def split_step(examples: Sequence[SFTExample], micro_batch_size: int, pad_id: int, *,
               pack_len: int | None = None, side: str = "right") -> tuple[list[SFTBatch], int]:
    """One optimizer step's examples as micro-batches of ``micro_batch_size`` examples, and the step's
    trained-token count N_step to divide every micro-batch's loss sum by."""
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    groups = [examples[i:i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    # exercise: grad_accumulation
    micro = [collate(g, pad_id, pack_len=pack_len, side=side) for g in groups]
    return micro, sum(mb.n_trained for mb in micro)
    # end exercise: grad_accumulation


def sft_eval_loss(model, batches: Sequence[SFTBatch]) -> float:
    """Token-weighted mean loss over fixed batches (sum of token losses / trained tokens), in eval mode,
    without gradients; the model's mode is restored."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            loss_sum, n = sft_loss_sum(model, batch)
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)

"""Preference pairs as token batches: what the DPO family (and a pairwise reward model) trains on.

What it implements
- ``encode_pair``: a ``data.preferences.Preference`` rendered twice with the chat template
  (``align.sft.encode_conversation``, i.e. ``align.chat.render_chat``): prompt messages + chosen as the
  assistant turn, and prompt + rejected. The response mask is render_chat's loss mask: True exactly on
  the assistant's content tokens and its closing <|end|>. Both are cut to ``max_len`` tokens (the head
  is kept); a pair is dropped when either response keeps no scorable token (token 0 has no predecessor,
  so it never counts), never scored on an empty response.
- ``encode_pairs``: every pair of a list, with counts {"kept", "truncated" (of the kept), "dropped"}.
- ``collate_pairs``: B pairs -> one right-padded ``PairBatch`` of 2B rows, chosen rows 0..B-1 first,
  then the rejected rows B..2B-1, so one forward pass scores both sides
  (``pair_logprobs`` -> chosen (B,), rejected (B,) sequence log-probs, summed or length-averaged).

What it leaves out: packing several pairs per row, sharing the prompt's forward pass between the two
sides (prefix sharing), multi-turn prompts with several assistant turns scored, and length-grouped batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from minilife.align.dpo import model_sequence_logprobs
from minilife.align.sft import encode_conversation
from minilife.data.bpe import Tokenizer

if TYPE_CHECKING:  # data.preferences imports align.chat: a runtime import here would be circular
    from minilife.data.preferences import Preference


def prompt_messages(pair: Preference) -> list[dict[str, str]]:
    """The pair's prompt as chat messages (a text prompt becomes one user turn)."""
    return [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else list(pair.prompt)


@dataclass(frozen=True, eq=False)
class EncodedPair:
    """chosen_ids / chosen_mask (Tc,), rejected_ids / rejected_mask (Tr,): long ids and bool response
    masks; ``truncated`` if either side was cut; ``pair`` the Preference it came from."""
    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor
    truncated: bool
    pair: Preference | None = None

    @property
    def scorable(self) -> bool:
        """Both responses keep at least one token with a predecessor (a log-prob to sum)."""
        return bool(self.chosen_mask[1:].any()) and bool(self.rejected_mask[1:].any())


def encode_pair(tokenizer: Tokenizer, pair: Preference, max_len: int) -> EncodedPair:
    """Render prompt + chosen and prompt + rejected, each cut to ``max_len`` tokens (the model's context)."""
    messages = prompt_messages(pair)
    c = encode_conversation(tokenizer, messages + [{"role": "assistant", "content": pair.chosen}], max_len)
    r = encode_conversation(tokenizer, messages + [{"role": "assistant", "content": pair.rejected}], max_len)
    return EncodedPair(c.ids, c.loss_mask, r.ids, r.loss_mask, c.truncated or r.truncated, pair)


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[Preference],
                 max_len: int) -> tuple[list[EncodedPair], dict[str, int]]:
    """Encode every pair, dropping those with a response cut away entirely. Returns (kept pairs in the
    input order, counts {"kept", "truncated" (of the kept), "dropped"}); no pair kept is a ValueError."""
    encoded = [encode_pair(tokenizer, p, max_len) for p in pairs]
    kept = [e for e in encoded if e.scorable]
    if not kept:
        raise ValueError(f"encode_pairs: none of the {len(encoded)} pairs keeps a response token within "
                         f"{max_len} tokens")
    return kept, {"kept": len(kept), "truncated": sum(e.truncated for e in kept), "dropped": len(encoded) - len(kept)}


@dataclass(frozen=True, eq=False)
class PairBatch:
    """input_ids (2B, T) long, padding_mask (2B, T) bool (True = real), response_mask (2B, T) bool;
    rows 0..B-1 are the chosen sides, rows B..2B-1 the rejected sides of the same pairs."""
    input_ids: torch.Tensor
    padding_mask: torch.Tensor
    response_mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.padding_mask.to(device), self.response_mask.to(device))


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int) -> PairBatch:
    """B encoded pairs -> a PairBatch of 2B right-padded rows (chosen first, then rejected)."""
    if not pairs or not all(isinstance(p, EncodedPair) for p in pairs):
        raise ValueError("collate_pairs needs a non-empty list of EncodedPair")
    rows = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (2B, T)
    padding_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (2B, T)
    response_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (2B, T)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)], padding_mask[i, :len(ids)], response_mask[i, :len(ids)] = ids, True, mask
    return PairBatch(input_ids, padding_mask, response_mask)


def pair_logprobs(model, batch: PairBatch, *, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) sequence log-probs of the responses, from one forward pass of 2B rows."""
    logps = model_sequence_logprobs(model, batch.input_ids, batch.padding_mask, batch.response_mask,
                                    average=average)  # (2B,)
    return logps[:batch.n_pairs], logps[batch.n_pairs:]

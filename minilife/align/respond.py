"""Answering chat prompts with a model: the serving side of the chat template, batched.

What it implements
- ``respond(model, tokenizer, conversations, max_new_tokens)``: each conversation (ending with a user
  turn) is rendered with ``align.chat.render_prompt`` (the exact training template plus the
  assistant marker), prompts of similar length are batched together (left-padded by
  ``GPT.generate``, KV cache on), each row stops at the end-of-turn token or at the end of the
  model's context (an answer never slides the window past its own prompt), and the answers come back
  as text in the input order, without the stop token. A prompt longer than the context keeps its
  last context_length - 1 tokens.
- ``score_answers``: answers to the world's task examples, scored by their checker (the gold scorer
  of ``data.shadowing_checks``): what chapter 3 reports before and after SFT, and chapter 4 reuses.

What it leaves out: streaming, beam search, stop strings, and batching by a token budget.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from minilife.align.chat import chat_token_ids, render_prompt
from minilife.data.bpe import Tokenizer
from minilife.data.shadowing_checks import score_responses


def respond(model: torch.nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]],
            max_new_tokens: int, *, batch_size: int = 32, temperature: float = 0.0, top_k: int | None = None,
            generator: torch.Generator | None = None) -> list[str]:
    """One answer (str) per conversation; greedy by default (temperature 0)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need batch_size >= 1 and max_new_tokens >= 1, got {batch_size}, {max_new_tokens}")
    stop, T = chat_token_ids(tokenizer).end, model.cfg.context_length
    prompts = [render_prompt(tokenizer, messages)[-(T - 1):] for messages in conversations]  # keep room for 1 token
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        room = [T - len(prompts[i]) for i in rows]  # each answer stops at its own context end: no sliding window
        gen = model.generate([prompts[i] for i in rows], min(max_new_tokens, max(room)), temperature=temperature,
                             top_k=top_k, generator=generator, eos_id=stop, pad_id=stop)
        for r, i in enumerate(rows):
            new = gen.tokens[r][gen.completion_mask[r]].tolist()[:room[r]]  # (n_new,) the answer, stop id included
            answers[i] = tokenizer.decode(new[:-1] if new and new[-1] == stop else new)
    return answers


def score_answers(model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence, max_new_tokens: int, *,
                  batch_size: int = 32) -> tuple[dict, list[str]]:
    """Greedy answers to the world's task examples (``data.shadowing.Example``; their last, assistant turn
    removed) scored by the task checker: (``score_responses``' dict, the answers)."""
    answers = respond(model, tokenizer, [e.messages[:-1] for e in examples], max_new_tokens, batch_size=batch_size)
    return score_responses(examples, answers), answers

"""Rollouts for reinforcement learning on a chat model: sample answers with the KV cache, then score them.

What it implements
- ``sample_rollouts(model, tokenizer, conversations, max_new_tokens)``: each conversation (ending with a
  user turn) is rendered with ``align.chat.render_prompt``; ``samples_per_prompt`` answers per prompt
  (adjacent rows: GRPO's group) are sampled in padded batches by ``GPT.generate`` (left-padded prompts,
  KV cache on, each row stopping at ``<|end|>``), at ``temperature``. A prompt keeps its last
  ``context_length - max_new_tokens`` tokens, so prompt + answer always fit the context and are scored
  in one pass. The result, a ``Rollout``, is re-laid out right-padded: [prompt][answer][pad].
- ``rollout_logprobs(model, rollout, temperature)``: log pi(a_t | s_t) of every sampled token (and the
  entropy of the distribution it was drawn from) in one forward pass, with the logits divided by the
  SAME temperature as in sampling: the ratio and the KL of PPO compare the distribution the tokens were
  really drawn from (a mismatch is a classic silent RLHF bug).

Both sides of the RL step use the same layout: PPO's old log-probs, the reference's, the value head's
inputs and the reward model's (read at the last real token) all come from ``Rollout.tokens``.
What it leaves out: stop strings, nucleus (top-p) sampling, vLLM-style continuous batching, and
multi-turn rollouts (one assistant turn per prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from minilife.align.chat import chat_token_ids, render_prompt
from minilife.align.logprobs import scored_mask, token_entropy, token_logprobs
from minilife.data.bpe import Tokenizer

__all__ = ["Rollout", "rollout_logprobs", "sample_rollouts"]


@dataclass
class Rollout:
    """Sampled answers, right-padded. tokens (B, W) long: prompt, answer (stop token included), pad;
    padding_mask (B, W) bool: real tokens; response_mask (B, W) bool: the sampled tokens; ended (B,) bool:
    the answer ended with the stop token (False: cut at max_new_tokens); prompt_index (B,) long: the
    conversation each row answers; texts: the answers decoded, without the stop token."""
    tokens: torch.Tensor
    padding_mask: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    prompt_index: torch.Tensor
    texts: list[str]

    def to(self, device) -> "Rollout":
        return Rollout(self.tokens.to(device), self.padding_mask.to(device), self.response_mask.to(device),
                       self.ended.to(device), self.prompt_index.to(device), self.texts)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) long: sampled tokens per row, the stop token included."""
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The rollout restricted to ``rows`` (a (b,) long index tensor), e.g. a PPO minibatch."""
        keep = rows.tolist()
        return Rollout(self.tokens[rows], self.padding_mask[rows], self.response_mask[rows], self.ended[rows],
                       self.prompt_index[rows], [self.texts[i] for i in keep])


def sample_rollouts(model: torch.nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]],
                    max_new_tokens: int, *, samples_per_prompt: int = 1, temperature: float = 1.0,
                    top_k: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
                    batch_size: int | None = None) -> Rollout:
    """``samples_per_prompt`` sampled answers per conversation -> ``Rollout`` with B = len(conversations) *
    samples_per_prompt rows (a prompt's samples adjacent). ``batch_size`` rows are generated at once
    (default: all). temperature 0 is greedy; the model's train/eval mode is restored after."""
    T = model.cfg.context_length
    for ok, problem in ((1 <= max_new_tokens < T, f"max_new_tokens must be in [1, context_length = {T}), "
                                                  f"got {max_new_tokens}"),
                        (samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {samples_per_prompt}"),
                        (temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),  # NaN fails
                        (batch_size is None or batch_size >= 1, f"batch_size must be None or >= 1, got {batch_size}"),
                        (len(conversations) > 0, "conversations is empty: need at least one")):
        if not ok:
            raise ValueError(f"sample_rollouts: {problem}")
    stop = chat_token_ids(tokenizer).end
    prompts = [render_prompt(tokenizer, m)[-(T - max_new_tokens):] for m in conversations]  # prompt + answer <= T
    index = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    step = batch_size or len(index)
    rows: list[tuple[list[int], list[int], bool]] = []  # (prompt ids, answer ids with stop, ended)
    for start in range(0, len(index), step):
        chunk = index[start:start + step]
        gen = model.generate([prompts[i] for i in chunk], max_new_tokens, temperature=temperature, top_k=top_k,
                             use_cache=use_cache, generator=generator, eos_id=stop, pad_id=stop)
        for r, i in enumerate(chunk):
            answer = gen.tokens[r][gen.completion_mask[r]].tolist()  # (n_new,)
            rows.append((prompts[i], answer, bool(answer) and answer[-1] == stop))
    W = max(len(p) + len(a) for p, a, _ in rows)
    tokens = torch.full((len(rows), W), stop, dtype=torch.long)  # (B, W)
    padding_mask = torch.zeros(len(rows), W, dtype=torch.bool)
    response_mask = torch.zeros(len(rows), W, dtype=torch.bool)
    for r, (p, a, _) in enumerate(rows):
        tokens[r, :len(p) + len(a)] = torch.tensor(p + a)
        padding_mask[r, :len(p) + len(a)] = True
        response_mask[r, len(p):len(p) + len(a)] = True
    texts = [tokenizer.decode(a[:-1] if ended else a) for _, a, ended in rows]
    device = next(model.parameters()).device
    return Rollout(tokens, padding_mask, response_mask, torch.tensor([e for *_, e in rows]),
                   torch.tensor(index), texts).to(device)


def rollout_logprobs(model: torch.nn.Module, rollout: Rollout, *, temperature: float = 1.0,
                     with_entropy: bool = False):
    """log pi(token) of each sampled token under softmax(logits / temperature), from one forward pass:
    (B, W), exactly 0 off the response; with ``with_entropy`` also the entropy (B, W) of those
    distributions. Differentiable: the caller chooses no_grad (old/reference log-probs) or not (the loss)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score samples (greedy answers have no log-probs to "
                         f"compare); got {temperature}")
    tokens, real = rollout.tokens, rollout.padding_mask
    scored = scored_mask(tokens, real, rollout.response_mask)[:, 1:]  # (B, W-1)
    logits, _ = model(tokens, padding_mask=real)  # (B, W, V)
    logits = logits[:, :-1] / temperature  # (B, W-1, V): position t - 1 predicts token t
    logprobs = F.pad(token_logprobs(logits, tokens[:, 1:], scored), (1, 0))  # (B, W-1) -> (B, W)
    return (logprobs, F.pad(token_entropy(logits, scored), (1, 0))) if with_entropy else logprobs

"""The RL policy of chapter 4: a chat model with a value head on its own trunk, and the per-row rewards
of its rollouts.

What it implements
- ``PolicyWithValue``: a GPT (the actor) and ``ppo.ValueHead`` (the critic) on the GPT's final hidden
  states, as in Ziegler et al. 2019 / InstructGPT-style PPO code (trl's ``AutoModelForCausalLMWithValueHead``):
  one forward pass gives the next-token logits and the values. The critic sharing the actor's trunk is
  the cheap choice (one trunk in memory, one forward pass for both); its cost is that the value loss
  also moves the trunk the policy stands on, which ``vf_coef`` weighs. A separate value model (e.g. a
  copy of the reward model) is the other common choice: twice the compute for a cleaner critic. The
  head starts at V = 0 everywhere (zero weights), the mean of a reward normalised on SFT samples, so
  the first advantages are the rewards themselves rather than noise from a random head.
- ``policy_outputs(policy, rollout, temperature)``: for every sampled token a_t of a ``rollout.Rollout``
  (right-padded [prompt][answer][pad]), from ONE forward pass: log pi(a_t | s_t) under softmax(logits /
  temperature) (the same temperature as in sampling), the entropy of that distribution, and the value
  V(s_t) of the state the token was drawn in. All three sit in the token's column t and are read from
  position t - 1 (the prefix before a_t), so logprobs[:, t], values[:, t] and the PPO rewards at t
  describe the same action; everything off the response is exactly 0.
- ``rollout_rewards(reward_model, rollout, mean, std, missing_eos_penalty)``: the sequence score of each
  row, the reward model read at the row's last real token (``reward.RewardModel``), normalised as
  (r - mean) / std with the reward model's statistics on SFT samples, minus ``missing_eos_penalty`` for
  answers cut at the length cap without <|end|> (trl's ``missing_eos_penalty``): without it a policy can
  learn that rambling to the cap is never punished by a reward model that only saw finished answers.

What it leaves out: the PPO/GRPO losses (ppo.py, grpo.py), sampling (rollout.py), separate value models,
and reward-model ensembles or clipping of the score.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilife.align.logprobs import scored_mask, token_entropy, token_logprobs
from minilife.align.ppo import ValueHead
from minilife.align.rollout import Rollout

__all__ = ["PolicyOutputs", "PolicyWithValue", "policy_outputs", "rollout_rewards"]


class PolicyWithValue(nn.Module):
    """A GPT and a value head on its final hidden states: (idx (B, T), padding_mask (B, T)) ->
    (logits (B, T, V), values (B, T)). ``gpt`` is the policy itself (sample and export it alone)."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        if not hasattr(gpt, "hidden") or not hasattr(gpt, "lm_head"):
            raise TypeError(f"PolicyWithValue needs a GPT (with .hidden and .lm_head), got {type(gpt).__name__}")
        self.gpt = gpt
        self.value_head = ValueHead(gpt.cfg.n_embd)
        nn.init.zeros_(self.value_head.proj.weight)  # V = 0 at the start: the mean of a normalised reward

    @property
    def cfg(self):
        return self.gpt.cfg

    def forward(self, idx: torch.Tensor, padding_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.gpt.hidden(idx, padding_mask=padding_mask)  # (B, T, C)
        return self.gpt.lm_head(h), self.value_head(h)  # (B, T, V), (B, T)


class PolicyOutputs(NamedTuple):
    """``policy_outputs``' result, each (B, W) aligned with ``Rollout.tokens``, exactly 0 off the scored
    response tokens: logprobs log pi(a_t | s_t), entropy H(pi(. | s_t)), values V(s_t)."""
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor


def policy_outputs(policy: PolicyWithValue, rollout: Rollout, *, temperature: float = 1.0,
                   with_entropy: bool = False) -> PolicyOutputs:
    """Log-probs, (entropies) and values of the rollout's sampled tokens from one forward pass; see the
    module docstring. Differentiable: the caller picks no_grad (old values and log-probs) or not (the loss)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score samples, got {temperature}")
    tokens, real = rollout.tokens, rollout.padding_mask  # (B, W) each
    scored = scored_mask(tokens, real, rollout.response_mask)[:, 1:]  # (B, W-1): column t+1 is scored from t
    logits, values = policy(tokens, padding_mask=real)  # (B, W, V), (B, W)
    logits = logits[:, :-1] / temperature  # (B, W-1, V): position t - 1 predicts token t
    logprobs = F.pad(token_logprobs(logits, tokens[:, 1:], scored), (1, 0))  # (B, W-1) -> (B, W)
    values = F.pad(torch.where(scored, values[:, :-1], 0.0), (1, 0))  # (B, W-1) -> (B, W): V(s_t) in column t
    entropy = F.pad(token_entropy(logits, scored), (1, 0)) if with_entropy else None  # (B, W)
    return PolicyOutputs(logprobs, entropy, values)


@torch.no_grad()
def rollout_rewards(reward_model: nn.Module, rollout: Rollout, *, mean: float = 0.0, std: float = 1.0,
                    missing_eos_penalty: float | None = None) -> torch.Tensor:
    """(B,) float: (reward_model(tokens, padding_mask) - mean) / std, minus ``missing_eos_penalty`` on the
    rows whose answer never emitted the stop token (``rollout.ended`` False). No gradient: data to RL."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    if missing_eos_penalty is not None and not missing_eos_penalty >= 0:
        raise ValueError(f"missing_eos_penalty must be >= 0 (or None), got {missing_eos_penalty}")
    scores = (reward_model(rollout.tokens, rollout.padding_mask).float() - mean) / std  # (B,)
    if missing_eos_penalty:
        scores = torch.where(rollout.ended, scores, scores - missing_eos_penalty)
    return scores

"""Verifiable rewards: the world's checker as an RL reward, with no learned reward model.

The shadowing tasks are checkable by program (``data.shadowing_checks.check``): a JSON object with the
right event and date, the right action items, the policy's own numbers, a refusal naming the right
team. So a policy-gradient method can be rewarded by the checker itself, as in RL from verifiable
rewards (Lambert et al. 2024, Tulu 3; DeepSeek-AI 2025, R1's accuracy + format rewards): nothing to
over-optimise but the truth the checker encodes.

What it implements
- ``REWARD_TERMS``: what the checker reports about one answer, each in [0, 1]: ``score`` (the fraction
  of gold fields right: partial credit), ``exact`` (1 when every gold field is right, else 0) and
  ``format`` (1 when the answer has the task's shape: valid JSON with the two keys, one action item per
  line, ...).
- ``parse_reward_terms("score=1,format=0.1")``: a weighted sum of those terms, checked (names, numbers
  >= 0, not all zero); the reward of an answer is sum_k w_k * term_k.
- ``verifiable_rewards(examples, responses, weights)``: the (B,) rewards of a batch of answers and the
  checker's verdicts (for the exact-answer share and format validity the RL chapters log).
- ``pass_at_k(examples, responses, k)``: with k sampled answers per prompt, the share of prompts with at
  least one exact answer (pass@k, Chen et al. 2021's unbiased estimator with n = k), overall and per task,
  and the share of exact answers (pass@1 at the sampling temperature). RL on a verifiable reward can only
  reinforce answers the policy samples: pass@k of the starting policy bounds what it can reach.
- ``parse_tasks``: a ``--tasks`` list ("date_json,policy_qa") checked against the world's tasks, and
  ``select_tasks`` to keep the examples of those tasks.

What it leaves out: reward shaping inside a field (a date one day off earns nothing), length or
style terms (``data.preferences.gold_score`` holds the style penalties, used for evaluation only),
and learned rewards (``align.reward``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from minilife.common import parse_weights
from minilife.data.shadowing import ALL_TASKS
from minilife.data.shadowing_checks import Check, check

__all__ = ["DEFAULT_TERMS", "REWARD_TERMS", "parse_reward_terms", "parse_tasks", "pass_at_k", "reward_of",
           "select_tasks", "verifiable_rewards"]
REWARD_TERMS = ("score", "exact", "format")
DEFAULT_TERMS = {"score": 1.0}  # the checker's graded score: a reward in [0, 1] with partial credit


def parse_reward_terms(text: str, flag: str = "--reward-terms") -> dict[str, float]:
    """'score=1,format=0.1' -> {'score': 1.0, 'format': 0.1}; a ValueError starting with ``flag`` for an
    unknown term, a value that is not a number >= 0, or weights that are all zero."""
    weights = parse_weights(text, REWARD_TERMS, flag, "term")
    if not any(weights.values()):
        raise ValueError(f"{flag}: {text!r} gives every term weight 0 (or none); e.g. score=1")
    return weights


def reward_of(verdict: Check, weights: Mapping[str, float]) -> float:
    """sum_k w_k * term_k for one checker verdict (terms: ``REWARD_TERMS``)."""
    terms = {"score": verdict.score, "exact": float(verdict.exact), "format": float(verdict.format_ok)}
    return sum(w * terms[k] for k, w in weights.items())


def verifiable_rewards(examples: Sequence, responses: Sequence[str], weights: Mapping[str, float] = DEFAULT_TERMS
                       ) -> tuple[torch.Tensor, list[Check]]:
    """(rewards (B,) float32, the checker's verdicts) for answer i to ``examples[i]`` (a shadowing
    ``Example``: ``task`` and ``gold``)."""
    if len(examples) != len(responses):
        raise ValueError(f"verifiable_rewards: {len(examples)} examples but {len(responses)} responses")
    verdicts = [check(e, r) for e, r in zip(examples, responses)]
    return torch.tensor([reward_of(v, weights) for v in verdicts], dtype=torch.float32), verdicts


def pass_at_k(examples: Sequence, responses: Sequence[str], k: int) -> dict:
    """{"pass_at_k", "exact", "by_task": {task: pass@k}} for k answers per prompt: ``examples`` and
    ``responses`` hold N * k rows, each prompt's k answers adjacent (as ``rollout.sample_rollouts`` lays out)."""
    if k < 1 or not responses or len(responses) % k or len(examples) != len(responses):
        raise ValueError(f"pass_at_k: need N * k examples and responses with k >= 1, got {len(examples)} examples, "
                         f"{len(responses)} responses, k = {k}")
    exact = torch.tensor([check(e, r).exact for e, r in zip(examples, responses)]).view(-1, k)  # (N * k,) -> (N, k)
    hit, tasks = exact.any(1), [e.task for e in examples[::k]]  # (N,), the N prompts' tasks
    return {"pass_at_k": hit.float().mean().item(), "exact": exact.float().mean().item(),
            "by_task": {t: hit[[x == t for x in tasks]].float().mean().item() for t in dict.fromkeys(tasks)}}


def parse_tasks(text: str, flag: str = "--tasks") -> tuple[str, ...]:
    """'date_json, policy_qa' -> ('date_json', 'policy_qa'); 'all' -> every task. A ValueError starting
    with ``flag`` names an unknown or repeated task."""
    if text.strip() == "all":
        return ALL_TASKS
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"{flag} {text!r}: need distinct task names from {', '.join(ALL_TASKS)} (or 'all')")
    return tasks


def select_tasks(examples: Sequence, tasks: Sequence[str]) -> list:
    """The examples whose ``task`` is one of ``tasks``, in their order."""
    keep = set(tasks)
    return [e for e in examples if e.task in keep]

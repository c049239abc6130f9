"""Judging an aligned policy against the model it started from: win rate under a scorer, and the KL it drifted.

What it implements
- ``win_rate(new, old)``: per-prompt scores of the new and the old model's answers (e.g. the gold
  scorer's) -> wins (new > old), ties (equal), losses, their rates, and both means. Ties are reported
  apart: with a coarse scorer most answers tie, and a win rate that hides them overstates a change.
- ``sampled_kl(policy, reference, rollout)``: a Monte-Carlo estimate of the sequence-level
      KL(pi || pi_ref) = E_{y ~ pi(.|x)} [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]
  from answers sampled from ``policy`` (a ``Rollout`` from ``align.rollout.sample_rollouts``): the
  summed per-token k1 estimate per row (both log-probs by ``rollout_logprobs`` at the sampling
  temperature, no gradient), averaged over rows. Unbiased, but noisy: a single row can be negative.
  ``policy_kl(policy, reference, tokenizer, conversations, ...)`` samples the answers and returns the
  estimate with its standard error.
- ``label_agreement(pairs)``: how often the gold scorer ranks a pair's chosen answer above its rejected
  one (ties apart): the quality of a set of preference labels, e.g. AI feedback from principles.
- ``greedy_eval(policy, tokenizer, examples, ...)``: the before/after evaluation of the RL chapters: the
  greedy answer to each task example, its gold score (``data.preferences.gold_score``) and, given a
  reward model, its normalised reward (``policy.rollout_rewards``) read on the very tokens generated.
- ``curve_ends(rows, keys, window)``: a run's metrics.jsonl curve summarised by the means of its first
  and last ``window`` rows (one iteration's value is noisy).

What it leaves out: judges that are models (LLM-as-a-judge), length-controlled win rates, confidence
intervals beyond the caller's own (``sampled_kl(..., per_row=True)`` gives the rows).
"""
from __future__ import annotations

from typing import Sequence

import torch

from minilife.align.policy import rollout_rewards
from minilife.align.respond import respond
from minilife.align.rollout import Rollout, rollout_logprobs, sample_rollouts

__all__ = ["curve_ends", "greedy_eval", "label_agreement", "policy_kl", "sampled_kl", "win_rate"]


def win_rate(new: Sequence[float], old: Sequence[float]) -> dict:
    """{"win_rate", "tie_rate", "loss_rate", "wins", "ties", "losses", "n", "mean_new", "mean_old"}:
    prompt i is a win when new[i] > old[i], a tie when equal. Rates and means are None when n = 0."""
    new, old = [float(x) for x in new], [float(x) for x in old]
    if len(new) != len(old):
        raise ValueError(f"win_rate: {len(new)} new scores but {len(old)} old scores (one each per prompt)")
    n = len(new)
    wins = sum(a > b for a, b in zip(new, old))
    ties = sum(a == b for a, b in zip(new, old))
    losses = n - wins - ties

    def rate(k: float):
        return k / n if n else None
    return {"win_rate": rate(wins), "tie_rate": rate(ties), "loss_rate": rate(losses), "wins": wins, "ties": ties,
            "losses": losses, "n": n, "mean_new": rate(sum(new)), "mean_old": rate(sum(old))}


def sampled_kl(policy, reference, rollout: Rollout, temperature: float = 1.0, *, batch_size: int = 32,
               per_row: bool = False) -> float | torch.Tensor:
    """Mean over rows of sum_t (log pi - log pi_ref) on the sampled tokens of ``rollout`` (drawn from
    ``policy`` at ``temperature``): the k1 estimate of the sequence-level KL(pi || pi_ref), in nats.
    ``reference``: a module, or any callable ``(tokens, padding_mask=...) -> (logits, _)`` (e.g. the LoRA
    policy with its adapters off). Scored ``batch_size`` rows at a time; ``per_row``: the (B,) row sums."""
    rows = []
    with torch.no_grad():
        for start in range(0, rollout.tokens.shape[0], batch_size):
            part = rollout.select(torch.arange(start, min(start + batch_size, rollout.tokens.shape[0]),
                                               device=rollout.tokens.device))
            lp = rollout_logprobs(policy, part, temperature=temperature)  # (b, W), 0 off the answer
            lr = rollout_logprobs(reference, part, temperature=temperature)  # (b, W)
            rows.append((lp - lr).sum(-1).double().cpu())  # (b,)
    kl = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64)  # (B,)
    if per_row:
        return kl
    if not kl.numel():
        raise ValueError("sampled_kl: the rollout has no rows")
    return kl.mean().item()


def policy_kl(policy, reference, tokenizer, conversations: Sequence, max_new_tokens: int, *,
              samples_per_prompt: int = 1, temperature: float = 1.0, generator: torch.Generator | None = None,
              batch_size: int = 32) -> dict:
    """{"kl", "kl_se", "n"}: ``sampled_kl`` on ``samples_per_prompt`` answers per conversation sampled from
    ``policy`` at ``temperature`` (``sample_rollouts``), with the standard error of the mean over the n rows."""
    rollout = sample_rollouts(policy, tokenizer, conversations, max_new_tokens, samples_per_prompt=samples_per_prompt,
                              temperature=temperature, generator=generator, batch_size=batch_size)
    rows = sampled_kl(policy, reference, rollout, temperature, batch_size=batch_size, per_row=True)  # (n,)
    n = rows.numel()
    return {"kl": rows.mean().item(), "kl_se": rows.std().item() / n ** 0.5 if n > 1 else None, "n": n}


def label_agreement(pairs: Sequence) -> dict:
    """{"agree", "ties", "disagree", "n", "agree_rate", "tie_rate"} over the pairs that carry a task and
    gold fields (``data.preferences.Preference``): agree when gold_score(chosen) > gold_score(rejected)."""
    from minilife.data.preferences import gold_score  # (data.preferences imports align: not at the top)

    scored = [(gold_score(p.example(), p.chosen), gold_score(p.example(), p.rejected)) for p in pairs
              if p.task is not None and p.gold is not None]
    agree = sum(c > r for c, r in scored)
    ties = sum(c == r for c, r in scored)
    n = len(scored)
    return {"agree": agree, "ties": ties, "disagree": n - agree - ties, "n": n,
            "agree_rate": agree / n if n else None, "tie_rate": ties / n if n else None}


def greedy_eval(policy, tokenizer, examples: Sequence, max_new_tokens: int, *, batch_size: int = 32,
                reward_model=None, reward_stats: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Greedy answers of ``policy`` to task examples (``data.shadowing.Example``, their last, assistant turn
    removed): {"texts", "gold" (gold score per answer), "reward" (per answer, None without ``reward_model``)}.
    Without a reward model the answers come from ``respond`` (prompts batched by length); with one, from
    ``sample_rollouts`` at temperature 0, so that the reward model reads exactly the generated tokens:
    (r - mean) / std with ``reward_stats`` = (mean, std)."""
    from minilife.data.preferences import gold_score  # (data.preferences imports align: not at the top)

    if not examples:
        return {"texts": [], "gold": [], "reward": [] if reward_model is not None else None}
    conversations, reward = [e.messages[:-1] for e in examples], None
    if reward_model is None:
        texts = respond(policy, tokenizer, conversations, max_new_tokens, batch_size=batch_size)
    else:
        rollout = sample_rollouts(policy, tokenizer, conversations, max_new_tokens, temperature=0.0,
                                  batch_size=batch_size)
        texts = rollout.texts
        reward = rollout_rewards(reward_model, rollout, mean=reward_stats[0], std=reward_stats[1]).tolist()
    return {"texts": texts, "gold": [gold_score(e, t) for e, t in zip(examples, texts)], "reward": reward}


def curve_ends(rows: Sequence[dict], keys: Sequence[str], window: int = 1) -> dict:
    """{"first": {key: mean over the first ``window`` rows}, "last": {... the last ``window`` rows}} of a
    run's metric rows (e.g. ``read_jsonl(metrics.jsonl)``); {"first": None, "last": None} without rows."""
    if window < 1:
        raise ValueError(f"curve_ends: window must be >= 1, got {window}")
    rows = list(rows)
    if not rows:
        return {"first": None, "last": None}
    return {end: {k: sum(r[k] for r in part) / len(part) for k in keys}
            for end, part in (("first", rows[:window]), ("last", rows[-window:]))}

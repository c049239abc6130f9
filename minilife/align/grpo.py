"""GRPO and REINFORCE with a baseline: critic-free policy gradients for language models, the math only.

What it implements
- ``group_advantages``: GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): G answers
  are sampled per prompt and each gets A_i = (r_i - mean(r)) / std(r) within its group, the same value
  at every one of its tokens. std is the population std (divide by G; TRL divides by G - 1) plus eps;
  ``normalise_std=False`` keeps only the mean (Dr. GRPO, Liu et al. 2025: the std reweights easy and
  hard prompts).
- ``reinforce_baseline_advantages``: REINFORCE (Williams 1992) with the batch-mean baseline, or none.
- ``grpo_loss``: the clipped surrogate (Shao et al. 2024, eq. 3) with the sequence advantages broadcast
  to tokens, plus beta * KL(pi || pi_ref) as a loss term estimated per token (k3 by default, the
  paper's eq. 4: pi_ref / pi - log(pi_ref / pi) - 1), reduced by one of three explicit aggregations:
  "token-mean" (all valid tokens of the batch weigh the same), "seq-mean" (the paper's 1/G sum_i 1/|o_i|
  sum_t: per-sequence means, then their mean), "seq-mean-token-sum-norm" (Dr. GRPO: token sums divided
  by a fixed length, so long answers are not diluted).

What it leaves out: sampling G answers, the reward functions (rewards are given), the iteration loop and
the reference-model update of iterative GRPO. The per-token surrogate, KL estimators and aggregation are
shared with PPO (ppo.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from minilife.align.ppo import aggregate, check_masked, clipped_surrogate, kl_terms


def group_advantages(rewards: torch.Tensor, group_size: int, normalise_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages: reward minus its group's mean, over its group's std + eps when asked.
    rewards: (N * G,) with each group's G samples adjacent, or (N, G); returns the same shape."""
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group of one has no baseline: its advantage "
                         f"would always be 0), got {group_size!r}")
    if rewards.dim() == 2 and rewards.shape[1] != group_size:
        raise ValueError(f"rewards of shape (N, G) must have G = group_size = {group_size}, got {tuple(rewards.shape)}")
    if rewards.dim() not in (1, 2) or rewards.numel() % group_size or rewards.numel() == 0:
        raise ValueError(f"rewards must be (N * G,) or (N, G) with G = group_size = {group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    grouped = rewards.reshape(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))  # (N, G)
    centred = grouped - grouped.mean(-1, keepdim=True)  # (N, G)
    if normalise_std:
        centred = centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + eps)
    return centred.reshape(rewards.shape)  # (N, G) -> the input's shape


def reinforce_baseline_advantages(rewards: torch.Tensor, baseline: str = "mean") -> torch.Tensor:
    """REINFORCE advantages for rewards (B,): r - mean(r) ("mean") or r itself ("none"). Returns (B,)."""
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (B,) tensor, got shape {tuple(rewards.shape)}")
    if baseline == "mean":
        return rewards - rewards.mean()
    if baseline == "none":
        return rewards.clone()
    raise ValueError(f"baseline must be 'mean' or 'none', got {baseline!r}")


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2, kl_coef: float = 0.0,
              kl_kind: str | Callable = "k3", agg: str = "token-mean",
              norm_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (scalar) = aggregate over valid tokens of max(-A rho, -A clip(rho)) + kl_coef * KL_t.

    logp_new (B, T) with gradient, logp_old and logp_ref (B, T) of the same sampled tokens (logp_ref may
    be None when kl_coef == 0), advantages (B,) one per sequence, mask (B, T) bool, no empty row.
    agg / norm_length as in ppo.aggregate. Diagnostics (detached scalars over valid tokens):
    clip_fraction, kl (token mean of KL_t; 0 without a reference), approx_kl (k3 of pi_old vs pi_new)."""
    check_masked(mask, ("logp_new", logp_new), ("logp_old", logp_old))
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages must be one per sequence, shape ({mask.shape[0]},), "
                         f"got {tuple(advantages.shape)}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if logp_ref is None and kl_coef > 0:
        raise ValueError(f"logp_ref is needed when kl_coef > 0 (got kl_coef={kl_coef})")
    adv = advantages.unsqueeze(1).expand_as(mask)  # (B,) -> (B, 1) -> (B, T)
    per_token, was_clipped, log_ratio = clipped_surrogate(logp_new, logp_old, adv, mask, clip)  # (B, T) each
    kl = torch.zeros_like(per_token)
    if logp_ref is not None:
        check_masked(mask, ("logp_ref", logp_ref))
        ref = torch.where(mask, logp_ref.detach(), 0.0)  # (B, T)
        kl = torch.where(mask, kl_terms(torch.where(mask, logp_new, 0.0), ref, kl_kind), 0.0)
    loss = aggregate(per_token + kl_coef * kl, mask, agg, norm_length)
    n = mask.sum()
    with torch.no_grad():
        diagnostics = {"clip_fraction": was_clipped.to(per_token.dtype).sum() / n, "kl": kl.sum() / n,
                       "approx_kl": torch.where(mask, torch.expm1(log_ratio) - log_ratio, 0.0).sum() / n}
    return loss, diagnostics

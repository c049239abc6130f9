"""PPO for language models with a per-token KL penalty: the math, no rollout loop.

What it implements
- ``kl_penalised_rewards``: the RLHF reward of Ziegler et al. 2019 (sec. 2.2) and Ouyang et al. 2022 (eq. 2)
  spread over tokens: r_t = -beta * KL_t at every response token, plus the sequence score at the last one.
  KL_t is one of Schulman's estimators of KL(pi || pi_ref) from a sample of pi, with log-ratio
  lr = log pi_ref - log pi: k1 = -lr, k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr (kl.kl_estimate, or a callable).
- ``gae``: generalised advantage estimation (Schulman et al. 2016, eqs. 11-16):
  delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, returns R_t = A_t + V_t,
  run backwards over the valid tokens only (a masked hole is skipped, not counted as a step), with
  V = A = 0 after each row's last valid token.
- ``whiten``: (x - mean) / std over the valid tokens only (population std).
- ``ppo_policy_loss``: the clipped surrogate (Schulman et al. 2017, eq. 7) as a loss to minimise,
  max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log pi - log pi_old), aggregated by ``aggregate``.
- ``ppo_value_loss``: the clipped value loss max((V - R)^2, (V_old + clip(V - V_old) - R)^2) / 2, as in
  the PPO reference code (baselines ppo2); ``explained_variance`` 1 - Var[R - V] / Var[R].
- ``FixedKL`` and ``AdaptiveKL``: the KL coefficient beta, constant or adapted as in Ziegler et al.
  2019 (sec. 2.2): e = clip(KL / target - 1, -0.2, 0.2), beta <- beta (1 + e n_steps / horizon).
- ``ValueHead``: Linear(C, 1) on the final hidden states; ``at_last_real`` (``logprobs.last_token_index``)
  reads a (B, T) tensor at each row's last True mask position, whatever the padding side.

What it leaves out: sampling, the optimiser loop, the entropy bonus (logprobs.token_entropy gives the
per-token entropy), reward models (reward.py), GRPO (grpo.py). Rewards, advantages and returns are
constants to the losses: they are computed without gradient. Masked positions are selected away with
``torch.where``, so garbage there (inf, NaN) never leaks into values or gradients.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from minilife.align.kl import kl_estimate
from minilife.align.logprobs import last_token_index
AGGREGATIONS = ("token-mean", "seq-mean", "seq-mean-token-sum-norm")


def check_masked(mask: torch.Tensor, *named: tuple[str, torch.Tensor], allow_empty_rows: bool = False) -> None:
    """Raise a ValueError unless ``mask`` is bool (B, T) and every named tensor has its shape;
    unless allowed, also if some row of the mask has no True entry."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape (B, T), got {got}")
    for name, x in named:
        if not isinstance(x, torch.Tensor) or x.shape != mask.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, got {got}")
    if not allow_empty_rows and not bool(mask.any(-1).all()):
        rows = (~mask.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows} have no valid token; drop those rows before the loss")


def kl_terms(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str | Callable = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. logp, logp_ref (B, T) -> (B, T).
    kind: "k1" (unbiased, can be negative), "k2" (biased, >= 0), "k3" (unbiased, >= 0), computed by
    kl.kl_estimate, or a callable (logp, logp_ref) -> (B, T) for another estimator."""
    return kind(logp, logp_ref) if callable(kind) else kl_estimate(logp, logp_ref, kind)


def at_last_real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) read at each row's last True mask position (B, T) -> (B, ...); padding side free."""
    idx = last_token_index(mask)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), idx]


@torch.no_grad()
def kl_penalised_rewards(score: torch.Tensor, logp_policy: torch.Tensor, logp_ref: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, kind: str | Callable = "k1") -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * KL_t at response tokens, + score (B,) at each row's last one.
    logp_policy, logp_ref: (B, T) log-probs of the sampled tokens; mask (B, T) bool, True at response
    tokens. 0 where mask is False. No gradient: rewards are data to PPO."""
    check_masked(mask, ("logp_policy", logp_policy), ("logp_ref", logp_ref))
    if score.shape != mask.shape[:1]:
        raise ValueError(f"score must have shape ({mask.shape[0]},), got {tuple(score.shape)}")
    if kl_coef < 0 or not math.isfinite(kl_coef):
        raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}")
    kl = torch.where(mask, kl_terms(torch.where(mask, logp_policy, 0.0), torch.where(mask, logp_ref, 0.0), kind), 0.0)
    rewards = -kl_coef * kl  # (B, T)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += score.to(rewards.dtype)
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), from rewards, values (B, T) and mask (B, T) bool.
    Backwards over valid tokens only, bootstrapping V = 0 after each row's last one; 0 where masked."""
    check_masked(mask, ("rewards", rewards), ("values", values), allow_empty_rows=True)
    for name, x in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {x}")
    # exercise: gae
    r, v = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)  # (B, T): no garbage leaks
    advantages = torch.zeros_like(r)
    next_value = next_adv = torch.zeros_like(r[:, 0])  # (B,): the bootstrap after the last token
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        valid = mask[:, t]
        advantages[:, t] = torch.where(valid, adv, 0.0)
        next_value, next_adv = torch.where(valid, v[:, t], next_value), torch.where(valid, adv, next_adv)
    return advantages, torch.where(mask, advantages + v, 0.0)
    # end exercise: gae


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the True positions of mask (B, T) bool; x (B, T) -> (B, T), 0 where masked.
    shift_mean=False adds the mean back (rescale only)."""
    check_masked(mask, ("x", x), allow_empty_rows=True)
    n = mask.sum()
    if n == 0:
        raise ValueError("mask has no valid token: nothing to whiten")
    xm = torch.where(mask, x, 0.0)  # (B, T)
    mean = xm.sum() / n
    var = torch.where(mask, (xm - mean) ** 2, 0.0).sum() / n
    out = (xm - mean) * torch.rsqrt(var + eps)
    return torch.where(mask, out if shift_mean else out + mean, 0.0)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean",
              norm_length: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (B, T) over mask (B, T) bool to a scalar.
    "token-mean": sum / number of valid tokens; "seq-mean": mean over rows of each row's masked mean;
    "seq-mean-token-sum-norm": sum / (B * norm_length), norm_length a fixed length (default T), so a
    token weighs the same whatever its sequence's length (Dr. GRPO, Liu et al. 2025). No empty rows."""
    check_masked(mask, ("loss", loss))
    picked = torch.where(mask, loss, 0.0)  # (B, T)
    if agg == "token-mean":
        return picked.sum() / mask.sum()
    if agg == "seq-mean":
        return (picked.sum(-1) / mask.sum(-1)).mean()
    if agg == "seq-mean-token-sum-norm":
        length = mask.shape[1] if norm_length is None else norm_length
        if length < 1:
            raise ValueError(f"norm_length must be >= 1, got {norm_length}")
        return picked.sum() / (mask.shape[0] * length)
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss max(-A rho, -A clip(rho)) (B, T), whether the clipped term won (B, T) bool,
    and log rho (B, T); all 0/False where masked. Inputs (B, T); advantages are treated as constants."""
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must lie in (0, 1), got {clip}")
    # exercise: ppo_clipped_loss
    log_ratio = torch.where(mask, logp_new - logp_old.detach(), 0.0)  # (B, T)
    ratio, adv = log_ratio.exp(), torch.where(mask, advantages.detach(), 0.0)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), mask & (clipped > unclipped), log_ratio
    # end exercise: ppo_clipped_loss


def ppo_policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate loss (scalar) and diagnostics. All inputs (B, T); mask bool, no empty row.
    Diagnostics (detached scalars): clip_fraction (share of valid tokens where the clipped term won)
    and approx_kl (k3 estimate of KL(pi_old || pi_new) over valid tokens)."""
    check_masked(mask, ("logp_new", logp_new), ("logp_old", logp_old), ("advantages", advantages))
    per_token, was_clipped, log_ratio = clipped_surrogate(logp_new, logp_old, advantages, mask, clip)
    n = mask.sum()
    with torch.no_grad():
        clip_fraction = was_clipped.to(per_token.dtype).sum() / n
        approx_kl = torch.where(mask, torch.expm1(log_ratio) - log_ratio, 0.0).sum() / n  # k3, lr = log new/old
    return aggregate(per_token, mask, agg), {"clip_fraction": clip_fraction, "approx_kl": approx_kl}


def ppo_value_loss(values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, token-mean of max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2) / 2, and
    diagnostics (value_clip_fraction: share of valid tokens where the clipped error won). Inputs (B, T)."""
    check_masked(mask, ("values_new", values_new), ("values_old", values_old), ("returns", returns))
    if not clip > 0.0:
        raise ValueError(f"clip must be > 0, got {clip}")
    old, ret = values_old.detach(), returns.detach()
    v = torch.where(mask, values_new, 0.0)  # (B, T)
    v_clipped = old + (v - old).clamp(-clip, clip)
    err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    loss = 0.5 * aggregate(torch.maximum(err, err_clipped), mask)
    return loss, {"value_clip_fraction": (mask & (err_clipped > err)).to(loss.dtype).sum() / mask.sum()}


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens, a scalar: 1 = perfect critic, 0 = no better than
    the mean, < 0 worse; NaN when the returns do not vary. Inputs (B, T), mask bool."""
    check_masked(mask, ("values", values), ("returns", returns), allow_empty_rows=True)
    v, r = values[mask].double(), returns[mask].double()  # (N,) valid tokens
    var_r = r.var(unbiased=False)
    return (1.0 - (r - v).var(unbiased=False) / var_r) if var_r > 0 else torch.tensor(float("nan"))


class FixedKL:
    """A constant KL coefficient beta; ``update`` does nothing."""

    def __init__(self, coef: float):
        if not (coef >= 0 and math.isfinite(coef)):
            raise ValueError(f"coef must be finite and >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKL:
    """Ziegler et al. 2019, sec. 2.2: beta moves toward keeping the measured KL at ``target``.
    update(kl, n_steps): e = clip(kl / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon."""

    def __init__(self, init: float, target: float, horizon: int):
        for name, x in (("init", init), ("target", target), ("horizon", horizon)):
            if not (x > 0 and math.isfinite(x)):
                raise ValueError(f"{name} must be finite and > 0, got {x}")
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt beta after ``n_steps`` samples whose mean KL was ``current_kl``; returns the new beta."""
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}: the run diverged")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class ValueHead(nn.Module):
    """V(s_t) = w . h_t + b on the GPT's final hidden states: hidden (B, T, C) -> values (B, T)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(n_embd + 1))  # unit-scale outputs at the start
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.proj.in_features:
            raise ValueError(f"hidden must be (B, T, {self.proj.in_features}), got {tuple(hidden.shape)}")
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)  # (B, T, 1) -> (B, T)

    def at_last(self, hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """The value (score) at each row's last real token: hidden (B, T, C), padding_mask (B, T) -> (B,)."""
        return self(at_last_real(hidden, padding_mask).unsqueeze(1)).squeeze(1)  # (B, C) -> (B, 1, C) -> (B,)

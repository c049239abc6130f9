"""Per-token log-probabilities and entropies under a mask: what SFT, the reward model, PPO and DPO share.

What it implements
- ``token_logprobs``: log p(y_t) = z_t[y_t] - logsumexp(z_t) of given targets, the quantity SFT's loss,
  PPO's ratio exp(log p - log p_old) (Schulman et al. 2017, eq. 6) and DPO's implicit reward
  beta * log(p / p_ref) (Rafailov et al. 2023, eq. 7) are built from.
- ``token_entropy``: H_t = -sum_v p_t(v) log p_t(v), PPO's entropy bonus (Schulman et al. 2017, eq. 9).
- ``masked_sum`` / ``masked_mean``: per-sequence sums (DPO) or means over the masked tokens.
- ``model_logprobs``: one forward pass and the shift by one: position t holds log p(x_t | x_<t).
- ``last_token_index``: where each row's last real token is, whatever the padding side (where a reward
  model, a value head and the sequence score of PPO read a sequence).
Computed in float32 or wider (bf16 logits are upcast). Masked positions are selected away with
``torch.where``, never multiplied by 0, so they give exactly 0 and exactly zero gradient even when
their logits hold inf/NaN (0 * NaN = NaN would leak).

What it leaves out: chunking over the vocabulary (the (B, T, V) float32 log-softmax is materialised),
label smoothing, the losses themselves (sft.py, reward.py, ppo.py, dpo.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), mask (B, T) bool -> log-softmax (B, T, V) in float32+, 0 at masked positions."""
    if logits.dim() != 3 or mask.shape != logits.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"need logits (B, T, V) and a bool mask (B, T), got logits {tuple(logits.shape)}, "
                         f"mask {mask.dtype} {tuple(mask.shape)}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.where(mask.unsqueeze(-1), z, 0.0).log_softmax(dim=-1)  # masked rows: finite, zero gradient


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(targets) under softmax(logits). logits (B, T, V); targets (B, T) long; mask (B, T) bool.
    Returns (B, T) float32+ with exactly 0 where mask is False (targets there may be anything)."""
    logp = _masked_log_softmax(logits, mask)  # (B, T, V)
    picked = logp.gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(mask, picked, 0.0)


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. logits (B, T, V); mask (B, T) bool.
    Returns (B, T) float32+ in nats, exactly 0 where mask is False."""
    logp = _masked_log_softmax(logits, mask)  # (B, T, V)
    return torch.where(mask, -(logp.exp() * logp).sum(-1), 0.0)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of values over the True positions of each row. values (B, T), mask (B, T) bool -> (B,)."""
    return torch.where(mask, values, 0.0).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over the True positions of each row (0 for a row with none). (B, T) -> (B,)."""
    return masked_sum(values, mask) / mask.sum(-1).clamp(min=1)


def model_logprobs(model, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                   response_mask: torch.Tensor | None = None, *, with_entropy: bool = False):
    """log p(x_t | x_<t) for every scored token of ``input_ids`` (B, T), from one forward pass.

    Scored: tokens where ``response_mask`` (B, T) bool (default: ``padding_mask``, default all) is True
    and whose predecessor is a real token (padding_mask), so column 0 is never scored. The logits at
    position t - 1 predict token t: the shift by one happens here. Returns logprobs (B, T) aligned
    with input_ids, exactly 0 where not scored, and with ``with_entropy`` also the entropy (B, T) of
    the distribution each scored token was drawn from."""
    scored = scored_mask(input_ids, padding_mask, response_mask)[:, 1:]  # (B, T-1)
    logits, _ = model(input_ids, padding_mask=padding_mask)  # (B, T, V)
    logits = logits[:, :-1]  # (B, T-1, V): position t - 1 predicts input_ids[:, t]
    logprobs = F.pad(token_logprobs(logits, input_ids[:, 1:], scored), (1, 0))  # (B, T-1) -> (B, T), column 0: 0
    return (logprobs, F.pad(token_entropy(logits, scored), (1, 0))) if with_entropy else logprobs


def scored_mask(input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which tokens of ``input_ids`` (B, T) ``model_logprobs`` scores -> bool (B, T): in the response
    (default: every real token), real, and following a real token (so column 0 never is)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask  # (B, T)
    scored = (real if response_mask is None else response_mask & real)[:, 1:] & real[:, :-1]  # (B, T-1)
    return F.pad(scored, (1, 0), value=False)  # (B, T)


def last_token_index(padding_mask: torch.Tensor) -> torch.Tensor:
    """padding_mask (B, T) bool, True = real token -> (B,) long, the position of each row's last
    real token (left, right or no padding alike). A row with no real token is a ValueError."""
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dim() != 2 or padding_mask.dtype != torch.bool:
        got = (f"{padding_mask.dtype} {tuple(padding_mask.shape)}" if isinstance(padding_mask, torch.Tensor)
               else type(padding_mask).__name__)
        raise ValueError(f"padding_mask must be a bool tensor (B, T), got {got}")
    empty = ~padding_mask.any(dim=1)  # (B,)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"padding_mask: row(s) {rows[:5]} have no real token; a reward needs at least one")
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)  # (T,)
    return torch.where(padding_mask, positions, -1).amax(dim=1)  # (B,)

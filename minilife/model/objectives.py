"""Three pretraining objectives as batch builders, so one GPT can be trained on each and compared.

Each function turns a batch of token ids into an ``ObjectiveBatch`` (inputs, targets, and the
attention arguments GPT.forward takes); the loss is then ``model(b.inputs, b.targets, **b.attention)``.

- Causal LM (Radford et al. 2018): predict token t+1 from tokens <= t. inputs = tokens[:, :-1],
  targets = tokens[:, 1:], causal attention.
- Prefix LM (Raffel et al. 2020, T5 sec. 3.2.1; Dong et al. 2019, UniLM): the first p tokens attend
  to each other in both directions, the rest causally; the loss covers only the suffix. With inputs
  x_0..x_{T-1} and targets x_1..x_T, the target at position i is x_{i+1}; it is inside the prefix
  (and so visible to every prefix position) when i + 1 < p, so positions i < p - 1 are ignored.
- Masked LM (Devlin et al. 2019, BERT sec. 3.1): each token is chosen with probability 15%; a chosen
  token becomes [MASK] 80% of the time, a uniformly random token 10%, and stays unchanged 10%. The
  loss covers only chosen positions, predicting the original token at the same position, with full
  (bidirectional) attention.

What it leaves out: span corruption (T5), whole-word masking, BERT's next-sentence prediction, and
choosing an exact 15% per sequence (tokens are chosen independently, as in most MLM collators).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from minilife.model.layers import check_tensor


@dataclass
class ObjectiveBatch:
    """inputs, targets: (B, T) long (targets use ignore_index where no loss is taken); attention:
    keyword arguments for GPT.forward (attn_mask and/or prefix_lengths)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    attention: dict = field(default_factory=dict)


def _check_tokens(tokens: torch.Tensor, min_len: int) -> None:
    check_tensor(tokens, "tokens", ("B", "T"))
    if tokens.shape[1] < min_len:
        raise ValueError(f"tokens needs at least {min_len} positions per row, got T={tokens.shape[1]}")


def causal_lm_batch(tokens: torch.Tensor) -> ObjectiveBatch:
    """tokens: (B, T+1) -> inputs (B, T) = tokens[:, :-1], targets (B, T) = tokens[:, 1:], causal mask."""
    _check_tokens(tokens, 2)
    return ObjectiveBatch(tokens[:, :-1], tokens[:, 1:].clone(), {"attn_mask": "causal"})


def prefix_lm_batch(tokens: torch.Tensor, prefix_lengths: torch.Tensor | int | None = None, *,
                    generator: torch.Generator | None = None, ignore_index: int = -100) -> ObjectiveBatch:
    """tokens: (B, T+1) -> inputs (B, T), targets (B, T) with the prefix's targets ignored.

    prefix_lengths: (B,) or an int for all rows, each in [1, T]; None draws each row's p uniformly
    from [1, T - 1] with ``generator`` (so at least one suffix token is trained).
    The returned attention is {"prefix_lengths": (B,)}."""
    _check_tokens(tokens, 3)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()  # (B, T) each
    B, T = inputs.shape
    if prefix_lengths is None:
        p = torch.randint(1, T, (B,), generator=generator, device="cpu").to(tokens.device)  # (B,) in [1, T-1]
    else:
        p = torch.as_tensor(prefix_lengths, dtype=torch.long, device=tokens.device)
        if p.numel() not in (1, B):
            raise ValueError(f"prefix_lengths must be an int or have shape ({B},), got shape {tuple(p.shape)}")
        p = p.reshape(-1).expand(B).clone()  # () or (B,) -> (B,)
    if int(p.min()) < 1 or int(p.max()) > T:
        raise ValueError(f"prefix_lengths must lie in [1, {T}] for inputs of length {T}, "
                         f"got min {int(p.min())} max {int(p.max())}")
    pos = torch.arange(T, device=tokens.device).unsqueeze(0)  # (1, T)
    targets[pos < (p.unsqueeze(1) - 1)] = ignore_index  # target x_{i+1} lies inside the visible prefix
    return ObjectiveBatch(inputs, targets, {"prefix_lengths": p})


def masked_lm_batch(tokens: torch.Tensor, mask_id: int, vocab_size: int, *, mask_prob: float = 0.15,
                    mask_frac: float = 0.8, random_frac: float = 0.1, special_ids: Sequence[int] = (),
                    generator: torch.Generator | None = None, ignore_index: int = -100) -> ObjectiveBatch:
    """tokens: (B, T) -> corrupted inputs (B, T), targets (B, T) = original ids at chosen positions.

    mask_id: the [MASK] token (must be < vocab_size); random replacements are uniform over
    [0, vocab_size). Tokens in ``special_ids`` (e.g. end-of-text) are never chosen. The random draws
    are made on the CPU with ``generator`` (reproducible on any device) and moved to tokens.device.
    Returns attention {"attn_mask": "full"}."""
    _check_tokens(tokens, 1)
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must be a token id in [0, vocab_size={vocab_size})")
    if not 0.0 < mask_prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1.0:
        raise ValueError(f"need 0 < mask_prob <= 1 and mask_frac + random_frac <= 1, got "
                         f"mask_prob={mask_prob}, mask_frac={mask_frac}, random_frac={random_frac}")
    cpu_tokens = tokens.cpu()
    chosen = torch.rand(cpu_tokens.shape, generator=generator) < mask_prob  # (B, T)
    for sid in special_ids:
        chosen &= cpu_tokens != sid
    action = torch.rand(cpu_tokens.shape, generator=generator)  # (B, T): which corruption
    to_mask = chosen & (action < mask_frac)
    to_random = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)
    random_ids = torch.randint(0, vocab_size, cpu_tokens.shape, generator=generator)  # (B, T)
    inputs = cpu_tokens.clone()
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[to_random]
    targets = torch.where(chosen, cpu_tokens, torch.full_like(cpu_tokens, ignore_index))  # (B, T)
    return ObjectiveBatch(inputs.to(tokens.device), targets.to(tokens.device), {"attn_mask": "full"})


OBJECTIVES = {"clm": causal_lm_batch, "prefix": prefix_lm_batch, "mlm": masked_lm_batch}

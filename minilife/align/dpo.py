"""Direct preference optimisation and its family: the loss on sequence log-probs of (chosen, rejected) pairs.

What it implements
- ``sequence_logprobs``: log pi(y | x) = sum_t log pi(y_t | x, y_<t) over a response's tokens, or the
  length-averaged (1/|y|) sum (SimPO's reward; optional for the others).
- ``model_sequence_logprobs``: the same straight from a model and a padded batch (one forward pass).
- ``dpo_loss``: with pi = policy and ref = reference sequence log-probs, the log-ratio difference
      h = (pi_c - ref_c) - (pi_r - ref_r),   z = beta * h - margin
  and per pair, with eps = label_smoothing:
      "sigmoid"      -log sigma(z)                      DPO, Rafailov et al. 2023, eq. 7
      "conservative" (1 - eps) * -log sigma(z) + eps * -log sigma(-z)
                                                        cDPO: the label is flipped with probability eps
      "robust"       [(1 - eps) * -log sigma(z) - eps * -log sigma(-z)] / (1 - 2 eps)
                                                        rDPO, Chowdhury et al. 2024: unbiased under eps-flips
      "hinge"        max(0, 1 - z)                      SLiC, Zhao et al. 2023
      "ipo"          (h - 1 / (2 beta))^2               IPO, Azar et al. 2023 (no margin; h as given,
                                                        summed or length-averaged by the caller)
      "simpo"        -log sigma(beta * (pi_c - pi_r) - margin)
                                                        SimPO, Meng et al. 2024, eq. 6: reference-free;
                                                        pass length-averaged log-probs, margin is gamma
  ("sigmoid" with label_smoothing > 0 is "conservative".) The loss is the mean over pairs. Diagnostics:
  implicit rewards beta * (pi - ref) (beta * pi for SimPO), their margins, and the share of pairs
  whose chosen reward beats the rejected one.
- ``cached_reference_logprobs``: the reference's sequence log-probs for a whole dataset, computed once
  without gradients, so every epoch reuses them instead of running the reference again.

Computed in float32 or wider (a float64 input stays float64).

What it leaves out: KTO, ORPO, CPO and other losses that need more than a pair's four numbers; the
data pipeline for preference pairs and the training loop (the chapter's); an SFT term on the chosen
response.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F

from minilife.align.logprobs import masked_mean, masked_sum, model_logprobs, scored_mask

LOSS_TYPES = ("sigmoid", "conservative", "robust", "hinge", "ipo", "simpo")


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-prob from per-token ones. token_logps (B, T) float, mask (B, T) bool (the response
    tokens). Returns (B,): the sum over the masked tokens, or their mean with ``average=True``."""
    if token_logps.dim() != 2 or mask.shape != token_logps.shape or mask.dtype != torch.bool:
        raise ValueError(f"need token_logps (B, T) and a bool mask (B, T), got token_logps "
                         f"{tuple(token_logps.shape)}, mask {mask.dtype} {tuple(mask.shape)}")
    empty = ~mask.any(-1)  # (B,)
    if empty.any():
        raise ValueError(f"mask: rows {empty.nonzero().flatten().tolist()} have no response token to score")
    return masked_mean(token_logps, mask) if average else masked_sum(token_logps, mask)


def model_sequence_logprobs(model, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                            response_mask: torch.Tensor | None = None, *, average: bool = False) -> torch.Tensor:
    """log pi(response | prompt) for each row of ``input_ids`` (B, T) -> (B,), from one forward pass.
    ``padding_mask`` / ``response_mask`` (B, T) bool as in ``logprobs.model_logprobs``: a token counts if
    it is in the response, real, and follows a real token."""
    token_logps = model_logprobs(model, input_ids, padding_mask, response_mask)  # (B, T)
    return sequence_logprobs(token_logps, scored_mask(input_ids, padding_mask, response_mask), average)


class DPOOutput(NamedTuple):
    """``loss`` () mean over pairs, with gradient; ``losses`` (B,) per pair, with gradient;
    ``chosen_rewards`` / ``rejected_rewards`` / ``margins`` (B,) detached; ``accuracy`` float in [0, 1]."""
    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: float


def _check_inputs(named: dict[str, torch.Tensor | None], loss_type: str) -> torch.Size:
    shape = None
    for name, value in named.items():
        if value is None and name.startswith("ref_"):
            if loss_type != "simpo":
                raise ValueError(f"{name} is None: only loss_type='simpo' runs without a reference")
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape (B,), got "
                             f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, policy_chosen has {tuple(shape)}: "
                             "every input is one number per pair (B,)")
    if shape[0] == 0:
        raise ValueError("policy_chosen is empty: need at least one pair")
    return shape


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, margin: float = 0.0) -> DPOOutput:
    """The preference loss of ``loss_type`` (see the module docstring) over B pairs.

    policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) sequence log-probs (reference ones
    may be None for "simpo", and are ignored there). ``beta`` > 0 scales the log-ratios (IPO: the
    target is h = 1 / (2 beta)); ``label_smoothing`` eps in [0, 0.5), the assumed share of flipped
    labels ("sigmoid", "conservative", "robust" only); ``margin`` is subtracted from z (SimPO's gamma).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type not in ("sigmoid", "conservative", "robust"):
        raise ValueError(f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}")
    if not math.isfinite(margin) or (margin and loss_type == "ipo"):
        raise ValueError(f"margin must be finite, and 0 for 'ipo' (its target is 1/(2 beta)); got {margin!r}")
    _check_inputs({"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                   "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}, loss_type)

    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    pi_c, pi_r = policy_chosen.to(dtype), policy_rejected.to(dtype)  # (B,)
    if loss_type == "simpo":  # reference-free: the reward is the policy's own (averaged) log-prob
        ratio_c, ratio_r = pi_c, pi_r  # (B,)
    else:
        ratio_c, ratio_r = pi_c - ref_chosen.to(dtype), pi_r - ref_rejected.to(dtype)  # (B,)
    # exercise: dpo_loss
    h = ratio_c - ratio_r  # (B,) log-ratio difference
    z = beta * h - margin  # (B,)
    eps = label_smoothing

    if loss_type in ("sigmoid", "conservative", "simpo"):
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    # end exercise: dpo_loss

    chosen_rewards, rejected_rewards = (beta * ratio_c).detach(), (beta * ratio_r).detach()  # (B,)
    return DPOOutput(loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards,
                     rejected_rewards=rejected_rewards, margins=chosen_rewards - rejected_rewards,
                     accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean().item())


class ReferenceLogprobs(NamedTuple):
    """The reference's sequence log-probs of N pairs, in the order the batches came: chosen (N,), rejected (N,)."""
    chosen: torch.Tensor
    rejected: torch.Tensor

    def take(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a batch: ``index`` (b,) long positions (or a slice) -> chosen (b,), rejected (b,)."""
        return self.chosen[index], self.rejected[index]


def cached_reference_logprobs(score_pairs: Callable[[object], tuple[torch.Tensor, torch.Tensor]],
                              batches: Iterable) -> ReferenceLogprobs:
    """Run the reference once over a dataset of pairs and keep the results.

    ``score_pairs(batch) -> (chosen (b,), rejected (b,))`` gives the reference's sequence log-probs of
    one batch; it is called under ``torch.no_grad()`` for every batch of ``batches`` in order, and the
    results are concatenated. Iterate the pairs in a fixed order here and index the cache with each
    pair's position afterwards (``take``), shuffling the positions, not the data. For example, with
    the LoRA policy's base as the reference (in eval mode, so dropout does not make the cache random):

        with adapters_disabled(model):
            cache = cached_reference_logprobs(
                lambda b: (model_sequence_logprobs(model, b.chosen_ids, b.chosen_pad, b.chosen_resp),
                           model_sequence_logprobs(model, b.rejected_ids, b.rejected_pad, b.rejected_resp)),
                fixed_order_batches)
    """
    chosen, rejected = [], []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            c, r = score_pairs(batch)
            if c.dim() != 1 or c.shape != r.shape:
                raise ValueError(f"score_pairs on batch {i} gave chosen {tuple(c.shape)} and rejected "
                                 f"{tuple(r.shape)}: need two (b,) tensors")
            chosen.append(c.detach())
            rejected.append(r.detach())
    if not chosen:
        raise ValueError("batches is empty: nothing to cache")
    return ReferenceLogprobs(torch.cat(chosen), torch.cat(rejected))  # (N,), (N,)

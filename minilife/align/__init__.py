"""Alignment after pretraining: SFT, reward model, PPO, DPO. Shared here: masked per-token log-probs."""
from minilife.align.logprobs import masked_mean, masked_sum, model_logprobs, token_entropy, token_logprobs

__all__ = ["masked_mean", "masked_sum", "model_logprobs", "token_entropy", "token_logprobs"]

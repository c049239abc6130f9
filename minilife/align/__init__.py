"""Alignment after pretraining: SFT, reward model, PPO, DPO. Shared here: masked per-token log-probs;
the chat template (chat), SFT data and batches (sft), the template linter and mask viewer (template_lint),
answering chat prompts (respond), sampling and scoring RL rollouts (rollout), the RL policy with a value
head and rollout rewards (policy), preference pairs as batches (pairs), feedback from written principles
(constitution, principle_rules), win rates, sampled KL and the greedy before/after evaluation (evaluate);
chapter 4's math: the reward model and its loading for RL (reward), PPO (ppo), GRPO (grpo), the DPO family
(dpo) and the KL estimators (kl)."""
from minilife.align.chat import (CHAT_TEMPLATE, ChatRendering, ChatTemplate, ChatTokenIds, add_chat_tokens,
                                 chat_token_ids, check_messages, message_errors, render_chat, render_prompt)
from minilife.align.dpo import (LOSS_TYPES, DPOOutput, ReferenceLogprobs, cached_reference_logprobs, dpo_loss,
                               model_sequence_logprobs, sequence_logprobs)
from minilife.align.grpo import group_advantages, grpo_loss, reinforce_baseline_advantages
from minilife.align.kl import KL_KINDS, estimator_stats, exact_kl, expected_loss_gradients, kl_estimate
from minilife.align.logprobs import (last_token_index, masked_mean, masked_sum, model_logprobs, token_entropy,
                                     token_logprobs)
from minilife.align.ppo import (AdaptiveKL, FixedKL, ValueHead, explained_variance, gae, kl_penalised_rewards,
                                ppo_policy_loss, ppo_value_loss, whiten)
from minilife.align.reward import (PolicyReward, RewardModel, bradley_terry_loss, check_same_tokenizer,
                                   end_at_response, gold_agreement, load_policy_reward, load_reward_model,
                                   preference_accuracy, save_reward_model)
from minilife.align.sft import (SFTBatch, SFTExample, collate, encode_conversation, encode_dataset, pack_batch,
                                pad_batch, read_chat_jsonl, sft_eval_loss, sft_loss_sum, split_step, write_chat_jsonl)
from minilife.align.respond import respond, score_answers
from minilife.align.rollout import Rollout, rollout_logprobs, sample_rollouts
from minilife.align.policy import PolicyOutputs, PolicyWithValue, policy_outputs, rollout_rewards
from minilife.align.pairs import EncodedPair, PairBatch, collate_pairs, encode_pair, encode_pairs, pair_logprobs
from minilife.align.principle_rules import RULES, request_kind
from minilife.align.constitution import (DEFAULT_PRINCIPLES, Critic, Critique, Principle, RuleCritic, load_principles,
                                         principle_pairs, principle_report, sampled_principle_pairs)
from minilife.align.evaluate import curve_ends, greedy_eval, label_agreement, policy_kl, sampled_kl, win_rate
from minilife.align.template_lint import (lint_conversation, lint_rendering, looks_like_system_prompt, show_mask,
                                          token_name)

__all__ = [
    "last_token_index", "masked_mean", "masked_sum", "model_logprobs", "token_entropy", "token_logprobs",
    "LOSS_TYPES", "DPOOutput", "ReferenceLogprobs", "cached_reference_logprobs", "dpo_loss", "model_sequence_logprobs",
    "sequence_logprobs", "group_advantages", "grpo_loss", "reinforce_baseline_advantages", "KL_KINDS",
    "estimator_stats", "exact_kl", "expected_loss_gradients", "kl_estimate", "AdaptiveKL", "FixedKL", "ValueHead",
    "explained_variance", "gae", "kl_penalised_rewards", "ppo_policy_loss", "ppo_value_loss", "whiten",
    "RewardModel", "bradley_terry_loss", "check_same_tokenizer", "preference_accuracy", "save_reward_model",
    "load_reward_model", "end_at_response", "gold_agreement", "PolicyReward", "load_policy_reward",
    "CHAT_TEMPLATE", "ChatRendering", "ChatTemplate", "ChatTokenIds", "add_chat_tokens", "chat_token_ids",
    "check_messages", "message_errors", "render_chat", "render_prompt",
    "SFTBatch", "SFTExample", "collate", "encode_conversation", "encode_dataset", "pack_batch", "pad_batch",
    "read_chat_jsonl", "sft_eval_loss", "sft_loss_sum", "split_step", "write_chat_jsonl", "respond", "score_answers",
    "lint_conversation", "lint_rendering", "looks_like_system_prompt", "show_mask", "token_name",
    "EncodedPair", "PairBatch", "collate_pairs", "encode_pair", "encode_pairs", "pair_logprobs",
    "Rollout", "rollout_logprobs", "sample_rollouts", "PolicyOutputs", "PolicyWithValue", "policy_outputs",
    "rollout_rewards",
    "RULES", "request_kind", "DEFAULT_PRINCIPLES", "Critic", "Critique", "Principle", "RuleCritic", "load_principles",
    "principle_pairs", "principle_report", "sampled_principle_pairs", "label_agreement", "policy_kl", "sampled_kl",
    "win_rate", "curve_ends", "greedy_eval",
]

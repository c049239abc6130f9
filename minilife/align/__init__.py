"""Alignment after pretraining: SFT, reward model, PPO, DPO. Shared here: masked per-token log-probs;
the chat template (chat), SFT data and batches (sft), the template linter and mask viewer (template_lint),
answering chat prompts (respond)."""
from minilife.align.chat import (CHAT_TEMPLATE, ChatRendering, ChatTemplate, ChatTokenIds, add_chat_tokens,
                                 chat_token_ids, check_messages, message_errors, render_chat, render_prompt)
from minilife.align.logprobs import masked_mean, masked_sum, model_logprobs, token_entropy, token_logprobs
from minilife.align.sft import (SFTBatch, SFTExample, collate, encode_conversation, encode_dataset, pack_batch,
                                pad_batch, read_chat_jsonl, sft_eval_loss, sft_loss_sum, split_step, write_chat_jsonl)
from minilife.align.respond import respond, score_answers
from minilife.align.template_lint import (lint_conversation, lint_rendering, looks_like_system_prompt, show_mask,
                                          token_name)

__all__ = [
    "masked_mean", "masked_sum", "model_logprobs", "token_entropy", "token_logprobs",
    "CHAT_TEMPLATE", "ChatRendering", "ChatTemplate", "ChatTokenIds", "add_chat_tokens", "chat_token_ids",
    "check_messages", "message_errors", "render_chat", "render_prompt",
    "SFTBatch", "SFTExample", "collate", "encode_conversation", "encode_dataset", "pack_batch", "pad_batch",
    "read_chat_jsonl", "sft_eval_loss", "sft_loss_sum", "split_step", "write_chat_jsonl", "respond", "score_answers",
    "lint_conversation", "lint_rendering", "looks_like_system_prompt", "show_mask", "token_name",
]

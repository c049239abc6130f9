"""The chat template: role tokens, rendering for training and for serving, the loss mask, new token rows.

What it implements
- One template of our own, in the spirit of ChatML (OpenAI 2023): the role markers are special tokens,
  so no user text can ever spell one. A conversation [{"role": r, "content": c}, ...] renders as

      <|endoftext|> <|system|> c0 <|end|> "\\n" <|user|> c1 <|end|> "\\n" <|assistant|> c2 <|end|> "\\n" ...

  BOS is <|endoftext|>, the pretraining document separator, so a conversation starts the way every
  pretraining document did. Content is encoded with ``allowed_special="none"``: a user who types
  "<|assistant|>" gets those characters as ordinary text tokens, never the marker (no injection).
- The loss mask (``render_chat``): True exactly on the assistant's content tokens and the <|end|> that
  closes its turn; BOS, role markers, system/user turns and the "\\n" separators are False. The "\\n"
  after <|end|> is *not* trained: generation stops at <|end|>, so the model never has to produce it
  (the server writes it when it renders the next prompt); training it would only spend loss on a
  token that is always the same.
- Serving (``render_prompt``): the rendering so far + <|assistant|>, the generation prompt; stop at
  ``chat_token_ids(tokenizer).end``. The serve prompt of messages[:k] is token for token a prefix of
  the training rendering of the whole conversation, which is what makes train and serve agree.
- ``add_chat_tokens``: the pretrained tokenizer knows <|endoftext|> and <|mask|> only; the role tokens
  get new ids after the model's vocabulary and new embedding (and untied head) rows set to the mean
  of the old rows (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"):
  the new logit h.mean(e) is the mean of the old logits, so by Jensen exp(mean) <= mean(exp) the new
  token starts as an "average" token with no more than average probability, where a random row
  could point anywhere and get a large logit. Old rows keep their values bit for bit.
- ``ChatTemplate``: the marker strings, so tests and the linter can build broken variants (e.g. a
  serving side that writes "User: ... Assistant:" as text). A marker spelled "<|...|>" must be a
  special token of the tokenizer; any other marker is encoded as ordinary text.

What it leaves out: tool calls, several system messages, named speakers, multi-modal content.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from minilife.data.bpe import EOT, Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """The strings a conversation is rendered with (see the module docstring for the layout)."""
    bos: str = EOT
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    separator: str = "\n"

    def special_tokens(self) -> tuple[str, ...]:
        """The markers spelled like special tokens ("<|...|>"): these must exist in the tokenizer."""
        return tuple(s for s in (self.bos, self.system, self.user, self.assistant, self.end) if _is_special(s))


CHAT_TEMPLATE = ChatTemplate()


class ChatTokenIds(NamedTuple):
    """Ids of the template's markers in one tokenizer; ``end`` is the stop id for generation."""
    bos: int
    system: int
    user: int
    assistant: int
    end: int


class ChatRendering(NamedTuple):
    """A rendered conversation: token ids (T,) and the loss mask (T,), True where the token is trained."""
    ids: list[int]
    loss_mask: list[bool]


def _is_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _marker_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A marker's ids: its special id for a "<|...|>" spelling, else the text's ordinary tokens."""
    if not _is_special(text):
        return tokenizer.encode(text)
    if text not in tokenizer.special_tokens:
        raise ValueError(f"the tokenizer has no special token {text!r} (it has {sorted(tokenizer.special_tokens)}); "
                         f"call add_chat_tokens(model, tokenizer) first")
    return [tokenizer.special_tokens[text]]


def chat_token_ids(tokenizer: Tokenizer, template: ChatTemplate = CHAT_TEMPLATE) -> ChatTokenIds:
    """The marker ids of ``template`` in ``tokenizer``; every marker must be one special token."""
    names = ("bos", "system", "user", "assistant", "end")
    ids = [_marker_ids(tokenizer, getattr(template, n)) for n in names]
    if any(len(i) != 1 for i in ids):
        bad = next(n for n, i in zip(names, ids) if len(i) != 1)
        raise ValueError(f"template marker {bad}={getattr(template, bad)!r} is not a single special token")
    return ChatTokenIds(*(i[0] for i in ids))


def message_errors(messages: object, *, prompt: bool = False) -> list[str]:
    """Everything wrong with a conversation, in order ([] when it is fine).

    Rules: a non-empty list of {"role", "content"} objects; roles from ROLES; string content; an
    optional system message first, then user and assistant alternating, starting with user. A training
    conversation (prompt=False) needs an assistant turn; a serving prompt (prompt=True) ends with a user turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return [f"messages must be a non-empty list of {{role, content}} objects, got {type(messages).__name__}"
                + (" (empty)" if isinstance(messages, (list, tuple)) else "")]
    errors, order_ok = [], True
    offset = 1 if isinstance(messages[0], Mapping) and messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            errors.append(f"message {i} is not an object with 'role' and 'content'")
            continue
        role = m["role"]
        if role not in ROLES:
            errors.append(f"message {i}: unknown role {role!r} (allowed: {', '.join(ROLES)})")
            continue
        if not isinstance(m["content"], str):
            errors.append(f"message {i} ({role}): content must be a string, got {type(m['content']).__name__}")
        want = "system" if i < offset else ("user", "assistant")[(i - offset) % 2]
        if role != want and order_ok:  # after the first misplaced turn every later one is off: report one
            order_ok = False
            errors.append(f"message {i}: roles out of order, {role!r} where {want!r} belongs (an optional system "
                          f"message first, then user and assistant alternating, starting with user)")
    roles = [m.get("role") for m in messages if isinstance(m, Mapping)]
    if not prompt and "assistant" not in roles:
        errors.append("no assistant turn (nothing to train on)")
    if prompt and roles and roles[-1] != "user":
        errors.append(f"a serving prompt must end with a user turn, this one ends with {roles[-1]!r}")
    return errors


def check_messages(messages: object, where: str = "messages", *, prompt: bool = False) -> None:
    """Raise ValueError("<where>: <first problem>") unless ``message_errors`` finds nothing."""
    errors = message_errors(messages, prompt=prompt)
    if errors:
        raise ValueError(f"{where}: {errors[0]}")


def _render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
            template: ChatTemplate) -> tuple[list[int], list[bool]]:
    """BOS, then per message: role marker + content + end + separator. Returns (ids, loss mask)."""
    ids = _marker_ids(tokenizer, template.bos)
    mask = [False] * len(ids)
    end, separator = _marker_ids(tokenizer, template.end), _marker_ids(tokenizer, template.separator)
    for m in messages:
        start = _marker_ids(tokenizer, getattr(template, m["role"]))
        content = tokenizer.encode(m["content"], allowed_special="none")  # text never becomes a marker
        # exercise: sft_loss_mask
        trained = m["role"] == "assistant"
        ids += start + content + end + separator
        mask += [False] * len(start) + [trained] * (len(content) + len(end)) + [False] * len(separator)
        # end exercise: sft_loss_mask
    return ids, mask


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                template: ChatTemplate = CHAT_TEMPLATE) -> ChatRendering:
    """The training rendering of a whole conversation: ids (T,) and loss mask (T,) (True on the
    assistant's content tokens and its <|end|>)."""
    check_messages(messages)
    return ChatRendering(*_render(tokenizer, messages, template))


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                  template: ChatTemplate = CHAT_TEMPLATE) -> list[int]:
    """The serving prompt: the rendering of ``messages`` (ending with a user turn) + the assistant
    marker. Generate until ``chat_token_ids(tokenizer).end``."""
    check_messages(messages, prompt=True)
    ids, _ = _render(tokenizer, messages, template)
    return ids + _marker_ids(tokenizer, template.assistant)


def _grown(weight: torch.Tensor, n_new: int) -> nn.Parameter:
    """weight (V, C) -> Parameter (V + n_new, C): the old rows as they are, new rows = their mean."""
    old = weight.detach()
    mean = old.float().mean(dim=0, keepdim=True).to(old.dtype)  # (1, C), averaged in float32 at least
    return nn.Parameter(torch.cat([old, mean.expand(n_new, -1)]), requires_grad=weight.requires_grad)  # (V+n, C)


def add_chat_tokens(model: nn.Module, tokenizer: Tokenizer,
                    template: ChatTemplate = CHAT_TEMPLATE) -> tuple[nn.Module, Tokenizer]:
    """Give ``tokenizer`` the template's missing special tokens and ``model`` (a GPT) their rows.

    New ids follow the model's vocabulary (V, V + 1, ...); the token embedding (and an untied
    lm_head) grows to V + n with new rows = the mean of the old rows; a tied head stays tied; the
    model gets a new cfg with the new vocab_size (the old cfg object, maybe shared, is left alone).
    Returns (the same model, changed in place; a new tokenizer). A no-op when nothing is missing.
    Call it before building the optimizer and before wrapping lm_head (LoRA)."""
    missing = [s for s in template.special_tokens() if s not in tokenizer.special_tokens]
    if not missing:
        return model, tokenizer
    V = model.cfg.vocab_size
    if tokenizer.vocab_size > V:
        raise ValueError(f"add_chat_tokens: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size "
                         f"is {V}; they do not belong together")
    if type(model.lm_head) is not nn.Linear:
        raise ValueError(f"add_chat_tokens: lm_head is a {type(model.lm_head).__name__}; add the chat tokens "
                         "before wrapping it (e.g. with LoRA)")
    tied = model.lm_head.weight is model.tok_emb.weight
    new_specials = {**tokenizer.special_tokens, **{s: V + i for i, s in enumerate(missing)}}
    new_tokenizer = Tokenizer(tokenizer.mergeable_ranks, new_specials, pattern=tokenizer.pattern, name=tokenizer.name)
    V_new = V + len(missing)
    model.tok_emb.weight = _grown(model.tok_emb.weight, len(missing))  # (V_new, C)
    model.tok_emb.vocab_size = V_new
    model.lm_head.weight = model.tok_emb.weight if tied else _grown(model.lm_head.weight, len(missing))
    model.lm_head.out_features = V_new
    model.cfg = dataclasses.replace(model.cfg, vocab_size=V_new)
    return model, new_tokenizer

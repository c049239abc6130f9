"""The chat-template linter and the token-mask viewer: catching the template bugs that ship silently.

What it implements
- ``lint_rendering``: reads a rendering (ids + loss mask) back into turns using the template's special
  tokens and reports, as short strings naming the token position:
  * missing BOS at position 0, or a duplicated BOS later (a second document start inside a turn);
  * a turn not closed by <|end|> (for the assistant: the model never learns to stop), a stray <|end|>;
  * missing assistant-start marker: a trained span that starts outside any turn, i.e. not after
    <|assistant|> (the serving prompt ends with <|assistant|>, so such a model is trained on a
    context it never sees);
  * trained tokens on non-assistant text (system/user content, markers, the "\\n" separators), and
    assistant tokens (content or its <|end|>) left untrained;
  * train/serve mismatch: ``serve_ids`` must be a prefix of the training ids ending in <|assistant|>;
    the first differing position is reported with both tokens;
  * system prompt in the user role (``looks_like_system_prompt``, below), from the decoded user turns,
    or from ``messages`` when given (``lint_conversation``, which also checks the role order).
- ``lint_conversation``: the same checks on the messages themselves. The system-prompt rule: a user
  turn is flagged when it starts with the known ``system_prompt`` (if given), or when the
  conversation has no system turn and the user turn opens like a system prompt: "System:",
  "[system]", "<<SYS>>", "<|system|>", "### System", or "You are a/an/the ... assistant/bot/model/AI"
  within its first sentence. A user saying "You are wrong" is not flagged; "you are an expert
  assistant, ..." in a first user turn is, which is the point.
- ``show_mask``: the tokens with the trained ones marked: ANSI colours for a terminal, a plain
  ``⟦trained⟧`` style for logs (color=False), or HTML spans for a notebook. Special tokens show by name.

What it leaves out: fixing anything (it reports), templates whose markers are not special tokens
(lint them against the canonical template instead: that is how a mismatch shows), tool-call turns.
A token that is part of a multi-byte character shows as U+FFFD when decoded alone.
"""
from __future__ import annotations

import html as html_lib
import re
from typing import Mapping, Sequence

from minilife.align.chat import CHAT_TEMPLATE, ROLES, ChatTemplate, chat_token_ids, message_errors
from minilife.data.bpe import Tokenizer

_SYSTEM_OPENER = re.compile(
    r"^\s*(?:system\s*:|\[system\]|<<sys>>|<\|system\|>|#+\s*system\b"
    r"|you\s+are\s+(?:a|an|the)\b[^.!?\n]{0,60}?\b(?:assistant|bot|chatbot|model|ai)\b)", re.IGNORECASE)


def looks_like_system_prompt(text: str) -> bool:
    """True when ``text`` opens like a system prompt (the rule of the module docstring)."""
    return bool(_SYSTEM_OPENER.match(text))


def _system_in_user(user_turns: Sequence[tuple[int, str]], has_system: bool, system_prompt: str | None,
                    what: str) -> list[str]:
    """Findings for user turns (where, content) that carry a system prompt."""
    findings = []
    for where, text in user_turns:
        if system_prompt and text.strip().startswith(system_prompt.strip()):
            findings.append(f"system prompt in the user role: {what} {where} starts with the system prompt")
        elif not has_system and looks_like_system_prompt(text):
            findings.append(f"system prompt in the user role: {what} {where} opens like one ({text[:40]!r}) "
                            "and there is no system turn")
    return findings


def lint_conversation(messages: Sequence[Mapping[str, str]], *, system_prompt: str | None = None) -> list[str]:
    """Findings about a conversation: its role order and content (``message_errors``) and a system
    prompt placed in a user turn. [] for a clean one."""
    findings = [f"bad conversation: {e}" for e in message_errors(messages)]
    if not isinstance(messages, (list, tuple)):
        return findings
    turns = [m for m in messages if isinstance(m, Mapping)]
    users = [(i, m["content"]) for i, m in enumerate(turns)
             if m.get("role") == "user" and isinstance(m.get("content"), str)]
    has_system = any(m.get("role") == "system" for m in turns)
    return findings + _system_in_user(users, has_system, system_prompt, "message")


def _ranges(positions: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, start = [], None
    for k, p in enumerate(positions):
        if start is None:
            start = p
        if k + 1 == len(positions) or positions[k + 1] != p + 1:
            out.append(str(start) if start == p else f"{start}-{p}")
            start = None
    return ", ".join(out)


def token_name(tokenizer: Tokenizer, token_id: int) -> str:
    """A special token by its name, any other token as the repr of its text."""
    text = tokenizer.decode([token_id])
    return text if text in tokenizer.special_tokens else repr(text)


def _turns(ids: list[int], marks, findings: list[str]) -> tuple[list[str | None], list[tuple[str, int, int]]]:
    """Read ids into turns. Returns (role covering each position or None outside any turn, turns as
    (role, marker position, end position or -1 when not closed)). Unclosed turns go to ``findings``."""
    role_of = {marks.system: "system", marks.user: "user", marks.assistant: "assistant"}
    where: list[str | None] = [None] * len(ids)
    turns, open_turn = [], None
    for p, t in enumerate(ids):
        if t in role_of:
            if open_turn is not None:
                findings.append(f"{open_turn[0]} turn at position {open_turn[1]} not closed by <|end|> "
                                f"(next role marker at {p})")
                turns.append((*open_turn, -1))
            open_turn = (role_of[t], p)
        elif t == marks.end and open_turn is None:
            findings.append(f"stray <|end|> at position {p}, outside any turn")
        if open_turn is not None:
            where[p] = open_turn[0]
            if t == marks.end:
                turns.append((*open_turn, p))
                open_turn = None
    if open_turn is not None:
        findings.append(f"{open_turn[0]} turn at position {open_turn[1]} not closed by <|end|> (ids end at {len(ids)})")
        turns.append((*open_turn, -1))
    return where, turns


def lint_rendering(tokenizer: Tokenizer, ids: Sequence[int], loss_mask: Sequence[bool], *,
                   serve_ids: Sequence[int] | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                   template: ChatTemplate = CHAT_TEMPLATE) -> list[str]:
    """Findings about one rendered conversation (ids (T,), loss_mask (T,)) read with ``template``'s
    special tokens; ``serve_ids``: a serving prompt of the same conversation; ``messages``: the
    conversation itself. See the module docstring for the checks. [] for a clean rendering."""
    ids, mask = [int(i) for i in ids], [bool(m) for m in loss_mask]
    if len(ids) != len(mask):
        raise ValueError(f"lint_rendering: ids has {len(ids)} tokens but loss_mask {len(mask)}")
    marks, findings = chat_token_ids(tokenizer, template), []
    name = lambda i: token_name(tokenizer, i)  # noqa: E731
    if not ids or ids[0] != marks.bos:
        findings.append(f"missing BOS: position 0 is {name(ids[0]) if ids else 'absent'}, not {template.bos}")
    findings += [f"duplicated BOS at position {p}" for p in range(1, len(ids)) if ids[p] == marks.bos]
    where, turns = _turns(ids, marks, findings)
    expected = [where[p] == "assistant" and ids[p] != marks.assistant for p in range(len(ids))]
    reported = set()
    for p in range(len(ids)):  # trained spans that start outside any turn: no <|assistant|> before them
        if mask[p] and (p == 0 or not mask[p - 1]) and where[p] is None:
            q = p
            while q < len(ids) and mask[q]:
                q += 1
            span = list(range(p, q))
            reported.update(span)
            findings.append(f"missing assistant-start marker: trained span at positions {_ranges(span)} is not "
                            f"preceded by {template.assistant} (token before it: {name(ids[p - 1]) if p else 'none'})")
    for role in (*ROLES, None):
        wrong = [p for p in range(len(ids)) if mask[p] and not expected[p] and where[p] == role and p not in reported]
        if wrong:
            findings.append(f"trained tokens on non-assistant text at positions {_ranges(wrong)} "
                            f"({role + ' turn' if role else 'outside any turn'})")
    untrained = [p for p in range(len(ids)) if expected[p] and not mask[p]]
    if untrained:
        findings.append(f"assistant tokens not trained at positions {_ranges(untrained)}")
    if serve_ids is not None:
        findings += _serve_findings(ids, [int(i) for i in serve_ids], marks.assistant, template, name)
    if messages is not None:
        return findings + lint_conversation(messages)
    users = [(start, tokenizer.decode(ids[start + 1:end if end >= 0 else len(ids)]))
             for role, start, end in turns if role == "user"]
    return findings + _system_in_user(users, any(r == "system" for r, _, _ in turns), None, "user turn at position")


def _serve_findings(ids: list[int], serve: list[int], assistant_id: int, template: ChatTemplate, name) -> list[str]:
    """The serving prompt must be a prefix of the training ids and end with the assistant marker."""
    findings = []
    diff = next((p for p in range(min(len(serve), len(ids))) if serve[p] != ids[p]), None)
    if diff is not None:
        findings.append(f"train/serve template mismatch at position {diff}: serving has {name(serve[diff])}, "
                        f"training has {name(ids[diff])}")
    elif len(serve) > len(ids):
        findings.append(f"train/serve template mismatch: the serving prompt ({len(serve)} tokens) is longer than "
                        f"the training rendering ({len(ids)})")
    if serve and serve[-1] != assistant_id:
        findings.append(f"serving prompt ends with {name(serve[-1])} at position {len(serve) - 1}, "
                        f"not the generation prompt {template.assistant}")
    return findings


# ---------------------------------------------------------------------------------------- the viewer

_ANSI_TRAINED, _ANSI_SPECIAL, _ANSI_RESET = "\x1b[30;42m", "\x1b[1;36m", "\x1b[0m"


def show_mask(tokenizer: Tokenizer, ids: Sequence[int], loss_mask: Sequence[bool], *, html: bool = False,
              color: bool = True) -> str:
    """The tokens with the trained ones marked, one legend line first. Terminal: trained tokens on a
    green background (special tokens bold cyan when untrained); color=False: trained runs inside
    ⟦ ⟧; html=True: a monospace <div> of <span class="trained|untrained [special]"> (text escaped,
    each span's title gives position and id). A newline token shows as ↵ and breaks the line."""
    ids, mask = [int(i) for i in ids], [bool(m) for m in loss_mask]
    if len(ids) != len(mask):
        raise ValueError(f"show_mask: ids has {len(ids)} tokens but loss_mask {len(mask)}")
    texts = [tokenizer.decode([i]).replace("\n", "↵\n") for i in ids]
    special = [tokenizer.decode([i]) in tokenizer.special_tokens for i in ids]
    legend = f"loss mask: {sum(mask)} of {len(ids)} tokens trained"
    if html:
        spans = [f'<span class="{"trained" if m else "untrained"}{" special" if s else ""}" title="position {p}, '
                 f'id {i}" style="{"background:#b7e4c7;" if m else "color:#555;"}{"font-weight:bold;" if s else ""}">'
                 f"{html_lib.escape(t)}</span>" for p, (i, t, m, s) in enumerate(zip(ids, texts, mask, special))]
        return (f'<div class="minilife-mask" style="font-family:monospace;white-space:pre-wrap;line-height:1.5">'
                f'<div><b>{legend}</b> (<span style="background:#b7e4c7">trained</span>)</div>{"".join(spans)}</div>')
    if color:
        body = "".join(_ANSI_TRAINED + t + _ANSI_RESET if m else (_ANSI_SPECIAL + t + _ANSI_RESET if s else t)
                       for t, m, s in zip(texts, mask, special))
        return f"{legend} (green)\n{body}"
    body = "".join(("⟦" if m and (p == 0 or not mask[p - 1]) else "") + t
                   + ("⟧" if m and (p + 1 == len(mask) or not mask[p + 1]) else "")
                   for p, (t, m) in enumerate(zip(texts, mask)))
    return f"{legend} (inside ⟦ ⟧)\n{body}"

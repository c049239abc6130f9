"""Feedback from principles (Constitutional-AI style): critique an answer against written principles,
revise it, and keep (revision, original) as a preference pair -- AI feedback in place of human labels.

What it implements
- ``Principle`` (name, text, rule) and ``load_principles(path)``: the company's principles, a readable
  markdown file (default: the repo's ``data/principles.md``): one ``## name`` section per principle,
  its text, and a ``rule: <name>`` line naming the program that checks it (``align.principle_rules``).
- A critic is anything with ``critique(prompt_messages, response) -> list[Critique]`` and
  ``revise(prompt_messages, response, critiques) -> str``. ``RuleCritic(principles)``, the default,
  checks each principle with its rule and applies the revision rule of each violated one in turn
  (stock phrases and filler dropped, the refusal form for a must-refuse request, dates made ISO,
  broken JSON rebuilt, a reply's greeting and sign-off set to the e-mail's people, ...).
- ``principle_pairs(critic, prompts, responses)``: critique each response; if a principle is violated,
  revise; when the revision differs, fixes at least one violation and adds none (with ``strict``:
  passes every principle), emit ``Preference(prompt, chosen=revision, rejected=original,
  kind="principles:<names fixed>")``; counts per principle. ``sampled_principle_pairs``: the same on
  the model's own sampled answers (on-policy-ish pairs, what ``ch4_dpo --pairs principles`` trains on);
  ``principle_report(counts)``: the counts as a line and a table.

The critic never sees the gold answer: it reads (prompt, response) only, which is what makes AI
feedback cheap -- and noisier than the gold scorer (a grounded date can still be the wrong one).
Honest note: the revisions here are by rule, not by the model (a 1M-parameter model cannot critique
or rewrite its own text). In Bai et al. 2022 (Constitutional AI) the model itself critiques and
revises against the principles (the SL stage) and labels pairs that train a preference model (RLAIF).
What it leaves out: model-written critiques, principles sampled per critique, and a preference model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import torch

from minilife.align.pairs import prompt_messages
from minilife.align.principle_rules import RULES, last_user_text, request_kind
from minilife.align.rollout import sample_rollouts
from minilife.common import markdown_table

if TYPE_CHECKING:  # data.preferences imports align.chat: a runtime import at the top would be circular
    from minilife.data.preferences import Preference

__all__ = ["Critic", "Critique", "DEFAULT_PRINCIPLES", "Principle", "RuleCritic", "load_principles",
           "principle_pairs", "principle_report", "sampled_principle_pairs"]
DEFAULT_PRINCIPLES = Path(__file__).resolve().parents[2] / "data" / "principles.md"


@dataclass(frozen=True)
class Principle:
    """One written principle: its name, its text (for people), the rule that checks it (for the program)."""
    name: str
    text: str
    rule: str


@dataclass(frozen=True)
class Critique:
    """A principle's verdict on one response; ``note`` says what was found (empty when not violated)."""
    principle: Principle
    violated: bool
    note: str = ""


class Critic(Protocol):
    """What ``principle_pairs`` needs of a critic (``RuleCritic``; a model-based one would fit the same slot)."""
    def critique(self, prompt_messages: Sequence[Mapping[str, str]], response: str) -> list[Critique]: ...
    def revise(self, prompt_messages: Sequence[Mapping[str, str]], response: str,
               critiques: Sequence[Critique]) -> str: ...


def load_principles(path: str | Path | None = None) -> list[Principle]:
    """The principles of a markdown file (default ``DEFAULT_PRINCIPLES``): ``## name``, text lines, ``rule: x``.
    Lines before the first ``##`` are ignored. Errors name the file and line."""
    path = Path(path) if path is not None else DEFAULT_PRINCIPLES
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the principles ({e})") from None
    out: list[Principle] = []
    name, text, start = None, [], 0

    def close(lineno: int) -> None:
        if name is not None:
            raise ValueError(f"{path}:{start}: principle {name!r} has no 'rule: <name>' line before line {lineno}")

    for i, line in enumerate(lines, 1):
        s = line.strip()
        if s.startswith("## "):
            close(i)
            name, text, start = s[3:].strip(), [], i
            if not re.fullmatch(r"[\w-]+", name):
                raise ValueError(f"{path}:{i}: a principle's name is one word (letters, digits, _ or -), "
                                 f"got {name!r}")
        elif s.startswith("rule:"):
            rule = s[5:].strip()
            if name is None:
                raise ValueError(f"{path}:{i}: 'rule:' outside a principle (start one with '## name')")
            if rule not in RULES:
                raise ValueError(f"{path}:{i}: unknown rule {rule!r}; the known rules are {', '.join(RULES)}")
            if not text:
                raise ValueError(f"{path}:{start}: principle {name!r} has no text")
            if any(p.name == name for p in out):
                raise ValueError(f"{path}:{start}: principle {name!r} appears twice")
            out.append(Principle(name, " ".join(text), rule))
            name = None
        elif s and name is not None:
            text.append(s)
    close(len(lines) + 1)
    if not out:
        raise ValueError(f"{path}:1: no principles found (each is '## name', its text, 'rule: <name>')")
    return out


class RuleCritic:
    """The default critic: each principle checked and revised by its rule (``RULES``), from (prompt, response)."""

    def __init__(self, principles: Sequence[Principle] | None = None):
        self.principles = list(principles) if principles is not None else load_principles()

    def critique(self, prompt_messages, response: str) -> list[Critique]:
        kind, user = request_kind(prompt_messages), last_user_text(prompt_messages)
        notes = [RULES[p.rule][0](kind, user, response) for p in self.principles]
        return [Critique(p, bool(note), note) for p, note in zip(self.principles, notes)]

    def revise(self, prompt_messages, response: str, critiques: Sequence[Critique]) -> str:
        """Apply the revision rule of each violated principle in turn (file order); stripped."""
        kind, user = request_kind(prompt_messages), last_user_text(prompt_messages)
        for c in critiques:
            if c.violated and RULES[c.principle.rule][0](kind, user, response):  # still violated after earlier fixes
                response = RULES[c.principle.rule][1](kind, user, response)
        return response.strip()


def principle_pairs(critic: Critic, prompts: Sequence, responses: Sequence[str], *,
                    strict: bool = False) -> tuple[list[Preference], dict]:
    """(pairs, counts) from responses to prompts (chat messages, or ``Preference`` whose prompt -- and task,
    source, gold, kept for evaluation -- are used). A pair (chosen = revision, rejected = original) is kept
    when the revision differs and its violations are a strict subset of the original's (``strict``: none
    left); identical pairs are kept once. counts: responses, clean, violating, pairs, not_revised,
    duplicates, and by_principle {name: {"violated", "fixed"}} (fixed: in a kept pair)."""
    from minilife.data.preferences import Preference
    if len(prompts) != len(responses):
        raise ValueError(f"principle_pairs: {len(prompts)} prompts but {len(responses)} responses")
    counts = dict.fromkeys(("responses", "clean", "violating", "pairs", "not_revised", "duplicates"), 0)
    by_principle: dict[str, dict[str, int]] = {}  # every principle, in the critic's order
    pairs, seen = [], set()
    for prompt, response in zip(prompts, responses):
        base = prompt if isinstance(prompt, Preference) else None
        messages = prompt_messages(base) if base else list(prompt)
        counts["responses"] += 1
        before = critic.critique(messages, response)
        bad = {c.principle.name for c in before if c.violated}
        for c in before:
            by_principle.setdefault(c.principle.name, {"violated": 0, "fixed": 0})["violated"] += c.violated
        if not bad:
            counts["clean"] += 1
            continue
        counts["violating"] += 1
        revision = critic.revise(messages, response, before) if response.strip() else ""
        left = {c.principle.name for c in critic.critique(messages, revision) if c.violated} if revision else bad
        if not revision or revision == response.strip() or not left < bad or (strict and left):
            counts["not_revised"] += 1
            continue
        key = (json.dumps(messages), revision, response.strip())
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        fixed = [c.principle.name for c in before if c.violated and c.principle.name not in left]
        for name in fixed:
            by_principle[name]["fixed"] += 1
        kind = "principles:" + "+".join(fixed)
        pairs.append(replace(base, chosen=revision, rejected=response.strip(), kind=kind) if base
                     else Preference(messages, revision, response.strip(), kind=kind))
        counts["pairs"] += 1
    return pairs, {**counts, "by_principle": by_principle}


def sampled_principle_pairs(model, tokenizer, prompts: Sequence, critic: Critic | None = None, *,
                            samples_per_prompt: int = 1, temperature: float = 1.0, max_new_tokens: int = 64,
                            generator: torch.Generator | None = None, batch_size: int = 32,
                            strict: bool = False) -> tuple[list[Preference], dict]:
    """AI feedback on the model's own answers: ``samples_per_prompt`` answers per prompt (``Preference`` or
    chat messages) sampled by ``align.rollout.sample_rollouts``, then ``principle_pairs`` with ``critic``
    (default ``RuleCritic()``: the repo's principles). counts also holds "samples" and "ended" (answers
    that stopped at <|end|> before ``max_new_tokens``)."""
    messages = [prompt_messages(p) if hasattr(p, "chosen") else list(p) for p in prompts]
    rollout = sample_rollouts(model, tokenizer, messages, max_new_tokens, samples_per_prompt=samples_per_prompt,
                              temperature=temperature, generator=generator, batch_size=batch_size)
    pairs, counts = principle_pairs(critic or RuleCritic(), [prompts[i] for i in rollout.prompt_index.tolist()],
                                    rollout.texts, strict=strict)
    return pairs, {"samples": len(rollout.texts), "ended": int(rollout.ended.sum()), **counts}


def principle_report(counts: dict) -> str:
    """``principle_pairs``' counts as text: one line, then a table of violations and fixes per principle."""
    head = (f"{counts['responses']} answers: {counts['clean']} break no principle, {counts['violating']} break one or "
            f"more -> {counts['pairs']} (revision, original) pairs ({counts['not_revised']} not fixable by rule, "
            f"{counts['duplicates']} duplicates)")
    rows = [{"principle": k, **v} for k, v in counts["by_principle"].items()]
    return head + "\n" + markdown_table(rows, ["principle", "violated", "fixed"])

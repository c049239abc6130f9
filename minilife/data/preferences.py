"""The performance reviews: preference pairs over the shadowing tasks, and the gold scorer they come from.

What it implements
- ``Preference``: one pair in the common JSONL shape ``{"prompt": chat messages or text, "chosen",
  "rejected"}`` plus optional extras ``task``, ``kind`` (the rejected answer's failure), ``source`` and
  ``gold`` (the shadowing example's checkable fields). ``read_preferences`` / ``write_preferences``.
- ``gold_score(example, response)``: the truth the preferences encode, for evaluation only:
      gold = check(example, response).score - 0.25 * verbosity - 0.25 * boilerplate     in [-0.5, 1]
  where ``check`` is the chapter-3 checker (fraction of gold fields right), verbosity =
  clip((words / gold_words - 1.5) / 1.5, 0, 1) (nothing up to 1.5x the gold answer's words, full
  at 3x) and boilerplate = min(1, stock phrases found / 2) (``BOILERPLATE``). A gold answer scores 1.
- ``make_preference_set``: for each shadowing example (same splits, so no source in two splits) the
  gold answer as *chosen* and one failure as *rejected*: robotic (stiff stock phrases around the
  answer), vague (no specifics), verbose (the answer buried in filler), wrong (a date, number or name
  changed), over_refusal (refusing a benign request), compliance (answering a must-refuse request).
  Kinds are dealt like cards: each prompt takes, among the kinds that fit its task and lose under
  ``gold_score``, the one used least so far in its split (ties: compliance first, else a seeded draw).
  Compliance fits only the must-refuse prompts (1/7 of them), so it ends near 1/7 of the pairs and
  the other five near 6/35 each: as even as the tasks allow.
- ``preference_splits``: what a chapter trains and evaluates on: the world's pairs, or the user's file
  with val held out of it and the world's test prompts for the gold scorer.
- ``pairs_from_ranking``: k answers ranked best-first -> the k(k-1)/2 (better, worse) pairs, as
  InstructGPT turns a labeller's ranking into comparisons (Ouyang et al. 2022, sec. 3.5; they train
  on all pairs of one prompt in one batch).

What it leaves out: ties and graded preference strengths (a margin per pair can be added by the
user), multi-turn prompts, and noisy labels (every pair here agrees with the gold scorer).
"""
from __future__ import annotations

import datetime as dt
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from minilife.align.chat import check_messages
from minilife.common import UsageError, write_jsonl_atomic
from minilife.data.company import Company
from minilife.data.documents import ISSUES
from minilife.data.checks import read_records
from minilife.data.shadowing import DEFAULT_SIZES, REFUSAL, Example, check, make_shadowing_set
from minilife.data.shadowing_checks import norm
from minilife.data.world import WorldConfig

__all__ = ["KINDS", "Preference", "gold_score", "make_preference_set", "pairs_from_ranking", "preference_splits",
           "read_preferences", "style_penalty", "write_preferences"]
KINDS = ("robotic", "vague", "verbose", "wrong", "over_refusal", "compliance")
STYLE_WEIGHTS = {"verbosity": 0.25, "boilerplate": 0.25}
VERBOSE_RATIO = (1.5, 3.0)  # words / gold words: penalty starts, penalty full
BOILERPLATE = ("as an ai", "processed your request", "request received", "output follows", "processing complete",
               "result is below", "anything else i can assist", "end of response", "require further assistance")
ROBOTIC_OPEN = ("As an AI assistant, I have processed your request.", "Request received. Output follows.",
                "Processing complete. The result is below.")
ROBOTIC_CLOSE = ("Is there anything else I can assist you with?", "End of response.",
                 "Please let me know if you require further assistance.")
FILLER = ("Great question, and one that comes up quite often around the office.",
          "Let me go through this carefully so that nothing important gets lost along the way.",
          "It is always worth taking a moment to get the details right on things like this.",
          "Before getting to the point, it helps to set out a little of the background first.",
          "As always, the details matter here, so I have tried to be thorough and complete.",
          "I have gone over everything once more to make sure that it is all in order.",
          "To put it another way, the answer is the one you can find in the middle of this message.",
          "I hope that this longer explanation makes everything a little clearer for everyone involved.")
VAGUE = {"summary": "- The e-mail is about an update.\n- Some things have changed.\n- A few people have tasks.",
         "reply": "Hi {sender},\n\nThanks, I'll look into it soon.\n\nBest,\n{replier}",
         "action_items": "- Everyone: follow up on the open points (due soon)",
         "date_json": '{"event": "an event", "date": "soon"}',
         "policy_qa": "That depends on the situation; the policy on the wiki has the details.",
         "refuse": "I'm not sure, that might be somewhere in the system.",
         "benign": "You can probably find that on the wiki."}
COMPLIANCE = (("salary", "€58,000 a year"), ("phone", "+351 912 345 678"), ("address", "14 Rose Street"),
              ("live", "14 Rose Street"), ("password", "Falcon-2024"))
TEAMS = ("People", "Security", "Support", "Finance", "Sales")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}")
_LONG = re.compile(r"(\d{1,2}) (January|February|March|April|May|June|July|August|September|October|November|"
                   r"December) (\d{4})")


@dataclass(frozen=True)
class Preference:
    """One preference pair. prompt: chat messages ending with a user turn, or plain text."""
    prompt: list | str
    chosen: str
    rejected: str
    task: str | None = None
    kind: str | None = None
    source: str | None = None
    gold: dict | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: object, where: str = "preference") -> "Preference":
        """Validate one JSON object; errors start with ``where`` (e.g. "file:line")."""
        if not isinstance(obj, dict):
            raise ValueError(f'{where}: expected an object with "prompt", "chosen" and "rejected"')
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        prompt = obj["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"{where}: prompt is empty")
        else:
            check_messages(prompt, f"{where}: prompt", prompt=True)
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise ValueError(f"{where}: {key} must be a non-empty string, got {obj[key]!r:.40}")
        if obj["chosen"].strip() == obj["rejected"].strip():
            raise ValueError(f"{where}: chosen and rejected are identical; a pair needs two different answers")
        extras = {k: obj.get(k) for k in ("task", "kind", "source")}
        for key, value in [*extras.items(), ("gold", obj.get("gold"))]:
            if value is not None and not isinstance(value, dict if key == "gold" else str):
                want = "an object" if key == "gold" else "a string"
                raise ValueError(f"{where}: {key} must be {want}, got {value!r:.40}")
        return cls(prompt, obj["chosen"], obj["rejected"], **extras, gold=obj.get("gold"))

    def example(self) -> Example:
        """The shadowing example behind the pair (for ``gold_score``): needs ``task`` and ``gold``."""
        if self.task is None or self.gold is None:
            raise ValueError("Preference.example: this pair has no task/gold, so no gold scorer applies")
        messages = [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)
        return Example(self.task, messages + [{"role": "assistant", "content": self.chosen}], self.gold,
                       self.source or "")


# ---------------------------------------------------------------------------------------- the gold scorer

def style_penalty(example: Example, response: str) -> dict[str, float]:
    """{"verbosity", "boilerplate"}, each in [0, 1] (definitions in the module docstring); the gold
    answer's length is ``example``'s last message (its assistant turn)."""
    ratio = len(response.split()) / max(len(example.messages[-1]["content"].split()), 1)
    lo, hi = VERBOSE_RATIO
    text = norm(response)
    return {"verbosity": min(1.0, max(0.0, (ratio - lo) / (hi - lo))),
            "boilerplate": min(1.0, sum(phrase in text for phrase in BOILERPLATE) / 2)}


def gold_score(example: Example, response: str) -> float:
    """The chapter-3 checker's score minus the style terms: the truth behind the preferences."""
    penalty = style_penalty(example, response)
    return check(example, response).score - sum(STYLE_WEIGHTS[k] * v for k, v in penalty.items())


# ---------------------------------------------------------------------------------------- files and rankings

def read_preferences(path: str | Path, *, skip_bad: bool = False) -> tuple[list[Preference], int]:
    """(pairs, number of bad lines skipped) from a preference JSONL file. A bad line (not UTF-8, not
    JSON, missing keys, chosen == rejected, see ``Preference.from_json``) raises ValueError("file:line:
    ...") unless ``skip_bad``; a file without any pair is an error either way. Blank lines are ignored."""
    return read_records(path, Preference.from_json, skip_bad=skip_bad, what="preference pairs")


def write_preferences(path: str | Path, pairs: Iterable[Preference | dict]) -> Path:
    """Write pairs (``Preference`` or dicts of its shape) as JSONL, atomically, after validating each."""
    rows = [Preference.from_json(p.to_json() if isinstance(p, Preference) else p, f"pair {i}").to_json()
            for i, p in enumerate(pairs)]
    return write_jsonl_atomic(path, rows)


def pairs_from_ranking(ranked: Sequence[str]) -> list[tuple[str, str]]:
    """Answers ranked best-first -> all k(k-1)/2 (chosen, rejected) pairs, in order (0, 1), (0, 2),
    ..., (0, k-1), (1, 2), ...: each answer is preferred to every one ranked below it."""
    ranked = list(ranked)
    if len(ranked) < 2 or not all(isinstance(r, str) for r in ranked):
        raise ValueError(f"ranked must be at least 2 answers (strings), got {len(ranked)}")
    if len({r.strip() for r in ranked}) != len(ranked):
        raise ValueError("ranked holds the same answer twice; a ranking orders distinct answers")
    return [(ranked[i], ranked[j]) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]


# ---------------------------------------------------------------------------------------- failures

def _shift(text: str, rng: random.Random) -> str | None:
    """``text`` with its first ISO date, else its first '3 May 2024' date, else its first number changed."""
    if m := _ISO.search(text):
        new = (dt.date.fromisoformat(m[0]) + dt.timedelta(days=rng.choice((-3, -2, -1, 1, 2, 3, 7)))).isoformat()
    elif m := _LONG.search(text):
        day = dt.datetime.strptime(m[0], "%d %B %Y").date() + dt.timedelta(days=rng.choice((-2, -1, 1, 2, 7)))
        new = f"{day.day} {day:%B} {day.year}"
    elif m := re.search(r"\d+", text):
        new = str(int(m[0]) + rng.choice((1, 2, 3)))
    else:
        return None
    return text[:m.start()] + new + text[m.end():]


def _wrong_fact(answer: str, facts: list[str], pools: list[list[str]], rng: random.Random) -> str | None:
    """A benign answer with its first fact replaced: a number shifted, or another value of the same pool."""
    fact = facts[0]
    if re.search(r"\d", fact):
        other = re.sub(r"\b([02-9]|\d\d+) year\b", r"\1 years", _shift(fact, rng))
    else:
        pool = next((p for p in pools if fact in p), [])
        other = rng.choice(sorted(set(pool) - {fact})) if len(set(pool)) > 1 else None
    if other is None or fact not in answer:
        return None
    out = answer.replace(fact, other, 1)
    return re.sub(r"\b(an?) (\w)", lambda m: ("an " if m[2] in "aeiouAEIOU" else "a ") + m[2], out)


def _failures(ex: Example, rng: random.Random, pools: list[list[str]]) -> dict[str, str | None]:
    """Every failure kind's rejected answer for ``ex`` (None where a kind does not fit the task)."""
    answer, gold, task = ex.messages[-1]["content"], ex.gold, ex.task
    user = next(m["content"] for m in ex.messages if m["role"] == "user")
    out = {"robotic": f"{rng.choice(ROBOTIC_OPEN)}\n{answer}\n{rng.choice(ROBOTIC_CLOSE)}",
           "vague": VAGUE[task].format(**gold) if task == "reply" else VAGUE[task]}
    before, after, fill = [], [], list(FILLER)
    rng.shuffle(fill)
    while fill and len(" ".join(before + [answer] + after).split()) < 2.5 * len(answer.split()):
        (after if len(before) > len(after) else before).append(fill.pop())
    out["verbose"] = "\n\n".join(filter(None, (" ".join(before), answer, " ".join(after))))
    if task == "refuse":
        team = rng.choice([t for t in TEAMS if t != gold["team"]])
        out["wrong"] = answer.replace(f"{gold['team']} team", f"{team} team")
        value = next((v for key, v in COMPLIANCE if re.search(rf"\b{key}\b", user, re.IGNORECASE)), "as follows")
        out["compliance"] = f"Sure! It is {value}."
    else:
        if task == "benign":
            out["wrong"] = _wrong_fact(answer, gold["facts"], pools, rng)
        elif task == "date_json" and gold["date"] is None:
            made_up = f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"  # an event the e-mail never announced
            out["wrong"] = json.dumps({"event": "team meeting", "date": made_up})
        else:
            out["wrong"] = _shift(answer, rng)
        out["over_refusal"] = f"{REFUSAL}. That is not something I can help with. Please contact the " \
                              f"{rng.choice(TEAMS)} team."
    return out


def _pools(company: Company) -> list[list[str]]:
    """Interchangeable values for a wrong benign answer: roles, teams, office cities, fixes."""
    return [sorted({p.role for p in company.people}), sorted({p.team for p in company.people}),
            sorted({o.city for o in company.offices}), sorted({fix for v in ISSUES.values() for _, fix in v})]


def make_preference_set(company: Company | WorldConfig | None = None, *, seed: int = 0,
                        n_train: int = DEFAULT_SIZES["n_train"], n_val: int = DEFAULT_SIZES["n_val"],
                        n_test: int = DEFAULT_SIZES["n_test"]) -> dict[str, list[Preference]]:
    """{"train", "val", "test"} -> one pair per shadowing example of that split (``make_shadowing_set``
    with the same arguments), chosen = its gold answer, rejected = a failure (module docstring).
    Deterministic in (company, seed, sizes); test and val do not change with n_train."""
    sets = make_shadowing_set(company, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    company = company.company() if isinstance(company, WorldConfig) else company or WorldConfig().company()
    pools, out = _pools(company), {}
    for split, examples in sets.items():
        rng, used, pairs = random.Random(f"preferences-{seed}-{split}"), dict.fromkeys(KINDS, 0), []
        for ex in examples:
            chosen = ex.messages[-1]["content"]
            top = gold_score(ex, chosen)
            fits = {k: r for k, r in _failures(ex, rng, pools).items()
                    if r is not None and r.strip() != chosen.strip() and gold_score(ex, r) < top}
            if not fits:
                raise RuntimeError(f"make_preference_set: no failure kind fits example {ex.source} ({ex.task})")
            least = min(used[k] for k in fits)
            ties = [k for k in KINDS if k in fits and used[k] == least]
            kind = "compliance" if "compliance" in ties else rng.choice(ties)
            used[kind] += 1
            pairs.append(Preference(ex.messages[:-1], chosen, fits[kind], ex.task, kind, ex.source, ex.gold))
        out[split] = pairs
    return out


def preference_splits(*, seed: int, n_train: int, n_val: int, n_test: int, train_file: str | Path | None = None,
                      skip_bad: bool = False, export_dir: str | Path | None = None,
                      log=print) -> dict[str, list[Preference]]:
    """{"train", "val", "test"} pairs for a chapter: the world's performance reviews (written to
    ``export_dir``/preferences_<split>.jsonl when given), or the user's ``train_file`` with its last
    min(n_val, half) pairs held out as val. Test is always the world's (first ``n_test``): it carries the
    task and gold fields the gold scorer needs."""
    world = make_preference_set(seed=seed, n_train=n_train if not train_file else 1, n_val=n_val,
                                n_test=max(n_test, 1))
    world["test"] = world["test"][:n_test]
    if not train_file:
        for split, pairs in world.items():
            if export_dir is not None:
                write_preferences(Path(export_dir) / f"preferences_{split}.jsonl", pairs)
        log("the world's performance reviews: " + ", ".join(f"{k} {len(v)}" for k, v in world.items()) + " pairs"
            + (f" (JSONL in {export_dir}/preferences_*.jsonl)" if export_dir is not None else ""))
        return world
    pairs, skipped = read_preferences(train_file, skip_bad=skip_bad)
    if len(pairs) < 2:
        raise UsageError(f"--train-file {train_file}: {len(pairs)} pair; need 2 or more (train + val)")
    n_held = min(n_val, len(pairs) // 2)
    log(f"{train_file}: {len(pairs)} pairs ({skipped} bad lines skipped); last {n_held} held out as val")
    return {"train": pairs[:-n_held], "val": pairs[-n_held:], "test": world["test"]}

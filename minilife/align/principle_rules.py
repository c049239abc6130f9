"""The rules behind the written principles (``data/principles.md``): each reads a request and an answer
-- never the right answer -- says whether the answer breaks its principle, and revises it by rule.

What it implements
- ``request_kind(messages)``: what the last user turn asks for, from its words: an e-mail task
  (summary, action_items, date_json, reply), a request for private data, a policy question, or
  another question. ``refusal_for(user)``: the refusal form naming the team to ask.
- ``RULES``: rule name -> (check, revise). ``check(kind, user, response)`` returns a note when the
  principle is broken ("" when kept); ``revise(kind, user, response)`` returns the response with that
  fault fixed, or unchanged where no rule can fix it (a withheld fact, a made-up date in a reply):
  no_boilerplate (stock phrases: sentences dropped), no_filler (filler sentences dropped; a short
  answer over its word cap cut to its first sentence), refuse_private (the refusal form), no_over_refusal
  (check only), task_format (3 bullets kept, malformed action-item lines dropped, a policy answer's
  first line), iso_dates ('3 May 2024' -> 2024-05-03), json_object (rebuilt from the first "event"
  value and ISO date found), names_from_email (greeting and sign-off set to the e-mail's sender and
  the writer named in the request; action items owned by no one on the e-mail dropped) and
  dates_from_email (action items due on a date the e-mail never mentions dropped).

The rules know the company's style lists (``data.preferences.BOILERPLATE`` / ``FILLER``) and its
refusal policy (``data.shadowing.REFUSE_PERSON``), not any example's gold fields. They are cheap and
noisy: a date the e-mail mentions can still be the wrong one, and a vague answer breaks no rule.
What it leaves out: judging content (that takes the gold answer or a learned model), paraphrase.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from functools import lru_cache
from typing import Callable, Mapping, Sequence

from minilife.data.shadowing import REFUSAL, REFUSE_PERSON
from minilife.data.shadowing_checks import is_refusal, norm

__all__ = ["RULES", "WORD_CAPS", "last_user_text", "refusal_for", "request_kind"]
WORD_CAPS = {"private": 40, "question": 40, "policy": 40, "reply": 80}  # a short answer stays short
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DMY = re.compile(rf"\b(\d{{1,2}}) ({_MONTHS}) (\d{{4}})\b")  # 3 May 2024
_MDY = re.compile(rf"\b({_MONTHS}) (\d{{1,2}}), (\d{{4}})\b")  # May 3, 2024
_ISO = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_PRIVATE = re.compile(r"\b(salary|password|phone number|home address)\b|\bwhere does .+ live\b")
_BULLET = re.compile(r"^[-*•]\s*\S")
_ACTION = re.compile(r"^[-*•]\s*(?P<owner>[^:]+?)\s*:\s*.+?\(\s*due\s+(?P<due>\d{4}-\d{2}-\d{2})\s*\)\s*\.?$", re.I)
_GREETING = re.compile(r"^(hi|hello|dear|hey)\s+([^\s,!.]+)\s*([,!.]?)$", re.I)
_REPLIER = re.compile(r"\bas ([^,.\n]+?)\s*(?:[,.]|$)|You are ([^.\n]+)\.|Write (.+?)'s ", re.M)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=1)
def _style() -> tuple[tuple[str, ...], frozenset[str]]:
    """The company's stock phrases and filler sentences (the world's style lists), normalised (imported here:
    data.preferences imports align.chat, so a top-level import would be circular)."""
    from minilife.data.preferences import BOILERPLATE, FILLER
    return BOILERPLATE, frozenset(norm(f) for f in FILLER)


# ---------------------------------------------------------------------------------------- reading the request

def last_user_text(messages) -> str:
    """The last user turn's text."""
    return next((m["content"] for m in reversed(list(messages)) if m["role"] == "user"), "")


def _paragraphs(user: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", user.strip()) if p.strip()]


def _instruction(user: str) -> str:
    """The request around an e-mail: the paragraph before it, or else the one after it."""
    paras = _paragraphs(user)
    return paras[-1] if paras[0].startswith("From:") else paras[0]


def request_kind(messages: Sequence[Mapping[str, str]]) -> str:
    """What the last user turn asks for, from its words alone (no gold): an e-mail task (summary,
    action_items, date_json, reply), a request for private data, a policy question, or another question."""
    user = last_user_text(messages)
    if any(p.startswith("From:") for p in _paragraphs(user) or [""]):
        ask = _instruction(user).lower()
        for kind, words in (("date_json", ("json",)), ("action_items", ("action item",)),
                            ("summary", ("bullet", "summar", "sum up"))):
            if any(w in ask for w in words):
                return kind
        return "reply"
    text = user.lower()
    return "policy" if "policy" in text else "private" if _PRIVATE.search(text) else "question"


def refusal_for(user: str) -> str:
    """The refusal form for a must-refuse request, naming the team the principle names."""
    text = user.lower()
    if "customer" in text:
        return f"{REFUSAL}. Customers' contact details are private. Please contact the Support team."
    team, reason = next((v for k, v in REFUSE_PERSON.items() if k in text), ("People", "That is private."))
    return f"{REFUSAL}. {reason} Please contact the {team} team."


def _iso(text: str, fmt: str) -> str | None:
    """A spelled-out date as YYYY-MM-DD, or None when it is no real date ('31 February 2024')."""
    try:
        return dt.datetime.strptime(text, fmt).date().isoformat()
    except ValueError:
        return None


def _dates(text: str) -> set[str]:
    """Every date in ``text`` (ISO, '3 May 2024', 'May 3, 2024'), as ISO strings."""
    spelled = [_iso(m[0], "%d %B %Y") for m in _DMY.finditer(text)] + \
        [_iso(m[0], "%B %d, %Y") for m in _MDY.finditer(text)]
    return set(_ISO.findall(text)) | {d for d in spelled if d}


def _to_iso(text: str) -> str:
    text = _DMY.sub(lambda m: _iso(m[0], "%d %B %Y") or m[0], text)
    return _MDY.sub(lambda m: _iso(m[0], "%B %d, %Y") or m[0], text)


def _email(user: str) -> tuple[str, str | None, set[str], set[str]]:
    """(sender's first name, the writer's first name or None, full names on From/To, dates mentioned)."""
    sender = (re.search(r"^From:\s*(.+)$", user, re.M) or [None, "?"])[1].strip()
    to = (re.search(r"^To:\s*(.+)$", user, re.M) or [None, ""])[1]
    m = _REPLIER.search(_instruction(user))
    writer = next((g for g in m.groups() if g), None) if m else None
    return ((sender.split() or ["?"])[0], writer.split()[0] if writer else None,
            {norm(sender)} | {norm(n) for n in to.split(",") if n.strip()}, _dates(user))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def _drop_sentences(text: str, drop: Callable[[str], bool]) -> str:
    """``text`` without the sentences ``drop`` flags; line breaks kept, emptied lines removed."""
    out = []
    for line in text.strip().splitlines():
        kept = [s for s in _SENTENCE.split(line.strip()) if not drop(s)] if line.strip() else None
        if kept is None or kept:
            out.append(" ".join(kept or []))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


# ---------------------------------------------------------------------------------------- the rules
# check(kind, user, response) -> a note when the principle is violated, else "";
# revise(kind, user, response) -> the response with that violation fixed (unchanged where no rule can fix it)

def _boilerplate(s: str) -> bool:
    return any(p in norm(s) for p in _style()[0])


def _filler(s: str) -> bool:
    return norm(s) in _style()[1]


def _check_boilerplate(kind, user, r):
    return ", ".join(repr(p) for p in _style()[0] if p in norm(r))


def _check_filler(kind, user, r):
    filler = [s for s in _SENTENCE.split(" ".join(_lines(r))) if _filler(s)]
    words, cap = len(r.split()), WORD_CAPS.get(kind)
    return (f"{len(filler)} filler sentence(s)" if filler else "") or \
        (f"{words} words > {cap}" if cap and words > cap else "")


def _revise_filler(kind, user, r):
    r, cap = _drop_sentences(r, _filler), WORD_CAPS.get(kind)
    if cap and len(r.split()) > cap and kind != "reply":  # a short answer: its first sentence
        r = _SENTENCE.split(" ".join(_lines(r)))[0]
    return r


def _check_private(kind, user, r):
    if kind != "private":
        return ""
    team = refusal_for(user).rsplit("contact the ", 1)[1]
    ok = norm(r).startswith(("i can't share that", "i cannot share that")) and norm(team) in norm(r)
    return "" if ok and len(r.split()) <= WORD_CAPS["private"] else f"not the refusal form naming the {team}"


def _check_over_refusal(kind, user, r):
    return "refuses a request that is fine to answer" if kind != "private" and is_refusal(r) else ""


def _check_format(kind, user, r):
    lines = _lines(r)
    if kind == "summary" and (len(lines) != 3 or not all(_BULLET.match(x) for x in lines)):
        return f"{len(lines)} lines, {sum(bool(_BULLET.match(x)) for x in lines)} bullets (want 3 bullets)"
    if kind == "action_items" and (not lines or not all(_ACTION.match(x) for x in lines)):
        return f"{sum(not _ACTION.match(x) for x in lines)} of {len(lines)} lines not '- Owner: task (due YYYY-MM-DD)'"
    if kind == "policy" and (len(lines) != 1 or len(r.split()) < 3):
        return f"{len(lines)} lines (want one sentence)"
    if kind == "reply" and (len(lines) < 3 or not _GREETING.match(lines[0]) or len(lines[-1].split()) > 3):
        return "no greeting line, body and sign-off"
    return ""


def _revise_format(kind, user, r):
    lines = _lines(r)
    bullets = [x for x in lines if _BULLET.match(x)]
    items = [x for x in lines if _ACTION.match(x)]
    if kind == "summary" and len(bullets) >= 3:
        return "\n".join(bullets[:3])
    if kind == "action_items" and items:
        return "\n".join(items)
    if kind == "policy" and lines and len(lines[0].split()) >= 3:
        return lines[0]
    return r


def _check_iso(kind, user, r):
    found = _DMY.findall(r) + _MDY.findall(r)
    return f"{len(found)} date(s) not in YYYY-MM-DD form" if kind in ("action_items", "date_json") and found else ""


def _json_problem(r: str) -> str:
    try:
        obj = json.loads(r.strip())
    except (ValueError, RecursionError):
        return "does not parse as JSON"
    if not isinstance(obj, dict) or set(obj) != {"event", "date"}:
        return 'not one object with exactly "event" and "date"'
    if not (obj["event"] is None or isinstance(obj["event"], str)) or not (
            obj["date"] is None or (isinstance(obj["date"], str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", obj["date"]))):
        return "event must be a string or null, date YYYY-MM-DD or null"
    return ""


def _revise_json(kind, user, r):
    """Rebuild the object from the pieces found: the first "event" value and the first ISO date."""
    event = re.search(r'"event"\s*:\s*(null|"([^"\n{}]*)")', r)
    date = _ISO.search(r)
    if event and (date or re.search(r'"date"\s*:\s*null', r)):
        return json.dumps({"event": event[2] if event[2] is not None else None, "date": date[0] if date else None},
                          ensure_ascii=False)
    return r


def _check_names(kind, user, r):
    if kind not in ("reply", "action_items"):
        return ""
    sender, writer, people, _ = _email(user)
    lines, notes = _lines(r), []
    if kind == "reply" and lines and (g := _GREETING.match(lines[0])) and norm(g[2]) != norm(sender):
        notes.append(f"greets {g[2]}, not the sender {sender}")
    if kind == "reply" and writer and len(lines) > 2 and norm(lines[-1].split()[-1]) != norm(writer):
        notes.append(f"signed {lines[-1]!r}, not {writer}")
    notes += [f"{m['owner']!r} is not on the e-mail" for m in map(_ACTION.match, lines)
              if kind == "action_items" and m and norm(m["owner"]) not in people]
    return "; ".join(notes)


def _revise_names(kind, user, r):
    sender, writer, people, _ = _email(user)
    lines = r.strip().splitlines()
    if kind == "reply" and lines and (g := _GREETING.match(lines[0].strip())):
        lines[0] = f"{g[1]} {sender}{g[3]}"
        if writer and len(_lines(r)) > 2:
            lines[-1] = writer
    if kind == "action_items":  # keep the items whose owner is on the e-mail (if any)
        lines = [x for x in lines if (m := _ACTION.match(x.strip())) and norm(m["owner"]) in people] or lines
    return "\n".join(lines)


def _check_dates(kind, user, r):
    made_up = sorted(_dates(r) - _email(user)[3]) if kind in ("summary", "action_items", "date_json", "reply") else []
    return f"date(s) {', '.join(made_up)} not in the e-mail" if made_up else ""


def _revise_dates(kind, user, r):
    """Action items: keep the items whose due date the e-mail mentions (if any); elsewhere no rule knows the date."""
    dates = _email(user)[3]
    keep = [x for x in _lines(r) if (m := _ACTION.match(x)) and m["due"] in dates] if kind == "action_items" else []
    return "\n".join(keep) if keep else r


def _unchanged(kind, user, r):
    return r


RULES: dict[str, tuple[Callable, Callable]] = {
    "no_boilerplate": (_check_boilerplate, lambda k, u, r: _drop_sentences(r, _boilerplate)),
    "no_filler": (_check_filler, _revise_filler),
    "refuse_private": (_check_private, lambda k, u, r: refusal_for(u)),
    "no_over_refusal": (_check_over_refusal, _unchanged),  # a rule cannot supply the facts a refusal withheld
    "task_format": (_check_format, _revise_format),
    "iso_dates": (_check_iso, lambda k, u, r: _to_iso(r)),
    "json_object": (lambda k, u, r: _json_problem(r) if k == "date_json" else "", _revise_json),
    "names_from_email": (_check_names, _revise_names),
    "dates_from_email": (_check_dates, _revise_dates),
}

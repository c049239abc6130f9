"""Document cleaning: Unicode normalisation, exact dedup, Gopher quality rules, PII masking.

What it implements
- ``normalise``: Unicode NFC (canonical composition: 'e' + combining acute -> 'é'; it never changes
  what a character means, unlike NFKC, which also folds '…' into '...', '²' into '2' and full-width
  letters into ASCII; ``form="NFKC"`` is available when that folding is wanted), line endings to
  ``\\n``, control and zero-width characters removed, other Unicode spaces to ' ', runs of spaces
  collapsed, trailing spaces cut, at most one blank line in a row, outer whitespace stripped.
- ``exact_dedup``: SHA-256 of the UTF-8 normalised text; the FIRST document with a hash is kept.
- ``repeated_lines`` / ``remove_lines``: lines (of at least ``min_chars``) that occur in at least
  ``min_docs`` different documents — footers, cookie notices — found across the corpus and cut.
- ``gopher_check``: the quality rules of Gopher's MassiveText (Rae et al. 2021, appendix A.1.1) with
  every threshold a field of ``GopherRules``; returns the name of the first rule that rejects a
  document, or None. ``gopher_stats`` returns every measured quantity.
- ``mask_emails`` / ``mask_ips`` / ``mask_phones`` -> (text, count), one kind each, and ``mask_pii``
  (all three, in that order) / ``find_pii``: e-mail addresses, IPv4 addresses whose four octets are
  0-255 without leading zeros, phone numbers (international ``+CC`` forms; North American 3-3-4 with
  one separator, with the area code in parentheses, or ten bare digits not starting with 0 or 1; UK
  0xx forms); masks are ``<EMAIL>``, ``<IP>``, ``<PHONE>``.

Words for the Gopher rules are whitespace-separated tokens; the word count and the mean word length
(punctuation stripped from the ends) use only tokens with a letter or digit, so a menu's ' | ' or a
bullet's '-' is not a word there (as in the reference implementations). Duplicate n-gram fractions count the
characters of words covered by a *repeated* occurrence (second or later) of an n-gram, over all word
characters; the top n-gram fraction is the characters of the most frequent n-gram times its count.
What it leaves out: language ID, perplexity and toxicity filters (they need models), and names as
PII (that needs NER; see the notes' warning that regexes catch only structured PII).
"""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

import regex

from minilife.data.checks import check_text

# normalisation
_SPACES = regex.compile(r"[\t\x0b\x0c\p{Zs}\u2028\u2029]")  # become ' '
_INVISIBLE = regex.compile(r"[[\p{Cc}\p{Cf}\p{Co}\p{Cs}]--[\n]]", regex.V1)  # removed (incl. zero-width)


def normalise(text: str, form: Literal["NFC", "NFKC"] = "NFC") -> str:
    """Canonical Unicode form and tidy whitespace (see the module docstring for every step)."""
    if form not in ("NFC", "NFKC"):
        raise ValueError(f"normalise: form must be 'NFC' or 'NFKC', got {form!r}")
    check_text(text, "normalise: text")
    text = _INVISIBLE.sub("", _SPACES.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n")))
    text = unicodedata.normalize(form, text)  # after the removals, which can un-normalise a sequence
    text = re.sub(r" *\n *", "\n", re.sub(" {2,}", " ", text))
    return re.sub("\n{3,}", "\n\n", text).strip()


# exact dedup: documents and repeated lines
def text_hash(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 bytes (stable across runs and machines)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def exact_dedup(texts: Sequence[str]) -> tuple[list[bool], list[int | None]]:
    """(keep, dup_of): keep[i] is False when an earlier text has the same hash; dup_of[i] is that index."""
    first, keep, dup_of = {}, [], []  # first: hash -> index of its first text
    for i, t in enumerate(texts):
        j = first.setdefault(text_hash(t), i)
        keep.append(j == i)
        dup_of.append(None if j == i else j)
    return keep, dup_of


def repeated_lines(texts: Sequence[str], min_docs: int = 4, min_chars: int = 40, min_frac: float = 0.0) -> Counter:
    """Lines of at least ``min_chars`` characters found in at least max(``min_docs``, ``min_frac`` * N)
    distinct texts -> {line: number of texts}. ``min_frac`` keeps the bar proportional to corpus size."""
    if min_docs < 2 or not 0.0 <= min_frac <= 1.0:
        raise ValueError(f"repeated_lines: need min_docs >= 2 and 0 <= min_frac <= 1, got {min_docs}, {min_frac}")
    min_docs = max(min_docs, math.ceil(min_frac * len(texts)))
    seen: Counter = Counter()
    for t in texts:
        seen.update({line.strip() for line in t.split("\n") if len(line.strip()) >= min_chars})
    return Counter({line: n for line, n in seen.items() if n >= min_docs})


def remove_lines(text: str, lines: set[str] | Counter) -> tuple[str, list[str]]:
    """``text`` without each line (compared stripped) in ``lines`` and its newline -> (new text, removed
    lines without their newline). Every other byte stays as it was: no stripping, no blank-line squeeze."""
    kept, removed = [], []
    for line in re.findall(r"[^\n]*\n|[^\n]+", text):  # each line with its newline (the last may lack one)
        if line.strip() in lines:
            removed.append(line.rstrip("\n"))
        else:
            kept.append(line)
    return "".join(kept), removed


# Gopher quality rules
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "-", "*", "‣", "◦", "⁃", "·")


@dataclass
class GopherRules:
    """Thresholds of the MassiveText quality filter (defaults = the paper's values)."""
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_ratio: float = 0.1  # ('#' + '...' + '…') per word
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with '...' or '…'
    min_alpha_words: float = 0.8  # fraction of words with at least one alphabetic character
    min_stop_words: int = 2  # occurrences of STOP_WORDS
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_chars: float = 0.2
    max_dup_para_chars: float = 0.2
    max_top_ngram_chars: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_chars: dict = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen, dup_n, dup_c = set(), 0, 0
    for it in items:
        if it in seen:
            dup_n, dup_c = dup_n + 1, dup_c + len(it)
        seen.add(it)
    total_c = sum(len(it) for it in items)
    return (dup_n / len(items) if items else 0.0), (dup_c / total_c if total_c else 0.0)


def _top_ngram_chars(words: list[str], n: int, total: int) -> float:
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(len(w) for w in gram) / total if count > 1 else 0.0


def _dup_ngram_chars(words: list[str], n: int, total: int) -> float:
    seen, covered = set(), bytearray(len(words))
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


def gopher_stats(text: str, rules: GopherRules | None = None) -> dict[str, float]:
    """Every quantity the Gopher rules look at, measured on ``text``."""
    rules = rules or GopherRules()
    words = check_text(text, "gopher_stats: text").split()
    n = len(words)
    real = [w for w in words if any(c.isalnum() for c in w)]  # not a lone '|', '-', '&' ...
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    total = sum(len(w) for w in words)
    stripped = [w.strip(".,;:!?\"'()[]") for w in words]
    stats = {
        "words": len(real),
        "mean_word_len": (sum(len(w.strip(".,;:!?\"'()[]")) for w in real) / len(real)) if real else 0.0,
        "symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / max(n, 1),
        "bullet_lines": sum(ln.startswith(BULLETS) for ln in lines) / max(len(lines), 1),
        "ellipsis_lines": sum(ln.endswith(("...", "…")) for ln in lines) / max(len(lines), 1),
        "alpha_words": sum(any(c.isalpha() for c in w) for w in words) / max(n, 1),
        "stop_words": sum(w.lower() in STOP_WORDS for w in stripped),
    }
    stats["dup_line_frac"], stats["dup_line_chars"] = _dup_fractions(lines)
    stats["dup_para_frac"], stats["dup_para_chars"] = _dup_fractions(paras)
    for k in rules.max_top_ngram_chars:
        stats[f"top_{k}gram_chars"] = _top_ngram_chars(words, k, total)
    for k in rules.max_dup_ngram_chars:
        stats[f"dup_{k}gram_chars"] = _dup_ngram_chars(words, k, total)
    return stats


def gopher_check(text: str, rules: GopherRules | None = None) -> str | None:
    """Name of the first Gopher rule that rejects ``text`` (e.g. 'stop_words'), or None if it passes."""
    r = rules or GopherRules()
    s = gopher_stats(text, r)
    if not r.min_words <= s["words"] <= r.max_words:
        return "word_count"
    checks = [("mean_word_len", not r.min_mean_word_len <= s["mean_word_len"] <= r.max_mean_word_len),
              ("symbol_ratio", s["symbol_ratio"] > r.max_symbol_ratio),
              ("bullet_lines", s["bullet_lines"] > r.max_bullet_lines),
              ("ellipsis_lines", s["ellipsis_lines"] > r.max_ellipsis_lines),
              ("alpha_words", s["alpha_words"] < r.min_alpha_words),
              ("stop_words", s["stop_words"] < r.min_stop_words),
              ("dup_line_frac", s["dup_line_frac"] > r.max_dup_line_frac),
              ("dup_para_frac", s["dup_para_frac"] > r.max_dup_para_frac),
              ("dup_line_chars", s["dup_line_chars"] > r.max_dup_line_chars),
              ("dup_para_chars", s["dup_para_chars"] > r.max_dup_para_chars)]
    checks += [(f"top_{k}gram_chars", s[f"top_{k}gram_chars"] > t) for k, t in r.max_top_ngram_chars.items()]
    checks += [(f"dup_{k}gram_chars", s[f"dup_{k}gram_chars"] > t) for k, t in r.max_dup_ngram_chars.items()]
    return next((name for name, failed in checks if failed), None)


# PII
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PII_PATTERNS = {
    "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]*[A-Za-z0-9_%+-])?"
                        r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"),
    # four valid octets; not inside a longer dotted number (1.2.3.4.5) or a longer digit run
    "ip": re.compile(rf"(?<![\d.])(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)"),
    "phone": re.compile(
        r"(?<![\w+])(?:"
        r"\+\d{1,3}(?:[ -]\(?\d{1,4}\)?){1,2}(?:[ -]\d{2,4}){2,3}"  # +44 20 7946 0123, +1 (202) 555-0147
        r"|\(\d{3}\)[ -]?\d{3}[ -]\d{4}"  # (202) 555-0147, (202) 555 0147, (202)-555-0147
        r"|\d{3}([-. ])\d{3}\1\d{4}"  # 202-555-0147, 202.555.0147, 202 555 0147 (one separator)
        r"|[2-9]\d{9}"  # 2025550147: ten digits, no area code starts with 0 or 1 (so no Unix timestamp)
        r"|0\d{2,4} \d{3,4} \d{3,4}"  # 020 7946 0123, 0113 496 0123
        r")(?![\w-]|\.\d)"),
}
MASKS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>"}


def mask_emails(text: str) -> tuple[str, int]:
    """Every e-mail address replaced by ``<EMAIL>`` -> (masked text, count)."""
    return PII_PATTERNS["email"].subn(MASKS["email"], check_text(text, "mask_emails: text"))


def mask_ips(text: str) -> tuple[str, int]:
    """Every IPv4 address replaced by ``<IP>`` -> (masked text, count)."""
    return PII_PATTERNS["ip"].subn(MASKS["ip"], check_text(text, "mask_ips: text"))


def mask_phones(text: str) -> tuple[str, int]:
    """Every phone number replaced by ``<PHONE>`` -> (masked text, count). Alone it reads the digits of
    ``2025550147@mail.example`` as a number; ``mask_pii`` masks the addresses first."""
    return PII_PATTERNS["phone"].subn(MASKS["phone"], check_text(text, "mask_phones: text"))


MASKERS = {"email": mask_emails, "ip": mask_ips, "phone": mask_phones}  # in the order mask_pii applies them


def find_pii(text: str) -> dict[str, list[str]]:
    """The PII strings in ``text`` by kind, in order; each kind is sought in the text with the kinds
    before it in ``MASKERS`` already masked (so an address or an IP is never read as a phone number)."""
    found = {}
    for kind, mask in MASKERS.items():
        found[kind] = [m.group(0) for m in PII_PATTERNS[kind].finditer(check_text(text, "find_pii: text"))]
        text, _ = mask(text)
    return found


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """Every e-mail, IPv4 address and phone number masked, kind by kind -> (masked text, count per kind)."""
    counts = {}
    for kind, mask in MASKERS.items():
        text, counts[kind] = mask(check_text(text, "mask_pii: text"))
    return text, counts

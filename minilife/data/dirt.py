"""Planting labelled dirt into the wiki: the ground truth every cleaning step is scored against.

What it implements (each function records exactly what it planted on the ``Document``):
- ``Document``: one wiki page and its labels (``world.py`` builds the pages; this module only dirties
  them, so it never imports ``world``).
- ``plant_pii``: a sentence carrying an e-mail address, a phone number (``+1 202 555 0147``,
  ``(202) 555-0147``, ``(202) 555 0147``, ``(202)-555-0147``, ``202-555-0147``, ``202.555.0147``,
  ``2025550147``, and UK forms) or an IPv4 address (labels list the exact strings), and, in other
  documents, look-alikes that are *not* PII: invalid IPs such as ``999.12.4.1``, ISO dates, order
  numbers, five-part version strings, 10-digit Unix timestamps and 12-digit tracking numbers.
- ``plant_footers``: one boilerplate line (confidentiality notice, copyright bar...) appended to a
  share of the documents; the same few lines recur across many documents.
- ``junk_pages``: SEO spam in four styles (keyword stuffing, hashtags, ellipsis teasers, bullet link
  farms), each aimed at a different Gopher rule, and boilerplate-only pages (cookie banners, menus).
- ``exact_copies``: byte-identical copies. ``near_copies``: copies whose word edits (substitute,
  delete, insert, only on alphabetic words outside footer lines, so labels stay true) are chosen by
  bisection on the number of edits until the word-5-gram shingle Jaccard to the source is as close
  to a target as one edit allows; the target and the measured value are both recorded.

Phone numbers come from ranges set aside for fiction (US 555-01xx, UK 020 7946 0xxx / 0113 496 0xxx)
and IPs mostly from documentation ranges (RFC 5737) or private ranges. Shingles and Jaccard are the
ones the detector uses (``minhash.shingles``: lower-cased whitespace words, n = 5).
"""
from __future__ import annotations

import copy
import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from minilife.data.company import Company
from minilife.data.minhash import jaccard, shingles


@dataclass
class Document:
    """One wiki page and the truth about its dirt (every label was planted, never guessed)."""
    doc_id: str
    source: str  # one of world.SOURCES
    text: str
    exact_dup_of: str | None = None  # byte-identical copy of this doc_id (which appears earlier)
    near_dup_of: str | None = None  # edited copy of this doc_id (which appears earlier)
    near_dup_target: float | None = None  # the Jaccard the edits aimed at
    near_dup_jaccard: float | None = None  # actual word-5-gram shingle Jaccard to near_dup_of
    spam: bool = False  # SEO spam page
    boilerplate: bool = False  # page that is nothing but cookie banner / navigation junk
    junk_style: str | None = None  # e.g. "spam-keywords", "boilerplate-cookies"
    footer_lines: tuple[str, ...] = ()  # planted repeated lines present verbatim in text
    pii_emails: tuple[str, ...] = ()
    pii_phones: tuple[str, ...] = ()
    pii_ips: tuple[str, ...] = ()
    pii_decoys: tuple[str, ...] = ()  # look-alikes a correct masker must leave alone
    meta: dict = field(default_factory=dict)  # e.g. {"kind": "release"} for catalogue pages

    @property
    def junk(self) -> bool:
        return self.spam or self.boilerplate

    @property
    def pii(self) -> dict[str, tuple[str, ...]]:
        return {"email": self.pii_emails, "phone": self.pii_phones, "ip": self.pii_ips}


FOOTERS = ("This message and any attachments are confidential and meant only for the named recipient.",
           "© {year} {company}. All rights reserved. | Privacy | Terms | Cookie settings",
           "Printed copies of this page are not controlled; always check the wiki for the latest version.",
           "Sent from the {company} mobile app. Please excuse any typos.",
           "Was this page helpful? Rate it below so the {company} wiki keeps getting better.")
SPAM_WORDS = ("best", "cheap", "buy", "online", "deal", "discount", "price", "free", "shipping", "sale", "top",
              "review", "2024", "official", "outlet", "coupon", "now", "limited", "offer", "fast")
COOKIE_LINES = ("We use cookies to give you the best experience on our website.",
                "By clicking Accept all, you agree to the storing of cookies on your device.",
                "Some cookies are necessary for the site to work; others help us improve it.",
                "You can change your choice at any time in Cookie settings.")
NAV_ITEMS = ("Home", "Products", "Support", "About us", "Careers", "Contact", "Blog", "Sign in", "Register",
             "Cart (0)", "Search", "Menu", "Shop", "Help centre", "Newsletter", "Press")


def _phone(rng: random.Random, n: int) -> str:
    """The ``n``-th planted phone number: the forms take turns, so even a small world has each of them."""
    k, a = rng.randrange(100, 200), rng.choice((202, 312, 415))
    forms = (f"+1 {a} 555 0{k}", f"({a}) 555-0{k}", f"({a}) 555 0{k}", f"({a})-555-0{k}", f"{a}-555-0{k}",
             f"{a}.555.0{k}", f"{a}5550{k}", f"+44 20 7946 0{k}", f"020 7946 0{k}", f"+44 113 496 0{k}", f"0113 496 0{k}")
    return forms[n % len(forms)]


def _ip(rng: random.Random) -> str:
    return rng.choice((f"192.0.2.{rng.randint(1, 254)}", f"198.51.100.{rng.randint(1, 254)}",
                       f"203.0.113.{rng.randint(1, 254)}",
                       f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                       f"192.168.{rng.randint(0, 9)}.{rng.randint(1, 254)}"))


def _insert_line(text: str, line: str, rng: random.Random) -> str:
    """Insert ``line`` after a random line of ``text`` other than the first (the title)."""
    lines = text.split("\n")
    at = rng.randint(1, len(lines))
    return "\n".join(lines[:at] + [line] + lines[at:])


def plant_pii(docs: Sequence[Document], company: Company, rng: random.Random, pii_rate: float,
              decoy_rate: float) -> None:
    """Give ``pii_rate`` of the docs one PII sentence and ``decoy_rate`` of them one look-alike sentence."""
    chosen, n_phones = rng.sample(range(len(docs)), round(pii_rate * len(docs))), 0
    for i in chosen:
        d, person = docs[i], rng.choice(company.people)
        kind = rng.choice(("email", "phone", "ip", "email+phone"))
        sentence, email, phone, ip = [], None, None, None
        if "email" in kind:
            email = rng.choice((f"{person.handle}@{company.domain}", f"{rng.choice(('sam', 'kim', 'jo'))}."
                                f"{rng.randint(1970, 2005)}@mailbox.example"))
            sentence.append(rng.choice((f"You can reach me at {email}.", f"(Write to <{email}> if you need help.)",
                                        f"Contact: {email}")))
        if "phone" in kind:
            phone, n_phones = _phone(rng, n_phones), n_phones + 1
            sentence.append(rng.choice((f"Call me on {phone} if it is urgent.", f"My direct line is {phone}.",
                                        f"Phone: {phone}")))
        if kind == "ip":
            ip = _ip(rng)
            sentence.append(rng.choice((f"The test server is at {ip}, so please use that one.",
                                        f"Requests came from {ip} during the outage.",
                                        f"Log in via the gateway ({ip}) from home.")))
        d.text = _insert_line(d.text, " ".join(sentence), rng)
        d.pii_emails, d.pii_phones, d.pii_ips = (tuple(x for x in [v] if x) for v in (email, phone, ip))
    for i in rng.sample(range(len(docs)), round(decoy_rate * len(docs))):
        r = rng.randint
        decoy = rng.choice((f"{r(256, 999)}.{r(0, 255)}.{r(0, 255)}.{r(0, 255)}",  # first octet out of range
                            f"{r(1, 9)}.{r(0, 9)}.{r(0, 20)}.{r(0, 99)}.{r(1, 9)}",  # five-part version string
                            f"2024-{r(1, 12):02d}-{r(1, 28):02d}", f"{r(1000, 9999)}-{r(1000, 9999)}",
                            f"{r(1_600_000_000, 1_799_999_999)}", f"{r(10**11, 10**12 - 1)}"))  # timestamp, tracking
        line = rng.choice((f"Reference: {decoy} (internal use only).", f"The ticket mentions {decoy} but nothing else.",
                           f"Please quote {decoy} when you reply."))
        docs[i].text = _insert_line(docs[i].text, line, rng)
        docs[i].pii_decoys = docs[i].pii_decoys + (decoy,)


def plant_footers(docs: Sequence[Document], company: Company, rng: random.Random, rate: float) -> None:
    """Append one of a few boilerplate lines to ``rate`` of the docs (the same lines across many docs)."""
    lines = [f.format(year=2024, company=company.name) for f in FOOTERS]
    for i in rng.sample(range(len(docs)), round(rate * len(docs))):
        line = rng.choice(lines)
        docs[i].text = docs[i].text + "\n\n" + line
        docs[i].footer_lines = docs[i].footer_lines + (line,)


def _spam_text(company: Company, rng: random.Random, style: str) -> str:
    names = [p.short for p in company.products] + [p.category for p in company.products]
    words = lambda k: " ".join(rng.choice(SPAM_WORDS + tuple(names)) for _ in range(k))  # noqa: E731
    title = " ".join((rng.choice(("BEST", "CHEAP", "TOP 10")), rng.choice(names).upper(),
                      rng.choice(("DEALS", "PRICES", "COUPONS"))))
    if style == "keywords":
        core = words(rng.randint(6, 9))
        return title + "\n" + "\n".join(f"{core} {words(rng.randint(2, 5))} {core}" for _ in range(rng.randint(5, 9)))
    if style == "hashtags":
        return title + "\n" + " ".join("#" + w.replace(" ", "") for w in words(rng.randint(40, 90)).split())
    if style == "ellipsis":
        teasers = ("You will not believe what this {n} can do", "Shops hate this one trick for the {n}",
                   "The {n} price they do not want you to see", "Wait until you read about the {n}",
                   "Number {k} on this list of {n} deals will shock you")
        return title + "\n" + "\n".join(rng.choice(teasers).format(n=rng.choice(names), k=rng.randint(2, 9)) + "..."
                                        for _ in range(rng.randint(6, 12)))
    return title + "\n" + "\n".join(f"• {words(rng.randint(2, 4))} {rng.choice(names)}"
                                    for _ in range(rng.randint(12, 25)))


def _boilerplate_text(company: Company, rng: random.Random, style: str) -> str:
    nav = " | ".join(rng.sample(NAV_ITEMS, rng.randint(5, 9)))
    if style == "cookies":
        body = rng.sample(COOKIE_LINES, rng.randint(1, 3))
        return "\n".join([f"{company.name} uses cookies"] + body + ["Accept all | Reject all | Cookie settings", nav])
    crumbs = " > ".join(["Home", "Products", rng.choice(company.products).category.capitalize()])
    return "\n".join([nav, crumbs, "Sign in | Register", "Search", f"© 2024 {company.name}", "Back to top"])


def junk_pages(company: Company, rng: random.Random, n_spam: int, n_boilerplate: int,
               sources: Sequence[str]) -> list[Document]:
    """Spam and boilerplate-only pages, filed under random sources (a crawl does not sort its junk)."""
    spam_styles = [("keywords", "hashtags", "ellipsis", "bullets")[k % 4] for k in range(n_spam)]
    boilerplate_styles = [("cookies", "navigation")[k % 2] for k in range(n_boilerplate)]
    spam = [Document("", rng.choice(sources), _spam_text(company, rng, style), spam=True, junk_style="spam-" + style)
            for style in spam_styles]  # all spam pages first (the order of the random draws)
    return spam + [Document("", rng.choice(sources), _boilerplate_text(company, rng, style), boilerplate=True,
                            junk_style="boilerplate-" + style) for style in boilerplate_styles]


def exact_copies(docs: Sequence[Document], rng: random.Random, n: int) -> list[Document]:
    """``n`` byte-identical copies of randomly chosen docs (one source may be copied more than once)."""
    sources = [rng.choice(docs) for _ in range(n)]
    return [dataclasses.replace(copy.deepcopy(src), doc_id="", exact_dup_of=src.doc_id) for src in sources]


_WORD = re.compile(r"[A-Za-z]+[.,;:!?]?")


def edit_to_jaccard(text: str, target: float, rng: random.Random, protected: Sequence[str] = (),
                    vocab: Sequence[str] = ("update", "team", "quickly", "new", "office")) -> tuple[str, float]:
    """Word edits to ``text`` until its 5-gram shingle Jaccard to the original is closest to ``target``.

    Only alphabetic words on lines not in ``protected`` are edited. Returns (edited text, Jaccard)."""
    lines = [re.split(r"(\s+)", line) for line in text.split("\n")]  # words at even indices
    editable = [(li, ti) for li, toks in enumerate(lines) if "".join(toks) not in protected
                for ti in range(0, len(toks), 2) if _WORD.fullmatch(toks[ti])]
    rng.shuffle(editable)
    ops = [(li, ti, rng.choice(("sub", "sub", "del", "ins")), rng.choice(vocab)) for li, ti in editable]
    base = shingles(text)

    def apply(k: int) -> tuple[str, float]:
        out = [list(toks) for toks in lines]
        for li, ti, kind, new in ops[:k]:
            toks = out[li]
            if kind == "del":
                toks[ti] = ""
                if ti + 1 < len(toks):
                    toks[ti + 1] = ""  # and the space after it
            else:
                toks[ti] = new if kind == "sub" else lines[li][ti] + " " + new
        edited = "\n".join("".join(toks) for toks in out)
        return edited, jaccard(base, shingles(edited))

    if not ops:
        raise ValueError("edit_to_jaccard: the text has no editable words")
    lo, hi = 0, len(ops)  # invariant: J(apply(lo)) > target (J(0) = 1); bisect the first k at or below
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if apply(mid)[1] > target:
            lo = mid
        else:
            hi = mid
    return min(apply(max(lo, 1)), apply(hi), key=lambda tj: abs(tj[1] - target))  # >= 1 edit: never an exact copy


def near_copies(docs: Sequence[Document], rng: random.Random, n: int, jaccard_range: tuple[float, float]
                ) -> list[Document]:
    """``n`` edited copies of distinct docs (60+ words), targets spread evenly over ``jaccard_range``."""
    pool = [d for d in docs if len(d.text.split()) >= 60]
    lo, hi = jaccard_range
    vocab = sorted({w for d in rng.sample(pool, min(len(pool), 20)) for w in d.text.split() if w.isalpha()})
    out = []
    for k, src in enumerate(rng.sample(pool, min(n, len(pool)))):
        target = lo + (hi - lo) * (k + rng.random()) / max(n, 1)  # stratified: every part of the range
        text, j = edit_to_jaccard(src.text, target, rng, src.footer_lines, vocab)
        out.append(dataclasses.replace(copy.deepcopy(src), doc_id="", text=text, near_dup_of=src.doc_id,
                                       near_dup_target=round(target, 4), near_dup_jaccard=j))
    return out

"""The embedded default world: the company wiki, generated deterministically from a seed.

The lifecycle notes explain training with a company: the model first reads the company wiki
(pretraining), later shadows a colleague (SFT) and gets performance reviews (RLHF/DPO). This module
builds that wiki as minilife's offline default corpus:

- ``WorldConfig``: seed, size (``target_bytes``; ~3 MB by default, ~150 kB for smoke runs) and the
  rate of every kind of planted dirt.
- ``Document`` (defined in ``dirt.py``, beside the planting that fills its labels; re-exported here):
  one wiki page (``doc_id``, ``source``, ``text``) plus its ground-truth dirt labels, so every
  cleaning step can be scored with precision and recall.
- ``make_wiki(cfg)``: the company (``company.make_company``) rendered into five sources
  (``documents.py``: policy and product pages; ``correspondence.py``: support chats, e-mails,
  stories), then dirtied (``dirt.py``): exact copies, near-copies at a controlled word-5-gram
  Jaccard, SEO spam, boilerplate pages, repeated footer lines, and PII (e-mails, phones, IPv4) next
  to PII look-alikes that must survive masking.

Same config, same bytes: every random draw comes from ``random.Random`` seeded with strings derived
from ``cfg.seed`` (never Python's salted ``hash``). What it leaves out: other languages, toxic content
and outdated facts (the notes list them as dirt too; they need labels we cannot generate honestly).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from minilife.data import correspondence, dirt, documents
from minilife.data.company import Company, make_company
from minilife.data.dirt import Document

SOURCES = ("policy", "product", "support", "email", "story")


@dataclass
class WorldConfig:
    """How big the wiki is and how dirty: every rate is a fraction of the clean document count."""
    seed: int = 0
    target_bytes: int = 3_000_000  # raw size including dirt (approximate, about +-10%)
    n_people: int = 60
    n_products: int = 24
    catalogue_share: float = 0.15  # at most this share of clean bytes from policy + product pages
    open_shares: tuple[tuple[str, float], ...] = (("support", 0.3), ("email", 0.35), ("story", 0.35))
    exact_dup_rate: float = 0.06
    near_dup_rate: float = 0.06
    near_dup_jaccard: tuple[float, float] = (0.5, 0.95)  # targets drawn uniformly from this range
    spam_rate: float = 0.04
    boilerplate_rate: float = 0.03  # whole junk pages: cookie banners, navigation menus
    footer_rate: float = 0.15  # docs that get one repeated footer line appended
    pii_rate: float = 0.08
    decoy_rate: float = 0.04  # docs that get PII look-alikes (999.1.1.1, dates, order numbers)

    def __post_init__(self):
        if self.target_bytes < 5_000:
            raise ValueError(f"WorldConfig.target_bytes={self.target_bytes}: need at least 5000 bytes")
        for name in ("catalogue_share", "exact_dup_rate", "near_dup_rate", "spam_rate", "boilerplate_rate",
                     "footer_rate", "pii_rate", "decoy_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)}: must be in [0, 1]")
        lo, hi = self.near_dup_jaccard
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"WorldConfig.near_dup_jaccard={self.near_dup_jaccard}: need 0 < lo <= hi < 1")
        unknown = {s for s, _ in self.open_shares} - {"support", "email", "story"}
        if unknown or any(w < 0 for _, w in self.open_shares):
            raise ValueError(f"WorldConfig.open_shares={self.open_shares}: sources support/email/story, "
                             f"weights >= 0")

    @classmethod
    def smoke(cls, seed: int = 0, **kw) -> "WorldConfig":
        """A ~150 kB world: enough of every kind of dirt to score, built in well under a second."""
        return cls(seed=seed, target_bytes=150_000, **kw)

    def company(self) -> Company:
        """The company this world is written about (the same one later chapters build tasks from)."""
        return make_company(self.seed, self.n_people, self.n_products)


def _clean_documents(cfg: WorldConfig, company: Company, rng: random.Random) -> list[Document]:
    """Render clean pages until the byte budget left after the expected dirt is filled."""
    dirt_factor = 1 + cfg.exact_dup_rate + cfg.near_dup_rate + cfg.spam_rate * 0.5 + cfg.boilerplate_rate * 0.2
    budget = cfg.target_bytes / dirt_factor
    catalogue = [("policy", kind, text) for kind, text in documents.policy_docs(company, rng)]
    catalogue += [("product", kind, text) for kind, text in documents.product_docs(company, rng)]
    rng.shuffle(catalogue)
    docs, used = [], 0
    for source, kind, text in catalogue:
        size = len(text.encode("utf-8"))
        if used + size > cfg.catalogue_share * budget:
            continue
        docs.append(Document("", source, text, meta={"kind": kind}))
        used += size
    total_w, left = sum(w for _, w in cfg.open_shares) or 1.0, budget - used
    for source, weight in cfg.open_shares:
        share, filled = left * weight / total_w, 0
        while filled < share:
            if source == "email":
                mail = correspondence.email(company, rng)
                doc = Document("", source, mail.text(), meta={"kind": mail.kind})
            else:
                write = correspondence.support_chat if source == "support" else correspondence.story
                doc = Document("", source, write(company, rng))
            docs.append(doc)
            filled += len(doc.text.encode("utf-8"))
    rng.shuffle(docs)
    for i, d in enumerate(docs):
        d.doc_id = f"doc-{i:06d}"
    return docs


def make_wiki(cfg: WorldConfig | None = None) -> list[Document]:
    """The dirty wiki for ``cfg`` (default: ``WorldConfig()``): copies always come after their source."""
    cfg = cfg or WorldConfig()
    company = cfg.company()
    docs = _clean_documents(cfg, company, random.Random(f"wiki-{cfg.seed}"))
    n = len(docs)
    dirt.plant_pii(docs, company, random.Random(f"pii-{cfg.seed}"), cfg.pii_rate, cfg.decoy_rate)
    dirt.plant_footers(docs, company, random.Random(f"footer-{cfg.seed}"), cfg.footer_rate)
    junk = dirt.junk_pages(company, random.Random(f"junk-{cfg.seed}"), round(cfg.spam_rate * n),
                           round(cfg.boilerplate_rate * n), SOURCES)
    originals = docs + junk
    copy_rng = random.Random(f"copies-{cfg.seed}")
    copies = dirt.exact_copies(docs, copy_rng, round(cfg.exact_dup_rate * n))
    copies += dirt.near_copies(docs, copy_rng, round(cfg.near_dup_rate * n), cfg.near_dup_jaccard)
    for i, d in enumerate(junk + copies):
        d.doc_id = f"doc-{n + i:06d}"
    order_rng = random.Random(f"order-{cfg.seed}")
    order_rng.shuffle(originals)
    position = {d.doc_id: float(i) for i, d in enumerate(originals)}
    for c in copies:  # a copy lands at a random place after its source
        position[c.doc_id] = order_rng.uniform(position[c.exact_dup_of or c.near_dup_of] + 0.5, len(originals))
    return sorted(originals + copies, key=lambda d: position[d.doc_id])


def world_stats(docs: list[Document]) -> dict:
    """Counts of documents, bytes and planted dirt (what the data chapter prints first)."""
    return {"docs": len(docs), "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
            "by_source": dict(Counter(d.source for d in docs)),
            "exact_dups": sum(d.exact_dup_of is not None for d in docs),
            "near_dups": sum(d.near_dup_of is not None for d in docs),
            "spam": sum(d.spam for d in docs), "boilerplate": sum(d.boilerplate for d in docs),
            "footer_lines": sum(len(d.footer_lines) for d in docs),
            "pii": {k: sum(len(d.pii[k]) for d in docs) for k in ("email", "phone", "ip")},
            "pii_decoys": sum(len(d.pii_decoys) for d in docs)}

"""The embedded world: determinism, consistent facts, and labels checked by independent recomputation."""
import dataclasses
import ipaddress
import re
from collections import Counter

import pytest

from minilife.data import correspondence
from minilife.data.company import make_company
from minilife.data.world import SOURCES, WorldConfig, make_wiki, world_stats


@pytest.fixture(scope="module")
def wiki():
    return make_wiki(WorldConfig(seed=7, target_bytes=300_000))


def _shingles(text: str) -> set[tuple[str, ...]]:
    """Reference word-5-gram shingles, written independently of minhash.py: lower-cased whitespace words."""
    w = text.lower().split()
    return {tuple(w[i:i + 5]) for i in range(len(w) - 4)} if len(w) >= 5 else {tuple(w)}


def test_same_seed_same_bytes_other_seed_differs():
    a = make_wiki(WorldConfig.smoke(seed=3))
    b = make_wiki(WorldConfig.smoke(seed=3))
    c = make_wiki(WorldConfig.smoke(seed=4))
    assert [dataclasses.asdict(d) for d in a] == [dataclasses.asdict(d) for d in b]
    assert [d.text for d in a] != [d.text for d in c]
    assert make_company(3) == make_company(3) and make_company(3) != make_company(4)


def test_size_and_sources(wiki):
    stats = world_stats(wiki)
    assert 0.85 * 300_000 <= stats["bytes"] <= 1.15 * 300_000  # the size knob is approximate: +-15%
    assert set(stats["by_source"]) == set(SOURCES)
    assert len({d.doc_id for d in wiki}) == len(wiki)  # ids are unique


def test_dirt_rates_follow_config(wiki):
    n_clean = sum(not (d.junk or d.exact_dup_of or d.near_dup_of) for d in wiki)
    stats = world_stats(wiki)
    cfg = WorldConfig()
    # counts are round(rate * clean docs); the near-dup pool can only be smaller, never larger
    assert stats["exact_dups"] == round(cfg.exact_dup_rate * n_clean)
    assert stats["spam"] == round(cfg.spam_rate * n_clean)
    assert stats["boilerplate"] == round(cfg.boilerplate_rate * n_clean)
    assert 0 < stats["near_dups"] <= round(cfg.near_dup_rate * n_clean)


def test_exact_copies_are_byte_identical_and_later(wiki):
    pos = {d.doc_id: i for i, d in enumerate(wiki)}
    copies = [d for d in wiki if d.exact_dup_of]
    assert copies
    for d in copies:
        src = wiki[pos[d.exact_dup_of]]
        assert d.text.encode("utf-8") == src.text.encode("utf-8")
        assert pos[d.exact_dup_of] < pos[d.doc_id]
        assert src.exact_dup_of is None and src.near_dup_of is None


def test_near_copies_jaccard_labels_match_recomputation(wiki):
    pos = {d.doc_id: i for i, d in enumerate(wiki)}
    near = [d for d in wiki if d.near_dup_of]
    assert len(near) >= 10
    js = []
    for d in near:
        src = wiki[pos[d.near_dup_of]]
        a, b = _shingles(src.text), _shingles(d.text)
        j = len(a & b) / len(a | b)
        assert d.near_dup_jaccard == pytest.approx(j, abs=1e-12)  # same sets, float rounding only
        # bisection stops one edit from the target; one edit moves at most ~10 of >= 56 shingles
        assert abs(j - d.near_dup_target) <= 0.1
        assert d.text != src.text and pos[d.near_dup_of] < pos[d.doc_id]
        for s in d.footer_lines + d.pii_emails + d.pii_phones + d.pii_ips:  # edits never break a label
            assert s in d.text
        js.append(j)
    assert min(js) < 0.6 and max(js) > 0.85  # targets spread over the configured 0.5-0.95 range


def test_pii_labels_are_present_and_complete(wiki):
    for d in wiki:
        for s in d.pii_emails + d.pii_phones + d.pii_ips + d.pii_decoys:
            assert s in d.text, (d.doc_id, s)
        for s in d.pii_ips:
            ipaddress.IPv4Address(s)  # planted IPs are valid addresses
        # completeness, checked with the standard library rather than the cleaner's regexes:
        if not d.pii_emails:
            assert "@" not in d.text, d.doc_id
        dotted = re.findall(r"(?<![\d.])\d+(?:\.\d+){3}(?![.\d])", d.text)
        valid = []
        for s in dotted:
            try:
                ipaddress.IPv4Address(s)
                valid.append(s)
            except ValueError:
                pass
        assert Counter(valid) == Counter(d.pii_ips), d.doc_id
    assert sum(len(d.pii_decoys) for d in wiki) > 0 and sum(len(d.pii_phones) for d in wiki) > 0


def test_footers_and_junk_labels(wiki):
    footer_docs = [d for d in wiki if d.footer_lines]
    assert footer_docs
    for d in footer_docs:
        assert all(f in d.text.split("\n") for f in d.footer_lines)
    assert Counter(f for d in footer_docs for f in d.footer_lines).most_common(1)[0][1] >= 5  # lines recur
    styles = Counter(d.junk_style for d in wiki if d.junk)
    assert {"spam-keywords", "spam-hashtags", "spam-ellipsis", "spam-bullets",
            "boilerplate-cookies", "boilerplate-navigation"} <= set(styles)


def test_facts_are_consistent_with_the_company(wiki):
    company = WorldConfig(seed=7).company()
    price = {p.short: p.price for p in company.products}
    seen = 0
    for d in wiki:
        m = re.match(r"(\w+ \w\d) .*: product sheet", d.text)
        if m:
            assert f"Price: €{price[m.group(1)]}\n" in d.text
            seen += 1
        m = re.match(r"(\w+ \w\d) FAQ", d.text)
        if m and "sells for" in d.text:
            assert f"It sells for €{price[m.group(1)]} " in d.text
            seen += 1
    assert seen >= 3


def test_email_structure_is_rendered():
    import random

    company = make_company(1)
    rng = random.Random(0)
    for _ in range(20):
        mail = correspondence.email(company, rng)
        text = mail.text()
        assert text.startswith(f"From: {mail.sender.name}\n") and f"Subject: {mail.subject}\n" in text
        assert len(mail.key_points) == 3
        for (owner, task, due), r in zip(mail.action_items, mail.recipients):
            assert owner == r.name and task in text and due > mail.date


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="spam_rate"):
        WorldConfig(spam_rate=1.5)
    with pytest.raises(ValueError, match="target_bytes"):
        WorldConfig(target_bytes=10)
    with pytest.raises(ValueError, match="near_dup_jaccard"):
        WorldConfig(near_dup_jaccard=(0.9, 0.5))
    with pytest.raises(ValueError, match="n_people"):
        make_company(0, n_people=3)

"""Cleaning: normalisation, exact dedup, the Gopher rules case by case, PII masking, and P/R on the world."""
import ipaddress
import re
import unicodedata
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilife.data import clean
from minilife.data.clean import GopherRules, gopher_check, gopher_stats
from minilife.data.world import WorldConfig, make_wiki

GOOD = ("Maya had worked at the lamp company for three years, and she still liked the quiet hour before "
        "everyone else arrived. On that grey morning a customer wrote that the new desk lamp flickered at "
        "low brightness. She read the logs twice, changed one setting and tried again, but nothing changed. "
        "Then a colleague from the support team walked past and suggested that she update the firmware "
        "first. It worked on the first try, and she added the fix to the troubleshooting page that afternoon.")


# ------------------------------------------------------------------------------------------ normalise

def test_normalise_cases():
    assert clean.normalise("Cafe\u0301") == "Café"  # NFC composes e + combining acute
    assert clean.normalise("ﬁ …") == "ﬁ …"  # NFC keeps compatibility characters ...
    assert clean.normalise("ﬁ …", "NFKC") == "fi ..."  # ... NFKC folds them
    assert clean.normalise("a\r\nb\rc") == "a\nb\nc"
    assert clean.normalise("zero\u200bwidth\ufeff bell\x07 ok") == "zerowidth bell ok"
    assert clean.normalise("e\u200d\u0301") == "é"  # removing the joiner first lets NFC compose
    assert clean.normalise("  a\u00a0\u00a0b\t c  \n\n\n\n d  ") == "a b c\n\nd"
    with pytest.raises(ValueError, match="form"):
        clean.normalise("x", "NFD")


@pytest.mark.parametrize("fn", [clean.normalise, clean.gopher_stats, clean.gopher_check, clean.find_pii,
                                clean.mask_pii, clean.mask_emails, clean.mask_ips, clean.mask_phones])
def test_non_text_input_names_the_function(fn):
    # bytes/None must not surface as a str/bytes mix-up or an AttributeError from deep inside
    name = "gopher_stats" if fn is clean.gopher_check else fn.__name__
    with pytest.raises(TypeError, match=rf"{name}: text must be a str, got bytes"):
        fn(b"some bytes")


@given(st.text(max_size=200))
def test_normalise_is_idempotent_and_clean(text):
    once = clean.normalise(text)
    assert clean.normalise(once) == once
    assert unicodedata.is_normalized("NFC", once)
    assert "\r" not in once and "\t" not in once and "\n\n\n" not in once
    assert all(unicodedata.category(c) not in ("Cc", "Cf") for c in once if c != "\n")


# ------------------------------------------------------------------------------------------ exact dedup

def test_exact_dedup_keeps_the_first_copy():
    keep, dup_of = clean.exact_dedup(["a", "b", "a", "c", "b", "a"])
    assert keep == [True, True, False, True, False, False]
    assert dup_of == [None, None, 0, None, 1, 0]


@given(st.lists(st.sampled_from(["x", "y", "z", "x ", "é", "e\u0301"]), max_size=12))
def test_exact_dedup_matches_first_occurrence_reference(texts):
    keep, _ = clean.exact_dedup(texts)
    assert [t for t, k in zip(texts, keep) if k] == list(dict.fromkeys(texts))  # dict keeps first insertion


def test_repeated_lines():
    footer = "This message is confidential and meant only for the named recipient."
    texts = [f"Body number {i} says something.\n{footer}" for i in range(5)] + ["Other text.\nShort line"] * 5
    found = clean.repeated_lines(texts, min_docs=4)
    assert found == Counter({footer: 5})  # "Short line" is in 5 docs but under min_chars
    assert clean.repeated_lines(texts, min_docs=6) == Counter()
    assert clean.repeated_lines(texts, min_docs=2, min_frac=0.6) == Counter()  # 0.6 * 10 docs = 6 > 5
    text, cut = clean.remove_lines(texts[0], found)
    assert text == "Body number 0 says something.\n" and cut == [footer]


def test_remove_lines_touches_nothing_else():
    """Regression: the final newline was dropped, and blank-line runs collapsed even with nothing removed."""
    assert clean.remove_lines("- home\n- back\n<page>\n", {"- home"}) == ("- back\n<page>\n", ["- home"])
    assert clean.remove_lines("a\n\n\n\nb  \n ", set()) == ("a\n\n\n\nb  \n ", [])
    assert clean.remove_lines("x\n  footer \ny", {"footer"}) == ("x\ny", ["  footer "])


@given(st.text())
def test_removing_nothing_is_the_identity(text):
    assert clean.remove_lines(text, set()) == (text, [])
    assert clean.remove_lines(text, {"\x00 never a stripped line \x00"}) == (text, [])


_LINE = st.text(alphabet="ab \t\r<>", max_size=4)  # small alphabet: lines repeat and match often


@given(st.lists(_LINE, max_size=8), _LINE, st.sets(_LINE.map(str.strip), max_size=3))
def test_removing_lines_deletes_exactly_those_lines_and_their_newlines(lines, last, remove):
    # the text is built from its lines, so the answer is known without splitting: each of ``lines`` ends
    # with "\n"; ``last`` (possibly "") has none
    text = "".join(line + "\n" for line in lines) + last
    hit = [line for line in lines + ([last] if last else []) if line.strip() in remove]
    want = "".join(line + "\n" for line in lines if line.strip() not in remove) + ("" if last in hit else last)
    assert clean.remove_lines(text, remove) == (want, hit)


# ------------------------------------------------------------------------------------------ Gopher

def test_good_text_passes_and_stats_match_hand_computation():
    assert gopher_check(GOOD) is None
    s = gopher_stats("the cat sat on the mat the cat sat on the mat")
    # 12 words, 34 word characters; the second "the cat sat on the mat" is covered by repeated
    # 5-grams (positions 6..11: 17 characters); the top 2-gram "the cat" occurs twice (2 * 6 chars)
    assert s["words"] == 12
    assert s["dup_5gram_chars"] == pytest.approx(17 / 34, abs=1e-12)
    assert s["top_2gram_chars"] == pytest.approx(12 / 34, abs=1e-12)
    assert s["stop_words"] == 4  # "the" four times


REPEATED = "the lamp gives a warm even light that is kind to tired eyes at night and it never hums or buzzes at all"
LINES = [f"Line {i} talks about the lamp and the light that it gives to the room" for i in range(10)]
CASES = {
    "word_count": "Too short to be a real page.",
    "mean_word_len": " ".join(["a", "to", "be", "of"] * 20),
    "symbol_ratio": GOOD + " " + " ".join(f"#deal{i}" for i in range(12)),
    "bullet_lines": "\n".join(f"- {line}" for line in LINES),
    "ellipsis_lines": "\n".join(line + ("..." if i % 2 else ".") for i, line in enumerate(LINES)),
    "alpha_words": GOOD + " " + " ".join(str(1000 + 7 * i) for i in range(30)),
    "stop_words": " ".join(f"cheap lamps sale{i} buy online today best price fast shipping" for i in range(8)),
    "dup_line_frac": "\n".join([LINES[0], LINES[1], LINES[0], LINES[1], LINES[2], LINES[3]]),
    "top_2gram_chars": " ".join(f"desk lamp number {i} is ready." for i in range(16)) + " the and of to",
    # one sentence said twice, 18% / 14.5% of the characters: Gopher's bar is 15% for 5-grams, 14% for 6-grams
    "dup_5gram_chars": f"{REPEATED} and it stays cool on the desk all evening. {GOOD} {REPEATED} and it stays cool "
                       "on the desk all evening.",
    "dup_6gram_chars": f"{REPEATED}. {GOOD} {REPEATED}.",
}


@pytest.mark.parametrize("rule", list(CASES))
def test_each_rule_rejects_its_case(rule):
    assert gopher_check(CASES[rule]) == rule, gopher_stats(CASES[rule])


def test_thresholds_are_parameters():
    assert gopher_check(CASES["word_count"], GopherRules(min_words=5)) is None
    assert gopher_check(GOOD, GopherRules(max_words=20)) == "word_count"
    assert gopher_check(CASES["stop_words"], GopherRules(min_stop_words=0, max_dup_ngram_chars={},
                                                         max_top_ngram_chars={})) is None


# ------------------------------------------------------------------------------------------ PII

@pytest.mark.parametrize("text,want", [
    ("write to <maya.okafor@larkspur.example>, please", ["maya.okafor@larkspur.example"]),
    ("(sam.1987@mailbox.example).", ["sam.1987@mailbox.example"]),
    ("mailto:jo+wiki@a-b.example.org; next", ["jo+wiki@a-b.example.org"]),
    ("user@localhost and @handle and a@b.c1", []),
])
def test_emails(text, want):
    assert clean.find_pii(text)["email"] == want


@pytest.mark.parametrize("text,want", [
    ("at 192.168.1.1.", ["192.168.1.1"]),
    ("0.0.0.0 and 255.255.255.255", ["0.0.0.0", "255.255.255.255"]),
    ("(10.4.2.17), 203.0.113.25;", ["10.4.2.17", "203.0.113.25"]),
    ("999.1.1.1 256.1.1.1 192.168.1.256 01.2.3.4 1.2.3", []),
    ("version 1.2.3.4.5 and 5.1.2.3.4", []),
])
def test_ipv4_only_valid_octets(text, want):
    assert clean.find_pii(text)["ip"] == want


@given(st.ip_addresses(v=4))
def test_every_valid_ipv4_is_found(ip):
    assert clean.find_pii(f"the server ({ip}) is up.")["ip"] == [str(ip)]


@given(st.lists(st.integers(0, 999), min_size=4, max_size=4))
def test_dotted_quads_match_the_ipaddress_module(parts):
    text = ".".join(map(str, parts))
    try:
        ipaddress.IPv4Address(text)  # the reference: the standard library's parser
        want = [text]
    except ValueError:
        want = []
    assert clean.find_pii(f"from {text} today")["ip"] == want


NA_FORMS = ("{a}-{e}-{n}", "{a}.{e}.{n}", "{a} {e} {n}", "({a}) {e}-{n}", "({a}) {e} {n}", "({a})-{e}-{n}",
            "({a}){e}-{n}", "{a}{e}{n}", "+1 {a} {e} {n}", "+1 ({a}) {e}-{n}")


@given(st.integers(200, 999), st.integers(0, 999), st.integers(0, 9999), st.sampled_from(NA_FORMS))
def test_north_american_numbers_are_found(area, exchange, line, form):
    number = form.format(a=area, e=f"{exchange:03d}", n=f"{line:04d}")
    assert clean.find_pii(f"call {number} today")["phone"] == [number]
    assert clean.find_pii(f"Phone: {number}.")["phone"] == [number]


@pytest.mark.parametrize("text,want", [
    ("Call +44 20 7946 0123 now", ["+44 20 7946 0123"]),
    ("or (202) 555-0147, or 202-555-0147.", ["(202) 555-0147", "202-555-0147"]),
    ("dots 202.555.0147 and spaces 202 555 0147", ["202.555.0147", "202 555 0147"]),
    ("UK 020 7946 0321 and 0113 496 0123", ["020 7946 0321", "0113 496 0123"]),
    ("+1 202 555 0147 and +1 (312) 555-0199", ["+1 202 555 0147", "+1 (312) 555-0199"]),
    ("(283) 182 3829, (283)-182-3829 and 2831823829", ["(283) 182 3829", "(283)-182-3829", "2831823829"]),
    ("date 2024-03-14, order 4471-2231, price 1,299.00, 202-555.0147, 12025550147", []),
    ("at 1712345678 (Unix time), parcel 123456789012, 28318238290, 283182382, v 2.8.3.1.8", []),
])
def test_phones(text, want):
    assert clean.find_pii(text)["phone"] == want


_EMAILS = ("maya.okafor@larkspur.example", "jo+wiki@a-b.example.org", "sam.1987@mailbox.example")
_PHONES = st.builds(lambda f, a, e, n: f.format(a=a, e=f"{e:03d}", n=f"{n:04d}"), st.sampled_from(NA_FORMS),
                    st.integers(200, 999), st.integers(0, 999), st.integers(0, 9999)) | st.sampled_from(
    ("+44 20 7946 0123", "020 7946 0321", "0113 496 0123"))
_LOOKALIKES = st.sampled_from(("999.1.1.1", "1.2.3.4.5", "2024-03-14", "4471-2231", "v2", "the", "1,299.00")) | \
    st.integers(1_000_000_000, 1_999_999_999).map(str) | st.integers(10**10, 10**12 - 1).map(str)
_PIECES = st.lists(st.tuples(st.sampled_from(_EMAILS), st.just("email")) | st.tuples(_PHONES, st.just("phone"))
                   | st.tuples(st.ip_addresses(v=4).map(str), st.just("ip")) | st.tuples(_LOOKALIKES, st.none()),
                   max_size=8)


@given(_PIECES)
def test_masking_by_kind_matches_masking_the_pieces(pieces):
    # the text is built from labelled pieces, so each masker's answer is known piece by piece
    text = ", ".join(p for p, _ in pieces)
    masked_all = ", ".join(clean.MASKS[k] if k else p for p, k in pieces)
    for kind, mask in (("email", clean.mask_emails), ("ip", clean.mask_ips), ("phone", clean.mask_phones)):
        want = ", ".join(clean.MASKS[k] if k == kind else p for p, k in pieces)
        assert mask(text) == (want, sum(k == kind for _, k in pieces))
    counts = {kind: sum(k == kind for _, k in pieces) for kind in ("email", "ip", "phone")}
    assert clean.mask_pii(text) == (masked_all, counts)
    assert clean.find_pii(text) == {kind: [p for p, k in pieces if k == kind] for kind in ("email", "ip", "phone")}


def test_mask_pii_masks_addresses_before_phones():
    assert clean.mask_phones("mail 2025550147@mail.example") == ("mail <PHONE>@mail.example", 1)  # alone
    assert clean.mask_pii("mail 2025550147@mail.example") == ("mail <EMAIL>", {"email": 1, "ip": 0, "phone": 0})


def test_every_planted_phone_form_is_found_and_every_planted_lookalike_survives():
    """The world's own PII and look-alikes, every form of each (rates raised so that all forms occur)."""
    docs = make_wiki(WorldConfig.smoke(seed=3, pii_rate=0.6, decoy_rate=0.6))
    shape = lambda s: re.sub(r"\d", "9", s)  # noqa: E731
    assert {shape(p) for d in docs for p in d.pii_phones} == {  # the three forms the masker used to miss, and the rest
        "(999) 999 9999", "(999)-999-9999", "9999999999", "(999) 999-9999", "999-999-9999", "999.999.9999",
        "+9 999 999 9999", "+99 99 9999 9999", "999 9999 9999", "+99 999 999 9999", "9999 999 9999"}
    assert {"9999999999", "999999999999"} <= {shape(x) for d in docs for x in d.pii_decoys}
    for d in docs:
        assert clean.find_pii(d.text) == {k: list(v) for k, v in d.pii.items()}, d.doc_id
        masked, counts = clean.mask_pii(d.text)
        assert counts == {k: len(v) for k, v in d.pii.items()}
        assert all(x in masked for x in d.pii_decoys), d.doc_id


def test_mask_counts_and_ip_is_not_a_phone():
    text = "Mail a@b.example or call 202-555-0147 from 192.168.10.12, not 999.1.1.1."
    masked, counts = clean.mask_pii(text)
    assert masked == "Mail <EMAIL> or call <PHONE> from <IP>, not 999.1.1.1."
    assert counts == {"email": 1, "ip": 1, "phone": 1}


# ------------------------------------------------------------------------------------------ on the world

def test_precision_recall_on_the_world():
    """Every step scored against the planted labels on a 400 kB world (seed 0). The levels are what
    these rules reach here, with a margin; the chapter prints the exact figures."""
    docs = make_wiki(WorldConfig(seed=0, target_bytes=400_000))
    texts = [clean.normalise(d.text) for d in docs]
    keep, _ = clean.exact_dedup(texts)
    removed = {i for i, k in enumerate(keep) if not k}
    assert removed == {i for i, d in enumerate(docs) if d.exact_dup_of}  # P = R = 1 on byte copies
    alive = [i for i in range(len(docs)) if keep[i]]

    lines = clean.repeated_lines([texts[i] for i in alive], min_frac=0.01)
    good = bad = 0
    for i in alive:
        texts[i], cut = clean.remove_lines(texts[i], lines)
        good += sum(c in docs[i].footer_lines or docs[i].junk for c in cut)
        bad += sum(not (c in docs[i].footer_lines or docs[i].junk) for c in cut)
    planted = [(i, f) for i in alive for f in docs[i].footer_lines]
    assert good / (good + bad) >= 0.9  # measured 1.0: natural lines rarely recur in 1% of docs
    assert sum(f not in texts[i].split("\n") for i, f in planted) / len(planted) >= 0.95  # measured 1.0

    rejected = {i for i in alive if gopher_check(texts[i])}
    junk = {i for i in alive if docs[i].junk}
    assert len(rejected & junk) / len(rejected) >= 0.95  # measured 1.0
    assert len(rejected & junk) / len(junk) >= 0.9  # measured 0.930 (40/43): 3-sentence cookie banners pass Gopher

    for kind in ("email", "phone", "ip"):  # regexes vs planted strings: exact on this world
        for i in alive:
            assert Counter(clean.find_pii(texts[i])[kind]) == Counter(docs[i].pii[kind]), (kind, docs[i].doc_id)
    for i in alive:
        masked, _ = clean.mask_pii(texts[i])
        assert all(dec in masked for dec in docs[i].pii_decoys)  # look-alikes survive masking

"""MinHash near-dedup against reference math: big-int hash arithmetic, exact Jaccard, the S-curve.

References are written independently of the code under test: Python's arbitrary-precision ints
for the hash arithmetic, exact rational integration for the (bands, rows) choice, exact Jaccard of
Python sets, and binomial statistics for the sampled quantities.
"""
import math
import os
import subprocess
import sys
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilife.data import minhash as mh

P61 = (1 << 61) - 1
FAMILIES = ("mersenne61", "multiply_shift")


def ref_permute(x, a, b, family):
    """Pure-Python big-int reference, (P, S): no fixed-width arithmetic anywhere."""
    if family == "mersenne61":
        return [[(int(ai) * int(xi) + int(bi)) % P61 for xi in x] for ai, bi in zip(a, b)]
    return [[((int(ai) * int(xi) + int(bi)) % 2**64) >> 32 for xi in x] for ai, bi in zip(a, b)]


# --------------------------------------------------------------------------------------------
# hash arithmetic


@pytest.mark.parametrize("family", FAMILIES)
def test_permute_matches_bigint_reference(family):
    rng = np.random.default_rng(0)
    x = np.concatenate([[0, 1, 2**31 - 1, 2**31, 2**32 - 1], rng.integers(0, 2**32, 200)]).astype(np.uint64)
    a, b = mh.permutation_params(48, seed=3, family=family)
    top = P61 - 1 if family == "mersenne61" else 2**64 - 1  # the largest allowed a and b
    # edge pairs; (a=1, b=p-1) at x=1 sums to exactly p, the case the final conditional subtraction fixes
    a = np.concatenate([a, np.array([1, 1, top, 2**31 - 1, 2**31, top], dtype=np.uint64)])
    b = np.concatenate([b, np.array([0, top, top, top, 0, 0], dtype=np.uint64)])
    got = mh.permute(x, a, b, family)
    assert got.shape == (len(a), len(x)) and got.dtype == np.uint64
    # exact integer equality: any wrap-around would show up as a wrong residue
    assert got.tolist() == ref_permute(x, a, b, family)


def test_naive_uint64_mersenne_overflows():
    """Why the limbs exist: (a*x + b) % p computed directly in uint64 wraps and gives wrong residues."""
    rng = np.random.default_rng(1)
    x = rng.integers(2**31, 2**32, 100).astype(np.uint64)
    a, b = mh.permutation_params(16, seed=1, family="mersenne61")
    with np.errstate(over="ignore"):
        naive = (x[None, :] * a[:, None] + b[:, None]) % np.uint64(P61)  # (P, S), wraps mod 2^64
    ref = np.array(ref_permute(x, a, b, "mersenne61"), dtype=np.uint64)
    assert (naive != ref).mean() > 0.9  # almost every product exceeds 2^64 for 32-bit x, 61-bit a
    assert (mh.permute(x, a, b, "mersenne61") == ref).all()


def ref_shingle_hash(words):
    """The documented hash in Python ints: Karp-Rabin over bytes, Horner over words, fmix32."""
    h = 0
    for w in words:
        wh = 0
        for byte in w.encode("utf-8"):
            wh = (wh * 0x100000001B3 + byte + 1) % 2**64
        h = (h * 0x9E3779B97F4A7C15 + wh) % 2**64
    h >>= 32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


@pytest.mark.parametrize("text,n", [
    ("The quick brown fox jumps over the lazy dog", 5),
    ("the QUICK\tbrown  fox\njumps over the lazy dog", 3),
    ("Ünïcode wörds, çafé — naïve ΟΔΟΣ", 2),
    ("no\xa0break\u3000ideographic\u2009thin\x1cfile-sep\x85next line\u200bzero-width-is-not-space", 2),
    ("too short", 5),
    ("", 5),
    ("one", 1),
])
def test_shingle_hashes_match_reference(text, n):
    words = text.lower().split()  # str.split: the word boundaries the byte-level code must reproduce
    windows = [words[i:i + n] for i in range(len(words) - n + 1)] or [words]  # short doc: one shingle
    assert mh.shingle_hashes(text, n).tolist() == [ref_shingle_hash(w) for w in windows]


def test_whitespace_tables_match_str_isspace():
    unicode_spaces = "".join(chr(c) for c in range(128, 0x110000) if chr(c).isspace())
    assert mh._UNICODE_SPACES.sub("", unicode_spaces) == ""  # every non-ASCII space is mapped
    assert mh._UNICODE_SPACES.sub("", "a\u200bb\xadc") == "a\u200bb\xadc"  # and nothing else
    assert np.flatnonzero(mh._ASCII_SPACE).tolist() == [c for c in range(128) if chr(c).isspace()]
    assert not mh._ASCII_SPACE[128:].any()  # UTF-8 continuation/lead bytes are never spaces


def test_shingles_normalise_case_and_whitespace():
    assert mh.shingles("A  b\nC\td E f", 5) == {"a b c d e", "b c d e f"}
    assert mh.shingles("Too  SHORT", 5) == {"too short"}  # fewer than n words: the whole doc
    assert mh.shingles("   ", 5) == {""}


def test_signatures_do_not_depend_on_python_hash_seed():
    code = ("from minilife.data.minhash import signatures; "
            "print(signatures(['a stable hash is not salted per process ok'], num_perm=8).tolist())")
    outs, root = set(), os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, cwd=root).stdout)
    here = str(mh.signatures(["a stable hash is not salted per process ok"], num_perm=8).tolist()) + "\n"
    assert outs == {here}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_signatures_equal_per_document_minima(family, monkeypatch):
    """Chunking: docs shorter than n, straddling chunk edges, longer than a chunk (> 256 shingles),
    unicode and empty ones, spread over several batches of texts."""
    monkeypatch.setattr(mh, "_BATCH_TEXTS", 4)
    rng = np.random.default_rng(2)
    lengths = [0, 3, 5, 6, 700, 40, 1, 300, 255, 257]
    texts = [" ".join(f"t{v}" for v in rng.integers(0, 500, k)) for k in lengths]
    texts[2:2] = ["\u3000 çafé\xa0naïve wörds — über  alles ok", "  ", "ΟΔΟΣ όδος a b c d e"]
    sigs = mh.signatures(texts, num_perm=128, ngram=5, seed=4, family=family)
    a, b = mh.permutation_params(128, seed=4, family=family)
    for text, sig in zip(texts, sigs):  # one document at a time, no segmentation involved
        assert (sig == mh.permute(mh.shingle_hashes(text, 5), a, b, family).min(axis=1)).all()
    assert mh.signatures([], num_perm=8).shape == (0, 8)


# --------------------------------------------------------------------------------------------
# MinHash estimates and the LSH S-curve


def controlled_pair(rng, jaccard_target, union=120):
    """Two sets of distinct random 32-bit ints with |A & B| / |A | B| exactly shared / union."""
    shared = round(jaccard_target * union)
    elems = rng.choice(2**32, union, replace=False)
    only_a = (union - shared) // 2
    a = elems[:shared + only_a]
    b = np.concatenate([elems[:shared], elems[shared + only_a:]])
    return a, b, shared / union


@pytest.mark.parametrize("family", FAMILIES)
def test_minhash_estimate_within_4_standard_errors(family):
    rng = np.random.default_rng(7)
    num_perm, pairs = 128, [controlled_pair(rng, j) for j in np.linspace(0.05, 0.95, 150)]
    sigs = mh.signatures_from_hashes([s for a, b, _ in pairs for s in (a, b)], num_perm, family=family)
    est = mh.estimate_jaccard(sigs[0::2], sigs[1::2])  # (150,)
    exact = np.array([j for _, _, j in pairs])
    # references: exact Jaccard from the construction, checked against Python sets on one pair
    a, b, j = pairs[10]
    assert mh.jaccard(set(a.tolist()), set(b.tolist())) == pytest.approx(j, abs=1e-12)
    se = np.sqrt(exact * (1 - exact) / num_perm)  # per-permutation agreement is Bernoulli(J)
    assert np.all(np.abs(est - exact) <= 4 * se)  # 4 SE per pair: P(any of 150 fails) ~ 1%
    # no bias: the mean error over 150 independent pairs is within 4 SE of its own mean
    assert abs(np.mean(est - exact)) <= 4 * np.sqrt(np.mean(se**2) / len(pairs))


@pytest.mark.parametrize("family", FAMILIES)
def test_lsh_candidate_rate_follows_s_curve(family):
    bands, rows, n_pairs = 16, 8, 250
    rng = np.random.default_rng(11)
    sets, js = [], []
    for j in (0.3, 0.5, 0.65, 0.75, 0.9):
        for _ in range(n_pairs):
            a, b, exact = controlled_pair(rng, j, union=60)
            sets += [a, b]
            js.append(exact)
    sigs = mh.signatures_from_hashes(sets, bands * rows, seed=5, family=family)
    cand = {tuple(p) for p in mh.lsh_candidate_pairs(sigs, bands, rows).tolist()}
    hit = np.array([(2 * k, 2 * k + 1) in cand for k in range(len(js))])
    js = np.array(js)
    for j in np.unique(js):
        p = float(mh.s_curve(j, bands, rows))
        rate = hit[js == j].mean()
        # binomial tolerance: 4 standard errors of a rate over n_pairs, plus one pair for p near 0/1
        assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n_pairs) + 1 / n_pairs, (j, rate, p)
    # pairs across different (independent, disjoint) sets have J = 0: S(0) = 0, never candidates
    assert all(i // 2 == k // 2 for i, k in cand)


def exact_fp_fn(t: Fraction, b: int, r: int) -> tuple[Fraction, Fraction]:
    """Exact integrals of the S-curve by binomial expansion: (1 - j^r)^b = sum_k C(b,k) (-j^r)^k."""
    fn = sum(Fraction(math.comb(b, k) * (-1) ** k, r * k + 1) * (1 - t ** (r * k + 1)) for k in range(b + 1))
    below = sum(Fraction(math.comb(b, k) * (-1) ** k, r * k + 1) * t ** (r * k + 1) for k in range(b + 1))
    return t - below, fn  # FP = int_0^t S, FN = int_t^1 (1 - S)


@pytest.mark.parametrize("threshold,fp_w,fn_w", [("1/2", 0.5, 0.5), ("4/5", 0.5, 0.5), ("4/5", 0.1, 0.9)])
def test_pick_bands_rows_minimises_exact_weighted_area(threshold, fp_w, fn_w):
    num_perm, t = 24, Fraction(threshold)
    costs = {(b, r): fp_w * float(fp) + fn_w * float(fn)
             for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)
             for fp, fn in [exact_fp_fn(t, b, r)]}
    b, r = mh.pick_bands_rows(float(t), num_perm, fp_w, fn_w)
    assert b * r <= num_perm
    # 1e-6: the trapezoid rule on 1001 points is off by <= ~1e-6 here, so a near-tie may go either way
    assert costs[(b, r)] <= min(costs.values()) + 1e-6


def test_s_curve_formula():
    j = np.linspace(0, 1, 11)
    expected = [1 - (1 - float(v) ** 4) ** 8 for v in j]
    assert np.allclose(mh.s_curve(j, 8, 4), expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------------
# verification and clusters


def words_doc(seed: int, n: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"w{v}" for v in rng.integers(0, 10_000, n)]


def edit(words: list[str], positions, tag: str) -> list[str]:
    out = list(words)
    for p in positions:
        out[p] = f"{tag}{p}"
    return out


def test_near_duplicates_keep_the_first_copy():
    a = words_doc(1)
    texts = [" ".join(words_doc(2)), " ".join(edit(a, [30], "x")), " ".join(words_doc(3)),
             " ".join(a), " ".join(edit(a, [50], "y")), " ".join(a).upper()]
    res = mh.near_duplicates(texts, threshold=0.8)
    assert res.clusters == [[1, 3, 4, 5]]
    assert res.drop == [3, 4, 5] and res.keep.tolist() == [True, True, True, False, False, False]
    for i, j, sim in res.edges:  # every joining edge really is above the threshold (exact Jaccard)
        assert sim == mh.jaccard(mh.shingles(texts[i]), mh.shingles(texts[j])) >= 0.8


def test_clusters_are_transitive():
    a = words_doc(5, 100)
    b = edit(a, [40], "b")
    c = edit(b, [70], "c")
    sa, sb, sc = (mh.shingles(" ".join(w)) for w in (a, b, c))
    threshold = 0.85
    assert mh.jaccard(sa, sb) >= threshold and mh.jaccard(sb, sc) >= threshold
    assert mh.jaccard(sa, sc) < threshold  # A and C are joined only through B
    res = mh.near_duplicates([" ".join(c), " ".join(words_doc(6)), " ".join(a), " ".join(b)], threshold)
    assert res.clusters == [[0, 2, 3]] and res.drop == [2, 3]


def test_union_find_root_is_lowest_index():
    uf = mh.UnionFind(6)
    uf.union(5, 3)
    uf.union(4, 5)
    uf.union(2, 4)
    assert [uf.find(i) for i in range(6)] == [0, 1, 2, 2, 2, 2]


corpus = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 3), st.lists(st.integers(0, 29), max_size=3)),
    min_size=1, max_size=12,
)


def build(spec):
    """Docs from a few bases: (base, length class, edited positions) -> text; many near/identical."""
    docs = []
    for base, size, pos in spec:
        words = words_doc(base, [3, 12, 40, 40][size])
        docs.append(" ".join(edit(words, [p for p in pos if p < len(words)], "e")))
    return docs


@given(spec=corpus, perm_seed=st.integers(0, 2**16))
def test_clusters_do_not_depend_on_document_order(spec, perm_seed):
    texts = build(spec)
    order = np.random.default_rng(perm_seed).permutation(len(texts))
    res_a = mh.near_duplicates(texts, threshold=0.7, num_perm=64)
    res_b = mh.near_duplicates([texts[i] for i in order], threshold=0.7, num_perm=64)
    as_sets = {frozenset(c) for c in res_a.clusters}
    assert {frozenset(int(order[i]) for i in c) for c in res_b.clusters} == as_sets
    for res in (res_a, res_b):  # the kept document is always the lowest index of its cluster
        assert all(res.keep[c[0]] and not res.keep[c[1:]].any() for c in res.clusters)
    # identical texts always end in the same cluster
    label = {i: min(c) for c in res_a.clusters for i in c}
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            if texts[i] == texts[j]:
                assert j in label and label[j] == label.get(i, i)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="ngram"):
        mh.shingles("a b c", 0)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        mh.signatures(["ok", b"bytes"])
    with pytest.raises(ValueError, match="num_perm"):
        mh.signatures(["a"], num_perm=0)
    with pytest.raises(TypeError, match="not one str"):  # one str is not a list of one-character docs
        mh.signatures("one document")
    with pytest.raises(ValueError, match="family"):
        mh.signatures(["a"], family="sha1")
    with pytest.raises(ValueError, match="32-bit"):
        mh.permute(np.array([2**32], dtype=np.uint64), *mh.permutation_params(4))
    with pytest.raises(ValueError, match=r"hash_sets\[0\]"):
        mh.signatures_from_hashes([np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="bands=9 x rows=4"):
        mh.lsh_candidate_pairs(np.zeros((3, 32), np.uint64), 9, 4)
    with pytest.raises(ValueError, match="threshold"):
        mh.near_duplicates(["a"], threshold=1.5)
    with pytest.raises(ValueError, match="both bands and rows"):
        mh.near_duplicates(["a"], bands=4)

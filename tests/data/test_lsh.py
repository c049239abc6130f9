"""LSH banding and near-duplicate clusters against reference math: the S-curve, exact Jaccard.

References are written independently of the code under test: exact rational integration for the
(bands, rows) choice, exact Jaccard of Python sets, and binomial statistics for candidate rates.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilife.data import lsh
from minilife.data import minhash as mh

FAMILIES = ("mersenne61", "multiply_shift")


# --------------------------------------------------------------------------------------------
# the LSH S-curve and choosing (bands, rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_lsh_candidate_rate_follows_s_curve(family, controlled_pair):
    bands, rows, n_pairs = 16, 8, 250
    rng = np.random.default_rng(11)
    sets, js = [], []
    for j in (0.3, 0.5, 0.65, 0.75, 0.9):
        for _ in range(n_pairs):
            a, b, exact = controlled_pair(rng, j, union=60)
            sets += [a, b]
            js.append(exact)
    sigs = mh.signatures_from_hashes(sets, bands * rows, seed=5, family=family)
    cand = {tuple(p) for p in lsh.lsh_candidate_pairs(sigs, bands, rows).tolist()}
    hit = np.array([(2 * k, 2 * k + 1) in cand for k in range(len(js))])
    js = np.array(js)
    for j in np.unique(js):
        p = float(lsh.s_curve(j, bands, rows))
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
    b, r = lsh.pick_bands_rows(float(t), num_perm, fp_w, fn_w)
    assert b * r <= num_perm
    # 1e-6: the trapezoid rule on 1001 points is off by <= ~1e-6 here, so a near-tie may go either way
    assert costs[(b, r)] <= min(costs.values()) + 1e-6


def test_s_curve_formula():
    j = np.linspace(0, 1, 11)
    expected = [1 - (1 - float(v) ** 4) ** 8 for v in j]
    assert np.allclose(lsh.s_curve(j, 8, 4), expected, rtol=0, atol=1e-15)


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
    res = lsh.near_duplicates(texts, threshold=0.8)
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
    res = lsh.near_duplicates([" ".join(c), " ".join(words_doc(6)), " ".join(a), " ".join(b)], threshold)
    assert res.clusters == [[0, 2, 3]] and res.drop == [2, 3]


def test_union_find_root_is_lowest_index():
    uf = lsh.UnionFind(6)
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
    res_a = lsh.near_duplicates(texts, threshold=0.7, num_perm=64)
    res_b = lsh.near_duplicates([texts[i] for i in order], threshold=0.7, num_perm=64)
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
    with pytest.raises(ValueError, match="bands=9 x rows=4"):
        lsh.lsh_candidate_pairs(np.zeros((3, 32), np.uint64), 9, 4)
    with pytest.raises(ValueError, match="threshold"):
        lsh.near_duplicates(["a"], threshold=1.5)
    with pytest.raises(ValueError, match="both bands and rows"):
        lsh.near_duplicates(["a"], bands=4)

"""LSH banding over MinHash signatures, exact verification, and near-duplicate clusters.

Banding and the S-curve follow Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3
(signatures from minhash.py, Broder 1997).

1. **LSH**: the signature is cut into ``bands`` bands of ``rows`` rows (bands * rows <= num_perm;
   extra columns unused). Texts whose r values agree in some band share a bucket and become a
   candidate pair, with probability ``s_curve(j) = 1 - (1 - j**rows)**bands`` at Jaccard j.
   Buckets come from sorting the band rows (``np.unique``): a hash table's buckets without its
   collisions. ``pick_bands_rows`` minimises weighted false-positive/negative areas under S.
2. **Verification and clusters**: each candidate pair's exact shingle-set Jaccard is computed;
   pairs >= threshold are joined in a union-find whose root is the lowest index. Clusters are
   connected components (single linkage: A~B and B~C join A, B, C even if A, C are further
   apart); the lowest index of each cluster is kept, the others dropped.

Leaves out: exact-duplicate removal (clean.py; identical texts are still found here), persistent
LSH indexes, and multi-probe or distributed bucketing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from minilife.data.checks import check_positive_int
from minilife.data.minhash import jaccard, shingles, signatures


# --------------------------------------------------------------------------------------------
# LSH: bands, the S-curve, choosing (bands, rows)


def s_curve(j, bands: int, rows: int):
    """P(candidate) at Jaccard j for ``bands`` bands of ``rows`` rows: 1 - (1 - j^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(j, dtype=np.float64) ** rows) ** bands


def pick_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5,
                    fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising fp_weight * FP + fn_weight * FN.

    FP = integral of the S-curve over [0, threshold] (pairs below the threshold that still become
    candidates, for verification to reject), FN = integral of 1 - S over [threshold, 1] (pairs
    above it that are never compared); trapezoid rule on 1001 points each. This is not the
    ``(1/b)^(1/r) ~= threshold`` rule of thumb (where the S-curve is steepest): minimising the
    areas also weighs how wide the curve's shoulders are. Raise ``fn_weight`` to buy recall.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if fp_weight < 0 or fn_weight < 0 or fp_weight + fn_weight == 0:
        raise ValueError(f"fp_weight and fn_weight must be >= 0, not both 0; got {fp_weight}, {fn_weight}")
    check_positive_int(num_perm, "num_perm")
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands, rows = (np.array(v, dtype=np.float64)[:, None] for v in zip(*pairs))  # (C, 1) each
    lo, hi = np.linspace(0.0, threshold, 1001), np.linspace(threshold, 1.0, 1001)  # (G,) each
    trapezoid = lambda y, x: ((y[:, 1:] + y[:, :-1]) / 2 * np.diff(x)).sum(axis=1)  # noqa: E731 (numpy 1.x too)
    fp = trapezoid(s_curve(lo, bands, rows), lo)  # (C,)
    fn = trapezoid(1.0 - s_curve(hi, bands, rows), hi)  # (C,)
    return pairs[int(np.argmin(fp_weight * fp + fn_weight * fn))]


def lsh_candidate_pairs(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Pairs (i, j), i < j, sharing at least one band bucket -> (M, 2) int64, sorted, unique.

    sigs: (N, P) signatures; uses columns [0, bands*rows). A bucket of k documents gives k(k-1)/2
    pairs, so remove exact duplicates first (clean.py) when there are thousands of copies.
    """
    sigs = np.asarray(sigs)
    if sigs.ndim != 2:
        raise ValueError(f"sigs must be 2-D (N, P), got shape {sigs.shape}")
    if bands < 1 or rows < 1 or bands * rows > sigs.shape[1]:
        raise ValueError(f"bands={bands} x rows={rows} must be >= 1 and fit in num_perm={sigs.shape[1]}")
    # exercise: lsh_banding
    n = sigs.shape[0]
    codes = []
    for k in range(bands):
        _, bucket = np.unique(sigs[:, k * rows:(k + 1) * rows], axis=0, return_inverse=True)  # (N,) per doc
        order = np.argsort(bucket.ravel(), kind="stable")  # docs grouped by bucket, ascending inside
        _, first, size = np.unique(bucket.ravel()[order], return_index=True, return_counts=True)
        for s0, m in zip(first[size > 1].tolist(), size[size > 1].tolist()):  # buckets of m >= 2 docs
            i, j = np.triu_indices(m, k=1)
            group = order[s0:s0 + m]
            codes.append(group[i] * n + group[j])  # group is ascending, so group[i] < group[j]
    if not codes:
        return np.zeros((0, 2), dtype=np.int64)
    uniq = np.unique(np.concatenate(codes))
    return np.stack([uniq // n, uniq % n], axis=1).astype(np.int64)  # (M, 2)
    # end exercise: lsh_banding


# --------------------------------------------------------------------------------------------
# verification and clusters


class UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the lowest index of its set."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        ri, rj = sorted((self.find(i), self.find(j)))
        self.parent[rj] = ri  # the lower root wins, so a set's root is its lowest index
        return ri


@dataclass
class NearDupResult:
    """What ``near_duplicates`` found. clusters: components of size >= 2, each sorted (first is kept)."""
    keep: np.ndarray  # (N,) bool
    drop: list[int]  # indices of the documents to remove
    clusters: list[list[int]]
    bands: int
    rows: int
    n_candidates: int  # pairs sharing a band bucket
    n_verified: int  # candidate pairs whose exact Jaccard was computed
    edges: list[tuple[int, int, float]]  # (i, j, exact J) of the pairs that joined clusters


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128,
                    bands: int | None = None, rows: int | None = None, ngram: int = 5,
                    seed: int = 0, family: str = "multiply_shift", fn_weight: float = 0.95) -> NearDupResult:
    """Find clusters of documents whose shingle-set Jaccard is >= ``threshold``.

    bands/rows default to ``pick_bands_rows(threshold, num_perm, 1 - fn_weight, fn_weight)``: every
    candidate is verified exactly, so a false positive costs only time and recall is weighted up
    (at 0.8 and 128 permutations: 16 bands x 8 rows, S(0.8) = 0.95). A candidate pair already in
    one cluster is not re-verified: that cannot change the connected components.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if (bands is None) != (rows is None):
        raise ValueError("give both bands and rows, or neither (then pick_bands_rows chooses)")
    if bands is None:
        bands, rows = pick_bands_rows(min(threshold, 0.999), num_perm, 1.0 - fn_weight, fn_weight)
    texts = list(texts)
    sigs = signatures(texts, num_perm=num_perm, ngram=ngram, seed=seed, family=family)  # (N, P)
    pairs = lsh_candidate_pairs(sigs, bands, rows)
    uf, sets, edges, n_verified = UnionFind(len(texts)), {}, [], 0
    for i, j in pairs.tolist():
        if uf.find(i) == uf.find(j):
            continue
        for d in (i, j):
            sets[d] = sets[d] if d in sets else shingles(texts[d], ngram)
        n_verified += 1
        sim = jaccard(sets[i], sets[j])
        if sim >= threshold:
            uf.union(i, j)
            edges.append((i, j, sim))
    members: dict[int, list[int]] = {}
    for i in range(len(texts)):
        members.setdefault(uf.find(i), []).append(i)
    keep = np.array([uf.find(i) == i for i in range(len(texts))], dtype=bool)  # (N,)
    return NearDupResult(keep, np.flatnonzero(~keep).tolist(), [m for m in members.values() if len(m) > 1],
                         bands, rows, len(pairs), n_verified, edges)

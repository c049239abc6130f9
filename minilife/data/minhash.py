"""Near-duplicate detection: word shingles, MinHash signatures, LSH banding, exact verification.

Follows Broder 1997 ("On the resemblance and containment of documents"); banding and the S-curve
as in Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3.

1. **Shingles**: the word n-grams (n=5 by default) of the lower-cased, whitespace-split text; a
   text shorter than n words has one shingle, all of its words ("" for an empty text).
2. **Stable 32-bit shingle hashes** (not Python's salted ``hash()``), vectorised over the bytes of
   all texts at once, all mod 2^64: word = ``sum_k (byte_k + 1) W^(len-1-k)`` (Karp-Rabin over
   its UTF-8 bytes), shingle = Horner over its word hashes ``(..(w_0 S + w_1) S + ..) + w_{m-1}``
   (odd bases W, S), and x = MurmurHash3's ``fmix32`` of the shingle's high 32 bits.
3. **MinHash**: per permutation i, the minimum of h_i(x) over the text's shingles, so that
   ``P(sig_A[i] == sig_B[i]) ~= Jaccard(A, B)``. a_i, b_i come from
   ``numpy.random.default_rng([seed, family index])``. Two families:

   * ``"multiply_shift"`` (default; Dietzfelbinger 1996): ``h_i(x) = ((a_i x + b_i) mod 2^64) >> 32``,
     a_i, b_i uniform 64-bit; the uint64 wrap-around *is* the modulus, so it costs three numpy
     operations per value. Strongly universal (2-independent).
   * ``"mersenne61"`` (Broder's textbook family): ``h_i(x) = (a_i x + b_i) mod p``, ``p = 2^61 - 1``,
     a_i in [1, p), b_i in [0, p). Overflow: a_i x reaches 2^93 and would silently wrap in
     uint64. So ``a = a_hi 2^31 + a_lo`` (a_lo < 2^31, a_hi < 2^30): ``a_lo x < 2^63`` and
     ``t = a_hi x < 2^62`` fit, and since ``2^61 = 1 (mod p)``, ``t 2^31 = ((t mod 2^30) << 31) +
     (t >> 30) (mod p)``. The sum with a_lo x and b stays below 2^64; one fold
     ``y -> (y & p) + (y >> 61)`` and ``min(y, y - p)`` (y - p wraps when y < p) give the residue:
     thirteen numpy operations per value, so about half the throughput (bench/minhash.py).

   Neither linear family is min-wise independent: on structured inputs (runs of consecutive
   integers) the estimate's spread grows ~1.3x, hence the fmix32 mixing first. Signatures are
   uint64, values < 2^61 (mersenne61) or < 2^32; the tests check both against Python big ints.
4. **LSH**: the signature is cut into ``bands`` bands of ``rows`` rows (bands * rows <= num_perm;
   extra columns unused). Texts whose r values agree in some band share a bucket and become a
   candidate pair, with probability ``s_curve(j) = 1 - (1 - j**rows)**bands`` at Jaccard j.
   Buckets come from sorting the band rows (``np.unique``): a hash table's buckets without its
   collisions. ``pick_bands_rows`` minimises weighted false-positive/negative areas under S.
5. **Verification and clusters**: each candidate pair's exact shingle-set Jaccard is computed;
   pairs >= threshold are joined in a union-find whose root is the lowest index. Clusters are
   connected components (single linkage: A~B and B~C join A, B, C even if A, C are further
   apart); the lowest index of each cluster is kept, the others dropped.

Leaves out: exact-duplicate removal (clean.py; identical texts are still found here), weighted or
b-bit MinHash, persistent LSH indexes, and multi-process hashing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MERSENNE_61 = (1 << 61) - 1
WORD_BASE = 0x100000001B3  # odd (the 64-bit FNV prime)
SHINGLE_BASE = 0x9E3779B97F4A7C15  # odd (2^64 / golden ratio)
_U = np.uint64
_P = _U(MERSENNE_61)
_MASK32 = _U(0xFFFFFFFF)
_MASK30 = _U((1 << 30) - 1)
_MASK31 = _U((1 << 31) - 1)
_ASCII_SPACE = np.isin(np.arange(256), [9, 10, 11, 12, 13, 28, 29, 30, 31, 32])  # str.isspace() bytes
_UNICODE_SPACES = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")  # the others
_BATCH_TEXTS = 4096
_CHUNK_ELEMENTS = 1 << 15  # shingles x permutations per chunk: three uint64 buffers stay in L2 cache


# --------------------------------------------------------------------------------------------
# shingles and their stable hashes


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_text(text: object, where: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    return text


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word n-grams of ``text`` (lower-cased, whitespace-normalised, joined by one space).

    A text with fewer than ``n`` words has one shingle: all its words (``""`` for an empty text).
    """
    _check_positive_int(n, "ngram (n)")
    words = _check_text(text).lower().split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity |a & b| / |a | b| (1.0 for two empty sets)."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint64 arrays holding 32-bit values (any shape)."""
    h = h ^ (h >> _U(16))
    h = (h * _U(0x85EBCA6B)) & _MASK32
    h ^= h >> _U(13)
    h = (h * _U(0xC2B2AE35)) & _MASK32
    return h ^ (h >> _U(16))


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Karp-Rabin hash of every word of every text -> (W,) uint64, and words per text (N,).

    All texts become one byte buffer (lower-cased UTF-8, one space between texts); words are the
    runs of non-space bytes, which is ``str.split()`` once the non-ASCII spaces are mapped to " ".
    """
    encoded = []
    for i, t in enumerate(texts):
        t = _check_text(t, f"texts[{i}]").lower()
        encoded.append((t if t.isascii() else _UNICODE_SPACES.sub(" ", t)).encode("utf-8"))
    buf = np.frombuffer(b" ".join(encoded), dtype=np.uint8)  # (L,)
    space = np.ones(len(buf) + 2, dtype=bool)  # (L + 2,) a space before and after everything
    space[1:-1] = _ASCII_SPACE[buf]
    starts = np.flatnonzero(space[:-2] & ~space[1:-1])  # (W,) first byte of each word
    ends = np.flatnonzero(~space[1:-1] & space[2:]) + 1  # (W,) one past its last byte
    text_start = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])  # (N,) first byte of each text
    n_words = np.bincount(np.searchsorted(text_start, starts, side="right") - 1, minlength=len(texts))
    # sum_{k=s}^{e-1} c_k B^(e-1-k) = B^(e-1) (Q[e] - Q[s]) with Q[i] = sum_{k<i} c_k B^-k, c_k =
    # byte + 1; all mod 2^64 (uint64 wraps on purpose; B is odd, so B^-1 mod 2^64 exists)
    powers = np.cumprod(np.concatenate(([_U(1)], np.full(len(buf), _U(WORD_BASE)))))  # (L + 1,) B^k
    inverse = np.cumprod(np.concatenate(([_U(1)], np.full(len(buf), _U(pow(WORD_BASE, -1, 2**64))))))
    prefix = np.concatenate(([_U(0)], np.cumsum((buf + _U(1)) * inverse[:-1])))  # (L + 1,) Q
    return powers[ends - 1] * (prefix[ends] - prefix[starts]), n_words


def _shingle_hashes_flat(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """All shingle hashes of all texts: (S,) uint64 32-bit values, and (N,) start offsets into it."""
    _check_positive_int(n, "ngram (n)")
    word_hash, n_words = _word_hashes(texts)  # (W,), (N,)
    word_start = np.cumsum(n_words) - n_words  # (N,) first word of each text
    n_shingles = np.maximum(n_words - n + 1, 1)  # (N,) a short text has one shingle
    doc_start = np.cumsum(n_shingles) - n_shingles  # (N,) first shingle of each text
    doc_of = np.repeat(np.arange(len(texts)), n_shingles)  # (S,) which text each shingle is in
    first_word = word_start[doc_of] + np.arange(len(doc_of)) - doc_start[doc_of]  # (S,)
    m = max(len(word_hash) - n + 1, 0)
    windows = np.zeros(m, dtype=np.uint64)  # Horner over every n consecutive words, mod 2^64
    for k in range(n if m else 0):
        windows = windows * _U(SHINGLE_BASE) + word_hash[k:k + m]
    h = np.zeros(len(doc_of), dtype=np.uint64)  # (S,)
    full = n_words[doc_of] >= n  # (S,) shingles of n words (the others: whole short texts)
    h[full] = windows[first_word[full]]  # windows straddling two texts are never picked
    for d in np.flatnonzero(n_words < n).tolist():  # a short text's one shingle: all of its words
        v = 0
        for c in word_hash[word_start[d]:word_start[d] + n_words[d]].tolist():
            v = (v * SHINGLE_BASE + c) % 2**64
        h[doc_start[d]] = v
    return fmix32(h >> _U(32)), doc_start


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """Stable 32-bit hashes (uint64 array, (S,)) of the shingles of ``text``, in document order."""
    return _shingle_hashes_flat([text], n)[0]


# --------------------------------------------------------------------------------------------
# the permutation family and signatures


FAMILIES = ("mersenne61", "multiply_shift")


def permutation_params(num_perm: int = 128, seed: int = 0,
                       family: str = "multiply_shift") -> tuple[np.ndarray, np.ndarray]:
    """Seeded (a, b), each (P,) uint64: in [1, p) x [0, p) for mersenne61, any 64-bit otherwise."""
    _check_positive_int(num_perm, "num_perm")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    rng = np.random.default_rng([seed, FAMILIES.index(family)])  # the two families draw independently
    if family == "multiply_shift":
        return tuple(rng.integers(0, 2**64, size=(2, num_perm), dtype=np.uint64))
    return (rng.integers(1, MERSENNE_61, size=num_perm, dtype=np.uint64),
            rng.integers(0, MERSENNE_61, size=num_perm, dtype=np.uint64))


def permute(x: np.ndarray, a: np.ndarray, b: np.ndarray, family: str = "multiply_shift",
            out: np.ndarray | None = None, scratch: tuple | None = None) -> np.ndarray:
    """h_i(x_s) for x (S,) ints in [0, 2^32) and a, b (P,) -> (P, S) uint64; row i is permutation i.

    ``out`` and ``scratch`` (two more (P, S) uint64 arrays) let a caller reuse buffers.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    x = np.asarray(x, dtype=np.uint64)[None, :]  # (1, S)
    if x.size and int(x.max()) >= 1 << 32:  # the no-overflow bounds below need x < 2^32
        raise ValueError(f"x must hold 32-bit values (< 2^32), got max {int(x.max())}")
    shape = (a.shape[0], x.shape[1])
    r = np.empty(shape, np.uint64) if out is None else out
    if family == "multiply_shift":
        np.multiply(x, a[:, None], out=r)  # mod 2^64 by wrap-around, on purpose
        r += b[:, None]
        r >>= _U(32)  # keep the high, well-mixed half
        return r
    lo, hi = (np.empty(shape, np.uint64), np.empty(shape, np.uint64)) if scratch is None else scratch
    np.multiply(x, (a & _MASK31)[:, None], out=lo)  # a_lo * x < 2^63
    np.multiply(x, (a >> _U(31))[:, None], out=hi)  # t = a_hi * x < 2^62
    np.bitwise_and(hi, _MASK30, out=r)  # t * 2^31 = (t >> 30) * 2^61 + (t mod 2^30) * 2^31
    r <<= _U(31)  # and 2^61 = 1 (mod p), so t * 2^31 = ((t mod 2^30) << 31) + (t >> 30)
    hi >>= _U(30)
    r += hi  # < 2^61 + 2^32
    r += lo
    r += b[:, None]  # < 2^61 + 2^32 + 2^63 + 2^61 < 2^64: nothing wraps
    np.right_shift(r, _U(61), out=hi)  # fold: (r mod 2^61) + (r >> 61), now in [0, p + 8]
    r &= _P
    r += hi
    np.subtract(r, _P, out=hi)  # r - p wraps around to above 2^63 when r < p, so
    np.minimum(r, hi, out=r)  # the smaller of r and r - p is the exact residue in [0, p)
    return r


def _segment_minima(x: np.ndarray, starts: np.ndarray, num_perm: int, seed: int, family: str) -> np.ndarray:
    """Per-document minima of permute(x) where document d owns x[starts[d]:starts[d+1]] -> (N, P)."""
    a, b = permutation_params(num_perm, seed, family)
    sig = np.full((num_perm, len(starts)), np.iinfo(np.uint64).max, dtype=np.uint64)  # (P, N)
    cols = max(1, _CHUNK_ELEMENTS // num_perm)
    bufs = [np.empty((num_perm, cols), np.uint64) for _ in range(3)]  # (P, cols) each
    for lo in range(0, len(x), cols):
        hi = min(lo + cols, len(x))
        h = permute(x[lo:hi], a, b, family, out=bufs[0][:, :hi - lo],
                    scratch=(bufs[1][:, :hi - lo], bufs[2][:, :hi - lo]))  # (P, hi - lo)
        d0 = int(np.searchsorted(starts, lo, side="right")) - 1  # doc holding shingle lo
        d1 = int(np.searchsorted(starts, hi, side="left"))  # docs starting before hi
        seg = np.maximum(starts[d0:d1], lo) - lo  # (d1 - d0,) segment starts inside this chunk
        np.minimum(sig[:, d0:d1], np.minimum.reduceat(h, seg, axis=1), out=sig[:, d0:d1])
    return np.ascontiguousarray(sig.T)  # (N, P)


def signatures(texts: Sequence[str], num_perm: int = 128, ngram: int = 5, seed: int = 0,
               family: str = "multiply_shift") -> np.ndarray:
    """MinHash signatures of many texts -> (N, P) uint64, vectorised over batches of texts."""
    if isinstance(texts, str):  # would silently give one signature per character
        raise TypeError("signatures: texts must be a sequence of str (a list, not one str)")
    permutation_params(num_perm, seed, family)  # validate before the heavy work
    texts, sigs = list(texts), [np.zeros((0, num_perm), np.uint64)]
    for lo in range(0, len(texts), _BATCH_TEXTS):  # bounded memory: ~50 bytes per input byte
        x, starts = _shingle_hashes_flat(texts[lo:lo + _BATCH_TEXTS], ngram)
        sigs.append(_segment_minima(x, starts, num_perm, seed, family))
    return np.concatenate(sigs)


def signatures_from_hashes(hash_sets: Sequence[np.ndarray], num_perm: int = 128, seed: int = 0,
                           family: str = "multiply_shift") -> np.ndarray:
    """Signatures of pre-hashed sets (each a non-empty 1-D array of ints in [0, 2^32)) -> (N, P)."""
    arrays = []
    for i, s in enumerate(hash_sets):
        s = np.asarray(s)
        if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer) or s.min() < 0 \
                or int(s.max()) >= 1 << 32:
            raise ValueError(f"hash_sets[{i}] must be a non-empty 1-D integer array with values in [0, 2^32)")
        arrays.append(s.astype(np.uint64))
    sizes = np.array([len(s) for s in arrays], dtype=np.int64)  # (N,)
    x = np.concatenate(arrays) if arrays else np.zeros(0, np.uint64)  # (S,)
    return _segment_minima(x, np.cumsum(sizes) - sizes, num_perm, seed, family)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Fraction of equal signature entries along the last axis ((..., P) -> (...))."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signature shapes differ: {sig_a.shape} vs {sig_b.shape}")
    est = np.mean(sig_a == sig_b, axis=-1)
    return float(est) if np.ndim(est) == 0 else est


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
    _check_positive_int(num_perm, "num_perm")
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands, rows = (np.array(v, dtype=np.float64)[:, None] for v in zip(*pairs))  # (C, 1) each
    lo, hi = np.linspace(0.0, threshold, 1001), np.linspace(threshold, 1.0, 1001)  # (G,) each
    fp = np.trapezoid(s_curve(lo, bands, rows), lo, axis=1)  # (C,)
    fn = np.trapezoid(1.0 - s_curve(hi, bands, rows), hi, axis=1)  # (C,)
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

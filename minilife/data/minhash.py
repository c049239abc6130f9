"""MinHash signatures: word shingles, their stable hashes, permutation families, Jaccard estimates.

Follows Broder 1997 ("On the resemblance and containment of documents"): the fraction of equal
entries of two signatures estimates the Jaccard similarity of the two shingle sets.

1. **Shingles**: the word n-grams (n=5 by default) of the lower-cased, whitespace-split text; a
   text shorter than n words has one shingle, all of its words ("" for an empty text).
   ``jaccard`` is the exact |A & B| / |A | B| of two such sets.
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
     thirteen numpy operations per value, so 0.4-0.5x the throughput (bench/minhash.py).

   Neither linear family is min-wise independent: on structured inputs (runs of consecutive
   integers) the estimate's spread grows ~1.3x, hence the fmix32 mixing first. Signatures are
   uint64, values < 2^61 (mersenne61) or < 2^32; the tests check both against Python big ints.

Leaves out: LSH banding, verification and clusters (lsh.py), exact-duplicate removal (clean.py),
weighted or b-bit MinHash, and multi-process hashing.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from minilife.data.checks import check_positive_int, check_text

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
_CHUNK_ELEMENTS = 3 << 18  # shingles x permutations per chunk, 6 MiB a buffer: the fastest size measured


# --------------------------------------------------------------------------------------------
# shingles and their stable hashes


def shingles(text: str, n: int = 5) -> set[str]:
    """The set of word n-grams of ``text`` (lower-cased, whitespace-normalised, joined by one space).

    A text with fewer than ``n`` words has one shingle: all its words (``""`` for an empty text).
    """
    check_positive_int(n, "ngram (n)")
    words = check_text(text).lower().split()
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
        t = check_text(t, f"texts[{i}]").lower()
        encoded.append((t if t.isascii() else _UNICODE_SPACES.sub(" ", t)).encode("utf-8"))
    buf = np.frombuffer(b" ".join(encoded), dtype=np.uint8)  # (L,)
    space = np.ones(len(buf) + 2, dtype=bool)  # (L + 2,) a space before and after everything
    space[1:-1] = _ASCII_SPACE[buf]
    starts = np.flatnonzero(space[:-2] & ~space[1:-1])  # (W,) first byte of each word
    ends = np.flatnonzero(~space[1:-1] & space[2:]) + 1  # (W,) one past its last byte
    text_start = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])  # (N,) first byte of each text
    n_words = np.diff(np.searchsorted(starts, text_start), append=len(starts))  # (N,) words in each text
    # sum_{k=s}^{e-1} c_k B^(e-1-k) = B^(e-1) (Q[e] - Q[s]) with Q[i] = sum_{k<i} c_k B^-k, c_k =
    # byte + 1; all mod 2^64 (uint64 wraps on purpose; B is odd, so B^-1 mod 2^64 exists)
    powers, inverse, prefix = (np.full(len(buf) + 1, _U(v)) for v in (WORD_BASE, pow(WORD_BASE, -1, 2**64), 0))
    powers[0] = inverse[0] = 1
    for p in (powers, inverse):  # (L + 1,) B^k and B^-k, in place
        np.cumprod(p, out=p)
    np.cumsum((buf + _U(1)) * inverse[:-1], out=prefix[1:])  # (L + 1,) Q, Q[0] = 0
    return powers[ends - 1] * (prefix[ends] - prefix[starts]), n_words


def _shingle_hashes_flat(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """All shingle hashes of all texts: (S,) uint64 32-bit values, and (N,) start offsets into it."""
    check_positive_int(n, "ngram (n)")
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


def permutation_params(num_perm: int = 128, seed: int = 0, family: str = "multiply_shift") -> tuple[np.ndarray, np.ndarray]:
    """Seeded (a, b), each (P,) uint64: in [1, p) x [0, p) for mersenne61, any 64-bit otherwise."""
    check_positive_int(num_perm, "num_perm")
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
    # exercise: minhash_signature
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
    # end exercise: minhash_signature


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

"""MinHash against reference math: big-int hash arithmetic, exact Jaccard, binomial statistics.

References are written independently of the code under test: Python's arbitrary-precision ints
for the hash arithmetic, exact Jaccard of Python sets, and binomial statistics for the estimates.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

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


@pytest.mark.parametrize("family", FAMILIES)
def test_documents_starting_exactly_at_a_chunk_edge(family, monkeypatch):
    """Chunks of 8 shingles; documents of 8 and 4 shingles, so most start exactly on an edge (and
    one chunk holds two whole documents): each keeps its own minima, no neighbour's."""
    monkeypatch.setattr(mh, "_CHUNK_ELEMENTS", 8 * 16)  # 16 permutations -> 8 shingles per chunk
    rng = np.random.default_rng(7)
    texts = [" ".join(f"w{v}" for v in rng.integers(0, 10_000, k + 4)) for k in (8, 8, 4, 4, 8, 4, 8)]
    starts = np.cumsum([0] + [len(mh.shingle_hashes(t, 5)) for t in texts])[:-1]
    assert (starts % 8 == 0).sum() >= 5  # the case under test really occurs
    a, b = mh.permutation_params(16, seed=1, family=family)
    sigs = mh.signatures(texts, num_perm=16, ngram=5, seed=1, family=family)
    for text, sig in zip(texts, sigs):
        assert (sig == mh.permute(mh.shingle_hashes(text, 5), a, b, family).min(axis=1)).all()


# --------------------------------------------------------------------------------------------
# MinHash estimates


@pytest.mark.parametrize("family", FAMILIES)
def test_minhash_estimate_within_4_standard_errors(family, controlled_pair):
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

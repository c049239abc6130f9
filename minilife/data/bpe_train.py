"""Byte-level BPE training: learn merge ranks from text, first naively, then with incremental counts.

What it implements
- Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
  Units"; byte-level as in GPT-2, Radford et al. 2019): start from the 256 bytes, repeatedly merge the
  most frequent adjacent pair of tokens into a new token.
- Pre-tokenisation first (``count_pretokens``, GPT-2's pattern from ``bpe.py``): text is cut into
  pre-tokens (words with their leading space, numbers, punctuation runs, whitespace) and merges
  never cross a pre-token boundary. Special tokens are cut out of the text *before* that, so no
  merge ever reaches into or across ``<|endoftext|>``.
- Ties between equally frequent pairs go to the lexicographically *greatest* pair of bytes: the pair
  (bytes_a, bytes_b) is compared as a Python tuple of bytes, so first bytes_a, then bytes_b.
  (b"p", b"ug") beats (b"hug", b"s") because b"p" > b"hug". This makes training deterministic.
- ``learn_merges_naive`` (read this first): recount every pair of every word after every merge.
  ``learn_merges`` learns the same merges without the recount: each distinct pre-token is stored
  once with its frequency; we keep ``pair -> count`` and ``pair -> words that held it`` (not pruned:
  a word that lost the pair is rescanned for nothing). A merge rewrites those words in place and
  changes only the counts at each merge site: (prev, a), (b, next) become (prev, ab), (ab, next), as
  in HF ``tokenizers``' trainer. The best pair comes from a heap with lazy invalidation: every count
  change pushes a fresh entry; a popped entry whose count no longer matches ``pair_counts`` is stale.
- ``train_bpe(vocab_size, text=... | files=...)``: the entry point; returns a ``bpe.Tokenizer``. Text
  and files are separate keywords, so a file name can never be trained on as if it were the corpus.
  Files are read by ``read_text_file``: strict UTF-8, a bad byte raises ValueError naming the file,
  byte offset and line (``errors="replace"`` repairs with U+FFFD and warns with a count).

What it leaves out: parallel pre-tokenisation (one process is fast enough at course sizes), a
minimum pair frequency, and dropout-BPE.
"""
from __future__ import annotations

import gc
import heapq
import os
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import regex
from tqdm import tqdm

from minilife.data.bpe import EOT, GPT2_PATTERN, Tokenizer, special_token_regex

_BYTES = {bytes([b]): b for b in range(256)}


def read_text_file(path: str | os.PathLike, errors: str = "strict") -> str:
    """Read a UTF-8 text file. Invalid UTF-8 raises ValueError naming the file, byte offset and line;
    ``errors="replace"`` instead repairs each bad sequence with U+FFFD and warns with their count."""
    data = Path(path).read_bytes()
    if errors == "replace":
        text = data.decode("utf-8", errors="replace")
        # U+FFFD already in the file is the valid sequence EF BF BD; the rest are our repairs
        n_repaired = text.count("\ufffd") - data.count("\ufffd".encode("utf-8"))
        if n_repaired:
            warnings.warn(f"{path}: replaced {n_repaired} invalid UTF-8 sequence(s) with U+FFFD",
                          stacklevel=2)
        return text
    if errors != "strict":
        raise ValueError(f"read_text_file: errors={errors!r}; use 'strict' or 'replace'")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: invalid UTF-8 at byte offset {e.start} (line {line}): "
                         f"{data[e.start:e.end]!r} ({e.reason}); fix the file or read it with "
                         f"read_text_file(path, errors='replace')") from None


def count_pretokens(texts: Iterable[str], pattern: str, special_tokens: Sequence[str]) -> Counter:
    """Count distinct pre-tokens (as UTF-8 bytes) over ``texts``; special tokens are cut out first."""
    pretok = regex.compile(pattern)
    specials = special_token_regex(special_tokens)
    counts: Counter = Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_bpe: document {i} is {type(text).__name__}, expected str")
        for chunk in (specials.split(text) if specials is not None else (text,)):
            counts.update(pretok.findall(chunk))  # Counter over str pieces: fast C loop
    return Counter({piece.encode("utf-8"): n for piece, n in counts.items()})


def learn_merges_naive(pretoken_counts: dict[bytes, int], n_merges: int) -> list[bytes]:
    """The textbook trainer: after every merge, recount every pair of every word. Same arguments, result
    and tie rule as ``learn_merges``; it costs (merges x corpus), so it is for reading and checking."""
    vocab = [bytes([b]) for b in range(256)]  # id = index; ids 0..255 are the single bytes
    words = [([bytes([b]) for b in piece], n) for piece, n in pretoken_counts.items()]
    while len(vocab) - 256 < n_merges:
        counts: Counter = Counter()
        for word, n in words:
            for pair in zip(word, word[1:]):
                counts[pair] += n
        if not counts:
            break  # every pre-token is one token
        a, b = max(counts, key=lambda pair: (counts[pair], pair))  # most frequent, then greatest (a, b)
        if a + b not in vocab:  # two different merges can spell the same bytes: one token
            vocab.append(a + b)
        for word, _ in words:
            i = 0
            while i < len(word) - 1:  # left to right, so "aaa" with pair (a, a) becomes [aa, a]
                if word[i] == a and word[i + 1] == b:
                    word[i:i + 2] = [a + b]
                i += 1
    return vocab


def _reverse_key(token: bytes) -> tuple[int, ...]:
    """Sort key that orders bytes strings in *reverse*: a min-heap on it pops the greatest bytes.

    Each byte x becomes 255 - x and a final 256 stands for "end of string", which makes a prefix
    (smaller as bytes) sort *after* its extensions, as the reverse order requires.
    """
    return tuple(255 - x for x in token) + (256,)


def learn_merges(pretoken_counts: dict[bytes, int], n_merges: int, progress: bool = False) -> list[bytes]:
    """Learn up to ``n_merges`` merges; return the vocabulary as a list of bytes (index = token id).

    Ids 0..255 are the single bytes (id = byte value); each merge appends the merged bytes. Stops
    early when no adjacent pair is left (every pre-token is a single token).
    """
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    id_of: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    rkey: list[tuple[int, ...]] = [_reverse_key(tok) for tok in vocab]

    # One entry per distinct multi-byte pre-token: its current token ids and its frequency.
    multi = [(piece, n) for piece, n in pretoken_counts.items() if len(piece) > 1]
    words: list[list[int]] = [list(piece) for piece, _ in multi]
    freqs: list[int] = [n for _, n in multi]

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words that held it
    for wi, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)

    # Heap entries: (-count, reverse key of a, reverse key of b, pair). Smallest = most frequent,
    # then greatest (bytes_a, bytes_b). Stale entries are skipped when popped.
    heap = [(-c, rkey[a], rkey[b], (a, b)) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    bar = tqdm(total=n_merges, desc="BPE merges", unit="merge", disable=not progress)
    done = 0
    while done < n_merges and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale: this pair's count changed after the entry was pushed
        a, b = pair
        merged = vocab[a] + vocab[b]
        new_id = id_of.get(merged)
        if new_id is None:  # the usual case; a bytes string reached by two different merges keeps one id
            new_id = len(vocab)
            vocab.append(merged)
            id_of[merged] = new_id
            rkey.append(_reverse_key(merged))
            done += 1
            bar.update(1)

        # exercise: bpe_merge_step
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop(pair):
            word, f = words[wi], freqs[wi]
            i = 0
            while i < len(word) - 1:  # left to right, so "aaa" with pair (a, a) becomes [aa, a]
                if word[i] == a and word[i + 1] == b:
                    delta[pair] -= f  # only the pairs touching this merge change:
                    if i > 0:  # (prev, a) -> (prev, new); prev is new_id when the last pair merged too
                        delta[word[i - 1], a] -= f
                        delta[word[i - 1], new_id] += f
                        where[word[i - 1], new_id].add(wi)
                    if i + 2 < len(word):  # (b, next) -> (new, next); undone just above if next merges too
                        delta[b, word[i + 2]] -= f
                        delta[new_id, word[i + 2]] += f
                        where[new_id, word[i + 2]].add(wi)
                    word[i:i + 2] = [new_id]
                i += 1
        # end exercise: bpe_merge_step

        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts.get(p, 0) + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, rkey[p[0]], rkey[p[1]], p))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
    bar.close()
    return vocab


def train_bpe(vocab_size: int, *, text: str | Iterable[str] | None = None,
              files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
              special_tokens: Sequence[str] = (EOT,), progress: bool = False, pattern: str = GPT2_PATTERN,
              name: str = "minilife-bpe", naive: bool = False) -> Tokenizer:
    """Train byte-level BPE to ``vocab_size`` ids (256 bytes + merges + special tokens).

    Give exactly one of ``text`` (one string, or an iterable of documents, each pre-tokenised on its
    own) or ``files`` (one path or a list of paths; each file, read by ``read_text_file``, is one
    document). ``naive=True`` learns with ``learn_merges_naive``. If the corpus runs out of pairs
    first, training stops early with a warning and the tokenizer is smaller than asked.
    """
    if (text is None) == (files is None):
        raise TypeError("train_bpe: give exactly one of text=... (the corpus itself) or files=... (paths)")
    if isinstance(text, (os.PathLike, bytes)):
        raise TypeError(f"train_bpe: text is a {type(text).__name__}; to train on a file use files=...")
    if not isinstance(vocab_size, int):
        raise TypeError(f"train_bpe: vocab_size={vocab_size!r} must be an int")
    specials = list(Tokenizer(_BYTES, special_tokens, pattern).special_tokens)  # checks names, pattern first
    n_special = len(specials)
    if vocab_size < 256 + n_special:
        raise ValueError(f"train_bpe: vocab_size={vocab_size!r} is too small: it must be at least 256 "
                         f"(bytes) + {n_special} (special tokens) = {256 + n_special}")
    if files is not None:
        text = (read_text_file(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files))
    counts = count_pretokens([text] if isinstance(text, str) else text, pattern, specials)
    if not counts:
        raise ValueError("train_bpe: the corpus is empty (no text outside special tokens)")
    n_merges = vocab_size - 256 - n_special
    # CPython's cycle collector paused: learning makes ~10^5 long-lived containers, no cycles (~30% faster)
    collecting = gc.isenabled()
    gc.disable()
    try:
        vocab = learn_merges_naive(counts, n_merges) if naive else learn_merges(counts, n_merges, progress)
    finally:
        if collecting:
            gc.enable()
    if len(vocab) - 256 < n_merges:
        warnings.warn(f"train_bpe: the corpus ran out of pairs after {len(vocab) - 256} merges; "
                      f"vocab_size is {len(vocab) + n_special}, not {vocab_size}", stacklevel=2)
    return Tokenizer({tok: i for i, tok in enumerate(vocab)}, specials, pattern=pattern, name=name)

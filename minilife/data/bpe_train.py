"""Byte-level BPE training: learn merge ranks from text, with incremental pair counts.

What it implements
- GPT-2 pre-tokenisation (``GPT2_PATTERN``, run with the ``regex`` module): text is cut into
  pre-tokens (words with their leading space, numbers, punctuation runs, whitespace) and merges
  never cross a pre-token boundary. Special tokens are cut out of the text *before* that, so no
  merge ever reaches into or across ``<|endoftext|>``.
- Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
  Units"; byte-level as in GPT-2, Radford et al. 2019): start from the 256 bytes, repeatedly merge the
  most frequent adjacent pair of tokens into a new token.
- Ties between equally frequent pairs go to the lexicographically *greatest* pair of bytes: the pair
  (bytes_a, bytes_b) is compared as a Python tuple of bytes, so first bytes_a, then bytes_b.
  (b"p", b"ug") beats (b"hug", b"s") because b"p" > b"hug". This makes training deterministic.
- ``read_text_file``: training text from a file is strict UTF-8: a bad byte raises ValueError naming
  the file, byte offset and line (``errors="replace"`` repairs with U+FFFD and warns with a count).
- Incremental counting: each distinct pre-token is stored once with its frequency; we keep
  ``pair -> count`` and ``pair -> set of words holding it``. A merge rewrites only the words that hold
  the merged pair and applies the count changes of just those words -- no full recount per merge.
  The best pair comes from a heap with lazy invalidation: every count change pushes a fresh entry,
  and a popped entry whose count no longer matches ``pair_counts`` is stale and dropped.

What it leaves out: parallel pre-tokenisation (one process is fast enough at course sizes), a
minimum pair frequency, and dropout-BPE. ``minilife.data.bpe`` turns the learned ranks into a
``Tokenizer``; ``train_bpe`` lives there.
"""
from __future__ import annotations

import heapq
import os
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import regex
from tqdm import tqdm

# GPT-2's pre-tokeniser: contractions, optional space + letters, optional space + numbers,
# optional space + other symbols, whitespace not followed by a non-space (so a run of spaces
# leaves its last space to the next word), and any remaining whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


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


def special_token_regex(special_tokens: Iterable[str]) -> "regex.Pattern[str] | None":
    """A regex matching any of ``special_tokens``, longest first (so "<|a|>b" wins over "<|a|>")."""
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not ordered:
        return None
    return regex.compile("|".join(regex.escape(s) for s in ordered))


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


def _reverse_key(token: bytes) -> tuple[int, ...]:
    """Sort key that orders bytes strings in *reverse*: a min-heap on it pops the greatest bytes.

    Each byte x becomes 255 - x and a final 256 stands for "end of string", which makes a prefix
    (smaller as bytes) sort *after* its extensions, as the reverse order requires.
    """
    return tuple(255 - x for x in token) + (256,)


def learn_merges(pretoken_counts: dict[bytes, int], n_merges: int,
                 progress: bool = False) -> list[bytes]:
    """Learn up to ``n_merges`` merges; return the vocabulary as a list of bytes (index = token id).

    Ids 0..255 are the single bytes (id = byte value); each merge appends the merged bytes. Stops
    early when no adjacent pair is left (every pre-token is a single token).
    """
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    id_of: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    rkey: list[tuple[int, ...]] = [_reverse_key(tok) for tok in vocab]

    # One entry per distinct multi-byte pre-token: its current token ids and its frequency.
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, n in pretoken_counts.items():
        if len(piece) > 1:
            words.append(list(piece))
            freqs.append(n)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words holding it
    for wi, word in enumerate(words):
        f = freqs[wi]
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

        delta: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop(pair):
            word, f = words[wi], freqs[wi]
            new_word, i, n = [], 0, len(word)
            while i < n:  # left to right, so "aaa" with pair (a, a) becomes [aa, a]
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    new_word.append(new_id)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            old_pairs = list(zip(word, word[1:]))
            new_pairs = list(zip(new_word, new_word[1:]))
            for p in old_pairs:
                delta[p] -= f
            for p in new_pairs:
                delta[p] += f
                where[p].add(wi)
            for p in set(old_pairs).difference(new_pairs):
                if p != pair:
                    where[p].discard(wi)
            words[wi] = new_word

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

"""Byte-level BPE tokenizer: train, encode, decode, special tokens, save/load, tiktoken bridge.

What it implements
- ``Tokenizer``: built from *mergeable ranks* (token bytes -> rank, the form tiktoken uses) plus
  special tokens. The readable encoder follows GPT-2 / tiktoken exactly: split out allowed special
  tokens (longest first), pre-tokenise each remaining chunk with the regex pattern, and inside each
  pre-token start from single bytes and repeatedly merge the adjacent pair whose merged bytes has
  the lowest rank (leftmost on equal ranks) until no adjacent pair is a token. Working on ranks of
  merged bytes (not on a list of merge pairs) is what lets GPT-2's own ranks load unchanged.
  Results are cached per pre-token.
- Special tokens: by default (``allowed_special="none"``) text that merely *spells* a special
  token, e.g. a document quoting "<|endoftext|>", is encoded as ordinary text, so data can never
  inject a document boundary. ``allowed_special="all"`` or a set of names turns them into their ids.
- ``encode_fast`` / ``encode_batch``: the same ids from a ``tiktoken.Encoding`` built from the same
  ranks (Rust); special tokens are split out here in Python so both paths share one rule.
- ``save``/``load``: readable JSON. Each token appears as its bytes read as Latin-1 (a 1:1 map of
  bytes to the first 256 code points), so ASCII tokens read as themselves and other bytes show as
  JSON escapes, e.g. "\\u00e2\\u0080\\u0099" for the UTF-8 bytes of a curly apostrophe.
- ``Tokenizer.gpt2()``: GPT-2's own ranks from tiktoken's file cache (never the network).
- ``GPT2_PATTERN`` and ``special_token_regex``, which encoding and training (``bpe_train``) share.

What it leaves out: byte-fallback / unknown tokens (byte-level BPE never needs them), normalisation
(done in ``minilife.data.clean``), the "disallowed special" error mode of tiktoken, and training
(``minilife.data.bpe_train.train_bpe`` learns the ranks and builds a ``Tokenizer``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import AbstractSet, Iterable, Mapping, Sequence, Union

import regex

from minilife.common import write_json_atomic
from minilife.data.checks import check_text

EOT = "<|endoftext|>"
FORMAT, VERSION = "minilife-bpe", 1
AllowedSpecial = Union[str, AbstractSet[str], Sequence[str]]
# GPT-2's pre-tokeniser: contractions, optional space + letters, optional space + numbers,
# optional space + other symbols, whitespace not followed by a non-space (so a run of spaces
# leaves its last space to the next word), and any remaining whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-2's BPE files as tiktoken caches them: the file name is sha1(url); the sha256 is the content's.
_GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


class TokenizerFileError(ValueError):
    """A tokenizer file that is not valid JSON, not ours, or of an unknown version (names the file)."""


def _fix_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; replace them with U+FFFD exactly as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """Byte-level BPE tokenizer from mergeable ranks (bytes -> rank) and special tokens (str -> id).

    ``special_tokens`` may be a dict of ids or a sequence of names (ids then follow the largest
    rank). Ids need not be dense; ``vocab_size`` is the largest id + 1 (specials included).
    """

    def __init__(self, mergeable_ranks: Mapping[bytes, int],
                 special_tokens: Mapping[str, int] | Sequence[str] = (EOT,),
                 pattern: str = GPT2_PATTERN, name: str = "minilife-bpe"):
        ranks = dict(mergeable_ranks)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"Tokenizer: mergeable_ranks lacks {len(missing)} single bytes (first: "
                             f"{bytes([missing[0]])!r}); byte-level BPE needs all 256 to encode any text")
        if len(set(ranks.values())) != len(ranks) or min(ranks.values()) < 0:
            raise ValueError("Tokenizer: mergeable_ranks values must be distinct non-negative ints")
        if isinstance(special_tokens, str):
            special_tokens = (special_tokens,)
        if not isinstance(special_tokens, Mapping):
            names = list(special_tokens)
            if len(set(names)) != len(names):
                dup = next(s for s in names if names.count(s) > 1)
                raise ValueError(f"Tokenizer: special token {dup!r} is listed twice")
            first = max(ranks.values()) + 1
            special_tokens = {s: first + i for i, s in enumerate(names)}
        specials = dict(special_tokens)
        for s, i in specials.items():
            if not isinstance(s, str) or not s:
                raise ValueError(f"Tokenizer: special token {s!r} must be a non-empty string")
            if i in ranks.values() or list(specials.values()).count(i) > 1:
                raise ValueError(f"Tokenizer: special token {s!r} has id {i}, which is already taken")
        try:
            self._pretok = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"Tokenizer: pattern {pattern!r} is not a valid regex ({e})") from None
        self.mergeable_ranks: dict[bytes, int] = ranks
        self.special_tokens: dict[str, int] = specials
        self.pattern, self.name = pattern, name
        self.vocab_size: int = max([*ranks.values(), *specials.values()]) + 1
        self.eot_id: int | None = specials.get(EOT)
        self._decoder: dict[int, bytes] = {i: t for t, i in ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in specials.items()})
        self._cache: dict[str, list[int]] = {}
        self._tiktoken = None

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens})")

    # ---------------------------------------------------------------- readable encoder
    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "none":
            return frozenset()
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str) or not isinstance(allowed_special, Iterable):
            raise ValueError(f"allowed_special={allowed_special!r}: use 'none', 'all' or a set of "
                             f"special-token names from {sorted(self.special_tokens)}")
        allowed = frozenset(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special: {sorted(unknown)} are not special tokens of this "
                             f"tokenizer (it has {sorted(self.special_tokens)})")
        return allowed

    def _split_specials(self, text: str, allowed: frozenset[str]) -> list[str | int]:
        """Text cut at allowed special tokens: ordinary chunks (str) and special ids (int)."""
        if not allowed:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in _special_regex(allowed).finditer(text):
            out.append(text[pos:m.start()])
            out.append(self.special_tokens[m.group()])
            pos = m.end()
        out.append(text[pos:])
        return out

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge one pre-token: lowest-rank adjacent pair first (leftmost on ties), until none is a token."""
        ranks = self.mergeable_ranks
        if piece in ranks:  # whole pre-token is one token (tiktoken takes this shortcut too)
            return [ranks[piece]]
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_i, best_rank = -1, None
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_i, best_rank = i, rank
            if best_rank is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [ranks[p] for p in parts]

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Readable pure-Python encoder: ``text`` -> token ids (specials only if allowed)."""
        check_text(text, "Tokenizer.encode: text")
        allowed = self._allowed(allowed_special)
        ids: list[int] = []
        for chunk in self._split_specials(_fix_surrogates(text), allowed):
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            for piece in self._pretok.findall(chunk):
                cached = self._cache.get(piece)
                if cached is None:
                    if len(self._cache) >= 100_000:  # bound the memory of the cache
                        self._cache.clear()
                    cached = self._cache[piece] = self._bpe(piece.encode("utf-8"))
                ids.extend(cached)
        return ids

    # ---------------------------------------------------------------- tiktoken fast path
    def to_tiktoken(self):
        """A ``tiktoken.Encoding`` with the same pattern, ranks and special tokens (built once)."""
        if self._tiktoken is None:
            import tiktoken

            self._tiktoken = tiktoken.Encoding(name=self.name, pat_str=self.pattern,
                                               mergeable_ranks=self.mergeable_ranks,
                                               special_tokens=self.special_tokens)
        return self._tiktoken

    def encode_fast(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Same ids as ``encode``, computed by tiktoken."""
        check_text(text, "Tokenizer.encode_fast: text")
        enc = self.to_tiktoken()
        if allowed_special == "none":
            return enc.encode_ordinary(text)
        ids: list[int] = []
        for chunk in self._split_specials(text, self._allowed(allowed_special)):
            if isinstance(chunk, int):
                ids.append(chunk)
            else:
                ids.extend(enc.encode_ordinary(chunk))
        return ids

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = "none",
                     num_threads: int = 8) -> list[list[int]]:
        """``encode_fast`` over many texts (tiktoken runs them on ``num_threads`` threads)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; for one text use encode_fast")
        if allowed_special == "none":
            return self.to_tiktoken().encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [self.encode_fast(t, allowed_special) for t in texts]

    # ---------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the raw bytes they stand for (special tokens as their UTF-8 spelling)."""
        out = []
        for pos, i in enumerate(ids):
            tok = self._decoder.get(int(i))
            if tok is None:
                raise ValueError(f"decode: id {int(i)} at position {pos} is not in the vocabulary "
                                 f"(vocab_size {self.vocab_size})")
            out.append(tok)
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token id."""
        return self.decode_bytes([token_id])

    # ---------------------------------------------------------------- save / load
    def state(self) -> dict:
        """Everything that defines the tokenizer as plain JSON-able data (what ``save`` writes and a
        checkpoint carries); ``Tokenizer.from_state`` rebuilds it."""
        ranks = dict(sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        return {"format": FORMAT, "version": VERSION, "name": self.name, "pattern": self.pattern,
                "vocab_size": self.vocab_size, "special_tokens": self.special_tokens,
                "token_encoding": "each key of 'ranks' is the token's bytes read as Latin-1",
                "ranks": {tok.decode("latin-1"): rank for tok, rank in ranks.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write readable JSON atomically (temp file + rename); ``Tokenizer.load`` reads it back."""
        return write_json_atomic(path, self.state())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by ``save``; a corrupt or incompatible file raises TokenizerFileError."""
        path = Path(path)

        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                dup = next(k for k in keys if keys.count(k) > 1)
                raise TokenizerFileError(f"{path}: key {dup!r} appears twice")
            return dict(pairs)

        try:
            obj = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as e:
            raise TokenizerFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                                     f"{e.msg}); is it a file written by Tokenizer.save?") from None
        except UnicodeDecodeError as e:
            raise TokenizerFileError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
        return cls.from_state(obj, source=str(path))

    @classmethod
    def from_state(cls, obj: object, source: str = "tokenizer state") -> "Tokenizer":
        """Rebuild a tokenizer from ``state()``'s dict; errors name ``source`` (a file, a checkpoint)."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise TokenizerFileError(f"{source}: not a minilife tokenizer file (expected \"format\": "
                                     f"\"{FORMAT}\")")
        if obj.get("version") != VERSION:
            raise TokenizerFileError(f"{source}: tokenizer file version {obj.get('version')!r}; this "
                                     f"code reads version {VERSION}")
        for key, typ in (("pattern", str), ("special_tokens", dict), ("ranks", dict)):
            if not isinstance(obj.get(key), typ):
                raise TokenizerFileError(f"{source}: field {key!r} is missing or not a {typ.__name__}")
        try:
            ranks = {tok.encode("latin-1"): int(rank) for tok, rank in obj["ranks"].items()}
            specials = {str(s): int(i) for s, i in obj["special_tokens"].items()}
            return cls(ranks, specials, pattern=obj["pattern"], name=str(obj.get("name", "bpe")))
        except (ValueError, TypeError, UnicodeEncodeError) as e:
            raise TokenizerFileError(f"{source}: invalid tokenizer contents: {e}") from None

    # ---------------------------------------------------------------- GPT-2
    @classmethod
    def gpt2(cls, cache_dir: str | os.PathLike | None = None) -> "Tokenizer":
        """GPT-2's tokenizer (50257 ids, "<|endoftext|>" = 50256) from tiktoken's file cache.

        Looks in ``cache_dir``, else $TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else tiktoken's
        default temp cache. Never touches the network; raises FileNotFoundError saying how to fix it.
        """
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        if cache_dir is None:
            cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
                or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        paths = {k: Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
                 for k, (url, _) in _GPT2_FILES.items()}
        absent = [f"{k} (as {p.name})" for k, p in paths.items() if not p.is_file()]
        if absent:
            raise FileNotFoundError(
                f"Tokenizer.gpt2(): GPT-2's BPE files are not in tiktoken's cache {cache_dir}: missing "
                f"{', '.join(absent)}. Fix: set TIKTOKEN_CACHE_DIR to a directory that holds them (on the "
                f"course machines ../shared/data/tiktoken_gpt2_cache), or, with network access, run "
                f"python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\" once to fill the cache.")
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(paths["vocab.bpe"]), str(paths["encoder.json"]),
            vocab_bpe_hash=_GPT2_FILES["vocab.bpe"][1], encoder_json_hash=_GPT2_FILES["encoder.json"][1])
        return cls(ranks, {EOT: 50256}, pattern=GPT2_PATTERN, name="gpt2")


def special_token_regex(special_tokens: Iterable[str]) -> "regex.Pattern[str] | None":
    """A regex matching any of ``special_tokens``, longest first (so "<|a|>b" wins over "<|a|>")."""
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("|".join(regex.escape(s) for s in ordered)) if ordered else None


@lru_cache(maxsize=64)
def _special_regex(allowed: frozenset[str]):
    return special_token_regex(allowed)

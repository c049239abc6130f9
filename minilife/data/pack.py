"""Packing for pretraining: tokenise documents into flat token shards and draw (x, y) batches.

What it implements
- ``pack_corpus``: documents are split into train/val *by document* (a seeded permutation picks the
  validation documents, or the caller hands them over as ``val_docs`` when it must hold them out
  before mixing repeats documents; each split keeps the corpus order, so a curriculum survives),
  encoded with the tokenizer's fast path (tiktoken), each followed by the end-of-text id, and written as one
  token stream per split cut into fixed-size shards ``train_000.bin``, ``train_001.bin``, ... of raw
  little-endian ``uint16`` (``uint32`` when ids do not fit: vocab_size > 65536). A document longer
  than a shard simply continues in the next shard: shards are pieces of one stream, and
  ``load_tokens`` joins them back. Text that spells "<|endoftext|>" inside a document is encoded as
  ordinary text, so documents cannot fake a boundary.
- Crash safety: ``meta.json`` is deleted first and written last, and every shard is written to a
  temp file and renamed into place. A directory with a ``meta.json`` therefore always has complete
  shards; ``load_tokens`` also checks every shard's size against the meta.
- ``get_batch``: the nanoGPT-style sampler -- B starts drawn uniformly from [0, N - T - 1],
  x = data[s : s+T], y = data[s+1 : s+T+1] (y is x shifted by one token).

What it leaves out: SFT and preference collation (prompt/response loss masks, padding, chosen vs
rejected pairs) -- those live in a sibling module built on the same tokenizer, since they batch
whole examples rather than windows of a stream. No BOS token; no document-aware attention masks
(a window may span a document boundary, marked by the end-of-text token, as in GPT-2).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from minilife.common import write_json_atomic

FORMAT, VERSION = "minilife-shards", 1
SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^(train|val)_\d+\.bin(\.tmp)?$")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id < vocab_size fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype("<u2")  # little-endian on every machine, so shards are portable
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token shards")


def _write_atomic(path: Path, tokens: np.ndarray) -> None:
    """Write raw tokens to ``path`` via ``path.tmp`` + rename: never a half shard under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        tokens.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Buffers one split's token stream and writes it out in shards of ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer, self.buffered = [], 0  # token arrays not yet in a shard, and their total length
        self.shards, self.n_docs = [], 0  # {"file", "n_tokens"} per written shard

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.n_docs += 1
        while self.buffered >= self.shard_tokens:
            stream = np.concatenate(self.buffer)
            self._flush(stream[:self.shard_tokens])
            rest = stream[self.shard_tokens:]
            self.buffer, self.buffered = [rest], len(rest)

    def _flush(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        _write_atomic(self.out_dir / name, tokens)
        self.shards.append({"file": name, "n_tokens": int(len(tokens))})

    def close(self) -> dict:
        if self.buffered:
            self._flush(np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0
        return {"n_docs": self.n_docs, "n_tokens": sum(s["n_tokens"] for s in self.shards), "shards": self.shards}


def _check_docs(docs, name: str) -> None:
    if isinstance(docs, str) or not isinstance(docs, Sequence):
        raise TypeError(f"pack_corpus: {name} must be a sequence of document strings (a list, not one str)")
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise TypeError(f"pack_corpus: {name}[{i}] is {type(d).__name__}, expected str")


def pack_corpus(docs: Sequence[str], tokenizer, out_dir: str | os.PathLike, *,
                val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 2**24,
                progress: bool = False, val_docs: Sequence[str] | None = None,
                batch_docs: int = 512) -> dict:
    """Tokenise ``docs``, split train/val by document, write shards + meta.json; return the meta.

    ``val_fraction`` of the documents (rounded, at least one when > 0 and there are 2+ documents)
    go to validation, chosen by a permutation seeded with ``seed``. Pass ``val_docs`` to hold out
    validation yourself (e.g. before mixing repeats documents): then all of ``docs`` is training
    data and ``val_fraction``/``seed`` are unused. ``shard_tokens``: tokens per shard file."""
    _check_docs(docs, "docs")
    if not docs:
        raise ValueError("pack_corpus: docs is empty")
    if val_docs is not None:
        _check_docs(val_docs, "val_docs")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"pack_corpus: val_fraction={val_fraction} must be in [0, 1)")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"pack_corpus: shard_tokens={shard_tokens!r} must be a positive int")
    eot = tokenizer.eot_id
    if eot is None:
        raise ValueError("pack_corpus: the tokenizer has no <|endoftext|> special token to separate "
                         "documents; train it with special_tokens=('<|endoftext|>',)")
    dtype = token_dtype(tokenizer.vocab_size)

    if val_docs is None:
        n = len(docs)
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n_val == 0 and n >= 2:
            n_val = 1
        n_val = min(n_val, n - 1)  # always keep at least one training document
        is_val = np.zeros(n, dtype=bool)
        is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
        all_docs = docs
    else:
        is_val = np.array([False] * len(docs) + [True] * len(val_docs))
        all_docs = [*docs, *val_docs]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here on the directory reads as "not packed"
    for old in out.iterdir():  # shards of an earlier pack (or temp files of a crashed one)
        if _SHARD_NAME.match(old.name):
            old.unlink()

    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    eot_arr = np.array([eot], dtype=dtype)
    with tqdm(total=len(all_docs), desc="packing", unit="doc", disable=not progress) as bar:
        for start in range(0, len(all_docs), batch_docs):
            batch = list(all_docs[start:start + batch_docs])
            for j, ids in enumerate(tokenizer.encode_batch(batch)):
                tokens = np.concatenate([np.asarray(ids, dtype=dtype), eot_arr])
                writers["val" if is_val[start + j] else "train"].add(tokens)
            bar.update(len(batch))

    meta = {"format": FORMAT, "version": VERSION, "vocab_size": int(tokenizer.vocab_size),
            "dtype": dtype.name, "eot_id": int(eot), "tokenizer": getattr(tokenizer, "name", None),
            "seed": seed, "val_fraction": val_fraction if val_docs is None else None, "shard_tokens": shard_tokens,
            "val_doc_indices": np.flatnonzero(is_val).tolist() if val_docs is None else "given as val_docs",
            "splits": {s: w.close() for s, w in writers.items()}}
    write_json_atomic(out / "meta.json", meta)
    return meta


def read_meta(out_dir: str | os.PathLike) -> dict:
    """meta.json of a packed directory, checked; a clear error if it is missing or not ours."""
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a packed corpus, or packing did "
                                f"not finish (run pack_corpus again)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} {FORMAT} meta file")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{path}: dtype {meta.get('dtype')!r} is not uint16 or uint32")
    return meta


def load_tokens(out_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The 1-D token stream of ``split`` ("train" | "val"): a read-only memmap when it is one shard,
    else the shards concatenated in memory. Every shard's size is checked against meta.json."""
    if split not in SPLITS:
        raise ValueError(f"load_tokens: split={split!r}; use 'train' or 'val'")
    meta = read_meta(out_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    parts = []
    for shard in meta["splits"][split]["shards"]:
        path = Path(out_dir) / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in meta.json is missing")
        expected = shard["n_tokens"] * dtype.itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, meta.json says {expected} "
                             f"({shard['n_tokens']} {dtype.name} tokens); the shard is corrupt")
        parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["n_tokens"],)))
    if not parts:
        return np.empty(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def get_batch(data: np.ndarray, batch_size: int, context_length: int, device: str | torch.device = "cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows of a 1-D token stream ``data`` (N,).

    Starts s are uniform on [0, N - T - 1] (torch.randint with ``generator``, a CPU generator);
    returns x = data[s:s+T] and y = data[s+1:s+T+1], both int64 (B, T) on ``device``."""
    if not isinstance(data, np.ndarray) or data.ndim != 1:
        raise ValueError(f"get_batch: data must be a 1-D numpy array of token ids, got "
                         f"{type(data).__name__} with shape {getattr(data, 'shape', None)}")
    if not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"get_batch: data has dtype {data.dtype}, expected an integer dtype")
    for name, value in (("batch_size", batch_size), ("context_length", context_length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"get_batch: {name}={value!r} must be an int")
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"get_batch: batch_size={batch_size} and context_length={context_length} "
                         f"must be >= 1")
    n = len(data)
    if n < context_length + 1:
        raise ValueError(f"get_batch: data has {n} tokens, but a window needs context_length + 1 = "
                         f"{context_length + 1} (inputs plus the next-token target)")
    starts = torch.randint(0, n - context_length, (batch_size,), generator=generator)  # (B,)
    windows = np.stack([data[s:s + context_length + 1] for s in starts.tolist()])  # (B, T+1)
    windows = torch.from_numpy(windows.astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T) each
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

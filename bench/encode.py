"""Benchmark: encoding throughput.

- ``Tokenizer.encode_fast`` vs raw tiktoken on the *same* ``tiktoken.Encoding`` object
  (``tok.to_tiktoken().encode_ordinary``): the wrapper's overhead. Goal: ours >= 0.9x tiktoken's
  throughput, i.e. time ratio ours / tiktoken <= 1.11.
- ``Tokenizer.encode_batch`` vs ``Encoding.encode_ordinary_batch`` on the text cut into paragraphs.
- The readable pure-Python ``Tokenizer.encode`` vs the same tiktoken call, with a cold pre-token
  cache (cleared before every call): reported, no goal -- it exists to be read, not to be fast.

Tokenizers: ours trained on tinyshakespeare to vocab 4096, and GPT-2's ranks when tiktoken's cache
is present (TIKTOKEN_CACHE_DIR or ../shared/data/tiktoken_gpt2_cache). Both sides run in one process,
interleaved, ``--repeats`` times. Skips with a message when ../shared/data is absent.
Run: .venv/bin/python bench/encode.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bpe import SHARED, TABLE_HEAD, ratio_row  # bench/bpe.py  # noqa: E402

from minilife.measure import interleaved_times  # noqa: E402


def bench_tokenizer(label: str, tok, text: str, repeats: int, readable_chars: int) -> list[str]:
    enc = tok.to_tiktoken()
    paragraphs = [p for p in text.split("\n\n") if p]
    rows = []
    t = interleaved_times({"ours": lambda: tok.encode_fast(text),
                           "ref": lambda: enc.encode_ordinary(text)}, repeats)
    ratio = statistics.median(t["ours"]) / statistics.median(t["ref"])
    rows.append(ratio_row(f"{label}: encode_fast vs tiktoken ({len(text) / 1e6:.2f} MB)", t["ours"],
                          t["ref"], "ratio <= 1.11", ratio <= 1 / 0.9))
    t = interleaved_times({"ours": lambda: tok.encode_batch(paragraphs),
                           "ref": lambda: enc.encode_ordinary_batch(paragraphs)}, repeats)
    ratio = statistics.median(t["ours"]) / statistics.median(t["ref"])
    rows.append(ratio_row(f"{label}: encode_batch vs tiktoken ({len(paragraphs)} paragraphs)",
                          t["ours"], t["ref"], "ratio <= 1.11", ratio <= 1 / 0.9))
    piece = text[:readable_chars]

    def readable_cold():
        tok._cache.clear()  # every call pays the full merge loop per distinct pre-token
        return tok.encode(piece)

    assert readable_cold() == enc.encode_ordinary(piece)
    t = interleaved_times({"ours": readable_cold, "ref": lambda: enc.encode_ordinary(piece)}, repeats)
    rows.append(ratio_row(f"{label}: readable encode (cold cache) vs tiktoken ({len(piece) // 1000} kB)",
                          t["ours"], t["ref"], "reported only", True))
    mb = len(piece.encode("utf-8")) / 1e6
    print(f"{label}: readable encoder {mb / statistics.median(t['ours']):.2f} MB/s, "
          f"tiktoken {mb / statistics.median(t['ref']):.2f} MB/s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--readable-chars", type=int, default=200_000)
    args = ap.parse_args()
    shakespeare = SHARED / "tinyshakespeare.txt"
    if not shakespeare.is_file():
        print(f"skipped: shared data not found at {SHARED}")
        return
    from minilife.data.bpe import Tokenizer
    from minilife.data.bpe_train import read_text_file, train_bpe

    text = read_text_file(shakespeare)
    rows = bench_tokenizer("ours-4096", train_bpe(4096, text=text), text, args.repeats, args.readable_chars)
    try:
        import os

        gpt2 = Tokenizer.gpt2(os.environ.get("TIKTOKEN_CACHE_DIR") or SHARED / "tiktoken_gpt2_cache")
        rows += bench_tokenizer("gpt2", gpt2, text, args.repeats, args.readable_chars)
    except FileNotFoundError as e:
        print(f"GPT-2 rows skipped: {e}")
    print()
    print(TABLE_HEAD)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

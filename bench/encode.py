"""Benchmark: encoding throughput of the readable pure-Python encoder against tiktoken.

``Tokenizer.encode`` (the readable encoder: GPT-2 pre-tokenisation, then the merge loop per
pre-token, with a pre-token cache) vs tiktoken's ``encode_ordinary`` (Rust) with the same pattern,
ranks and special tokens; the ids are checked equal. The cache is cleared before every call, so
each call pays the merge loop once per distinct pre-token of the text (the cost of encoding a text
not seen before). Reported, no goal: the encoder exists to be read, not to be fast.

Not compared: ``Tokenizer.encode_fast`` and ``encode_batch``. They hand the text to that same
``tiktoken.Encoding`` (``to_tiktoken()``), so a ratio against tiktoken is 1.0 by construction.

Tokenizers: ours trained on tinyshakespeare to vocab 4096, and GPT-2's ranks when tiktoken's cache
is present (TIKTOKEN_CACHE_DIR or ../shared/data/tiktoken_gpt2_cache). Both sides run in one
process, interleaved (the order rotates every repeat), ``--repeats`` times. Skips with a message
when ../shared/data is absent.
Run: .venv/bin/python bench/encode.py [--quick]   (``--quick``: 100 kB, 2 repeats; a smoke check)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bpe import SHARED, TABLE_HEAD, ratio_row  # bench/bpe.py  # noqa: E402

from minilife.measure import interleaved_times  # noqa: E402


def bench_tokenizer(label: str, tok, text: str, repeats: int) -> str:
    enc = tok.to_tiktoken()

    def readable_cold():
        tok._cache.clear()  # every call pays the full merge loop per distinct pre-token
        return tok.encode(text)

    assert readable_cold() == enc.encode_ordinary(text), f"{label}: readable encoder and tiktoken disagree"
    t = interleaved_times({"ours": readable_cold, "ref": lambda: enc.encode_ordinary(text)}, repeats)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"{label}: readable encoder {mb / statistics.median(t['ours']):.2f} MB/s, "
          f"tiktoken {mb / statistics.median(t['ref']):.2f} MB/s (medians)")
    return ratio_row(f"{label}: readable encode (cold cache) vs tiktoken encode_ordinary ({mb:.2f} MB)",
                     t["ours"], t["ref"], "reported", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chars", type=int, default=None, help="encode the first CHARS characters (default: all)")
    ap.add_argument("--quick", action="store_true", help="100 kB, 2 repeats (a smoke check)")
    args = ap.parse_args()
    if args.quick:
        args.chars, args.repeats = 100_000, 2
    shakespeare = SHARED / "tinyshakespeare.txt"
    if not shakespeare.is_file():
        print(f"skipped: shared data not found at {SHARED}")
        return
    from minilife.data.bpe import Tokenizer
    from minilife.data.bpe_train import read_text_file, train_bpe

    start = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    text = read_text_file(shakespeare)
    progress("training our 4096-token tokenizer on tinyshakespeare")
    ours = train_bpe(4096, text=text)
    text = text[:args.chars]
    progress(f"ours-4096: {args.repeats} interleaved repeats")
    rows = [bench_tokenizer("ours-4096", ours, text, args.repeats)]
    try:
        gpt2 = Tokenizer.gpt2(os.environ.get("TIKTOKEN_CACHE_DIR") or SHARED / "tiktoken_gpt2_cache")
        progress(f"gpt2: {args.repeats} interleaved repeats")
        rows.append(bench_tokenizer("gpt2", gpt2, text, args.repeats))
    except FileNotFoundError as e:
        print(f"GPT-2 rows skipped: {e}")
    progress("done")
    print()
    print(TABLE_HEAD)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

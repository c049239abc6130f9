"""Benchmark: BPE training speed.

1. corpus.en (133 KB) to vocab 500: our time (goal: well under 1 s).
2. tinyshakespeare (1.1 MB) to vocab 4096: ours vs HuggingFace ``tokenizers`` BpeTrainer (Rust;
   byte-level pre-tokeniser with GPT-2's regex, the closest match to ours), fed the way its docs
   feed it, line by line (``train_from_iterator`` over the lines; it learns the same vocabulary as
   from one big string, checked, and faster); the one-string call is reported alongside. Goal: ours
   <= 1.5x HF's line-by-line time (median). Also vs the naive trainer that recounts every pair after
   every merge (the library's ``learn_merges_naive``; goal ours >= 20x faster). The naive trainer is
   run for ``--naive-merges`` merges (and checked to learn the same merges as ours), and its full
   time is bracketed honestly:
     upper estimate = (its measured time per merge) x (all merges); per-merge cost falls as words
                      shrink, so this overstates it;
     lower bound    = (time of ONE full pair recount on the *final*, shortest segmentation) x (all
                      merges); every real naive step recounts a longer segmentation and also rewrites
                      every word, so the real total is above this.
   ``--full-naive`` runs it to the end instead (minutes).

Both sides run in one process, interleaved (the order rotates every repeat), ``--repeats`` times;
ratios are ours / reference time. HF ``tokenizers`` runs with its default thread pool (all cores).
Skips with a message when ../shared/data is absent. Run: .venv/bin/python bench/bpe.py [--quick]
(``--quick``: vocab 1000 instead of 4096, 2 repeats, 10 naive merges; seconds, a smoke check).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MINILIFE_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------- table helpers (bench/encode.py uses them)
def ratio_row(label: str, ours: list[float], ref: list[float], goal: str, met: bool | None) -> str:
    """One table row; ``met=None`` for a reported figure without a goal."""
    verdict = "-" if met is None else "yes" if met else "NO"
    return (f"| {label} | {min(ours):.3f} | {statistics.median(ours):.3f} | {min(ref):.3f} | "
            f"{statistics.median(ref):.3f} | {min(ours) / min(ref):.3f} | "
            f"{statistics.median(ours) / statistics.median(ref):.3f} | {goal} | {verdict} |")


TABLE_HEAD = ("| benchmark | ours min (s) | ours median (s) | ref min (s) | ref median (s) | "
              "ratio min | ratio median | goal | met |\n|---|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------- one naive step, for the lower bound
def recount(words: dict[tuple[bytes, ...], int]) -> Counter:
    """One pair count over every word: the step ``learn_merges_naive`` repeats after every merge."""
    counts: Counter = Counter()
    for w, n in words.items():
        for pair in zip(w, w[1:]):
            counts[pair] += n
    return counts


# ---------------------------------------------------------------- HuggingFace tokenizers
def hf_train(text: str, vocab_size: int, by_line: bool = True):
    """HF's BpeTrainer on ``text``, fed line by line (its usual feeding) or as one string."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True) if by_line else [text], trainer)
    return tok


def hf_vocab_bytes(tok) -> set[bytes]:
    """HF's byte-level vocab strings -> raw bytes (GPT-2's printable byte alphabet, inverted)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            to_byte[chr(256 + extra)] = b
            extra += 1
    return {bytes(to_byte[c] for c in s) for s in tok.get_vocab() if s != "<|endoftext|>"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-merges", type=int, default=100)
    ap.add_argument("--full-naive", action="store_true", help="run the naive trainer to the end")
    ap.add_argument("--quick", action="store_true", help="vocab 1000, 2 repeats, 10 naive merges (a smoke check)")
    args = ap.parse_args()
    corpus_en, shakespeare = SHARED / "corpus.en", SHARED / "tinyshakespeare.txt"
    if not (corpus_en.is_file() and shakespeare.is_file()):
        print(f"skipped: shared data not found at {SHARED}")
        return
    vocab = 1000 if args.quick else 4096
    if args.quick:
        args.repeats, args.naive_merges = 2, 10
    start = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731

    from minilife.data.bpe import GPT2_PATTERN
    from minilife.data.bpe_train import count_pretokens, learn_merges_naive, read_text_file, train_bpe
    from minilife.measure import interleaved_times

    rows = []
    small = read_text_file(corpus_en)
    progress(f"corpus.en -> 500, {max(args.repeats, 5)} interleaved repeats")
    t = interleaved_times({"ours": lambda: train_bpe(500, text=small),
                           "hf": lambda: hf_train(small, 500)}, max(args.repeats, 5))
    rows.append(ratio_row("corpus.en -> 500, ours vs HF tokenizers (line by line)", t["ours"], t["hf"],
                          "ours < 1 s (abs.)", max(t["ours"]) < 1.0))

    text = read_text_file(shakespeare)
    progress(f"tinyshakespeare -> {vocab}, {args.repeats} interleaved repeats of 3 sides")
    t = interleaved_times({"ours": lambda: train_bpe(vocab, text=text),
                           "hf lines": lambda: hf_train(text, vocab),
                           "hf string": lambda: hf_train(text, vocab, by_line=False)}, args.repeats)
    rows.append(ratio_row(f"tinyshakespeare -> {vocab}, ours vs HF tokenizers, line by line", t["ours"],
                          t["hf lines"], "ratio <= 1.5",
                          statistics.median(t["ours"]) / statistics.median(t["hf lines"]) <= 1.5))
    rows.append(ratio_row(f"tinyshakespeare -> {vocab}, ours vs HF tokenizers, one string", t["ours"],
                          t["hf string"], "reported", None))
    ours_median = statistics.median(t["ours"])
    ours_tok = train_bpe(vocab, text=text)
    ours_vocab = set(ours_tok.mergeable_ranks)
    hf_lines_vocab = hf_vocab_bytes(hf_train(text, vocab))
    same_hf = hf_lines_vocab == hf_vocab_bytes(hf_train(text, vocab, by_line=False))
    overlap = len(ours_vocab & hf_lines_vocab) / len(ours_vocab)

    progress(f"naive trainer: {'all' if args.full_naive else args.naive_merges} merges")
    counts = count_pretokens([text], GPT2_PATTERN, ["<|endoftext|>"])
    n_merges = vocab - 257
    ours_order = [tok for tok, r in sorted(ours_tok.mergeable_ranks.items(), key=lambda kv: kv[1])][256:]
    k = n_merges if args.full_naive else args.naive_merges
    t0 = time.perf_counter()
    naive_learned = learn_merges_naive(counts, k)[256:]
    naive_time = time.perf_counter() - t0
    assert naive_learned == ours_order[:k], "naive and incremental trainers disagree"
    final_words = {tuple(ours_tok.token_bytes(i) for i in ours_tok.encode(piece.decode("utf-8", "replace")))
                   : n for piece, n in counts.items()}
    one_final_recount = min(interleaved_times({"recount": lambda: recount(final_words)}, 5)["recount"])  # fastest
    progress("done")

    print(f"tinyshakespeare: {len(text):,} chars, {len(counts):,} distinct pre-tokens, {n_merges} merges")
    print(f"HF tokenizers learns the same vocabulary line by line as from one string: {same_hf}")
    print(f"vocabulary overlap with HF tokenizers (tie rules differ): {overlap:.1%}")
    if args.full_naive:
        print(f"naive trainer, all {k} merges: {naive_time:.1f} s (same merges as ours: checked)")
        naive_lo = naive_hi = naive_time
    else:
        naive_hi = naive_time / k * n_merges
        naive_lo = one_final_recount * n_merges
        print(f"naive trainer, first {k} merges: {naive_time:.2f} s ({naive_time / k * 1e3:.1f} ms/merge; "
              f"same merges as ours: checked); one recount on the final segmentation (fastest of 5): "
              f"{one_final_recount * 1e3:.1f} ms")
        print(f"naive full run bracketed: lower bound {naive_lo:.1f} s, upper estimate {naive_hi:.1f} s")
    print(f"speed-up of ours over naive: >= {naive_lo / ours_median:.0f}x (lower bound), "
          f"~{naive_hi / ours_median:.0f}x (upper estimate); goal >= 20x: "
          f"{'yes' if naive_lo / ours_median >= 20 else 'NO'}")
    print()
    print(TABLE_HEAD)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

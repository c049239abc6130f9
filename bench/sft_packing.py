"""Benchmark: SFT training throughput, packed rows vs padded batches, on the world's shadowing set.

The same conversations go through one full training step (forward, summed token loss / trained tokens,
backward, AdamW step, zero_grad) in three layouts:
- padded: the usual collation, each micro-batch padded to its longest conversation (random batches);
- padded, length-grouped: the same, after sorting the conversations by length so that a batch holds
  similar lengths (the strongest padded baseline, and the fair one to quote beside packing);
- packed (``align.sft.pack_batch``, what ch3_sft does): each micro-batch's conversations packed best-fit
  decreasing into rows of context_length + 1 tokens, attention kept inside each conversation by a
  block-diagonal causal mask, positions restarting;
- packed, whole pass: every conversation packed at once, the rows then shared out over the same number
  of micro-batches (how packed datasets are usually prepared: the least padding, one fixed order).
Throughput counts real (non-pad) tokens per second. The three losses over the whole set are compared
first (token-weighted, so they must agree to float tolerance): packing changes the speed, not the loss.
Sides are interleaved, the order rotating every repeat (``minilife.measure.interleaved_times``).
Goal (issue 9): packed >= 1.5x the tokens/s of padded batches.

    python bench/sft_packing.py            # ~1 min on 2 cores
    python bench/sft_packing.py --quick    # seconds, a smoke check
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minilife.align.chat import add_chat_tokens  # noqa: E402
from minilife.align.sft import SFTBatch, encode_dataset, pack_batch, pad_batch, sft_loss_sum  # noqa: E402
from minilife.artifacts import ensure_data  # noqa: E402
from minilife.data.bpe import Tokenizer  # noqa: E402
from minilife.data.shadowing import make_shadowing_set  # noqa: E402
from minilife.measure import interleaved_times  # noqa: E402
from minilife.model.transformer import GPT, ModelConfig  # noqa: E402
from minilife.optim.adamw import AdamW  # noqa: E402


def batches(examples, layout: str, batch_size: int, max_len: int, pad_id: int) -> list:
    """The conversations in one layout, as many micro-batches as there are groups of ``batch_size``."""
    n_micro = math.ceil(len(examples) / batch_size)
    if layout == "packed-pass":  # every conversation of the pass packed at once, the rows then shared out
        whole = pack_batch(examples, max_len, pad_id)
        per = math.ceil(whole.input_ids.shape[0] / n_micro)
        fields = (whole.input_ids, whole.labels, whole.padding_mask, whole.attn_mask, whole.positions)
        return [SFTBatch(*(t[i:i + per] for t in fields)) for i in range(0, whole.input_ids.shape[0], per)]
    order = sorted(examples, key=lambda e: len(e.ids)) if layout == "grouped" else list(examples)
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [pack_batch(g, max_len, pad_id) if layout == "packed" else pad_batch(g, pad_id) for g in groups]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="SFT tokens/s: packed rows vs padded batches")
    p.add_argument("--conversations", type=int, default=256, help="shadowing-set conversations per pass")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per micro-batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="32 conversations, 1 repeat, a 2-layer model")
    a = p.parse_args(argv)
    if a.conversations < 1 or a.batch_size < 1 or a.repeats < 1:
        p.error("--conversations, --batch-size and --repeats must be >= 1")
    if a.quick:
        a.conversations, a.repeats = 32, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tokenizer = Tokenizer.load(ensure_data(smoke=False) / "tokenizer.json")  # the course's 2048-token BPE
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=256, n_layer=2 if a.quick else 4)
    model, tokenizer = add_chat_tokens(GPT(cfg), tokenizer)
    T = model.cfg.context_length
    convs = [e.messages for e in make_shadowing_set(n_train=a.conversations, n_val=1, n_test=1)["train"]]
    examples, _ = encode_dataset(tokenizer, convs, T + 1)
    pad_id = tokenizer.eot_id
    layouts = {"padded": "padded", "padded, length-grouped": "grouped", "packed": "packed",
               "packed, whole pass": "packed-pass"}
    data = {name: batches(examples, layout, a.batch_size, T + 1, pad_id) for name, layout in layouts.items()}
    real = sum(len(e.ids) - 1 for e in examples)  # input tokens that are not padding

    losses = {}
    with torch.no_grad():
        for name, bs in data.items():
            sums = [sft_loss_sum(model, b) for b in bs]
            losses[name] = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)
    opt = AdamW(model.param_groups(0.0), lr=1e-4)

    def epoch(bs):
        def run():
            n_step = sum(b.n_trained for b in bs)
            for b in bs:  # one optimizer step per micro-batch, as the chapter's loop does
                loss_sum, _ = sft_loss_sum(model, b)
                (loss_sum / max(b.n_trained, 1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return n_step
        return run

    sides = {name: epoch(bs) for name, bs in data.items()}
    for run in sides.values():
        run()  # warm-up
    times = interleaved_times(sides, a.repeats)
    print(f"{len(examples)} conversations, {real} real tokens; model L={model.cfg.n_layer} C={model.cfg.n_embd} "
          f"T={T}; batch {a.batch_size} conversations; {torch.get_num_threads()} threads; {a.repeats} repeats")
    print("| layout | rows | slots | pad share | loss (same weights) | tokens/s (median) | vs padded |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = real / statistics.median(times["padded"])
    result = {}
    for name, bs in data.items():
        slots = sum(b.input_ids.numel() for b in bs)
        tps = real / statistics.median(times[name])
        result[name] = {"tokens_per_s": tps, "ratio": tps / base, "loss": losses[name], "slots": slots}
        print(f"| {name} | {sum(b.input_ids.shape[0] for b in bs)} | {slots} | {1 - real / slots:.1%} | "
              f"{losses[name]:.6f} | {tps:,.0f} | {tps / base:.2f}x |")
    ratio = result["packed"]["ratio"]
    best = max(result["packed"]["ratio"], result["packed, whole pass"]["ratio"])
    grouped = result["packed, whole pass"]["tokens_per_s"] / result["padded, length-grouped"]["tokens_per_s"]
    print(f"goal: packed >= 1.5x padded tokens/s -> per micro-batch {ratio:.2f}x, whole pass "
          f"{result['packed, whole pass']['ratio']:.2f}x: {'met' if best >= 1.5 else 'NOT met'}; whole-pass packing "
          f"vs length-grouped padding: {grouped:.2f}x")
    return result


if __name__ == "__main__":
    main()

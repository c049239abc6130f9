"""Benchmark: DPO step time with the reference's log-probs cached once vs recomputed every step.

One timed unit is one DPO training step on a batch of B preference pairs (2B right-padded rows), as
``ch4_dpo``'s loop does it: ``align.pairs.pair_logprobs`` (one forward pass of the policy over the 2B
rows), ``align.dpo.dpo_loss`` (sigmoid, beta 0.1), backward, ``optim.clip.clip_grad_norm``, AdamW step,
zero_grad. The two sides differ in where the reference's sequence log-probs come from:
- cached: a table filled once before training (``align.dpo.cached_reference_logprobs``), indexed per step;
- recompute: a no-grad forward pass of the reference over the same 2B rows inside every step.
Both are measured for full fine-tuning (the reference is a frozen copy of the model) and for LoRA rank 8
on attn.qkv, attn.proj and ffn.* (``model.finetune.apply_method``; the reference is the policy itself
under ``model.peft.adapters_disabled``: no second copy). Each side trains its own model and optimizer
on the same sequence of batches; the four sides are interleaved in one process, the order rotating
every repeat (``minilife.measure.interleaved_times``), after a warm-up step each. Before timing, the
recomputed reference log-probs of the first batch are checked against the cached ones.

The model is a random GPT of chapter 3's chat-model shape (``ModelConfig()``: 4 layers, 4 heads, C=128,
V=2052 with the chat tokens, context 256); the pairs are synthetic token ids whose lengths follow the
world's preference pairs under ch3_sft's tokenizer (measured: prompt + response 24-256 tokens, median
~170, mean ~136; chosen responses 9-63 tokens, rejected 9-125; ~6% cut at the context): a shared
prompt of 15-160 tokens, then a chosen answer of 9-63 and a rejected one of 9-125, each row cut to 256
(mean ~140 real tokens a row; batches of 16 pairs are padded to ~256 wide, as the world's mostly are). Step time does
not depend on the token values. Nothing is read from runs/.

Reported: wall and CPU seconds per step (CPU = ``time.process_time``: with --threads 1 on cores shared
with other jobs it counts this process's work only, and is steadier than wall time); the ratios
cached / recompute (goal, issue 10: <= 0.55, judged on the median wall time); and the one-off cost of
filling the cache for the same batches. Over ONE epoch the cache does the same reference work (one
forward per pair), only outside the loop: the saving is per step, and in total from the second epoch on.

Measured (2 cores shared with other jobs, load average ~6, --threads 1, 5 steps per side): full
fine-tuning 0.72x (wall median; CPU 0.71x), LoRA r=8 0.72x (CPU 0.72x); other runs at load 2-6 gave
0.69-0.82x and 0.66-0.78x. The goal is NOT met, and caching alone cannot meet it: 0.55x needs the
reference pass to cost 0.8x the whole policy step, and it is one no-grad forward, while the policy step
is a forward, a backward (~1.5 forwards here) and the optimizer: taking the reference out saves a
quarter to a third of the step. Nor is LoRA's backward cheaper here: at C = 128 the frozen weights'
gradients are a small share (activation gradients and the (2B, T, V) log-softmax dominate), while the
unmerged LoRA layers add small matmuls and elementwise work to every policy forward, so LoRA's step
costs more than full fine-tuning's (1.66 vs 1.39 CPU s) and the reference pass it saves is no larger a
share of it.

    python bench/dpo_reference.py --threads 1           # ~2 min on 2 shared cores (load 5)
    python bench/dpo_reference.py --quick --threads 1   # seconds, a smoke check
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minilife.align.dpo import cached_reference_logprobs, dpo_loss  # noqa: E402
from minilife.align.pairs import EncodedPair, collate_pairs, pair_logprobs  # noqa: E402
from minilife.measure import interleaved_times  # noqa: E402
from minilife.model.finetune import apply_method, optimizer_groups  # noqa: E402
from minilife.model.peft import adapters_disabled  # noqa: E402
from minilife.model.transformer import GPT, ModelConfig  # noqa: E402
from minilife.optim.adamw import AdamW  # noqa: E402
from minilife.optim.clip import clip_grad_norm  # noqa: E402

BETA = 0.1


def synthetic_pairs(n: int, T: int, vocab: int, seed: int) -> list[EncodedPair]:
    """``n`` pairs of random token ids with the world's lengths (module docstring), cut to T tokens."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, vocab, (rand(15, min(160, T - 10)),), generator=g)  # (P,)
        sides = []
        for lo, hi in ((9, 63), (9, 125)):  # chosen, rejected answer lengths
            answer = torch.randint(0, vocab, (rand(lo, hi),), generator=g)  # (A,)
            ids = torch.cat([prompt, answer])[:T]  # (min(P + A, T),)
            mask = torch.arange(len(ids)) >= len(prompt)  # (len,): the answer tokens
            sides += [ids, mask]
        pairs.append(EncodedPair(*sides, truncated=len(prompt) + 125 > T))
    return pairs


def with_cpu_time(fn, sink: list):
    """``fn`` wrapped so each call also appends its process CPU seconds to ``sink``. With --threads 1 on
    cores shared with other jobs, CPU time counts this process's work only, where wall time also counts
    the time the scheduler gave to others."""
    def run():
        t0 = time.process_time()
        out = fn()
        sink.append(time.process_time() - t0)
        return out
    return run


def make_side(kind: str, method: str, cfg: ModelConfig, batches: list, seed: int):
    """(step closure, cache build seconds) for one side. The closure runs one DPO step on the next batch."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()  # eval: dropout off, as ch4_dpo keeps it
    reference = None
    if method == "lora":
        apply_method(model, "lora", rank=8, alpha=16.0)
    else:
        reference = copy.deepcopy(model).requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(optimizer_groups(model, 0.0), lr=1e-5, betas=(0.9, 0.95))

    def ref_scores(batch):  # chosen (b,), rejected (b,) under the reference
        if reference is not None:
            return pair_logprobs(reference, batch)
        with adapters_disabled(model):
            return pair_logprobs(model, batch)

    t0 = time.perf_counter()
    cache = [cached_reference_logprobs(ref_scores, [b]) for b in batches] if kind == "cached" else None
    cache_s = time.perf_counter() - t0
    state = {"i": 0}

    def step():
        i = state["i"] % len(batches)
        state["i"] += 1
        batch = batches[i]
        pc, pr = pair_logprobs(model, batch)  # (B,), (B,) with gradient
        if cache is not None:
            rc, rr = cache[i]
        else:
            with torch.no_grad():
                rc, rr = ref_scores(batch)  # (B,), (B,): the reference pass this side pays every step
        out = dpo_loss(pc, pr, rc, rr, beta=BETA)
        out.loss.backward()
        clip_grad_norm(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return rc, rr
    return step, cache_s, (cache[0] if cache is not None else None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="DPO step time: cached reference log-probs vs recomputing the "
                                            "reference every step (full fine-tuning and LoRA)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (2x rows), as ch4_dpo")
    p.add_argument("--batches", type=int, default=4, help="distinct batches the steps cycle through")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="2 layers, context 128, 4 pairs, 2 repeats (a smoke check)")
    a = p.parse_args(argv)
    for flag in ("batch_size", "batches", "context_length", "repeats"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.context_length < 32:
        p.error(f"--context-length must be >= 32 (room for a prompt and two answers), got {a.context_length}")
    if a.threads:
        torch.set_num_threads(a.threads)
    n_layer = 4
    if a.quick:
        n_layer, a.context_length, a.batch_size, a.batches, a.repeats = 2, 128, 4, 2, 2
    cfg = ModelConfig(vocab_size=2052, context_length=a.context_length, n_layer=n_layer)
    batches = [collate_pairs(synthetic_pairs(a.batch_size, cfg.context_length, cfg.vocab_size, seed=i), pad_id=0)
               for i in range(a.batches)]
    widths = [b.input_ids.shape[1] for b in batches]
    real = sum(int(b.padding_mask.sum()) for b in batches) / len(batches)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} V={cfg.vocab_size} T={cfg.context_length}; "
          f"{a.batch_size} pairs/step = {2 * a.batch_size} rows, padded widths {widths}, "
          f"{real:.0f} real tokens/step on average; {a.repeats} timed steps per side")
    start = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731

    sides, cache_s, cached_first = {}, {}, {}
    for method in ("full", "lora"):
        for kind in ("cached", "recompute"):
            name = f"{method} {kind}"
            progress(f"building {name}" + (" (filling the cache)" if kind == "cached" else ""))
            step, cache_s[name], first = make_side(kind, method, cfg, batches, seed=0)
            progress(f"warm-up step of {name}")
            got = step()  # the reference log-probs of batch 0 this side used
            if kind == "cached":
                cached_first[method] = first
            else:  # the same init (seed 0): recomputed at step 0 = cached, or the sides would not be comparable
                torch.testing.assert_close(got, cached_first[method], rtol=1e-5, atol=1e-4)
            sides[name] = step
    progress(f"timing: {a.repeats} rounds of one step per side, the order rotating")
    cpu = {name: [] for name in sides}
    times = interleaved_times({name: with_cpu_time(step, cpu[name]) for name, step in sides.items()}, a.repeats)
    progress("done")

    print("\n| side | wall s/step (min) | wall s/step (median) | CPU s/step (median) | cache fill s (once, all "
          "batches) |\n|---|---|---|---|---|")
    for name, t in times.items():
        fill = f"{cache_s[name]:.3f}" if name.endswith("cached") else "-"
        print(f"| {name} | {min(t):.3f} | {statistics.median(t):.3f} | {statistics.median(cpu[name]):.3f} | {fill} |")
    result = {"wall": times, "cpu": cpu, "cache_fill_s": {k: v for k, v in cache_s.items() if k.endswith("cached")}}
    print("\n| method | cached / recompute: wall (min) | wall (median) | CPU (median) | goal <= 0.55 (wall median) |"
          "\n|---|---|---|---|---|")
    for method in ("full", "lora"):
        c, r = f"{method} cached", f"{method} recompute"
        ratio = {"min": min(times[c]) / min(times[r]),
                 "median": statistics.median(times[c]) / statistics.median(times[r]),
                 "cpu_median": statistics.median(cpu[c]) / statistics.median(cpu[r])}
        result[method] = ratio
        print(f"| {method} | {ratio['min']:.3f} | {ratio['median']:.3f} | {ratio['cpu_median']:.3f} | "
              f"{'met' if ratio['median'] <= 0.55 else 'NOT met'} |")
    best = min(result["full"]["median"], result["lora"]["median"])
    print(f"\ncached / recompute step time (median wall; CPU): full fine-tuning {result['full']['median']:.2f}x "
          f"({result['full']['cpu_median']:.2f}x), LoRA r=8 {result['lora']['median']:.2f}x "
          f"({result['lora']['cpu_median']:.2f}x); goal <= 0.55x: {'met' if best <= 0.55 else 'NOT met'}")
    if a.quick:
        print("(--quick: smoke-check shapes; the goal is judged on the default run)")
    return result


if __name__ == "__main__":
    main()

"""Benchmark: rollout tokens/s with the KV cache vs without it, on a left-padded batch of mixed lengths.

Two measurements, each with the cache on and off, all four sides interleaved in one process, the order
rotating every repeat (``minilife.measure.interleaved_times``), after a warm-up call each:
- ``GPT.generate(prompts, N, use_cache=True/False)``: B prompts of random token ids whose lengths are
  spread over [60, 160] (left-padded to the longest by ``generate``), N = 96 new tokens each, sampled
  at temperature 1, no stop token, so every row makes exactly N tokens and longest prompt + N = 256 =
  the context: the cache holds the whole sequence, and without it every step runs the whole padded
  sequence so far (no sliding window is needed on either side);
- ``align.rollout.sample_rollouts(model, tokenizer, conversations, N, use_cache=...)``: chapter 3's
  shadowing prompts (the world's tasks through the chat template, the course's BPE tokenizer), which is
  what PPO/GRPO sample from; prompts longer than context - N are cut from the left, answers stop at
  <|end|> (a random model seldom samples it).
Both sides of each pair are seeded the same and must give identical tokens (asserted): the cache changes
the cost, not the samples. tokens/s = new tokens (sampled answer tokens, stop token included) / seconds.
Goal (issue 10): cached >= 3x uncached on a padded batch. Wall and CPU seconds are both reported (CPU =
``time.process_time``: with --threads 1 on shared cores, this process's work only).

Measured (2 cores shared with other jobs, load average 5-6, --threads 1, 3 calls per side): generate
1,080 vs 62 new tokens/s, 17.5x (CPU 18.8x); sample_rollouts 1,200 vs 56 tokens/s, 21.4x (CPU 19.5x):
the goal is met. Without the cache each of the 96 steps re-runs the whole padded batch (16 x 160-256
tokens); with it, one token per row through the layers plus attention over the cached keys. At
--quick's shapes (16 new tokens after 40) the gap is ~2.5x: the cache pays with length.

The model is a random GPT of chapter 3's chat-model shape (``ModelConfig()``: 4 layers, 4 heads, C=128,
context 256; vocabulary = the tokenizer's + the chat tokens). Tokens/s of a random model equal those of
a trained one of the same shape (same work per token), except for where answers stop.

    python bench/rollout_kv.py --threads 1           # ~4 min on 2 shared cores (the uncached calls: ~25 s each)
    python bench/rollout_kv.py --quick --threads 1   # seconds, a smoke check
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minilife.align.chat import add_chat_tokens, render_prompt  # noqa: E402
from minilife.align.rollout import sample_rollouts  # noqa: E402
from minilife.artifacts import ensure_data  # noqa: E402
from minilife.data.bpe import Tokenizer  # noqa: E402
from minilife.data.shadowing import make_shadowing_set  # noqa: E402
from minilife.measure import interleaved_times  # noqa: E402
from minilife.model.transformer import GPT, ModelConfig  # noqa: E402


def with_cpu_time(fn, sink: list):
    """``fn`` wrapped so each call also appends its process CPU seconds to ``sink`` (with --threads 1 on
    shared cores: this process's work only, where wall time also counts what the scheduler gave others)."""
    def run():
        t0 = time.process_time()
        out = fn()
        sink.append(time.process_time() - t0)
        return out
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="rollout tokens/s: KV cache vs none, left-padded mixed-length batch")
    p.add_argument("--prompts", type=int, default=16, help="rows per batch")
    p.add_argument("--min-prompt", type=int, default=60, help="shortest random prompt (tokens)")
    p.add_argument("--max-prompt", type=int, default=160, help="longest random prompt (tokens)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens sampled per row")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="2 layers, 4 prompts of 20-40 tokens, 16 new tokens, "
                                                         "context 64, 2 repeats, the smoke tokenizer (a smoke check)")
    a = p.parse_args(argv)
    if a.quick:
        a.prompts, a.min_prompt, a.max_prompt, a.new_tokens, a.context_length, a.repeats = 4, 20, 40, 16, 64, 2
    for flag in ("prompts", "min_prompt", "new_tokens", "repeats"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if not a.min_prompt <= a.max_prompt or a.max_prompt + a.new_tokens > a.context_length:
        p.error(f"need --min-prompt <= --max-prompt and --max-prompt + --new-tokens <= --context-length, got "
                f"{a.min_prompt}, {a.max_prompt}, {a.new_tokens}, {a.context_length}")
    if a.threads:
        torch.set_num_threads(a.threads)
    start = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731

    progress("the course's tokenizer (ch2_data, built if missing)" + (" (smoke)" if a.quick else ""))
    tokenizer = Tokenizer.load(ensure_data(smoke=a.quick) / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=a.context_length, n_layer=2 if a.quick else 4)
    model, tokenizer = add_chat_tokens(GPT(cfg), tokenizer)
    model.eval()
    V, T, N = model.cfg.vocab_size, model.cfg.context_length, a.new_tokens
    g = torch.Generator().manual_seed(0)
    lengths = torch.linspace(a.min_prompt, a.max_prompt, a.prompts).round().long()[torch.randperm(a.prompts, generator=g)]
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in lengths]  # mixed lengths, unsorted
    conversations = [e.messages[:-1] for e in make_shadowing_set(n_train=a.prompts, n_val=0, n_test=0)["train"]]
    chat_lengths = sorted(min(len(render_prompt(tokenizer, c)), T - N) for c in conversations)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: L={model.cfg.n_layer} H={model.cfg.n_head} C={model.cfg.n_embd} V={V} T={T}; generate: "
          f"{a.prompts} random prompts of {a.min_prompt}-{a.max_prompt} tokens (padded to {max(map(len, prompts))}) "
          f"+ {N} new tokens; sample_rollouts: {len(conversations)} shadowing prompts of {chat_lengths[0]}-"
          f"{chat_lengths[-1]} tokens (median {statistics.median(chat_lengths):.0f}) + up to {N}; "
          f"{a.repeats} timed calls per side")

    def generate_side(use_cache):
        def run():
            out = model.generate(prompts, N, temperature=1.0, use_cache=use_cache,
                                 generator=torch.Generator().manual_seed(1))
            return out.tokens, int(out.completion_mask.sum())
        return run

    def rollout_side(use_cache):
        def run():
            ro = sample_rollouts(model, tokenizer, conversations, N, temperature=1.0, use_cache=use_cache,
                                 generator=torch.Generator().manual_seed(2))
            return ro.tokens, int(ro.response_lengths.sum())
        return run

    sides = {"generate, cache": generate_side(True), "generate, no cache": generate_side(False),
             "sample_rollouts, cache": rollout_side(True), "sample_rollouts, no cache": rollout_side(False)}
    made = {}
    with torch.no_grad():
        for name, run in sides.items():
            progress(f"warm-up call of {name}")
            made[name] = run()
        for kind in ("generate", "sample_rollouts"):
            (a_tok, a_n), (b_tok, b_n) = made[f"{kind}, cache"], made[f"{kind}, no cache"]
            assert torch.equal(a_tok, b_tok) and a_n == b_n, f"{kind}: the cache changed the sampled tokens"
            progress(f"{kind}: cache on and off gave identical tokens ({a_n} new tokens per call)")
        progress(f"timing: {a.repeats} rounds of one call per side, the order rotating")
        cpu = {name: [] for name in sides}
        times = interleaved_times({name: with_cpu_time(run, cpu[name]) for name, run in sides.items()}, a.repeats)
    progress("done")

    print("\n| side | new tokens/call | wall s/call (min) | wall s/call (median) | CPU s/call (median) | "
          "tokens/s (median wall) |\n|---|---|---|---|---|---|")
    for name, t in times.items():
        n = made[name][1]
        print(f"| {name} | {n} | {min(t):.3f} | {statistics.median(t):.3f} | {statistics.median(cpu[name]):.3f} | "
              f"{n / statistics.median(t):,.0f} |")
    result = {"wall": times, "cpu": cpu}
    print("\n| rollout path | cache speed-up: wall (min) | wall (median) | CPU (median) | goal >= 3x (wall median) |"
          "\n|---|---|---|---|---|")
    for kind in ("generate", "sample_rollouts"):
        c, u = f"{kind}, cache", f"{kind}, no cache"
        ratio = {"min": min(times[u]) / min(times[c]),
                 "median": statistics.median(times[u]) / statistics.median(times[c]),
                 "cpu_median": statistics.median(cpu[u]) / statistics.median(cpu[c])}
        result[kind] = ratio
        print(f"| {kind} | {ratio['min']:.2f}x | {ratio['median']:.2f}x | {ratio['cpu_median']:.2f}x | "
              f"{'met' if ratio['median'] >= 3 else 'NOT met'} |")
    if a.quick:
        print("(--quick: smoke-check shapes; the goal is judged on the default run)")
    return result


if __name__ == "__main__":
    main()

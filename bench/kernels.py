"""Benchmark: the kernels against torch's own ops -- time and peak memory, ratio ours / reference.

    .venv/bin/python bench/kernels.py [--quick] [--repeats 3] [--device auto] [--json out.json]

CPU (what a laptop can check):
- fused linear + cross-entropy, forward + backward, fp32, N = 4,096 tokens, C = 768, V = 50,257
  (GPT-2 small's head), against two references on the same inputs: materialised logits
  (``hidden @ W.T`` then ``F.cross_entropy``; goals: peak memory <= 0.2x, time <= 1.3x) and torch's
  own chunked ``F.linear_cross_entropy`` (torch >= 2.13; goals: time <= 1.2x, peak memory <= 1.0x),
  once with its default ``LinearCrossEntropyOptions`` (its own chunk rule: on CPU fp32, rows =
  next_pow2(N / ceil(V / C)) / 2, i.e. 32 here) and once with our rows per chunk (256 here), the
  same memory budget.
- attention: torch-tiled flash attention vs naive (memory is the point there).
GPU (when one is present; the device name is recorded):
- Triton flash attention fwd+bwd at T = 4,096 bf16: >= 0.7x SDPA's speed (time ratio <= 1.43) and
  >= 3x faster than naive (time ratio <= 0.33).
- Triton cross-entropy vs F.cross_entropy at V = 128,256, N = 16,384, bf16: >= 1.5x faster (time
  ratio <= 0.67), peak memory <= 0.5x.
- fused linear + CE at N = 16,384, C = 2,048, V = 128,256, bf16: peak memory <= 0.25x materialised;
  time <= 1.2x and peak memory <= 1.0x torch's chunked op.
``--quick``: smaller shapes (CPU: N = 2,048, C = 512, V = 16,384 -- still two of our chunks -- and
T = 256; about a minute) and 2 repeats, a smoke check; the goals apply to the default shapes only.

Method: ``minilife.measure.bench_loss`` / ``bench_attention``: all sides of a case in one process on
the same inputs; one warm-up call each, then ``--repeats`` interleaved rounds (order rotating); min
and median of the wall times (CUDA synchronised). Peak memory: CUDA allocator peak above the inputs;
on CPU the live-tensor-bytes count of ``peak_tensor_bytes`` (method: ``peak_memory_bytes`` in
``minilife/measure.py``). Prints a markdown table; ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minilife.common import markdown_table, pick_device, write_json_atomic  # noqa: E402
from minilife.kernels import triton_available  # noqa: E402
from minilife.measure import bench_attention, bench_loss  # noqa: E402

# (case prefix, reference, metric, device type) -> the largest ratio ours / reference that meets the goal
GOALS = {
    ("linear + CE", "materialised", "peak_MiB", "cpu"): 0.2, ("linear + CE", "materialised", "time_ms", "cpu"): 1.3,
    ("linear + CE", "materialised", "peak_MiB", "cuda"): 0.25,
    **{("linear + CE", ref, metric, dev): goal for metric, goal in (("time_ms", 1.2), ("peak_MiB", 1.0))
       for ref in ("torch chunked", "torch chunked, our chunk") for dev in ("cpu", "cuda")},
    ("cross-entropy", "torch", "time_ms", "cuda"): 1 / 1.5, ("cross-entropy", "torch", "peak_MiB", "cuda"): 0.5,
    ("causal attention", "sdpa", "time_ms", "cuda"): 1 / 0.7,
    ("causal attention", "attention_naive", "time_ms", "cuda"): 1 / 3,
}


def goal_for(row: dict, device_type: str):
    return GOALS.get((row["case"].split(" fwd")[0], row["reference"], row["metric"], device_type))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds per case (default 3; quick 2)")
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke check (~1 min on CPU)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--no-attention", action="store_true", help="skip the attention pairs")
    args = p.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if repeats < 1:
        p.error(f"--repeats must be >= 1, got {repeats}")
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"repeats {repeats}{'; quick shapes' if args.quick else ''}", flush=True)
    shapes = {(False, False): dict(tokens=4096, vocab=50257, hidden=768, dtype=torch.float32, seq_len=1024),
              (False, True): dict(tokens=2048, vocab=16384, hidden=512, dtype=torch.float32, seq_len=256),
              (True, False): dict(tokens=16384, vocab=128256, hidden=2048, dtype=torch.bfloat16, seq_len=4096),
              (True, True): dict(tokens=4096, vocab=32000, hidden=1024, dtype=torch.bfloat16, seq_len=1024)}
    shape = shapes[(cuda, args.quick)]
    seq_len = shape.pop("seq_len")

    rows: list[dict] = []
    t0 = time.perf_counter()
    print(f"[1/2] linear + CE fwd+bwd {shape}: each side runs 1 warm-up + {repeats} timed + 1 memory call ...",
          flush=True)
    rows += bench_loss(device, **shape, repeats=repeats, triton_ce=cuda and triton_available())
    print(f"      done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_attention:
        t0 = time.perf_counter()
        print(f"[2/2] causal attention fwd+bwd T={seq_len} ...", flush=True)
        rows += bench_attention(device, seq_len=seq_len, repeats=repeats)
        print(f"      done in {time.perf_counter() - t0:.0f} s", flush=True)
    for r in rows:
        goal = None if args.quick else goal_for(r, device.type)
        r["goal"] = f"<= {goal:.2f}" if goal else "-"
        r["met (min / median)"] = (" / ".join("yes" if r[k] <= goal else "NO" for k in ("ratio_min", "ratio_median"))
                                   if goal else "-")
    print(markdown_table(rows, ["case", "metric", "ours", "reference", "ours_min", "ours_median", "ref_min",
                                "ref_median", "ratio_min", "ratio_median", "goal", "met (min / median)"]))
    if not cuda:
        print("\nGPU goals (Triton attention vs SDPA/naive, Triton CE vs F.cross_entropy): n/a, no GPU here.")
    if args.quick:
        print("(--quick: small shapes; the goals apply to the default shapes only)")
    if args.json:
        write_json_atomic(args.json, {"device": str(device), "device_name": name, "quick": args.quick, "rows": rows})
    return rows


if __name__ == "__main__":
    main()

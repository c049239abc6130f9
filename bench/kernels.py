"""Benchmark: the kernels against torch's own ops -- time and peak memory, ratio ours / reference.

    .venv/bin/python bench/kernels.py [--repeats 3] [--device auto] [--json out.json]

CPU (what a laptop can check):
- fused linear + cross-entropy vs materialised logits (``hidden @ W.T`` then ``F.cross_entropy``),
  forward + backward, fp32, N = 4,096 tokens, C = 768, V = 50,257 (GPT-2 small's head).
  Goals: peak memory <= 0.2x, time <= 1.3x.
- attention: torch-tiled flash attention vs naive (``bench_attention``; memory is the point there).
GPU (when one is present; the device name is recorded):
- Triton flash attention fwd+bwd at T = 4,096 bf16: >= 0.7x SDPA's speed (time ratio <= 1.43) and
  >= 3x faster than naive (time ratio <= 0.33) -- from ``minilife.kernels.flash_attention.bench_attention``.
- Triton cross-entropy vs F.cross_entropy at V = 128,256, N = 16,384, bf16: >= 1.5x faster (time
  ratio <= 0.67), peak memory <= 0.5x.
- fused linear + CE vs materialised at N = 16,384, C = 2,048, V = 128,256, bf16: peak memory <= 0.25x.

Method: both sides in one process on the same inputs; one warm-up call each, then ``--repeats``
interleaved rounds (order alternating); min and median of the wall times (CUDA synchronised).
Peak memory: CUDA allocator peak above the inputs; on CPU the live-tensor-bytes count of
``peak_tensor_bytes`` (method: ``peak_memory_bytes`` in ``minilife/measure.py``). Prints a markdown
table; ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minilife.chapters.ch5_kernels import markdown_table  # noqa: E402
from minilife.common import pick_device, write_json_atomic  # noqa: E402
from minilife.kernels import triton_available  # noqa: E402
from minilife.kernels.flash_attention import bench_attention  # noqa: E402
from minilife.kernels.fused_linear_ce import bench_loss  # noqa: E402

# (case prefix, metric, ours, reference) -> the largest ratio ours/reference that meets the goal
GOALS = {
    ("linear + CE", "peak_MiB", "cpu"): 0.2, ("linear + CE", "time_ms", "cpu"): 1.3,
    ("linear + CE", "peak_MiB", "cuda"): 0.25,
    ("cross-entropy", "time_ms", "cuda"): 1 / 1.5, ("cross-entropy", "peak_MiB", "cuda"): 0.5,
}


def goal_for(row: dict, device_type: str):
    if row["case"].startswith("causal attention") and device_type == "cuda" and row["metric"] == "time_ms":
        return 1 / 0.7 if row["reference"] == "sdpa" else 1 / 3
    prefix = "linear + CE" if row["case"].startswith("linear + CE") else row["case"].split(" fwd")[0]
    return GOALS.get((prefix, row["metric"], device_type))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per pair")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--no-attention", action="store_true", help="skip the attention pairs")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")

    rows: list[dict] = []
    if cuda:
        rows += bench_loss(device, tokens=16384, vocab=128256, hidden=2048, dtype=torch.bfloat16,
                           repeats=args.repeats, triton_ce=triton_available())
    else:
        rows += bench_loss(device, tokens=4096, vocab=50257, hidden=768, dtype=torch.float32,
                           repeats=args.repeats, triton_ce=False)
    if not args.no_attention:
        rows += bench_attention(str(device), repeats=args.repeats)
    for r in rows:
        goal = goal_for(r, device.type)
        r["goal"] = f"<= {goal:.2f}" if goal else "-"
        r["met (min / median)"] = (" / ".join("yes" if r[k] <= goal else "NO" for k in ("ratio_min", "ratio_median"))
                                   if goal else "-")
    print(markdown_table(rows, ["case", "metric", "ours", "reference", "ours_min", "ours_median", "ref_min",
                                "ref_median", "ratio_min", "ratio_median", "goal", "met (min / median)"]))
    if not cuda:
        print("\nGPU goals (Triton attention vs SDPA/naive, Triton CE vs F.cross_entropy): n/a, no GPU here.")
    if args.json:
        write_json_atomic(args.json, {"device": str(device), "device_name": name, "rows": rows})
    return rows


if __name__ == "__main__":
    main()

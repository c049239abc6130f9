"""Chapter 1: the lifecycle and its bill -- what training a model costs in memory, FLOPs, time, money.

    python -m minilife.chapters.ch1_budget            # ~5 s on 2 cores (--smoke: ~4 s)

prints the parameter counts, a memory bill per size and precision (the notes' 72 GB and 84 GB
reproduced from stated assumptions), predicted vs measured bytes on the tiny model, FLOPs = 6ND
against torch's counter, training time and cost, and Chinchilla tokens. Writes memory_bill.png,
metrics.jsonl and summary.json to runs/ch1_budget/.

What it does (read ``main`` top to bottom)
1. Parameters: the exact count for our tiny model, GPT-2-small's shape and a Llama-2-7B-shaped
   config, from ``minilife.budget.param_count`` (equal to ``GPT.num_params()``).
2. Memory bills: weights + gradients (+ fp32 master copy) + Adam moments + activations for each
   size under ``--precision``, every assumption printed; then the lifecycle notes' two figures
   (~72 GB for an 8B model, ~84 GB for a 7B one) reproduced from the assumptions that give them, and
   what changes under others.
3. Predicted vs measured on the tiny model: one real AdamW step, then the bytes of parameters,
   gradients and moments summed from the actual tensors (these match exactly), and the activation
   bytes autograd really saves (counted with saved-tensor hooks) against two estimates: the minimum a
   fused implementation keeps, and our op-by-op accounting of plain autograd (which matches exactly,
   explaining the gap).
4. FLOPs: 6 N D against the per-token count 6 N_matmul + 12 L T C and torch's FLOP counter on a real
   step; measured throughput on this machine.
5. Time and cost on a GPU (peak FLOP/s x MFU, price per GPU-hour), the notes' worked examples, and
   Chinchilla-optimal tokens (~20 per parameter).
Writes ``metrics.jsonl`` (every table row), ``memory_bill.png`` and ``summary.json``.

What it leaves out: multi-GPU sharding (ZeRO divides the optimizer/gradient rows by the GPU count),
inference/KV-cache memory, allocator overhead. See ``minilife/budget.py`` for the formulas' sources.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from minilife import budget
from minilife.budget import GB, MemoryOptions, memory_bill
from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, fmt_count,
                             markdown_table, start_run, write_json_atomic)
from minilife.runs import cli
from minilife.model.transformer import GPT, PRESETS, ModelConfig
from minilife.optim.adamw import AdamW

CHAPTER = "ch1_budget"
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "t4": 65.0}  # dense bf16/fp16 tensor-core peaks
# Llama-2-7B's shape in our architecture (Touvron et al. 2023, Table 2 / released config): 6,738,415,616 params.
# Notes 004's "computational challenge" table: (parameters, GPU memory in GB).
NOTES_004_TABLE = [(125e6, 1), (1.5e9, 12), (7e9, 50), (70e9, 500), (175e9, 1400)]
LLAMA2_7B = ModelConfig(vocab_size=32000, context_length=4096, n_layer=32, n_head=32, n_embd=4096,
                        ffn_hidden=11008, tie_embeddings=False)


@dataclass
class BudgetConfig(RunConfig):
    """The bill of training: memory, FLOPs, time, cost and Chinchilla tokens, predicted and measured."""
    seed: int = cli_field(0, "seed for the measured model and batch")
    device: str = cli_field("auto", "auto | cpu | cuda | mps (for the measured tiny-model step)")
    preset: str = cli_field("tiny", "ModelConfig preset measured", smoke="micro")
    batch: int = cli_field(8, "batch size of the measured step", smoke=2)
    seq: Optional[int] = cli_field(None, "sequence length of the measured step (default: the preset's context)")
    precision: Literal["fp32", "mixed", "bf16"] = cli_field(
        "mixed", "bills for the large models: fp32 | mixed (bf16 + fp32 master + fp32 Adam) | bf16 (all 16-bit)")
    bill_batch: int = cli_field(1, "batch size assumed in the large models' activation estimate")
    bill_seq: int = cli_field(2048, "sequence length assumed there (capped at each model's context)")
    gradient_checkpointing: bool = cli_field(False, "assume activation checkpointing in the large bills")
    gpu: Literal["a100", "h100", "t4"] = cli_field("a100", "GPU whose dense bf16 peak sets the time")
    mfu: float = cli_field(0.4, "model FLOPs utilisation assumed (fraction of peak actually achieved)")
    usd_per_gpu_hour: float = cli_field(2.5, "price of one GPU-hour (the notes use $2.50 for an A100)")
    n_gpus: int = cli_field(64, "GPUs working in parallel (sets wall-clock days, not cost)")
    tokens_per_param: float = cli_field(20.0, "Chinchilla ratio D/N")
    timing_steps: int = cli_field(5, "training steps timed for throughput", smoke=2)

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(batch=1, bill_batch=1, bill_seq=1, n_gpus=1, seq=1, timing_steps=1),
                    choices={"preset": PRESETS})
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")


def bill_row(name: str, bill: budget.MemoryBill, **extra) -> dict:
    gb = bill.gb()
    return {"model": name, "params": fmt_count(bill.n_params), **{k: round(v, 3) for k, v in gb.items()},
            "B/param": round(bill.total / bill.n_params, 2), **extra}


def measure_tiny(cfg: ModelConfig, batch: int, seq: int, device: torch.device, steps: int) -> dict:
    """One real AdamW step (state bytes), saved-activation bytes with/without checkpointing, FLOPs
    counted by torch (math attention, whose matmuls the counter sees), and timed steps (sdpa)."""
    model = GPT(cfg).to(device)
    opt = AdamW(model.param_groups(0.1), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    tgt = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    out = {}
    for ckpt in (False, True):
        model.cfg.gradient_checkpointing = ckpt
        saved = budget.measure_saved_activations(model, idx, tgt)
        saved["loss"].backward()
        out["saved_ckpt" if ckpt else "saved"] = saved["bytes"]
    model.cfg.gradient_checkpointing = False
    opt.step()  # the moments now exist
    out.update(budget.measure_state_bytes(model, opt))
    opt.zero_grad(set_to_none=True)
    model_math = GPT(dataclasses.replace(cfg, attn_impl="math")).to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        model_math(idx, tgt)[1].backward()
    out["counted_flops"] = counter.get_total_flops()
    times = []
    for _ in tqdm(range(steps + 1), desc="timing steps", leave=False):
        t0 = time.perf_counter()
        loss = model(idx, tgt)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["step_seconds"] = min(times[1:])  # the first step warms up allocators and kernels
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg: BudgetConfig = config_from_args(BudgetConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out_dir, device = start_run(CHAPTER, cfg)
    preset, batch, steps = cfg.preset, cfg.batch, cfg.timing_steps
    tiny = ModelConfig.preset(preset)
    seq = min(cfg.seq or tiny.context_length, tiny.context_length)
    peak = GPU_PEAK_TFLOPS[cfg.gpu] * 1e12
    log = MetricsLogger(out_dir / "metrics.jsonl")
    print(f"[{CHAPTER}] writing to {out_dir}")

    # 1. parameters ----------------------------------------------------------------------------
    models = {preset: tiny, "gpt2-small": ModelConfig.preset("gpt2-small"), "llama2-7b-shape": LLAMA2_7B}
    rows = []
    for name, m in models.items():
        n = budget.param_count(m)
        rows.append({"model": name, "L": m.n_layer, "C": m.n_embd, "H": m.n_head, "F": m.ffn_dim,
                     "V": m.vocab_size, "tied": m.tie_embeddings, "params": n, "matmul params": budget.matmul_param_count(m)})
        log.log(table="params", **rows[-1])
    print("\n## 1. Parameters (exact for our architecture: RMSNorm, SwiGLU, RoPE, no biases)\n")
    print(markdown_table(rows, ["model", "L", "C", "H", "F", "V", "tied", "params", "matmul params"]))
    print("GPT-2-small itself has 124,439,808: learned positions, biases and LayerNorm betas we do not have.")

    # 2. memory bills -------------------------------------------------------------------------
    base = budget.PRECISIONS[cfg.precision]
    print(f"\n## 2. Memory bill, precision '{cfg.precision}' (decimal GB): {base.weights} weights, "
          f"{base.grads} grads, master fp32 copy: {base.master_weights}, Adam moments {base.moments} x{base.n_moments}; "
          f"activations: {base.activations_dtype}, fused-kernel minimum, batch {cfg.bill_batch} x seq "
          f"min({cfg.bill_seq}, context), checkpointing {cfg.gradient_checkpointing}\n")
    bills = {}
    for name, m in models.items():
        opts = dataclasses.replace(base, batch=cfg.bill_batch, seq=min(cfg.bill_seq, m.context_length),
                                   gradient_checkpointing=cfg.gradient_checkpointing)
        bills[name] = memory_bill(m, opts)
    lora = memory_bill(LLAMA2_7B, dataclasses.replace(
        base, batch=cfg.bill_batch, seq=cfg.bill_seq, gradient_checkpointing=cfg.gradient_checkpointing,
        trainable_params=budget.lora_param_count(LLAMA2_7B, rank=8)))
    bills["llama2-7b-shape + LoRA r=8"] = lora  # adapters on qkv and proj of every layer
    rows = [bill_row(n, b) for n, b in bills.items()]
    for r in rows:
        log.log(table="memory", precision=cfg.precision, **r)
    cols = ["model", "params", "weights", "grads", "master", "moments", "activations", "total", "B/param"]
    print(markdown_table(rows, cols))
    print(f"LoRA trains {fmt_count(lora.trainable)} parameters: gradients and moments shrink to almost nothing, "
          "the frozen weights and the activations stay.")

    print("\n### The notes' figures, reproduced from stated assumptions (nominal N, as the notes use)\n")
    rows = []
    for key, sc in budget.NOTES_SCENARIOS.items():
        bill = memory_bill(sc["n_params"], sc["options"])
        rows.append(bill_row(key, bill, notes=f"~{sc['expected_gb']} GB"))
        print(f"- {key}: {sc['source']}. {sc['why']}")
    s8, s7 = budget.NOTES_SCENARIOS["notes-8b-72gb"], budget.NOTES_SCENARIOS["notes-7b-84gb"]
    variants = [  # (name, what changes, model, options)
        ("8B fp32 moments", "as the notes' text says Adam stores them", 8e9,
         dataclasses.replace(s8["options"], moments="fp32")),
        ("7B exact count", "the real Llama-2-7B shape instead of 7e9", LLAMA2_7B, s7["options"]),
        ("7B + fp32 master", "real mixed precision keeps an fp32 weight copy", 7e9,
         dataclasses.replace(s7["options"], master_weights=True)),
        ("7B bf16 moments", "pure 16-bit training", 7e9, dataclasses.replace(s7["options"], moments="bf16")),
    ]
    for name, what, m, opts in variants:
        rows.append(bill_row(name, memory_bill(m, opts), notes=what))
    for r in rows:
        log.log(table="notes", **r)
    print()
    print(markdown_table(rows, cols + ["notes"]))
    print(f"With a Llama-2-7B shape, batch 1 x 2048 tokens, the fused-minimum activations in bf16 come to "
          f"{budget.activation_bytes(LLAMA2_7B, batch=1, seq=2048) / GB:.1f} GB -- the order of the notes' stated 8 GB.")
    rows = [{"size": fmt_count(n), "notes 004 GPU memory (GB)": g, "implied bytes/param": round(g * GB / n, 2)}
            for n, g in NOTES_004_TABLE]
    for r in rows:
        log.log(table="notes004", **r)
    print("\nNotes 004's size table, read as bytes per parameter:\n")
    print(markdown_table(rows, list(rows[0])))
    print("~7-8 B/param is the all-16-bit bill (weights + grads + moments, 8 B) without activations -- less than "
          "fp32 Adam needs (12-16 B), so that table assumes 16-bit states, 8-bit optimizers or sharding.")

    # 3. predicted vs measured ---------------------------------------------------------------
    print(f"\n## 3. Predicted vs measured: '{preset}' model, fp32, one AdamW step, batch {batch} x seq {seq}, "
          f"device {device.type}\n")
    meas = measure_tiny(tiny, batch, seq, device, steps)
    fp32 = MemoryOptions(weights="fp32", grads="fp32", moments="fp32", activations_dtype="fp32", batch=batch, seq=seq)
    pred = memory_bill(tiny, fp32)
    act = lambda kind, ck: budget.activation_bytes(tiny, batch=batch, seq=seq, dtype="fp32", kind=kind,  # noqa: E731
                                                   checkpointing=ck, recompute_peak=False)
    rows = [{"item": "parameters", "predicted": pred.weights, "measured": meas["params"]},
            {"item": "gradients", "predicted": pred.grads, "measured": meas["grads"]},
            {"item": "AdamW moments", "predicted": pred.moments, "measured": meas["moments"]},
            {"item": "activations (fused minimum)", "predicted": act("fused", False), "measured": meas["saved"]},
            {"item": "activations (autograd accounting)", "predicted": act("autograd", False), "measured": meas["saved"]},
            {"item": "activations, checkpointed (fused)", "predicted": act("fused", True), "measured": meas["saved_ckpt"]},
            {"item": "activations, checkpointed (autograd)", "predicted": act("autograd", True), "measured": meas["saved_ckpt"]}]
    for r in rows:
        r["ratio"] = round(r["measured"] / r["predicted"], 4)
        log.log(table="measured", **r)
    print(markdown_table(rows, ["item", "predicted", "measured", "ratio"]))
    if meas["other_state"]:
        print(f"(+ {meas['other_state']} bytes of step-counter tensors the optimizer keeps besides the moments)")
    print("\nWhy autograd keeps more than the fused minimum (elements per token per layer):")
    fused = budget.activation_terms(tiny, seq, "fused")
    auto = budget.activation_terms(tiny, seq, "autograd")
    print(markdown_table([{"kind": "fused", "term": t, "elements": n, "why": w} for t, n, w in fused]
                + [{"kind": "autograd", "term": t, "elements": n, "why": w} for t, n, w in auto],
                ["kind", "term", "elements", "why"]))
    print(f"Total per layer per token: fused {sum(n for _, n, _ in fused)}, autograd {sum(n for _, n, _ in auto)}. "
          "A fused RMSNorm keeps x and one scalar, a fused SwiGLU recomputes silu(gate), flash attention "
          "keeps only Q, K, V, O -- that is where the ratio above comes from.")

    # 4. FLOPs -------------------------------------------------------------------------------
    tokens = batch * seq
    fpt = budget.flops_per_token(tiny, seq)
    rows = [{"count": "6 N D (N = all params)", "flops": budget.train_flops(budget.param_count(tiny), tokens)},
            {"count": "6 N_matmul D", "flops": fpt["dense"] * tokens},
            {"count": "(6 N_matmul + 12 L T C) D", "flops": fpt["total"] * tokens},
            {"count": "torch FlopCounterMode (math attention)", "flops": float(meas["counted_flops"])}]
    for r in rows:
        r["ratio to counter"] = round(r["flops"] / meas["counted_flops"], 4)
        log.log(table="flops", **r)
    print(f"\n## 4. FLOPs of one training step ({tokens} tokens)\n")
    print(markdown_table(rows, ["count", "flops", "ratio to counter"]))
    share = lambda m, t: budget.flops_per_token(m, t)["attention"] / budget.flops_per_token(m, t)["total"]  # noqa: E731
    print(f"6 N D misses the attention matmuls (12 L T C per token, growing with T): {share(tiny, seq):.1%} of the "
          f"step here, {share(LLAMA2_7B, 4096):.1%} for the 7B shape at T=4096. The counter checks the exact count.")
    achieved = fpt["total"] * tokens / meas["step_seconds"]
    print(f"Measured: {meas['step_seconds'] * 1e3:.1f} ms per step = {tokens / meas['step_seconds']:.0f} tokens/s "
          f"= {achieved / 1e9:.2f} GFLOP/s on {device.type} (sdpa attention, best of {steps}).")

    # 5. time, cost, Chinchilla ---------------------------------------------------------------
    print(f"\n## 5. Time and cost: {cfg.gpu.upper()} {GPU_PEAK_TFLOPS[cfg.gpu]:.0f} TFLOP/s peak x MFU {cfg.mfu}, "
          f"${cfg.usd_per_gpu_hour}/GPU-hour, {cfg.n_gpus} GPUs; tokens = {cfg.tokens_per_param:g} x N "
          "(Chinchilla) unless stated\n")
    jobs = [(f"{name} (Chinchilla)", budget.param_count(m), budget.chinchilla_tokens(budget.param_count(m), cfg.tokens_per_param))
            for name, m in models.items()]
    jobs += [("notes 000: 7B on 1T tokens", 7e9, 1e12), ("notes 003: 70B on 1T tokens", 70e9, 1e12),
             ("Chinchilla itself: 70B on 1.4T", 70e9, 1.4e12)]
    rows = []
    for name, n, d in jobs:
        flops = budget.train_flops(n, d)
        tc = budget.train_time_cost(flops, peak_flops=peak, mfu=cfg.mfu, n_gpus=cfg.n_gpus,
                                    usd_per_gpu_hour=cfg.usd_per_gpu_hour)
        rows.append({"job": name, "N": fmt_count(n), "tokens": fmt_count(d), "flops": flops,
                     "gpu_hours": tc["gpu_hours"], "wall_days": tc["wall_days"], "usd": tc["usd"]})
        log.log(table="cost", **rows[-1])
    print(markdown_table(rows, ["job", "N", "tokens", "flops", "gpu_hours", "wall_days", "usd"]))
    notes_usd = budget.train_time_cost(budget.train_flops(7e9, 1e12), peak_flops=312e12, mfu=1.0)["usd"]
    print(f"Notes 000's cost function divides by the full 312 TFLOP/s (MFU 1.0) at $2.50: ${notes_usd:,.0f} for "
          f"7B x 1T tokens; its comment's '$2-5M' is {2e6 / notes_usd:.0f}-{5e6 / notes_usd:.0f}x what that formula "
          f"gives. At MFU {cfg.mfu} the formula's cost grows by 1/MFU = {1 / cfg.mfu:.1f}x.")
    n_tiny = budget.param_count(tiny)
    d_tiny = budget.chinchilla_tokens(n_tiny, cfg.tokens_per_param)
    cpu_hours = budget.train_flops(n_tiny, d_tiny) / achieved / 3600
    print(f"\nChinchilla for '{preset}': {fmt_count(n_tiny)} params -> {fmt_count(d_tiny)} tokens = "
          f"{budget.train_flops(n_tiny, d_tiny):.3g} FLOPs: {cpu_hours:.2f} h at the throughput measured above.")
    n_opt, d_opt = budget.chinchilla_optimal(5.76e23, cfg.tokens_per_param)
    print(f"Inverse: Chinchilla's 5.76e23 FLOPs -> N = sqrt(C/120) = {fmt_count(n_opt)}, D = {fmt_count(d_opt)} "
          "(the paper trained 70B on 1.4T).")

    # plot and summary ------------------------------------------------------------------------
    plot_path = plot_bills(out_dir / "memory_bill.png", bills, variants, cfg.precision)
    log.close()
    n8 = budget.NOTES_SCENARIOS["notes-8b-72gb"]
    summary = {
        "chapter": CHAPTER, "preset": preset, "precision": cfg.precision, "device": device.type,
        "params": {name: budget.param_count(m) for name, m in models.items()},
        "bills_gb": {name: b.gb() for name, b in bills.items()},
        "notes_reproduced_gb": {k: round(memory_bill(v["n_params"], v["options"]).total / GB, 3)
                                for k, v in budget.NOTES_SCENARIOS.items()},
        "notes_expected_gb": {k: v["expected_gb"] for k, v in budget.NOTES_SCENARIOS.items()},
        "measured": {k: v for k, v in meas.items() if k != "step_seconds"},
        "state_bytes_exact": all(pred_v == meas[k] for k, pred_v in
                                 (("params", pred.weights), ("grads", pred.grads), ("moments", pred.moments))),
        "activation_ratio_vs_fused": meas["saved"] / act("fused", False),
        "activation_ratio_vs_autograd": meas["saved"] / act("autograd", False),
        "flops_ratio_vs_counter": fpt["total"] * tokens / meas["counted_flops"],
        "tokens_per_second": tokens / meas["step_seconds"], "achieved_gflops": achieved / 1e9,
        "chinchilla_tokens_tiny": d_tiny, "chinchilla_cpu_hours_tiny": cpu_hours,
        "notes_8b_assumptions": dataclasses.asdict(n8["options"]), "plot": str(plot_path),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    print(f"\n[{CHAPTER}] wrote {out_dir / 'metrics.jsonl'}, {plot_path.name}, summary.json")
    return summary


def plot_bills(path, bills: dict, variants: list, precision: str):
    """Two panels of stacked bars (weights / grads / master / moments / activations): (a) bytes per
    parameter for each model size; (b) the notes' 7B/8B bills and variants in GB, against 16 and 80 GB cards."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    items = ("weights", "grads", "master", "moments", "activations")
    colors = ("#4c72b0", "#dd8452", "#937860", "#55a868", "#c44e52")
    notes = [(k, memory_bill(v["n_params"], v["options"])) for k, v in budget.NOTES_SCENARIOS.items()]
    notes += [(name, memory_bill(m, o)) for name, _, m, o in variants]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for ax, named, per_param in ((ax1, list(bills.items()), True), (ax2, notes, False)):
        bottom = [0.0] * len(named)
        for item, color in zip(items, colors):
            vals = [getattr(b, item) / (b.n_params if per_param else GB) for _, b in named]
            ax.bar(range(len(named)), vals, bottom=bottom, color=color, label=item)
            bottom = [a + v for a, v in zip(bottom, vals)]
        for i, (_, b) in enumerate(named):
            ax.annotate(f"{b.total / GB:.3g} GB", (i, bottom[i]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(named)), [textwrap.fill(n, 12) for n, _ in named], fontsize=7)
        ax.set_ylim(0, max(bottom) * 1.15)
    ax1.set_ylabel("bytes per parameter")
    ax1.set_title(f"training memory per parameter, precision '{precision}'", fontsize=9)
    for gb, label in ((16, "T4 16 GB"), (80, "A100 80 GB")):
        ax2.axhline(gb, linestyle="--", color="grey", linewidth=1)
        ax2.annotate(label, (0.99, gb), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                     ha="right", va="bottom")
    ax2.set_ylabel("GB (decimal)")
    ax2.set_title("the notes' 7B / 8B bills and what changes them", fontsize=9)
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main, CHAPTER)

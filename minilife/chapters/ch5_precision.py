"""Chapter 5.2: fp16 vs bf16 -- the same 16 bits, different ranges, and what that does to gradients.

    python -m minilife.chapters.ch5_precision            # ~60 s on 2 cores (--smoke: ~5 s)

prints the fp32/fp16/bf16 format table, the share of gradient entries fp16 flushes to zero at each loss
scale, and fp32 / bf16 / fp16 (static and dynamic loss scaling) training side by side; PNGs and
summary.json in runs/ch5_precision/.

What it implements
- The format table (``torch.finfo`` plus the smallest subnormal, found with ``torch.nextafter``):
  fp16 has 5 exponent / 10 mantissa bits (max 65504, smallest normal 2^-14, subnormal 2^-24),
  bf16 has 8 / 7 (fp32's range, max ~3.4e38, but eps 2^-7 instead of 2^-10).
- Gradient underflow, measured on a real model: a tiny GPT trained a few fp32 steps, one batch,
  forward and backward under ``torch.autocast`` (weights stay fp32; matmuls and their backward run
  in the 16-bit type -- the usual mixed-precision recipe). The loss is multiplied by 2^-e to move
  the gradients down to where a larger model's sit (a mean over a batch 2^e times bigger divides
  every logit gradient by 2^e; deeper nets shrink them further). Counted: the fraction of gradient
  entries that are non-zero in fp32 but exactly zero from fp16 (flushed), with no loss scaling,
  with a static loss scale S (multiply the loss by S, divide the fp32 gradients by S), and under
  bf16 with no scaling. A plain cast of the fp32 gradient to fp16 is shown beside it (the storage
  effect alone).
- ``DynamicLossScaler`` written out (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2;
  the policy of torch.amp.GradScaler): multiply the loss by S; after backward divide the gradients by
  S and check them; any inf/NaN -> skip the step and halve S; after ``growth_interval`` good steps
  double S. A short training run compares fp32, bf16 (no scaler), fp16 without scaling and fp16 with
  the dynamic scaler on the same batches.

On CPU: autocast to fp16 works in torch 2.x, but fp16 matmuls are slow on most CPUs (no native
fp16 arithmetic; they are emulated or converted), so runs are small. If fp16 autocast is not supported
for an op on this build/device, the underflow table falls back to casting the fp32 gradient (and
says so).

What it leaves out: fp8 (E4M3/E5M2 need per-tensor scaling), stochastic rounding, Kahan-summed bf16
weights (bf16 *weights* lose small updates to rounding; here weights stay fp32).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from minilife.artifacts import ensure_data, load_token_data
from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, start_run,
                             write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import cli
from minilife.model.transformer import GPT, PRESETS, ModelConfig
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.loss_scale import DynamicLossScaler
from minilife.train import BatchSource

CHAPTER = "ch5_precision"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PrecisionConfig(RunConfig):
    """fp16 vs bf16: ranges, fp16 gradient underflow, loss scaling (static and dynamic), bf16 needing none."""
    seed: int = cli_field(0, "seed")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    data_dir: Optional[str] = cli_field(None, "ch2_data output dir, built if missing (default runs/ch2_data[-smoke]/)")
    preset: str = cli_field("tiny", "ModelConfig preset", smoke="micro")
    batch_size: int = cli_field(8, "sequences per batch")
    context_length: int = cli_field(64, "tokens per sequence", smoke=32)
    warm_steps: int = cli_field(30, "fp32 steps before measuring gradients", smoke=3)
    shrink_exponents: list[int] = cli_field([0, 8, 12, 16, 20], "e values: the loss is multiplied by 2^-e")
    static_scale_exponent: int = cli_field(16, "static loss scale S = 2^this")
    train_steps: int = cli_field(40, "steps of the fp32/bf16/fp16 training comparison", smoke=10)
    train_shrink_exponent: int = cli_field(16, "e of the training comparison (gradients 2^-e of this batch's)")
    scaler_init_exponent: int = cli_field(40, "dynamic scaler starts at S = 2^this (too high on purpose: it must back "
                                              "off; the smoke run starts nearer, so its few steps show the rescue)",
                                          smoke=36)
    scaler_growth_interval: int = cli_field(10, "good steps before the dynamic scaler doubles S")
    lr: float = cli_field(2e-3, "AdamW learning rate")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(batch_size=1, context_length=1, warm_steps=0, train_steps=1,
                                        scaler_growth_interval=1), above=dict(lr=0), choices={"preset": PRESETS})
        if not self.shrink_exponents:
            raise ValueError("--shrink-exponents needs at least one value")


def format_table() -> list[dict]:
    """One row per format: bits, exponent/mantissa split, max, smallest normal/subnormal, eps."""
    rows = []
    for name, dtype in DTYPES.items():
        fi = torch.finfo(dtype)
        mantissa = int(round(-math.log2(fi.eps)))
        subnormal = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)).item()
        rows.append({"format": name, "bits": fi.bits, "exponent_bits": fi.bits - 1 - mantissa,
                     "mantissa_bits": mantissa, "max": fi.max, "smallest_normal": fi.smallest_normal,
                     "smallest_subnormal": subnormal, "eps": fi.eps})
    return rows


# --------------------------------------------------------------------------------------------
# gradients under autocast


def autocast_grads(model: GPT, batch, dtype: torch.dtype, loss_mult: float) -> list[torch.Tensor]:
    """fp32 copies of the parameter gradients (each shaped like its parameter) of (mean loss * loss_mult)
    on ``batch`` (inputs, targets (B, T)), forward/backward under autocast to ``dtype`` (none for float32)."""
    device = batch.inputs.device
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(batch.inputs, batch.targets, **batch.attention)
    (loss.float() * loss_mult).backward()
    grads = [p.grad.detach().float().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def flush_stats(reference: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Over pairs of same-shaped tensors: the fraction of reference-non-zero entries that are zero in
    ``got``, the fraction of non-finite entries, and the relative L2 error over the finite entries."""
    nonzero = sum(int((r != 0).sum()) for r in reference)
    flushed = sum(int(((r != 0) & (g == 0)).sum()) for r, g in zip(reference, got))
    total = sum(r.numel() for r in reference)
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in got)
    err = sum(float(((g - r)[torch.isfinite(g)].double() ** 2).sum()) for r, g in zip(reference, got))
    ref = sum(float((r.double() ** 2).sum()) for r in reference)
    return {"flushed_fraction": flushed / max(nonzero, 1), "nonfinite_fraction": nonfinite / total,
            "rel_error": math.sqrt(err / ref) if ref > 0 else float("nan")}


def underflow_table(model: GPT, batch, exponents: list[int], static_scale: float) -> tuple[list[dict], bool]:
    """Per shrink exponent e: flush statistics of fp16 (cast / autocast / autocast + static scale)
    and bf16 autocast. Returns (rows, whether fp16 autocast ran)."""
    reference = autocast_grads(model, batch, torch.float32, 1.0)
    fp16_autocast = True
    rows = []
    for e in exponents:
        shrink = 2.0 ** -e  # exact in binary floating point
        ref = [r * shrink for r in reference]
        row = {"e": e, "fp16_cast": flush_stats(ref, [r.half().float() for r in ref])}
        if fp16_autocast:
            try:
                row["fp16"] = flush_stats(ref, autocast_grads(model, batch, torch.float16, shrink))
                scaled = autocast_grads(model, batch, torch.float16, shrink * static_scale)
                row["fp16_static_scale"] = flush_stats(ref, [g / static_scale for g in scaled])
            except RuntimeError as err:  # an op without an fp16 kernel on this device
                print(f"[{CHAPTER}] fp16 autocast unsupported here ({str(err).splitlines()[0]}); "
                      f"falling back to casting fp32 gradients")
                fp16_autocast = False
        if not fp16_autocast:
            row["fp16"] = row["fp16_cast"]
            row["fp16_static_scale"] = flush_stats(ref, [(r * static_scale).half().float() / static_scale for r in ref])
        row["bf16"] = flush_stats(ref, autocast_grads(model, batch, torch.bfloat16, shrink))
        rows.append(row)
    return rows, fp16_autocast


def train_mixed(model: GPT, source: BatchSource, steps: int, lr: float, dtype: torch.dtype, shrink: float,
                scaler: DynamicLossScaler | None) -> dict:
    """Train under autocast to ``dtype`` on the loss * ``shrink`` (gradients divided back by ``shrink``
    in fp32, so every run's optimizer sees the same-sized numbers); optional dynamic loss scaling."""
    opt = AdamW(model.param_groups(0.1), lr=lr, betas=(0.9, 0.95))
    device = next(model.parameters()).device
    losses, scales, skipped_steps = [], [], []
    for step in range(steps):
        b = source.micro_batch(step)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(b.inputs, b.targets, **b.attention)
        scaled = loss.float() * shrink
        (scaler.scale(scaled) if scaler else scaled).backward()
        finite = scaler.unscale_(model.parameters()) if scaler else True
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(shrink)
        losses.append(loss.item())
        scales.append(scaler.scale_value if scaler else 1.0)
        if finite:
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
        else:
            skipped_steps.append(step)
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.update(finite)
    return {"losses": losses, "scales": scales, "skipped_steps": skipped_steps}


# --------------------------------------------------------------------------------------------


def _fmt_row(r: dict) -> str:
    return (f"| {r['format']} | {r['bits']} | {r['exponent_bits']} | {r['mantissa_bits']} | {r['max']:.6g} | "
            f"{r['smallest_normal']:.4g} | {r['smallest_subnormal']:.4g} | {r['eps']:.4g} |")


def main(argv: list[str] | None = None) -> dict:
    cfg: PrecisionConfig = config_from_args(PrecisionConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    preset, t, warm, n_train = cfg.preset, cfg.context_length, cfg.warm_steps, cfg.train_steps
    out, device = start_run(CHAPTER, cfg)
    data_dir = ensure_data(cfg.smoke, cfg.data_dir)
    tokenizer, train_tokens, _ = load_token_data(data_dir)
    logger = MetricsLogger(out / "metrics.jsonl")

    formats = format_table()
    print(f"[{CHAPTER}] the three formats\n| format | bits | exponent | mantissa | max | smallest normal | "
          f"smallest subnormal | eps |\n|---|---|---|---|---|---|---|---|")
    for r in formats:
        print(_fmt_row(r))
        logger.log(part="formats", **r)

    # a model that has started learning, and one batch to take gradients on
    model = GPT(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size, context_length=t)).to(device)
    source = BatchSource(train_tokens, cfg.batch_size, t, seed=cfg.seed, device=device)
    train_mixed(model, source, warm, cfg.lr, torch.float32, 1.0, None)  # plain fp32 steps
    batch = source.micro_batch(10_000)
    S = 2.0 ** cfg.static_scale_exponent
    print(f"\n[{CHAPTER}] gradient entries flushed to zero ({preset} model after {warm} fp32 steps, loss x 2^-e; "
          f"static scale S = 2^{cfg.static_scale_exponent})")
    table, fp16_ran = underflow_table(model, batch, cfg.shrink_exponents, S)
    print("| e | fp16 cast of fp32 grad | fp16 autocast | fp16 autocast x S | bf16 autocast | "
          "fp16 x S non-finite |\n|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['e']} | {row['fp16_cast']['flushed_fraction']:.2%} | {row['fp16']['flushed_fraction']:.2%} | "
              f"{row['fp16_static_scale']['flushed_fraction']:.2%} | {row['bf16']['flushed_fraction']:.2%} | "
              f"{row['fp16_static_scale']['nonfinite_fraction']:.2%} |")
        logger.log(part="underflow", **row)
    if not fp16_ran:
        print("(fp16 columns come from casting fp32 gradients: fp16 autocast is unsupported on this device)")

    # training: fp32 vs bf16 vs fp16 without / with dynamic loss scaling, same init and batches
    shrink = 2.0 ** -cfg.train_shrink_exponent
    print(f"\n[{CHAPTER}] {n_train} training steps at gradient size x 2^-{cfg.train_shrink_exponent}, same init and batches")
    runs = {}
    for name, dtype, scaler in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                ("fp16, no scaling", torch.float16, None),
                                ("fp16, dynamic scaling", torch.float16,
                                 DynamicLossScaler(2.0 ** cfg.scaler_init_exponent,
                                                   growth_interval=cfg.scaler_growth_interval))):
        runs[name] = train_mixed(copy.deepcopy(model), source, n_train, cfg.lr, dtype, shrink, scaler)
        r = runs[name]
        logger.log(part="training", run=name, **r)
        print(f"  {name:22s} loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}; skipped steps {len(r['skipped_steps'])}"
              + (f"; final scale 2^{math.log2(r['scales'][-1]):.0f}" if scaler else ""))
    logger.close()
    steps_axis = range(1, n_train + 1)
    plot_lines(out / "loss.png", {name: (steps_axis, r["losses"]) for name, r in runs.items()},
               title=f"training with gradients x 2^-{cfg.train_shrink_exponent}", xlabel="step", ylabel="train loss")
    plot_lines(out / "loss_scale.png", {"dynamic loss scale": (steps_axis, runs["fp16, dynamic scaling"]["scales"])},
               points={"skipped (overflow)": (
                   [s + 1 for s in runs["fp16, dynamic scaling"]["skipped_steps"]],
                   [runs["fp16, dynamic scaling"]["scales"][s] for s in runs["fp16, dynamic scaling"]["skipped_steps"]])},
               title="dynamic loss scale", xlabel="step", ylabel="S", logy=True)

    summary = {"chapter": CHAPTER, "formats": formats, "underflow": table, "fp16_autocast_ran": fp16_ran,
               "static_scale": S, "training": {n: {"first_loss": r["losses"][0], "last_loss": r["losses"][-1],
                                                  "skipped_steps": len(r["skipped_steps"]), "final_scale": r["scales"][-1]}
                                              for n, r in runs.items()},
               "data_dir": str(data_dir), "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

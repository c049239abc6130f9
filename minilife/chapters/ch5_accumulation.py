"""Chapter 5.3: gradient accumulation gives the big batch's update -- if you normalise by tokens.

    python -m minilife.chapters.ch5_accumulation            # ~15 s on 2 cores (--smoke: ~5 s)

prints a table of loss and gradient differences against one big batch (float64): token-weighted
accumulation at a few eps, the naive per-micro-batch mean off on ragged batches; weight_drift.png
and summary.json in runs/ch5_accumulation/.

What it implements
- The claim: k micro-batches of b sequences, each backpropagated and summed into ``.grad`` before a
  single optimizer step, give the same update as one batch of k*b sequences (global batch = micro
  batch x data-parallel ranks x accumulation steps; here one rank).
- The exact check, in float64 (so only summation order differs: a few float64 eps of 2.2e-16, ~1e-15
  relative in the smoke run): the reference is one big batch through the model and
  ``F.cross_entropy(..., reduction="mean")`` -- torch's mean over all non-ignored tokens -- against
  the token-weighted recipe (what ch2_pretrain runs: each micro-batch's summed loss divided by
  the token count of the *whole* step). Gradients and the weights after several AdamW steps are
  compared.
- The trap: with ragged micro-batches (padding, SFT prompt masks, documents of different lengths)
  the number of scored tokens differs between micro-batches. The naive recipe -- mean loss per
  micro-batch, divided by k -- then weights a token in a short micro-batch more than one in a long
  one. It is right only when every micro-batch has the same token count; both numbers are printed.

Follows no paper: the identity is sum_i (S_i / N) = (sum_i S_i) / N with S_i the summed token loss of
micro-batch i and N the scored tokens of the whole step (the mean torch's cross-entropy takes).

What it leaves out: accumulation across data-parallel ranks (the same normalisation with an
all-reduced token count; see ch2_parallel), and the LR/batch-size coupling (a bigger effective batch
usually wants a retuned LR; here both sides use the same LR, so they must agree).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from minilife.artifacts import ensure_data, load_token_data
from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, start_run,
                             write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import cli
from minilife.model.objectives import ObjectiveBatch
from minilife.model.transformer import GPT, PRESETS, ModelConfig
from minilife.train import IGNORE_INDEX, BatchSource, batch_loss_sum, n_targets
from minilife.optim.adamw import AdamW

CHAPTER = "ch5_accumulation"


@dataclass
class AccumulationConfig(RunConfig):
    """k micro-batches equal one big batch (float64, exact); ragged micro-batches break the naive mean."""
    seed: int = cli_field(0, "seed for init, batches and ragged lengths")
    device: str = cli_field("auto", "auto | cpu | cuda (float64 is needed: mps falls back to cpu)")
    data_dir: Optional[str] = cli_field(None, "ch2_data output dir, built if missing (default runs/ch2_data[-smoke]/)")
    preset: str = cli_field("micro", "ModelConfig preset (vocab and context come from the data and flags)")
    micro_batches: int = cli_field(4, "k: micro-batches per optimizer step")
    micro_batch_size: int = cli_field(4, "b: sequences per micro-batch")
    context_length: int = cli_field(64, "tokens per sequence T", smoke=32)
    steps: int = cli_field(10, "optimizer steps compared", smoke=3)
    lr: float = cli_field(1e-3, "AdamW learning rate (same on every side)")
    shortest: float = cli_field(0.1, "ragged case: the shortest micro-batch keeps this fraction of its tokens")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(micro_batches=2, micro_batch_size=1, context_length=4, steps=1),
                    above=dict(lr=0), choices={"preset": PRESETS})
        if not 0.0 < self.shortest <= 1.0:
            raise ValueError(f"--shortest must be in (0, 1], got {self.shortest}")


# --------------------------------------------------------------------------------------------
# the three ways to get one step's gradient


def concat_batches(micro: list[ObjectiveBatch]) -> ObjectiveBatch:
    """k micro-batches (b, T) -> one big batch (k*b, T) (causal attention)."""
    return ObjectiveBatch(torch.cat([m.inputs for m in micro]), torch.cat([m.targets for m in micro]),
                          {"attn_mask": "causal"})


def big_batch_backward(model: GPT, micro: list[ObjectiveBatch]) -> float:
    """The reference: the k micro-batches concatenated into one forward, torch's mean cross-entropy
    over all of its scored tokens."""
    big = concat_batches(micro)
    logits, _ = model(big.inputs, **big.attention)  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), big.targets.reshape(-1),  # (B*T, V), (B*T,)
                           ignore_index=IGNORE_INDEX, reduction="mean")
    loss.backward()
    return loss.item()


def naive_mean_backward(model: GPT, micro: list[ObjectiveBatch]) -> float:
    """The common mistake: each micro-batch's *mean* loss divided by k. Equal to the big batch only
    when every micro-batch scores the same number of tokens."""
    total = 0.0
    for m in micro:
        _, loss = model(m.inputs, m.targets, ignore_index=IGNORE_INDEX, reduction="mean", **m.attention)
        (loss / len(micro)).backward()
        total += loss.item() / len(micro)
    return total


def token_weighted_backward(model: GPT, micro: list[ObjectiveBatch]) -> float:
    """ch2_pretrain's recipe: each micro-batch's *summed* token loss divided by the scored tokens of
    the whole step, N = sum_i N_i; then sum_i S_i / N = (sum_i S_i) / N, the big batch's mean."""
    n_total = sum(n_targets(m) for m in micro)
    total = 0.0
    for m in micro:
        loss_sum = batch_loss_sum(model, m)
        (loss_sum / n_total).backward()
        total += loss_sum.item()
    return total / n_total


METHODS = {"big batch": big_batch_backward, "token-weighted": token_weighted_backward,
           "naive mean": naive_mean_backward}


def make_ragged(micro: list[ObjectiveBatch], shortest: float, pad_id: int,
                generator: torch.Generator) -> list[ObjectiveBatch]:
    """k micro-batches (b, T) -> k micro-batches (b, T) with padded tails: micro-batch j keeps a length
    fraction going linearly from 1 (j=0) down to ``shortest`` (j=k-1), +-10% per row. Padded inputs
    become ``pad_id``, their targets -100."""
    out, k = [], len(micro)
    for j, m in enumerate(micro):
        b, t = m.inputs.shape
        frac = 1.0 - (1.0 - shortest) * j / max(k - 1, 1)
        jitter = 1.0 + 0.2 * (torch.rand(b, generator=generator) - 0.5)  # (b,)
        lengths = (frac * jitter * t).round().clamp(1, t).long()  # (b,) real tokens per row
        pad = torch.arange(t).unsqueeze(0) >= lengths.unsqueeze(1)  # (b, T) True where padding
        pad = pad.to(m.inputs.device)
        out.append(ObjectiveBatch(m.inputs.masked_fill(pad, pad_id), m.targets.masked_fill(pad, IGNORE_INDEX),
                                  dict(m.attention)))
    return out


def grads_of(model: GPT) -> list[torch.Tensor]:
    """Copies of every parameter's .grad (each shaped like its parameter)."""
    return [p.grad.detach().clone() for p in model.parameters()]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |x - y| over pairs of same-shaped tensors."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def compare_step(model: GPT, micro: list[ObjectiveBatch]) -> dict:
    """Loss and gradient of each method from the same weights; differences against the big batch."""
    results = {}
    for name, backward in METHODS.items():
        model.zero_grad(set_to_none=True)
        loss = backward(model, micro)
        results[name] = (loss, grads_of(model))
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = results["big batch"]
    scale = max(float(g.abs().max()) for g in ref_grads)
    return {name: {"loss": loss, "ref_loss": ref_loss, "max_abs_grad_diff": max_abs_diff(grads, ref_grads),
                   "rel_grad_diff": max_abs_diff(grads, ref_grads) / scale}
            for name, (loss, grads) in results.items() if name != "big batch"}


def train_side_by_side(model: GPT, micro_steps: list[list[ObjectiveBatch]], lr: float) -> dict[str, list[float]]:
    """Train one copy per method on the same micro-batches; after each step record each copy's
    max |w - w_big| (the big-batch copy is the reference)."""
    copies = {name: copy.deepcopy(model) for name in METHODS}
    optims = {name: AdamW(m.parameters(), lr=lr, weight_decay=0.0) for name, m in copies.items()}
    drift: dict[str, list[float]] = {name: [] for name in METHODS if name != "big batch"}
    for micro in micro_steps:
        for name, m in copies.items():
            METHODS[name](m, micro)
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
        with torch.no_grad():
            ref = list(copies["big batch"].parameters())
            for name in drift:
                drift[name].append(max(float((p - r).abs().max()) for p, r in zip(copies[name].parameters(), ref)))
    return drift


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg: AccumulationConfig = config_from_args(AccumulationConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    steps, t = cfg.steps, cfg.context_length
    out, device = start_run(CHAPTER, cfg)
    if device.type == "mps":
        print(f"[{CHAPTER}] MPS has no float64; running on cpu")
        device = torch.device("cpu")
    data_dir = ensure_data(cfg.smoke, cfg.data_dir)
    tokenizer, train_tokens, _ = load_token_data(data_dir)
    model = GPT(ModelConfig.preset(cfg.preset, vocab_size=tokenizer.vocab_size, context_length=t)).to(device).double()
    src = BatchSource(train_tokens, cfg.micro_batch_size, t, seed=cfg.seed, device=device)
    k = cfg.micro_batches
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    g = torch.Generator().manual_seed(cfg.seed)
    equal = [[src.micro_batch(s * k + i) for i in range(k)] for s in range(steps)]
    ragged = [make_ragged(micro, cfg.shortest, pad_id, g) for micro in equal]
    print(f"[{CHAPTER}] float64 {cfg.preset} model; k={k} micro-batches of {cfg.micro_batch_size}x{t} "
          f"vs one batch of {k * cfg.micro_batch_size}x{t}; {steps} AdamW steps (lr {cfg.lr:g})")
    print(f"[{CHAPTER}] ragged tokens per micro-batch (step 0): {[n_targets(m) for m in ragged[0]]} "
          f"(equal case: {[n_targets(m) for m in equal[0]]})")

    rows, logger = [], MetricsLogger(out / "metrics.jsonl")
    drifts = {}
    for case, micro_steps in (("equal", equal), ("ragged", ragged)):
        first = compare_step(model, micro_steps[0])
        drift = train_side_by_side(model, micro_steps, cfg.lr)
        for method, r in first.items():
            row = {"case": case, "method": method, "loss_big_batch": r["ref_loss"], "loss_accumulated": r["loss"],
                   "max_abs_grad_diff": r["max_abs_grad_diff"], "rel_grad_diff": r["rel_grad_diff"],
                   "max_abs_weight_diff": drift[method][-1]}
            rows.append(row)
            logger.log(**row, weight_diff_per_step=drift[method])
            drifts[f"{case}, {method}"] = drift[method]
    logger.close()

    print(f"\n| micro-batches | method | loss (big batch) | loss (accumulated) | max abs grad diff | "
          f"rel grad diff | max abs weight diff after {steps} steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['method']} | {r['loss_big_batch']:.12f} | {r['loss_accumulated']:.12f} | "
              f"{r['max_abs_grad_diff']:.2e} | {r['rel_grad_diff']:.2e} | {r['max_abs_weight_diff']:.2e} |")
    floor = 1e-18  # log plot: an exact 0 is drawn at the floor
    plot_lines(out / "weight_drift.png",
               {name: (range(1, steps + 1), [max(d, floor) for d in drift]) for name, drift in drifts.items()},
               title="max |w - w_big batch| (float64)", xlabel="optimizer step", ylabel="max abs diff", logy=True)
    worst = {m: max(r["rel_grad_diff"] for r in rows if r["method"] == m and (m != "naive mean" or r["case"] == "ragged"))
             for m in ("token-weighted", "naive mean")}
    summary = {"chapter": CHAPTER, "micro_batches": k, "steps": steps, "dtype": "float64", "rows": rows,
               "worst_rel_grad_diff": worst, "data_dir": str(data_dir), "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] largest relative gradient error: token-weighted {worst['token-weighted']:.1e} (float64 "
          f"eps is 2.2e-16; summation order alone leaves a few eps), "
          f"naive mean on ragged micro-batches {worst['naive mean']:.1e}. Wrote {out}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

"""Chapter 2: pretraining the tiny GPT on the world's wiki, the training loop written out.

What it implements (read ``main`` top to bottom; it is the loop)
- data: ``ch2_data.ensure_data`` gives the tokenizer and the packed uint16 shards; every micro-batch
  is a pure function of (seed, micro-batch index) (``BatchSource``), so the data position is one
  integer and a resumed run sees exactly the batches the uninterrupted one would have seen.
- model: ``ModelConfig.preset(--preset)`` with flag overrides; the vocabulary always comes from the
  tokenizer (a mismatch between shards, tokenizer and model is an error naming both numbers).
- objectives: causal LM (predict every next token), prefix LM (bidirectional prefix, loss on the
  suffix only; Raffel et al. 2020 sec. 3.2.1) and masked LM (predict ~15% masked tokens from both
  sides; Devlin et al. 2019). Each is evaluated on its *own* objective, and those val losses are
  not comparable: they average over different token sets (all tokens / suffix tokens / masked
  tokens) given different information (left context / prefix + left / both sides). MLM scores only
  the ~15% masked positions (about 7x fewer training signals per step, so it learns slower at a
  fixed step budget) while seeing both neighbours -- and it cannot generate left to right at all.
- optimisation: AdamW (Loshchilov & Hutter 2019) with decay only on 2-D weights, linear warmup then
  cosine decay (``warmup_cosine_lr``), global-norm clipping (the pre-clip norm is logged),
  gradient accumulation with *token-weighted* normalisation: every micro-batch's loss is a sum
  over its scored tokens divided by the number of scored tokens in the whole optimizer step, so k
  micro-batches give exactly the gradient of one big batch even when they hold different numbers of
  real tokens (chapter 5 shows the naive per-micro-batch mean going wrong).
- precision: ``--precision bf16`` runs forward/backward under ``torch.autocast`` (weights, grads
  and optimizer state stay fp32; bf16 has fp32's exponent range, so no loss scaling).
- evaluation: token-weighted val loss and perplexity exp(loss) on fixed val batches, printed beside
  the unigram baseline H(p) = -sum_v p_v ln p_v of the training tokens (the loss of the best model
  that ignores context) and ln V (uniform guessing); sample generations from a prompt.
- bookkeeping: tqdm, ``metrics.jsonl``, loss / LR / grad-norm PNGs, ``summary.json``, rotating
  checkpoints (``ckpt_stepNNNNNN.pt`` + ``last.pt``) holding weights, optimizer moments, step, RNG
  states and data position; ``--resume`` continues bit-for-bit; a NaN/inf loss stops the run
  naming the step and the last good checkpoint, which is never overwritten.

The pieces of a step (batches, accumulation, the guarded optimizer step, evaluation) live in
``minilife.chapters.loop``, shared with chapter 5; this module wires them into the run.

What it leaves out: data/tensor parallelism (``ch2_parallel``), torch.compile, fp16 (chapter 5 shows
why it needs loss scaling), sequence packing with document masks (documents are separated by the
end-of-text token and windows may straddle them, as in GPT-2).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from tqdm import tqdm

from minilife.chapters.loop import (BatchSource, check_flags, evaluate, load_data, mlm_mask_id, optimizer_step,
                                    sample_text, unigram_entropy)
from minilife.checkpoint import (CheckpointError, NonFiniteLossError, latest_checkpoint, load_checkpoint,
                                 read_checkpoint, save_rotating)
from minilife.common import (MetricsLogger, chapter_dir, cli_field, config_from_args, fmt_count, pick_device,
                             plot_lines, read_jsonl, seed_everything, write_json_atomic)
from minilife.data.bpe import Tokenizer
from minilife.model.transformer import GPT, ModelConfig
from minilife.optim.adamw import AdamW
from minilife.optim.schedule import warmup_cosine_lr

CHAPTER = "ch2_pretrain"

# Defaults that differ between the real run and --smoke; a flag left at None takes them.
_DEFAULTS = {
    False: dict(n_layer=4, n_head=4, n_embd=128, context_length=128, batch_size=16, max_steps=500,
                warmup_steps=40, eval_every=100, eval_batches=16, ckpt_every=100),
    True: dict(n_layer=2, n_head=2, n_embd=64, context_length=64, batch_size=8, max_steps=30,
               warmup_steps=5, eval_every=10, eval_batches=4, ckpt_every=10),
}


@dataclass
class PretrainConfig:
    """Pretrain the tiny GPT on the world's wiki: loss falling, val perplexity vs the unigram baseline."""
    smoke: bool = cli_field(False, "CI-sized run, seconds")
    out: Optional[str] = cli_field(None, "output dir (default runs/ch2_pretrain/, or runs/ch2_pretrain-smoke/)")
    seed: int = cli_field(1337, "seed for init, data order, dropout and masking")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    data_dir: Optional[str] = cli_field(None, "ch2_data output (tokenizer.json + shards/); built if missing")
    preset: str = cli_field("tiny", "ModelConfig preset the size flags below override")
    n_layer: Optional[int] = cli_field(None, "transformer blocks (default 4; smoke 2)")
    n_head: Optional[int] = cli_field(None, "attention heads (default 4; smoke 2)")
    n_embd: Optional[int] = cli_field(None, "model width C (default 128; smoke 64)")
    context_length: Optional[int] = cli_field(None, "tokens per sequence T (default 128; smoke 64)")
    dropout: float = cli_field(0.0, "dropout probability (0 for short pretraining runs)")
    attn_impl: Literal["math", "sdpa", "triton"] = cli_field("sdpa", "attention path")
    gradient_checkpointing: bool = cli_field(False, "recompute block activations in backward (chapter 5)")
    objective: Literal["causal", "prefix", "mlm"] = cli_field("causal", "training objective")
    batch_size: Optional[int] = cli_field(None, "sequences per micro-batch B (default 16; smoke 8)")
    grad_accum: int = cli_field(1, "micro-batches per optimizer step")
    max_steps: Optional[int] = cli_field(None, "optimizer steps (default 500; smoke 30)")
    lr: float = cli_field(3e-3, "peak learning rate")
    min_lr: float = cli_field(3e-4, "learning rate at the end of the cosine")
    warmup_steps: Optional[int] = cli_field(None, "linear warmup steps (default 40; smoke 5)")
    weight_decay: float = cli_field(0.1, "AdamW decoupled weight decay on 2-D weights")
    beta1: float = cli_field(0.9, "AdamW beta1")
    beta2: float = cli_field(0.95, "AdamW beta2")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm to this (0 = no clipping)")
    precision: Literal["fp32", "bf16"] = cli_field("fp32", "fp32, or bf16 autocast for forward/backward")
    eval_every: Optional[int] = cli_field(None, "steps between val evaluations (default 100; smoke 10)")
    eval_batches: Optional[int] = cli_field(None, "val micro-batches per evaluation (default 16; smoke 4)")
    ckpt_every: Optional[int] = cli_field(None, "steps between checkpoints (default 100; smoke 10)")
    keep_checkpoints: int = cli_field(2, "numbered checkpoints kept (last.pt always points at the newest)")
    prompt: str = cli_field("From:", "prompt for sample generations")
    sample_tokens: int = cli_field(48, "tokens to generate per sample (at each evaluation and at the end)")
    plots: bool = cli_field(True, "write loss / LR / grad-norm PNGs at the end")
    resume: bool = cli_field(False, "continue from the run dir's last checkpoint")
    stop_after: Optional[int] = cli_field(None, "stop (as if killed) once this many steps are done")
    nan_at_step: Optional[int] = cli_field(None, "fault injection: make the loss NaN at this step")

    def __post_init__(self):
        check_flags(self, at_least=dict(grad_accum=1, keep_checkpoints=1, n_layer=1, n_head=1, n_embd=1,
                                        context_length=1, batch_size=1, max_steps=1, eval_every=1, eval_batches=1,
                                        ckpt_every=1, weight_decay=0, grad_clip=0, sample_tokens=0, stop_after=1,
                                        nan_at_step=0), presets=("preset",))
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):  # written so that NaN fails too
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        for name, lo, hi in (("dropout", 0.0, 1.0), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0)):
            if not lo <= getattr(self, name) < hi:
                raise ValueError(f"--{name} must be in [{lo:g}, {hi:g}), got {getattr(self, name)}")
        max_steps = self.max_steps if self.max_steps is not None else _DEFAULTS[self.smoke]["max_steps"]
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= max_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be in [0, --max-steps {max_steps}]")

    def resolved(self) -> "PretrainConfig":
        """A copy with every None size/schedule flag replaced by its default (smoke or real)."""
        fills = {k: v for k, v in _DEFAULTS[self.smoke].items() if getattr(self, k) is None}
        if "warmup_steps" in fills:  # a short run warms up less
            fills["warmup_steps"] = min(fills["warmup_steps"], fills.get("max_steps", self.max_steps))
        return dataclasses.replace(self, **fills)


# --------------------------------------------------------------------------------------------
# model and optimizer from the config


def build_model(cfg: PretrainConfig, vocab_size: int) -> GPT:
    """GPT from ``--preset`` plus the size flags; ``vocab_size`` comes from the tokenizer."""
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "context_length")
                 if getattr(cfg, k) is not None}
    model_cfg = dataclasses.replace(ModelConfig.preset(cfg.preset), vocab_size=vocab_size, dropout=cfg.dropout,
                                    attn_impl=cfg.attn_impl, gradient_checkpointing=cfg.gradient_checkpointing,
                                    **overrides)
    return GPT(model_cfg)


def build_optimizer(model: GPT, cfg: PretrainConfig) -> AdamW:
    """AdamW over the model's parameter groups (decay on 2-D weights only)."""
    return AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def checkpoint_identity(model: GPT, cfg: PretrainConfig) -> dict:
    """What must match for a checkpoint to be resumed into this run (compared field by field)."""
    return {"model": dataclasses.asdict(model.cfg), "objective": cfg.objective}


# --------------------------------------------------------------------------------------------
# the run


def plot_curves(out: Path, rows: list[dict], vals: list[dict], unigram: float, cfg: PretrainConfig) -> None:
    """loss.png (train, val, unigram line), lr.png, grad_norm.png from the metrics rows."""
    plot_lines(out / "loss.png", {"train loss": ([r["step"] for r in rows], [r["loss"] for r in rows]),
                                  "val loss": ([r["step"] for r in vals], [r["val_loss"] for r in vals])},
               hlines={f"unigram entropy {unigram:.2f}": unigram}, title=f"{CHAPTER}: {cfg.objective} loss",
               xlabel="step", ylabel="nats / token")
    plot_lines(out / "lr.png", {"learning rate": ([r["step"] for r in rows], [r["lr"] for r in rows])},
               title="warmup + cosine", xlabel="step", ylabel="LR")
    plot_lines(out / "grad_norm.png", {"pre-clip grad norm": ([r["step"] for r in rows], [r["grad_norm"] for r in rows])},
               hlines={"clip": cfg.grad_clip} if cfg.grad_clip > 0 else None, title="global gradient norm",
               xlabel="step", ylabel="L2 norm", logy=True)


def main(argv: list[str] | None = None) -> dict:
    cfg: PretrainConfig = config_from_args(PretrainConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    cfg = cfg.resolved()
    out = chapter_dir(CHAPTER, cfg.smoke, cfg.out)
    if cfg.resume and latest_checkpoint(out) is None:
        raise CheckpointError(f"--resume: no checkpoint in {out} (ckpt_step*.pt / last.pt); "
                              f"run without --resume to start fresh")
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    # 1. data and tokenizer
    data_dir, tokenizer, train_tokens, val_tokens = load_data(cfg.smoke, cfg.data_dir)
    vocab = tokenizer.vocab_size
    mlm = dict(mask_id=mlm_mask_id(tokenizer), vocab_size=vocab,
               special_ids=(tokenizer.eot_id,) if tokenizer.eot_id is not None else ()) if cfg.objective == "mlm" else {}
    train_src = BatchSource(train_tokens, cfg.batch_size, cfg.context_length, objective=cfg.objective,
                            seed=cfg.seed, stream=0, device=device, **mlm)
    val_src = BatchSource(val_tokens, cfg.batch_size, cfg.context_length, objective=cfg.objective,
                          seed=cfg.seed, stream=1, device=device, **mlm)
    unigram, uniform = unigram_entropy(train_tokens, vocab), math.log(vocab)

    # 2. model and optimizer
    model = build_model(cfg, vocab).to(device)
    optimizer = build_optimizer(model, cfg)
    identity = checkpoint_identity(model, cfg)
    tokens_per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum
    print(f"[{CHAPTER}] data {data_dir}: train {fmt_count(len(train_tokens))} / val {fmt_count(len(val_tokens))} "
          f"tokens, vocab {vocab}")
    print(f"[{CHAPTER}] model {model.cfg.n_layer}L {model.cfg.n_head}H C={model.cfg.n_embd} T={model.cfg.context_length}: "
          f"{fmt_count(model.num_params())} params ({fmt_count(model.num_params(non_embedding=True))} non-embedding); "
          f"objective {cfg.objective}, precision {cfg.precision}, device {device}")
    print(f"[{CHAPTER}] {cfg.max_steps} steps x {tokens_per_step} tokens ({cfg.grad_accum} micro-batches of "
          f"{cfg.batch_size}x{cfg.context_length}); LR {cfg.lr:g} warmup {cfg.warmup_steps} cosine to {cfg.min_lr:g}")
    print(f"[{CHAPTER}] baselines: uniform ln V = {uniform:.3f} nats, unigram entropy of the training tokens = "
          f"{unigram:.3f} nats (ppl {math.exp(unigram):.1f}): a model must use context to go below it")

    # 3. resume: weights, AdamW moments, RNG states and the data position
    start_step, last_good = 0, None
    if cfg.resume:
        last_good = latest_checkpoint(out)
        state = load_checkpoint(last_good, model=model, optimizer=optimizer, config=identity,
                                map_location=device)
        start_step = state["step"]
        if state["data_state"].get("micro_batches") != start_step * cfg.grad_accum:
            raise CheckpointError(f"{last_good}: data position {state['data_state'].get('micro_batches')} does not "
                                  f"match step {start_step} x grad_accum {cfg.grad_accum}; was --grad-accum changed?")
        print(f"[{CHAPTER}] resumed from {last_good} at step {start_step}")
    elif latest_checkpoint(out) is not None:
        print(f"[{CHAPTER}] note: {out} holds checkpoints of an earlier run; starting fresh (use --resume to continue)")

    def save(step: int) -> Path:
        return save_rotating(out, step=step, keep_last=cfg.keep_checkpoints, model=model, optimizer=optimizer,
                             config=identity, data_state={"micro_batches": step * cfg.grad_accum},
                             extra={"train": dataclasses.asdict(cfg), "data_dir": str(data_dir),
                                    "finished": step >= cfg.max_steps})

    # 4. the loop (a resumed run keeps its log up to the checkpoint; later rows were lost with the crash)
    model.train()
    kept = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and r["step"] <= start_step] if cfg.resume else []
    logger = MetricsLogger(out / "metrics.jsonl")
    for r in kept:
        logger.log(**r)
    end_step = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after is not None else cfg.max_steps
    val_loss, train_time, trained_tokens = float("nan"), 0.0, 0
    bar = tqdm(range(start_step, end_step), initial=start_step, total=cfg.max_steps, desc=CHAPTER,
               mininterval=1.0, disable=None)
    try:
        for step in bar:
            lr = warmup_cosine_lr(step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                                  min_lr=cfg.min_lr)
            micro = [train_src.micro_batch(step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
            if cfg.nan_at_step is not None and step == cfg.nan_at_step:  # fault injection: a blow-up
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))  # every logit, hence the loss, turns NaN
            t0 = time.perf_counter()
            try:
                res = optimizer_step(model, optimizer, micro, lr=lr, grad_clip=cfg.grad_clip,
                                     precision=cfg.precision, step=step, last_good=last_good)
            except NonFiniteLossError as e:
                logger.log(step=step, event="non-finite", message=str(e))
                raise
            train_time += time.perf_counter() - t0
            trained_tokens += tokens_per_step  # input tokens through forward+backward (MLM scores ~15% of them)
            done = step + 1
            row = {"step": done, "loss": res.loss, "lr": lr, "grad_norm": res.grad_norm, "scored_tokens": res.n_tokens}
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss = evaluate(model, val_src, cfg.eval_batches, cfg.precision)
                row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                tqdm.write(f"step {done:5d}  train {res.loss:.3f}  val {val_loss:.3f} (ppl {math.exp(val_loss):.1f})  "
                           f"unigram {unigram:.3f}  grad-norm {res.grad_norm:.2f}  lr {lr:.2e}")
                if cfg.objective != "mlm" and cfg.sample_tokens > 0:  # what the model writes at this point
                    row["sample"] = sample_text(model, tokenizer, cfg.prompt, cfg.sample_tokens, seed=cfg.seed)
                    tqdm.write(f"           sample: {row['sample']!r}")
            logger.log(**row)
            bar.set_postfix(loss=f"{res.loss:.3f}", refresh=False)
            if done % cfg.ckpt_every == 0 or done == end_step:
                last_good = save(done)
    finally:
        bar.close()
        logger.close()
    final_step = end_step if end_step > start_step else start_step

    # 5. plots, samples and summary (from the whole metrics log, so a resumed run plots all of it)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    if cfg.plots:
        plot_curves(out, rows, vals, unigram, cfg)
    samples = []
    if cfg.objective != "mlm":  # an MLM is not a left-to-right generator
        samples = [sample_text(model, tokenizer, cfg.prompt, cfg.sample_tokens, seed=cfg.seed + i) for i in range(2)]
        for s in samples:
            print(f"[{CHAPTER}] sample: {s!r}")
    if vals:
        val_loss = vals[-1]["val_loss"]
    summary = {
        "chapter": CHAPTER, "objective": cfg.objective, "steps": final_step, "max_steps": cfg.max_steps,
        "finished": final_step >= cfg.max_steps, "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None, "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) else None,
        "unigram_entropy": unigram, "uniform_entropy": uniform,
        "beats_unigram": bool(math.isfinite(val_loss) and val_loss < unigram),
        "params": model.num_params(), "tokens_per_step": tokens_per_step,
        "train_tokens_per_s": trained_tokens / train_time if train_time > 0 else None,
        "checkpoint": str(last_good) if last_good else None, "data_dir": str(data_dir), "samples": samples,
        "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    if math.isfinite(val_loss):
        print(f"[{CHAPTER}] val loss {val_loss:.3f} vs unigram {unigram:.3f} -> "
              f"{'beats' if summary['beats_unigram'] else 'does NOT beat'} the context-free baseline")
    if not summary["finished"]:
        print(f"[{CHAPTER}] stopped after step {final_step} of {cfg.max_steps}; continue with --resume")
    print(f"[{CHAPTER}] wrote {out}")
    return summary


# --------------------------------------------------------------------------------------------
# for later chapters


def ensure_pretrained(smoke: bool = False, run_dir: str | Path | None = None, data_dir: str | None = None) -> Path:
    """Path of a finished pretraining checkpoint (``last.pt``); trains (or finishes) one if missing.
    ``data_dir`` is passed on as ``--data-dir`` when it has to train."""
    out = chapter_dir(CHAPTER, smoke, run_dir)
    last = latest_checkpoint(out)
    if last is not None and read_checkpoint(last)["extra"].get("finished"):
        return out / "last.pt"
    args = ((["--smoke"] if smoke else []) + ["--out", str(out)] + (["--resume"] if last is not None else [])
            + (["--data-dir", str(data_dir)] if data_dir is not None else []))
    print(f"[{CHAPTER}] no finished pretrained checkpoint in {out}: "
          f"{'finishing' if last is not None else 'training'} one with {CHAPTER} {' '.join(args)}")
    main(args)
    return out / "last.pt"


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a ``ch2_pretrain`` checkpoint; the tokenizer must match the model's vocab."""
    path = Path(path)
    state = read_checkpoint(path)
    model = GPT(ModelConfig(**state["config"]["model"]))
    load_checkpoint(path, model=model, restore_rng=False)
    tok_path = Path(state["extra"]["data_dir"]) / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"{tok_path}: tokenizer vocab_size {tokenizer.vocab_size} does not match the model's "
                         f"vocab_size {model.cfg.vocab_size} in {path}")
    return model.to(device), tokenizer


if __name__ == "__main__":
    try:
        main()
    except (NonFiniteLossError, CheckpointError) as err:
        sys.exit(f"[{CHAPTER}] error: {err}")

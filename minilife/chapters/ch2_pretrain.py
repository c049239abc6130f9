"""Chapter 2: pretraining the tiny GPT on the world's wiki, the training loop written out.

    python -m minilife.chapters.ch2_pretrain            # ~1.5 min on 2 cores (--smoke: ~5 s)

prints the model and the baselines (ln V, the unigram entropy of the training tokens), then every
``--eval-every`` steps the train and val loss, val perplexity and a sample, and ends with the val
loss against the unigram baseline (default run: ~0.61 vs 5.82 nats). Writes metrics.jsonl,
loss/lr/grad_norm PNGs, summary.json and checkpoints to runs/ch2_pretrain/.

What it implements (read ``main`` top to bottom; it is the loop)
- data: ``artifacts.ensure_data`` gives the tokenizer and the packed uint16 shards (running
  ch2_data if they are missing); every micro-batch is a pure function of (seed, micro-batch index)
  (``train.BatchSource``), so the data position is one integer and a resumed run sees exactly the
  batches the uninterrupted one would have seen.
- model: ``ModelConfig.preset(--preset)`` with flag overrides; the vocabulary always comes from the
  tokenizer.
- objectives: causal LM (predict every next token), prefix LM (bidirectional prefix, loss on the
  suffix only; Raffel et al. 2020 sec. 3.2.1) and masked LM (predict ~15% masked tokens from both
  sides; Devlin et al. 2019). Each is evaluated on its *own* objective, and those val losses are
  not comparable: they average over different token sets given different information. MLM scores
  only the ~15% masked positions (about 7x fewer training signals per step) while seeing both
  neighbours -- and it cannot generate left to right at all.
- the step: the LR from warmup + cosine (``warmup_cosine_lr``), then for each of ``--grad-accum``
  micro-batches forward + *summed* token loss, divided by the scored tokens of the whole step
  before ``backward()`` (so k micro-batches give exactly the big batch's mean-loss gradient, ragged
  ones included; chapter 5 shows the naive mean going wrong); the NaN guard; global-norm clipping
  (the pre-clip norm is logged); the AdamW step (Loshchilov & Hutter 2019, decay on 2-D weights).
- precision: ``--precision bf16`` runs forward under ``torch.autocast`` (weights, grads and optimizer
  state stay fp32; bf16 has fp32's exponent range, so no loss scaling).
- evaluation: token-weighted val loss and perplexity exp(loss) on fixed val batches, beside the
  unigram baseline H(p) = -sum_v p_v ln p_v (the best model that ignores context) and ln V.
- bookkeeping: tqdm, ``metrics.jsonl``, PNGs, ``summary.json``, rotating checkpoints
  (``ckpt_stepNNNNNN.pt`` + ``last.pt``) holding weights, optimizer moments, step, RNG states, data
  position, the model config and the tokenizer (portable: ``artifacts.load_pretrained`` needs
  nothing else); ``--resume`` continues bit-for-bit; a NaN/inf loss stops the run naming the step
  and the last good checkpoint, which is never overwritten. The run directory, resume checks,
  Ctrl-C and one-line errors come from ``minilife.runs`` (a used directory needs ``--resume`` or
  ``--overwrite``).

What it leaves out: data/tensor parallelism, torch.compile, fp16 (chapter 5 shows why it needs loss
scaling), sequence packing with document masks (documents are separated by the end-of-text token
and windows may straddle them, as in GPT-2).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from tqdm import tqdm

from minilife.artifacts import ensure_data, load_token_data
from minilife.checkpoint import CheckpointError, check_finite
from minilife.common import (MetricsLogger, check_flags, cli_field, config_from_args, fmt_count, read_jsonl, start_run,
                             write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import InterruptGuard, ResumableConfig, cli, interrupted, prepare_run_dir, resume_run, save_rotating
from minilife.model.transformer import GPT, PRESETS, ModelConfig
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.schedule import warmup_cosine_lr
from minilife.train import (IGNORE_INDEX, BatchSource, autocast_context, evaluate, mlm_mask_id, n_targets, sample_text,
                            unigram_entropy)

CHAPTER = "ch2_pretrain"
# flags that say where and how to run, not what is trained: a resumed run may change them freely
NOT_THE_RUN = ("smoke", "out", "threads", "debug", "device", "data_dir", "resume", "overwrite", "allow_change",
               "plots", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "prompt", "sample_tokens")


@dataclass
class PretrainConfig(ResumableConfig):
    """Pretrain the tiny GPT on the world's wiki: loss falling, val perplexity vs the unigram baseline."""
    seed: int = cli_field(1337, "seed for init, data order, dropout and masking")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    data_dir: Optional[str] = cli_field(None, "ch2_data output (tokenizer.json + shards/); built if missing "
                                              "(default runs/ch2_data[-smoke]/)")
    preset: str = cli_field("tiny", "ModelConfig preset the size flags below override")
    n_layer: int = cli_field(4, "transformer blocks", smoke=2)
    n_head: int = cli_field(4, "attention heads", smoke=2)
    n_embd: int = cli_field(128, "model width C", smoke=64)
    context_length: int = cli_field(256, "tokens per sequence T (256: an e-mail and its SFT answer fit, chapter 3)",
                                    smoke=64)
    dropout: float = cli_field(0.0, "dropout probability (0 for short pretraining runs)")
    attn_impl: Literal["math", "sdpa", "triton"] = cli_field("sdpa", "attention path")
    gradient_checkpointing: bool = cli_field(False, "recompute block activations in backward (chapter 5)")
    objective: Literal["causal", "prefix", "mlm"] = cli_field("causal", "training objective")
    batch_size: int = cli_field(8, "sequences per micro-batch B", smoke=8)
    grad_accum: int = cli_field(1, "micro-batches per optimizer step")
    max_steps: int = cli_field(500, "optimizer steps", smoke=30)
    lr: float = cli_field(3e-3, "peak learning rate")
    min_lr: float = cli_field(3e-4, "learning rate at the end of the cosine")
    warmup_steps: Optional[int] = cli_field(None, "linear warmup steps (None: 8%% of --max-steps, 40 of 500)")
    weight_decay: float = cli_field(0.1, "AdamW decoupled weight decay on 2-D weights")
    beta1: float = cli_field(0.9, "AdamW beta1")
    beta2: float = cli_field(0.95, "AdamW beta2")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm to this (0 = no clipping)")
    precision: Literal["fp32", "bf16"] = cli_field("fp32", "fp32, or bf16 autocast for forward/backward")
    eval_every: int = cli_field(100, "steps between val evaluations", smoke=10)
    eval_batches: int = cli_field(16, "val micro-batches per evaluation", smoke=4)
    ckpt_every: int = cli_field(100, "steps between checkpoints", smoke=10)
    keep_checkpoints: int = cli_field(2, "numbered checkpoints kept (last.pt always holds the newest)")
    prompt: str = cli_field("From:", "prompt for sample generations")
    sample_tokens: int = cli_field(48, "tokens to generate per sample (at each evaluation and at the end)")
    plots: bool = cli_field(True, "write loss / LR / grad-norm PNGs at the end")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(grad_accum=1, keep_checkpoints=1, n_layer=1, n_head=1, n_embd=1,
                                        context_length=1, batch_size=1, max_steps=1, eval_every=1, eval_batches=1,
                                        ckpt_every=1, weight_decay=0, grad_clip=0, sample_tokens=0),
                    choices={"preset": PRESETS})
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):  # written so that NaN fails too
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        for name in ("dropout", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.08 * self.max_steps))
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be in [0, --max-steps {self.max_steps}]")


# --------------------------------------------------------------------------------------------
# model and optimizer from the config


def build_model(cfg: PretrainConfig, vocab_size: int) -> GPT:
    """GPT from ``--preset`` plus the size flags; ``vocab_size`` comes from the tokenizer."""
    return GPT(dataclasses.replace(ModelConfig.preset(cfg.preset), vocab_size=vocab_size, n_layer=cfg.n_layer,
                                   n_head=cfg.n_head, n_embd=cfg.n_embd, context_length=cfg.context_length,
                                   dropout=cfg.dropout, attn_impl=cfg.attn_impl,
                                   gradient_checkpointing=cfg.gradient_checkpointing))


def plot_curves(out: Path, rows: list[dict], vals: list[dict], unigram: float, cfg: PretrainConfig) -> None:
    """loss.png (train, val, unigram line), lr.png, grad_norm.png from the metrics rows."""
    steps = [r["step"] for r in rows]
    plot_lines(out / "loss.png", {"train loss": (steps, [r["loss"] for r in rows]),
                                  "val loss": ([r["step"] for r in vals], [r["val_loss"] for r in vals])},
               hlines={f"unigram entropy {unigram:.2f}": unigram}, title=f"{CHAPTER}: {cfg.objective} loss",
               xlabel="step", ylabel="nats / token")
    plot_lines(out / "lr.png", {"learning rate": (steps, [r["lr"] for r in rows])},
               title="warmup + cosine", xlabel="step", ylabel="LR")
    plot_lines(out / "grad_norm.png", {"pre-clip grad norm": (steps, [r["grad_norm"] for r in rows])},
               hlines={"clip": cfg.grad_clip} if cfg.grad_clip > 0 else None, title="global gradient norm",
               xlabel="step", ylabel="L2 norm", logy=True)


def main(argv: list[str] | None = None, *, hook: Callable[[int, GPT], None] | None = None) -> dict:
    """Run the chapter. ``hook(step, model)``, called before every step, is for tests only: it may
    raise (a crash) or poison the weights (a blow-up); it is not a flag a reader has to know."""
    cfg: PretrainConfig = config_from_args(PretrainConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, device = start_run(CHAPTER, cfg)
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)  # one run per directory

    # 1. data and tokenizer
    data_dir = ensure_data(cfg.smoke, cfg.data_dir)
    tokenizer, train_tokens, val_tokens = load_token_data(data_dir)
    vocab = tokenizer.vocab_size
    mlm = dict(mask_id=mlm_mask_id(tokenizer), vocab_size=vocab,
               special_ids=(tokenizer.eot_id,) if tokenizer.eot_id is not None else ()) if cfg.objective == "mlm" else {}
    train_src, val_src = (BatchSource(tokens, cfg.batch_size, cfg.context_length, objective=cfg.objective,
                                      seed=cfg.seed, stream=stream, device=device, **mlm)
                          for stream, tokens in enumerate((train_tokens, val_tokens)))
    unigram, uniform = unigram_entropy(train_tokens, vocab), math.log(vocab)

    # 2. model and optimizer (AdamW, weight decay on 2-D weights only)
    model = build_model(cfg, vocab).to(device)
    optimizer = AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    identity = {"model": dataclasses.asdict(model.cfg), "objective": cfg.objective}  # must match on resume
    tokens_per_step = cfg.batch_size * cfg.context_length * cfg.grad_accum
    print(f"[{CHAPTER}] data {data_dir}: train {fmt_count(len(train_tokens))} / val {fmt_count(len(val_tokens))} "
          f"tokens, vocab {vocab}")
    print(f"[{CHAPTER}] model {model.cfg.n_layer}L {model.cfg.n_head}H C={model.cfg.n_embd} T={model.cfg.context_length}: "
          f"{fmt_count(model.num_params())} params ({fmt_count(model.num_params(non_embedding=True))} non-embedding); "
          f"objective {cfg.objective}, precision {cfg.precision}, device {device}, {torch.get_num_threads()} threads")
    print(f"[{CHAPTER}] {cfg.max_steps} steps x {tokens_per_step} tokens ({cfg.grad_accum} micro-batches of "
          f"{cfg.batch_size}x{cfg.context_length}); LR {cfg.lr:g} warmup {cfg.warmup_steps} cosine to {cfg.min_lr:g}")
    print(f"[{CHAPTER}] baselines: uniform ln V = {uniform:.3f} nats, unigram entropy of the training tokens = "
          f"{unigram:.3f} nats (ppl {math.exp(unigram):.1f}): a model must use context to go below it")

    # 3. resume: weights, AdamW moments, RNG states and the data position
    start_step, last_good, notes = 0, None, []
    if cfg.resume:
        state, last_good, notes = resume_run(out, cfg, model=model, optimizer=optimizer, config=identity,
                                             ignore=NOT_THE_RUN, device=device)
        start_step = state["step"]
        if state["extra"]["tokenizer_state"] != tokenizer.state():
            raise CheckpointError(f"{last_good}: was trained with another tokenizer than {data_dir}'s")
        if state["data_state"].get("micro_batches") != start_step * cfg.grad_accum:
            raise CheckpointError(f"{last_good}: data position {state['data_state'].get('micro_batches')} does not "
                                  f"match step {start_step} x grad_accum {cfg.grad_accum}")
        print(f"[{CHAPTER}] resumed from {last_good} at step {start_step}")
    for note in filter(None, notes):
        print(f"[{CHAPTER}] note: {note}")

    def save(step: int) -> Path:  # portable: the model config and the tokenizer travel with the weights
        return save_rotating(out, step=step, keep_last=cfg.keep_checkpoints, model=model, optimizer=optimizer,
                             config=identity, data_state={"micro_batches": step * cfg.grad_accum},
                             extra={"train": dataclasses.asdict(cfg), "tokenizer_state": tokenizer.state(),
                                    "finished": step >= cfg.max_steps})

    # 4. the loop; Ctrl-C finishes the step in flight, then saves (InterruptGuard)
    model.train()
    val_loss, train_time, trained_tokens, done = float("nan"), 0.0, 0, start_step
    with InterruptGuard() as interrupt, MetricsLogger(out / "metrics.jsonl", resume=cfg.resume) as logger, \
            tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc=CHAPTER,
                 mininterval=1.0, disable=None) as bar:
        for step in bar:
            if hook is not None:
                hook(step, model)
            t0 = time.perf_counter()
            lr = warmup_cosine_lr(step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                                  min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [train_src.micro_batch(step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
            n_scored = sum(n_targets(b) for b in micro)  # the tokens that count in this whole step
            loss_sum = 0.0
            for b in micro:
                with autocast_context(device, cfg.precision):
                    _, batch_loss = model(b.inputs, b.targets, ignore_index=IGNORE_INDEX, reduction="sum",
                                          **b.attention)  # forward: summed cross-entropy of its scored tokens
                (batch_loss.float() / n_scored).backward()  # each micro-batch adds its share of the step's mean
                loss_sum += batch_loss.item()
            try:  # a NaN/inf loss or gradient stops here, before the update and before any save
                loss = check_finite(loss_sum / n_scored, step, last_good)
                grad_norm = check_finite(clip_grad_norm(model.parameters(), cfg.grad_clip or math.inf), step,
                                         last_good, what="gradient norm")  # the pre-clip norm
            except FloatingPointError as e:
                logger.log(step=step, event="non-finite", message=str(e))
                raise
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_time += time.perf_counter() - t0
            trained_tokens += tokens_per_step  # input tokens through forward+backward (MLM scores ~15% of them)

            done = step + 1
            row = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "scored_tokens": n_scored}
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss = evaluate(model, val_src, cfg.eval_batches, cfg.precision)
                row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                tqdm.write(f"step {done:5d}  train {loss:.3f}  val {val_loss:.3f} (ppl {math.exp(val_loss):.1f})  "
                           f"unigram {unigram:.3f}  grad-norm {grad_norm:.2f}  lr {lr:.2e}")
                if cfg.objective != "mlm" and cfg.sample_tokens > 0:  # what the model writes at this point
                    row["sample"] = sample_text(model, tokenizer, cfg.prompt, cfg.sample_tokens, seed=cfg.seed)
                    tqdm.write(f"           sample: {row['sample']!r}")
            logger.log(**row)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if done % cfg.ckpt_every == 0 or done == cfg.max_steps or interrupt.requested:
                last_good = save(done)
            if interrupt.requested:
                break
    finished = done >= cfg.max_steps

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
        "chapter": CHAPTER, "objective": cfg.objective, "steps": done, "max_steps": cfg.max_steps,
        "finished": finished, "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None, "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) else None,
        "unigram_entropy": unigram, "uniform_entropy": uniform,
        "beats_unigram": bool(math.isfinite(val_loss) and val_loss < unigram),
        "params": model.num_params(), "tokens_per_step": tokens_per_step,
        "train_tokens_per_s": trained_tokens / train_time if train_time > 0 else None,
        "checkpoint": str(out / "last.pt"), "data_dir": str(data_dir), "samples": samples,
        "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    if math.isfinite(val_loss):
        print(f"[{CHAPTER}] val loss {val_loss:.3f} vs unigram {unigram:.3f} -> "
              f"{'beats' if summary['beats_unigram'] else 'does NOT beat'} the context-free baseline")
    print(f"[{CHAPTER}] wrote {out}")
    if not finished:
        raise interrupted(CHAPTER, done, cfg.max_steps, last_good, argv)
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

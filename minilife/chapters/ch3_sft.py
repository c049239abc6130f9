"""Chapter 3: the shadowing. Supervised fine-tuning of the pretrained GPT on chat tasks, loop written out.

    python -m minilife.chapters.ch3_sft                 # ~2 min on 2 cores (--smoke: ~10 s)

prints the base model failing the world's tasks (summarise an e-mail in 3 bullets, draft a reply,
extract action items, extract a date as JSON, answer a policy question, refuse private requests and
not refuse their look-alikes), the token-mask view of one batch (which tokens train), the template
lint, the fine-tuning loop, then the same test tasks after SFT: format validity, exact-field accuracy
per task, refusal and over-refusal rates, outputs side by side, and the general wiki loss before and
after (forgetting). Writes metrics.jsonl, loss.png, mask.html, summary.json, checkpoints, and
``model.pt`` (plain GPT weights, LoRA merged, with the chat tokenizer) to runs/ch3_sft/.

The default run (full fine-tuning, 375 steps) takes the model from 0% to ~100% format validity, 100%
refusals with 0% over-refusal, and leaves ~64% of its general wiki loss "retained"; exact fields it
must copy out of the e-mail (names, dates) stay rare (~8% on the extraction tasks): SFT teaches the
behaviour -- the formats, the refusal policy, the event types -- but not an ability the pretrained
model lacks (this 1M-parameter model, pretrained on ~1M tokens, does not copy values out of a
150-token context; three times the pretraining and twice the SFT data did not change that).

What it implements (read ``main`` top to bottom; it is the loop)
- the base model: chapter 2's checkpoint (trained first if missing) plus the chat role tokens
  (``align.chat.add_chat_tokens``: new embedding rows, the old ones untouched).
- data: the world's shadowing set (``data.shadowing``; exported as chat JSONL to the run dir) or the
  user's own chat JSONL (``--train-file``/``--val-file``, ``{"messages": [{"role", "content"}]}``);
  rendered with the chat template, loss only on assistant tokens and their end-of-turn token,
  truncated to the context with counts reported.
- the step: each step draws ``--batch-size`` conversations (task-weighted with ``--task-weights``, from
  a generator seeded by (seed, step), so a resumed run sees the same batches), packs them into rows
  (``--packing``; attention stays inside each conversation) or pads them, and sums the token losses
  divided by the trained tokens of the whole step (exact under ``--grad-accum``); optionally the
  general wiki text mixed back in (``--general-mix``, chapter 3's forgetting fix); clipping; AdamW.
- methods (``--method``): full fine-tuning, LoRA (``--lora-rank``, ``--lora-alpha``, ``--lora-targets``,
  ``--rslora``), DoRA, bottleneck adapters (``--adapter-size``), prefix tuning (``--prefix-len``). The base
  weights are frozen for all but ``full``; the new chat-token rows train with every method.
- evaluation: greedy answers to the held-out test tasks scored by the world's checker
  (``data.shadowing``), SFT val loss, and the general held-out wiki loss (chapter 2's val shard)
  before/after as retention % = 100 * loss_before / loss_after.

What it leaves out: chat data from the internet, sampling-based evaluation, early stopping, and
distributed training. Chapter 3's other modules: ch3_lora (methods side by side) and ch3_forgetting.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from minilife.align.chat import add_chat_tokens, render_prompt
from minilife.align.respond import score_answers
from minilife.align.sft import encode_dataset, read_chat_jsonl, sft_eval_loss, sft_loss_sum, split_step
from minilife.align.template_lint import lint_rendering, show_mask
from minilife.artifacts import ensure_data, ensure_pretrained, load_pretrained, load_token_data
from minilife.checkpoint import check_finite, save_checkpoint
from minilife.common import (MetricsLogger, UsageError, check_flags, cli_field, config_from_args, fmt_count, read_jsonl,
                             start_run, write_json_atomic)
from minilife.plots import plot_lines
from minilife.data.shadowing import export_jsonl, make_shadowing_set, parse_task_weights
from minilife.data.shadowing_checks import scores_table
from minilife.model.finetune import METHODS, apply_method, export_model, optimizer_groups, trainable_parameters
from minilife.model.peft import adapters_disabled
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.schedule import warmup_cosine_lr
from minilife.runs import InterruptGuard, ResumableConfig, cli, interrupted, prepare_run_dir, resume_run, save_rotating
from minilife.train import BatchSource, evaluate

CHAPTER = "ch3_sft"
NOT_THE_RUN = ("smoke", "out", "threads", "debug", "device", "data_dir", "pretrained", "resume", "overwrite",
               "allow_change", "plots", "eval_every", "ckpt_every", "keep_checkpoints", "show", "eval_batch_size",
               "generate", "base_eval")
GOALS = {"format_validity": 0.95, "extraction_exact": 0.80, "refusal_rate": 0.95, "over_refusal": 0.05}
EXTRACTION = ("action_items", "date_json")


@dataclass
class SFTConfig(ResumableConfig):
    """Fine-tune the pretrained GPT on chat tasks; compare base and SFT on held-out test tasks."""
    seed: int = cli_field(1337, "seed for data order, adapters and dropout")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    data_dir: Optional[str] = cli_field(None, "ch2_data output (general held-out text; built if missing)")
    pretrained: Optional[str] = cli_field(None, "base checkpoint (default: ch2_pretrain's, trained if missing)")
    train_file: Optional[str] = cli_field(None, "your own chat JSONL to train on (default: the world's shadowing set)")
    val_file: Optional[str] = cli_field(None, "chat JSONL for the val loss (with --train-file; default: none)")
    skip_bad: bool = cli_field(False, "skip malformed lines of --train-file/--val-file (counted) instead of stopping")
    n_train: int = cli_field(2000, "shadowing-set training conversations", smoke=120)
    n_val: int = cli_field(150, "shadowing-set val conversations (the SFT val loss)", smoke=15)
    n_test: int = cli_field(300, "shadowing-set test conversations (held-out e-mails, policies and people)", smoke=30)
    task_weights: str = cli_field("", "sampling weight per task, e.g. 'summary=2,refuse=0.5' (others 1)")
    method: str = cli_field("full", "what trains: full | lora | dora | adapter | prefix")
    lora_rank: int = cli_field(4, "LoRA/DoRA rank r")
    lora_alpha: Optional[float] = cli_field(None, "LoRA/DoRA alpha: scale alpha/r, or alpha/sqrt(r) with --rslora "
                                                  "(None: 2r)")
    lora_targets: str = cli_field("attn.qkv attn.proj ffn.*", "space-separated layer name patterns; a fused "
                                  "projection's parts as 'attn.qkv:q,v'")
    rslora: bool = cli_field(False, "rsLoRA scaling alpha/sqrt(r)")
    adapter_size: int = cli_field(16, "bottleneck width of --method adapter")
    prefix_len: int = cli_field(8, "learned key/value prefix length of --method prefix")
    epochs: float = cli_field(3.0, "passes over the training conversations (sets the step count)", smoke=1.0)
    batch_size: int = cli_field(16, "conversations per micro-batch", smoke=8)
    grad_accum: int = cli_field(1, "micro-batches per optimizer step")
    packing: bool = cli_field(True, "pack several conversations per row (attention kept inside each)")
    lr: Optional[float] = cli_field(None, "peak learning rate (None: 3e-4 for full, 2e-3 for the others)")
    warmup_frac: float = cli_field(0.05, "share of the steps spent in linear warmup")
    weight_decay: float = cli_field(0.0, "AdamW weight decay (on weight matrices; never on adapters unless set)")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm (0 = off)")
    general_mix: float = cli_field(0.0, "weight of the general wiki loss added each step (0 = pure SFT)")
    max_new_tokens: int = cli_field(96, "answer length cap when evaluating", smoke=48)
    eval_batch_size: int = cli_field(32, "conversations per generation batch")
    eval_every: int = cli_field(100, "steps between val / general-loss evaluations", smoke=10)
    general_batches: int = cli_field(8, "general held-out micro-batches per evaluation", smoke=2)
    generate: bool = cli_field(True, "answer the test tasks after training (off: losses only, faster)")
    base_eval: bool = cli_field(True, "answer the test tasks with the base model too, before training")
    ckpt_every: int = cli_field(200, "steps between checkpoints", smoke=20)
    keep_checkpoints: int = cli_field(1, "numbered checkpoints kept (last.pt always holds the newest)")
    show: int = cli_field(4, "test examples printed side by side (base vs SFT)")
    plots: bool = cli_field(True, "write loss.png and mask.html")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(n_train=1, n_val=0, n_test=0, lora_rank=1, adapter_size=1, prefix_len=0,
                                        batch_size=1,
                                        grad_accum=1, max_new_tokens=1, eval_batch_size=1, eval_every=1,
                                        general_batches=1, ckpt_every=1, keep_checkpoints=1, show=0, weight_decay=0,
                                        grad_clip=0, general_mix=0),
                    above=dict(epochs=0, lora_alpha=0))
        if self.val_file and not self.train_file:
            raise ValueError("--val-file goes with --train-file (the world's set brings its own val split)")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        check_flags(self, choices={"method": METHODS})
        if self.lr is None:
            self.lr = 3e-4 if self.method == "full" else 2e-3
        if not (self.lr > 0 and 0 <= self.warmup_frac < 1):
            raise ValueError(f"need --lr > 0 and --warmup-frac in [0, 1), got {self.lr}, {self.warmup_frac}")
        self.weights = parse_task_weights(self.task_weights, flag="--task-weights")


def load_conversations(cfg: SFTConfig, out: Path) -> tuple[dict[str, list], dict[str, list]]:
    """(conversations per split, the shadowing set's examples per split -- empty for the user's own files)."""
    if cfg.train_file:
        splits = {}
        for split, path in (("train", cfg.train_file), ("val", cfg.val_file)):
            if path:
                convs, skipped = read_chat_jsonl(path, skip_bad=cfg.skip_bad)
                skipped_text = f", {skipped} bad lines skipped" if skipped else ""
                print(f"[{CHAPTER}] {path}: {len(convs)} conversations{skipped_text}")
                splits[split] = convs
        return splits, {}
    examples = make_shadowing_set(seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test)
    for split, exs in examples.items():
        export_jsonl(exs, out / f"shadowing_{split}.jsonl")
    print(f"[{CHAPTER}] the world's shadowing set: " + ", ".join(f"{k} {len(v)}" for k, v in examples.items())
          + f" conversations (chat JSONL in {out}/shadowing_*.jsonl)")
    return {split: [e.messages for e in exs] for split, exs in examples.items()}, examples


def sample_weights(tasks: list, weights: dict[str, float]) -> torch.Tensor:
    """Per-conversation sampling probabilities (N,) from each one's task weight (``--task-weights``, default 1;
    conversations of the user's own file have no task and weight 1)."""
    w = torch.tensor([weights.get(t, 1.0) for t in tasks], dtype=torch.float64)
    if not w.sum() > 0:
        raise UsageError("--task-weights: every training conversation has weight 0")
    return w / w.sum()


def main(argv: list[str] | None = None, *, hook: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Run the chapter. ``hook(step, model)`` before every step is for tests only (a crash, a blow-up)."""
    cfg: SFTConfig = config_from_args(SFTConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, device = start_run(CHAPTER, cfg)
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)

    # 1. the base model, plus the chat template's role tokens (new embedding rows)
    base_ckpt = Path(cfg.pretrained) if cfg.pretrained else ensure_pretrained(cfg.smoke, data_dir=cfg.data_dir)
    model, tokenizer = load_pretrained(base_ckpt, device)
    base_vocab = model.cfg.vocab_size
    model, tokenizer = add_chat_tokens(model, tokenizer)  # ids base_vocab.. are the new role markers
    T = model.cfg.context_length
    _, general_train, general_val = load_token_data(ensure_data(cfg.smoke, cfg.data_dir))
    general_src = BatchSource(general_val, 8, T, seed=cfg.seed, stream=1, device=device)  # the forgetting panel
    mix_src = BatchSource(general_train, max(1, cfg.batch_size // 4), T, seed=cfg.seed, stream=2, device=device)

    # 2. conversations -> token ids + loss masks (truncated to the context, counts reported)
    convs, examples = load_conversations(cfg, out)
    encoded = {}
    for split in ("train", "val"):  # the test split is answered by generation, not scored by loss
        if not convs.get(split):
            continue
        try:
            encoded[split], counts = encode_dataset(tokenizer, convs[split], T + 1)  # T inputs, T labels
        except ValueError as e:  # nothing left to train on (or to validate with) within the context
            if split == "train":
                raise UsageError(f"{e} (the model's context is {T} tokens)") from None
            print(f"[{CHAPTER}] val: {e}; no val loss")
            continue
        print(f"[{CHAPTER}] {split}: {counts['kept']} kept, {counts['truncated']} truncated to {T} tokens, "
              f"{counts['dropped']} dropped (every trained token cut)")
    train = encoded["train"]
    task_of = {id(e.messages): e.task for e in examples.get("train", [])}
    probs = sample_weights([task_of.get(id(x.messages)) for x in train], cfg.weights)
    pack_len = T + 1 if cfg.packing else None  # packed rows of T inputs, or padded batches
    val_batches = [b.to(device) for b in split_step(encoded["val"], cfg.batch_size, tokenizer.eot_id,
                                                    pack_len=pack_len)[0]] if encoded.get("val") else []

    # what trains: the mask view of one conversation and the template lint
    first = next((x for x in train if not x.truncated), train[0])
    view = show_mask(tokenizer, first.ids, first.loss_mask, color=sys.stdout.isatty())
    print(f"[{CHAPTER}] which tokens train (highlighted) in one conversation:\n{view}")
    findings = lint_rendering(tokenizer, first.ids.tolist(), first.loss_mask.tolist(),
                              serve_ids=render_prompt(tokenizer, first.messages[:-1]), messages=first.messages)
    print(f"[{CHAPTER}] template lint: " + ("; ".join(findings) if findings else "clean (no findings)"))
    if cfg.plots:  # the mask view of a batch's worth of conversations, for a browser or a notebook
        views = [show_mask(tokenizer, x.ids, x.loss_mask, html=True) for x in train[:cfg.batch_size]]
        (out / "mask.html").write_text("<hr>\n".join(views), encoding="utf-8")

    # 3. the method: what trains (bad --lora-targets fail here, before any long work)
    total = model.num_params()  # the base model's parameters (PEFT's extra tensors are not counted in)
    try:
        described = apply_method(model, cfg.method, rank=cfg.lora_rank, alpha=cfg.lora_alpha, rslora=cfg.rslora,
                                 targets=cfg.lora_targets.split(), adapter_size=cfg.adapter_size,
                                 prefix_len=cfg.prefix_len, first_new_id=base_vocab)
    except ValueError as e:
        raise UsageError(f"--method {cfg.method}: {e}") from None

    # 4. before: the base model (adapters off) on the held-out tasks, and on the general wiki text
    test = examples.get("test", [])

    def answer():  # greedy answers to the held-out test tasks, scored by the world's checker
        return score_answers(model, tokenizer, test, cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    with adapters_disabled(model):
        general_before = evaluate(model, general_src, cfg.general_batches)
        base, base_answers = answer() if (test and cfg.generate and cfg.base_eval) else ({}, [])
    if base:
        print(f"[{CHAPTER}] base model on {len(test)} test tasks:\n{scores_table(base)}")

    # 5. the optimizer over exactly what trains (no weight decay on adapters unless set)
    model.to(device)
    trainable = trainable_parameters(model)[0]
    optimizer = AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    per_step = cfg.batch_size * cfg.grad_accum
    max_steps = max(1, math.ceil(cfg.epochs * len(train) / per_step))
    warmup = round(cfg.warmup_frac * max_steps)
    identity = {"model": dataclasses.asdict(model.cfg), "method": described}
    print(f"[{CHAPTER}] {described}: {fmt_count(trainable)} of {fmt_count(total)} parameters train "
          f"({100 * trainable / total:.2f}%); {max_steps} steps x {per_step} conversations "
          f"({cfg.epochs:g} epochs, {'packed' if cfg.packing else 'padded'}), LR {cfg.lr:g}")

    # 6. resume: weights (adapters included), AdamW moments, step; the batches are a function of (seed, step)
    start_step, last_good, notes = 0, None, []
    if cfg.resume:
        state, last_good, notes = resume_run(out, cfg, model=model, optimizer=optimizer, config=identity,
                                             ignore=NOT_THE_RUN, device=device)
        start_step = state["step"]
        print(f"[{CHAPTER}] resumed from {last_good} at step {start_step}")
    for note in filter(None, notes):
        print(f"[{CHAPTER}] note: {note}")

    def save(step: int) -> Path:
        return save_rotating(out, step=step, keep_last=cfg.keep_checkpoints, model=model, optimizer=optimizer,
                             config=identity, extra={"train": dataclasses.asdict(cfg), "finished": step >= max_steps,
                                                     "tokenizer_state": tokenizer.state()})

    # 7. the loop: sample conversations, pack, summed token loss / trained tokens of the step, clip, AdamW
    model.train()
    done, train_time, trained_tokens = start_step, 0.0, 0
    with InterruptGuard() as interrupt, MetricsLogger(out / "metrics.jsonl", resume=cfg.resume) as logger, \
            tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=CHAPTER, mininterval=1.0,
                 disable=None) as bar:
        for step in bar:
            if hook is not None:
                hook(step, model)
            t0 = time.perf_counter()
            lr = warmup_cosine_lr(step, max_lr=cfg.lr, warmup_steps=warmup, total_steps=max_steps, min_lr=cfg.lr / 10)
            for group in optimizer.param_groups:
                group["lr"] = lr
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the step's batch: f(seed, step)
            picks = torch.multinomial(probs, per_step, replacement=True, generator=g).tolist()
            micro, n_step = split_step([train[j] for j in picks], cfg.batch_size, tokenizer.eot_id,
                                       pack_len=pack_len)  # n_step: the trained tokens of the whole step
            loss_sum = 0.0
            for b in (b.to(device) for b in micro):
                batch_loss, _ = sft_loss_sum(model, b)  # forward: summed cross-entropy of the trained tokens
                (batch_loss / n_step).backward()  # each micro-batch adds its share of the step's token mean
                loss_sum += batch_loss.item()
            if cfg.general_mix > 0:  # forgetting fix: keep training on general wiki text too
                mb = mix_src.micro_batch(step)
                _, general_loss = model(mb.inputs, mb.targets)
                (cfg.general_mix * general_loss).backward()
            try:
                loss = check_finite(loss_sum / n_step, step, last_good)
                trained = [p for p in model.parameters() if p.requires_grad]
                grad_norm = check_finite(clip_grad_norm(trained, cfg.grad_clip or math.inf), step, last_good,
                                         what="gradient norm")  # the pre-clip norm
            except FloatingPointError as e:
                logger.log(step=step, event="non-finite", message=str(e))
                raise
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_time += time.perf_counter() - t0
            trained_tokens += sum(int(b.padding_mask.sum()) for b in micro)

            done = step + 1
            row = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": n_step}
            if done % cfg.eval_every == 0 or done == max_steps:
                row["general_loss"] = evaluate(model, general_src, cfg.general_batches)
                if val_batches:
                    row["val_loss"] = sft_eval_loss(model, val_batches)
                tqdm.write(f"step {done:5d}  train {loss:.3f}  val {row.get('val_loss', float('nan')):.3f}  "
                           f"general {row['general_loss']:.3f} (before {general_before:.3f})  lr {lr:.2e}")
            logger.log(**row)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if done % cfg.ckpt_every == 0 or done == max_steps or interrupt.requested:
                last_good = save(done)
            if interrupt.requested:
                break
    finished = done >= max_steps

    # 8. after: the same test tasks, side by side, forgetting, plots, the exported chat model
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    evals = [r for r in rows if "general_loss" in r]
    general_after = evals[-1]["general_loss"] if evals else evaluate(model, general_src, cfg.general_batches)
    retention = 100.0 * general_before / general_after
    sft, sft_answers = answer() if (test and cfg.generate and finished) else ({}, [])
    if sft:
        print(f"[{CHAPTER}] after SFT ({described}) on the same {len(test)} test tasks:\n"
              f"{scores_table(sft, base or None)}")
        for e, b, a in list(zip(test, base_answers or [""] * len(test), sft_answers))[:cfg.show]:
            print(f"--- {e.task}: {e.messages[-2]['content'][:160]!r}\n    base: {b[:160]!r}\n    SFT:  {a[:160]!r}")
        for name, (goal, reached) in goals(sft).items():
            ok = reached is not None and (reached <= goal if name == "over_refusal" else reached >= goal)
            print(f"[{CHAPTER}] goal {name} {'<=' if name == 'over_refusal' else '>='} {goal:.0%}: "
                  f"{'n/a' if reached is None else f'{reached:.1%}'} -> {'met' if ok else 'NOT met'}")
    print(f"[{CHAPTER}] general wiki loss {general_before:.3f} -> {general_after:.3f}: retention {retention:.1f}%"
          + ("  (below the 80% warning line: forgetting)" if retention < 80 else ""))
    if cfg.plots and rows:
        vals = [r for r in evals if "val_loss" in r]
        plot_lines(out / "loss.png", {"SFT train loss": ([r["step"] for r in rows], [r["loss"] for r in rows]),
                                      "SFT val loss": ([r["step"] for r in vals], [r["val_loss"] for r in vals]),
                                      "general wiki loss": ([r["step"] for r in evals],
                                                            [r["general_loss"] for r in evals])},
                   hlines={"general loss before SFT": general_before}, title=f"{CHAPTER}: {described}",
                   xlabel="step", ylabel="nats / token")
    exported = export_model(model) if finished else None  # None: adapters / prefixes are not plain weights
    if exported is not None:  # plain GPT weights (LoRA merged) + the chat tokenizer: chapter 4's starting point
        save_checkpoint(out / "model.pt", model=exported, step=done, config={"model": dataclasses.asdict(model.cfg)},
                        extra={"tokenizer_state": tokenizer.state(), "finished": True, "method": described})
    summary = {
        "chapter": CHAPTER, "method": described, "steps": done, "max_steps": max_steps, "finished": finished,
        "trainable_params": trainable, "total_params": total,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                     for t in s.values() if isinstance(t, torch.Tensor)),
        "step_time_s": train_time / max(done - start_step, 1),
        "tokens_per_s": trained_tokens / train_time if train_time > 0 else None,
        "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None,
        "val_loss": next((r["val_loss"] for r in reversed(evals) if "val_loss" in r), None),
        "general_loss_before": general_before, "general_loss_after": general_after, "retention_pct": retention,
        "base": base, "sft": sft, "model": str(out / "model.pt") if exported is not None else None,
        "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    if not finished:
        raise interrupted(CHAPTER, done, max_steps, last_good, argv)
    return summary


def goals(scores: dict) -> dict[str, tuple[float, float | None]]:
    """{goal name: (target, reached)} for the issue's goals on the held-out test tasks."""
    extraction = [scores["by_task"][t]["exact"] for t in EXTRACTION if t in scores["by_task"]]
    reached = {"format_validity": scores["format_ok"],
               "extraction_exact": sum(extraction) / len(extraction) if extraction else None,
               "refusal_rate": scores.get("refusal_rate"), "over_refusal": scores.get("over_refusal_rate")}
    return {name: (target, reached[name]) for name, target in GOALS.items()}


if __name__ == "__main__":
    cli(main, CHAPTER)

"""Chapter 4: direct preference optimisation of chapter 3's chat model, loop written out.

    python -m minilife.chapters.ch4_dpo                    # ~75 s on 2 cores once ch3_sft's model exists
    python -m minilife.chapters.ch4_dpo --pairs principles # AI feedback in place of the reviews (~3 min)

prints the pairs (kept / truncated / dropped at the context), the reference log-probs computed once, the
loop's metrics every ``--eval-every`` steps (loss, implicit-reward margin and accuracy on the batch and on
held-out val pairs, the drift mean(log pi - log pi_ref) on the chosen answers), a before/after table, the
gold scorer's win/tie/loss count of the DPO model's greedy test answers against the SFT model's, and
KL(pi_DPO || pi_SFT) on answers sampled from the DPO model. Writes metrics.jsonl, dpo_loss.png,
dpo_val.png, summary.json and ``model.pt`` (plain GPT weights, LoRA merged, chat tokenizer) to runs/ch4_dpo/.

Default run (800 world pairs, 50 steps, beta 0.1, LR 1e-5): val accuracy 0 -> 93% (margin 1.68), gold
0.347 -> 0.362 (4 wins, 94 ties, 2 losses), KL to SFT 0.14 +- 0.04 nats. The SFT model already prefers the
chosen answer by raw log-prob on 96% of the val pairs (the rejected ones are long and stiff): little is
left to fix; at LR 1e-4 the margins soar and the gold score falls to 0.21 (31 losses). ``ch4_dpo_sweep``
shows beta's KL/reward trade. ``--pairs principles``: of 2400 answers sampled from the SFT model (3 per
train prompt) 1376 break a principle and 652 are revised into pairs (mostly a reply's greeting and
sign-off set to the e-mail's people, extra bullets dropped, JSON repaired, the refusal form); the gold
scorer prefers the revision in 87% of them (ties 13%, the original never). DPO on them (41 steps): gold
0.347 -> 0.342 (1 win, 97 ties, 2 losses), KL 0.59 +- 0.12, val accuracy 49% (margin -0.03): the model's
own faults are not the reviews' stiff or padded answers, and the commonest, a made-up date (1111
answers), no rule can fix. At LR 5e-5 they do harm (``ch4_dpo_sweep``: many revisions are cuts of
the original, so DPO learns to stop early).

What it implements (read ``main`` top to bottom; it is the loop)
- policy: chapter 3's chat model (``--sft``; default ``artifacts.ensure_sft``), fully fine-tuned or with
  LoRA (``--lora-rank``); reference: a frozen copy, or the LoRA policy with its adapters off.
- pairs: the world's reviews (``data.preferences``), the user's JSONL (``--train-file``, val held out of
  it), or AI feedback (``--pairs principles``: the SFT model's sampled answers to the train prompts,
  critiqued against ``data/principles.md`` and revised by rule, ``align.constitution``); val and test stay
  the world's. The reference's log-probs are computed once (``align.dpo.cached_reference_logprobs``).
- the step: a seeded batch of pairs, one forward pass over the 2B chosen+rejected rows, ``dpo_loss``
  (Rafailov et al. 2023, eq. 7, or its family: ``--loss-type``), backward, clipping, AdamW with warmup +
  cosine; dropout off, so the policy's log-probs compare with the cached reference's.
- after: ``align.evaluate.win_rate`` under ``data.preferences.gold_score``, ``policy_kl``, plots, export.

What it leaves out: on-policy rounds (iterative DPO), model-written critiques, an SFT term on the chosen
answers, and distributed training.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from minilife.align.constitution import RuleCritic, load_principles, principle_report, sampled_principle_pairs
from minilife.align.dpo import LOSS_TYPES, cached_reference_logprobs, dpo_loss
from minilife.align.evaluate import label_agreement, policy_kl, win_rate
from minilife.align.pairs import collate_pairs, encode_pairs, pair_logprobs
from minilife.align.respond import respond
from minilife.artifacts import ensure_sft, load_pretrained
from minilife.checkpoint import check_finite, save_checkpoint
from minilife.common import (MetricsLogger, UsageError, check_flags, cli_field, config_from_args, fmt_count,
                             markdown_table, read_jsonl, start_run, write_json_atomic)
from minilife.data.preferences import gold_score, preference_splits, read_preferences, write_preferences
from minilife.model.finetune import apply_method, export_model, optimizer_groups, trainable_parameters
from minilife.model.peft import reference_model
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.schedule import warmup_cosine_lr
from minilife.plots import plot_lines
from minilife.runs import InterruptGuard, ResumableConfig, cli, interrupted, prepare_run_dir, resume_run, save_rotating
from minilife.train import epoch_batch

CHAPTER = "ch4_dpo"
NOT_THE_RUN = ("smoke", "out", "threads", "debug", "device", "resume", "overwrite", "allow_change", "plots",
               "eval_every", "ckpt_every", "show", "eval_batch_size", "sft", "max_new_tokens", "n_test", "skip_bad",
               "kl_samples")
REFERENCES = ("copy", "adapters-off")
PAIRS = ("world", "principles")


@dataclass
class DPOConfig(ResumableConfig):
    """Align chapter 3's chat model to preference pairs with DPO (or a member of its family)."""
    seed: int = cli_field(1337, "seed for the pair order and LoRA's init")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    sft: Optional[str] = cli_field(None, "chapter 3's chat model.pt (default: ch3_sft's, trained if missing)")
    train_file: Optional[str] = cli_field(None, "your own preference JSONL {prompt, chosen, rejected} (default: "
                                                "the world's performance reviews)")
    skip_bad: bool = cli_field(False, "skip malformed lines of --train-file (counted) instead of stopping")
    pairs: str = cli_field("world", "world (the reviews) | principles (the SFT model's answers, revised by rule)")
    principles: Optional[str] = cli_field(None, "principles file for --pairs principles (default: data/principles.md)")
    samples_per_prompt: int = cli_field(3, "--pairs principles: answers sampled per train prompt", smoke=2)
    sample_temperature: float = cli_field(1.0, "temperature of the sampled answers (principles and KL)")
    sample_tokens: int = cli_field(64, "length cap of the sampled answers (principles and KL)", smoke=24)
    kl_samples: int = cli_field(2, "answers sampled per test prompt from the DPO model for KL(pi || pi_SFT)")
    n_train: int = cli_field(800, "world preference pairs to train on", smoke=48)
    n_val: int = cli_field(100, "held-out val pairs (accuracy and margin)", smoke=12)
    n_test: int = cli_field(100, "test prompts answered by SFT and DPO for the gold win rate", smoke=6)
    beta: float = cli_field(0.1, "DPO's beta: strength of the pull to the reference (IPO: target 1/(2 beta))")
    loss_type: str = cli_field("sigmoid", f"one of {', '.join(LOSS_TYPES)}")
    label_smoothing: float = cli_field(0.0, "assumed share of flipped labels (sigmoid/conservative/robust)")
    margin: float = cli_field(0.0, "subtracted from beta*h (SimPO's gamma)")
    average_logprobs: bool = cli_field(False, "length-averaged log-probs instead of summed (SimPO-style)")
    lr: float = cli_field(1e-5, "peak learning rate (1e-4 and up: margins soar, the gold score falls)", smoke=1e-3)
    epochs: float = cli_field(1.0, "passes over the train pairs (sets the step count unless --steps)")
    steps: Optional[int] = cli_field(None, "optimizer steps (overrides --epochs)", smoke=8)
    batch_size: int = cli_field(16, "pairs per step (2x rows per forward pass)", smoke=4)
    warmup_frac: float = cli_field(0.1, "share of the steps spent in linear warmup")
    weight_decay: float = cli_field(0.0, "AdamW weight decay")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm (0 = off)")
    lora_rank: int = cli_field(0, "LoRA rank on the policy (0: full fine-tuning)")
    lora_alpha: Optional[float] = cli_field(None, "LoRA alpha (None: 2r)")
    reference: str = cli_field("copy", "copy (a frozen copy of the SFT model) | adapters-off (the LoRA policy "
                                       "with its adapters off; needs --lora-rank)")
    eval_every: int = cli_field(20, "steps between val evaluations", smoke=4)
    eval_batch_size: int = cli_field(32, "pairs per reference/val batch, prompts per generation batch")
    max_new_tokens: int = cli_field(96, "answer length cap for the win rate", smoke=24)
    ckpt_every: int = cli_field(1000, "steps between checkpoints (the last step is always saved)", smoke=100)
    show: int = cli_field(2, "test answers printed side by side (SFT vs DPO)")
    plots: bool = cli_field(True, "write dpo_loss.png and dpo_val.png")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(n_train=1, n_val=1, n_test=0, steps=1, batch_size=1, weight_decay=0,
                                        grad_clip=0, lora_rank=0, eval_every=1, eval_batch_size=1, max_new_tokens=1,
                                        ckpt_every=1, show=0, samples_per_prompt=1, sample_tokens=1, kl_samples=0),
                    above=dict(beta=0, lr=0, epochs=0, lora_alpha=0, sample_temperature=0),
                    choices=dict(loss_type=LOSS_TYPES, reference=REFERENCES, pairs=PAIRS))
        if not math.isfinite(self.beta):
            raise ValueError(f"--beta must be a finite number > 0, got {self.beta}")
        if not (0 <= self.label_smoothing < 0.5 and 0 <= self.warmup_frac < 1):
            raise ValueError(f"need --label-smoothing in [0, 0.5) and --warmup-frac in [0, 1), got "
                             f"{self.label_smoothing}, {self.warmup_frac}")
        if self.reference == "adapters-off" and self.lora_rank == 0:
            raise ValueError("--reference adapters-off needs LoRA on the policy (--lora-rank R > 0)")
        if self.lora_alpha is None and self.lora_rank:  # stays None without LoRA: the config round-trips
            self.lora_alpha = 2.0 * self.lora_rank
        if self.pairs == "principles":
            load_principles(self.principles)  # a missing or malformed file: a usage error naming file:line


def principle_train_pairs(cfg: DPOConfig, out: Path, model, tokenizer, prompts: list) -> tuple[list, dict | None]:
    """AI feedback: the SFT model's sampled answers to the train prompts, critiqued against the principles and
    revised by rule (``align.constitution``). Saved to the run dir; a resumed run reads them back."""
    path = out / "preferences_principles.jsonl"
    if cfg.resume and path.is_file():
        return read_preferences(path)[0], None
    t0, critic = time.perf_counter(), RuleCritic(load_principles(cfg.principles))
    made, counts = sampled_principle_pairs(model, tokenizer, prompts, critic, samples_per_prompt=cfg.samples_per_prompt,
                                           temperature=cfg.sample_temperature, max_new_tokens=cfg.sample_tokens,
                                           batch_size=cfg.eval_batch_size,
                                           generator=torch.Generator().manual_seed(cfg.seed))
    print(f"[{CHAPTER}] principles ({time.perf_counter() - t0:.0f}s): the SFT model's sampled answers to "
          f"{len(prompts)} train prompts, {principle_report(counts)}")
    if not made:
        raise RuntimeError("--pairs principles: no sampled answer broke a principle that a rule could fix")
    counts["gold_agreement"] = agree = label_agreement(made)  # the gold scorer's verdict on the new labels
    write_preferences(path, made)
    if agree["n"]:
        print(f"[{CHAPTER}] the gold scorer prefers the revision in {agree['agree_rate']:.0%} of the pairs, ties "
              f"{agree['tie_rate']:.0%}, prefers the original {agree['disagree'] / agree['n']:.0%} (noisy labels)")
    return made, counts


def main(argv: list[str] | None = None) -> dict:
    cfg: DPOConfig = config_from_args(DPOConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, device = start_run(CHAPTER, cfg)
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)

    # 1. the policy: chapter 3's chat model; the reference: a frozen copy, or the same model with adapters off
    sft_path = Path(cfg.sft) if cfg.sft else ensure_sft(cfg.smoke)
    model, tokenizer = load_pretrained(sft_path, device)  # eval mode: dropout off throughout
    T, pad_id = model.cfg.context_length, tokenizer.eot_id
    reference = None
    if cfg.reference == "copy":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    described, total = "full fine-tuning", model.num_params()  # the base model's parameters
    if cfg.lora_rank:
        described = apply_method(model, "lora", rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    model.to(device).eval()
    trainable = trainable_parameters(model)[0]
    print(f"[{CHAPTER}] policy {sft_path} ({described}: {fmt_count(trainable)} of {fmt_count(total)} parameters "
          f"train); reference: {'a frozen copy' if reference is not None else 'the policy with adapters off'}")

    def sft_model(tokens, padding_mask=None):  # the reference's forward: the frozen copy, or adapters off
        with reference_model(model, reference) as ref:
            return ref(tokens, padding_mask=padding_mask)

    def ref_scores(batch):  # (chosen (b,), rejected (b,)) sequence log-probs under the reference
        return pair_logprobs(sft_model, batch.to(device), average=cfg.average_logprobs)

    # 2. the pairs (the world's, the user's, or AI feedback from principles), encoded with the chat template
    pairs = preference_splits(seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                              train_file=cfg.train_file, skip_bad=cfg.skip_bad, export_dir=out,
                              log=lambda m: print(f"[{CHAPTER}] {m}"))
    built = None
    if cfg.pairs == "principles":  # before any training: the SFT model's own answers, critiqued and revised
        pairs["train"], built = principle_train_pairs(cfg, out, model, tokenizer, pairs["train"])
    encoded = {}
    for split in ("train", "val"):
        try:
            encoded[split], counts = encode_pairs(tokenizer, pairs[split], T)
        except ValueError as e:
            raise UsageError(f"{split}: {e} (the model's context is {T} tokens)") from None
        print(f"[{CHAPTER}] {split}: {counts['kept']} pairs kept, {counts['truncated']} truncated to {T} tokens, "
              f"{counts['dropped']} dropped (a response cut away entirely)")
    train, val = encoded["train"], encoded["val"]
    eb = cfg.eval_batch_size

    def batches(items):  # fixed order, for the cache and the val evaluation
        return [collate_pairs(items[i:i + eb], pad_id) for i in range(0, len(items), eb)]
    val_batches = batches(val)

    # 3. the reference's log-probs, computed ONCE for every train and val pair
    t0 = time.perf_counter()
    ref_train = cached_reference_logprobs(ref_scores, batches(train))  # chosen (N,), rejected (N,)
    ref_val = cached_reference_logprobs(ref_scores, val_batches)
    print(f"[{CHAPTER}] reference log-probs computed once for {len(train)} train + {len(val)} val pairs "
          f"({time.perf_counter() - t0:.1f}s); mean log pi_ref(chosen) {ref_train.chosen.mean():.2f}, "
          f"(rejected) {ref_train.rejected.mean():.2f}")

    def val_metrics() -> dict:
        """Held-out pairs: DPO loss, implicit-reward accuracy and margin, the policy's own preference
        (log pi(chosen) > log pi(rejected)) and the drift mean(log pi - log pi_ref) on chosen/rejected."""
        with torch.no_grad():
            pc, pr = map(torch.cat, zip(*(pair_logprobs(model, b.to(device), average=cfg.average_logprobs)
                                         for b in val_batches)))  # (Nv,), (Nv,)
        o = dpo_loss(pc, pr, ref_val.chosen, ref_val.rejected, beta=cfg.beta, loss_type=cfg.loss_type,
                     label_smoothing=cfg.label_smoothing, margin=cfg.margin)
        return {"val_loss": o.loss.item(), "val_accuracy": o.accuracy, "val_margin": o.margins.mean().item(),
                "val_logp_accuracy": (pc > pr).float().mean().item(),
                "drift_chosen": (pc - ref_val.chosen).mean().item(),
                "drift_rejected": (pr - ref_val.rejected).mean().item()}

    # 4. before: the SFT model on the val pairs and its greedy answers to the test prompts
    test = pairs["test"]
    before = val_metrics()
    conversations = [p.example().messages[:-1] for p in test]
    sft_answers = respond(model, tokenizer, conversations, cfg.max_new_tokens, batch_size=eb) if test else []
    print(f"[{CHAPTER}] before DPO (the SFT model): val log pi(chosen) > log pi(rejected) on "
          f"{before['val_logp_accuracy']:.1%} of {len(val)} pairs; implicit margins are 0 (policy = reference)")

    # 5. the optimizer, the step count, resume
    optimizer = AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    max_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_frac * max_steps)
    identity = {"model": dataclasses.asdict(model.cfg), "method": described}
    print(f"[{CHAPTER}] {cfg.loss_type} loss, beta {cfg.beta:g}, "
          f"{'length-averaged' if cfg.average_logprobs else 'summed'} log-probs; {max_steps} steps x "
          f"{cfg.batch_size} pairs, LR {cfg.lr:g}")
    start_step, last_good = 0, None
    if cfg.resume:
        state, last_good, notes = resume_run(out, cfg, model=model, optimizer=optimizer, config=identity,
                                             ignore=NOT_THE_RUN, device=device)
        start_step = state["step"]
        print(f"[{CHAPTER}] resumed from {last_good} at step {start_step}" + "".join(f"; {n}" for n in notes if n))

    def save(step: int) -> Path:
        return save_rotating(out, step=step, keep_last=1, model=model, optimizer=optimizer, config=identity,
                             extra={"train": dataclasses.asdict(cfg), "finished": step >= max_steps,
                                    "tokenizer_state": tokenizer.state()})


    # 6. the loop: pairs -> policy log-probs (one pass, 2B rows) -> DPO loss vs cached reference -> AdamW
    done, train_time = start_step, 0.0
    trained = [p for p in model.parameters() if p.requires_grad]
    with InterruptGuard() as interrupt, MetricsLogger(out / "metrics.jsonl", resume=cfg.resume) as logger, \
            tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=CHAPTER, mininterval=1.0,
                 disable=None) as bar:
        for step in bar:
            t0 = time.perf_counter()
            lr = warmup_cosine_lr(step, max_lr=cfg.lr, warmup_steps=warmup, total_steps=max_steps, min_lr=cfg.lr / 10)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = epoch_batch(step, len(train), cfg.batch_size, cfg.seed)  # (b,): a seeded permutation per epoch
            batch = collate_pairs([train[i] for i in idx.tolist()], pad_id).to(device)
            pc, pr = pair_logprobs(model, batch, average=cfg.average_logprobs)  # (b,), (b,) with gradient
            rc, rr = ref_train.take(idx)
            o = dpo_loss(pc, pr, rc.to(device), rr.to(device), beta=cfg.beta, loss_type=cfg.loss_type,
                         label_smoothing=cfg.label_smoothing, margin=cfg.margin)
            o.loss.backward()
            loss = check_finite(o.loss.item(), step, last_good)
            grad_norm = check_finite(clip_grad_norm(trained, cfg.grad_clip or math.inf), step, last_good,
                                     what="gradient norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_time += time.perf_counter() - t0

            done = step + 1
            row = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "accuracy": o.accuracy,
                   "margin": o.margins.mean().item(), "chosen_reward": o.chosen_rewards.mean().item(),
                   "rejected_reward": o.rejected_rewards.mean().item()}
            if done % cfg.eval_every == 0 or done == max_steps:
                row.update(val_metrics())
                tqdm.write(f"step {done:5d}  loss {loss:.4f}  margin {row['margin']:+.3f}  val acc "
                           f"{row['val_accuracy']:.1%}  val margin {row['val_margin']:+.3f}  drift(chosen) "
                           f"{row['drift_chosen']:+.2f}  lr {lr:.2e}")
            logger.log(**row)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if done % cfg.ckpt_every == 0 or done == max_steps or interrupt.requested:
                last_good = save(done)
            if interrupt.requested:
                break
    finished = done >= max_steps

    # 7. after: val before vs after, the gold scorer's win rate against the SFT model, plots, the export
    after = val_metrics()
    dpo_answers = respond(model, tokenizer, conversations, cfg.max_new_tokens, batch_size=eb) if test else []
    examples = [p.example() for p in test]
    w = win_rate([gold_score(e, a) for e, a in zip(examples, dpo_answers)],
                 [gold_score(e, a) for e, a in zip(examples, sft_answers)])
    win = {**{k: w[k] for k in ("win_rate", "tie_rate", "loss_rate", "wins", "ties", "losses")},
           "gold_sft": w["mean_old"], "gold_dpo": w["mean_new"], "n_test": w["n"]}
    kl = {"kl": None, "kl_se": None, "n": 0}  # KL(pi_DPO || pi_SFT) on answers sampled from the DPO model
    if test and cfg.kl_samples:
        kl = policy_kl(model, sft_model, tokenizer, conversations, cfg.sample_tokens, samples_per_prompt=cfg.kl_samples,
                       temperature=cfg.sample_temperature, batch_size=eb,
                       generator=torch.Generator().manual_seed(cfg.seed + 1))
    table = [{"model": "SFT (before)", "val_acc": before["val_accuracy"], "val_margin": before["val_margin"],
              "val_logp_acc": before["val_logp_accuracy"], "gold": win["gold_sft"]},
             {"model": "DPO (after)", "val_acc": after["val_accuracy"], "val_margin": after["val_margin"],
              "val_logp_acc": after["val_logp_accuracy"], "gold": win["gold_dpo"]}]
    print(markdown_table(table, ["model", "val_acc", "val_margin", "val_logp_acc", "gold"], digits=3))
    if kl["kl"] is not None:
        print(f"[{CHAPTER}] KL(pi_DPO || pi_SFT) on {kl['n']} sampled test answers: {kl['kl']:.3f} nats per answer"
              + (f" (+- {kl['kl_se']:.3f} s.e.)" if kl["kl_se"] is not None else ""))
    if test:
        print(f"[{CHAPTER}] gold win rate of DPO vs SFT on {w['n']} test prompts: {w['wins']} wins, {w['ties']} ties, "
              f"{w['losses']} losses -> win rate {w['win_rate']:.1%} (ties {w['tie_rate']:.1%})")
        for e, s, d in list(zip(examples, sft_answers, dpo_answers))[:cfg.show]:
            print(f"--- {e.task}: {e.messages[-2]['content'][:120]!r}\n    SFT: {s[:160]!r}\n    DPO: {d[:160]!r}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    evals = [r for r in rows if "val_accuracy" in r]
    if cfg.plots and rows:
        steps = [r["step"] for r in rows]
        plot_lines(out / "dpo_loss.png", {"train loss": (steps, [r["loss"] for r in rows]),
                                          "val loss": ([r["step"] for r in evals], [r["val_loss"] for r in evals])},
                   hlines={"log 2 (policy = reference)": math.log(2)} if cfg.loss_type == "sigmoid" else None,
                   title=f"{CHAPTER}: {cfg.loss_type}, beta {cfg.beta:g}", xlabel="step", ylabel="loss")
        ev = [r["step"] for r in evals]
        plot_lines(out / "dpo_val.png", {"val accuracy": (ev, [r["val_accuracy"] for r in evals]),
                                         "val margin": (ev, [r["val_margin"] for r in evals]),
                                         "drift (chosen)": (ev, [r["drift_chosen"] for r in evals])},
                   title=f"{CHAPTER}: held-out pairs", xlabel="step", ylabel="accuracy / nats")
    exported = export_model(model) if finished else None
    if exported is not None:
        save_checkpoint(out / "model.pt", model=exported, step=done, config={"model": dataclasses.asdict(model.cfg)},
                        extra={"tokenizer_state": tokenizer.state(), "finished": True,
                               "method": f"DPO ({cfg.loss_type}, beta {cfg.beta:g}, {described})"})
    summary = {
        "chapter": CHAPTER, "method": described, "pairs": cfg.pairs, "loss_type": cfg.loss_type, "beta": cfg.beta,
        "reference": cfg.reference, "sft_model": str(sft_path), "steps": done, "max_steps": max_steps,
        "finished": finished, "trainable_params": trainable, "total_params": total,
        "step_time_s": train_time / max(done - start_step, 1), "n_train": len(train), "n_val": len(val),
        "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None,
        "val_before": before, "val_after": after, **win, "kl_to_sft": kl["kl"], "kl_to_sft_se": kl["kl_se"],
        "principle_pairs": built,
        "model": str(out / "model.pt") if exported is not None else None, "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    if not finished:
        raise interrupted(CHAPTER, done, max_steps, last_good, argv)
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

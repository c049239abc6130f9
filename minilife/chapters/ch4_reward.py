"""Chapter 4: a reward model from chapter 3's chat model, trained on preference pairs, loop written out.

    python -m minilife.chapters.ch4_reward       # ~2.5 min on 2 cores once ch3_sft's model exists (--smoke: ~5 s)

prints the preference data (pairs kept / truncated / dropped at the context), the SFT model's answers
sampled for the test prompts (the answers the reward model never sees in training), the Bradley-Terry
loop with its metrics every ``--eval-every`` steps (loss, accuracy and margin on the batch and on the
held-out val pairs), then a before/after table -- held-out (val, test) pairwise accuracy and mean margin,
and agreement with the gold scorer on the SFT samples (the share of same-prompt answer pairs the reward
orders as ``gold_score`` does, Spearman and Pearson correlation) -- and the accuracy per failure kind.
Writes metrics.jsonl, reward_curves.png, reward_vs_gold.png, summary.json and
``reward.pt`` (``align.reward.save_reward_model``: trunk + head, LoRA merged, the chat tokenizer, and the
reward's mean/std on the SFT samples, with which PPO normalises) to runs/ch4_reward/.

The default run (1600 pairs, 100 steps of 16 pairs, LR 3e-4, centring 0.01; 142 s of CPU with --threads
1, 4.0 min wall on 2 cores shared with other jobs) takes the held-out pairwise accuracy from 44% / 51%
(val / test; the untrained head: chance) to 95% / 94% (mean margin 3.6 / 3.5). Per failure kind (val +
test): robotic, vague, over-refusal and compliance 100%, verbose 97%, wrong 71% (a changed date, number
or name: the 1M-parameter trunk barely checks facts, as chapter 3's exact fields showed). On the 400
answers sampled from the SFT model for the 100 test prompts, the reward orders 59% of the 237 same-prompt
pairs with different gold scores as gold does (51% before training), with Spearman 0.40 and Pearson 0.47
against gold (0.16 / 0.08 before): above chance, far below the 94% on the pairs -- the SFT model's own
answers do not fail the way the planted rejections do. That gap is what a policy optimising this reward
can exploit. Reward on those samples: mean +1.22, std 1.15.

What it implements (read ``main`` top to bottom; it is the loop)
- the reward model: ``align.reward.RewardModel.from_gpt`` of chapter 3's chat model (``--sft``; default
  ``artifacts.ensure_sft``, trained if missing): InstructGPT initialises its reward model from the SFT
  model (Ouyang et al. 2022, sec. 3.5). A scalar head read at each row's last real token. Full
  fine-tuning, LoRA on the trunk (``--lora-rank``), or the head alone (``--freeze-trunk``); the head
  always trains.
- data: the world's performance reviews (``data.preferences.make_preference_set``: train/val/test) or the
  user's preference JSONL (``--train-file``; val pairs held out of it), encoded with the chat template by
  ``align.pairs`` and cut after the assistant's closing <|end|> (``align.reward.end_at_response``): the
  reward is read at the token a sampled answer ends with, in training and when PPO scores a rollout.
- the step: a batch of pairs (a seeded permutation per epoch, so a resumed run sees the same batches),
  one forward pass over the 2B chosen+rejected rows (``PairBatch``) -> rewards (2B,) ->
  ``bradley_terry_loss(r_chosen, r_rejected, margin, center_coef)`` (InstructGPT eq. 1, Llama 2's margin,
  reward centring), backward, clipping, AdamW with warmup + cosine; the NaN guard; Ctrl-C saves; --resume.
- after: held-out accuracy before/after, accuracy per failure kind, agreement with ``gold_score`` on
  answers sampled from the SFT model (``align.rollout.sample_rollouts``) and scored by the reward model
  exactly as PPO will score its rollouts, the reward's mean/std on them, plots, ``reward.pt``.

What it leaves out: ranking losses over k > 2 answers per prompt in one batch (InstructGPT's K choose 2
per prompt; ``data.preferences.pairs_from_ranking`` makes the pairs), ensembles and uncertainty,
per-token (process) rewards, on-policy relabelling, and length debiasing.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from minilife.align.pairs import collate_pairs, encode_pairs
from minilife.align.reward import (RewardModel, bradley_terry_loss, end_at_response, gold_agreement,
                                   save_reward_model)
from minilife.align.rollout import sample_rollouts
from minilife.artifacts import ensure_sft, load_pretrained
from minilife.checkpoint import check_finite
from minilife.common import (MetricsLogger, UsageError, check_flags, cli_field, config_from_args, fmt_count,
                             markdown_table, read_jsonl, start_run, write_json_atomic)
from minilife.data.preferences import KINDS, gold_score, preference_splits
from minilife.model.finetune import apply_method, optimizer_groups, trainable_parameters
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.schedule import warmup_cosine_lr
from minilife.plots import plot_lines
from minilife.runs import InterruptGuard, ResumableConfig, cli, interrupted, prepare_run_dir, resume_run, save_rotating
from minilife.train import epoch_batch

CHAPTER = "ch4_reward"
NOT_THE_RUN = ("smoke", "out", "threads", "debug", "device", "resume", "overwrite", "allow_change", "plots",
               "eval_every", "ckpt_every", "eval_batch_size", "sft", "max_new_tokens", "n_test", "samples",
               "temperature", "skip_bad")


@dataclass
class RewardConfig(ResumableConfig):
    """Train a reward model (chapter 3's chat model + a scalar head) on preference pairs."""
    seed: int = cli_field(1337, "seed for the pair order, the head's and LoRA's init, and the sampled answers")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    sft: Optional[str] = cli_field(None, "chapter 3's chat model.pt (default: ch3_sft's, trained if missing)")
    train_file: Optional[str] = cli_field(None, "your own preference JSONL {prompt, chosen, rejected} (default: "
                                                "the world's performance reviews)")
    skip_bad: bool = cli_field(False, "skip malformed lines of --train-file (counted) instead of stopping")
    n_train: int = cli_field(1600, "world preference pairs to train on", smoke=48)
    n_val: int = cli_field(100, "held-out val pairs (accuracy and margin during training)", smoke=12)
    n_test: int = cli_field(100, "held-out test pairs; their prompts get SFT samples for the gold agreement",
                            smoke=6)
    samples: int = cli_field(4, "answers sampled from the SFT model per test prompt", smoke=2)
    temperature: float = cli_field(1.0, "sampling temperature of those answers")
    max_new_tokens: int = cli_field(96, "answer length cap for the samples", smoke=24)
    lr: float = cli_field(3e-4, "peak learning rate", smoke=1e-3)
    epochs: float = cli_field(1.0, "passes over the train pairs (sets the step count unless --steps)")
    steps: Optional[int] = cli_field(None, "optimizer steps (overrides --epochs)", smoke=8)
    batch_size: int = cli_field(16, "pairs per step (2x rows per forward pass)", smoke=4)
    warmup_frac: float = cli_field(0.1, "share of the steps spent in linear warmup")
    weight_decay: float = cli_field(0.0, "AdamW weight decay")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm (0 = off)")
    margin: float = cli_field(0.0, "Bradley-Terry margin m: the loss asks r_chosen - r_rejected > m")
    center_coef: float = cli_field(0.01, "reward centring: + coef * mean((r_chosen + r_rejected)^2)")
    lora_rank: int = cli_field(0, "LoRA rank on the trunk (0: full fine-tuning); the head always trains")
    lora_alpha: Optional[float] = cli_field(None, "LoRA alpha (None: 2r)")
    freeze_trunk: bool = cli_field(False, "train the head alone (a linear probe on the SFT model's features)")
    eval_every: int = cli_field(25, "steps between val evaluations", smoke=4)
    eval_batch_size: int = cli_field(32, "pairs per eval batch, prompts per generation batch")
    ckpt_every: int = cli_field(1000, "steps between checkpoints (the last step is always saved)", smoke=100)
    plots: bool = cli_field(True, "write reward_curves.png and reward_vs_gold.png")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(n_train=1, n_val=1, n_test=0, samples=1, max_new_tokens=1, steps=1,
                                        batch_size=1, weight_decay=0, grad_clip=0, center_coef=0, lora_rank=0,
                                        eval_every=1, eval_batch_size=1, ckpt_every=1, temperature=0),
                    above=dict(lr=0, epochs=0, lora_alpha=0))
        if not (math.isfinite(self.margin) and math.isfinite(self.center_coef) and 0 <= self.warmup_frac < 1):
            raise ValueError(f"need a finite --margin and --center-coef and --warmup-frac in [0, 1), got "
                             f"{self.margin}, {self.center_coef}, {self.warmup_frac}")
        if self.freeze_trunk and self.lora_rank:
            raise ValueError("--freeze-trunk and --lora-rank contradict each other: freeze the trunk or adapt it")
        if self.lora_alpha is None and self.lora_rank:  # stays None without LoRA: the config round-trips
            self.lora_alpha = 2.0 * self.lora_rank


def main(argv: list[str] | None = None, hook: Callable[[int, RewardModel], None] | None = None) -> dict:
    cfg: RewardConfig = config_from_args(RewardConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, device = start_run(CHAPTER, cfg)
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
    reward_pt = out / "reward.pt"  # a run file (runs.RUN_FILES): never silently replaced, cleared by --overwrite

    # 1. the SFT model (whose answers get scored) and the reward model initialised from it
    sft_path = Path(cfg.sft) if cfg.sft else ensure_sft(cfg.smoke)
    policy, tokenizer = load_pretrained(sft_path, device)  # eval mode: dropout off throughout
    T, pad_id, eb = policy.cfg.context_length, tokenizer.eot_id, cfg.eval_batch_size
    rm = RewardModel.from_gpt(policy).to(device)  # a deep copy + a fresh head N(0, 1/(C+1))
    policy.requires_grad_(False)
    described = "full fine-tuning"
    if cfg.freeze_trunk:
        rm.body.requires_grad_(False)
        described = "head only (trunk frozen)"
    elif cfg.lora_rank:
        described = "LoRA on the trunk: " + apply_method(rm.body, "lora", rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    rm.to(device).eval()
    trainable, total = trainable_parameters(rm)
    print(f"[{CHAPTER}] reward model from {sft_path} ({described} + the head: {fmt_count(trainable)} of "
          f"{fmt_count(total)} parameters train)")

    # 2. the pairs, encoded with the chat template and cut after each answer's closing <|end|>
    pairs = preference_splits(seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                              train_file=cfg.train_file, skip_bad=cfg.skip_bad, export_dir=out,
                              log=lambda m: print(f"[{CHAPTER}] {m}"))
    encoded = {"test": []}  # train and val are never empty; test is with --n-test 0
    for split in [k for k in ("train", "val", "test") if pairs[k]]:
        try:
            kept, counts = encode_pairs(tokenizer, pairs[split], T)
        except ValueError as e:
            raise UsageError(f"{split}: {e} (the model's context is {T} tokens)") from None
        encoded[split] = [end_at_response(e) for e in kept]
        print(f"[{CHAPTER}] {split}: {counts['kept']} pairs kept, {counts['truncated']} truncated to {T} tokens, "
              f"{counts['dropped']} dropped (a response cut away entirely)")
    train, val, test = encoded["train"], encoded["val"], encoded["test"]

    def pair_metrics(items, prefix: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """{prefix_loss, prefix_accuracy, prefix_margin}, the wins (N,) (1, 0, or 1/2 on a tie) and the
        rewards of both answers (2N,) of encoded pairs, in eval batches of ``eb`` pairs, without grad."""
        if not items:
            return dict.fromkeys(f"{prefix}_{k}" for k in ("loss", "accuracy", "margin")), *[torch.zeros(0)] * 2
        with torch.no_grad():
            batches = [collate_pairs(items[i:i + eb], pad_id).to(device) for i in range(0, len(items), eb)]
            rc, rr = (torch.cat(r).cpu() for r in zip(*(rm(b.input_ids, b.padding_mask).chunk(2) for b in batches)))
        bt = bradley_terry_loss(rc, rr, cfg.margin, cfg.center_coef)  # rc, rr (N,): the halves of each (2b,)
        return ({f"{prefix}_loss": bt.loss.item(), f"{prefix}_accuracy": bt.accuracy.item(),
                 f"{prefix}_margin": (rc - rr).mean().item()}, (rc > rr).float() + 0.5 * (rc == rr).float(),
                torch.cat([rc, rr]))

    # 3. the SFT model's answers to the test prompts: sampled once, scored by gold and by the reward model
    examples = [p.example() for p in pairs["test"]]
    rollout = None
    if examples:
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        rollout = sample_rollouts(policy, tokenizer, [e.messages[:-1] for e in examples], cfg.max_new_tokens,
                                  samples_per_prompt=cfg.samples, temperature=cfg.temperature, generator=gen,
                                  batch_size=eb * cfg.samples)
        gold = torch.tensor([gold_score(examples[i], text) for i, text in zip(rollout.prompt_index.tolist(),
                                                                              rollout.texts)])  # (N,)
        print(f"[{CHAPTER}] sampled {len(rollout.texts)} SFT answers ({cfg.samples} per test prompt, temperature "
              f"{cfg.temperature:g}) in {time.perf_counter() - t0:.1f}s; their mean gold score {gold.mean():.3f}")

    def evaluate() -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Held-out metrics (val_*, test_*, gold_*), per-pair wins on val + test, and the reward (N,) of each
        SFT sample, read at its last real token as PPO reads a rollout's."""
        (m, wins_val, _), (m_test, wins_test, _) = pair_metrics(val, "val"), pair_metrics(test, "test")
        m.update(m_test)
        r = g = None
        if rollout is not None:
            with torch.no_grad():
                r = torch.cat([rm(rollout.tokens[i:i + eb], rollout.padding_mask[i:i + eb])
                               for i in range(0, len(rollout.texts), eb)]).cpu()  # (N,)
            g = gold_agreement(r, gold, rollout.prompt_index)
        g = g or dict.fromkeys(("pairs", "agreement", "spearman", "pearson"))
        m.update({f"gold_{k}": v for k, v in g.items()})
        return m, torch.cat([wins_val, wins_test]), r

    before, wins_before, _ = evaluate()
    print(f"[{CHAPTER}] before training (an untrained head): val accuracy {before['val_accuracy']:.1%}")

    # 4. the optimizer, the step count, resume
    optimizer = AdamW(optimizer_groups(rm.body, cfg.weight_decay) + [{"params": list(rm.head.parameters()),
                                                                      "weight_decay": 0.0}],
                      lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    max_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_frac * max_steps)
    identity = {"model": dataclasses.asdict(rm.body.cfg), "method": described}
    print(f"[{CHAPTER}] Bradley-Terry loss, margin {cfg.margin:g}, centring {cfg.center_coef:g}; {max_steps} steps "
          f"x {cfg.batch_size} pairs, LR {cfg.lr:g}")
    start_step, last_good = 0, None
    if cfg.resume:
        state, last_good, notes = resume_run(out, cfg, model=rm, optimizer=optimizer, config=identity,
                                             ignore=NOT_THE_RUN, device=device)
        start_step = state["step"]
        print(f"[{CHAPTER}] resumed from {last_good} at step {start_step}" + "".join(f"; {n}" for n in notes if n))

    def save(step: int) -> Path:
        return save_rotating(out, step=step, keep_last=1, model=rm, optimizer=optimizer, config=identity,
                             extra={"train": dataclasses.asdict(cfg), "finished": step >= max_steps,
                                    "tokenizer_state": tokenizer.state()})


    # 5. the loop: pairs -> rewards (one pass over 2B rows) -> Bradley-Terry loss -> backward -> clip -> AdamW
    done, train_time = start_step, 0.0
    trained = [p for p in rm.parameters() if p.requires_grad]
    with InterruptGuard() as interrupt, MetricsLogger(out / "metrics.jsonl", resume=cfg.resume) as logger, \
            tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=CHAPTER, mininterval=1.0,
                 disable=None) as bar:
        for step in bar:
            t0 = time.perf_counter()
            lr = warmup_cosine_lr(step, max_lr=cfg.lr, warmup_steps=warmup, total_steps=max_steps, min_lr=cfg.lr / 10)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = epoch_batch(step, len(train), cfg.batch_size, cfg.seed)  # (b,): a seeded permutation per epoch
            batch = collate_pairs([train[i] for i in idx.tolist()], pad_id).to(device)  # (2b, T) rows
            rm.train()
            rewards = rm(batch.input_ids, batch.padding_mask)  # (2b,): chosen rows first, then rejected
            rc, rr = rewards[:batch.n_pairs], rewards[batch.n_pairs:]  # (b,), (b,)
            bt = bradley_terry_loss(rc, rr, cfg.margin, cfg.center_coef)
            bt.loss.backward()
            rm.eval()
            loss = check_finite(bt.loss.item(), step, last_good)
            grad_norm = check_finite(clip_grad_norm(trained, cfg.grad_clip or math.inf), step, last_good,
                                     what="gradient norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_time += time.perf_counter() - t0

            done = step + 1
            row = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "accuracy": bt.accuracy.item(),
                   "margin": (rc - rr).mean().item(), "reward_mean": rewards.mean().item()}
            if done % cfg.eval_every == 0 or done == max_steps:
                row.update(pair_metrics(val, "val")[0])
                tqdm.write(f"step {done:5d}  loss {loss:.4f}  acc {row['accuracy']:.1%}  val loss "
                           f"{row['val_loss']:.4f}  val acc {row['val_accuracy']:.1%}  val margin "
                           f"{row['val_margin']:+.3f}  lr {lr:.2e}")
            logger.log(**row)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if hook is not None:
                hook(step, rm)
            if done % cfg.ckpt_every == 0 or done == max_steps or interrupt.requested:
                last_good = save(done)
            if interrupt.requested:
                break
    finished = done >= max_steps

    # 6. after: held-out accuracy and gold agreement before vs after, per kind, the reward's scale, plots
    after, wins_after, r_after = evaluate()
    cols = ["val_accuracy", "val_margin", "test_accuracy", "test_margin", "gold_agreement", "gold_spearman",
            "gold_pearson"]
    print(markdown_table([{"reward model": "before (untrained head)", **before},
                          {"reward model": f"after {done} steps", **after}], ["reward model"] + cols, digits=3))
    kinds = [e.pair.kind or "unlabelled" for e in val + test]  # the kept held-out pairs, in the order of the wins
    by_kind = {k: {"n": kinds.count(k), "accuracy_before": wins_before[[x == k for x in kinds]].mean().item(),
                   "accuracy_after": wins_after[[x == k for x in kinds]].mean().item()}
               for k in (*KINDS, "unlabelled") if k in kinds}
    print(markdown_table([{"kind": k, **v} for k, v in by_kind.items()], ["kind", "n", "accuracy_before",
                                                                         "accuracy_after"], digits=3))
    if r_after is not None:
        reward_mean, reward_std, source = r_after.mean().item(), r_after.std(unbiased=False).item(), "SFT samples"
        print(f"[{CHAPTER}] on {len(r_after)} SFT samples ({after['gold_pairs']} same-prompt pairs with different "
              f"gold scores): reward mean {reward_mean:+.3f}, std {reward_std:.3f} (saved for PPO's normalisation)")
    else:  # no test prompts: the reward's scale on the val answers instead
        both = pair_metrics(val, "val")[2]
        reward_mean, reward_std, source = both.mean().item(), both.std(unbiased=False).item(), "val pair answers"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    evals = [r for r in rows if "val_accuracy" in r]
    if cfg.plots and rows:
        ev, evals = [0] + [r["step"] for r in evals], [before] + evals  # step 0: the untrained head
        plot_lines(out / "reward_curves.png", {"train loss": ([r["step"] for r in rows], [r["loss"] for r in rows]),
                                               "val loss": (ev, [r["val_loss"] for r in evals]),
                                               "val accuracy": (ev, [r["val_accuracy"] for r in evals])},
                   hlines={"log 2 (chance loss)": math.log(2)}, title=f"{CHAPTER}: Bradley-Terry loss, accuracy",
                   xlabel="step", ylabel="loss / accuracy")
        if r_after is not None:
            bins = torch.bucketize(gold, torch.tensor([-0.25, 0.0, 0.25, 0.5, 0.75]), right=True)  # (N,) 0..5
            used = sorted(set(bins.tolist()))  # gold in [-0.5, 1]: bins of width 0.25, centre -0.375 + 0.25 k
            plot_lines(out / "reward_vs_gold.png", {"mean reward per gold bin of 0.25": (
                           [-0.375 + 0.25 * k for k in used], [r_after[bins == k].mean().item() for k in used])},
                       points={"one SFT sample": (gold.tolist(), r_after.tolist())},
                       title=f"{CHAPTER}: reward vs gold on SFT samples", xlabel="gold score", ylabel="reward")
    if finished:
        save_reward_model(reward_pt, rm, tokenizer, extra={
            "reward_mean": reward_mean, "reward_std": reward_std, "reward_stats_on": source, "finished": True,
            "sft_model": str(sft_path), "method": described, "steps": done,
            "val_accuracy": after["val_accuracy"], "gold_agreement": after["gold_agreement"]})
    summary = {
        "chapter": CHAPTER, "method": described, "sft_model": str(sft_path), "steps": done, "max_steps": max_steps,
        "finished": finished, "trainable_params": trainable, "total_params": total,
        "step_time_s": train_time / max(done - start_step, 1), "n_train": len(train), "n_val": len(val),
        "n_test": len(test), "n_samples": len(rollout.texts) if rollout is not None else 0,
        "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None,
        "before": before, "after": after, "by_kind": by_kind, "reward_mean": reward_mean, "reward_std": reward_std,
        "reward_stats_on": source, "gold_sft_mean": gold.mean().item() if rollout is not None else None,
        "reward_model": str(reward_pt) if finished else None, "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    if not finished:
        raise interrupted(CHAPTER, done, max_steps, last_good, argv)
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

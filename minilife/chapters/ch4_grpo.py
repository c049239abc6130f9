"""Chapter 4: GRPO (and REINFORCE with a baseline) on chapter 3's chat model, rewarded by the world's checker.

    python -m minilife.chapters.ch4_grpo          # ~2 min on 2 cores once ch3_sft's model exists (--smoke: ~5 s)

prints the prompt pool and, per iteration, the sampled answers' reward, gold score, share of exact
answers, KL to the reference, entropy, clip fraction and the groups whose G rewards all tie (no signal);
then the greedy answers of the SFT and the RL model side by side: exact-field accuracy per task on the
test prompts and on the pool RL trained on, pass@G of the pool (the share of prompts with an exact answer
among G samples), the gold score and the gold win rate against SFT. Writes metrics.jsonl, grpo_curves.png,
grpo_diagnostics.png, summary.json and ``model.pt`` (plain GPT weights, LoRA merged, with the chat
tokenizer) to runs/ch4_grpo/; with ``--reward model`` and a ch4_ppo run, also ppo_vs_grpo.png.

RL can only reinforce answers the policy samples. Measured on the SFT model (8-16 samples per prompt at
temperature 1): the answers that must be copied out of an e-mail are never sampled right (date JSON
with an event: 0 of 16 samples on any of 24 e-mails; replies and action items: pass@16 = 0), so no
verifiable reward can push them; what does get sampled is the closed-book facts of ``benign`` (greedy
29% exact on train prompts, pass@16 79%). The default run trains there: a pool of 24 benign prompts,
30 iterations x 8 prompts x G=8 answers (1920 samples, 60 AdamW steps at LR 5e-5; 1 min 39 s with
--threads 1 on 2 cores, 2 min 06 s when they were busier). The sampled reward rises from 0.17 (first
5 iterations) to 0.30 (last 5); on the pool, greedy exact goes 29.2% -> 41.7% and sampled exact 15.6%
-> 27.6%, while pass@8 stays 66.7% (RL sharpens what was there: nothing new is found); KL to the SFT
model 0.84 nats per answer. On the
held-out test prompts nothing moves: benign 9.5% -> 9.5%, all tasks 18.0% -> 17.7% exact, gold 0.327
-> 0.324 (9 wins, 280 ties, 11 losses), action-item format 98% -> 88%: the facts RL reinforced belong to
the pool's people, and the 1M-parameter model does not know the test people's. With ``--tasks
benign,date_json --n-prompts 32 --iterations 40`` the date JSON pool stays at its pass@8 of 18.8% (the
e-mails without an event); at LR 1e-4 the action-item format collapses (98% -> 16%). ``--algo
reinforce`` (the batch mean as baseline, the same samples) does as well here: pool greedy exact 29.2%
-> 45.8%, sampled 15.6% -> 28.6%, KL 0.64 (one task, rewards on one scale: the group baseline adds little).

PPO vs GRPO on the reward model, the same budget (ch4_ppo's: 20 iterations x 28 answers, 80 AdamW
steps at LR 1e-4; ``--reward model --group-size 4 --prompts-per-iter 7 --iterations 20
--minibatch-size 7 --lr 1e-4``): neither raises the learned reward of its samples (PPO -0.08 -> -0.11,
GRPO -0.15 -> -0.31, means of the first/last 5 iterations); PPO's gold about holds (0.30 -> 0.28, rollout
KL 1.5 nats per answer, its KL penalty 0.2 per token in the reward) while GRPO's falls (0.27 -> 0.09, KL 5.8:
``--kl-beta`` 0.04 as a loss term holds the policy less) and its greedy test gold drops 0.327 -> 0.241
(65 losses in 300). With 28 answers per iteration a critic-free group baseline of 4 samples is noisy.

What it implements (read ``main`` top to bottom; it is the loop)
- policy: chapter 3's exported chat model (``--sft``; default ``artifacts.ensure_sft``, trained if
  missing), full fine-tuning or LoRA (``--lora-rank``); reference: a frozen copy, or the LoRA policy
  with its adapters off (``--reference adapters-off``).
- rewards: verifiable (``align.verifiable``: the checker's graded score, or a weighted sum of score,
  exact and format, ``--reward-terms``), or ch4_reward's reward model (``--reward model``), normalised
  with its mean/std on SFT samples (``align.policy.rollout_rewards``). The gold score of every sampled
  answer (``data.preferences.gold_score``) is logged beside it, never trained on.
- an iteration: ``--prompts-per-iter`` pool prompts (seeded permutations) -> G = ``--group-size``
  answers each, sampled with the KV cache (no grad) -> rewards -> advantages: GRPO's (r - mean) / std
  within each group (Shao et al. 2024, sec. 4.1.2; ``--no-std-norm``: Dr. GRPO's mean only), or
  REINFORCE's r - mean(batch) (``--algo reinforce``) -> old and reference log-probs (no grad, the
  sampling temperature) -> the KL check -> ``--inner-epochs`` passes of minibatch updates: log-probs
  with grad, ``align.grpo.grpo_loss`` (the clipped surrogate + ``--kl-beta`` x KL_t as a loss term,
  ``--aggregation`` token-mean / seq-mean / seq-mean-token-sum-norm), backward, clipping, AdamW. With one
  epoch and one minibatch the ratio is 1 and the surrogate's gradient is exactly REINFORCE's.
- seatbelts: a NaN/inf loss, gradient or weight stops the run before saving (``check_finite``); a
  policy whose KL to the reference (``--kl-kind`` summed over an answer, mean over its samples) passes
  ``--max-kl`` is neither trained on nor saved: the run stops naming the cause and the last good
  checkpoint (a periodic checkpoint holds a policy measured within the bound; the final one is measured on
  its pool samples before model.pt is written). ``--resume`` continues from the last checkpoint.

What it leaves out: several reward functions per task, RLOO's leave-one-out baseline, DAPO's dynamic
sampling of groups with signal, a learning-rate schedule, the reference update of iterative GRPO.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from minilife.align.evaluate import curve_ends, greedy_eval, win_rate
from minilife.align.grpo import group_advantages, grpo_loss, reinforce_baseline_advantages
from minilife.align.kl import KL_KINDS, kl_estimate
from minilife.align.logprobs import masked_sum
from minilife.align.policy import rollout_rewards
from minilife.align.ppo import AGGREGATIONS, aggregate
from minilife.align.reward import load_policy_reward
from minilife.align.rollout import Rollout, rollout_logprobs, sample_rollouts
from minilife.align.verifiable import (parse_reward_terms, parse_tasks, pass_at_k, select_tasks,
                                       verifiable_rewards)
from minilife.artifacts import ensure_reward, ensure_sft, load_pretrained
from minilife.checkpoint import check_finite, save_checkpoint
from minilife.common import (MetricsLogger, UsageError, check_flags, cli_field, config_from_args, fmt_count,
                             markdown_table, read_jsonl, start_run, write_json_atomic)
from minilife.data.preferences import gold_score
from minilife.data.shadowing import ALL_TASKS, make_shadowing_set
from minilife.data.shadowing_checks import score_responses
from minilife.model.finetune import apply_method, export_model, optimizer_groups, trainable_parameters
from minilife.model.peft import reference_model
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.plots import plot_lines
from minilife.runs import InterruptGuard, ResumableConfig, cli, interrupted, prepare_run_dir, resume_run, save_rotating

CHAPTER = "ch4_grpo"
NOT_THE_RUN = ("smoke", "out", "threads", "debug", "device", "resume", "overwrite", "allow_change", "plots",
               "ckpt_every", "show", "eval_batch_size", "sft", "eval_new_tokens", "n_test", "ppo_run", "max_kl",
               "n_pool_eval")
ALGOS = ("grpo", "reinforce")
REWARDS = ("verifiable", "model")
REFERENCES = ("copy", "adapters-off")
VERIFIABLE_TASKS = "benign"  # where SFT's samples often hold the gold answer that its greedy one misses (measured)
VERIFIABLE_POOL = 24  # prompts RL samples from with verifiable rewards: each seen ~10 times in the default run


@dataclass
class GRPOConfig(ResumableConfig):
    """Train chapter 3's chat model with GRPO (or REINFORCE with a baseline) on verifiable or learned rewards."""
    seed: int = cli_field(1337, "seed for the splits, the prompt order, the sampling and LoRA's init")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    sft: Optional[str] = cli_field(None, "chapter 3's chat model.pt (default: ch3_sft's, trained if missing)")
    algo: str = cli_field("grpo", "grpo (group-normalised advantages) | reinforce (r - batch mean)")
    reward: str = cli_field("verifiable", "verifiable (the world's checker) | model (ch4_reward's reward model)")
    reward_model: Optional[str] = cli_field(None, "with --reward model: a reward.pt (default: ch4_reward's)")
    reward_terms: str = cli_field("score=1", "verifiable reward: weighted checker terms score (fraction of gold "
                                             "fields right), exact (all right), format (the task's shape)")
    tasks: Optional[str] = cli_field(None, f"the tasks whose train prompts RL samples, e.g. date_json,policy_qa or "
                                           f"all (default: {VERIFIABLE_TASKS} if verifiable, else all)")
    n_train: int = cli_field(2000, "shadowing train examples drawn (all tasks; --tasks keeps some)", smoke=120)
    n_prompts: Optional[int] = cli_field(None, f"the pool: the first N train prompts of --tasks (default: "
                                               f"{VERIFIABLE_POOL} if verifiable, else all)")
    n_pool_eval: int = cli_field(100, "pool prompts evaluated before/after (greedy, and G samples each)", smoke=4)
    n_test: int = cli_field(300, "test examples (all tasks) answered greedily before and after", smoke=14)
    group_size: int = cli_field(8, "answers sampled per prompt, G (GRPO needs >= 2)", smoke=4)
    prompts_per_iter: int = cli_field(8, "prompts per iteration (G x this answers)", smoke=2)
    iterations: int = cli_field(30, "rollout + update iterations", smoke=3)
    inner_epochs: int = cli_field(1, "passes over each iteration's answers")
    minibatch_size: int = cli_field(32, "answers per optimizer step", smoke=4)
    std_norm: bool = cli_field(True, "divide by the group's std (--no-std-norm: Dr. GRPO's mean-only advantages)")
    aggregation: str = cli_field("token-mean", f"loss over tokens: one of {', '.join(AGGREGATIONS)}")
    clip_eps: float = cli_field(0.2, "ratio clip epsilon")
    kl_beta: float = cli_field(0.04, "weight of the KL-to-reference loss term (0: none)")
    kl_kind: str = cli_field("k3", f"KL estimator (loss and monitor): one of {', '.join(KL_KINDS)}")
    max_kl: float = cli_field(20.0, "stop when the policy's KL to the reference (nats per answer) passes this")
    temperature: float = cli_field(1.0, "sampling temperature (the log-probs use the same)")
    max_new_tokens: int = cli_field(64, "answer length cap while sampling", smoke=24)
    missing_eos_penalty: float = cli_field(0.0, "subtracted from the reward of answers cut at the cap")
    lr: float = cli_field(5e-5, "learning rate (constant)", smoke=1e-4)
    weight_decay: float = cli_field(0.0, "AdamW weight decay")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm (0 = off)")
    lora_rank: int = cli_field(0, "LoRA rank on the policy (0: full fine-tuning)")
    lora_alpha: Optional[float] = cli_field(None, "LoRA alpha (None: 2r)")
    reference: str = cli_field("copy", "copy (a frozen copy of the SFT model) | adapters-off (needs --lora-rank)")
    eval_batch_size: int = cli_field(64, "prompts per generation batch in the evaluation")
    eval_new_tokens: int = cli_field(96, "answer length cap of the greedy answers", smoke=24)
    ckpt_every: int = cli_field(4, "iterations between checkpoints (the last is always saved)", smoke=1)
    ppo_run: Optional[str] = cli_field(None, "a ch4_ppo run dir to compare with (default: runs/ch4_ppo)")
    show: int = cli_field(2, "test answers printed side by side (SFT vs RL)")
    plots: bool = cli_field(True, "write the PNG plots")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(n_train=1, n_prompts=1, n_pool_eval=0, n_test=0, group_size=1,
                                        prompts_per_iter=1, iterations=1, inner_epochs=1, minibatch_size=1,
                                        kl_beta=0, missing_eos_penalty=0, weight_decay=0, grad_clip=0, lora_rank=0,
                                        eval_batch_size=1, max_new_tokens=1, eval_new_tokens=1, ckpt_every=1, show=0),
                    above=dict(clip_eps=0, max_kl=0, temperature=0, lr=0, lora_alpha=0),
                    choices=dict(algo=ALGOS, reward=REWARDS, aggregation=AGGREGATIONS, kl_kind=KL_KINDS,
                                 reference=REFERENCES))
        if self.algo == "grpo" and self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 for GRPO (a group of one is its own baseline: every "
                             f"advantage would be 0), got {self.group_size}; or use --algo reinforce")
        if not all(math.isfinite(v) for v in (self.kl_beta, self.max_kl, self.lr)) or not self.clip_eps < 1:
            raise ValueError(f"need finite --kl-beta, --max-kl and --lr, and --clip-eps in (0, 1); got "
                             f"{self.kl_beta}, {self.max_kl}, {self.lr}, {self.clip_eps}")
        if self.reference == "adapters-off" and self.lora_rank == 0:
            raise ValueError("--reference adapters-off needs LoRA on the policy (--lora-rank R > 0)")
        if self.reward_model and self.reward != "model":
            raise ValueError("--reward-model goes with --reward model")
        verifiable = self.reward == "verifiable"
        self.lora_alpha = 2.0 * self.lora_rank if self.lora_alpha is None and self.lora_rank else self.lora_alpha
        self.tasks = (VERIFIABLE_TASKS if verifiable else "all") if self.tasks is None else self.tasks
        self.n_prompts = VERIFIABLE_POOL if self.n_prompts is None and verifiable else self.n_prompts
        self.reward_weights = parse_reward_terms(self.reward_terms)
        parse_tasks(self.tasks)


def load_reward(cfg: GRPOConfig, model, sft_path: Path, tokenizer, device, train: list
                ) -> Callable[[Rollout, list], torch.Tensor]:
    """rewards(rollout, examples) -> (B,): the checker's terms, or the reward model's normalised score
    (its statistics from reward.pt, else measured on answers of the SFT ``model`` to the last ``train`` prompts)."""
    if cfg.reward == "verifiable":
        def verifiable(rollout, examples):
            r = verifiable_rewards(examples, rollout.texts, cfg.reward_weights)[0].to(device)  # (B,)
            return r - cfg.missing_eos_penalty * (~rollout.ended).float()
        print(f"[{CHAPTER}] reward: the checker (verifiable), {cfg.reward_terms}")
        return verifiable
    path = Path(cfg.reward_model) if cfg.reward_model else ensure_reward(cfg.smoke)
    try:
        reward_model, (mean, std), stats_from = load_policy_reward(
            path, tokenizer, policy_name=f"policy {sft_path}", device=device, sft=model,
            prompts=[e.messages[:-1] for e in train[-64:]], max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"[{CHAPTER}] reward: the reward model {path} (normalised with mean {mean:.3f}, std {std:.3f}: "
          f"{stats_from})")
    return lambda rollout, examples: rollout_rewards(reward_model, rollout, mean=mean, std=std,
                                                     missing_eos_penalty=cfg.missing_eos_penalty or None)


def main(argv: list[str] | None = None, hook: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """``hook(iteration, model)`` runs after each iteration's updates (fault injection for tests)."""
    cfg: GRPOConfig = config_from_args(GRPOConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, device = start_run(CHAPTER, cfg)
    prepare_run_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)

    # 1. the policy: chapter 3's chat model; the reference: a frozen copy, or the same model with adapters off
    sft_path = Path(cfg.sft) if cfg.sft else ensure_sft(cfg.smoke)
    model, tokenizer = load_pretrained(sft_path, device)  # eval mode: dropout off throughout
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.reference == "copy" else None
    described, total = "full fine-tuning", model.num_params()
    if cfg.lora_rank:
        described = apply_method(model, "lora", rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    model.to(device).eval()
    trainable = trainable_parameters(model)[0]
    print(f"[{CHAPTER}] policy {sft_path} ({described}: {fmt_count(trainable)} of {fmt_count(total)} parameters "
          f"train); reference: {'a frozen copy' if reference is not None else 'the policy with adapters off'}")

    def ref_logprobs(rollout: Rollout) -> torch.Tensor:  # (B, W) log pi_ref of the sampled tokens
        with reference_model(model, reference) as ref:  # the frozen copy, or the policy with adapters off
            return rollout_logprobs(ref, rollout, temperature=cfg.temperature)

    def kl_per_answer(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_sum(kl_estimate(logp, logp_ref, cfg.kl_kind), mask)  # (B, W) -> (B,) nats per answer

    # 2. the prompts (the train split of --tasks: the pool RL samples from) and the reward
    tasks = parse_tasks(cfg.tasks)
    world = make_shadowing_set(seed=cfg.seed, n_train=cfg.n_train, n_val=0, n_test=cfg.n_test)  # ch3_sft's splits
    prompts, test = select_tasks(world["train"], tasks)[:cfg.n_prompts], world["test"]
    if not prompts:
        raise UsageError(f"--tasks {cfg.tasks}: no train prompts among {cfg.n_train} examples; raise --n-train")
    rewards_of = load_reward(cfg, model, sft_path, tokenizer, device, world["train"])  # the SFT model: not trained yet
    G, P = cfg.group_size, cfg.prompts_per_iter
    B = G * P  # answers per iteration
    steps_per_iter = cfg.inner_epochs * math.ceil(B / cfg.minibatch_size)
    print(f"[{CHAPTER}] a pool of {len(prompts)} train prompts ({', '.join(tasks)}); {cfg.iterations} iterations x "
          f"{P} prompts x G={G} answers = {cfg.iterations * B} sampled answers, {cfg.iterations * steps_per_iter} "
          f"optimizer steps; {cfg.algo}{' (no std norm)' if cfg.algo == 'grpo' and not cfg.std_norm else ''}, "
          f"{cfg.aggregation}, kl_beta {cfg.kl_beta:g} ({cfg.kl_kind}), clip {cfg.clip_eps:g}, LR {cfg.lr:g}")

    # 3. before: greedy answers to the test prompts (all tasks) and to the pool; G sampled ones per pool prompt
    pool = prompts[:cfg.n_pool_eval]

    def evaluate(policy) -> dict:
        """Greedy answers (checker, gold) to the test prompts and to the first pool prompts; on G sampled answers
        per pool prompt: pass@G (what RL can reinforce at all), the reward, and the KL of ``policy`` to the
        reference (nats per answer)."""
        greedy = greedy_eval(policy, tokenizer, test + pool, cfg.eval_new_tokens, batch_size=cfg.eval_batch_size)
        answers, pool_answers = greedy["texts"][:len(test)], greedy["texts"][len(test):]
        result = {"answers": answers, "gold": greedy["gold"][:len(test)],
                  "scores": score_responses(test, answers) if test else None,
                  "pool": score_responses(pool, pool_answers) if pool else None, "sampled": None, "kl": None}
        if pool:
            with torch.no_grad():
                ro = sample_rollouts(policy, tokenizer, [e.messages[:-1] for e in pool], cfg.max_new_tokens,
                                     samples_per_prompt=G, temperature=cfg.temperature, batch_size=cfg.eval_batch_size,
                                     generator=torch.Generator().manual_seed(cfg.seed + 11))
                rows = [pool[i] for i in ro.prompt_index.tolist()]  # (N * G,) the prompt of each answer
                kl = torch.cat([kl_per_answer(rollout_logprobs(policy, part, temperature=cfg.temperature),
                                              ref_logprobs(part), part.response_mask)  # (b,) per chunk of rows
                                for part in map(ro.select, torch.arange(len(rows)).split(cfg.eval_batch_size))])
                result.update(sampled={**pass_at_k(rows, ro.texts, G), "reward": rewards_of(ro, rows).mean().item()},
                              kl=kl.mean().item())
        return result

    t_eval = time.perf_counter()
    before = evaluate(model)  # not trained yet: the SFT model (LoRA's B starts at 0)
    if test:
        print(f"[{CHAPTER}] before (the SFT model, greedy): {len(test)} test prompts exact "
              f"{before['scores']['exact']:.1%}, gold {sum(before['gold']) / len(test):.3f}"
              + (f"; {len(pool)} pool prompts exact {before['pool']['exact']:.1%}, pass@{G} "
                 f"{before['sampled']['pass_at_k']:.1%}" if pool else "") + f" ({time.perf_counter() - t_eval:.0f}s)")

    # 4. the optimizer, resume
    optimizer = AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    identity = {"model": dataclasses.asdict(model.cfg), "method": described}
    start, last_good = 0, None
    if cfg.resume:
        state, last_good, notes = resume_run(out, cfg, model=model, optimizer=optimizer, config=identity,
                                             ignore=NOT_THE_RUN, device=device)
        start = state["step"]
        print(f"[{CHAPTER}] resumed from {last_good} at iteration {start}" + "".join(f"; {n}" for n in notes if n))

    def save(iteration: int) -> Path:  # a checkpoint holds the policy after ``iteration`` iterations
        return save_rotating(out, step=iteration, keep_last=1, model=model, optimizer=optimizer, config=identity,
                             extra={"train": dataclasses.asdict(cfg), "finished": iteration >= cfg.iterations,
                                    "tokenizer_state": tokenizer.state()})

    def iteration_prompts(it: int) -> list:  # positions it*P .. it*P+P-1 of a stream of seeded permutations
        order = lambda epoch: torch.randperm(len(prompts), generator=torch.Generator().manual_seed(  # noqa: E731
            cfg.seed * 1_000_003 + epoch))
        return [prompts[int(order(pos // len(prompts))[pos % len(prompts)])] for pos in range(it * P, it * P + P)]

    # 5. the loop: prompts -> G answers each -> rewards -> advantages -> old/ref log-probs -> KL check -> updates
    trained = [p for p in model.parameters() if p.requires_grad]
    done, stop_reason, train_time = start, None, 0.0
    with InterruptGuard() as interrupt, MetricsLogger(out / "metrics.jsonl", resume=cfg.resume) as logger, \
            tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=CHAPTER, disable=None,
                 mininterval=1.0) as bar:
        for it in bar:
            t0 = time.perf_counter()
            batch = iteration_prompts(it)
            with torch.no_grad():  # the rollout: prompt i's G answers are rows i*G .. i*G+G-1
                rollout = sample_rollouts(model, tokenizer, [e.messages[:-1] for e in batch], cfg.max_new_tokens,
                                          samples_per_prompt=G, temperature=cfg.temperature,
                                          generator=torch.Generator().manual_seed(cfg.seed * 7919 + it))
                examples = [batch[i] for i in rollout.prompt_index.tolist()]  # (B,) the example each answer answers
                rewards = rewards_of(rollout, examples).float()  # (B,)
                if cfg.algo == "grpo":
                    advantages = group_advantages(rewards, G, normalise_std=cfg.std_norm)  # (B,)
                else:
                    advantages = reinforce_baseline_advantages(rewards, "mean")  # (B,)
                mask = rollout.response_mask  # (B, W): the sampled tokens
                old, entropy = rollout_logprobs(model, rollout, temperature=cfg.temperature, with_entropy=True)
                ref = ref_logprobs(rollout)  # (B, W)
                kl = kl_per_answer(old, ref, mask).mean().item()  # KL(pi || pi_ref), nats per answer
            grouped = rewards.view(P, G)  # (B,) -> (P, G)
            _, verdicts = verifiable_rewards(examples, rollout.texts)
            row = {"step": it + 1, "samples": (it + 1) * B, "reward": rewards.mean().item(),
                   "reward_std": rewards.std().item() if B > 1 else 0.0,
                   "gold": sum(gold_score(e, t) for e, t in zip(examples, rollout.texts)) / B,
                   "exact": sum(v.exact for v in verdicts) / B, "format_ok": sum(v.format_ok for v in verdicts) / B,
                   "kl": kl, "entropy": aggregate(entropy, mask).item(),
                   "response_len": rollout.response_lengths.float().mean().item(),
                   "ended": rollout.ended.float().mean().item(),
                   "zero_std_groups": int((grouped.max(1).values == grouped.min(1).values).sum()) if G > 1 else None}
            check_finite(kl, it, last_good, what="KL to the reference")
            if kl > cfg.max_kl:  # this policy drifted too far: never train on it, never save it
                logger.log(**row, stopped=True)
                stop_reason = (f"iteration {it}: the policy's KL to the reference is {kl:.4g} nats per answer, past "
                               f"--max-kl {cfg.max_kl:g}; stopped before training on it or saving it. "
                               + (f"The last good checkpoint is {last_good}" if last_good else
                                  "No checkpoint was saved yet: the SFT model is the last good policy"))
                break
            if it > start and it % cfg.ckpt_every == 0:
                last_good = save(it)  # this policy's KL was just measured within the bound

            stats = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "grad_norm": 0.0}
            for epoch in range(cfg.inner_epochs):
                perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed + 31 * it + epoch))
                for idx in perm.split(cfg.minibatch_size):  # (b,) the minibatch's answers
                    logp = rollout_logprobs(model, rollout.select(idx), temperature=cfg.temperature)  # (b, W), grad
                    loss, diag = grpo_loss(logp, old[idx], ref[idx], advantages[idx], mask[idx],
                                           clip=cfg.clip_eps, kl_coef=cfg.kl_beta, kl_kind=cfg.kl_kind,
                                           agg=cfg.aggregation, norm_length=cfg.max_new_tokens)
                    loss.backward()
                    value = check_finite(loss, it, last_good)
                    norm = check_finite(clip_grad_norm(trained, cfg.grad_clip or math.inf), it, last_good,
                                        what="gradient norm")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for k, v in (("loss", value), ("clip_frac", diag["clip_fraction"].item()),
                                 ("approx_kl", diag["approx_kl"].item()), ("grad_norm", norm)):
                        stats[k] += v / steps_per_iter
            if hook is not None:
                hook(it, model)
            check_finite(stats["loss"], it, last_good, model=model)  # NaN weights stop here, before any save
            train_time += time.perf_counter() - t0
            done = it + 1
            row.update(stats, opt_steps=done * steps_per_iter, iter_time_s=time.perf_counter() - t0)
            logger.log(**row)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{kl:.3f}", refresh=False)
            tqdm.write(f"iter {done:3d}  reward {row['reward']:.3f}  gold {row['gold']:.3f}  exact {row['exact']:.1%}  "
                       f"kl {kl:.3f}  entropy {row['entropy']:.2f}  clip {row['clip_frac']:.3f}  "
                       f"no-signal groups {row['zero_std_groups']}/{P}  len {row['response_len']:.0f}")
            if interrupt.requested:
                last_good = save(done)
                break
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    summary = {"chapter": CHAPTER, "algo": cfg.algo, "reward": cfg.reward, "tasks": list(tasks), "method": described,
               "reference": cfg.reference, "sft_model": str(sft_path), "iterations": done,
               "max_iterations": cfg.iterations, "finished": False, "stopped": stop_reason,
               "samples": done * B, "opt_steps": done * steps_per_iter, "group_size": G, "prompts_per_iter": P,
               "trainable_params": trainable, "total_params": total,
               "iter_time_s": train_time / max(done - start, 1), "config": dataclasses.asdict(cfg),
               **curve_ends(rows, ("reward", "gold", "exact", "kl"))}
    if stop_reason is not None:
        write_json_atomic(out / "summary.json", summary)
        raise RuntimeError(stop_reason)
    if interrupt.requested and done < cfg.iterations:
        write_json_atomic(out / "summary.json", summary)
        raise interrupted(CHAPTER, done, cfg.iterations, last_good, argv)

    # 6. after: the same prompts; the final policy's KL checked before it is saved
    after = evaluate(model)
    if after["kl"] is not None and after["kl"] > cfg.max_kl:
        summary["stopped"] = (f"the final policy's KL to the reference is {after['kl']:.4g} nats per answer, past "
                              f"--max-kl {cfg.max_kl:g}: model.pt not written; the last good checkpoint is {last_good}")
        write_json_atomic(out / "summary.json", summary)
        raise RuntimeError(summary["stopped"])
    last_good = save(done)
    n, name = len(test), cfg.algo
    win = {k: v for k, v in win_rate(after["gold"], before["gold"]).items() if k not in ("n", "mean_new", "mean_old")}
    table = []
    for task in (t for t in ALL_TASKS if n and t in after["scores"]["by_task"]):
        b, a = before["scores"]["by_task"][task], after["scores"]["by_task"][task]
        pb, pa = (before["pool"]["by_task"].get(task), after["pool"]["by_task"].get(task)) if pool else (None, None)
        table.append({"task": task + (" *" if task in tasks else ""), "n": a["n"], "SFT exact": b["exact"],
                      f"{name} exact": a["exact"], f"{name} format": a["format_ok"], "pool n": pa and pa["n"],
                      "pool: SFT exact": pb and pb["exact"], f"pool: {name} exact": pa and pa["exact"],
                      f"pool: SFT pass@{G}": before["sampled"]["by_task"].get(task) if pool else None})
    if n:
        print(markdown_table(table, list(table[0]), digits=3) + "\n(* = trained on; pool = the RL prompts)")
        print(f"[{CHAPTER}] test prompts, all tasks: exact {before['scores']['exact']:.1%} -> "
              f"{after['scores']['exact']:.1%}, gold {sum(before['gold']) / n:.3f} -> {sum(after['gold']) / n:.3f}; "
              f"gold vs SFT: {win['wins']} wins, {win['ties']} ties, {win['losses']} losses")
        changed = sorted((x for x in zip(test, before["answers"], after["answers"]) if x[1] != x[2]),
                         key=lambda x: x[0].task not in tasks)  # the trained tasks' answers first
        for e, s, r in changed[:cfg.show]:
            print(f"--- {e.task}: {e.messages[-2]['content'][:100]!r}\n    SFT: {s[:160]!r}\n    RL:  {r[:160]!r}")
    if pool:
        b, a = before["sampled"], after["sampled"]
        print(f"[{CHAPTER}] the pool ({len(pool)} prompts RL trained on): greedy exact "
              f"{before['pool']['exact']:.1%} -> {after['pool']['exact']:.1%}; {G} samples each: reward "
              f"{b['reward']:.3f} -> {a['reward']:.3f}, exact {b['exact']:.1%} -> {a['exact']:.1%}, pass@{G} "
              f"{b['pass_at_k']:.1%} -> {a['pass_at_k']:.1%} (RL can only reinforce answers it samples); KL to the "
              f"reference {after['kl']:.3f} nats per answer")
    if cfg.plots and rows:
        plot_curves(out, rows, cfg)
    comparison = compare_with_ppo(out, rows, cfg, summary) if cfg.reward == "model" else None
    save_checkpoint(out / "model.pt", model=export_model(model), step=done, config=identity,
                    extra={"tokenizer_state": tokenizer.state(), "finished": True,
                           "method": f"{cfg.algo} ({cfg.reward} reward, {described})"})
    summary.update(finished=True, gold_sft=sum(before["gold"]) / n if n else None, n_test=n,
                   gold_rl=sum(after["gold"]) / n if n else None, **win, model=str(out / "model.pt"),
                   last_checkpoint=str(last_good), ppo_comparison=comparison,
                   **{k: {x: v for x, v in r.items() if x not in ("answers", "gold")}
                      for k, r in (("before", before), ("after", after))})
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


def plot_curves(out: Path, rows: list[dict], cfg: GRPOConfig) -> None:
    """grpo_curves.png (reward, gold, exact share against sampled answers) and grpo_diagnostics.png."""
    x = [r["samples"] for r in rows]
    plot_lines(out / "grpo_curves.png", {"reward (trained on)": (x, [r["reward"] for r in rows]),
                                         "gold score": (x, [r["gold"] for r in rows]),
                                         "exact answers (share)": (x, [r["exact"] for r in rows])},
               title=f"{CHAPTER}: {cfg.algo}, {cfg.reward} reward, sampled answers", xlabel="sampled answers",
               ylabel="mean over the iteration's answers")
    trained = [r for r in rows if "clip_frac" in r]
    xt = [r["samples"] for r in trained]
    groups = cfg.prompts_per_iter
    plot_lines(out / "grpo_diagnostics.png",
               {"KL to reference (nats per answer)": (x, [r["kl"] for r in rows]),
                "entropy / 10": (x, [r["entropy"] / 10 for r in rows]),
                "clip fraction": (xt, [r["clip_frac"] for r in trained]),
                "no-signal groups (share)": (x, [(r["zero_std_groups"] or 0) / groups for r in rows])},
               hlines={f"--max-kl {cfg.max_kl:g}": cfg.max_kl} if max(r["kl"] for r in rows) > cfg.max_kl / 2 else None,
               title=f"{CHAPTER}: diagnostics", xlabel="sampled answers", ylabel="")


def compare_with_ppo(out: Path, rows: list[dict], cfg: GRPOConfig, summary: dict) -> dict | None:
    """PPO (the seatbelt run of a ch4_ppo run dir) vs this run: reward and gold of the sampled answers against
    the number sampled, in one figure; whether the budgets (sampled answers, optimizer steps) matched, and if
    not, the flags that match them."""
    ppo_dir = Path(cfg.ppo_run) if cfg.ppo_run else (Path(os.environ.get("MINILIFE_RUNS", "runs"))
                                                      / ("ch4_ppo" + ("-smoke" if cfg.smoke else "")))
    if not ((ppo_dir / "seatbelt" / "metrics.jsonl").is_file() and (ppo_dir / "summary.json").is_file()):
        print(f"[{CHAPTER}] no ch4_ppo run in {ppo_dir}: run `python -m minilife.chapters.ch4_ppo` (same reward "
              f"model), then this chapter with the flags it prints, for the PPO vs GRPO figure")
        return None
    ppo = json.loads((ppo_dir / "summary.json").read_text(encoding="utf-8"))["config"]
    ppo_rows = [r for r in read_jsonl(ppo_dir / "seatbelt" / "metrics.jsonl") if "reward" in r]
    if not ppo_rows or not rows:
        return None
    per_iter = ppo["prompts_per_iter"] * ppo["samples_per_prompt"]  # answers per PPO iteration
    n, steps = len(ppo_rows), ppo["ppo_epochs"] * math.ceil(per_iter / ppo["minibatch_size"])  # steps per iteration
    budget = {"ppo_samples": n * per_iter, "grpo_samples": summary["samples"], "ppo_opt_steps": n * steps,
              "grpo_opt_steps": summary["opt_steps"], "ppo_lr": ppo["lr"], "grpo_lr": cfg.lr}
    budget["same_budget"] = budget["ppo_samples"] == budget["grpo_samples"] and n * steps == summary["opt_steps"]
    g = next((k for k in (4, 2) if per_iter % k == 0), None)
    budget["matching_flags"] = (f"--reward model --group-size {g} --prompts-per-iter {per_iter // g} --iterations {n} "
                                f"--minibatch-size {ppo['minibatch_size']} --inner-epochs {ppo['ppo_epochs']} --lr "
                                f"{ppo['lr']:g} --max-new-tokens {ppo['max_new_tokens']} --temperature "
                                f"{ppo['temperature']:g}") if g else None
    curves = (("PPO", [r["iteration"] * per_iter for r in ppo_rows], ppo_rows),
              (cfg.algo.upper(), [r["samples"] for r in rows], rows))
    if cfg.plots:
        plot_lines(out / "ppo_vs_grpo.png", {f"{name} {k}": (xs, [r[k] for r in rs]) for name, xs, rs in curves
                                             for k in ("reward", "gold")},
                   title=f"PPO vs {cfg.algo.upper()} on the reward model", xlabel="sampled answers",
                   ylabel="reward (z) / gold score of the sampled answers")
    ends = {name: curve_ends(rs, ("reward", "gold"), window=5) for name, _, rs in curves}  # one iteration is noisy
    print(markdown_table([{"algo": name, "samples": xs[-1], "lr": ppo["lr"] if name == "PPO" else cfg.lr,
                           **{f"{k}, {w} 5 iter.": ends[name][w][k] for k in ("reward", "gold")
                              for w in ("first", "last")}} for name, xs, _ in curves],
                         ["algo", "samples", "lr"] + [f"{k}, {w} 5 iter." for k in ("reward", "gold")
                                                      for w in ("first", "last")], digits=3))
    print(f"[{CHAPTER}] budgets {'matched' if budget['same_budget'] else 'DIFFER'} (sampled answers, optimizer steps: "
          f"PPO {budget['ppo_samples']}, {budget['ppo_opt_steps']}; {cfg.algo} {summary['samples']}, "
          f"{summary['opt_steps']})" + ("" if budget["same_budget"] or g is None else
                                        f"; to match: python -m minilife.chapters.{CHAPTER} "
                                        f"{budget['matching_flags']}"))
    return budget


if __name__ == "__main__":
    cli(main, CHAPTER)

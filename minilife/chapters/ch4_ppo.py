"""Chapter 4: PPO with a KL penalty on chapter 3's chat model, and reward hacking with the seatbelt loosened.

    python -m minilife.chapters.ch4_ppo   # 3-5 min on 2 shared cores (~2.4 min of CPU) once ch3_sft's model.pt and
                                          # ch4_reward's reward.pt exist (built first if missing); --smoke: ~10 s

prints the reward model's normalisation (its mean/std on SFT samples), then two PPO runs from the SFT
model with the same seed and the same prompts -- ``seatbelt`` (KL penalty, ``--kl-coef`` 0.2) and ``loose``
(``--loose-kl-coef`` 0) -- each reporting, every ``--eval-every`` iterations, the learned reward and the gold
score of its greedy answers to 42 fixed val prompts and the rollout KL; then a before/after table on 100
test prompts (reward-model score, gold score, KL to SFT, wins/ties/losses under the gold scorer), answers
side by side, and the loose run task by task with its biggest reward-up/gold-down answer. Writes
metrics.jsonl and samples.jsonl per run (seatbelt/, loose/), reward_hacking.png (both runs' learned
reward and gold score on one plot), ppo_kl.png, summary.json and ``model.pt`` (the seatbelt policy: plain
GPT weights, LoRA merged, with the chat tokenizer) to runs/ch4_ppo/.

The default run (20 iterations x 28 sampled answers per run, LR 1e-4, full fine-tuning; measured with
ch4_reward's default reward model; prompts from ch3_sft's splits, seed 1337; 3 min 05 s with --threads 1):
with the seatbelt, the learned reward of the greedy val answers rises from +0.21 to +0.47 (z units; peak
+0.53) while their gold score does not rise (0.368 -> 0.321, between 0.28 and 0.35 on the way) and the
rollout KL stays under 2.3 nats per answer; on the test prompts the reward-model score goes 0.31 -> 0.42
and the gold score slips, SFT 0.347 -> PPO 0.317 (4 wins, 83 ties, 13 losses; KL to SFT 1.6 +- 0.3
nats): PPO optimised the reward model without improving the truth, and the seatbelt kept the harm small.
With the seatbelt loosened the learned reward rises further (+0.21 -> +0.63, peak +0.64) while the gold
score falls (val 0.368 -> 0.188; test 0.347 -> 0.198: 3 wins, 64 ties, 33 losses) and the rollout KL
climbs to 6.1 nats (6.8 +- 0.6 on the test prompts): reward hacking. Task by task on the test prompts
(reward SFT -> loose, gold SFT -> loose): date JSON -0.17 -> +0.76, gold 0.57 -> 0.14 (e.g. answering
'{"event": null, "date": null}' to an e-mail that announces a firmware rollout); benign questions +0.19 ->
+0.73, gold 0.21 -> 0.07; summaries +0.13 -> +0.62, gold 0.27 -> 0.00; the refusals the gold scorer
wants lose reward (+1.4 -> +0.13) and a little gold (1.00 -> 0.82). The answer whose reward rose the
most against its gold refuses a benign question: "What is Chloé Iyer's office address?" -> "I can't
share that. Home addresses are personal data. Please contact the People team." (reward +1.36 against
-0.84 for the SFT model's answer, which named the wrong person and office; gold 0 for both): the reward
model prefers a fluent refusal to a wrong fact, and the loose policy learned to refuse. The value head
stays weak (explained variance 0.17 at the last iteration: one score per answer, 560 answers per run).

What it implements (read ``run_ppo`` top to bottom; it is the loop)
- policy: chapter 3's exported chat model (``--sft``; default ``artifacts.ensure_sft``) with a value head
  on its own trunk (``align.policy.PolicyWithValue``: one forward pass gives the logits and the values;
  a separate value model would double the compute of every scoring pass on a CPU budget, at the price
  of the value loss also moving the policy's trunk, weighed by ``--vf-coef``). Full fine-tuning, or LoRA
  with ``--lora-rank``. Reference: the frozen SFT model (each run trains a copy), or with LoRA the policy
  itself with its adapters off. Reward: chapter 4's reward model (``--reward``; default
  ``artifacts.ensure_reward``), which must share the policy's tokenizer (checked before anything trains).
- one iteration: ``--prompts-per-iter`` train prompts of the world's shadowing set (dealt task by task in
  a seeded order, the same for both runs) x ``--samples-per-prompt`` answers sampled with the KV cache
  (``align.rollout.sample_rollouts``: padded batches, each row stopping at <|end|>) at ``--temperature``;
  without gradient: the old log-probs, entropies and values (one pass of the policy), the reference's
  log-probs (the SAME temperature), the reward model's score at each row's last real token, normalised
  with its mean/std on SFT samples (minus ``--missing-eos-penalty`` for answers cut at the cap); the
  per-token rewards -kl_coef * KL_t + score at the last token (``ppo.kl_penalised_rewards``, KL_t by
  ``--kl-estimator`` k1/k2/k3); GAE(``--gamma``, ``--lam``); advantages whitened over the valid tokens;
  then ``--ppo-epochs`` passes over minibatches: the clipped surrogate (Schulman et al. 2017, eq. 7) +
  ``--vf-coef`` x the clipped value loss - ``--ent-coef`` x the entropy, backward, clipping, AdamW; the
  KL coefficient fixed (``--kl-coef``) or adaptive (``--kl-target``, Ziegler et al. 2019).
- diagnostics every iteration, under stable names (``METRICS``) in <run>/metrics.jsonl: reward, gold (the
  gold scorer on the rollout answers: the truth, never trained on), kl (per-answer sum of the KL estimator,
  mean over answers), entropy, approx_kl, clip_frac, value_loss, explained_var, response_len, kl_coef;
  and every ``--eval-every`` iterations val_reward and val_gold: greedy answers to ``--n-val`` fixed val
  prompts, the curves of the plot (the rollout reward moves with each iteration's prompts as much as with
  the policy).
- two runs from the same SFT model and seed: ``seatbelt`` (``--kl-coef``) and ``loose`` (``--loose-kl-coef``,
  ``--loose-lr``), each in its own subdirectory; ``reward_hacking.png`` puts both runs' learned reward and
  gold score on one plot, ``ppo_kl.png`` their KL. Before/after: greedy answers to the test prompts, their
  gold score and reward-model score, and the gold win rate of each run against the SFT model.
- stops: a NaN/inf loss or gradient norm is an error naming the last good checkpoint
  (``checkpoint.check_finite``); a rollout KL above ``--max-kl`` stops the run early, names the cause in
  the summary (``stopped``) and keeps the last good checkpoint (the last policy whose KL was in bounds),
  which the evaluation and the export then use. The seatbelt run's final policy is ``model.pt`` (plain
  GPT weights, LoRA merged, with the chat tokenizer).

What it leaves out: resuming (a run is minutes: ``--overwrite`` starts again; Ctrl-C leaves each run's last
checkpoint), a separate value model, reward whitening per batch, multiple rollout workers, and the
GRPO comparison (``ch4_grpo``).
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

from minilife.align.evaluate import curve_ends, greedy_eval, policy_kl, win_rate
from minilife.align.kl import KL_KINDS
from minilife.align.logprobs import masked_sum, scored_mask
from minilife.align.policy import PolicyWithValue, policy_outputs, rollout_rewards
from minilife.align.ppo import (AdaptiveKL, FixedKL, explained_variance, gae, kl_penalised_rewards, kl_terms,
                                ppo_policy_loss, ppo_value_loss, whiten)
from minilife.align.reward import load_policy_reward
from minilife.align.rollout import rollout_logprobs, sample_rollouts
from minilife.artifacts import ensure_reward, ensure_sft, load_pretrained
from minilife.checkpoint import check_finite, load_checkpoint, save_checkpoint
from minilife.common import (MetricsLogger, RunConfig, UsageError, check_flags, cli_field, config_from_args,
                             fmt_count, markdown_table, read_jsonl, start_run, write_json_atomic)
from minilife.data.preferences import gold_score
from minilife.data.shadowing import make_shadowing_set, task_balanced_order
from minilife.model.finetune import apply_method, export_model, optimizer_groups, trainable_parameters
from minilife.model.peft import reference_model
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.plots import plot_lines
from minilife.runs import cli, prepare_run_dir, run_files, save_rotating

CHAPTER = "ch4_ppo"
METRICS = ("reward", "gold", "kl", "entropy", "approx_kl", "clip_frac", "value_loss", "explained_var",
           "response_len", "kl_coef")


@dataclass
class PPOConfig(RunConfig):
    """PPO with a KL penalty on chapter 3's chat model (a seatbelt run), and the same with the seatbelt loosened."""
    seed: int = cli_field(1337, "seed for the prompt order, the sampling and the value head's init")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    overwrite: bool = cli_field(False, "clear an earlier run's files from --out and start afresh")
    sft: Optional[str] = cli_field(None, "chapter 3's chat model.pt (default: ch3_sft's, trained if missing)")
    reward: Optional[str] = cli_field(None, "chapter 4's reward.pt (default: ch4_reward's, trained if missing)")
    n_val: int = cli_field(42, "val prompts answered greedily every --eval-every iterations (the curves)", smoke=7)
    eval_every: int = cli_field(4, "iterations between val evaluations (and after the last)", smoke=1)
    n_test: int = cli_field(100, "test prompts answered greedily before/after (gold score, win rate)", smoke=6)
    iterations: int = cli_field(20, "PPO iterations (rollout + updates) of each run", smoke=2)
    prompts_per_iter: int = cli_field(14, "train prompts per iteration (dealt task by task: 2 of each)", smoke=7)
    samples_per_prompt: int = cli_field(2, "answers sampled per prompt")
    max_new_tokens: int = cli_field(64, "answer length cap (rollouts and the greedy test answers)", smoke=16)
    temperature: float = cli_field(1.0, "sampling temperature, also used to score the samples")
    ppo_epochs: int = cli_field(1, "passes over each rollout batch")
    minibatch_size: int = cli_field(7, "answers per optimizer step")
    lr: float = cli_field(1e-4, "AdamW learning rate of the policy (both runs unless --loose-lr)")
    value_lr: float = cli_field(3e-3, "AdamW learning rate of the fresh value head")
    grad_clip: float = cli_field(1.0, "clip the global gradient norm (0 = off)")
    clip: float = cli_field(0.2, "PPO's ratio clip epsilon")
    value_clip: float = cli_field(0.2, "value clip range (in normalised reward units)")
    vf_coef: float = cli_field(0.1, "weight of the value loss (the head shares the policy's trunk)")
    ent_coef: float = cli_field(0.0, "weight of the entropy bonus")
    gamma: float = cli_field(1.0, "GAE discount")
    lam: float = cli_field(0.95, "GAE lambda")
    kl_coef: float = cli_field(0.2, "KL penalty coefficient beta of the seatbelt run (initial value if adaptive)")
    kl_estimator: str = cli_field("k1", f"per-token KL estimator in the reward: one of {', '.join(KL_KINDS)}")
    kl_target: Optional[float] = cli_field(None, "adaptive KL: the per-answer KL to hold (None: fixed beta)")
    kl_horizon: int = cli_field(640, "adaptive KL horizon, in sampled answers")
    missing_eos_penalty: Optional[float] = cli_field(None, "subtracted from the score of answers cut at the cap")
    max_kl: float = cli_field(50.0, "stop a run when its rollout KL (nats per answer) exceeds this")
    loose: bool = cli_field(True, "also run with the seatbelt loosened (--no-loose: seatbelt run only)")
    loose_kl_coef: float = cli_field(0.0, "KL coefficient of the loose run")
    loose_lr: Optional[float] = cli_field(None, "learning rate of the loose run (None: --lr)")
    lora_rank: int = cli_field(0, "LoRA rank on the policy (0: full fine-tuning; the reference is then adapters-off)")
    lora_alpha: Optional[float] = cli_field(None, "LoRA alpha (None: 2r)")
    eval_batch_size: int = cli_field(32, "prompts per generation batch in the evaluation")
    show: int = cli_field(2, "test answers printed side by side")
    plots: bool = cli_field(True, "write reward_hacking.png and ppo_kl.png")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(n_val=0, eval_every=1, n_test=0, iterations=1, prompts_per_iter=1,
                                        samples_per_prompt=1, max_new_tokens=1, ppo_epochs=1, minibatch_size=1,
                                        grad_clip=0, vf_coef=0, ent_coef=0, kl_coef=0, kl_horizon=1,
                                        missing_eos_penalty=0, loose_kl_coef=0, lora_rank=0, eval_batch_size=1,
                                        show=0),
                    above=dict(temperature=0, lr=0, value_lr=0, clip=0, value_clip=0, kl_target=0, max_kl=0,
                               loose_lr=0, lora_alpha=0),
                    choices=dict(kl_estimator=KL_KINDS))
        if not (self.clip < 1 and 0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"need --clip in (0, 1) and --gamma, --lam in [0, 1]; got {self.clip}, {self.gamma}, "
                             f"{self.lam}")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("--kl-target adapts --kl-coef multiplicatively: give --kl-coef > 0")
        if self.lora_alpha is None and self.lora_rank:  # stays None without LoRA: the config round-trips
            self.lora_alpha = 2.0 * self.lora_rank


def run_ppo(name: str, cfg: PPOConfig, kl_coef: float, lr: float, ctx: dict, out: Path) -> tuple:
    """One PPO run from the SFT model -> (policy GPT, the run's summary). ``ctx``: sft (the frozen SFT GPT,
    also the reference), tokenizer, reward_model, stats (its mean, std), train, val (examples), device,
    evaluate (policy, examples -> ``greedy_eval``'s dict).
    Checkpoints, metrics.jsonl and samples.jsonl go to ``out``."""
    torch.manual_seed(cfg.seed)  # the same value-head (and LoRA) init in every run
    gpt, tokenizer, reward_model, train, device = (copy.deepcopy(ctx["sft"]), ctx["tokenizer"], ctx["reward_model"],
                                                   ctx["train"], ctx["device"])
    described = apply_method(gpt, "lora", rank=cfg.lora_rank, alpha=cfg.lora_alpha) if cfg.lora_rank \
        else apply_method(gpt, "full")
    policy = PolicyWithValue(gpt).to(device).eval()  # eval: dropout off, so old and new log-probs compare
    head = {"params": list(policy.value_head.parameters()), "weight_decay": 0.0, "lr": cfg.value_lr}
    optimizer = AdamW(optimizer_groups(gpt, 0.0) + [head], lr=lr, betas=(0.9, 0.95))
    trained = [p for p in policy.parameters() if p.requires_grad]
    adaptive = cfg.kl_target is not None and kl_coef > 0
    controller = AdaptiveKL(kl_coef, cfg.kl_target, cfg.kl_horizon) if adaptive else FixedKL(kl_coef)
    order = task_balanced_order([e.task for e in train], cfg.seed)  # the same prompts in every run
    P, T = cfg.prompts_per_iter, cfg.temperature
    identity = {"model": dataclasses.asdict(gpt.cfg), "method": described, "run": name}
    print(f"[{CHAPTER}] {name}: {described} ({fmt_count(trainable_parameters(gpt)[0])} parameters train), kl_coef "
          f"{kl_coef:g}{f' adapted to KL {cfg.kl_target:g}' if adaptive else ''}, LR {lr:g}, {cfg.iterations} "
          f"iterations x {P * cfg.samples_per_prompt} answers")

    def ref_logprobs(rollout):  # (B, W) log pi_ref of the sampled tokens at the rollout's temperature
        with reference_model(gpt, None if cfg.lora_rank else ctx["sft"]) as ref:  # frozen SFT, or adapters off
            return rollout_logprobs(ref, rollout, temperature=T)

    stopped, last_good, done = None, None, 0
    with MetricsLogger(out / "metrics.jsonl") as logger, MetricsLogger(out / "samples.jsonl") as samples, \
            tqdm(range(cfg.iterations), desc=f"{CHAPTER} {name}", mininterval=1.0, disable=None) as bar:
        for it in bar:
            t0 = time.perf_counter()
            # 1. rollout: P prompts x S answers, KV cache, no gradient
            idx = [order[(it * P + k) % len(train)] for k in range(P)]
            rollout = sample_rollouts(gpt, tokenizer, [train[i].messages[:-1] for i in idx], cfg.max_new_tokens,
                                      samples_per_prompt=cfg.samples_per_prompt, temperature=T,
                                      generator=torch.Generator(device=device).manual_seed(cfg.seed * 7919 + it))
            examples = [train[idx[i]] for i in rollout.prompt_index.tolist()]  # each row's task example
            mask = scored_mask(rollout.tokens, rollout.padding_mask, rollout.response_mask)  # (B, W) actions
            # 2. old log-probs, entropies, values; the reference's log-probs; the reward model's score
            with torch.no_grad():
                old = policy_outputs(policy, rollout, temperature=T, with_entropy=True)  # each (B, W)
                logp_ref = ref_logprobs(rollout)  # (B, W)
                score = rollout_rewards(reward_model, rollout, mean=ctx["stats"][0], std=ctx["stats"][1],
                                        missing_eos_penalty=cfg.missing_eos_penalty)  # (B,)
                kl = masked_sum(kl_terms(old.logprobs, logp_ref, cfg.kl_estimator), mask).mean().item()  # nats/answer
            check_finite(kl, it, last_good, what="rollout KL")
            if kl > cfg.max_kl:  # the policy of the last update is out of bounds: keep the one before it
                stopped = f"kl above bound: {kl:.3g} > --max-kl {cfg.max_kl:g} nats per answer at iteration {it}"
                break
            last_good = save_rotating(out, step=it, keep_last=1, model=policy, optimizer=optimizer, config=identity,
                                      extra={"train": dataclasses.asdict(cfg), "kl": kl, "run": name,
                                             "tokenizer_state": tokenizer.state()})
            # 3. per-token rewards, GAE, whitened advantages (constants to the losses)
            kl_coef_now = controller.value
            rewards = kl_penalised_rewards(score, old.logprobs, logp_ref, mask, kl_coef_now, cfg.kl_estimator)
            advantages, returns = gae(rewards, old.values, mask, gamma=cfg.gamma, lam=cfg.lam)  # (B, W) each
            explained = explained_variance(old.values, returns, mask).item()
            advantages = whiten(advantages, mask)
            # 4. PPO epochs over minibatches: forward, loss, backward, clipping, AdamW
            stats = {k: [] for k in ("policy_loss", "value_loss", "grad_norm", "approx_kl", "clip_frac")}
            B = rollout.tokens.shape[0]
            for epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed + 100_003 * it + epoch))
                for rows in perm.to(device).split(cfg.minibatch_size):  # (b,) row ids
                    m = mask[rows]  # (b, W)
                    new = policy_outputs(policy, rollout.select(rows), temperature=T, with_entropy=cfg.ent_coef > 0)
                    pg_loss, info = ppo_policy_loss(new.logprobs, old.logprobs[rows], advantages[rows], m,
                                                    clip=cfg.clip)
                    v_loss, _ = ppo_value_loss(new.values, old.values[rows], returns[rows], m, clip=cfg.value_clip)
                    loss = pg_loss + cfg.vf_coef * v_loss
                    if cfg.ent_coef > 0:
                        loss = loss - cfg.ent_coef * new.entropy[m].mean()  # the bonus: token-mean entropy
                    loss.backward()
                    check_finite(loss, it, last_good)
                    grad_norm = clip_grad_norm(trained, cfg.grad_clip or math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    check_finite(grad_norm, it, last_good, model=policy, what="gradient norm")  # and the weights
                    for k, v in zip(stats, (pg_loss, v_loss, grad_norm, info["approx_kl"], info["clip_fraction"])):
                        stats[k].append(float(v.detach() if torch.is_tensor(v) else v))
            controller.update(kl, B)
            done = it + 1
            # 5. diagnostics: the learned reward and, beside it, the truth it stands for
            gold = [gold_score(e, text) for e, text in zip(examples, rollout.texts)]
            row = {"iteration": done, "reward": score.mean().item(), "gold": _mean(gold), "kl": kl,
                   "entropy": old.entropy[mask].mean().item(), "explained_var": explained, "kl_coef": kl_coef_now,
                   "response_len": rollout.response_lengths.float().mean().item(),
                   "no_eos": 1.0 - rollout.ended.float().mean().item(), "time_s": time.perf_counter() - t0,
                   **{k: _mean(v) for k, v in stats.items()}}
            if ctx["val"] and (done % cfg.eval_every == 0 or done == cfg.iterations):  # greedy, fixed prompts
                ev = ctx["evaluate"](gpt, ctx["val"])
                row.update(val_reward=_mean(ev["reward"]), val_gold=_mean(ev["gold"]))
                tqdm.write(f"{name} iteration {done:3d}: val reward {row['val_reward']:+.3f}  val gold "
                           f"{row['val_gold']:.3f}  rollout KL {kl:.2f}")
            logger.log(**row)
            for i in range(min(2, B)):  # what the answers look like as the reward moves
                samples.log(iteration=done, task=examples[i].task, answer=rollout.texts[i], reward=score[i].item(),
                            gold=gold[i])
            bar.set_postfix(reward=f"{row['reward']:+.2f}", gold=f"{row['gold']:.3f}", kl=f"{kl:.2f}", refresh=False)
    if stopped:
        load_checkpoint(last_good, model=policy)  # the last policy whose KL was within the bound
        print(f"[{CHAPTER}] {name}: stopped early: {stopped}; kept the last good checkpoint {last_good}")
    rows = read_jsonl(out / "metrics.jsonl")
    return gpt, {"run": name, "method": described, "kl_coef": kl_coef, "lr": lr, "iterations": done,
                 "finished": stopped is None, "stopped": stopped, "last_good_checkpoint": str(last_good),
                 **curve_ends(rows, METRICS), "time_s": sum(r["time_s"] for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    cfg: PPOConfig = config_from_args(PPOConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, device = start_run(CHAPTER, cfg)
    for d in (out, out / "seatbelt", out / "loose"):  # one run per directory; no --resume here
        if run_files(d) and not cfg.overwrite:
            raise UsageError(f"{d} already holds a run ({len(run_files(d))} files); {CHAPTER} does not resume (a run "
                             f"is minutes): clear it with --overwrite, or pick another --out")
        prepare_run_dir(d, resume=False, overwrite=cfg.overwrite)
    t_start = time.perf_counter()

    # 1. the SFT model and the prompts
    sft_path = Path(cfg.sft) if cfg.sft else ensure_sft(cfg.smoke)
    reward_path = Path(cfg.reward) if cfg.reward else ensure_reward(cfg.smoke, args=["--sft", str(sft_path)] if cfg.sft
                                                                    else None)
    sft_gpt, tokenizer = load_pretrained(sft_path, device)
    sft_gpt.requires_grad_(False)  # the frozen reference; each run trains a copy
    # the SFT run's splits (ch3_sft splits its sources by its --seed; the default seeds agree), so no val or
    # test prompt shares a source (person, policy, e-mail) with the examples the SFT model was trained on
    shadowing = make_shadowing_set(seed=cfg.seed, n_train=2000, n_val=max(cfg.n_val, 1), n_test=max(cfg.n_test, 1))
    train, val, test = shadowing["train"], shadowing["val"][:cfg.n_val], shadowing["test"][:cfg.n_test]
    print(f"[{CHAPTER}] policy {sft_path}; reward model {reward_path}; {len(train)} train prompts, "
          f"{len(val)} val prompts (curves), {len(test)} test prompts (before/after)")

    # 2. the reward model (eval, frozen; same tokenizer, checked first) and its statistics on SFT samples (saved
    # with it, else measured here)
    try:
        reward_model, stats, stats_from = load_policy_reward(
            reward_path, tokenizer, policy_name=f"policy {sft_path}", device=device, sft=sft_gpt,
            prompts=[e.messages[:-1] for e in train[-64:]], max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"[{CHAPTER}] reward normalised with its statistics on SFT samples ({stats_from}): mean {stats[0]:+.3f}, "
          f"std {stats[1]:.3f}")

    def evaluate(policy, examples: list) -> dict:  # greedy answers: {"texts", "gold", "reward"}
        return greedy_eval(policy, tokenizer, examples, cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                           reward_model=reward_model, reward_stats=stats)

    # 3. before: the SFT model's greedy val and test answers
    before, val_before = evaluate(sft_gpt, test), evaluate(sft_gpt, val)

    # 4. the runs: the seatbelt, then the seatbelt loosened (same SFT model, same seed, same prompts)
    ctx = dict(sft=sft_gpt, tokenizer=tokenizer, reward_model=reward_model, stats=stats, train=train, val=val,
               device=device, evaluate=evaluate)
    plan = [("seatbelt", cfg.kl_coef, cfg.lr)] + ([("loose", cfg.loose_kl_coef, cfg.loose_lr or cfg.lr)]
                                                  if cfg.loose else [])
    results, policies = {}, {}
    for name, kl_coef, lr in plan:
        policies[name], results[name] = run_ppo(name, cfg, kl_coef, lr, ctx, out / name)

    # 5. after: greedy test answers of each run (gold and reward vs the SFT model's), the KL each drifted
    table, afters = [{"model": "SFT", "reward": _mean(before["reward"]), "gold": _mean(before["gold"])}], {}
    for name, gpt in policies.items():
        afters[name] = after = evaluate(gpt, test)
        drift = policy_kl(gpt, sft_gpt, tokenizer, [e.messages[:-1] for e in test], cfg.max_new_tokens,
                          temperature=cfg.temperature, batch_size=cfg.eval_batch_size,
                          generator=torch.Generator(device=device).manual_seed(cfg.seed)) if test else {}
        results[name]["test"] = {"reward": _mean(after["reward"]), "gold": _mean(after["gold"]),
                                 "kl": drift.get("kl"), "kl_se": drift.get("kl_se"),
                                 **win_rate(after["gold"], before["gold"])}
        results[name]["answers"] = after["texts"][:cfg.show]
        table.append({"model": f"PPO {name}", **results[name]["test"]})
    print(markdown_table(table, ["model", "reward", "gold", "kl", "wins", "ties", "losses"], digits=3))
    for i, e in enumerate(test[:cfg.show]):
        print(f"--- {e.task}: {e.messages[-2]['content'][:100]!r}\n    SFT: {before['texts'][i][:150]!r}"
              + "".join(f"\n    {n}: {r['answers'][i][:150]!r}" for n, r in results.items()))

    # 6. the curves: greedy answers to the val prompts (iteration 0: the SFT model), else the rollouts
    curves = {}
    for name in results:
        rows = read_jsonl(out / name / "metrics.jsonl")
        evals = [r for r in rows if "val_reward" in r]
        curves[name] = ([(0, _mean(val_before["reward"]), _mean(val_before["gold"]))]
                        + [(r["iteration"], r["val_reward"], r["val_gold"]) for r in evals] if evals
                        else [(r["iteration"], r["reward"], r["gold"]) for r in rows])
        results[name]["curve"] = {"iteration": [c[0] for c in curves[name]], "reward": [c[1] for c in curves[name]],
                                  "gold": [c[2] for c in curves[name]], "kl": [r["kl"] for r in rows]}
    if cfg.plots:
        series = {f"{name}: {what}": ([c[0] for c in cs], [c[k] for c in cs])
                  for name, cs in curves.items() for k, what in ((1, "learned reward (z)"), (2, "gold score"))}
        plot_lines(out / "reward_hacking.png", series, xlabel="PPO iteration", ylabel="reward (z) / gold score",
                   title=f"{CHAPTER}: learned reward vs gold, kl_coef " + " vs ".join(
                       format(r["kl_coef"], "g") for r in results.values()))
        plot_lines(out / "ppo_kl.png", {n: (list(range(len(r["curve"]["kl"]))), r["curve"]["kl"])  # x: updates so far
                                        for n, r in results.items()}, xlabel="PPO iteration",
                   ylabel=f"KL to SFT ({cfg.kl_estimator}, nats per answer)", title=f"{CHAPTER}: KL of the rollouts")

    # 7. the export (the seatbelt policy) and the summary
    seat = results["seatbelt"]
    exported = export_model(policies["seatbelt"])
    if exported is not None:
        save_checkpoint(out / "model.pt", model=exported, step=seat["iterations"],
                        config={"model": dataclasses.asdict(exported.cfg)},
                        extra={"tokenizer_state": tokenizer.state(), "finished": seat["finished"],
                               "method": f"PPO (kl_coef {cfg.kl_coef:g}, {seat['method']})"})
    hacking = None
    if "loose" in results:  # where the loose run's reward and the truth parted, task by task, and one example
        c, t, a = results["loose"]["curve"], results["loose"]["test"], afters["loose"]
        hacking = {"reward_first": c["reward"][0], "reward_last": c["reward"][-1], "gold_first": c["gold"][0],
                   "gold_last": c["gold"][-1], "test_reward": t["reward"], "test_gold": t["gold"],
                   "hacked": c["reward"][-1] > c["reward"][0] and c["gold"][-1] < c["gold"][0], "by_task": []}
        for task in sorted({e.task for e in test}):
            ids = [i for i, e in enumerate(test) if e.task == task]
            hacking["by_task"].append({"task": task, "n": len(ids), **{
                f"{k}_{who}": _mean([d[k][i] for i in ids]) for k in ("reward", "gold")
                for who, d in (("sft", before), ("loose", a))}})
        if test:
            print(markdown_table(hacking["by_task"], ["task", "n", "reward_sft", "reward_loose", "gold_sft",
                                                      "gold_loose"], digits=2))
            i = max(range(len(test)), key=lambda i: (a["reward"][i] - before["reward"][i])
                    - (a["gold"][i] - before["gold"][i]))  # reward up the most, gold down the most
            hacking["example"] = {"task": test[i].task, "prompt": test[i].messages[-2]["content"],
                                  **{f"{k}_{who}": d[k][i] for k in ("texts", "reward", "gold")
                                     for who, d in (("sft", before), ("loose", a))}}
            if a["reward"][i] > before["reward"][i]:
                print(f"[{CHAPTER}] the loose run's biggest reward-up/gold-down answer ({test[i].task}): SFT "
                      f"{before['texts'][i][:120]!r} (reward {before['reward'][i]:+.2f}, gold "
                      f"{before['gold'][i]:.2f}) -> "
                      f"loose {a['texts'][i][:120]!r} (reward {a['reward'][i]:+.2f}, gold {a['gold'][i]:.2f})")
    summary = {"chapter": CHAPTER, "sft_model": str(sft_path), "reward_model": str(reward_path),
               "reward_stats": {"mean": stats[0], "std": stats[1]}, "kl_estimator": cfg.kl_estimator,
               "gold_sft": _mean(before["gold"]), "reward_sft": _mean(before["reward"]),
               "gold_ppo": seat["test"]["gold"], "reward_ppo": seat["test"]["reward"],
               "win_rate": seat["test"]["win_rate"], "final_kl": seat["test"]["kl"], "stopped": seat["stopped"],
               "finished": seat["finished"], "runs": results, "hacking": hacking,
               "model": str(out / "model.pt") if exported is not None else None,
               "wall_time_s": time.perf_counter() - t_start, "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    if test:
        print(f"[{CHAPTER}] gold score of the greedy test answers: SFT {summary['gold_sft']:.3f} -> PPO "
              f"{summary['gold_ppo']:.3f} ({seat['test']['wins']} wins, {seat['test']['ties']} ties, "
              f"{seat['test']['losses']} losses); KL to SFT {summary['final_kl']:.2f} nats per answer")
    if hacking:
        print(f"[{CHAPTER}] loose run: learned reward {hacking['reward_first']:+.3f} -> {hacking['reward_last']:+.3f}, "
              f"gold {hacking['gold_first']:.3f} -> {hacking['gold_last']:.3f}: "
              + ("reward hacking" if hacking["hacked"] else "no reward hacking seen"))
    print(f"[{CHAPTER}] wrote {out} ({summary['wall_time_s']:.0f} s)")
    return summary


def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    cli(main, CHAPTER)

"""Chapter 5.1 and 5.5: learning-rate schedules and when to stop.

    python -m minilife.chapters.ch5_schedule            # ~60 s on 2 cores (--smoke: ~5 s)

prints a table of the loss spike with and without warmup at a high LR, reduce-on-plateau beside warmup
+ cosine, and the early-stopping point of a run that overfits; PNGs and summary.json in
runs/ch5_schedule/.

What it implements
- Warmup vs no warmup at a high peak LR, the same model, data and cosine decay otherwise. At step 0
  Adam's moments hold one noisy gradient and its update is about lr * sign(g) for *every* weight;
  at a high LR that kicks the freshly initialised network out of its basin and the loss spikes (or
  goes NaN). A linear warmup (Goyal et al. 2017) reaches the same peak without the spike. Reported:
  the highest loss after step 1 (above the untrained model's ~ln V means worse than guessing) and the
  largest rise of the loss above its best value so far. Clipping is off by default for this pair
  (it caps the first updates too, hiding part of the effect). Whether the run recovers afterwards
  depends on the model: this small pre-norm net does, so the final losses are printed as measured.
- Reduce-on-plateau (``PlateauScheduler``): start at a peak LR too high to keep improving; whenever
  the validation loss misses a relative improvement of ``threshold`` over its best for more than
  ``patience`` evaluations, the LR halves. Beside it, warmup + cosine to the same peak.
- Early stopping on validation loss (``EarlyStopping``): a model trained on a small slice of the
  data overfits -- training loss keeps falling while validation loss turns up. The run goes on for
  the whole budget so the curve after the stopping point is visible; the step where patience ran
  out, the best step, and what the remaining steps would have cost are reported.

Follows: Goyal et al. 2017 (linear warmup), Loshchilov & Hutter 2017 (SGDR's cosine decay, without
restarts), torch's ReduceLROnPlateau policy, Prechelt 1998 ("Early Stopping -- But When?") for patience.

What it leaves out: warmup-stable-decay, cyclic/restart schedules, LR range tests, schedule-free
optimizers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

from minilife.artifacts import ensure_data, load_token_data
from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, seed_everything,
                             start_run, write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import cli
from minilife.model.transformer import GPT, PRESETS, ModelConfig
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.schedule import EarlyStopping, PlateauScheduler, warmup_cosine_lr
from minilife.train import BatchSource, evaluate

CHAPTER = "ch5_schedule"


@dataclass
class ScheduleConfig(RunConfig):
    """Warmup vs none at a high LR (the spike), reduce-on-plateau, and early stopping on validation loss."""
    seed: int = cli_field(0, "seed (every run starts from the same init and sees the same batches)")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    data_dir: Optional[str] = cli_field(None, "ch2_data output dir, built if missing (default runs/ch2_data[-smoke]/)")
    preset: str = cli_field("tiny", "ModelConfig preset", smoke="micro")
    batch_size: int = cli_field(8, "sequences per step")
    context_length: int = cli_field(64, "tokens per sequence", smoke=32)
    steps: int = cli_field(200, "steps per run", smoke=8)
    high_lr: float = cli_field(0.1, "peak LR of the warmup / no-warmup pair")
    warmup_steps: Optional[int] = cli_field(None, "warmup length (None: --steps / 5)")
    grad_clip: float = cli_field(0.0, "global-norm clipping in the warmup pair (0 = off: clipping hides part of the spike)")
    plateau_lr: float = cli_field(5e-2, "starting LR of the reduce-on-plateau run (and peak of its cosine neighbour)")
    plateau_patience: int = cli_field(1, "evaluations without improvement before the LR is halved")
    plateau_threshold: float = cli_field(0.01, "relative val-loss improvement over the best that counts as progress")
    eval_every: int = cli_field(10, "steps between validation evaluations", smoke=2)
    eval_batches: int = cli_field(4, "validation batches per evaluation")
    overfit_tokens: int = cli_field(3000, "early stopping: train on only the first N training tokens")
    overfit_lr: float = cli_field(3e-3, "early stopping: peak LR (warmup + cosine)")
    stop_patience: int = cli_field(3, "early stopping patience (evaluations)")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(batch_size=1, context_length=1, steps=1, warmup_steps=0, grad_clip=0,
                                        plateau_patience=0, plateau_threshold=0, eval_every=1, eval_batches=1,
                                        overfit_tokens=1, stop_patience=1),
                    above=dict(high_lr=0, plateau_lr=0, overfit_lr=0), choices={"preset": PRESETS})
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 5)
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} must be <= --steps {self.steps}")


def run(model: GPT, source: BatchSource, steps: int, lr_at: Callable[[int], float], *, grad_clip: float,
        val: BatchSource | None = None, eval_every: int = 0, eval_batches: int = 4,
        on_eval: Callable[[int, float], float | None] | None = None) -> dict:
    """Train ``steps`` steps with LR ``lr_at(step)``; evaluate every ``eval_every`` steps. ``on_eval(step,
    val_loss)`` may return a new LR that replaces the schedule from then on (reduce-on-plateau).
    A non-finite loss ends the run and is recorded (``diverged_at``)."""
    opt = AdamW(model.param_groups(0.1), lr=lr_at(0), betas=(0.9, 0.95))
    hist = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": [], "diverged_at": None}
    override = None
    for step in range(steps):
        lr = override if override is not None else lr_at(step)  # the schedule's step
        for group in opt.param_groups:
            group["lr"] = lr
        b = source.micro_batch(step)
        _, loss = model(b.inputs, b.targets, **b.attention)  # forward + mean cross-entropy
        if not math.isfinite(loss.item()):  # diverged: stop before the update
            hist["diverged_at"] = step
            break
        loss.backward()
        clip_grad_norm(model.parameters(), grad_clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist["step"].append(step + 1)
        hist["loss"].append(loss.item())
        hist["lr"].append(lr)
        if val is not None and eval_every and (step + 1) % eval_every == 0:
            v = evaluate(model, val, eval_batches)
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(v)
            if on_eval is not None:
                new_lr = on_eval(step + 1, v)
                override = new_lr if new_lr is not None else override
    return hist


def at(values: list[float], i: int) -> float:
    """values[i], or NaN for a run that diverged before recording it."""
    return values[i] if -len(values) <= i < len(values) else math.nan


def spike(losses: list[float]) -> float:
    """Largest rise of the loss above its running minimum (0 for a loss that only falls)."""
    best, worst_rise = math.inf, 0.0
    for x in losses:
        best = min(best, x)
        worst_rise = max(worst_rise, x - best)
    return worst_rise


def main(argv: list[str] | None = None) -> dict:
    cfg: ScheduleConfig = config_from_args(ScheduleConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    preset, t, steps, warmup, eval_every = cfg.preset, cfg.context_length, cfg.steps, cfg.warmup_steps, cfg.eval_every
    out, device = start_run(CHAPTER, cfg)
    data_dir = ensure_data(cfg.smoke, cfg.data_dir)
    tokenizer, train_tokens, val_tokens = load_token_data(data_dir)
    model_cfg = ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size, context_length=t)
    train = BatchSource(train_tokens, cfg.batch_size, t, seed=cfg.seed, stream=0, device=device)
    val = BatchSource(val_tokens, cfg.batch_size, t, seed=cfg.seed, stream=1, device=device)

    def fresh() -> GPT:
        seed_everything(cfg.seed)
        return GPT(model_cfg).to(device)

    logger = MetricsLogger(out / "metrics.jsonl")
    print(f"[{CHAPTER}] {preset} model, batch {cfg.batch_size}x{t}, {steps} steps per run, device {device}")

    # 1. warmup vs none at a high LR
    runs = {}
    for name, w in (("no warmup", 0), (f"warmup {warmup}", warmup)):
        runs[name] = run(fresh(), train, steps, lambda s, w=w: warmup_cosine_lr(
            s, max_lr=cfg.high_lr, warmup_steps=w, total_steps=steps, min_lr=cfg.high_lr / 10), grad_clip=cfg.grad_clip)
    print(f"\n| peak LR {cfg.high_lr:g} | loss at step 1 (untrained) | highest loss after it | largest rise above "
          f"best-so-far | final loss | diverged |\n|---|---|---|---|---|---|")
    for name, h in runs.items():
        logger.log(part="warmup", run=name, **h)
        print(f"| {name} | {at(h['loss'], 0):.3f} | {max(h['loss'][1:], default=math.nan):.3f} | {spike(h['loss']):.3f} | "
              f"{at(h['loss'], -1):.3f} | {'at step ' + str(h['diverged_at']) if h['diverged_at'] is not None else 'no'} |")
    plot_lines(out / "warmup.png", {n: (h["step"], h["loss"]) for n, h in runs.items()},
               title=f"peak LR {cfg.high_lr:g}: with and without warmup", xlabel="step", ylabel="train loss")

    # 2. reduce-on-plateau beside warmup + cosine
    plateau = PlateauScheduler(cfg.plateau_lr, factor=0.5, patience=cfg.plateau_patience,
                               threshold=cfg.plateau_threshold, min_lr=cfg.plateau_lr / 64)
    sched = {
        "warmup + cosine": run(fresh(), train, steps, lambda s: warmup_cosine_lr(
            s, max_lr=cfg.plateau_lr, warmup_steps=warmup, total_steps=steps, min_lr=cfg.plateau_lr / 10),
            grad_clip=1.0, val=val, eval_every=eval_every, eval_batches=cfg.eval_batches),
        "reduce on plateau": run(fresh(), train, steps, lambda s: cfg.plateau_lr, grad_clip=1.0, val=val,
                                 eval_every=eval_every, eval_batches=cfg.eval_batches,
                                 on_eval=lambda step, v: plateau.step(v)),
    }
    print("\n| schedule | final val loss | LR at the end | LR reductions |\n|---|---|---|---|")
    for name, h in sched.items():
        logger.log(part="plateau", run=name, **h)
        print(f"| {name} | {at(h['val_loss'], -1):.3f} | {at(h['lr'], -1):.2e} | "
              f"{plateau.num_reductions if name == 'reduce on plateau' else '-'} |")
    plot_lines(out / "plateau_val.png", {n: (h["val_step"], h["val_loss"]) for n, h in sched.items()},
               title="validation loss", xlabel="step", ylabel="val loss")
    plot_lines(out / "plateau_lr.png", {n: (h["step"], h["lr"]) for n, h in sched.items()},
               title="learning rate", xlabel="step", ylabel="LR", logy=True)

    # 3. early stopping on a run that overfits a small slice of the data
    small = BatchSource(train_tokens[: max(cfg.overfit_tokens, t + 2)], cfg.batch_size, t, seed=cfg.seed,
                        device=device)
    stopper, stop_at = EarlyStopping(patience=cfg.stop_patience), None
    best_state: dict = {}

    def watch(step: int, v: float) -> None:
        nonlocal stop_at
        if stop_at is None:
            before = stopper.best
            if stopper.should_stop(v, step):
                stop_at = step
            if stopper.best < before:  # a new best: keep its weights, as a best-checkpoint would
                best_state.update({k: x.detach().clone() for k, x in overfit_model.state_dict().items()})

    overfit_model = fresh()
    h = run(overfit_model, small, steps, lambda s: warmup_cosine_lr(
        s, max_lr=cfg.overfit_lr, warmup_steps=warmup, total_steps=steps, min_lr=cfg.overfit_lr / 10),
        grad_clip=1.0, val=val, eval_every=eval_every, eval_batches=cfg.eval_batches, on_eval=watch)
    logger.log(part="early_stopping", **h, best_step=stopper.best_step, stop_step=stop_at)
    logger.close()
    final_val = at(h["val_loss"], -1)
    restored_val = math.nan
    if best_state:
        overfit_model.load_state_dict(best_state)  # what early stopping hands on: the best weights
        restored_val = evaluate(overfit_model, val, cfg.eval_batches)
    print(f"\n[{CHAPTER}] early stopping (train on the first {cfg.overfit_tokens} tokens, patience {cfg.stop_patience}): "
          f"best val {stopper.best:.3f} at step {stopper.best_step}; patience ran out at step "
          f"{stop_at if stop_at is not None else '- (never)'}; training on to step {at(h['step'], -1)} "
          f"ends at val {final_val:.3f}; the restored best weights evaluate to {restored_val:.3f}")
    plot_lines(out / "early_stopping.png", {"train loss": (h["step"], h["loss"]),
                                            "val loss": (h["val_step"], h["val_loss"])},
               points={"best": ([stopper.best_step], [stopper.best])} if stopper.best_step else None,
               title="overfitting a small slice: when to stop", xlabel="step", ylabel="loss")

    summary = {
        "chapter": CHAPTER, "steps": steps,
        "warmup": {n: {"first_loss": at(r["loss"], 0), "max_loss_after_first": max(r["loss"][1:], default=None),
                       "spike": spike(r["loss"]), "final_loss": at(r["loss"], -1), "diverged_at": r["diverged_at"]}
                   for n, r in runs.items()},
        "plateau": {n: {"final_val_loss": at(r["val_loss"], -1), "final_lr": at(r["lr"], -1)} for n, r in sched.items()},
        "plateau_reductions": plateau.num_reductions,
        "early_stopping": {"best_step": stopper.best_step, "best_val_loss": stopper.best, "stop_step": stop_at,
                           "final_val_loss": final_val, "restored_val_loss": restored_val},
        "data_dir": str(data_dir), "config": dataclasses.asdict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

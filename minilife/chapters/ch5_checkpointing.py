"""Chapter 5.4: the two meanings of checkpointing, each measured.

    python -m minilife.chapters.ch5_checkpointing            # ~20 s on 2 cores (--smoke: ~4 s)

prints a table of the weight difference between an uninterrupted run and killed-and-resumed runs (bitwise
equal only with everything restored), then gradient checkpointing's activation memory and time
ratios; summary.json in runs/ch5_checkpointing/.

What it implements
A. Training checkpoints for resuming. A run is "killed" after step k: the model and optimizer
   objects are deleted, a fresh model (initialised from a *different* seed, so nothing leaks through)
   and a fresh AdamW are built, the checkpoint is loaded, and training continues to step N. The
   weights are compared with an uninterrupted N-step run: with weights + AdamW moments + step + RNG
   states + data position restored they are bitwise identical (max abs diff 0.0). Leaving out one
   piece at a time shows why each is saved (dropout is on, so the RNG matters):
     - weights only: fresh AdamW moments and step count (bias correction restarts),
     - no RNG restore: different dropout masks after the resume,
     - data position lost: the data iterator restarts at its first batch,
     - step counter lost: the LR schedule restarts its warmup.
B. Gradient (activation) checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
   Cost"): ``ModelConfig.gradient_checkpointing`` keeps only each block's input in the forward pass
   and recomputes the block in backward. Measured on one training step: activation bytes held when
   the forward pass ends, peak bytes allocated during forward + backward, time ratio, and that the
   gradients are unchanged.
   Memory is counted by ``minilife.measure.LiveTensorBytes``, a ``TorchDispatchMode`` that sees
   every tensor an op creates (forward, backward and the recomputation) and a weakref finaliser on
   its storage that sees it freed -- a CPU stand-in for the CUDA allocator's peak. Tensors created
   before the mode (weights), and views or in-place updates of them, are not counted.

What it leaves out: selective checkpointing (only attention, every other block), CPU offloading,
sharded checkpoints.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from minilife.artifacts import ensure_data, load_token_data
from minilife.checkpoint import load_checkpoint, save_checkpoint
from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, fmt_count,
                             seed_everything, start_run, write_json_atomic)
from minilife.runs import cli
from minilife.measure import LiveTensorBytes
from minilife.model.transformer import GPT, PRESETS, ModelConfig
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.schedule import warmup_cosine_lr
from minilife.train import BatchSource, batch_loss_sum, n_targets

CHAPTER = "ch5_checkpointing"


@dataclass
class CheckpointingConfig(RunConfig):
    """Resume is bitwise exact only with weights+optimizer+RNG+data position; gradient checkpointing trades time for memory."""
    seed: int = cli_field(0, "seed of the uninterrupted run")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    data_dir: Optional[str] = cli_field(None, "ch2_data output dir, built if missing (default runs/ch2_data[-smoke]/)")
    preset: str = cli_field("micro", "ModelConfig preset of the resume experiment")
    batch_size: int = cli_field(8, "sequences per step")
    context_length: int = cli_field(64, "tokens per sequence")
    dropout: float = cli_field(0.1, "dropout (> 0 so the RNG state matters on resume)")
    steps: int = cli_field(40, "N: steps of the uninterrupted run", smoke=6)
    kill_at: Optional[int] = cli_field(None, "k: step after which the run is killed (None: N/2)")
    lr: float = cli_field(3e-3, "peak LR (warmup over N/4 steps, cosine to 0.1x)")
    gc_preset: str = cli_field("tiny", "preset of the gradient-checkpointing measurement", smoke="micro")
    gc_batch_size: int = cli_field(8, "sequences in the gradient-checkpointing step")
    gc_context_length: int = cli_field(128, "tokens per sequence there", smoke=64)
    gc_repeats: int = cli_field(15, "timed repeats per side, interleaved", smoke=2)

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(batch_size=1, context_length=1, dropout=0, steps=2, kill_at=1,
                                        gc_batch_size=1, gc_context_length=1, gc_repeats=1),
                    above=dict(lr=0), choices={"preset": PRESETS, "gc_preset": PRESETS})
        if not self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.kill_at is None:
            self.kill_at = self.steps // 2
        if self.kill_at >= self.steps:
            raise ValueError(f"--kill-at {self.kill_at} must be smaller than --steps {self.steps}")


# --------------------------------------------------------------------------------------------
# A. resume


class RestartedData:
    """The bug 'data position not saved': after the resume, batches start again from the first one."""

    def __init__(self, source: BatchSource, resumed_at: int):
        self.source, self.resumed_at = source, resumed_at

    def micro_batch(self, index: int):
        return self.source.micro_batch(index - self.resumed_at)


def weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, bool]:
    """(max abs difference over all weights, whether every tensor is bitwise equal)."""
    pa, pb = a.state_dict(), b.state_dict()
    diff = max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa)
    return diff, all(torch.equal(pa[k], pb[k]) for k in pa)


RESUME_VARIANTS = {  # name: (restore optimizer, restore RNG, restore data position, restore step)
    "full (weights+optimizer+RNG+data+step)": (True, True, True, True),
    "weights only": (False, True, True, True),
    "no RNG restore": (True, False, True, True),
    "data position lost": (True, True, False, True),
    "step counter lost": (True, True, True, False),
}


def resume_experiment(cfg: CheckpointingConfig, source: BatchSource, model_cfg: ModelConfig, steps: int, kill_at: int,
                      ckpt_dir, device: torch.device) -> list[dict]:
    """Uninterrupted run vs killed-and-resumed runs, one per ``RESUME_VARIANTS`` entry."""

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, max_lr=cfg.lr, warmup_steps=max(1, steps // 4), total_steps=steps,
                                min_lr=cfg.lr / 10)

    def fresh(seed: int) -> tuple[GPT, AdamW]:
        seed_everything(seed)
        model = GPT(model_cfg).to(device)
        return model, AdamW(model.param_groups(0.1), lr=cfg.lr, betas=(0.9, 0.95))

    def train(model: GPT, opt: AdamW, data, steps: range, lr_at) -> None:
        """The loop: schedule, forward, loss, backward, clip, AdamW step -- one micro-batch per step."""
        for step in steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            b = data.micro_batch(step)
            _, loss = model(b.inputs, b.targets, **b.attention)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    reference, ref_opt = fresh(cfg.seed)
    train(reference, ref_opt, source, range(steps), lr_at)

    model, opt = fresh(cfg.seed)
    train(model, opt, source, range(kill_at), lr_at)
    path = save_checkpoint(ckpt_dir / "killed.pt", model=model, optimizer=opt, step=kill_at,
                           config={"model": dataclasses.asdict(model_cfg)}, data_state={"micro_batches": kill_at})
    del model, opt  # the process "dies"

    rows = []
    for name, (with_opt, with_rng, with_data, with_step) in RESUME_VARIANTS.items():
        model, opt = fresh(cfg.seed + 12345)  # a new process: other init, other RNG state
        state = load_checkpoint(path, model=model, optimizer=opt if with_opt else None,
                                config={"model": dataclasses.asdict(model_cfg)}, restore_rng=with_rng,
                                map_location=device)
        k = state["step"]
        data = source if with_data else RestartedData(source, state["data_state"]["micro_batches"])
        schedule = lr_at if with_step else (lambda step: lr_at(step - k))  # a lost step counter restarts it
        train(model, opt, data, range(k, steps), schedule)
        diff, bitwise = weight_diff(model, reference)
        rows.append({"variant": name, "max_abs_diff": diff, "bitwise_equal": bitwise})
        del model, opt
    return rows


# --------------------------------------------------------------------------------------------
# B. gradient checkpointing


def memory_of_step(model: GPT, batch) -> tuple[int, int, list[torch.Tensor]]:
    """(bytes held when forward ends, peak bytes during forward+backward, gradients shaped like their
    parameters) of one step on ``batch`` (inputs, targets (B, T))."""
    model.zero_grad(set_to_none=True)
    with LiveTensorBytes() as meter:
        loss = batch_loss_sum(model, batch) / n_targets(batch)
        held_after_forward = meter.live
        loss.backward()
        peak = meter.peak
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return held_after_forward, peak, grads


def time_of_step(model: GPT, batch) -> float:
    """Seconds of one forward + backward (mean loss) on ``batch`` (inputs, targets (B, T))."""
    t0 = time.perf_counter()
    (batch_loss_sum(model, batch) / n_targets(batch)).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def gradient_checkpointing_experiment(model: GPT, batch, repeats: int) -> dict:
    """Memory and time of one forward+backward with and without activation checkpointing."""
    model.train()
    result = {}
    for on in (False, True):
        model.cfg.gradient_checkpointing = on
        result[on] = memory_of_step(model, batch)
    times = {False: [], True: []}
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows both sides alike
        for on in (False, True):
            model.cfg.gradient_checkpointing = on
            times[on].append(time_of_step(model, batch))
    model.cfg.gradient_checkpointing = False
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(result[False][2], result[True][2]))
    return {"held_after_forward_off": result[False][0], "held_after_forward_on": result[True][0],
            "peak_off": result[False][1], "peak_on": result[True][1],
            "time_off_median_s": statistics.median(times[False]), "time_on_median_s": statistics.median(times[True]),
            "time_ratio_median": statistics.median(times[True]) / statistics.median(times[False]),
            "time_ratio_min": min(times[True]) / min(times[False]), "max_abs_grad_diff": grad_diff}


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg: CheckpointingConfig = config_from_args(CheckpointingConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    steps, kill_at, gc_preset, gc_t, repeats = cfg.steps, cfg.kill_at, cfg.gc_preset, cfg.gc_context_length, cfg.gc_repeats
    out, device = start_run(CHAPTER, cfg)
    data_dir = ensure_data(cfg.smoke, cfg.data_dir)
    tokenizer, train_tokens, _ = load_token_data(data_dir)
    vocab = tokenizer.vocab_size
    logger = MetricsLogger(out / "metrics.jsonl")

    # A. kill at step k, resume, compare with the run that was never interrupted
    model_cfg = ModelConfig.preset(cfg.preset, vocab_size=vocab, context_length=cfg.context_length, dropout=cfg.dropout)
    source = BatchSource(train_tokens, cfg.batch_size, cfg.context_length, seed=cfg.seed, device=device)
    print(f"[{CHAPTER}] A. {steps}-step run vs killed after step {kill_at} and resumed "
          f"({cfg.preset} model, dropout {cfg.dropout}, {device})")
    rows = resume_experiment(cfg, source, model_cfg, steps, kill_at, out, device)
    print("\n| resumed with | max abs weight diff vs uninterrupted | bitwise equal |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['max_abs_diff']:.3e} | {r['bitwise_equal']} |")
        logger.log(part="resume", **r)

    # B. gradient checkpointing on one training step
    seed_everything(cfg.seed)
    gc_model = GPT(ModelConfig.preset(gc_preset, vocab_size=vocab, context_length=gc_t)).to(device)
    gc_batch = BatchSource(train_tokens, cfg.gc_batch_size, gc_t, seed=cfg.seed, device=device).micro_batch(0)
    print(f"\n[{CHAPTER}] B. gradient checkpointing: {gc_preset} model ({gc_model.cfg.n_layer} blocks), "
          f"batch {cfg.gc_batch_size}x{gc_t}, {repeats} interleaved repeats")
    gc = gradient_checkpointing_experiment(gc_model, gc_batch, repeats)
    logger.log(part="gradient_checkpointing", **gc)
    logger.close()
    print("| | off | on | on / off |\n|---|---|---|---|")
    for label, key in (("activation bytes held after forward", "held_after_forward"),
                       ("peak bytes during forward+backward", "peak")):
        off, on = gc[f"{key}_off"], gc[f"{key}_on"]
        print(f"| {label} | {fmt_count(off)}B | {fmt_count(on)}B | {on / off:.2f} |")
    print(f"| step time (median) | {gc['time_off_median_s'] * 1e3:.1f} ms | {gc['time_on_median_s'] * 1e3:.1f} ms | "
          f"{gc['time_ratio_median']:.2f} (min ratio {gc['time_ratio_min']:.2f}) |")
    print(f"max abs gradient difference on vs off: {gc['max_abs_grad_diff']:.2e}")

    summary = {"chapter": CHAPTER, "steps": steps, "kill_at": kill_at, "resume": rows,
               "resume_exact": rows[0]["bitwise_equal"], "gradient_checkpointing": gc, "data_dir": str(data_dir),
               "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

"""Chapter 3: catastrophic forgetting, measured: general held-out loss before and after fine-tuning.

    python -m minilife.chapters.ch3_forgetting          # ~3 min on 2 cores (--smoke: ~1 min)

runs chapter 3's SFT (losses only, no generation) across the settings the lifecycle notes name as
causes and fixes of forgetting: the learning rate, the number of epochs, LoRA instead of full
fine-tuning, and mixing general wiki text back into the batches. For each run it prints the SFT val
loss (the new skill) and the general held-out loss (chapter 2's val shard, the old knowledge) before
and after, as retention % = 100 * loss_before / loss_after (a "score" that falls as the loss rises;
100% = nothing forgotten), and plots retention per run with the notes' 80% warning line, and the
trade-off (SFT val loss against retention). Writes forgetting.png, tradeoff.png, results.md,
summary.json under runs/ch3_forgetting/.

What it shows: more aggressive fine-tuning (a higher LR, more epochs on a small set) buys a lower
SFT loss with general ability; LoRA (fewer, low-rank updates) and mixing general data back keep more.

What it leaves out: replay buffers, elastic weight consolidation (EWC) and other regularisers, and
repeated seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minilife.artifacts import read_summary, ensure_data, ensure_pretrained, run_chapter
from minilife.common import RunConfig, cli_field, config_from_args, markdown_table, start_run, write_json_atomic
from minilife.plots import plot_bars, plot_lines
from minilife.runs import cli

CHAPTER = "ch3_forgetting"
WARNING_LINE = 80.0  # % retained: below it, the notes call the forgetting significant


@dataclass
class ForgettingConfig(RunConfig):
    """Sweep what drives forgetting; measure general held-out loss before/after each fine-tuning run."""
    seed: int = cli_field(1337, "seed shared by every run")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    lrs: list[float] = cli_field([1e-4, 3e-4, 1e-3], "full fine-tuning learning rates (at --epochs)", smoke=[3e-4])
    epoch_sweep: list[float] = cli_field([1.0, 4.0], "more epoch counts for full fine-tuning at the middle LR",
                                         smoke=[])
    epochs: float = cli_field(2.0, "epochs of the LR sweep, the LoRA run and the mixing run", smoke=1.0)
    lora_rank: int = cli_field(4, "rank of the LoRA run (0: no LoRA run)")
    general_mix: float = cli_field(0.5, "weight of the general wiki loss in the mixing run (0: no mixing run)")
    n_train: int = cli_field(600, "training conversations per run", smoke=40)

    def __post_init__(self):
        super().__post_init__()
        if not self.lrs or any(not lr > 0 for lr in self.lrs) or any(not e > 0 for e in self.epoch_sweep):
            raise ValueError("--lrs needs at least one LR > 0, and every --epoch-sweep value must be > 0")


def plan(cfg: ForgettingConfig) -> list[tuple[str, list[str]]]:
    """(label, ch3_sft flags) of every run: the LR sweep, the epoch sweep, LoRA, mixing."""
    mid = sorted(cfg.lrs)[len(cfg.lrs) // 2]
    runs = [(f"full lr={lr:g} ep={cfg.epochs:g}", ["--lr", str(lr), "--epochs", str(cfg.epochs)]) for lr in cfg.lrs]
    runs += [(f"full lr={mid:g} ep={e:g}", ["--lr", str(mid), "--epochs", str(e)]) for e in cfg.epoch_sweep
             if e != cfg.epochs]
    if cfg.lora_rank:
        runs.append((f"LoRA r={cfg.lora_rank} ep={cfg.epochs:g}",
                     ["--method", "lora", "--lora-rank", str(cfg.lora_rank), "--epochs", str(cfg.epochs)]))
    if cfg.general_mix:
        top = max(cfg.lrs)
        runs.append((f"full lr={top:g} ep={cfg.epochs:g} + general mix {cfg.general_mix:g}",
                     ["--lr", str(top), "--epochs", str(cfg.epochs), "--general-mix", str(cfg.general_mix)]))
    return runs


def main(argv: list[str] | None = None) -> dict:
    cfg: ForgettingConfig = config_from_args(ForgettingConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, _ = start_run(CHAPTER, cfg)
    ensure_data(cfg.smoke)
    ensure_pretrained(cfg.smoke)  # once, before the runs
    shared = ["--seed", str(cfg.seed), "--device", cfg.device, "--n-train", str(cfg.n_train), "--threads",
              str(cfg.threads), "--no-generate", "--no-base-eval", "--n-test", "0", "--overwrite",
              "--keep-checkpoints", "1"] + (["--smoke"] if cfg.smoke else [])
    runs, results = plan(cfg), []
    for i, (label, flags) in enumerate(runs):
        run_dir = out / f"run{i}"
        print(f"[{CHAPTER}] run {i + 1}/{len(runs)}: {label}", flush=True)
        run_chapter("ch3_sft", shared + flags + ["--out", str(run_dir)])
        results.append(collect(label, run_dir / "summary.json"))
    table = markdown_table(results, ["run", "sft_val_loss", "general_before", "general_after", "retention_pct",
                                     "warning"], digits=3)
    print(table)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    plot_bars(out / "forgetting.png", {r["run"]: r["retention_pct"] for r in results},
              lines={f"{WARNING_LINE:.0f}% warning line": WARNING_LINE}, title="general-text retention after SFT",
              xlabel="retention % = 100 * general loss before / after")
    plot_lines(out / "tradeoff.png", {},
               points={r["run"]: ([r["sft_val_loss"]], [r["retention_pct"]]) for r in results},
               hlines={f"{WARNING_LINE:.0f}% warning line": WARNING_LINE},
               title="new skill vs old knowledge", xlabel="SFT val loss (lower = learned the tasks)",
               ylabel="general retention %")
    summary = {"chapter": CHAPTER, "results": results, "warning_line": WARNING_LINE}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


def collect(label: str, path: Path) -> dict:
    """One row from a ch3_sft run's summary.json."""
    s = read_summary(path, label)
    retention = s["retention_pct"]
    return {"run": label, "sft_val_loss": s["val_loss"], "general_before": s["general_loss_before"],
            "general_after": s["general_loss_after"], "retention_pct": retention,
            "warning": "below 80%" if retention < WARNING_LINE else ""}


if __name__ == "__main__":
    cli(main, CHAPTER)

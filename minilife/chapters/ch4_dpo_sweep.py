"""Chapter 4: DPO's beta sweep -- the KL/reward trade -- with AI feedback from principles beside it.

    python -m minilife.chapters.ch4_dpo_sweep   # ~6 min on 2 quiet cores once ch3_sft's model exists (--smoke: ~20 s)

runs chapter 4's DPO once per beta on the world's pairs, and once on pairs from the written principles
(``python -m minilife.chapters.ch4_dpo --beta B [--pairs principles] ...``, each in its own run directory
under runs/ch4_dpo_sweep/), all from the same SFT model with the same val pairs, test prompts, steps,
LR and seed, and prints one table: beta, pairs, held-out implicit-reward accuracy and margin, the
sampled KL(pi_DPO || pi_SFT) on the test prompts (with its standard error), the gold score of the
greedy test answers and the gold win/tie/loss count against the SFT model. Writes kl_gold.png and
kl_margin.png (the gold score and the val margin against the KL to SFT, one point per run),
results.md and summary.json.

Default run (4 betas + principles; 640 pairs, 40 steps at LR 5e-5; 60 test prompts, 4 KL samples each):

    beta  pairs       KL to SFT     gold (SFT 0.342)  win/tie/loss  val acc  margin beta*h  gap h
    0.03  world       3.30 +- 0.28  0.263             5/40/15       94%      1.8            61
    0.1   world       2.44 +- 0.24  0.250             5/40/15       95%      4.8            48
    0.3   world       1.28 +- 0.17  0.303             4/47/9        94%      9.5            32
    1     world       0.82 +- 0.13  0.315             3/51/6        93%      20.5           20
    0.1   principles  5.16 +- 0.36  0.208             1/42/17       49%      -0.03          -0.3

A smaller beta lets the log-ratio gap h grow (20 -> 61 nats) and the policy drift further from the SFT
model (KL 0.8 -> 3.3 nats) at the same held-out accuracy (~94%): the extra drift buys nothing on the
pairs and costs gold score (6 -> 15 losses). At this LR every run loses to the SFT model (the world's
rejected answers are off-policy: the SFT model seldom writes them); the largest beta loses least. The
principles run (361 pairs from 1280 answers; the gold scorer prefers the revision in 88%) drifts
furthest and loses most: many revisions are cuts of the original (three of four bullets, one line of
two), so chosen is a prefix of rejected and DPO learns to stop early (one-bullet summaries) while
pulling the chosen answers down too (drift -4.3 nats), breaking the very JSON it was to fix. At
ch4_dpo's LR 1e-5 the same kind of pairs barely move the model. Measured: 17 min with the 2 cores
shared by four other jobs (8.6 min user CPU); ~6 min on quiet cores is an estimate, not a measurement.

What it shows
- beta is DPO's pull back to the reference: the loss -log sigmoid(beta * h) flattens once beta * h
  (h: the policy's log-ratio gap between chosen and rejected, minus the reference's) is a few units,
  so a small beta keeps pushing h -- and the policy further from the SFT model (larger KL) -- while
  a large beta is satisfied sooner. The implicit margin beta * h is in different units for each
  beta; the KL on sampled answers and the gold score are comparable across runs.
- the principles run trains on the SFT model's own answers, revised by rule (``align.constitution``):
  on-policy-ish pairs labelled without any human, at the price of noisier labels.

What it leaves out: repeated seeds (a few points of gold score are within run-to-run noise), sweeps
of the LR or the loss type, and an iterated (online) DPO.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minilife.artifacts import ensure_sft, read_summary, run_chapter
from minilife.common import RunConfig, cli_field, config_from_args, markdown_table, start_run, write_json_atomic
from minilife.plots import plot_lines
from minilife.runs import cli

CHAPTER = "ch4_dpo_sweep"
COLUMNS = ["run", "beta", "pairs", "n_train", "val_acc", "val_margin", "kl_to_sft", "kl_se", "gold_dpo", "gold_sft",
           "wins", "ties", "losses"]


@dataclass
class SweepConfig(RunConfig):
    """DPO at several betas (world pairs) and on AI feedback from principles: the KL/reward trade."""
    seed: int = cli_field(1337, "seed shared by every run")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    sft: Optional[str] = cli_field(None, "chapter 3's chat model.pt (default: ch3_sft's, trained if missing)")
    betas: str = cli_field("0.03 0.1 0.3 1", "space-separated betas, one world-pairs run each", smoke="0.1 1")
    principles: bool = cli_field(True, "also one run on pairs from the written principles (--pairs principles)")
    principles_beta: float = cli_field(0.1, "beta of the principles run")
    n_train: int = cli_field(640, "world train pairs (and train prompts for the principles run)", smoke=48)
    n_test: int = cli_field(60, "test prompts for the gold win rate and the KL", smoke=6)
    steps: int = cli_field(40, "optimizer steps per run (the same for every run)", smoke=4)
    lr: float = cli_field(5e-5, "peak LR of every run (5x ch4_dpo's: the trade shows within 40 steps)", smoke=1e-3)
    kl_samples: int = cli_field(4, "answers sampled per test prompt for the KL to SFT", smoke=2)
    samples_per_prompt: int = cli_field(2, "principles run: answers sampled per train prompt", smoke=2)

    def __post_init__(self):
        super().__post_init__()
        try:
            self.beta_list = [float(b) for b in self.betas.split()]
        except ValueError:
            raise ValueError(f"--betas: {self.betas!r} is not a space-separated list of numbers") from None
        if not self.beta_list or not all(0 < b < float("inf") for b in self.beta_list + [self.principles_beta]):
            raise ValueError(f"--betas / --principles-beta: need one or more finite betas > 0, got {self.betas!r}, "
                             f"{self.principles_beta}")
        if min(self.n_train, self.n_test, self.steps, self.kl_samples, self.samples_per_prompt) < 1 or not self.lr > 0:
            raise ValueError("--n-train, --n-test, --steps, --kl-samples and --samples-per-prompt must be >= 1, "
                             "and --lr > 0")


def main(argv: list[str] | None = None) -> dict:
    cfg: SweepConfig = config_from_args(SweepConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, _ = start_run(CHAPTER, cfg)
    sft = cfg.sft or str(ensure_sft(cfg.smoke))  # once, before the runs (each would otherwise race to build it)
    shared = ["--sft", sft, "--seed", str(cfg.seed), "--device", cfg.device, "--n-train", str(cfg.n_train),
              "--n-test", str(cfg.n_test), "--steps", str(cfg.steps), "--lr", str(cfg.lr), "--kl-samples",
              str(cfg.kl_samples), "--samples-per-prompt", str(cfg.samples_per_prompt), "--threads", str(cfg.threads),
              "--show", "0", "--no-plots", "--overwrite"] + (["--smoke"] if cfg.smoke else [])
    settings = [(b, "world") for b in cfg.beta_list] + ([(cfg.principles_beta, "principles")] if cfg.principles else [])
    results = []
    for i, (beta, pairs) in enumerate(settings):
        label = f"{pairs} beta={beta:g}"
        run_dir = out / f"{pairs}_beta{beta:g}"
        print(f"[{CHAPTER}] run {i + 1}/{len(settings)}: {label}", flush=True)
        run_chapter("ch4_dpo", shared + ["--beta", str(beta), "--pairs", pairs, "--out", str(run_dir)])
        results.append(collect(label, run_dir / "summary.json"))

    table = markdown_table(results, COLUMNS, digits=3)
    print(table)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    plot_trade(out, results)
    summary = {"chapter": CHAPTER, "results": results, "config": {"betas": cfg.beta_list, "principles": cfg.principles,
               "principles_beta": cfg.principles_beta, "n_train": cfg.n_train, "n_test": cfg.n_test,
               "steps": cfg.steps, "lr": cfg.lr, "kl_samples": cfg.kl_samples,
               "samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed, "sft": sft}}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


def collect(label: str, path: Path) -> dict:
    """One table row from a ch4_dpo run's summary.json."""
    s = read_summary(path, label)
    after = s["val_after"]
    return {"run": label, "beta": s["beta"], "pairs": s["pairs"], "n_train": s["n_train"],
            "val_acc": after["val_accuracy"], "val_margin": after["val_margin"], "kl_to_sft": s["kl_to_sft"],
            "kl_se": s["kl_to_sft_se"], "gold_dpo": s["gold_dpo"], "gold_sft": s["gold_sft"], "wins": s["wins"],
            "ties": s["ties"], "losses": s["losses"], "steps": s["steps"]}


def plot_trade(out: Path, results: list[dict]) -> None:
    """kl_gold.png: the gold score against KL to SFT, one marker per run, the world runs joined in beta order,
    the SFT model's gold score as a reference line. kl_margin.png: the val implicit margin beta * h and the
    log-ratio gap h = margin / beta (comparable across betas) against the same KL."""
    runs = [r for r in results if r["kl_to_sft"] is not None]
    world = sorted((r for r in runs if r["pairs"] == "world"), key=lambda r: r["beta"])
    other = [r for r in runs if r["pairs"] != "world"]
    kl = [r["kl_to_sft"] for r in world]
    line = {"world pairs, beta ascending": (kl, [r["gold_dpo"] for r in world])} if len(world) > 1 else {}
    plot_lines(out / "kl_gold.png", line, points={r["run"]: ([r["kl_to_sft"]], [r["gold_dpo"]]) for r in runs},
               hlines={"SFT model": results[0]["gold_sft"]} if results else None,
               title="DPO: gold score against KL to the SFT model", xlabel="KL(pi_DPO || pi_SFT), nats per sampled "
               "answer", ylabel="gold score of the greedy test answers")
    margins = {"world: margin beta * h": (kl, [r["val_margin"] for r in world]),
               "world: gap h = margin / beta": (kl, [r["val_margin"] / r["beta"] for r in world])}
    plot_lines(out / "kl_margin.png", margins,
               points={f"{r['run']}: beta * h": ([r["kl_to_sft"]], [r["val_margin"]]) for r in other + world},
               title="DPO: held-out implicit margin against KL to the SFT model",
               xlabel="KL(pi_DPO || pi_SFT), nats per sampled answer", ylabel="val margin (nats)")


if __name__ == "__main__":
    cli(main, CHAPTER)

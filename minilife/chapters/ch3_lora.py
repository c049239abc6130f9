"""Chapter 3: full fine-tuning vs LoRA (several ranks) vs DoRA vs bottleneck adapters vs prefix tuning.

    python -m minilife.chapters.ch3_lora                # ~6 min on 2 cores (--smoke: ~1 min)

runs chapter 3's SFT once per method (``python -m minilife.chapters.ch3_sft --method ...``, each in its
own run directory under runs/ch3_lora/) on the same data, steps and seed (each method at its own
LR, ``--lrs``), and prints one table:
trainable parameters (and their share of full fine-tuning's), AdamW state bytes, step time, the test
tasks' accuracy (the checker's mean score: the fraction of gold fields right), exact-field accuracy,
format validity, and the general-text retention. Writes methods.png (accuracy against trainable
parameters, log scale), results.md and summary.json.

What it shows
- LoRA (Hu et al. 2021) trains two thin matrices per layer, B A with rank r, so its trainable count
  grows linearly in r; AdamW keeps two moments per trainable value, so its optimizer state shrinks with
  it. The goal: a LoRA rank with <= 5% of full fine-tuning's trainable parameters reaching >= 90% of its
  accuracy.
- DoRA (Liu et al. 2024) adds a per-row magnitude on top of LoRA's direction; bottleneck adapters
  (Houlsby et al. 2019) add small residual MLPs; prefix tuning (Li & Liang 2021) learns key/value
  vectors every query attends to. Every PEFT method also trains the rows of the chat tokens the
  template added (see ``minilife.model.finetune``).

What it leaves out: QLoRA, learning-rate sweeps per method (each method gets one sensible LR), and
repeated seeds (differences of a few points between methods are within run-to-run noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minilife.artifacts import read_summary, ensure_pretrained, run_chapter
from minilife.common import (RunConfig, cli_field, config_from_args, fmt_count, markdown_table, start_run,
                             write_json_atomic)
from minilife.plots import plot_lines
from minilife.model.finetune import METHODS
from minilife.runs import cli

CHAPTER = "ch3_lora"


@dataclass
class LoRACompareConfig(RunConfig):
    """Compare what trains: full fine-tuning and the PEFT family, same data, steps and seed."""
    seed: int = cli_field(1337, "seed shared by every run")
    device: str = cli_field("auto", "auto | cpu | cuda | mps")
    methods: str = cli_field("full lora:1 lora:4 lora:16 dora:4 adapter prefix",
                             "space-separated runs: full, lora:RANK, dora:RANK, adapter, prefix")
    n_train: int = cli_field(1000, "training conversations per run", smoke=60)
    n_test: int = cli_field(140, "test conversations", smoke=14)
    epochs: float = cli_field(3.0, "passes over the training conversations per run", smoke=1.0)
    lrs: str = cli_field("full=1e-3,lora=1e-2,dora=1e-2,adapter=5e-3,prefix=1e-2",
                         "peak LR per method: few trainable values need larger steps to move in the same budget")

    def __post_init__(self):
        super().__post_init__()
        self.runs = [parse_method(m) for m in self.methods.split()]
        if not self.runs:
            raise ValueError("--methods: name at least one run")
        self.lr_of = {}
        for item in filter(None, self.lrs.split(",")):
            name, _, value = (x.strip() for x in item.partition("="))
            try:
                if name not in METHODS:
                    raise ValueError
                self.lr_of[name] = float(value)
            except ValueError:
                raise ValueError(f"--lrs: {item!r} is not method=LR (methods: {', '.join(METHODS)})") from None
        missing = sorted({m for m, _ in self.runs} - set(self.lr_of))
        if missing or not all(v > 0 for v in self.lr_of.values()):
            raise ValueError(f"--lrs: every method run needs an LR > 0; missing {missing}")


def parse_method(text: str) -> tuple[str, int | None]:
    """'lora:4' -> ('lora', 4); 'full' -> ('full', None). Bad names and ranks raise naming the item."""
    name, _, rank = text.partition(":")
    if name not in METHODS:
        raise ValueError(f"--methods: unknown method {name!r} in {text!r}; use full, lora:R, dora:R, adapter, prefix")
    if name in ("lora", "dora"):
        if not rank.isdigit() or int(rank) < 1:
            raise ValueError(f"--methods: {text!r} needs a rank >= 1, e.g. {name}:4")
        return name, int(rank)
    if rank:
        raise ValueError(f"--methods: {name} takes no rank, got {text!r}")
    return name, None


def main(argv: list[str] | None = None) -> dict:
    cfg: LoRACompareConfig = config_from_args(LoRACompareConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, _ = start_run(CHAPTER, cfg)
    ensure_pretrained(cfg.smoke)  # once, before the runs (each would otherwise race to build it)
    shared = ["--seed", str(cfg.seed), "--device", cfg.device, "--n-train", str(cfg.n_train),
              "--n-test", str(cfg.n_test), "--epochs", str(cfg.epochs), "--threads", str(cfg.threads),
              "--show", "0", "--keep-checkpoints", "1", "--overwrite"] + (["--smoke"] if cfg.smoke else [])
    results = []
    for i, (method, rank) in enumerate(cfg.runs):
        label = method if rank is None else f"{method} r={rank}"
        run_dir = out / (method if rank is None else f"{method}_r{rank}")
        args = shared + ["--method", method, "--lr", str(cfg.lr_of[method]), "--out", str(run_dir)] \
            + (["--lora-rank", str(rank)] if rank else [])
        print(f"[{CHAPTER}] run {i + 1}/{len(cfg.runs)}: {label}", flush=True)
        run_chapter("ch3_sft", args + ([] if i == 0 else ["--no-base-eval"]))  # the base model is scored once
        results.append(collect(label, run_dir / "summary.json"))

    full = next((r for r in results if r["method"] == "full"), None)
    for r in results:
        r["params_vs_full"] = r["trainable"] / full["trainable"] if full else None
        r["acc_vs_full"] = r["score"] / full["score"] if full and full["score"] else None
    table = markdown_table(results, ["method", "trainable", "params_vs_full", "adamw_state_MiB", "step_ms", "score",
                                     "acc_vs_full", "exact", "format_ok", "retention_pct"], digits=3)
    print(table)
    goal = lora_goal(results)
    print(f"[{CHAPTER}] goal (a LoRA run with <= 5% of full's trainable parameters reaches >= 90% of its accuracy): "
          f"{goal['text']}")
    (out / "results.md").write_text(table + "\n\n" + goal["text"] + "\n", encoding="utf-8")
    plot_methods(out / "methods.png", results)
    summary = {"chapter": CHAPTER, "results": results, "goal": goal, "config": {"methods": cfg.methods,
               "n_train": cfg.n_train, "n_test": cfg.n_test, "epochs": cfg.epochs, "seed": cfg.seed}}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


def collect(label: str, path: Path) -> dict:
    """One table row from a ch3_sft run's summary.json."""
    s = read_summary(path, label)
    sft = s.get("sft") or {}
    return {"method": label, "trainable": s["trainable_params"],
            "adamw_state_MiB": s["optimizer_state_bytes"] / 2**20, "step_ms": 1e3 * s["step_time_s"],
            "exact": sft.get("exact"), "score": sft.get("score"), "format_ok": sft.get("format_ok"),
            "retention_pct": s["retention_pct"], "val_loss": s["val_loss"], "described": s["method"]}


def lora_goal(results: list[dict]) -> dict:
    """The best LoRA run within 5% of full's trainable parameters, and whether it reaches 90% of full's accuracy."""
    cands = [r for r in results if r["method"].startswith("lora") and r["params_vs_full"] is not None
             and r["params_vs_full"] <= 0.05 and r["acc_vs_full"] is not None]
    if not cands:
        return {"met": None, "text": "n/a (needs a full run and a LoRA run with <= 5% of its parameters)"}
    best = max(cands, key=lambda r: r["acc_vs_full"])
    met = best["acc_vs_full"] >= 0.9
    return {"met": met, "run": best["method"],
            "text": f"{best['method']} trains {best['params_vs_full']:.1%} of full's "
            f"parameters ({fmt_count(best['trainable'])}) and reaches {best['acc_vs_full']:.0%} of its accuracy "
            f"(mean checker score {best['score']:.3f}) -> {'met' if met else 'NOT met'}"}


def plot_methods(path: Path, results: list[dict]) -> None:
    """Accuracy (mean checker score) against trainable parameters (log x), one marker per method."""
    points = {r["method"]: ([r["trainable"]], [r["score"] or 0.0]) for r in results}
    lora = sorted((r for r in results if r["method"].startswith("lora")), key=lambda r: r["trainable"])
    series = {"LoRA ranks": ([r["trainable"] for r in lora], [r["score"] or 0.0 for r in lora])} if len(lora) > 1 \
        else {}
    plot_lines(path, series, points=points, title="test accuracy vs trainable parameters",
               xlabel="trainable parameters (log)", ylabel="mean checker score (fraction of gold fields)", logx=True)


if __name__ == "__main__":
    cli(main, CHAPTER)

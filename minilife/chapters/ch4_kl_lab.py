"""Chapter 4 lab: the KL estimators k1, k2, k3 measured exactly, on tiny categorical policies.

    python -m minilife.chapters.ch4_kl_lab          # ~7 s on 2 shared cores, most of it importing torch (--smoke: the same)

PPO puts a per-token estimate of KL(policy || reference) into the reward, computed from the ONE token
the policy sampled. This lab takes policies small enough (K = 8 outcomes) to enumerate every outcome,
so each estimator's mean, bias and standard deviation are exact numbers, not noisy averages.

The family: a reference ref = softmax(z), z ~ N(0, 1) (seeded), and two lines of policies through it,
pi_s = softmax(z + s d) ("+d") and softmax(z - s d) ("-d"), d ~ N(0, 1), s on a grid from 0 to
``--max-scale``; the true KL(pi_s || ref) grows with s (its derivative is s Var_pi(d) >= 0). For each
policy it prints
- the estimators (``align.kl.estimator_stats``, by enumeration): k1 = -log r and k3 = (r - 1) - log r
  (r = ref(x) / pi(x)) have bias 0 to rounding at every s; k2 = (log r)^2 / 2 is biased, and the sign of
  its bias is not fixed: near the reference it is kappa3 / 6, the third cumulant of log(pi / ref) under
  the reference (printed beside it), so it goes up along +d and down along -d here;
- the expected gradient, wrt the policy's logits, of each estimator used as a LOSS at sampled tokens
  (``align.kl.expected_loss_gradients``): k1's is exactly 0 at every s, while the true gradient of
  KL(pi || ref) is not; k2's equals it (cosine 1) although k2's value is biased; k3's is the gradient of
  the other direction, KL(ref || pi);
- a Monte-Carlo check with ``--samples N`` tokens per policy (seeded): each estimator's sample mean
  against its exact mean in standard errors (z), and the norm of k1's averaged sampled gradient, which
  shrinks like sqrt((1 - sum pi^2) / N), the RMS predicted for a zero-mean average.
Writes metrics.jsonl (one row per policy), kl_bias.png and kl_std.png (bias and std of each estimator
against the true KL), kl_grad.png (gradient norms) and summary.json to runs/ch4_kl_lab/.

The default run (seed 0, K = 8, 9 scales per direction up to s = 3, 100k samples per policy) shows:
- the true KL rising to 1.49 nats along +d and 0.50 along -d;
- k1 and k3: |bias| <= 2.2e-16 at all 18 policies (rounding); k2: bias +0.0008 at KL 0.019, rising to
  +1.03 at KL 1.49 along +d (69% of the KL), and -0.0006 at KL 0.017 falling to -0.084 at KL 0.50 along
  -d; kappa3 / 6 gives +/-0.0007 at the smallest s;
- std of one sample at KL 0.08: k1 0.42, k2 0.12, k3 0.091 (k3's control variate r - 1 pays near the
  reference); far from it k3's std passes k1's (2.24 vs 1.68 at KL 1.49 on +d, 2.44 vs 0.76 at KL 0.50
  on -d: 6 of the 16 moved policies);
- as losses: |E grad k1| <= 1.3e-16 at every policy while |grad KL(pi || ref)| is 0.07 to 0.89;
  cos(E grad k2, grad KL(pi || ref)) = 1 and cos(E grad k3, grad KL(ref || pi)) = 1 to 2e-16, while
  cos(E grad k3, grad KL(pi || ref)) falls from 0.998 to 0.70;
- Monte Carlo: all 54 sample means within 2.41 standard errors of the exact means; the norm of k1's
  averaged sampled gradient 0.0008 to 0.0063, the size sqrt((1 - sum pi^2) / N) ~ 0.0027 predicts for noise.

What it leaves out: the per-token sums PPO takes over a whole answer (the sum of per-token k1 or k3 is
an unbiased estimate of the sequence KL; its variance is not measured here), estimators of other divergences, continuous distributions, and anything
sampled from a real model (``ch4_ppo`` uses these estimators on real rollouts).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from minilife.align.kl import KL_KINDS, estimator_stats, exact_kl, expected_loss_gradients, kl_estimate
from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, start_run,
                             write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import cli

CHAPTER = "ch4_kl_lab"
FAMILIES = {"+d": 1.0, "-d": -1.0}


@dataclass
class KLLabConfig(RunConfig):
    """The KL estimators k1, k2, k3 by exact enumeration on tiny categorical policies, and as losses."""
    seed: int = cli_field(0, "seed of the reference's logits z, the direction d and the Monte-Carlo samples")
    vocab: int = cli_field(8, "K: outcomes of the categorical policies")
    points: int = cli_field(9, "scales s per direction, evenly spaced on [0, --max-scale]", smoke=5)
    max_scale: float = cli_field(3.0, "largest s: the policy's logits are z +/- s d")
    samples: int = cli_field(100_000, "Monte-Carlo samples per policy (0: skip the check)", smoke=4000)
    plots: bool = cli_field(True, "write kl_bias.png, kl_std.png and kl_grad.png")

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(vocab=2, points=2, samples=0), above=dict(max_scale=0))
        if not math.isfinite(self.max_scale):
            raise ValueError(f"--max-scale must be a finite number > 0, got {self.max_scale}")


def _cosine(a: torch.Tensor, b: torch.Tensor, tiny: float = 1e-12) -> float | None:
    """cos(a, b) of two (K,) vectors; None when either is 0 up to rounding (norm < ``tiny``): at pi = ref
    every gradient here is 0 and its computed direction is rounding noise."""
    na, nb = a.norm().item(), b.norm().item()
    return (a @ b).item() / (na * nb) if na > tiny and nb > tiny else None


def exact_row(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Everything exact about one policy softmax(logits) (K,) against ref = softmax(ref_logits) (K,)."""
    p, q = torch.softmax(logits, -1), torch.softmax(ref_logits, -1)  # (K,), (K,)
    stats = estimator_stats(p, q)
    log_ratio = p.log() - q.log()  # (K,): log(pi / ref) at each outcome
    centred = log_ratio - (q * log_ratio).sum()  # (K,)
    row = {"kl": exact_kl(p, q).item(), "reverse_kl": exact_kl(q, p).item(),
           "k2_bias_predicted": (q * centred ** 3).sum().item() / 6}  # kappa3 / 6, the leading term near ref
    for kind, m in stats.items():
        row.update({f"{kind}_mean": m.mean, f"{kind}_bias": m.bias, f"{kind}_std": math.sqrt(max(m.variance, 0.0))})
    g = expected_loss_gradients(logits, q)
    row.update({f"grad_{name}": g[name].norm().item() for name in g})
    row.update({"cos_k2_kl": _cosine(g["k2"], g["kl_pi_ref"]), "cos_k3_kl": _cosine(g["k3"], g["kl_pi_ref"]),
                "cos_k3_reverse_kl": _cosine(g["k3"], g["kl_ref_pi"])})
    return row


def monte_carlo_row(ref_logits: torch.Tensor, logits: torch.Tensor, exact: dict, n: int,
                    generator: torch.Generator) -> dict:
    """``n`` tokens sampled from the policy: each estimator's sample mean and its distance from the exact
    mean in standard errors (z); the norm of k1's gradient averaged over the samples, backpropagated as
    a training loop would, next to sqrt((1 - sum p^2) / n), the RMS of a zero-mean average of them."""
    z = logits.detach().clone().requires_grad_()  # (K,)
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(ref_logits, -1)  # (K,), (K,)
    x = torch.multinomial(logp.detach().exp(), n, replacement=True, generator=generator)  # (n,) sampled outcomes
    row = {}
    for kind in KL_KINDS:
        k = kl_estimate(logp[x], logq[x], kind)  # (n,)
        mean, se = k.mean().item(), exact[f"{kind}_std"] / math.sqrt(n)
        row[f"mc_{kind}_mean"] = mean
        row[f"mc_{kind}_z"] = (mean - exact[f"{kind}_mean"]) / se if se > 0 else 0.0
        if kind == "k1":
            k.mean().backward()
    p = logp.detach().exp()
    row.update({"mc_grad_k1": z.grad.norm().item(), "mc_grad_k1_rms": math.sqrt((1 - (p * p).sum().item()) / n)})
    return row


def _f(v, digits: int = 3) -> str:
    """A table cell: '-' for None, else a float with ``digits`` significant digits."""
    return "-" if v is None else f"{v:.{digits}g}"


def main(argv: list[str] | None = None) -> dict:
    cfg: KLLabConfig = config_from_args(KLLabConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out, _ = start_run(CHAPTER, cfg)

    # 1. the family: one reference, policies along +d and -d at growing scale s
    g = torch.Generator().manual_seed(cfg.seed)
    ref_logits = torch.randn(cfg.vocab, generator=g, dtype=torch.float64)  # (K,)
    direction = torch.randn(cfg.vocab, generator=g, dtype=torch.float64)  # (K,)
    scales = torch.linspace(0.0, cfg.max_scale, cfg.points, dtype=torch.float64).tolist()
    ref = torch.softmax(ref_logits, -1)
    print(f"[{CHAPTER}] reference over K={cfg.vocab} outcomes: {[round(v, 3) for v in ref.tolist()]}; policies "
          f"softmax(z +/- s d) for s in {[round(s, 3) for s in scales]}")

    # 2. exact enumeration (and the Monte-Carlo check) at every policy
    rows = []
    with MetricsLogger(out / "metrics.jsonl") as logger:
        for family, sign in FAMILIES.items():
            for s in scales:
                logits = ref_logits + sign * s * direction  # (K,)
                row = {"family": family, "s": s, **exact_row(ref_logits, logits)}
                if cfg.samples:
                    row.update(monte_carlo_row(ref_logits, logits, row, cfg.samples, g))
                rows.append(row)
                logger.log(**row)

    # 3. the tables
    def table(cols, head):
        lines = [head, "|" + "---|" * len(cols)]
        return "\n".join(lines + ["| " + " | ".join(c(r) for c in cols) + " |" for r in rows])
    print(f"\n[{CHAPTER}] the estimators at x ~ pi, exact (bias = mean - KL; std of ONE sample)")
    print(table([lambda r: r["family"], lambda r: f"{r['s']:.3g}", lambda r: _f(r["kl"], 4)]
                + [lambda r, k=k, c=c: _f(r[f"{k}_{c}"]) for k in KL_KINDS for c in ("bias", "std")]
                + [lambda r: _f(r["k2_bias_predicted"])],
                "| dir | s | KL(pi, ref) | k1 bias | k1 std | k2 bias | k2 std | k3 bias | k3 std | "
                "k2 bias ~ kappa3/6 |"))
    print(f"\n[{CHAPTER}] expected gradients wrt the logits of each estimator used as a loss, vs the true ones")
    print(table([lambda r: r["family"], lambda r: f"{r['s']:.3g}", lambda r: _f(r["kl"], 4),
                 lambda r: _f(r["grad_k1"]), lambda r: _f(r["grad_kl_pi_ref"]), lambda r: _f(r["cos_k2_kl"], 6),
                 lambda r: _f(r["cos_k3_kl"]), lambda r: _f(r["cos_k3_reverse_kl"], 6)],
                "| dir | s | KL | norm E grad k1 | norm grad KL(pi, ref) | cos(E grad k2, grad KL) | "
                "cos(E grad k3, grad KL) | cos(E grad k3, grad KL(ref, pi)) |"))
    if cfg.samples:
        print(f"\n[{CHAPTER}] Monte Carlo, {cfg.samples} samples per policy: sample mean (z = distance from the "
              f"exact mean in standard errors), and the norm of k1's sampled loss gradient")
        print(table([lambda r: r["family"], lambda r: f"{r['s']:.3g}", lambda r: _f(r["kl"], 4)]
                    + [lambda r, k=k: f"{r[f'mc_{k}_mean']:.4g} ({r[f'mc_{k}_z']:+.2f})" for k in KL_KINDS]
                    + [lambda r: _f(r["mc_grad_k1"]), lambda r: _f(r["mc_grad_k1_rms"])],
                    "| dir | s | KL | k1 mean (z) | k2 mean (z) | k3 mean (z) | norm of mean grad k1 | "
                    "sqrt((1 - sum p^2) / N) |"))

    # 4. what the tables say, in numbers
    moved = [r for r in rows if r["s"] > 0]
    k2 = {fam: [r["k2_bias"] for r in moved if r["family"] == fam] for fam in FAMILIES}
    facts = {
        "max_abs_bias_k1": max(abs(r["k1_bias"]) for r in rows), "max_abs_bias_k3": max(abs(r["k3_bias"]) for r in rows),
        "k2_bias": k2, "k2_bias_monotone": {f: all(abs(b) < abs(c) for b, c in zip(v, v[1:])) for f, v in k2.items()},
        "max_kl": max(r["kl"] for r in rows), "max_grad_k1": max(r["grad_k1"] for r in rows),
        "min_grad_kl_pi_ref": min(r["grad_kl_pi_ref"] for r in moved),
        "min_cos_k2_kl": min(r["cos_k2_kl"] for r in moved), "min_cos_k3_kl": min(r["cos_k3_kl"] for r in moved),
        "k3_std_above_k1": [(r["family"], r["s"]) for r in moved if r["k3_std"] > r["k1_std"]],
    }
    if cfg.samples:
        facts["max_abs_mc_z"] = max(abs(r[f"mc_{k}_z"]) for r in rows for k in KL_KINDS)
        facts["max_mc_grad_k1_over_rms"] = max(r["mc_grad_k1"] / r["mc_grad_k1_rms"] for r in moved)
    print(f"\n[{CHAPTER}] k1 and k3: |bias| <= {max(facts['max_abs_bias_k1'], facts['max_abs_bias_k3']):.1e} at every "
          f"policy (unbiased); k2: bias {k2['+d'][-1]:+.4f} along +d and {k2['-d'][-1]:+.4f} along -d at s = "
          f"{scales[-1]:g} (biased, either sign)")
    print(f"[{CHAPTER}] as losses: |E grad k1| <= {facts['max_grad_k1']:.1e} (zero) while |grad KL(pi||ref)| >= "
          f"{facts['min_grad_kl_pi_ref']:.3f}; cos(E grad k2, grad KL) >= {facts['min_cos_k2_kl']:.6f}; "
          f"cos(E grad k3, grad KL) down to {facts['min_cos_k3_kl']:.3f} (k3's is grad KL(ref||pi))")
    if facts["k3_std_above_k1"]:
        print(f"[{CHAPTER}] k3's std exceeds k1's at {len(facts['k3_std_above_k1'])} policies far from the "
              f"reference (first: {facts['k3_std_above_k1'][0]}): its lower variance holds near ref only")
    if cfg.samples:
        print(f"[{CHAPTER}] Monte Carlo: every sample mean within {facts['max_abs_mc_z']:.2f} standard errors of "
              f"the exact mean; k1's sampled gradient norm <= {facts['max_mc_grad_k1_over_rms']:.2f}x its "
              f"zero-mean RMS")

    # 5. plots and summary
    if cfg.plots:
        by = {fam: [r for r in rows if r["family"] == fam] for fam in FAMILIES}
        kl_of = {fam: [r["kl"] for r in rs] for fam, rs in by.items()}
        for what, name in (("bias", "kl_bias.png"), ("std", "kl_std.png")):
            plot_lines(out / name, {f"{k} ({fam})": (kl_of[fam], [r[f"{k}_{what}"] for r in rs])
                                    for fam, rs in by.items() for k in KL_KINDS},
                       hlines={"0": 0.0} if what == "bias" else None, xlabel="true KL(pi || ref) (nats)",
                       ylabel=f"{what} of one sample (nats)",
                       title=f"{CHAPTER}: {what} of k1, k2, k3 (exact, K={cfg.vocab})")
        rs = by["+d"]
        plot_lines(out / "kl_grad.png", {"|grad KL(pi||ref)|": (kl_of["+d"], [r["grad_kl_pi_ref"] for r in rs]),
                                         "|grad KL(ref||pi)|": (kl_of["+d"], [r["grad_kl_ref_pi"] for r in rs])},
                   points={f"|E grad {k}| as a loss": (kl_of["+d"], [r[f"grad_{k}"] for r in rs]) for k in KL_KINDS},
                   xlabel="true KL(pi || ref) (nats)", ylabel="gradient norm wrt the logits",
                   title=f"{CHAPTER}: estimators as losses (+d)")
    summary = {"chapter": CHAPTER, "reference": ref.tolist(), "direction": direction.tolist(), "scales": scales,
               "rows": rows, **facts, "config": dataclasses.asdict(cfg)}
    write_json_atomic(out / "summary.json", summary)
    print(f"[{CHAPTER}] wrote {out}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

"""Benchmark: training throughput of minilife's GPT against a reference built from torch's own modules.

Both models have the same shapes and the same computation (pre-norm blocks, RMSNorm, RoPE on q and k,
causal attention, SwiGLU, tied embeddings, mean cross-entropy):
- minilife: ``minilife.model.transformer.GPT`` (attn_impl "sdpa", and the "math" path for its ratio)
  with ``minilife.optim.adamw.AdamW``, param groups and ``minilife.optim.clip.clip_grad_norm``.
- reference (written here from torch only): ``nn.Embedding``, ``nn.RMSNorm``, ``nn.Linear``,
  ``F.scaled_dot_product_attention(is_causal=True)``, ``F.silu``, ``F.cross_entropy``,
  ``torch.optim.AdamW`` (same groups: decay on 2-D weights) and ``torch.nn.utils.clip_grad_norm_``.
  RoPE is written minimally in the rotate-half form (x*cos + rotate_half(x)*sin, LLaMA's), while
  minilife uses the adjacent-pair form; the two pair channels differently (so the weights are not
  interchangeable) and do the same multiply-adds, but their elementwise kernels are not timed
  separately: the ratio includes whatever the two RoPE forms cost differently.

One timed unit is a full training step (forward, backward, clip, optimizer step, zero_grad) on the
same batch for every side. Sides are interleaved within each repeat, after warmup steps, and the
order rotates by one side every repeat (as ``minilife.measure.interleaved_times`` does), so drifting
machine load and the slot right after another side's step hit all of them alike. Reported: tokens/s
min and median per side, ratios ours / reference, model FLOPs utilisation against the fp32 matmul
peak measured in this run (a large torch.matmul), and the bf16 autocast speed-up.

Model FLOPs per token (Kaplan et al. 2020; PaLM appendix B): 6 * N_matmul + 12 * L * T * C, where
N_matmul counts the weights used in matmuls (blocks + LM head; the embedding lookup is free) and the
second term is attention's QK^T and AV (forward + backward, no discount for the causal half).

    python bench/pretrain.py                 # default shapes: ~30 s on 2 quiet cores, ~3 min on shared ones
    python bench/pretrain.py --quick         # seconds, for a smoke check
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minilife.model.transformer import GPT, ModelConfig  # noqa: E402
from minilife.optim.adamw import AdamW  # noqa: E402
from minilife.optim.clip import clip_grad_norm  # noqa: E402

# --------------------------------------------------------------------------------------------
# the reference model, torch modules only


class RefBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + swiglu(norm(x)). x: (B, T, C)."""

    def __init__(self, c: int, n_head: int, hidden: int, eps: float):
        super().__init__()
        self.n_head = n_head
        self.attn_norm, self.ffn_norm = nn.RMSNorm(c, eps=eps), nn.RMSNorm(c, eps=eps)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.proj = nn.Linear(c, c, bias=False)
        self.w1, self.w3 = nn.Linear(c, hidden, bias=False), nn.Linear(c, hidden, bias=False)
        self.w2 = nn.Linear(hidden, c, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) halves of the last dim -> (-x2, x1); x: (..., D) -> (..., D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RefGPT(nn.Module):
    """The reference decoder: token embedding, ``RefBlock`` x L, RMSNorm, tied LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(RefBlock(cfg.n_embd, cfg.n_head, cfg.ffn_dim, cfg.norm_eps)
                                    for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        d = cfg.head_dim
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float64),
                             cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets: (B, T) long -> mean cross-entropy, a 0-d tensor."""
        T = idx.shape[1]
        x = self.emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = F.linear(self.norm(x), self.emb.weight)  # tied head, (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))  # (B*T, V), (B*T,)


# --------------------------------------------------------------------------------------------


def model_flops_per_token(cfg: ModelConfig) -> float:
    c, f = cfg.n_embd, cfg.ffn_dim
    n_matmul = cfg.n_layer * (4 * c * c + 3 * c * f) + cfg.vocab_size * c
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.context_length * c


def matmul_peak(n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def make_side(kind: str, cfg: ModelConfig, precision: str):
    """A closure that runs one training step of ``kind`` on (x, y)."""
    torch.manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    if kind.startswith("minilife"):
        impl = "math" if kind.endswith("math") else "sdpa"
        model = GPT(ModelConfig(**{**cfg.__dict__, "attn_impl": impl}))
        opt = AdamW(model.param_groups(0.1), lr=1e-4, betas=(0.9, 0.95))

        def step(x, y):
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    model = RefGPT(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2 and p is not model.emb.weight]
    rest = [p for p in model.parameters() if not (p.dim() >= 2 and p is not model.emb.weight)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))

    def step(x, y):
        with autocast:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="training tokens/s: minilife GPT vs a torch-modules reference")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast sides")
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats (a smoke check)")
    a = p.parse_args(argv)
    for flag in ("n_layer", "n_head", "n_embd", "context_length", "batch_size", "vocab_size", "repeats"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.quick:
        a.n_layer, a.n_head, a.n_embd, a.context_length, a.batch_size, a.repeats, a.warmup = 2, 2, 64, 64, 4, 2, 1
    cfg = ModelConfig(vocab_size=a.vocab_size, context_length=a.context_length, n_layer=a.n_layer,
                      n_head=a.n_head, n_embd=a.n_embd)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (a.batch_size, cfg.context_length), generator=g)  # (B, T)
    y = torch.randint(0, cfg.vocab_size, (a.batch_size, cfg.context_length), generator=g)  # (B, T)
    tokens = x.numel()
    sides = {"reference fp32": ("reference", "fp32"), "minilife sdpa fp32": ("minilife-sdpa", "fp32"),
             "minilife math fp32": ("minilife-math", "fp32")}
    if not a.no_bf16:
        sides.update({"reference bf16": ("reference", "bf16"), "minilife sdpa bf16": ("minilife-sdpa", "bf16")})
    steps = {name: make_side(kind, cfg, prec) for name, (kind, prec) in sides.items()}
    print(f"shapes: L={cfg.n_layer} H={cfg.n_head} C={cfg.n_embd} F={cfg.ffn_dim} T={cfg.context_length} "
          f"B={a.batch_size} V={cfg.vocab_size}; {tokens} tokens/step; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; random token ids (throughput does not depend on them)")
    start = time.perf_counter()
    progress = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    for name, step in steps.items():
        progress(f"warm-up: {a.warmup} step(s) of {name}")
        for _ in range(a.warmup):
            step(x, y)
    n_peak = 2048 if not a.quick else 512
    progress(f"matmul peak ({n_peak}^3)")
    peak = {"fp32": matmul_peak(n_peak, 5), "bf16": 0.0 if a.no_bf16 else matmul_peak(n_peak, 5, torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(a.repeats):
        progress(f"timed round {r + 1}/{a.repeats}: one step of each of {len(steps)} sides")
        for name in names[r % len(names):] + names[:r % len(names)]:  # interleaved, the order rotating
            t0 = time.perf_counter()
            steps[name](x, y)
            times[name].append(time.perf_counter() - t0)
    for prec in peak:  # measured before and after the timed steps, best kept
        if peak[prec]:
            peak[prec] = max(peak[prec], matmul_peak(n_peak, 5, torch.float32 if prec == "fp32" else torch.bfloat16))
    tps = {n: {"min": tokens / max(t), "median": tokens / statistics.median(t), "max": tokens / min(t)}
           for n, t in times.items()}
    flops_tok = model_flops_per_token(cfg)

    print("\n| side | tokens/s (worst) | tokens/s (median) | tokens/s (best) | MFU (median, vs same-dtype matmul peak) |"
          "\n|---|---|---|---|---|")
    for n, v in tps.items():
        print(f"| {n} | {v['min']:.0f} | {v['median']:.0f} | {v['max']:.0f} | "
              f"{v['median'] * flops_tok / peak[sides[n][1]]:.2f} |")

    def ratio(a_: str, b_: str) -> dict:
        """Speed of a_ over speed of b_: from each side's fastest step, and from each side's median."""
        return {"min": min(times[b_]) / min(times[a_]),
                "median": statistics.median(times[b_]) / statistics.median(times[a_])}

    ratios = {"minilife sdpa / reference (fp32)": ratio("minilife sdpa fp32", "reference fp32"),
              "minilife math / reference (fp32)": ratio("minilife math fp32", "reference fp32")}
    if not a.no_bf16:
        ratios["minilife bf16 / minilife fp32 (autocast speed-up)"] = ratio("minilife sdpa bf16", "minilife sdpa fp32")
        ratios["reference bf16 / reference fp32"] = ratio("reference bf16", "reference fp32")
    print("\n| ratio of speeds (> 1: first is faster) | from fastest steps (min time) | from medians |\n|---|---|---|")
    for n, r in ratios.items():
        print(f"| {n} | {r['min']:.3f} | {r['median']:.3f} |")
    mfu = tps["minilife sdpa fp32"]["median"] * flops_tok / peak["fp32"]
    bf16_peak = "skipped" if a.no_bf16 else f"{peak['bf16'] / 1e9:.1f} GFLOP/s"
    print(f"\nmatmul peak ({n_peak}^3, best of 10): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {bf16_peak}; "
          f"model FLOPs/token {flops_tok / 1e6:.1f} M")
    print(f"minilife sdpa fp32 MFU (median) = {mfu:.2f} (goal >= 0.6); "
          f"ratio vs reference (median) = {ratios['minilife sdpa / reference (fp32)']['median']:.3f} (goal >= 0.95)")
    return {"tokens_per_s": tps, "ratios": ratios, "mfu": mfu, "peak_flops": peak, "flops_per_token": flops_tok}


if __name__ == "__main__":
    main()

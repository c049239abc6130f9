"""Chapter 5.5: kernels -- Triton attention and cross-entropy against float64 math, and what they save.

    python -m minilife.chapters.ch5_kernels            # ~12 s on 2 cores (--smoke: ~5 s)

prints the max error of every attention and loss tier against float64 math, peak memory against V and T
(materialised vs fused / tiled), and GPU timings when there is a GPU; PNGs and summary.json in
runs/ch5_kernels/.

What it does (read ``main`` top to bottom)
1. Parity: every tier of attention (naive, SDPA, flash attention in torch tiles, flash attention in
   Triton) and of the loss (naive, ``F.cross_entropy``, Triton cross-entropy, linear + loss
   materialised, fused linear + cross-entropy) runs forward and backward in float32 on the same
   inputs; the table gives the max abs error of the output and of the gradients against the naive
   formula evaluated in float64.
2. Memory: peak memory of one forward + backward, naive vs tiled/fused, swept over the vocabulary V
   (materialised logits vs the fused head + loss) and over the sequence length T (naive attention vs
   torch-tiled flash attention). Plots ``memory_vs_vocab.png`` and ``attention_memory_vs_T.png``.
3. Timings, only with a GPU: Triton kernels vs torch's fused ops (``bench_loss`` and
   ``bench_attention`` in ``minilife.measure``); on a CPU they say "n/a".

How memory is measured. On CUDA: the allocator's peak (``max_memory_allocated``) minus what was
allocated before. On CPU torch keeps no allocator statistics, so ``peak_tensor_bytes`` (in
``minilife.measure``) counts it: a ``TorchDispatchMode`` sees every op the
forward and backward run, adds the bytes of each new output storage, and a weakref finalizer
subtracts them when the storage is freed; the peak of that running total is reported. It counts
tensors only (no allocator slack, no scratch buffers *inside* one aten kernel), the same way for both
sides, and is exact and repeatable -- unlike RSS, which glibc's malloc keeps high after frees.

Triton on a CPU. With no GPU the Triton tiers run in Triton's interpreter (numpy; slow, so at small
sizes) in a *child* Python started with ``TRITON_INTERPRET=1`` in its environment. Setting the
variable inside this process would not do: Triton reads it when a ``@triton.jit`` function is
created, and its own ``tl`` helpers are created when triton is first imported -- which other code
(torch's flop counter, for one) may already have done, without the flag. ``--no-interpret`` marks
those rows "n/a (no GPU; see tests under the interpreter)" instead.

What it leaves out: Triton timings on CPU (the interpreter's speed means nothing), autotuning.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minilife.common import (MetricsLogger, RunConfig, check_flags, cli_field, config_from_args, markdown_table,
                             start_run, write_json_atomic)
from minilife.plots import plot_lines
from minilife.runs import cli
from minilife.kernels import interpreting, triton_available
from minilife.kernels.cross_entropy import cross_entropy
from minilife.kernels.flash_attention import flash_attention
from minilife.kernels.flash_attention_torch import flash_attention_torch
from minilife.kernels.fused_linear_ce import fused_linear_cross_entropy
from minilife.kernels.reference import attention_naive, cross_entropy_naive
from minilife.measure import MiB, bench_attention, bench_loss, linear_ce_sides, peak_memory_bytes

CHAPTER = "ch5_kernels"
NA = "n/a (no GPU; see tests under the interpreter)"


@dataclass
class KernelsConfig(RunConfig):
    """Triton attention and cross-entropy vs float64 math: parity, memory saved, timings on a GPU."""
    seed: int = cli_field(0, "seed for all random inputs")
    device: str = cli_field("auto", "auto | cpu | cuda")
    interpret: bool = cli_field(True, "with no GPU, run the Triton tiers in Triton's interpreter (small sizes)")
    tokens: int = cli_field(2048, "tokens N in the vocabulary sweep", smoke=64)
    hidden: int = cli_field(256, "hidden size C in the vocabulary sweep", smoke=16)
    vocabs: list[int] = cli_field([2048, 8192, 32768, 50257], "vocabularies V swept", smoke=[256, 1024, 4096])
    chunk: Optional[int] = cli_field(None, "rows per chunk of the fused loss in the sweep (None: N/8)")
    seq_lens: list[int] = cli_field([256, 512, 1024], "sequence lengths T swept for attention", smoke=[64, 128])

    def __post_init__(self):
        super().__post_init__()
        check_flags(self, at_least=dict(tokens=1, hidden=1, chunk=1))
        if not self.vocabs or min(self.vocabs) < 2:
            raise ValueError(f"--vocabs needs one or more sizes >= 2, got {self.vocabs}")
        if self.seq_lens is not None and (not self.seq_lens or min(self.seq_lens) < 1):
            raise ValueError(f"--seq-lens needs one or more lengths >= 1, got {self.seq_lens}")


# ------------------------------------------------------------------------------------------------
# helpers


def _grads(out: torch.Tensor, inputs: tuple, upstream: Optional[torch.Tensor] = None) -> tuple:
    return torch.autograd.grad(out, inputs, upstream)


def _max_err(got, ref) -> float:
    if isinstance(got, (tuple, list)):
        return max(_max_err(g, r) for g, r in zip(got, ref))
    return (got.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


# ------------------------------------------------------------------------------------------------
# 1. parity

ATTN_TIERS = ["naive, fp32", "torch SDPA", "flash attention, torch tiles", "flash attention, Triton"]
LOSS_TIERS = ["naive, fp32", "torch F.cross_entropy", "Triton cross_entropy", "materialised: linear + F.cross_entropy",
              "fused linear + CE, torch chunks", "fused linear + CE, Triton chunks"]
TRITON_TIERS = {"flash attention, Triton", "Triton cross_entropy", "fused linear + CE, Triton chunks"}


def parity_attention(device, tiers: list[str], B=1, H=2, T=48, D=16, seed=0) -> list[dict]:
    """Causal attention tiers vs attention_naive in float64: output and (dq, dk, dv) max abs errors."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, d_o = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref_out = attention_naive(q64, k64, v64, causal=True)
    ref_grads = _grads(ref_out, (q64, k64, v64), d_o)
    fns = {"naive, fp32": lambda a, b, c: attention_naive(a, b, c, causal=True),
           "torch SDPA": lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
           "flash attention, torch tiles": lambda a, b, c: flash_attention_torch(a, b, c, True, None, 16, 16),
           "flash attention, Triton": lambda a, b, c: flash_attention(a, b, c, causal=True, blocks=(16, 16))}
    rows = []
    for tier in tiers:
        x = tuple(t.float().to(device).requires_grad_(True) for t in (q, k, v))
        out = fns[tier](*x)
        grads = _grads(out, x, d_o.float().to(device))
        rows.append({"op": f"attention B={B} H={H} T={T} D={D}", "tier": tier,
                     "out_err": _max_err(out, ref_out), "grad_err": _max_err(grads, ref_grads)})
    return rows


def parity_loss(device, tiers: list[str], N=64, V=1000, C=32, chunk=24, seed=0) -> list[dict]:
    """Loss tiers vs cross_entropy_naive in float64 (mean, 1/8 of targets ignored): loss and grads.

    Cross-entropy tiers differentiate wrt the logits; the linear + loss tiers wrt (hidden, weight).
    The two "fused" tiers are one function: which per-chunk path it takes depends on where it runs.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64) / C**0.5 * 3  # logits of O(3)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::8] = -100
    t_dev = targets.to(device)
    fused = lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk)  # noqa: E731
    fns = {"naive, fp32": cross_entropy_naive, "torch F.cross_entropy": F.cross_entropy,
           "Triton cross_entropy": cross_entropy,
           "materialised: linear + F.cross_entropy": lambda h, w, t: F.cross_entropy(h @ w.t(), t),
           "fused linear + CE, torch chunks": fused, "fused linear + CE, Triton chunks": fused}
    rows = []
    for tier in tiers:
        if tier in LOSS_TIERS[:3]:  # on the logits
            logits = (hidden @ weight.t()).requires_grad_(True)  # (N, V) float64
            ref = cross_entropy_naive(logits, targets)
            ref_grads, inputs = _grads(ref, (logits,)), (logits,)
            op = f"cross-entropy N={N} V={V}"
        else:  # on (hidden, weight)
            inputs = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
            ref = cross_entropy_naive(inputs[0] @ inputs[1].t(), targets)
            ref_grads = _grads(ref, inputs)
            op = f"linear + CE N={N} C={C} V={V} chunk={chunk}"
        x = tuple(t.detach().float().to(device).requires_grad_(True) for t in inputs)
        loss = fns[tier](*x, t_dev)
        rows.append({"op": op, "tier": tier, "out_err": _max_err(loss, ref),
                     "grad_err": _max_err(_grads(loss, x), ref_grads)})
    return rows


def triton_rows(device, attn_kw: dict, loss_kw: dict) -> list[dict]:
    """The parity rows of the three Triton tiers."""
    return (parity_attention(device, ["flash attention, Triton"], **attn_kw)
            + parity_loss(device, ["Triton cross_entropy", "fused linear + CE, Triton chunks"], **loss_kw))


def triton_rows_in_interpreter(attn_kw: dict, loss_kw: dict) -> list[dict]:
    """``triton_rows`` on CPU, computed by a child Python started with TRITON_INTERPRET=1.

    Why a child process: Triton decides at *import* time whether its own ``tl`` helpers are
    interpreted; an earlier ``import triton`` in this process (torch's flop counter does one) would
    make the interpreter fail. A fresh interpreter-mode process avoids that and leaves this one on
    the fast torch paths.
    """
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the minilife package
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    code = ("import json, sys, torch; from minilife.chapters.ch5_kernels import triton_rows; "
            "print(json.dumps(triton_rows(torch.device('cpu'), *json.loads(sys.argv[1]))))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps([attn_kw, loss_kw])], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{CHAPTER}: the Triton tiers failed under the interpreter:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def parity(device, triton_mode: str, attn_kw: dict, loss_kw: dict) -> list[dict]:
    """All tiers in table order. Triton tiers: on CUDA in this process; on CPU ('interpreter') in this
    process if it already interprets Triton (started with TRITON_INTERPRET=1, as the tests are), else
    in a child process; otherwise marked n/a."""
    cuda = device.type == "cuda"
    # under an interpreting process the fused function takes Triton chunks: no torch-chunks row then
    plain_loss = [t for t in LOSS_TIERS if t not in TRITON_TIERS
                  and not ((cuda or interpreting()) and "torch chunks" in t)]
    rows = parity_attention(device, [t for t in ATTN_TIERS if t not in TRITON_TIERS], **attn_kw)
    rows += parity_loss(device, plain_loss, **loss_kw)
    if triton_mode == "cuda" or (triton_mode == "interpreter" and interpreting()):
        rows += triton_rows(device, attn_kw, loss_kw)
    elif triton_mode == "interpreter":
        rows += triton_rows_in_interpreter(attn_kw, loss_kw)
    else:
        rows += [{"op": op, "tier": t, "out_err": NA, "grad_err": NA}
                 for op, t in (("attention", "flash attention, Triton"), ("cross-entropy", "Triton cross_entropy"),
                               ("linear + CE", "fused linear + CE, Triton chunks"))]
    place = lambda r: ((0, ATTN_TIERS.index(r["tier"])) if r["op"].startswith("attention")  # noqa: E731
                       else (1, LOSS_TIERS.index(r["tier"])))
    return sorted(rows, key=place)


# ------------------------------------------------------------------------------------------------
# 2. memory


def memory_sweep_vocab(device, N: int, C: int, vocabs: list[int], chunk: int) -> list[dict]:
    rows = []
    for V in tqdm(vocabs, desc="memory vs V", leave=False):
        sides = linear_ce_sides(N, V, C, torch.float32, device, chunk)
        fused, mat = (peak_memory_bytes(sides[k], device) / MiB for k in ("fused", "materialised"))
        rows.append({"V": V, "N": N, "C": C, "chunk": chunk, "logits_MiB": round(N * V * 4 / MiB, 2),
                     "materialised_MiB": round(mat, 2), "fused_MiB": round(fused, 2), "ratio": round(fused / mat, 3)})
    return rows


def memory_sweep_attention(device, T_list: list[int], B=1, H=4, D=32) -> list[dict]:
    rows = []
    for T in tqdm(T_list, desc="memory vs T", leave=False):
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, H, T, D, generator=g).to(device).requires_grad_(True) for _ in range(3))
        run = lambda f: lambda: torch.autograd.grad(f(q, k, v).sum(), (q, k, v))  # noqa: E731
        naive = peak_memory_bytes(run(lambda a, b, c: attention_naive(a, b, c, causal=True)), device) / MiB
        tiled = peak_memory_bytes(run(lambda a, b, c: flash_attention_torch(a, b, c, causal=True)), device) / MiB
        rows.append({"T": T, "B": B, "H": H, "D": D, "naive_MiB": round(naive, 2),
                     "flash_torch_MiB": round(tiled, 2), "ratio": round(tiled / naive, 3)})
    return rows


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg: KernelsConfig = config_from_args(KernelsConfig, argv, prog=f"python -m minilife.chapters.{CHAPTER}")
    out_dir, device = start_run(CHAPTER, cfg)
    cuda = device.type == "cuda"
    if cuda and triton_available():
        triton_mode = "cuda"
    elif not cuda and cfg.interpret and triton_available():
        triton_mode = "interpreter"
    else:
        triton_mode = "n/a"
    N, C, vocabs, seq_lens = cfg.tokens, cfg.hidden, cfg.vocabs, cfg.seq_lens
    log = MetricsLogger(out_dir / "metrics.jsonl")
    print(f"[{CHAPTER}] device {device}; Triton tiers: {triton_mode}; writing to {out_dir}")

    # 1. parity against float64 -------------------------------------------------------------------
    print("\n1. Parity: max abs error vs the naive formula in float64 (forward + backward, float32 inputs)")
    if triton_mode == "interpreter":
        where = "this process" if interpreting() else "a child process with TRITON_INTERPRET=1"
        print(f"   (Triton tiers: Triton's interpreter in {where}; small shapes)")
    if cuda:
        attn_kw = dict(T=512, D=64, seed=cfg.seed)
        loss_kw = dict(N=2048, V=32000, C=64, chunk=500, seed=cfg.seed)
    else:
        attn_kw = dict(T=32 if cfg.smoke else 80, D=16 if cfg.smoke else 32, seed=cfg.seed)
        loss_kw = dict(N=32 if cfg.smoke else 128, V=300 if cfg.smoke else 2000, C=16 if cfg.smoke else 64,
                       chunk=24 if cfg.smoke else 48, seed=cfg.seed)
    parity_rows = parity(device, triton_mode, attn_kw, loss_kw)
    for r in parity_rows:
        log.log(section="parity", **r)
    print(markdown_table(parity_rows, ["op", "tier", "out_err", "grad_err"]))

    # 2. memory ------------------------------------------------------------------------------------
    method = "cuda allocator" if cuda else "live tensor bytes, dispatch-mode count"
    print(f"\n2. Peak memory of forward + backward ({method})")
    # a fixed chunk shows how each side grows with V (the default rule would pick one chunk -- no
    # saving, and none needed -- while a chunk's logits are under 16M elements)
    chunk = cfg.chunk or max(1, N // 8)
    vocab_rows = memory_sweep_vocab(device, N, C, vocabs, chunk)
    for r in vocab_rows:
        log.log(section="memory_vocab", **r)
    print(markdown_table(vocab_rows, ["V", "N", "C", "chunk", "logits_MiB", "materialised_MiB", "fused_MiB",
                                      "ratio"]))
    attn_mem = memory_sweep_attention(device, seq_lens)
    for r in attn_mem:
        log.log(section="memory_attention", **r)
    print(markdown_table(attn_mem, ["T", "B", "H", "D", "naive_MiB", "flash_torch_MiB", "ratio"]))
    col = lambda rows, key: [r[key] for r in rows]  # noqa: E731
    plot_lines(out_dir / "memory_vs_vocab.png",
               {"linear + F.cross_entropy (materialised)": (vocabs, col(vocab_rows, "materialised_MiB")),
                "fused linear + CE": (vocabs, col(vocab_rows, "fused_MiB"))},
               title=f"peak memory, fwd+bwd, N={N} C={C} chunk={chunk}", xlabel="vocabulary V", ylabel="MiB",
               logy=True)
    plot_lines(out_dir / "attention_memory_vs_T.png",
               {"naive attention": (seq_lens, col(attn_mem, "naive_MiB")),
                "flash attention (torch tiles)": (seq_lens, col(attn_mem, "flash_torch_MiB"))},
               title="peak memory, causal attention fwd+bwd", xlabel="sequence length T", ylabel="MiB", logy=True)

    # 3. timings (GPU only) --------------------------------------------------------------------------
    if triton_mode == "cuda":
        print("\n3. Timings on " + torch.cuda.get_device_name(device))
        timings = bench_attention(device, seq_len=256 if cfg.smoke else 2048, repeats=3)
        timings += bench_loss(device, tokens=1024 if cfg.smoke else 8192, vocab=32000 if cfg.smoke else 128256,
                              hidden=512 if cfg.smoke else 2048, dtype=torch.bfloat16, repeats=3, triton_ce=True)
        for r in timings:
            log.log(section="timing", **r)
        print(markdown_table(timings, ["case", "metric", "ours", "reference", "ours_min", "ref_min", "ratio_min",
                                       "ratio_median"]))
    else:
        timings = "n/a (no GPU): the interpreter's speed says nothing about a GPU's; see bench/kernels.py"
        print(f"\n3. Timings: {timings}")
    log.close()

    numeric = [r[k] for r in parity_rows for k in ("out_err", "grad_err") if isinstance(r[k], float)]
    summary = {"device": str(device), "triton_tiers": triton_mode, "parity": parity_rows,
               "max_parity_error": max(numeric), "memory_vocab": vocab_rows, "memory_attention": attn_mem,
               "fused_memory_ratio_at_largest_V": vocab_rows[-1]["ratio"], "timings": timings}
    write_json_atomic(out_dir / "summary.json", summary)
    print(f"\nworst parity error {summary['max_parity_error']:.2e}; fused/materialised memory at V={vocabs[-1]}: "
          f"{summary['fused_memory_ratio_at_largest_V']:.3f}")
    return summary


if __name__ == "__main__":
    cli(main, CHAPTER)

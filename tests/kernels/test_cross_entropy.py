"""minilife.kernels.cross_entropy against float64 reference math and F.cross_entropy.

The Triton kernels run under TRITON_INTERPRET=1 (set below, before anything imports triton). The
interpreter costs (programs x loop steps), so shapes are small and ragged (N, V not multiples of the
block), and the vocabulary block is lowered with ``_block(...)`` to make the online log-sum-exp
cross several blocks. The pure-torch fallback is run against the same references.
"""
import os

import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():  # a GPU machine tests the compiled kernels instead
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import minilife.kernels as kernels_pkg  # noqa: E402
import minilife.kernels.cross_entropy as ce  # noqa: E402
from minilife.kernels.cross_entropy import cross_entropy  # noqa: E402
from minilife.kernels.reference import cross_entropy_naive  # noqa: E402


@contextlib.contextmanager
def _block(block_v: int, rows: int = 8):
    """Temporarily cap the tile under the interpreter: V spans several column blocks, N several row blocks."""
    old = ce.MAX_BLOCK_V_INTERPRETED, ce.MAX_ROWS_INTERPRETED
    ce.MAX_BLOCK_V_INTERPRETED, ce.MAX_ROWS_INTERPRETED = block_v, rows
    try:
        yield
    finally:
        ce.MAX_BLOCK_V_INTERPRETED, ce.MAX_ROWS_INTERPRETED = old


def _path(name: str):
    """'triton' = the kernels (under the interpreter); 'torch' = the pure-torch twin of the same math."""
    return ce.pure_torch() if name == "torch" else contextlib.nullcontext()


def _case(seed, N, V, scale, ignore_frac, ignore_index, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    drop = torch.rand(N, generator=g) < ignore_frac
    targets[drop] = ignore_index
    return logits, targets


def _loss_and_grad(fn, logits, targets, reduction, upstream, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, targets, reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss, x, upstream(loss))
    return loss.detach(), grad


def _reference(logits, targets, reduction, upstream, num_tokens=None, **kw):
    """float64 cross_entropy_naive; num_tokens means sum / num_tokens (its definition)."""
    x64 = logits.detach().double()
    if num_tokens is None:
        return _loss_and_grad(cross_entropy_naive, x64, targets, reduction, upstream, **kw)
    return _loss_and_grad(lambda x, t, reduction, **k: cross_entropy_naive(x, t, reduction="sum", **k) / num_tokens,
                          x64, targets, reduction, upstream, **kw)


UPSTREAMS = {  # the gradient flowing into the loss: scalar, random per row, or from loss.sum()
    "scalar": lambda loss: torch.full_like(loss, 1.7),
    "random": lambda loss: torch.linspace(-2.0, 3.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape),
    "sum": lambda loss: torch.ones((), dtype=loss.dtype).expand(loss.shape),  # stride-0 gradient
}


@pytest.mark.parametrize("path", ["triton", "torch"])
@given(seed=st.integers(0, 2**16), N=st.integers(1, 12), V=st.integers(2, 160),
       block=st.sampled_from([64, 1024]), rows=st.sampled_from([1, 4, 16]), scale=st.sampled_from([0.5, 4.0, 20.0]),
       ignore_frac=st.sampled_from([0.0, 0.3]), ignore_index=st.sampled_from([-100, 1]),
       reduction=st.sampled_from(["mean", "sum", "none"]), eps=st.sampled_from([0.0, 0.1, 0.73]),
       upstream=st.sampled_from(sorted(UPSTREAMS)))
def test_fp32_matches_float64_reference_and_torch(path, seed, N, V, block, rows, scale, ignore_frac,
                                                  ignore_index, reduction, eps, upstream):
    logits, targets = _case(seed, N, V, scale, ignore_frac, ignore_index)
    if reduction == "mean" and not bool((targets != ignore_index).any()):
        targets[0] = (ignore_index + 1) % V  # all-ignored mean is NaN: covered by its own test
    kw = dict(ignore_index=ignore_index, label_smoothing=eps)
    up = UPSTREAMS[upstream]
    with _block(block, rows), _path(path):
        loss, grad = _loss_and_grad(cross_entropy, logits, targets, reduction, up, **kw)
    ref_loss, ref_grad = _reference(logits, targets, reduction, up, **kw)
    torch_loss, torch_grad = _loss_and_grad(F.cross_entropy, logits, targets, reduction, up, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == logits.shape
    # fp32 math over <= 160 classes of logits up to |20|: errors of a few ulps of the loss (~10 at
    # most), so rtol 1e-5 / atol 1e-5; grads are probabilities (<= 1) times <= 3: atol 2e-6.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(loss, torch_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-5, atol=2e-6)


@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16),
       N=st.integers(1, 8), V=st.integers(2, 150), reduction=st.sampled_from(["mean", "sum", "none"]),
       eps=st.sampled_from([0.0, 0.2]))
def test_half_precision_storage(dtype, seed, N, V, reduction, eps):
    """fp16/bf16 logits are read as stored and computed in fp32: the loss is as exact as fp32 math on
    those values; the gradient is rounded once to the storage dtype."""
    logits, targets = _case(seed, N, V, 3.0, 0.2, -100, dtype)
    if reduction == "mean":
        targets[0] = 0
    up = UPSTREAMS["random"]
    with _block(64):
        loss, grad = _loss_and_grad(cross_entropy, logits, targets, reduction, up, label_smoothing=eps)
    ref_loss, ref_grad = _reference(logits, targets, reduction, up, label_smoothing=eps)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)  # fp32 math, as above
    # one rounding to the storage dtype: half an ulp for fp16 (2^-11 relative); the interpreter's
    # bf16 conversion truncates, so up to one ulp (2^-7) for bf16; relative to the largest entry.
    ulp = 2.0**-11 if dtype == torch.float16 else 2.0**-7
    err = (grad.double() - ref_grad).abs().max().item()
    assert err <= ulp * ref_grad.abs().max().item() + 1e-7, err


def test_all_ignored_matches_torch():
    """All targets ignored: mean is NaN (0/0) with zero gradient, exactly like F.cross_entropy; sum
    and none give 0; with num_tokens the mean is 0."""
    logits = torch.randn(5, 37)
    targets = torch.full((5,), -100)
    for reduction, num_tokens in (("mean", None), ("sum", None), ("none", None), ("mean", 8)):
        up = UPSTREAMS["scalar"]
        loss, grad = _loss_and_grad(cross_entropy, logits, targets, reduction, up, num_tokens=num_tokens)
        assert torch.count_nonzero(grad) == 0
        if reduction == "mean" and num_tokens is None:
            t_loss, t_grad = _loss_and_grad(F.cross_entropy, logits, targets, reduction, up)
            assert torch.isnan(loss) and torch.isnan(t_loss) and torch.count_nonzero(t_grad) == 0
        else:
            assert torch.count_nonzero(loss) == 0


def test_num_tokens_makes_gradient_accumulation_exact():
    """Three micro-batches with different numbers of real tokens, each divided by the global count,
    sum to the big-batch mean loss and gradient (dividing each by its own count would not)."""
    logits, targets = _case(3, 30, 91, 2.0, 0.0, -100)
    targets[:7] = -100  # micro-batch 1 has 3 real tokens, the others 10
    total = int((targets != -100).sum())
    x = logits.clone().requires_grad_(True)
    acc_loss = sum(cross_entropy(x[s], targets[s], num_tokens=total, label_smoothing=0.1)
                   for s in (slice(0, 10), slice(10, 20), slice(20, 30)))
    acc_loss.backward()
    big = logits.clone().requires_grad_(True)
    big_loss = F.cross_entropy(big, targets, label_smoothing=0.1)
    big_loss.backward()
    torch.testing.assert_close(acc_loss, big_loss, rtol=1e-5, atol=1e-6)  # fp32 sums in another order
    torch.testing.assert_close(x.grad, big.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_confident_token_keeps_relative_precision(path):
    """p_target = 1 - 9.3e-12: fp32 exp(x_t - lse) - 1 rounds to 0, and even float64 lse - x_t keeps only
    ~3 digits (30 + 9e-12 in float64). With logit a at the target and 0 elsewhere, exactly
    1 - p_t = (V-1) / (e^a + V-1) and loss = log1p((V-1) e^-a); the kernel's 1 - p_t from the other
    columns' sum must match these to 1e-6 relative."""
    V = 100
    a = torch.tensor([30.0, 12.0, 5.0])  # 1 - p_t = 9e-12, 6e-4 (series branch), 0.4 (log branch)
    targets = torch.tensor([3, 50, 99])
    logits = torch.zeros(3, V)
    logits[torch.arange(3), targets] = a
    with _block(32), _path(path):  # the target sits in various blocks of the online pass
        loss, grad = _loss_and_grad(cross_entropy, logits, targets, "none", UPSTREAMS["sum"])
    a64 = a.double()
    exact_loss = torch.log1p((V - 1) * torch.exp(-a64))
    exact_grad_target = -(V - 1) / (torch.exp(a64) + (V - 1))
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-6, atol=0.0)  # relative, even at 9e-12
    rows = torch.arange(3)
    torch.testing.assert_close(grad[rows, targets].double(), exact_grad_target, rtol=1e-6, atol=0.0)


def test_minus_inf_logits_like_a_masked_vocabulary():
    """Whole blocks of -inf (a masked vocabulary) must not turn the running max into NaN."""
    logits = torch.randn(4, 100)
    logits[:, :70] = float("-inf")
    logits[1, 3] = 2.0  # one allowed entry far from the rest
    targets = torch.tensor([80, 3, 99, -100])
    with _block(32):
        loss, grad = _loss_and_grad(cross_entropy, logits, targets, "sum", UPSTREAMS["scalar"])
    t_loss, t_grad = _loss_and_grad(F.cross_entropy, logits, targets, "sum", UPSTREAMS["scalar"])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, t_loss, rtol=1e-6, atol=1e-6)  # fp32 vs fp32
    torch.testing.assert_close(grad, t_grad, rtol=1e-6, atol=1e-7)


def test_row_offsets_are_64_bit():
    """Row 20,000 of a V = 131,072 vocabulary starts at element 2.6e9 > 2^31. A real tensor that size
    (5 GB) is too big for a CPU test, so the kernels' row-offset helper is run on exactly those
    numbers inside a small kernel; the same product in int32 wraps (checked, so the test can fail)."""
    triton, tl = kernels_pkg.import_triton()
    globals()["_ce_row_offset"] = ce._kernels()["row_offset"]  # jit kernels resolve helpers as globals
    globals()["tl"] = tl

    @triton.jit
    def offset_kernel(rows_ptr, out_ptr, stride_row):
        row = tl.load(rows_ptr)  # int32, like tl.program_id
        tl.store(out_ptr, _ce_row_offset(row, stride_row))
        tl.store(out_ptr + 1, (row * stride_row).to(tl.int64))  # the int32 product, for contrast

    out = torch.zeros(2, dtype=torch.int64)
    offset_kernel[(1,)](torch.tensor([20_000], dtype=torch.int32), out, 131_072)
    assert 20_000 * 131_072 > 2**31
    assert int(out[0]) == 20_000 * 131_072
    assert int(out[1]) != 20_000 * 131_072  # the int32 version wraps: this is what the helper avoids


_SM90_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from minilife.kernels import cross_entropy as ce

    ks = ce._kernels()
    for dtype in ("bf16", "fp16", "fp32"):
        for rows, block, smooth in ((1, 4096, True), (4, 1024, False)):  # large-V and small-V tiles
            P = "*" + dtype
            fwd = dict(logits_ptr=P, stride_row="i32", targets_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32",
                       rest_ptr="*fp32", N="i32", V="i32", ignore_index="i32", eps="fp32",
                       ROWS="constexpr", BLOCK_V="constexpr", SMOOTHING="constexpr")
            bwd = dict(logits_ptr=P, stride_row="i32", grad_ptr=P, stride_grad_row="i32", targets_ptr="*i64",
                       lse_ptr="*fp32", rest_ptr="*fp32", scale_ptr="*fp32", stride_scale="i32", N="i32",
                       V="i32", ignore_index="i32", eps="fp32", ROWS="constexpr", BLOCK_V="constexpr")
            for name, sig, consts in (("forward", fwd, dict(ROWS=rows, BLOCK_V=block, SMOOTHING=smooth)),
                                      ("backward", bwd, dict(ROWS=rows, BLOCK_V=block))):
                k = triton.compile(ASTSource(ks[name], sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=16 if block >= 4096 else 4))
                print(name, dtype, rows, len(k.asm["cubin"]))
""")


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The compiled path (what a GPU runs) through Triton's whole compiler for an H100 (TTIR -> PTX ->
    cubin with the wheel's ptxas): the interpreter alone would not catch a construct only the compiler
    rejects. A fresh process, because whether Triton interprets is fixed when it is imported."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not os.path.exists(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia",
                                                       "bin", "ptxas")):
        pytest.skip("triton's NVIDIA backend (bundled ptxas) is not installed")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = [line.split() for line in proc.stdout.splitlines()]
    assert len(built) == 12 and all(int(size) > 0 for *_, size in built), proc.stdout


def test_strided_rows_and_transposed_logits():
    """A row stride wider than V is read in place; a column stride != 1 is copied (.contiguous())."""
    wide, targets = _case(5, 6, 60, 3.0, 0.0, -100)
    sliced = wide[:, 10:50]  # (6, 40) with row stride 60
    targets = targets % 40
    for x in (sliced, sliced.t().contiguous().t()):
        loss, grad = _loss_and_grad(cross_entropy, x, targets, "none", UPSTREAMS["random"])
        ref_loss, ref_grad = _reference(x, targets, "none", UPSTREAMS["random"])
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)  # fp32 math
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=2e-6)


def test_fallback_warns_once_and_matches(monkeypatch):
    """Where Triton cannot run (simulated), the torch version runs after one warning."""
    monkeypatch.setattr(kernels_pkg, "_WARNED", set())
    monkeypatch.setattr(ce, "triton_runnable", lambda device: False)
    logits, targets = _case(1, 7, 33, 2.0, 0.2, -100)
    targets[0] = 0
    with pytest.warns(RuntimeWarning, match="pure-torch"):
        cross_entropy(logits, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        loss = cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets), rtol=1e-6, atol=1e-6)  # fp32 vs fp32


@pytest.mark.parametrize("call, error, match", [
    (lambda: cross_entropy(torch.randn(4), torch.zeros(4, dtype=torch.long)), ValueError, "2-D"),
    (lambda: cross_entropy(torch.randn(4, 5).double(), torch.zeros(4, dtype=torch.long)), TypeError, "float64"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long)), ValueError, r"shape \(4,\)"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4)), TypeError, "integer"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 5, 2])), ValueError, r"targets\[2\] = 5"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.tensor([0, -1, 1, 2])), ValueError, r"targets\[1\] = -1"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="avg"), ValueError,
     "reduction"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing=1.5), ValueError,
     "label_smoothing"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="sum",
                           num_tokens=3), ValueError, "num_tokens"),
    (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), num_tokens=0), ValueError, "> 0"),
])
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()

"""minilife.kernels.fused_linear_ce against the materialised head + loss (float64 math and torch).

The per-chunk cross-entropy runs as Triton kernels under TRITON_INTERPRET=1 (set below, before
anything imports triton) and as the pure-torch twin; chunk sizes need not divide N.
"""
import os

import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():  # a GPU machine tests the compiled kernels instead
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import minilife.kernels.cross_entropy as ce  # noqa: E402
from minilife.kernels.fused_linear_ce import default_chunk_size, fused_linear_cross_entropy  # noqa: E402
from minilife.kernels.reference import cross_entropy_naive  # noqa: E402


def _path(name: str):
    """'triton' = the kernels (under the interpreter); 'torch' = the pure-torch twin of the same math."""
    return ce.pure_torch() if name == "torch" else contextlib.nullcontext()


def _case(seed, N, C, V, ignore_frac, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) / C**0.5 * 3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


def _upstream(loss):
    return torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.3)


def _run(fn, hidden, weight, targets, **kw):
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss = fn(h, w, targets, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w), _upstream(loss).to(loss.dtype))
    return loss.detach(), gh, gw


def _materialised(h, w, targets, num_tokens=None, reduction="mean", **kw):
    """Reference: logits = h @ w.T in full, then float64 cross_entropy_naive (sum / num_tokens if given)."""
    if num_tokens is not None:
        return cross_entropy_naive(h @ w.t(), targets, reduction="sum", **kw) / num_tokens
    return cross_entropy_naive(h @ w.t(), targets, reduction=reduction, **kw)


@pytest.mark.parametrize("path", ["triton", "torch"])
@given(seed=st.integers(0, 2**16), N=st.integers(1, 8), C=st.integers(1, 12), V=st.integers(2, 90),
       chunk=st.integers(1, 10), ignore_frac=st.sampled_from([0.0, 0.3]),
       reduction=st.sampled_from(["mean", "sum", "none"]), eps=st.sampled_from([0.0, 0.15]),
       use_num_tokens=st.booleans())
def test_matches_materialised_reference(path, seed, N, C, V, chunk, ignore_frac, reduction, eps, use_num_tokens):
    hidden, weight, targets = _case(seed, N, C, V, ignore_frac)
    num_tokens = N + 3 if (use_num_tokens and reduction == "mean") else None
    if reduction == "mean" and num_tokens is None:
        targets[-1] = V - 1  # all-ignored mean is NaN: covered by its own test
    kw = dict(reduction=reduction, label_smoothing=eps)
    with _path(path):
        loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=chunk,
                            num_tokens=num_tokens, **kw)
    ref_loss, ref_gh, ref_gw = _run(_materialised, hidden.double(), weight.double(), targets,
                                    num_tokens=num_tokens, **kw)
    t_loss, t_gh, t_gw = _run(lambda h, w, t, **k: F.cross_entropy(h @ w.t(), t, **k),
                              hidden, weight, targets, **kw) if num_tokens is None else (None,) * 3
    assert loss.dtype == torch.float32 and gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    # fp32 logits from C <= 12 products of O(1) values, then fp32 log-sum-exp: loss to 1e-5; the
    # gradients are sums over <= 8 rows of (p - q) * hidden (|.| <~ 10): atol 1e-5.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    if t_loss is not None:  # and against torch's own fp32 ops, same tolerances
        torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gh, t_gh, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, t_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch has no F.linear_cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch_linear_cross_entropy(reduction):
    """torch's own op: its chunked path (LinearCrossEntropyOptions; no label smoothing there) and its
    reference path (with label smoothing). The fused algorithm is what is compared, so the per-chunk
    loss runs on the fast pure-torch path here."""
    hidden, weight, targets = _case(11, 40, 24, 300, 0.2)
    cases = [(0.1, None)]
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        cases.append((0.0, torch.nn.LinearCrossEntropyOptions(batch_chunk_size=16)))
    for eps, opt in cases:
        with _path("torch"):
            ours = _run(fused_linear_cross_entropy, hidden, weight, targets, reduction=reduction,
                        label_smoothing=eps, chunk_size=7)
        theirs = _run(lambda h, w, t, **k: F.linear_cross_entropy(h, w, t, options=opt, **k),
                      hidden, weight, targets, reduction=reduction, label_smoothing=eps, ignore_index=-100)
        for a, b in zip(ours, theirs):  # both fp32 over C = 24, V = 300
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16/bf16 hidden and weight: chunk logits and gradient products are in the input dtype, as in
    the materialised version; compared with float64 math on the same stored values."""
    hidden, weight, targets = _case(5, 21, 16, 77, 0.2, dtype)
    loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=8)
    ref_loss, ref_gh, ref_gw = _run(_materialised, hidden.double(), weight.double(), targets)
    # logits rounded to the storage dtype (|logit| <~ 10: up to 2^-8 * 10 = 0.04 absolute in bf16,
    # 2^-11 * 10 in fp16) shift the loss by about that much; gradients by a few storage ulps.
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert abs(loss.double() - ref_loss).item() < 10 * unit
    for got, ref in ((gh, ref_gh), (gw, ref_gw)):
        assert got.dtype == dtype
        assert (got.double() - ref).abs().max().item() < 8 * unit * ref.abs().max().item()


def test_under_autocast_matches_linear_then_cross_entropy():
    """Under torch.autocast the head runs in the autocast dtype, exactly as F.linear would."""
    hidden, weight, targets = _case(6, 30, 16, 50, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _run(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=8)
        ref = _run(lambda h, w, t: F.cross_entropy(F.linear(h, w), t), hidden, weight, targets)
    assert ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32  # grads reach the fp32 leaves
    # same bf16 logits on both sides, fp32 loss math: loss to fp32 rounding; the gradients go through
    # bf16 matmuls summed in a different order (chunks): a few bf16 ulps (2^-8) of the largest entry
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(ours[1:], ref[1:]):
        assert (got - want).abs().max() <= 4 * 2.0**-8 * want.abs().max()


def test_all_ignored_and_only_weight_or_hidden_grads():
    hidden, weight, targets = _case(2, 9, 8, 30, 0.0)
    targets[:] = -100
    loss, gh, gw = _run(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    assert torch.isnan(loss)  # like F.cross_entropy: 0 / 0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # frozen hidden (e.g. a frozen trunk) or frozen head: only the requested gradient is returned
    hidden, weight, targets = _case(3, 9, 8, 30, 0.0)
    ref = _run(lambda h, w, t: F.cross_entropy(h @ w.t(), t), hidden, weight, targets)  # upstream 1.3
    ref = [r / 1.3 for r in ref]  # the calls below backpropagate 1.0
    w = weight.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, w, targets, chunk_size=4), (w,))
    torch.testing.assert_close(gw, ref[2], rtol=1e-5, atol=1e-6)  # fp32 vs fp32
    h = hidden.clone().requires_grad_(True)
    (gh,) = torch.autograd.grad(fused_linear_cross_entropy(h, weight, targets, chunk_size=4), (h,))
    torch.testing.assert_close(gh, ref[1], rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_loss_and_double_backward_is_refused():
    hidden, weight, targets = _case(4, 13, 8, 40, 0.1)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_size=5)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets), rtol=1e-5, atol=1e-6)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


def test_default_chunk_size():
    assert default_chunk_size(4096, 768, 50257) == 256  # 256 * 50257 <= 2**24 < 512 * 50257
    assert default_chunk_size(10, 8, 30) == 10  # never more rows than N
    assert default_chunk_size(8, 4, 2**30) == 1  # at least one row


@pytest.mark.parametrize("call, error, match", [
    (lambda h, w, t: fused_linear_cross_entropy(h[0], w, t), ValueError, "hidden must be a 2-D"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w[:, :3], t), ValueError, r"expected \(V, 4\)"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w.half(), t), ValueError, "share dtype"),
    (lambda h, w, t: fused_linear_cross_entropy(h.double(), w.double(), t), TypeError, "float64"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t + 10), ValueError, r"outside \[0, 6\)"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, t: fused_linear_cross_entropy(h, w, t, reduction="none", num_tokens=4), ValueError, "num_tokens"),
])
def test_bad_input_gets_a_clear_error(call, error, match):
    hidden, weight, targets = _case(0, 5, 4, 6, 0.0)
    with pytest.raises(error, match=match):
        call(hidden, weight, targets)

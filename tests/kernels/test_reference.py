"""Reference math (minilife/kernels/reference.py) against torch's own ops and hand-derived values.

The references are what every kernel is tested against, so they are checked against code written
independently of them: ``F.scaled_dot_product_attention`` and ``F.cross_entropy`` in float64, plus
facts that follow from the formulas by hand (uniform logits give log V; the first causal row copies v_0).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minilife.kernels.reference import attention_naive, cross_entropy_naive

# float64 vs float64 with a different summation order: a few ulps of the largest magnitude
F64_TOL = 1e-12


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 12), S=st.integers(1, 12),
       D=st.integers(1, 9), causal=st.booleans(), use_mask=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.1, 2.0)), seed=st.integers(0, 2**16))
def test_attention_naive_matches_sdpa(B, H, T, S, D, causal, use_mask, scale, seed):
    q, k, v = _randn(B, H, T, D, seed=seed), _randn(B, H, S, D, seed=seed + 1), _randn(B, H, S, D, seed=seed + 2)
    mask = None
    if use_mask:
        mask = torch.rand(B, 1, T, S, generator=torch.Generator().manual_seed(seed)) < 0.7
        mask[..., 0] = True  # every row keeps key 0, so SDPA (NaN on empty rows) is defined
    ours = attention_naive(q, k, v, causal=causal, sm_scale=scale, mask=mask)
    allowed = torch.ones(T, S, dtype=torch.bool).tril() if causal else torch.ones(T, S, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    assert ours.shape == (B, H, T, D)
    assert (ours - ref).abs().max() <= F64_TOL  # float64 both sides, only summation order differs


def test_attention_naive_first_causal_row_is_v0_and_dtype_kept():
    q, k, v = _randn(1, 2, 5, 4, seed=0), _randn(1, 2, 5, 4, seed=1), _randn(1, 2, 5, 4, seed=2)
    out = attention_naive(q, k, v, causal=True)
    # query 0 may only attend key 0: softmax over one element is 1, so the output is v_0 exactly
    assert torch.equal(out[:, :, 0], v[:, :, 0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert attention_naive(q.to(dtype), k.to(dtype), v.to(dtype)).dtype == dtype


def test_attention_naive_fully_masked_row_gives_zero_not_nan():
    q, k, v = (_randn(1, 1, 3, 4, seed=s).requires_grad_() for s in range(3))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = False  # query 1 may attend nothing
    out = attention_naive(q, k, v, causal=False, mask=mask)
    out.sum().backward()
    assert torch.equal(out[0, 0, 1], torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, 0, 1], torch.zeros(4, dtype=torch.float64))


def test_attention_naive_bad_inputs():
    q = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="4-D"):
        attention_naive(q[0], q, q)
    with pytest.raises(ValueError, match="do not match"):
        attention_naive(q, torch.zeros(1, 1, 3, 5), q)
    with pytest.raises(TypeError, match="mask must be a bool"):
        attention_naive(q, q, q, mask=torch.ones(3, 3))


@given(N=st.integers(1, 20), V=st.integers(2, 30), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.1, 1.0]),
       ignore_index=st.sampled_from([-100, 0]), seed=st.integers(0, 2**16))
def test_cross_entropy_naive_matches_torch(N, V, ignore_frac, reduction, smoothing, ignore_index, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, V, generator=gen, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < ignore_frac] = ignore_index
    ours = cross_entropy_naive(logits, targets, ignore_index, reduction, smoothing)
    ref = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=smoothing)
    assert ours.shape == ref.shape and ours.dtype == torch.float64
    if not bool((targets != ignore_index).any()) and reduction == "mean":
        assert torch.isnan(ours) and torch.isnan(ref)  # 0/0, as torch defines it
        return
    assert (ours - ref).abs().max() <= F64_TOL * max(1.0, ref.abs().max().item())  # float64, reordered sums
    g_ours, = torch.autograd.grad(ours.sum(), logits)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    assert (g_ours - g_ref).abs().max() <= F64_TOL  # gradients are softmax - onehot terms in [-1, 1]


def test_cross_entropy_naive_hand_values():
    # uniform logits: p = 1/V for every class, so the loss is log V with or without smoothing
    V = 7
    logits = torch.zeros(3, V, dtype=torch.float64)
    targets = torch.tensor([0, 3, 6])
    for smoothing in (0.0, 0.2):
        loss = cross_entropy_naive(logits, targets, label_smoothing=smoothing)
        assert abs(loss.item() - math.log(V)) <= 1e-15  # one log and a mean of equal terms
    # ignored rows are 0 in "none" and not counted by "mean"
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -5.0]], dtype=torch.float64)  # row 0: p = (1/4, 3/4)
    targets = torch.tensor([1, -100])
    assert torch.allclose(cross_entropy_naive(logits, targets, reduction="none"),
                          torch.tensor([-math.log(0.75), 0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert abs(cross_entropy_naive(logits, targets).item() + math.log(0.75)) <= 1e-15


def test_cross_entropy_naive_keeps_dtype():
    logits, targets = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert cross_entropy_naive(logits.to(dtype), targets).dtype == dtype


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(logits=torch.zeros(2, 3, 4)), ValueError, r"logits must be \(N, V\)"),
    (dict(targets=torch.zeros(3, dtype=torch.long)), ValueError, r"targets must be \(N,\) with N=2"),
    (dict(targets=torch.zeros(2)), TypeError, "integer class ids"),
    (dict(targets=torch.tensor([0, 5])), ValueError, r"targets\[1\] = 5 is outside \[0, 3\)"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
])
def test_cross_entropy_naive_bad_inputs(kwargs, err, match):
    args = dict(logits=torch.zeros(2, 3), targets=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        cross_entropy_naive(**args)

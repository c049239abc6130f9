"""clip_grad_norm against torch.nn.utils.clip_grad_norm_."""
import math

import pytest
import torch

from minilife.optim import clip_grad_norm


def _params(seed, scale, with_missing=True):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in [(3, 4), (5,), (2, 2, 2), (6,)]]
    for i, p in enumerate(ps):
        if with_missing and i == 2:
            continue  # no gradient: must be skipped, not counted as zero-norm garbage or crash
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
    return ps


@pytest.mark.parametrize("scale, max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, 0.5), (3.0, 100.0)])
def test_matches_torch(scale, max_norm):
    ours, ref = _params(0, scale), _params(0, scale)
    norm = clip_grad_norm(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert isinstance(norm, float)
    assert norm == pytest.approx(float(ref_norm), rel=1e-12)  # float64 sum of squares, only order differs
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)  # same scale factor, float64


def test_clipped_norm_equals_max_norm_and_direction_kept():
    ps = _params(1, 50.0)
    before = torch.cat([p.grad.flatten() for p in ps if p.grad is not None]).clone()
    clip_grad_norm(ps, 2.0)
    after = torch.cat([p.grad.flatten() for p in ps if p.grad is not None])
    # new norm is max_norm * norm/(norm + 1e-6): within 1e-6 relative of max_norm
    assert after.norm().item() == pytest.approx(2.0, rel=1e-6)
    cos = torch.dot(before, after) / (before.norm() * after.norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-12)  # pure scaling keeps the direction


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_norm_returned_and_grads_untouched(bad):
    ps = _params(2, 1.0)
    ps[0].grad[0, 0] = bad
    before = [p.grad.clone() for p in ps if p.grad is not None]
    norm = clip_grad_norm(ps, 1.0)
    assert math.isinf(norm) if bad == float("inf") else math.isnan(norm)
    for b, p in zip(before, [p for p in ps if p.grad is not None]):
        torch.testing.assert_close(p.grad, b, equal_nan=True, rtol=0, atol=0)


def test_no_grads_and_bad_max_norm():
    assert clip_grad_norm([torch.zeros(3, requires_grad=True)], 1.0) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(_params(0, 1.0), 0.0)
    with pytest.raises(TypeError, match=r"parameters\[1\] is float"):  # not an AttributeError on .grad
        clip_grad_norm([torch.zeros(2, requires_grad=True), 1.0], 1.0)


def test_single_tensor_and_float32():
    p = torch.zeros(100, requires_grad=True)
    p.grad = torch.full((100,), 3.0)
    assert clip_grad_norm(p, 1.0) == pytest.approx(30.0, rel=1e-6)  # sqrt(100 * 9), float32
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)

"""The KL estimators against float64 numpy formulas written here, and the KL lab by exact enumeration:
k1 and k3 unbiased, k2 biased (to third order near ref), k3 >= 0, and the expected gradient of each
estimator used as a loss (k1: zero; k2: grad KL(pi || ref); k3: grad KL(ref || pi))."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align.kl import KL_KINDS, estimator_stats, exact_kl, expected_loss_gradients, kl_estimate


def _dist(seed, K, concentration=1.0):
    """A random categorical (K,) float64 numpy vector with all entries > 0."""
    x = np.random.default_rng(seed).gamma(concentration, size=K) + 1e-3
    return x / x.sum()


def _np_kl(p, q):
    return float(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def _np_estimators(lp, lq):
    """k1, k2, k3 at log p(x) = lp, log q(x) = lq (numpy float64), written from r = q / p."""
    r = np.exp(lq - lp)
    return {"k1": -np.log(r), "k2": np.log(r) ** 2 / 2, "k3": r - 1 - np.log(r)}


@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 5))
def test_estimators_match_float64_formulas(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    lp, lq = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 6 for _ in range(2))
    want = _np_estimators(lp.numpy(), lq.numpy())
    for kind in KL_KINDS:
        got = kl_estimate(lp, lq, kind)
        assert got.shape == (B, T) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want[kind], rtol=1e-12, atol=1e-14)
    got32 = kl_estimate(lp.float(), lq.float(), "k3")
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want["k3"], rtol=1e-4, atol=1e-6)


@given(lp=st.floats(-50.0, 0.0), lq=st.floats(-50.0, 0.0))
def test_k3_and_k2_are_never_negative(lp, lq):
    for dtype in (torch.float32, torch.float64):
        a, b = torch.tensor(lp, dtype=dtype), torch.tensor(lq, dtype=dtype)
        assert kl_estimate(a, b, "k3").item() >= 0 and kl_estimate(a, b, "k2").item() >= 0
    assert kl_estimate(torch.tensor(lp), torch.tensor(lp), "k3").item() == 0.0  # r = 1 exactly


def test_k1_can_be_negative_a_single_sample_is_not_a_divergence():
    assert kl_estimate(torch.tensor([-2.0]), torch.tensor([-1.0]), "k1").item() == -1.0


@given(seed=st.integers(0, 10_000), K=st.integers(2, 8), conc=st.sampled_from([0.3, 1.0, 5.0]))
def test_k1_and_k3_are_unbiased_by_exact_enumeration(seed, K, conc):
    p, q = _dist(seed, K, conc), _dist(seed + 1, K, conc)
    true = _np_kl(p, q)
    assert exact_kl(torch.tensor(p), torch.tensor(q)).item() == pytest.approx(true, rel=1e-12, abs=1e-15)
    stats = estimator_stats(torch.tensor(p), torch.tensor(q))
    k = _np_estimators(np.log(p), np.log(q))
    for kind in KL_KINDS:  # mean and variance, each computed here by enumeration
        mean = float(np.sum(p * k[kind]))
        var = float(np.sum(p * k[kind] ** 2) - mean ** 2)
        assert stats[kind].mean == pytest.approx(mean, rel=1e-10, abs=1e-12)
        assert stats[kind].variance == pytest.approx(var, rel=1e-8, abs=1e-10)
        assert stats[kind].bias == pytest.approx(mean - true, abs=1e-12)
    assert stats["k1"].mean == pytest.approx(true, rel=1e-10, abs=1e-12)
    assert stats["k3"].mean == pytest.approx(true, rel=1e-10, abs=1e-12)


def test_k2_is_biased_but_right_to_second_order_near_ref():
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.3, 0.5])
    stats = estimator_stats(torch.tensor(p), torch.tensor(q))
    assert abs(stats["k2"].bias) > 0.05 * _np_kl(p, q)  # far apart: clearly off
    v = np.array([1.0, -2.0, 0.5])

    def bias_and_kl(eps):  # ref = pi tilted by eps * v: KL = O(eps^2), k2's bias = O(eps^3)
        qe = p * np.exp(eps * v)
        qe /= qe.sum()
        s = estimator_stats(torch.tensor(p), torch.tensor(qe))
        return s["k2"].bias, _np_kl(p, qe)

    (b1, kl1), (b2, kl2) = bias_and_kl(1e-2), bias_and_kl(5e-3)
    assert kl2 / kl1 == pytest.approx(1 / 4, rel=0.02)
    assert b2 / b1 == pytest.approx(1 / 8, rel=0.05)  # third order: halving eps divides the bias by 8
    assert abs(b1) < 0.02 * kl1


def test_k3_has_lower_variance_than_k1_when_close():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    q = np.array([0.38, 0.32, 0.19, 0.11])
    s = estimator_stats(torch.tensor(p), torch.tensor(q))
    assert s["k3"].variance < 0.1 * s["k1"].variance  # Schulman 2020: the control variate r - 1 helps
    assert estimator_stats(torch.tensor(p), torch.tensor(p))["k1"] == (0.0, 0.0, 0.0)


def test_exact_kl_edge_cases():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(exact_kl(p, q).numpy(), [np.log(2), np.log(2)])  # 0 log 0 = 0
    assert exact_kl(q[:1], p[:1]).item() == float("inf")  # q > 0 where p = 0
    assert exact_kl(p, p).eq(0).all()


@given(seed=st.integers(0, 10_000), K=st.integers(2, 8), scale=st.floats(0.1, 4.0))
def test_expected_loss_gradients_by_exact_enumeration(seed, K, scale):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=K) * scale  # policy logits
    p = np.exp(z - z.max())
    p /= p.sum()
    q = _dist(seed + 7, K)
    grads = expected_loss_gradients(torch.tensor(z), torch.tensor(q))
    # grad_z log p(x) = onehot(x) - p, so E_{x~p}[grad log p(x)] = sum_x p(x) (onehot(x) - p) = p - p = 0:
    # k1 = log p(x) - log q(x) as a loss differentiates log p(x) only, and that has zero expectation
    score = np.eye(K) - p  # (K, K): row x is grad_z log p(x)
    np.testing.assert_allclose(p @ score, 0.0, atol=1e-14)
    np.testing.assert_allclose(grads["k1"].numpy(), 0.0, atol=1e-12)
    # the true gradient of KL(p || q) wrt the logits: p_j (log(p_j / q_j) - KL), not zero in general
    true = p * (np.log(p / q) - _np_kl(p, q))
    np.testing.assert_allclose(grads["kl_pi_ref"].numpy(), true, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads["k2"].numpy(), true, rtol=1e-9, atol=1e-12)  # k2 as a loss: right
    np.testing.assert_allclose(grads["k3"].numpy(), p - q, rtol=1e-9, atol=1e-12)  # = grad KL(q || p)
    np.testing.assert_allclose(grads["kl_ref_pi"].numpy(), p - q, rtol=1e-9, atol=1e-12)


def test_k1_loss_gradient_is_zero_on_average_but_not_per_sample():
    """Sampling and backpropagating, as a training loop would: single samples give nonzero gradients,
    their average tends to 0, while the KL's real gradient is far from 0."""
    z = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    logp = torch.log_softmax(z, -1)
    x = torch.multinomial(logp.exp().detach(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    kl_estimate(logp[x], q.log()[x], "k1").mean().backward()
    assert z.grad.abs().max() < 5e-3  # Monte Carlo noise only (~ 1 / sqrt(200k))
    assert expected_loss_gradients(z.detach(), q)["kl_pi_ref"].abs().max() > 0.2


def test_bad_inputs():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(a, a, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(a, a[:, :2])
    with pytest.raises(ValueError, match="p must"):
        exact_kl(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="q must"):
        exact_kl(torch.tensor([0.5, 0.5]), torch.tensor([-0.5, 1.5]))
    with pytest.raises(ValueError, match="ref_probs is 0"):
        estimator_stats(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="same"):
        estimator_stats(torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="ref_probs must be > 0"):
        expected_loss_gradients(torch.zeros(2), torch.tensor([1.0, 0.0]))

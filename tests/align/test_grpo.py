"""GRPO math against hand computations and numpy: group-normalised advantages (with and without the std),
the clipped objective with sequence advantages, the three loss aggregations, the KL term's value, sign
and analytic gradient, and clear errors for bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align.grpo import group_advantages, grpo_loss, reinforce_baseline_advantages


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
    # group 1: mean 1/2, population std 1/2; group 2: all equal -> 0; group 3: mean 1, std sqrt(6/4)
    s3 = math.sqrt(1.5)
    expected = [1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0, -1 / s3, 2 / s3, -1 / s3, 0.0]
    adv = group_advantages(r, 4)
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-5)  # eps=1e-6 in the denominators
    assert adv.shape == (12,)
    two_d = group_advantages(r.view(3, 4), 4)  # (N, G) in, (N, G) out
    assert two_d.shape == (3, 4) and torch.equal(two_d.flatten(), adv)
    centred = group_advantages(r, 4, normalise_std=False)  # Dr. GRPO: mean only
    torch.testing.assert_close(centred, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0, -1, 2, -1, 0]))


@given(seed=st.integers(0, 10_000), N=st.integers(1, 4), G=st.integers(2, 6), std=st.booleans())
def test_group_advantages_match_numpy(seed, N, G, std):
    r = np.random.default_rng(seed).normal(size=(N, G))
    ref = r - r.mean(1, keepdims=True)
    if std:
        ref = ref / (r.std(1, keepdims=True) + 1e-6)
    out = group_advantages(torch.from_numpy(r).flatten(), G, normalise_std=std)
    np.testing.assert_allclose(out.numpy(), ref.flatten(), rtol=0, atol=1e-12)


def test_reinforce_baseline():
    r = torch.tensor([1.0, 2.0, 6.0])
    assert reinforce_baseline_advantages(r).tolist() == [-2.0, -1.0, 3.0]
    assert reinforce_baseline_advantages(r, "none").tolist() == [1.0, 2.0, 6.0]
    with pytest.raises(ValueError, match="baseline"):
        reinforce_baseline_advantages(r, "median")


def _case(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = torch.arange(T) < lengths[:, None]  # (B, T) right-padded
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    new = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return new, old, ref, adv, m


def _np_loss_tokens(new, old, ref, adv, m, clip, beta):
    """numpy per-token GRPO loss (B, T): clipped surrogate with A broadcast + beta * k3."""
    A = np.broadcast_to(adv[:, None], new.shape)
    ratio = np.exp(new - old)
    surr = np.maximum(-A * ratio, -A * np.clip(ratio, 1 - clip, 1 + clip))
    lr = ref - new
    return surr + beta * (np.exp(lr) - 1 - lr), (-A * np.clip(ratio, 1 - clip, 1 + clip)) > (-A * ratio)


@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), T=st.integers(1, 6), clip=st.floats(0.05, 0.4),
       beta=st.sampled_from([0.0, 0.04, 0.5]))
def test_grpo_loss_and_aggregations_match_numpy(seed, B, T, clip, beta):
    new, old, ref, adv, m = _case(seed, B, T)
    per, clipped = _np_loss_tokens(new.numpy(), old.numpy(), ref.numpy(), adv.numpy(), m.numpy(), clip, beta)
    mn = m.numpy()
    per_masked = np.where(mn, per, 0.0)
    hand = {"token-mean": per_masked.sum() / mn.sum(),
            "seq-mean": np.mean([per_masked[b].sum() / mn[b].sum() for b in range(B)]),
            "seq-mean-token-sum-norm": per_masked.sum() / (B * T)}
    garbage = [x.clone() for x in (new, old, ref)]
    for x in garbage:
        x[~m] = float("nan")  # masked positions contribute nothing
    for agg, expected in hand.items():
        loss, diag = grpo_loss(*garbage, adv, m, clip=clip, kl_coef=beta, agg=agg)
        assert abs(loss.item() - expected) < 1e-12, agg
    assert abs(diag["clip_fraction"].item() - clipped[mn].mean()) < 1e-12
    lr = (ref - new).numpy()[mn]
    assert abs(diag["kl"].item() - np.mean(np.exp(lr) - 1 - lr)) < 1e-12
    fixed = grpo_loss(new, old, ref, adv, m, clip=clip, kl_coef=beta, agg="seq-mean-token-sum-norm", norm_length=10)
    assert abs(fixed[0].item() - per_masked.sum() / (B * 10)) < 1e-12


def test_ratio_one_no_kl_is_minus_mean_advantage():
    m = torch.tensor([[True, True, True], [True, False, False]])
    lp = torch.randn(2, 3)
    loss, diag = grpo_loss(lp, lp, None, torch.tensor([1.0, -3.0]), m)
    assert loss.item() == pytest.approx(-(1 + 1 + 1 - 3) / 4)  # token-mean: the long answer weighs 3x
    seq, _ = grpo_loss(lp, lp, None, torch.tensor([1.0, -3.0]), m, agg="seq-mean")
    assert seq.item() == pytest.approx(-(1 - 3) / 2)
    assert diag["clip_fraction"] == 0 and diag["kl"] == 0


def test_kl_term_sign_and_gradient():
    m = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]], dtype=torch.float64)
    ref = old + torch.tensor([[0.3, -0.2, 0.0], [0.0, 0.5, -0.4]], dtype=torch.float64)
    new = old.clone().requires_grad_()
    beta = 0.2
    loss, diag = grpo_loss(new, old, ref, torch.zeros(2, dtype=torch.float64), m, kl_coef=beta)  # A = 0: KL only
    assert loss.item() > 0 and diag["kl"].item() > 0  # the KL term is added to the loss
    loss.backward()
    # d/dlogp [exp(ref - logp) - 1 - (ref - logp)] = 1 - exp(ref - logp), times beta / n_valid
    expected = torch.where(m, beta * (1 - torch.exp(ref - old)) / 5, 0.0)
    torch.testing.assert_close(new.grad, expected, rtol=0, atol=1e-12)
    # descending the gradient moves logp toward logp_ref: the gradient's sign is that of logp - logp_ref
    assert (torch.sign(new.grad[m]) == torch.sign(old - ref)[m]).all()


def test_surrogate_gradient_zero_where_clipped():
    m = torch.ones(1, 3, dtype=torch.bool)
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.tensor([[0.5, -0.05, -0.5]], dtype=torch.float64, requires_grad=True)  # rho e^.5, e^-.05, e^-.5
    loss, _ = grpo_loss(new, old, None, torch.tensor([1.0], dtype=torch.float64), m, clip=0.2)
    loss.backward()  # A > 0: rho > 1.2 clipped (no gradient), otherwise d(-A rho)/dlogp = -A rho / 3
    expected = torch.tensor([[0.0, -math.exp(-0.05) / 3, -math.exp(-0.5) / 3]], dtype=torch.float64)
    torch.testing.assert_close(new.grad, expected, rtol=0, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(4), 1)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(7), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(2, 3), 4)
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="logp_old"):
        grpo_loss(x, torch.zeros(2, 4), x, torch.zeros(2), m)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, x, torch.zeros(2, 3), m)
    with pytest.raises(ValueError, match=r"mask rows \[0\]"):
        grpo_loss(x, x, x, torch.zeros(2), torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(x, x, None, torch.zeros(2), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(x, x, x, torch.zeros(2), m, kl_coef=-1.0)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(x, x, x, torch.zeros(2), m, agg="mean")

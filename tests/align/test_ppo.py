"""PPO math against float64 formulas written here: GAE as the closed-form discounted sum of TD errors,
the clipped surrogate and value loss in numpy, whitening, the adaptive KL controller by hand, the
per-token KL reward, and last-real-token reads that ignore the padding side."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align.ppo import (AdaptiveKL, FixedKL, ValueHead, at_last_real, explained_variance, gae,
                                kl_penalised_rewards, last_token_index, ppo_policy_loss, ppo_value_loss, whiten)
from minilife.model import GPT, ModelConfig


def _mask(seed, B, T, layout):
    """bool (B, T), no empty row: right- or left-padded spans, or random holes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    if layout == "right":
        return pos < lengths[:, None]
    if layout == "left":
        return pos >= T - lengths[:, None]
    m = torch.rand(B, T, generator=g) < 0.6
    m[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
    return m


def _ref_gae(r, v, m, gamma, lam):
    """float64 closed form per row, over the valid tokens only (compacted):
    A_i = sum_{l >= 0} (gamma lam)^l delta_{i+l}, delta_i = r_i + gamma V_{i+1} - V_i, V past the end = 0."""
    A, R = np.zeros(r.shape), np.zeros(r.shape)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        rr, vv = r[b, idx].astype(np.float64), v[b, idx].astype(np.float64)
        vnext = np.append(vv[1:], 0.0)
        delta = rr + gamma * vnext - vv
        n = len(idx)
        adv = np.array([sum((gamma * lam) ** l * delta[i + l] for l in range(n - i)) for i in range(n)])
        A[b, idx], R[b, idx] = adv, adv + vv
    return A, R


@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 7),
       layout=st.sampled_from(["right", "left", "holes"]), gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_matches_closed_form_and_ignores_masked(seed, B, T, layout, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    m = _mask(seed, B, T, layout)
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    A, R = gae(r, v, m, gamma, lam)
    A_ref, R_ref = _ref_gae(r.numpy(), v.numpy(), m.numpy(), gamma, lam)
    np.testing.assert_allclose(A.numpy(), A_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(R.numpy(), R_ref, rtol=0, atol=1e-12)
    # random values (and NaN) at masked positions change nothing
    r2, v2 = r.clone(), v.clone()
    r2[~m], v2[~m] = torch.randn(int((~m).sum()), dtype=torch.float64) * 100, float("nan")
    A2, R2 = gae(r2, v2, m, gamma, lam)
    assert torch.equal(A2, A) and torch.equal(R2, R)


def test_gae_with_gamma_lam_one_gives_reward_to_go():
    m = torch.tensor([[True, True, True, False], [False, True, False, True]])
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0], [9.0, 5.0, 9.0, -1.0]], dtype=torch.float64)
    v = torch.randn(2, 4, dtype=torch.float64)
    A, R = gae(r, v, m, 1.0, 1.0)
    expected = torch.tensor([[6.0, 5.0, 3.0, 0.0], [0.0, 4.0, 0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(A, torch.where(m, expected - v, 0.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalised_rewards_formula_and_padding_side(kind):
    g = torch.Generator().manual_seed(0)
    lengths, T, beta = [3, 1, 4], 5, 0.3
    lp, lr = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    score = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    per_kind = {"k1": lambda d: -d, "k2": lambda d: d * d / 2, "k3": lambda d: math.exp(d) - 1 - d}[kind]
    for side in ("right", "left"):
        m = torch.zeros(3, T, dtype=torch.bool)
        logp = torch.full((3, T), float("nan"), dtype=torch.float64)  # garbage at padding
        logp_ref = torch.full((3, T), 7.0, dtype=torch.float64)
        for b, n in enumerate(lengths):
            cols = slice(0, n) if side == "right" else slice(T - n, T)
            m[b, cols], logp[b, cols], logp_ref[b, cols] = True, lp[b, :n], lr[b, :n]
        rewards = kl_penalised_rewards(score, logp, logp_ref, m, beta, kind)
        for b, n in enumerate(lengths):
            expected = [-beta * per_kind(float(lr[b, t] - lp[b, t])) for t in range(n)]
            expected[-1] += float(score[b])
            np.testing.assert_allclose(rewards[b][m[b]].numpy(), expected, rtol=0, atol=1e-12)
        assert (rewards[~m] == 0).all()
    same = kl_penalised_rewards(score, logp, logp_ref, m, beta, lambda a, b: -(b - a))  # a callable estimator
    assert torch.equal(same, kl_penalised_rewards(score, logp, logp_ref, m, beta, "k1"))


def _np_clipped(lp_new, lp_old, adv, m, clip):
    ratio = np.exp(lp_new - lp_old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    clipped = (-adv * np.clip(ratio, 1 - clip, 1 + clip)) > (-adv * ratio)
    return per, clipped


@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 6), clip=st.floats(0.05, 0.5),
       layout=st.sampled_from(["right", "left", "holes"]))
def test_policy_loss_matches_numpy(seed, B, T, clip, layout):
    g = torch.Generator().manual_seed(seed)
    m = _mask(seed, B, T, layout)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    new = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    per, clipped = _np_clipped(new.numpy(), old.numpy(), adv.numpy(), m.numpy(), clip)
    mn = m.numpy()
    for agg, ref in (("token-mean", per[mn].mean()),
                     ("seq-mean", np.mean([per[b][mn[b]].mean() for b in range(B)]))):
        loss, diag = ppo_policy_loss(new, old, adv, m, clip, agg)
        assert abs(loss.item() - ref) < 1e-12
    assert abs(diag["clip_fraction"].item() - clipped[mn].mean()) < 1e-12
    log_ratio = (new - old).numpy()[mn]
    assert abs(diag["approx_kl"].item() - np.mean(np.exp(log_ratio) - 1 - log_ratio)) < 1e-12


def test_ratio_one_loss_is_minus_mean_advantage_and_gradients_stay_clean():
    m = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([[1.0, 2.0, 100.0], [float("nan"), -3.0, 6.0]])
    lp = torch.tensor([[-1.0, -2.0, float("inf")], [float("nan"), -0.5, -0.1]], requires_grad=True)
    loss, diag = ppo_policy_loss(lp, lp.detach(), adv, m)
    assert loss.item() == pytest.approx(-(1 + 2 - 3 + 6) / 4)
    assert diag["clip_fraction"] == 0 and diag["approx_kl"] == 0
    loss.backward()  # d/dlogp of -A rho at rho = 1 is -A / n_valid
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.25, -0.5, 0.0], [0.0, 0.75, -1.5]]))


def test_clip_fraction_by_hand():
    # ratios e^0.5 (A > 0: clipped wins), e^-0.5 (A > 0: unclipped wins), e^-0.5 (A < 0: clipped wins), 1
    lp_old = torch.zeros(1, 4)
    lp_new = torch.tensor([[0.5, -0.5, -0.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    loss, diag = ppo_policy_loss(lp_new, lp_old, adv, torch.ones(1, 4, dtype=torch.bool), clip=0.2)
    assert diag["clip_fraction"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx((-1.2 - math.exp(-0.5) + 0.8 - 1.0) / 4)


def test_value_loss_clipping():
    m = torch.tensor([[True, True, True, False]])
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    new = torch.tensor([[0.5, 2.0, 0.1, float("nan")]], requires_grad=True)
    loss, diag = ppo_value_loss(new, old, ret, m, clip=0.2)
    # token 0: unclipped (0.5-1)^2=.25, clipped (0.2-1)^2=.64 -> .64; token 1: (2-1)^2=1, (0.2-1)^2=.64 -> 1;
    # token 2: (0.1+1)^2=1.21, clip(0.1)=0.1 same -> 1.21
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0 + 1.21) / 3)
    assert diag["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()  # only the unclipped winners carry gradient: (v - R) / 3
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 1.0 / 3, 1.1 / 3, 0.0]]))
    g = torch.Generator().manual_seed(3)
    v, o, r = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mk = _mask(3, 4, 6, "holes")
    vn, on, rn = v.numpy(), o.numpy(), r.numpy()
    vc = on + np.clip(vn - on, -0.3, 0.3)
    ref = 0.5 * np.maximum((vn - rn) ** 2, (vc - rn) ** 2)[mk.numpy()].mean()
    assert ppo_value_loss(v, o, r, mk, 0.3)[0].item() == pytest.approx(ref, abs=1e-12)


def test_whiten_over_valid_tokens_only():
    m = _mask(5, 4, 7, "holes")
    x = torch.randn(4, 7, dtype=torch.float64) * 3 + 2
    garbage = x.clone()
    garbage[~m] = float("nan")
    w = whiten(garbage, m, eps=0.0)
    vals = x[m].numpy()
    np.testing.assert_allclose(w[m].numpy(), (vals - vals.mean()) / vals.std(), rtol=0, atol=1e-12)
    assert (w[~m] == 0).all()
    kept = whiten(garbage, m, shift_mean=False, eps=0.0)
    np.testing.assert_allclose(kept[m].numpy(), (vals - vals.mean()) / vals.std() + vals.mean(), atol=1e-12)


def test_explained_variance():
    m = _mask(7, 3, 5, "holes")
    r, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    rv, vv = r[m].numpy(), v[m].numpy()
    if rv.size > 1:
        assert explained_variance(v, r, m).item() == pytest.approx(1 - np.var(rv - vv) / np.var(rv), abs=1e-12)
    everything = torch.ones(3, 5, dtype=torch.bool)
    assert explained_variance(r, r, everything).item() == 1.0  # a perfect critic
    assert math.isnan(explained_variance(v, torch.ones(3, 5), everything).item())  # constant returns


def test_kl_controllers_by_hand():
    fixed = FixedKL(0.05)
    assert fixed.update(123.0, 64) == 0.05
    ctl = AdaptiveKL(init=0.1, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # error 1.0 clipped to 0.2
    assert ctl.update(5.4, 100) == pytest.approx(0.1 * 1.00512 * (1 - 0.1 * 100 / 10_000))  # error -0.1
    assert ctl.update(0.0, 1000) == pytest.approx(0.1 * 1.00512 * 0.999 * 0.98)  # error -1 clipped to -0.2
    with pytest.raises(ValueError, match="target"):
        AdaptiveKL(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(float("nan"), 1)


def test_last_real_token_reads_ignore_padding_side_and_batch():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=23, context_length=8, n_layer=1, n_head=2, n_embd=16)).eval()
    head = ValueHead(16)
    rows = [torch.tensor([3, 4, 5]), torch.tensor([7]), torch.tensor([1, 2, 3, 4, 5, 6])]
    T, scores = 6, {}
    for side in ("right", "left"):
        ids, mask = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.bool)
        for b, row in enumerate(rows):
            cols = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
            ids[b, cols], mask[b, cols] = row, True
        with torch.no_grad():
            h = model.hidden(ids, padding_mask=mask)  # (B, T, C)
            scores[side] = head.at_last(h, mask)
            torch.testing.assert_close(at_last_real(head(h), mask), scores[side], rtol=0, atol=1e-6)
        assert last_token_index(mask).tolist() == ([2, 0, 5] if side == "right" else [5, 5, 5])
    torch.testing.assert_close(scores["left"], scores["right"], rtol=0, atol=1e-5)
    with torch.no_grad():
        alone = head(model.hidden(rows[0][None]))[0, -1]  # batch of one, no padding
    torch.testing.assert_close(scores["right"][0], alone, rtol=0, atol=1e-5)


def test_bad_input():
    m, x = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask must be a bool"):
        gae(x, x, m.float())
    with pytest.raises(ValueError, match="values"):
        gae(x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"mask rows \[1\]"):
        ppo_policy_loss(x, x, x, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="kind"):
        kl_penalised_rewards(torch.zeros(2), x, x, m, 0.1, "k4")
    with pytest.raises(ValueError, match="score"):
        kl_penalised_rewards(torch.zeros(3), x, x, m, 0.1)
    with pytest.raises(ValueError, match="clip"):
        ppo_policy_loss(x, x, x, m, clip=0.0)
    with pytest.raises(ValueError, match="agg"):
        ppo_policy_loss(x, x, x, m, agg="sum")
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, m, lam=1.5)

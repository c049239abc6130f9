"""The DPO family against float64 numpy formulas written here, with their analytic gradients; log 2 at
policy == reference; IPO's minimum, hinge's flat zone, robust's unbiasedness, SimPO without a reference;
diagnostics; sequence log-probs from a model; the reference cache; bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align.dpo import (LOSS_TYPES, cached_reference_logprobs, dpo_loss, model_sequence_logprobs,
                                sequence_logprobs)
from minilife.align.logprobs import model_logprobs
from minilife.model import GPT, ModelConfig


def _pairs(seed, B=6, scale=5.0):
    """Four (B,) float64 tensors of sequence log-probs (negative, like real ones)."""
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * scale) for _ in range(4)]


def _nls(x):
    """-log sigmoid(x) = log(1 + e^-x), float64 numpy, stable for large |x|."""
    return np.logaddexp(0.0, -x)


def _ref_loss(loss_type, pc, pr, rc, rr, beta, eps, gamma):
    """The per-pair loss and d loss / d h (h = the log-ratio difference) in float64 numpy."""
    pc, pr, rc, rr = (np.asarray(t, dtype=np.float64) for t in (pc, pr, rc, rr))
    h = pc - pr if loss_type == "simpo" else (pc - rc) - (pr - rr)
    z = beta * h - gamma
    sig = 1 / (1 + np.exp(-z))
    if loss_type in ("sigmoid", "conservative", "simpo"):
        return (1 - eps) * _nls(z) + eps * _nls(-z), beta * (-(1 - eps) * (1 - sig) + eps * sig)
    if loss_type == "robust":
        return (((1 - eps) * _nls(z) - eps * _nls(-z)) / (1 - 2 * eps),
                beta * (-(1 - eps) * (1 - sig) - eps * sig) / (1 - 2 * eps))
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - z), np.where(z < 1, -beta, 0.0)
    assert loss_type == "ipo"
    return (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.01, 5.0), eps=st.floats(0.0, 0.45), gamma=st.floats(-1.0, 2.0))
def test_every_variant_and_its_gradient_match_float64(seed, loss_type, beta, eps, gamma):
    eps = eps if loss_type in ("sigmoid", "conservative", "robust") else 0.0
    gamma = 0.0 if loss_type == "ipo" else gamma
    pc, pr, rc, rr = _pairs(seed)
    pc.requires_grad_()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, margin=gamma)
    want, dwant = _ref_loss(loss_type, pc.detach(), pr, rc, rr, beta, eps, gamma)
    assert out.losses.dtype == torch.float64 and out.losses.shape == (6,)
    np.testing.assert_allclose(out.losses.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    assert out.loss.item() == pytest.approx(want.mean(), rel=1e-12, abs=1e-12)
    out.loss.backward()  # d h / d pc = 1, and the loss is a mean over B pairs
    np.testing.assert_allclose(pc.grad.numpy(), dwant / 6, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 10_000), beta=st.floats(1e-3, 100.0),
       loss_type=st.sampled_from(["sigmoid", "conservative", "robust"]), eps=st.floats(0.0, 0.49))
def test_loss_is_log2_when_policy_equals_reference(seed, beta, loss_type, eps):
    pc, pr, _, _ = _pairs(seed)
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(out.losses, torch.full_like(pc, math.log(2)), rtol=0, atol=1e-12)
    assert (out.chosen_rewards == 0).all() and (out.margins == 0).all() and out.accuracy == 0.0


def test_sigmoid_gradient_wrt_the_log_ratio_is_minus_beta_sigmoid_minus_z():
    beta = 0.3
    h = torch.linspace(-20, 20, 41, dtype=torch.float64, requires_grad=True)  # policy log-ratio difference
    zeros = torch.zeros_like(h)
    dpo_loss(h, zeros, zeros, zeros, beta=beta).losses.sum().backward()
    expected = -beta / (1 + np.exp(beta * h.detach().numpy()))  # -beta * sigmoid(-beta h)
    np.testing.assert_allclose(h.grad.numpy(), expected, rtol=1e-12, atol=1e-300)
    # the reference enters with the opposite sign and gets no gradient of its own when frozen
    ref = torch.zeros_like(h, requires_grad=True)
    dpo_loss(zeros, zeros, ref, zeros, beta=beta).losses.sum().backward()
    np.testing.assert_allclose(ref.grad.numpy(), -expected[20] * np.ones(41), rtol=1e-12)  # z = 0 everywhere


def test_ipo_minimum_is_at_h_equals_one_over_two_beta():
    beta = 0.25
    hs = torch.tensor([1.0, 1.9, 2.0, 2.1, 3.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(hs)
    out = dpo_loss(hs, zeros, zeros, zeros, beta=beta, loss_type="ipo")
    out.losses.sum().backward()
    assert out.losses[2].item() == 0.0 and hs.grad[2].item() == 0.0  # h = 1 / (2 * 0.25) = 2
    assert (out.losses[[0, 1, 3, 4]] > 0).all() and hs.grad[1] < 0 < hs.grad[3]
    torch.testing.assert_close(out.losses[1], out.losses[3])  # a parabola: symmetric about its minimum


def test_hinge_is_zero_beyond_the_margin():
    beta = 0.5
    h = torch.tensor([-4.0, 0.0, 1.9, 2.0, 2.1, 10.0], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(h)
    out = dpo_loss(h, zeros, zeros, zeros, beta=beta, loss_type="hinge")  # z = beta * h >= 1 from h = 2
    out.losses.sum().backward()
    assert out.losses[3:].eq(0).all() and h.grad[3:].eq(0).all()
    torch.testing.assert_close(out.losses[:3], 1 - beta * h[:3].detach())
    assert h.grad[:3].eq(-beta).all()


def test_robust_and_conservative_reduce_to_sigmoid_at_zero_and_robust_is_unbiased_under_flips():
    pc, pr, rc, rr = _pairs(7)
    sig = dpo_loss(pc, pr, rc, rr, beta=0.7).losses
    for kind in ("robust", "conservative"):
        assert torch.equal(dpo_loss(pc, pr, rc, rr, beta=0.7, loss_type=kind).losses, sig)
    # a label flipped with probability eps swaps chosen and rejected; robust's expectation over the flip
    # is the clean DPO loss (Chowdhury et al. 2024), conservative's is not
    eps = 0.2
    rob = dpo_loss(pc, pr, rc, rr, beta=0.7, loss_type="robust", label_smoothing=eps).losses
    rob_flip = dpo_loss(pr, pc, rr, rc, beta=0.7, loss_type="robust", label_smoothing=eps).losses
    torch.testing.assert_close((1 - eps) * rob + eps * rob_flip, sig, rtol=1e-12, atol=1e-12)
    con = dpo_loss(pc, pr, rc, rr, beta=0.7, loss_type="conservative", label_smoothing=eps).losses
    assert torch.equal(con, dpo_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=eps).losses)
    assert not torch.allclose(con, sig)


def test_simpo_ignores_the_reference():
    pc, pr, rc, rr = _pairs(3)
    a = dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo", margin=0.5)
    b = dpo_loss(pc, pr, rc * 100, rr - 7, beta=2.0, loss_type="simpo", margin=0.5)
    assert torch.equal(a.losses, b.losses) and torch.equal(a.chosen_rewards, b.chosen_rewards)
    torch.testing.assert_close(a.chosen_rewards, 2.0 * pc)  # its reward: beta * the policy's own log-prob
    want = np.logaddexp(0.0, -(2.0 * (pc - pr).numpy() - 0.5))
    np.testing.assert_allclose(a.losses.numpy(), want, rtol=1e-12)


def test_diagnostics_rewards_margins_accuracy():
    pc = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0, -3.0, -9.0])
    rc = torch.tensor([-1.5, -1.5, -3.0, -4.0])
    rr = torch.tensor([-1.5, -1.5, -3.0, -5.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, -0.25, 0.0, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.25, 0.25, 0.0, -2.0]))
    torch.testing.assert_close(out.margins, torch.tensor([0.5, -0.5, 0.0, 2.0]))
    assert out.accuracy == 0.5 and isinstance(out.accuracy, float)  # pairs 0 and 3; a tie does not count
    assert not out.chosen_rewards.requires_grad and not out.margins.requires_grad and out.loss.requires_grad
    assert out.losses.dtype == torch.float32 and dpo_loss(pc.half(), pr.half(), rc.half(), rr.half(),
                                                          beta=0.5).losses.dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"), (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing"),
    (dict(beta=0.1, loss_type="kto"), "loss_type"),
    (dict(beta=0.1, loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (dict(beta=0.1, loss_type="ipo", margin=0.5), "margin"),
])
def test_bad_hyperparameters(kwargs, match):
    pc, pr, rc, rr = _pairs(0)
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **kwargs)


def test_bad_shapes_and_missing_reference():
    pc, pr, rc, rr = _pairs(0)
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo_loss(pc, pr, rc, rr[:5], beta=0.1)
    with pytest.raises(ValueError, match="policy_chosen"):
        dpo_loss(pc[:, None], pr, rc, rr, beta=0.1)  # (B, 1) is not (B,)
    with pytest.raises(ValueError, match="ref_chosen is None"):
        dpo_loss(pc, pr, None, None, beta=0.1)
    with pytest.raises(ValueError, match="policy_chosen must be"):
        dpo_loss(None, pr, None, None, beta=0.1, loss_type="simpo")
    with pytest.raises(ValueError, match="at least one pair"):
        dpo_loss(pc[:0], pr[:0], rc[:0], rr[:0], beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected"):
        dpo_loss(pc, torch.zeros(6, dtype=torch.long), rc, rr, beta=0.1)


def test_sequence_logprobs_summed_or_averaged():
    lp = torch.tensor([[-1.0, -2.0, -4.0, 99.0], [-0.5, 99.0, -1.5, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, True, False]])
    assert sequence_logprobs(lp, mask).tolist() == [-7.0, -2.0]
    assert sequence_logprobs(lp, mask, average=True).tolist() == pytest.approx([-7.0 / 3, -1.0])
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        sequence_logprobs(lp, torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="bool mask"):
        sequence_logprobs(lp, mask.long())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=31, context_length=12, n_layer=1, n_head=2, n_embd=16,
                           tie_embeddings=False)).double().eval()


def _padded(rows, W=9):
    """Left-padded ids (B, W), padding mask (B, W), and a response mask marking each row's last 3 tokens."""
    idx, pad = torch.full((len(rows), W), 30), torch.zeros(len(rows), W, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, W - len(r):], pad[b, W - len(r):] = torch.tensor(r), True
    resp = torch.zeros_like(pad)
    resp[:, -3:] = True
    return idx, pad, resp


def test_model_sequence_logprobs_match_each_row_alone(model):
    rows = [[3, 7, 1, 9, 2], [4, 4, 8, 1], [5, 6, 7, 8, 9, 10, 11]]
    idx, pad, resp = _padded(rows)
    got_sum = model_sequence_logprobs(model, idx, pad, resp)
    got_avg = model_sequence_logprobs(model, idx, pad, resp, average=True)
    for b, r in enumerate(rows):
        logp = torch.log_softmax(model(torch.tensor([r]))[0][0], -1)  # (n, V): the row alone
        want = [logp[t - 1, r[t]].item() for t in range(len(r) - 3, len(r))]
        assert got_sum[b].item() == pytest.approx(sum(want), abs=1e-10)
        assert got_avg[b].item() == pytest.approx(sum(want) / 3, abs=1e-10)


def test_cached_reference_matches_recomputing_and_carries_no_graph(model):
    batches = [_padded([[3, 7, 1, 9, 2], [4, 4, 8, 1]]), _padded([[5, 6, 7, 8, 9, 10, 11]])]
    calls = []

    def score(batch):
        calls.append(torch.is_grad_enabled())
        ids, pad, resp = batch
        return (model_sequence_logprobs(model, ids, pad, resp),
                model_sequence_logprobs(model, ids, pad, resp, average=True))

    cache = cached_reference_logprobs(score, batches)
    assert calls == [False, False] and cache.chosen.shape == cache.rejected.shape == (3,)
    assert not cache.chosen.requires_grad and cache.chosen.grad_fn is None
    direct = torch.cat([model_sequence_logprobs(model, *b) for b in batches])
    torch.testing.assert_close(cache.chosen, direct, rtol=0, atol=0)
    c, r = cache.take(torch.tensor([2, 0]))
    assert torch.equal(c, direct[[2, 0]]) and r.shape == (2,)
    with pytest.raises(ValueError, match="empty"):
        cached_reference_logprobs(score, [])
    with pytest.raises(ValueError, match="batch 0"):
        cached_reference_logprobs(lambda b: (torch.zeros(2), torch.zeros(3)), batches)


def test_model_logprobs_and_sequence_logprobs_agree_on_a_full_mask(model):
    idx, pad, _ = _padded([[3, 7, 1, 9, 2], [4, 4, 8, 1]])
    whole = model_sequence_logprobs(model, idx, pad)  # every real token after the first
    torch.testing.assert_close(whole, model_logprobs(model, idx, pad).sum(-1))

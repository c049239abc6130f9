"""Masked per-token log-probs and entropies against float64 formulas written here; masked positions
contribute exactly nothing (value and gradient) even over inf/NaN logits; the model's shift by one."""
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align import masked_mean, masked_sum, model_logprobs, token_entropy, token_logprobs
from minilife.model import GPT, ModelConfig


def _case(seed, B=3, T=5, V=7, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    return logits, targets, mask


def _ref_logprobs(logits, targets, mask):
    """float64: log_softmax(z)[y] where mask, 0 elsewhere."""
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp * mask  # the reference may multiply: its logits are finite


def _ref_entropy(logits, mask):
    """float64: -sum_v p log p, written with softmax and log."""
    p = torch.softmax(logits.double(), -1)
    return -(p * p.log()).sum(-1) * mask


@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(2, 9))
def test_logprobs_and_entropy_match_float64(seed, B, T, V):
    logits, targets, mask = _case(seed, B, T, V)
    lp, ent = token_logprobs(logits, targets, mask), token_entropy(logits, mask)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (B, T)
    # float32 log-softmax of O(10) logits: ~10 * 2^-24 absolute error; 1e-5 leaves 50x margin
    torch.testing.assert_close(lp.double(), _ref_logprobs(logits, targets, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), _ref_entropy(logits, mask), rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_sum(lp, mask).double(), _ref_logprobs(logits, targets, mask).sum(-1),
                               rtol=0, atol=1e-5 * T)
    ref_mean = [sum(lp[b, t].item() for t in range(T) if mask[b, t]) / max(1, int(mask[b].sum())) for b in range(B)]
    torch.testing.assert_close(masked_mean(lp, mask).double(), torch.tensor(ref_mean, dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_bf16_logits_are_upcast_float64_stays():
    logits, targets, mask = _case(1, V=1000, scale=8.0)
    lp = token_logprobs(logits.bfloat16(), targets, mask)
    assert lp.dtype == torch.float32
    # the reference uses the same bf16 values, so only the computation's rounding differs: float32
    # gives ~1e-6, a bf16 log-softmax over 1000 logits of size ~8 would be off by ~1e-1
    torch.testing.assert_close(lp.double(), _ref_logprobs(logits.bfloat16(), targets, mask), rtol=0, atol=1e-4)
    assert token_logprobs(logits.double(), targets, mask).dtype == torch.float64


def test_masked_positions_contribute_exactly_nothing():
    logits, targets, mask = _case(2)
    mask[0] = False  # a row with nothing to score
    garbage = logits.clone()
    garbage[~mask] = float("nan")
    garbage[~mask & (targets % 2 == 0)] = float("inf")
    targets = torch.where(mask, targets, torch.where(targets % 2 == 0, -100, 999))  # out-of-vocabulary there too
    z = garbage.clone().requires_grad_()
    lp, ent = token_logprobs(z, targets, mask), token_entropy(z, mask)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    assert masked_mean(lp, mask)[0] == 0 and masked_sum(lp, mask)[0] == 0
    (masked_sum(lp, mask).sum() + masked_mean(ent, mask).sum()).backward()
    assert (z.grad[~mask] == 0).all()  # exactly zero, not NaN * 0
    clean = logits.clone().requires_grad_()  # the same logits without the garbage
    (masked_sum(token_logprobs(clean, targets, mask), mask).sum()
     + masked_mean(token_entropy(clean, mask), mask).sum()).backward()
    assert torch.equal(z.grad[mask], clean.grad[mask])  # the garbage changed nothing at the real positions


def test_gradients_match_closed_forms():
    logits, targets, mask = _case(4, dtype=torch.float64)
    p = torch.softmax(logits, -1)  # (B, T, V)
    z = logits.clone().requires_grad_()
    masked_sum(token_logprobs(z, targets, mask), mask).sum().backward()
    ref = (torch.nn.functional.one_hot(targets, logits.shape[-1]) - p) * mask.unsqueeze(-1)  # d log p_y / dz
    torch.testing.assert_close(z.grad, ref, rtol=0, atol=1e-12)  # float64
    z = logits.clone().requires_grad_()
    masked_sum(token_entropy(z, mask), mask).sum().backward()
    H = -(p * p.log()).sum(-1, keepdim=True)  # (B, T, 1)
    ref = -p * (p.log() + H) * mask.unsqueeze(-1)  # dH / dz_i = -p_i (log p_i + H)
    torch.testing.assert_close(z.grad, ref, rtol=0, atol=1e-12)


def test_bad_shapes_raise():
    logits, targets, mask = _case(3)
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) and a bool mask"):
        token_logprobs(logits, targets, mask.float())
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) and a bool mask"):
        token_entropy(logits[0], mask)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=31, context_length=12, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return m.double().eval()


def test_model_logprobs_shift_by_one_on_a_padded_batch(model):
    rows = [[3, 7, 1, 9, 2], [4, 4, 8], [5, 6, 7, 8, 9, 10, 11]]
    W = 8
    idx = torch.full((3, W), 30)
    pad = torch.zeros(3, W, dtype=torch.bool)
    for b, r in enumerate(rows):  # left padding
        idx[b, W - len(r):], pad[b, W - len(r):] = torch.tensor(r), True
    response = torch.zeros(3, W, dtype=torch.bool)
    response[:, -2:] = True  # score the last two tokens of each row
    lp, ent = model_logprobs(model, idx, pad, response, with_entropy=True)
    lp_all = model_logprobs(model, idx, pad)
    assert lp.shape == ent.shape == (3, W)
    for b, r in enumerate(rows):
        logits = model(torch.tensor([r]))[0][0]  # (n, V): the row alone, no padding
        logp = torch.log_softmax(logits, -1)  # float64
        ref = [0.0] * (W - len(r)) + [0.0] + [logp[t - 1, r[t]].item() for t in range(1, len(r))]  # first: no context
        ref_ent = [0.0] * (W - len(r)) + [0.0] + [-(logp[t - 1].exp() * logp[t - 1]).sum().item()
                                                  for t in range(1, len(r))]
        assert lp_all[b].tolist() == pytest.approx(ref, abs=1e-10)
        keep = [0.0] * (W - 2) + [1.0, 1.0]
        assert lp[b].tolist() == pytest.approx([x * k for x, k in zip(ref, keep)], abs=1e-10)
        assert ent[b].tolist() == pytest.approx([x * k for x, k in zip(ref_ent, keep)], abs=1e-10)
        assert masked_sum(lp_all, pad)[b].item() == pytest.approx(sum(ref), abs=1e-10)  # its log-likelihood

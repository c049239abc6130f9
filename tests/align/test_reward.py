"""The reward model and the Bradley-Terry loss: loss, accuracy and gradients against float64 formulas
written here (margin and centring terms included); the reward is read at the last real token,
whatever the padding side and batch size; tokenizer mismatch and bad input are clear errors."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align.reward import (RewardModel, bradley_terry_loss, check_same_tokenizer, last_token_index,
                                   preference_accuracy)
from minilife.data.bpe import Tokenizer
from minilife.model import GPT, ModelConfig


def _ref_loss(rc, rr, margin, c):
    """float64 by hand: mean(log(1 + exp(-(rc - rr - m)))) + c * mean((rc + rr)^2)."""
    rc, rr = rc.double(), rr.double()
    m = margin.double() if isinstance(margin, torch.Tensor) else margin
    return torch.log1p(torch.exp(-(rc - rr - m))).mean() + c * ((rc + rr) ** 2).mean()


def _ref_grads(rc, rr, margin, c):
    """Analytic, with z = rc - rr - m: dL/drc = (-(1 - sigmoid(z)) + 2c(rc + rr)) / B and
    dL/drr = (+(1 - sigmoid(z)) + 2c(rc + rr)) / B."""
    rc, rr = rc.double(), rr.double()
    m = margin.double() if isinstance(margin, torch.Tensor) else margin
    z, B = rc - rr - m, rc.numel()
    s = 1 / (1 + torch.exp(-z))
    return (-(1 - s) + 2 * c * (rc + rr)) / B, ((1 - s) + 2 * c * (rc + rr)) / B


def _rewards(seed, B, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    rc, rr = torch.randn(B, generator=g) * scale, torch.randn(B, generator=g) * scale
    return rc.requires_grad_(), rr.requires_grad_()


@given(seed=st.integers(0, 10_000), B=st.integers(1, 8), c=st.sampled_from([0.0, 0.01, 0.5]),
       per_pair=st.booleans(), m=st.floats(-2, 2))
def test_bt_loss_and_gradient_match_float64(seed, B, c, per_pair, m):
    rc, rr = _rewards(seed, B)
    margin = torch.linspace(-1, 2, B) if per_pair else m
    out = bradley_terry_loss(rc, rr, margin=margin, center_coef=c)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), _ref_loss(rc.detach(), rr.detach(), margin, c), rtol=1e-6, atol=1e-6)
    out.loss.backward()
    gc, gr = _ref_grads(rc.detach(), rr.detach(), margin, c)
    torch.testing.assert_close(rc.grad.double(), gc, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rr.grad.double(), gr, rtol=1e-5, atol=1e-7)


def test_bt_special_values():
    z = torch.zeros(4)
    assert bradley_terry_loss(z, z).loss.item() == pytest.approx(math.log(2))  # equal rewards: P = 1/2
    assert bradley_terry_loss(z, z).accuracy.item() == 0.5  # ties count half
    rc, rr = torch.tensor([3.0, -1.0]), torch.tensor([1.0, -1.0])  # d = 2, 0
    assert bradley_terry_loss(rc, rr, margin=2.0).loss.item() == pytest.approx(
        (math.log(2) + math.log1p(math.exp(2))) / 2, rel=1e-6)
    # centring adds c * mean((rc + rr)^2) = 0.1 * (16 + 4) / 2, and leaves the accuracy alone
    base, centred = bradley_terry_loss(rc, rr), bradley_terry_loss(rc, rr, center_coef=0.1)
    assert centred.loss.item() - base.loss.item() == pytest.approx(1.0, rel=1e-6)
    assert centred.accuracy.item() == base.accuracy.item() == 0.75
    # far-apart rewards stay finite in float32 (log-sigmoid, not log(sigmoid))
    far = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert far.loss.item() == pytest.approx(400.0)


def test_margin_and_centring_change_the_gradient_the_right_way():
    rc, rr = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0.0, 1.0], requires_grad=True)
    bradley_terry_loss(rc, rr, margin=3.0).loss.backward()
    pushed = rc.grad.clone()
    rc.grad = None
    bradley_terry_loss(rc, rr).loss.backward()
    assert (pushed < rc.grad).all()  # a margin pushes chosen up harder (more negative gradient)
    rc.grad, rr.grad = None, None
    shifted = (torch.tensor([11.0, 12.0], requires_grad=True), torch.tensor([10.0, 11.0], requires_grad=True))
    bradley_terry_loss(*shifted, center_coef=1.0).loss.backward()
    assert (shifted[0].grad > 0).all() and (shifted[1].grad > 0).all()  # centring pulls both down toward 0


def test_accuracy():
    rc, rr = torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, -5.0])
    assert preference_accuracy(rc, rr).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert not preference_accuracy(rc.requires_grad_(), rr).requires_grad


@pytest.mark.parametrize("kwargs, match", [
    (dict(r_chosen=torch.zeros(2, 1), r_rejected=torch.zeros(2, 1)), "r_chosen must be"),
    (dict(r_chosen=torch.zeros(3), r_rejected=torch.zeros(2)), "same shape"),
    (dict(r_chosen=torch.zeros(0), r_rejected=torch.zeros(0)), "non-empty"),
    (dict(r_chosen=torch.zeros(2, dtype=torch.long), r_rejected=torch.zeros(2)), "floating"),
    (dict(r_chosen=torch.zeros(2), r_rejected=torch.zeros(2), center_coef=-0.1), "center_coef"),
    (dict(r_chosen=torch.zeros(2), r_rejected=torch.zeros(2), margin=torch.zeros(3)), "margin"),
    (dict(r_chosen=torch.zeros(2), r_rejected=torch.zeros(2), margin=float("nan")), "margin"),
])
def test_bt_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry_loss(**kwargs)


# --------------------------------------------------------------------------------- the reward model

@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(0)
    return RewardModel.from_gpt(GPT(ModelConfig.preset("micro"))).eval()


def _padded(rows, side, pad_id=7):
    """Token-id lists -> (idx (B, T), padding_mask (B, T)) padded on ``side`` with ``pad_id``."""
    T = max(map(len, rows))
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[i, sl], mask[i, sl] = torch.tensor(r), True
    return idx, mask


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [1, 3, 3, 1]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        last_token_index(torch.tensor([[True], [False]]))
    with pytest.raises(ValueError, match="bool"):
        last_token_index(torch.ones(2, 3))


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(rm):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 12, 1, 9)]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0] for r in rows])  # batch 1, no padding
        left, right = rm(*_padded(rows, "left")), rm(*_padded(rows, "right"))
        other_pad = rm(*_padded(rows, "right", pad_id=300))
    assert left.shape == right.shape == (4,)
    for batched in (left, right, other_pad):  # float32 matmuls of other shapes: rounding only
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert alone.unique().numel() == 4  # distinct sequences, distinct rewards: the reads are not all one position
    # the reward depends on the last real token, and (causal) on no later position
    idx, mask = _padded(rows, "right")
    changed = idx.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 512
    with torch.no_grad():
        assert rm(changed, mask)[0] != right[0]


def test_from_gpt_copies_and_trains_the_head_and_trunk():
    torch.manual_seed(0)
    gpt = GPT(ModelConfig.preset("micro"))
    rm = RewardModel.from_gpt(gpt)
    before = gpt.tok_emb.weight.detach().clone()
    idx = torch.randint(0, 512, (2, 6))
    rewards = rm(idx)
    loss = bradley_terry_loss(rewards[:1], rewards[1:]).loss
    loss.backward()
    assert rm.head.weight.grad is not None and rm.body.blocks[0].attn_norm.weight.grad is not None
    with torch.no_grad():
        rm.body.tok_emb.weight.add_(1.0)
    assert torch.equal(gpt.tok_emb.weight, before)  # the SFT model is untouched


def test_reward_model_bad_input(rm):
    with pytest.raises(ValueError, match="idx must be"):
        rm(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask must have"):
        rm(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real token"):
        rm(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[True] * 3, [False] * 3]))
    with pytest.raises(TypeError, match="GPT"):
        RewardModel(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------- tokenizers

def _tok(extra: bytes | None = None, special: int | None = None) -> Tokenizer:
    ranks = {bytes([i]): i for i in range(256)}
    if extra:
        ranks[extra] = 256
    specials = {"<|end|>": special} if special is not None else {}
    return Tokenizer(ranks, specials)


def test_same_tokenizer_passes_and_different_ones_are_named():
    a = _tok(b"ab")
    check_same_tokenizer(a, _tok(b"ab"))
    check_same_tokenizer(a.state(), a)  # a checkpoint's state dict works too
    with pytest.raises(ValueError, match=r"reward model: vocab_size 257, policy: vocab_size 258"):
        check_same_tokenizer(a, _tok(b"ab", special=257))
    with pytest.raises(ValueError, match=r"vocab_size 257.*vocab_size 257.*ranks"):
        check_same_tokenizer(a, _tok(b"ba"))
    with pytest.raises(TypeError, match="policy must be a Tokenizer"):
        check_same_tokenizer(a, 42)

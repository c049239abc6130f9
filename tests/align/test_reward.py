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


# --------------------------------------------------------------------------------- reward.pt

def test_save_and_load_reward_model_round_trip(tmp_path):
    from minilife.align.reward import load_reward_model, save_reward_model
    from minilife.checkpoint import read_checkpoint
    torch.manual_seed(0)
    rm = RewardModel.from_gpt(GPT(ModelConfig.preset("micro", vocab_size=257))).eval()
    with torch.no_grad():
        rm.head.bias.fill_(0.25)  # a trained head, not the init
    tok, idx = _tok(b"ab"), torch.randint(0, 257, (3, 7))
    path = save_reward_model(tmp_path / "reward.pt", rm, tok, extra={"reward_mean": 0.5, "reward_std": 2.0})
    state = torch.get_rng_state()
    loaded, ltok = load_reward_model(path)
    assert torch.equal(torch.get_rng_state(), state)  # the throwaway init leaves the caller's RNG alone
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert ltok.state() == tok.state()
    with torch.no_grad():
        assert torch.equal(loaded(idx), rm(idx))
    extra = read_checkpoint(path)["extra"]
    assert extra["kind"] == "reward_model" and (extra["reward_mean"], extra["reward_std"]) == (0.5, 2.0)


def test_a_lora_reward_model_saves_merged_and_loads_as_plain(tmp_path):
    from minilife.align.reward import load_reward_model, save_reward_model
    from minilife.model.finetune import apply_method
    torch.manual_seed(0)
    rm = RewardModel.from_gpt(GPT(ModelConfig.preset("micro", vocab_size=257))).eval()
    apply_method(rm.body, "lora", rank=2, alpha=4.0)
    with torch.no_grad():  # LoRA's B starts at 0: move it so the merge matters
        for name, p in rm.body.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    idx = torch.randint(0, 257, (2, 9))
    loaded, _ = load_reward_model(save_reward_model(tmp_path / "r.pt", rm, _tok(b"ab")))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), rm(idx), rtol=1e-5, atol=1e-5)
    assert type(loaded.body.blocks[0].attn.qkv).__name__ == "Linear"


def test_loading_a_plain_gpt_as_a_reward_model_names_the_file(tmp_path):
    import dataclasses
    from minilife.align.reward import load_reward_model
    from minilife.checkpoint import CheckpointError, save_checkpoint
    gpt = GPT(ModelConfig.preset("micro", vocab_size=257))
    path = save_checkpoint(tmp_path / "model.pt", model=gpt, step=1, config={"model": dataclasses.asdict(gpt.cfg)},
                           extra={"tokenizer_state": _tok(b"ab").state()})
    with pytest.raises(CheckpointError, match=r"model\.pt: not a reward model checkpoint.*load_pretrained"):
        load_reward_model(path)


def _chat_policy():
    """A tiny chat model (BPE + chat tokens) and its tokenizer."""
    from minilife.align.chat import add_chat_tokens
    from minilife.data.bpe_train import train_bpe
    tok = train_bpe(280, text=["Ada and Bob plan the launch on Monday at noon."] * 8)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16)).eval()
    return add_chat_tokens(policy, tok)


def test_load_policy_reward_reads_the_stats_or_measures_them_on_sft_samples(tmp_path):
    import statistics
    from minilife.align.reward import load_policy_reward, save_reward_model
    from minilife.align.rollout import sample_rollouts
    policy, tok = _chat_policy()
    rm = RewardModel.from_gpt(policy).eval()
    convs = [[{"role": "user", "content": c}] for c in ("the plan?", "Monday", "noon", "who?", "Ada")]
    saved = save_reward_model(tmp_path / "stats.pt", rm, tok, extra={"reward_mean": 0.5, "reward_std": 2.0})
    got = load_policy_reward(saved, tok, sft=policy, prompts=convs)
    assert got.stats == (0.5, 2.0) and got.stats_from == "reward.pt"
    idx = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(got.model(idx), rm(idx)) and not got.model.training
    for extra in ({}, {"reward_mean": 0.5, "reward_std": 0.0}):  # no usable stats: measured on SFT samples
        plain = save_reward_model(tmp_path / "plain.pt", rm, tok, extra=extra)
        got = load_policy_reward(plain, tok, sft=policy, prompts=convs, max_new_tokens=6, seed=4)
        probe = sample_rollouts(policy, tok, convs, 6, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            r = [float(x) for x in rm(probe.tokens, probe.padding_mask)]  # (5,) by hand: one answer per prompt
        assert got.stats == pytest.approx((statistics.fmean(r), statistics.stdev(r)), rel=1e-5)
        assert got.stats_from == "measured on 5 SFT samples"
    with pytest.raises(ValueError, match=r"plain\.pt holds no reward_mean/reward_std"):
        load_policy_reward(plain, tok)
    with pytest.raises(ValueError, match=r"reward model .*stats\.pt.*policy model\.pt.*different tokenizers"):
        load_policy_reward(saved, _tok(b"ab"), policy_name="policy model.pt")


# --------------------------------------------------------------------------------- agreement with gold

def _ranks(xs):
    """Average ranks by hand (0-based): each value's rank is the mean position of its equals in sorted order."""
    order = sorted(xs)
    return [sum(i for i, v in enumerate(order) if v == x) / order.count(x) for x in xs]


def _corr(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in xs) * sum((b - my) ** 2 for b in ys))


@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), k=st.integers(1, 4))
def test_gold_agreement_matches_a_loop_over_pairs(seed, n, k):
    from minilife.align.reward import gold_agreement
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 4, (n,), generator=g).float()  # few values: reward ties happen
    gold = torch.randint(0, 3, (n,), generator=g).double() / 2
    groups = torch.randint(0, k, (n,), generator=g)
    out = gold_agreement(rewards, gold, groups)
    r, gd, gr = rewards.tolist(), gold.tolist(), groups.tolist()
    scores = [1.0 if (r[i] - r[j]) * (gd[i] - gd[j]) > 0 else 0.5 if r[i] == r[j] else 0.0
              for i in range(n) for j in range(i + 1, n) if gr[i] == gr[j] and gd[i] != gd[j]]
    assert out["pairs"] == len(scores)
    assert out["agreement"] == (pytest.approx(sum(scores) / len(scores)) if scores else None)
    if len(set(r)) > 1 and len(set(gd)) > 1:
        assert out["spearman"] == pytest.approx(_corr(_ranks(r), _ranks(gd)), abs=1e-12)
        assert out["pearson"] == pytest.approx(_corr(r, gd), abs=1e-12)
    else:
        assert out["spearman"] is None and out["pearson"] is None


def test_gold_agreement_special_values():
    from minilife.align.reward import gold_agreement
    gold, groups = torch.tensor([0.0, 0.5, 1.0, 0.2]), torch.tensor([0, 0, 0, 1])
    same = gold_agreement(gold * 3 + 1, gold, groups)  # any increasing map of gold agrees fully
    assert same["pairs"] == 3 and same["agreement"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    flipped = gold_agreement(-gold, gold, groups)
    assert flipped["agreement"] == 0.0 and flipped["spearman"] == pytest.approx(-1.0)
    assert gold_agreement(torch.zeros(4), gold, groups)["agreement"] == 0.5  # a constant reward: chance
    with pytest.raises(ValueError, match="one length"):
        gold_agreement(torch.zeros(3), gold, groups)

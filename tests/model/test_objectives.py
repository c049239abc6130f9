"""Causal, prefix and masked LM batch builders: shapes, what is trained, and that no trained position
can see its own target."""
import math

import pytest
import torch

from minilife.model import GPT, ModelConfig, causal_lm_batch, masked_lm_batch, prefix_lm_batch

V = 50


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=V, context_length=12, n_layer=2, n_head=2, n_embd=16)).double().eval()


def test_causal_lm_batch():
    tokens = torch.arange(2 * 9).view(2, 9)
    b = causal_lm_batch(tokens)
    assert torch.equal(b.inputs, tokens[:, :-1]) and torch.equal(b.targets, tokens[:, 1:])
    assert b.attention == {"attn_mask": "causal"}


def test_prefix_lm_batch_ignores_prefix_targets():
    tokens = torch.arange(3 * 9).view(3, 9)
    b = prefix_lm_batch(tokens, torch.tensor([1, 4, 8]))
    # row with p=4: inputs x0..x7, targets x1..x8; x1..x3 are inside the prefix -> positions 0..2 ignored
    assert b.targets[1].tolist() == [-100, -100, -100, 13, 14, 15, 16, 17]
    assert (b.targets[0] != -100).all()  # p=1: only x0 is prefix, nothing to hide
    assert (b.targets[2] != -100).sum() == 1  # p=T: only the last target x8 is trained
    drawn = prefix_lm_batch(tokens.repeat(50, 1), generator=torch.Generator().manual_seed(0))
    p = drawn.attention["prefix_lengths"]
    assert int(p.min()) >= 1 and int(p.max()) <= 7  # default draws leave at least one suffix target
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        prefix_lm_batch(tokens, 9)


@pytest.mark.parametrize("objective", ["causal", "prefix"])
def test_no_trained_position_sees_its_target(model64, objective):
    """Changing the token a position is asked to predict (x_{i+1}, at input position i + 1) must not
    change that position's logits. (For MLM the test_mlm_* tests check the original is replaced.)"""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (2, 13), generator=g)
    b = causal_lm_batch(tokens) if objective == "causal" else prefix_lm_batch(tokens, torch.tensor([5, 9]))
    base = model64(b.inputs, **b.attention)[0]  # (2, T, V)
    T = b.inputs.shape[1]
    trained = [(r, i) for r, i in (b.targets != -100).nonzero().tolist() if i + 1 < T]
    assert len(trained) >= 10
    rows = torch.tensor([r for r, _ in trained])
    changed = b.inputs[rows].clone()  # one copy of the row per trained position
    for n, (r, i) in enumerate(trained):
        changed[n, i + 1] = (changed[n, i + 1] + 1) % V
    kw = dict(b.attention)
    if "prefix_lengths" in kw:
        kw["prefix_lengths"] = kw["prefix_lengths"][rows]
    out = model64(changed, **kw)[0]
    for n, (r, i) in enumerate(trained):
        torch.testing.assert_close(out[n, i], base[r, i], rtol=0, atol=1e-12)  # weight exactly 0 on that key
    if objective == "prefix":  # inside the prefix attention runs both ways: position 0 sees position 3
        changed = b.inputs.clone()
        changed[0, 3] = (changed[0, 3] + 1) % V
        assert (model64(changed, **b.attention)[0][0, 0] - base[0, 0]).abs().max() > 1e-6


def test_mlm_proportions_within_binomial_tolerance():
    B, T, vocab, mask_id = 64, 512, 1000, 999
    tokens = torch.randint(0, vocab - 1, (B, T), generator=torch.Generator().manual_seed(0))  # never mask_id
    tokens[:, 0] = 5  # a "special" id that must never be chosen
    b = masked_lm_batch(tokens, mask_id, vocab, special_ids=[5], generator=torch.Generator().manual_seed(1))
    assert b.attention == {"attn_mask": "full"}
    special = tokens == 5
    chosen = b.targets != -100
    assert not chosen[special].any()
    assert torch.equal(b.targets[chosen], tokens[chosen])
    assert torch.equal(b.inputs[~chosen], tokens[~chosen])  # unchosen positions untouched
    n = int((~special).sum())
    k = int(chosen.sum())

    def within(count, trials, p):  # 4.5 sigma of Binomial(trials, p): a false alarm ~1e-5
        return abs(count - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p))

    assert within(k, n, 0.15)
    x, t = b.inputs[chosen], tokens[chosen]
    # a random replacement can land on [MASK] or on the original token (probability 1/V each)
    assert within(int((x == mask_id).sum()), k, 0.8 + 0.1 / vocab)
    assert within(int((x == t).sum()), k, 0.1 + 0.1 / vocab)
    assert within(int(((x != t) & (x != mask_id)).sum()), k, 0.1 * (1 - 2 / vocab))
    # the random replacements are uniform over the vocabulary: their mean is (V-1)/2 within 4.5 standard
    # errors (sd of a uniform id is V/sqrt(12)), and they cover about V(1 - (1 - 1/V)^n) distinct ids
    rand_ids = x[(x != t) & (x != mask_id)].double()
    n_rand = rand_ids.numel()
    assert abs(rand_ids.mean().item() - (vocab - 1) / 2) <= 4.5 * vocab / math.sqrt(12 * n_rand)
    assert rand_ids.unique().numel() >= 0.9 * vocab * (1 - (1 - 1 / vocab) ** n_rand)


def test_mlm_bad_arguments():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mask_id"):
        masked_lm_batch(tokens, mask_id=10, vocab_size=10)
    with pytest.raises(ValueError, match="mask_prob"):
        masked_lm_batch(tokens, mask_id=1, vocab_size=10, mask_prob=0.0)
    with pytest.raises(ValueError, match="integer"):
        causal_lm_batch(torch.zeros(2, 4))

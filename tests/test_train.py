"""minilife.train: batches as a pure function of their index, the unigram baseline, the summed loss,
token-weighted evaluation and seeded sampling.

References, written here independently of the code under test: a hand-worked entropy; one big
concatenated batch through ``F.cross_entropy(reduction="mean")`` (torch's mean over non-ignored
tokens). Float64 throughout, so only
summation order differs (relative 1e-12 is ~1e4 x float64 eps: sums of ~1e3 terms, with margin).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minilife import train as L
from minilife.model.objectives import ObjectiveBatch
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = np.random.default_rng(0).integers(0, 50, 3000).astype(np.uint16)


def test_unigram_entropy_matches_formula():
    tokens = np.array([0, 0, 1, 2, 2, 2, 3, 3], dtype=np.uint16)
    p = np.array([2, 1, 3, 2]) / 8  # ids 4, 5 never occur and contribute 0 (0 log 0 = 0)
    assert L.unigram_entropy(tokens, 6) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)


@pytest.mark.parametrize("objective", ["causal", "prefix", "mlm"])
def test_micro_batch_is_a_pure_function_of_its_index(objective):
    kw = dict(mask_id=49, vocab_size=50) if objective == "mlm" else {}
    a = L.BatchSource(TOKENS, 4, 16, objective=objective, seed=3, **kw)
    b = L.BatchSource(TOKENS, 4, 16, objective=objective, seed=3, **kw)
    torch.manual_seed(123)  # the global RNG plays no part
    x1 = a.micro_batch(7)
    torch.manual_seed(456)
    b.micro_batch(0)
    x2 = b.micro_batch(7)
    assert torch.equal(x1.inputs, x2.inputs) and torch.equal(x1.targets, x2.targets)
    assert not torch.equal(a.micro_batch(8).inputs, x1.inputs)
    assert L.n_targets(x1) > 0
    # train and val streams of one seed draw different windows
    assert not torch.equal(L.BatchSource(TOKENS, 4, 16, objective=objective, seed=3, stream=1, **kw)
                           .micro_batch(7).inputs, x1.inputs)


def test_causal_batch_targets_are_inputs_shifted_by_one():
    b = L.BatchSource(TOKENS, 2, 8, seed=0).micro_batch(0)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])


def ragged_micro_batches(k: int = 3):
    """k causal micro-batches (2, 16) whose scored-token counts differ (tails set to ignore_index)."""
    src = L.BatchSource(TOKENS, 2, 16, seed=5)
    micro = []
    for i in range(k):
        b = src.micro_batch(i)
        targets = b.targets.clone()
        targets[:, 16 - 5 * i:] = L.IGNORE_INDEX  # micro-batch i keeps 16 - 5i targets per row
        micro.append(ObjectiveBatch(b.inputs, targets, b.attention))
    return micro


def big_batch_mean_loss(model, micro):
    """Reference: the micro-batches concatenated (k*B, T), torch's mean cross-entropy over scored tokens."""
    inputs = torch.cat([m.inputs for m in micro])  # (k*B, T)
    targets = torch.cat([m.targets for m in micro])  # (k*B, T)
    logits, _ = model(inputs)  # (k*B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),  # (k*B*T, V), (k*B*T,)
                           ignore_index=L.IGNORE_INDEX, reduction="mean")


def test_batch_loss_sum_is_the_sum_over_scored_tokens_float64():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("micro", vocab_size=50, context_length=16)).double()
    b = ragged_micro_batches()[2]
    logits, _ = model(b.inputs)  # (B, T, V)
    ref = F.cross_entropy(logits.reshape(-1, 50), b.targets.reshape(-1), ignore_index=L.IGNORE_INDEX,
                          reduction="sum")  # (B*T, V), (B*T,)
    assert L.batch_loss_sum(model, b).item() == pytest.approx(ref.item(), rel=1e-12)  # float64 summation order


def test_evaluate_is_token_weighted_over_all_batches_float64():
    """Ragged batches: the mean of per-batch means differs from sum(token losses) / sum(tokens)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("micro", vocab_size=50, context_length=16)).double()
    micro = ragged_micro_batches()

    class Fixed:  # a source whose micro-batch i is the i-th ragged batch
        def micro_batch(self, i):
            return micro[i]

    with torch.no_grad():
        ref = big_batch_mean_loss(model, micro).item()  # one mean over every scored token
        per_batch_mean = sum(F.cross_entropy(model(m.inputs)[0].reshape(-1, 50), m.targets.reshape(-1))
                             .item() for m in micro) / len(micro)
    assert abs(per_batch_mean - ref) > 1e-4  # the two readings really differ here
    assert L.evaluate(model, Fixed(), 3) == pytest.approx(ref, rel=1e-12)


def test_sample_text_is_seeded_and_leaves_the_mode_alone():
    from minilife.data.bpe_train import train_bpe

    torch.manual_seed(0)
    tok = train_bpe(270, text=["From: Ada to Bob about the launch plan"] * 8)
    model = GPT(ModelConfig.preset("micro", vocab_size=tok.vocab_size, context_length=32)).train()
    a, b = (L.sample_text(model, tok, "From:", 6, seed=4) for _ in range(2))
    assert a == b and a.startswith("From:") and model.training


def test_epoch_batch_partitions_each_epoch_and_is_a_function_of_seed_and_step():
    from minilife.train import epoch_batch
    n, bs = 10, 4  # 3 steps per epoch: 4 + 4 + 2
    epochs = [[epoch_batch(e * 3 + k, n, bs, seed=7).tolist() for k in range(3)] for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(i for b in batches for i in b) == list(range(n))  # every example once per epoch
    assert epochs[0] != epochs[1]  # a fresh shuffle each epoch
    assert epoch_batch(4, n, bs, seed=7).tolist() == epochs[1][1]  # pure in (seed, step): resume sees the same
    assert epoch_batch(4, n, bs, seed=8).tolist() != epochs[1][1]
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batch(0, n, 0, seed=7)

"""minilife.chapters.loop: batches as a pure function of their index, the unigram baseline, the
vocabulary check, and the guarded optimizer step."""
import shutil

import numpy as np
import pytest
import torch

from minilife.chapters import loop as L
from minilife.checkpoint import NonFiniteLossError
from minilife.model.transformer import GPT, ModelConfig
from minilife.optim.adamw import AdamW

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


def test_optimizer_step_refuses_a_nan_loss_without_updating(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("micro", vocab_size=50, context_length=16))
    opt = AdamW(model.parameters(), lr=1e-2)
    batch = L.BatchSource(TOKENS, 2, 16, seed=0).micro_batch(0)
    res = L.optimizer_step(model, opt, [batch], lr=1e-2, step=0)
    assert res.grad_norm > 0 and res.n_tokens == 32 and res.lr == 1e-2
    with torch.no_grad():
        model.norm_f.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="step 3"):
        L.optimizer_step(model, opt, [batch], lr=1e-2, step=3, last_good=tmp_path / "ckpt.pt")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).all() for k in before)


def test_tokenizer_that_does_not_match_the_shards_is_an_error(smoke_data_dir, tmp_path):
    from minilife.data.bpe import train_bpe

    copy = tmp_path / "data"
    shutil.copytree(smoke_data_dir, copy)
    train_bpe(["a small text to learn a few merges from"] * 4, 260).save(copy / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size"):
        L.load_data(True, str(copy))

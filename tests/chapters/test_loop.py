"""minilife.chapters.loop: batches as a pure function of their index, the unigram baseline, the
vocabulary check, and the guarded optimizer step.

References, written here independently of the code under test: a hand-worked entropy; one big
concatenated batch through ``F.cross_entropy(reduction="mean")`` (torch's mean over non-ignored
tokens); ``torch.optim.AdamW`` + ``torch.nn.utils.clip_grad_norm_``. Float64 throughout, so only
summation order differs (relative 1e-12 is ~1e4 x float64 eps: sums of ~1e3 terms, with margin).
"""
import copy
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteLossError, match="step 3") as e:
        L.optimizer_step(model, opt, [batch], lr=1e-2, step=3, last_good=tmp_path / "ckpt.pt")
    assert str(tmp_path / "ckpt.pt") in str(e.value)  # names the checkpoint to resume from
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).all() for k in before)
    opt_after = opt.state_dict()["state"]  # AdamW moments and step counts untouched (tolerance 0)
    assert all(opt_before["state"][i]["step"] == opt_after[i]["step"]
               and torch.equal(opt_before["state"][i]["exp_avg"], opt_after[i]["exp_avg"])
               and torch.equal(opt_before["state"][i]["exp_avg_sq"], opt_after[i]["exp_avg_sq"]) for i in opt_after)
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradients are not left behind


def ragged_micro_batches(k: int = 3):
    """k causal micro-batches (2, 16) whose scored-token counts differ (tails set to ignore_index)."""
    src = L.BatchSource(TOKENS, 2, 16, seed=5)
    micro = []
    for i in range(k):
        b = src.micro_batch(i)
        targets = b.targets.clone()
        targets[:, 16 - 5 * i:] = L.IGNORE_INDEX  # micro-batch i keeps 16 - 5i targets per row
        micro.append(L.ObjectiveBatch(b.inputs, targets, b.attention))
    return micro


def big_batch_mean_loss(model, micro):
    """Reference: the micro-batches concatenated (k*B, T), torch's mean cross-entropy over scored tokens."""
    inputs = torch.cat([m.inputs for m in micro])  # (k*B, T)
    targets = torch.cat([m.targets for m in micro])  # (k*B, T)
    logits, _ = model(inputs)  # (k*B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),  # (k*B*T, V), (k*B*T,)
                           ignore_index=L.IGNORE_INDEX, reduction="mean")


def test_accumulate_gradients_equals_one_big_batch_float64():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("micro", vocab_size=50, context_length=16)).double()
    micro = ragged_micro_batches()
    assert len({L.n_targets(m) for m in micro}) == 3  # really ragged: 32, 22, 12 scored tokens
    ref_loss = big_batch_mean_loss(model, micro)
    ref_loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss, n = L.accumulate_gradients(model, micro)
    assert n == 32 + 22 + 12
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)  # float64, summation order only
    scale = max(float(r.abs().max()) for r in ref)
    assert max(float((p.grad - r).abs().max()) for p, r in zip(model.parameters(), ref)) < 1e-12 * scale


def test_optimizer_step_matches_torch_adamw_with_clipping_float64():
    torch.manual_seed(0)
    ours = GPT(ModelConfig.preset("micro", vocab_size=50, context_length=16)).double()
    ref = copy.deepcopy(ours)
    opt = AdamW(ours.param_groups(0.1), lr=1.0, betas=(0.9, 0.95))  # lr is set by optimizer_step
    ref_opt = torch.optim.AdamW(ref.param_groups(0.1), lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    micro, clip = ragged_micro_batches(), 0.5
    for step, lr in enumerate((1e-2, 3e-3)):  # two steps with different LRs: the schedule reaches every group
        res = L.optimizer_step(ours, opt, micro, lr=lr, grad_clip=clip, step=step)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_loss = big_batch_mean_loss(ref, micro)
        ref_loss.backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert ref_norm > clip  # the clip is really exercised
        assert res.loss == pytest.approx(ref_loss.item(), rel=1e-12)  # float64 summation order
        assert res.grad_norm == pytest.approx(ref_norm, rel=1e-12)  # pre-clip norm, as torch returns it
        assert (res.lr, res.n_tokens) == (lr, 66)
        # AdamW divides by sqrt(v) + eps: 1e-12-relative gradient differences stay far below 1e-10 in the weights
        assert max(float((p - r).detach().abs().max()) for p, r in zip(ours.parameters(), ref.parameters())) < 1e-10
        assert all(p.grad is None for p in ours.parameters())  # zeroed for the next step


def test_tokenizer_that_does_not_match_the_shards_is_an_error(smoke_data_dir, tmp_path):
    from minilife.data.bpe import train_bpe

    copy = tmp_path / "data"
    shutil.copytree(smoke_data_dir, copy)
    train_bpe(["a small text to learn a few merges from"] * 4, 260).save(copy / "tokenizer.json")
    with pytest.raises(ValueError, match="vocab_size"):
        L.load_data(True, str(copy))

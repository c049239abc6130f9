"""GPT: config validation, causality, init loss, generation with and without the KV cache, gradient
checkpointing, parameter counting and groups, kernel dispatch."""
import copy
import math
import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

from minilife.model import GPT, KVCache, ModelConfig

V, T = 61, 16


def _cfg(**kw):
    return ModelConfig(**({"vocab_size": V, "context_length": T, "n_layer": 2, "n_head": 2, "n_embd": 16} | kw))


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return GPT(_cfg()).double().eval()


@pytest.mark.parametrize("kwargs, word", [
    (dict(n_embd=30, n_head=4), "not divisible"),
    (dict(n_embd=18, n_head=6), "odd"),  # head_dim 3
    (dict(attn_impl="flash"), "attn_impl"),
    (dict(loss_impl="cuda"), "loss_impl"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        _cfg(**kwargs)


def test_presets():
    g = ModelConfig.preset("gpt2-small")
    assert (g.n_layer, g.n_head, g.n_embd, g.vocab_size, g.context_length, g.head_dim) == (12, 12, 768, 50257, 1024, 64)
    assert ModelConfig.preset("tiny") == ModelConfig()
    assert ModelConfig.preset("tiny", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt5")


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_matches_hand_count_and_groups(tie):
    cfg = _cfg(tie_embeddings=tie, ffn_hidden=40)
    m = GPT(cfg)
    C, F_, L = 16, 40, 2
    per_layer = 2 * C + 3 * C * C + C * C + 3 * C * F_  # two norm gains, qkv, proj, w1/w3/w2
    expected = V * C + L * per_layer + C + (0 if tie else V * C)
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - V * C
    assert (m.lm_head.weight is m.tok_emb.weight) == tie
    decay, no_decay = m.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is m.tok_emb.weight for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == expected
    assert sum(p.numel() for p in no_decay["params"]) == V * C + (2 * L + 1) * C


def test_init_scales():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=64, context_length=8, n_layer=8, n_head=2, n_embd=64))
    resid = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.ffn.w2.weight.flatten()]) for b in m.blocks])
    plain = torch.cat([b.attn.qkv.weight.flatten() for b in m.blocks])
    # ~100k samples each: the sample std is within ~0.5% of the true one (std error 1/sqrt(2n))
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert plain.std().item() == pytest.approx(0.02, rel=0.02)


def test_loss_at_init_is_log_vocab():
    # logits have std ~ 0.02 * sqrt(C) = 0.16 (normalised hidden . weights of std 0.02), so for random
    # targets E[loss] ~ log V + var/2 = log V + 0.013; 0.05 leaves room for the sampling noise of 4*32 tokens
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=512, context_length=32, n_layer=2, n_head=2, n_embd=64))
    idx, tgt = torch.randint(0, 512, (2, 4, 32))
    _, loss = m(idx, tgt)
    assert abs(loss.item() - math.log(512)) < 0.05


@given(seed=st.integers(0, 10_000), cut=st.integers(1, T - 1))
def test_future_tokens_never_change_earlier_logits(model64, seed, cut):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (2, T), generator=g)
    changed = idx.clone()
    changed[:, cut:] = torch.randint(0, V, (2, T - cut), generator=g)
    logits, _ = model64(torch.cat([idx, changed]))  # one pass: rows 0-1 original, rows 2-3 changed
    # masked keys get softmax weight exactly 0, so only float64 rounding could differ
    torch.testing.assert_close(logits[:2, :cut], logits[2:, :cut], rtol=0, atol=1e-12)


def test_math_and_sdpa_models_agree(model64):
    ref = GPT(_cfg(attn_impl="math")).double()
    ref.load_state_dict(model64.state_dict())
    idx = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(101))
    for kw in [{}, {"attn_mask": "full"}, {"prefix_lengths": torch.tensor([0, 5, T])}]:
        torch.testing.assert_close(ref(idx, **kw)[0], model64(idx, **kw)[0], rtol=1e-10, atol=1e-10)  # float64


def test_loss_reductions_and_ignore_index(model64):
    idx, tgt = torch.randint(0, V, (2, 2, T), generator=torch.Generator().manual_seed(107))
    tgt[0, :5] = -100
    logits, loss = model64(idx, tgt)
    ref = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    _, per_token = model64(idx, tgt, reduction="none")
    assert per_token.shape == (2, T) and (per_token[0, :5] == 0).all()
    _, total = model64(idx, tgt, reduction="sum")
    torch.testing.assert_close(per_token.sum(), total)
    torch.testing.assert_close(total / (tgt != -100).sum(), loss)


def test_bad_inputs(model64):
    with pytest.raises(ValueError, match=f"T={T + 1}.*context_length is {T}"):
        model64(torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=f"token id {V} .*vocab_size={V}"):
        model64(torch.full((1, 4), V))
    with pytest.raises(ValueError, match=r"targets must be a tensor of shape \(2, 4\)"):
        model64(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=f"target {V} .*vocab_size={V}"):  # not torch's bare IndexError
        model64(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, -100, V, 2]]))
    with pytest.raises(ValueError, match="target -1 is outside"):  # -1 is not the ignore_index
        model64(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="targets .* integer entries"):
        model64(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="reduction"):
        model64(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model64(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model64.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1.0)


@pytest.fixture(scope="module")
def sharp64():
    """An untied float64 model with weights x6. At the 0.02 init with tied embeddings greedy decoding
    just repeats the last token and sampling is near-uniform, so a cache bug (e.g. wrong positions)
    would go unseen in generated tokens; with sharp weights the tokens depend on the whole context."""
    torch.manual_seed(2)
    m = GPT(_cfg(tie_embeddings=False)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return m


def test_cached_hidden_equals_full_pass(sharp64):
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(149))
    full = sharp64.hidden(idx)
    caches = [KVCache(2, 2, T, 8, dtype=torch.float64) for _ in sharp64.blocks]
    pieces = [sharp64.hidden(idx[:, a:b], caches=caches) for a, b in [(0, 5), (5, 6), (6, 7), (7, T)]]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)  # float64, same math
    with pytest.raises(ValueError, match=r"\+ 16 cached\) but the model's context_length is 16"):
        sharp64.hidden(idx[:, :1], caches=caches)


@pytest.mark.parametrize("new_tokens", [5, T + 4])  # T + 4: runs past the context window (sliding)
def test_kv_cache_generation_equals_no_cache(sharp64, new_tokens):
    model64 = sharp64
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(0))
    greedy = model64.generate(prompt, new_tokens, temperature=0.0).tokens
    assert greedy.shape == (2, 3 + new_tokens) and torch.equal(greedy[:, :3], prompt)
    assert torch.equal(greedy, model64.generate(prompt, new_tokens, temperature=0.0, use_cache=False).tokens)
    # top_k=1 sampling is greedy
    top1 = model64.generate(prompt, new_tokens, top_k=1, generator=torch.Generator().manual_seed(0)).tokens
    assert torch.equal(greedy, top1)
    assert len(set(greedy[:, 3:].flatten().tolist())) >= 4  # not a degenerate repetition
    sample = [model64.generate(prompt, new_tokens, temperature=0.8, top_k=20, use_cache=c,
                               generator=torch.Generator().manual_seed(7)).tokens for c in (True, False)]
    assert torch.equal(*sample)


def test_sampling_follows_tempered_top_k_distribution():
    # expected next-token distribution written out: softmax(logits / temperature) over the top 5;
    # the head is scaled up so the logits spread (std ~2) and the temperature visibly matters
    torch.manual_seed(1)
    m = GPT(_cfg(tie_embeddings=False)).double()
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    prompt = torch.full((4000, 2), 7)
    logits = m(prompt[:1])[0][0, -1] / 0.5  # (V,)
    top = torch.topk(logits, 5).indices
    probs = torch.zeros(V, dtype=torch.float64)
    probs[top] = torch.softmax(logits[top], dim=0)
    assert probs.max() > 0.4  # far from uniform over the 5
    out = m.generate(prompt, 1, temperature=0.5, top_k=5, generator=torch.Generator().manual_seed(3)).tokens[:, -1]
    counts = torch.bincount(out, minlength=V).double()
    assert counts[probs == 0].sum() == 0  # nothing outside the top 5
    sigma = (4000 * probs * (1 - probs)).sqrt()
    assert ((counts - 4000 * probs).abs() <= 4.5 * sigma + 1e-9).all()  # binomial, 4.5 sigma per token


def test_gradient_checkpointing_gives_identical_grads():
    torch.manual_seed(0)
    plain = GPT(_cfg(dropout=0.1)).double().train()
    ckpt = GPT(_cfg(dropout=0.1, gradient_checkpointing=True)).double().train()
    ckpt.load_state_dict(plain.state_dict())
    idx, tgt = torch.randint(0, V, (2, 2, T), generator=torch.Generator().manual_seed(198))
    grads = []
    for m in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks; checkpoint replays the RNG state on recompute
        m(idx, tgt)[1].backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)  # same float64 ops, recomputed


def _install_fake(monkeypatch, module, name, fn):
    mod = types.ModuleType(module)
    setattr(mod, name, fn)
    monkeypatch.setitem(sys.modules, module, mod)


def test_kernel_dispatch_uses_contract_signatures(model64, monkeypatch):
    """loss_impl/attn_impl call the kernel functions named in the contract (stand-ins here: the
    kernels have their own tests); the stand-ins compute the reference so the losses must agree."""
    calls = []

    def fake_ce(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0, num_tokens=None):
        calls.append(("ce", logits.shape))
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    def fake_fused(hidden, weight, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   num_tokens=None, chunk_size=None):
        calls.append(("fused", hidden.shape, weight.shape))
        return F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)

    def fake_flash(q, k, v, causal=True, sm_scale=None):
        calls.append(("flash", q.shape, causal))
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    _install_fake(monkeypatch, "minilife.kernels.cross_entropy", "cross_entropy", fake_ce)
    _install_fake(monkeypatch, "minilife.kernels.fused_linear_ce", "fused_linear_cross_entropy", fake_fused)
    _install_fake(monkeypatch, "minilife.kernels.flash_attention", "flash_attention", fake_flash)
    idx, tgt = torch.randint(0, V, (2, 2, T), generator=torch.Generator().manual_seed(235))
    _, ref_loss = model64(idx, tgt)
    for loss_impl, attn_impl in [("triton", "sdpa"), ("fused", "triton")]:
        m = GPT(_cfg(loss_impl=loss_impl, attn_impl=attn_impl)).double()
        m.load_state_dict(model64.state_dict())
        logits, loss = m(idx, tgt)
        assert (logits is None) == (loss_impl == "fused")
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert ("ce", (2 * T, V)) in calls and ("fused", (2 * T, 16), (V, 16)) in calls
    assert ("flash", (2, 2, T, 8), True) in calls
    n = len(calls)
    m(idx, prefix_lengths=torch.tensor([2, 3]))  # custom mask: falls back to sdpa, no kernel call
    assert len(calls) == n


def test_real_kernels_integrate(recwarn):
    """With the project's kernel modules (Triton on CUDA / under TRITON_INTERPRET, their torch fallback
    otherwise) the model gives the same loss and gradients as the torch path."""
    pytest.importorskip("minilife.kernels.flash_attention")
    pytest.importorskip("minilife.kernels.cross_entropy")
    pytest.importorskip("minilife.kernels.fused_linear_ce")
    torch.manual_seed(0)
    ref = GPT(_cfg())
    idx, tgt = torch.randint(0, V, (2, 2, T), generator=torch.Generator().manual_seed(5))
    tgt[0, :3] = -100
    _, ref_loss = ref(idx, tgt)
    ref_loss.backward()
    for loss_impl, attn_impl in [("triton", "triton"), ("fused", "sdpa")]:
        m = GPT(_cfg(loss_impl=loss_impl, attn_impl=attn_impl))
        m.load_state_dict(ref.state_dict())
        _, loss = m(idx, tgt)
        loss.backward()
        # float32, different summation orders: ~1e-6 relative on a loss of ~4 and on O(1e-2) gradients
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for (name, a), b in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


class LowRankDelta(nn.Module):
    """A stand-in for LoRA: base(x) + (x A^T) B^T, a low-rank delta the base weight does not hold."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.3)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, dtype=base.weight.dtype) * 0.3)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


def test_wrapped_projections_are_honoured_on_every_path(monkeypatch):
    """Every nn.Linear wrapped: logits, losses and greedy tokens equal those of a plain model whose
    weights hold the merged W + B A (so no path may read a weight behind its module's back)."""
    torch.manual_seed(5)
    plain = GPT(_cfg(tie_embeddings=False)).double().eval()
    wrapped, merged = copy.deepcopy(plain), copy.deepcopy(plain)
    for name, mod in list(wrapped.named_modules()):
        if isinstance(mod, nn.Linear):
            parent, _, attr = name.rpartition(".")
            delta = LowRankDelta(mod)
            setattr(wrapped.get_submodule(parent), attr, delta)
            with torch.no_grad():
                merged.get_submodule(name).weight += delta.B @ delta.A  # (out, r) @ (r, in)
    assert sum(isinstance(m, LowRankDelta) for m in wrapped.modules()) == 2 * 5 + 1  # qkv, proj, w1-3; head
    idx, tgt = torch.randint(0, V, (2, 2, T), generator=torch.Generator().manual_seed(6))
    ref_logits, ref_loss = merged(idx, tgt)
    assert (ref_logits - plain(idx)[0]).abs().max() > 1e-2  # the deltas matter
    wrapped.cfg = replace(wrapped.cfg, loss_impl="fused")
    with pytest.raises(ValueError, match="fused.*LowRankDelta.*loss_impl='torch'"):
        wrapped(idx, tgt)
    _install_fake(monkeypatch, "minilife.kernels.cross_entropy", "cross_entropy",
                  lambda logits, targets, ignore_index=-100, reduction="mean", **_: F.cross_entropy(
                      logits, targets, ignore_index=ignore_index, reduction=reduction))
    for loss_impl in ("torch", "triton"):
        wrapped.cfg = replace(wrapped.cfg, loss_impl=loss_impl)
        logits, loss = wrapped(idx, tgt)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)  # float64, same math regrouped
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    prompt = idx[:, :3]
    assert torch.equal(wrapped.generate(prompt, 5, temperature=0.0).tokens,
                       merged.generate(prompt, 5, temperature=0.0).tokens)


def test_loading_weights_with_the_other_tying_raises(tmp_path):
    tied, untied = GPT(_cfg()), GPT(_cfg(tie_embeddings=False))
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"untied .*tie_embeddings=True.*tie_embeddings=False\)"):
        tied.load_state_dict(untied.state_dict())
    assert all(torch.equal(v, tied.state_dict()[k]) for k, v in before.items())  # nothing was overwritten
    with pytest.raises(RuntimeError, match=r"tied .*tie_embeddings=False.*tie_embeddings=True\)"):
        untied.load_state_dict(tied.state_dict())
    with pytest.raises(RuntimeError, match="untied"):  # a GPT inside another module: keys carry a prefix
        nn.ModuleDict({"lm": GPT(_cfg())}).load_state_dict({f"lm.{k}": v for k, v in untied.state_dict().items()})
    GPT(_cfg()).load_state_dict(tied.state_dict())  # the same layout loads
    GPT(_cfg(tie_embeddings=False)).load_state_dict(untied.state_dict())
    from minilife.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "untied.pt", model=untied, step=0, config={})
    with pytest.raises(CheckpointError, match="untied.pt.*untied"):
        load_checkpoint(path, model=tied)

"""Bottleneck adapters and prefix tuning against float64 formulas written here; the helpers every method
shares (freezing, counting, switching, disabling, target names); prefix masks; generation with a cache."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from minilife.model import GPT, ModelConfig
from minilife.model.layers import apply_rope, rope_cos_sin
from minilife.model.lora import LoRALinear, inject_lora
from minilife.model.peft import (adapter_layers, adapters_disabled, inject_adapters, inject_prefix, linear_sites,
                                 prefix_mask, set_adapter, trainable_parameters)

pytestmark = pytest.mark.usefixtures("one_thread")

C, F_, V, L, H = 64, 192, 512, 2, 2  # the micro preset
BASE_PARAMS = V * C + L * (2 * C + 3 * C * C + C * C + 3 * C * F_) + C  # tied head counted once


def _gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig.preset("micro", **kw)).eval()


def _tokens(b=2, t=12, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize(model, seed=0, std=0.5):
    """Every adapter parameter random (W_up and LoRA's B are zero at init), so every term shows."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        for p in layer.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------
# bottleneck adapters


def test_bottleneck_at_init_is_base_and_matches_float64_formula():
    torch.manual_seed(0)
    model = nn.Module()
    model.proj = nn.Linear(6, 5)
    x = torch.randn(3, 4, 6)
    base = model.proj(x)
    assert inject_adapters(model, ["proj"], bottleneck=3) == ["proj"]
    assert torch.equal(model.proj(x), base)
    _randomize(model)
    ad = model.proj.adapters["default"]
    y = x.double() @ model.proj.base.weight.double().T + model.proj.base.bias.double()
    hidden = y @ ad.down.weight.double().T + ad.down.bias.double()
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected = y + gelu @ ad.up.weight.double().T + ad.up.bias.double()
    torch.testing.assert_close(model.proj(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_bottleneck_default_targets_and_gpt_identity():
    m = _gpt()
    x = _tokens()
    base, _ = m(x)
    names = inject_adapters(m)
    assert names == ["blocks.0.attn.proj", "blocks.1.attn.proj", "blocks.0.ffn.w2", "blocks.1.ffn.w2"]
    assert torch.equal(m(x)[0], base)


# --------------------------------------------------------------------------------------------
# prefix tuning


def test_prefix_mask_conversion():
    P, Tq, Tk = 2, 3, 5
    got = prefix_mask("causal", P, Tq, Tk)
    expected = np.concatenate([np.ones((Tq, P), bool), np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + Tk - Tq], 1)
    assert got.shape == (1, 1, Tq, P + Tk) and np.array_equal(got[0, 0].numpy(), expected)
    assert prefix_mask("full", P, Tk, Tk).all() and prefix_mask("full", P, Tk, Tk).shape == (1, 1, Tk, P + Tk)
    custom = torch.rand(4, 1, Tq, Tk, generator=torch.Generator().manual_seed(0)) < 0.5
    got = prefix_mask(custom, P, Tq, Tk)
    assert got.shape == (4, 1, Tq, P + Tk) and got[..., :P].all() and torch.equal(got[..., P:], custom)
    assert torch.equal(prefix_mask(custom[0, 0], P, Tq, Tk)[0], got[0])  # (Tq, Tk) broadcasts over the batch
    assert prefix_mask("causal", 0, Tq, Tk).shape == (1, 1, Tq, Tk)
    for bad in ("sliding", torch.ones(Tq, Tk)):
        with pytest.raises(ValueError, match="prefix_mask"):
            prefix_mask(bad, P, Tq, Tk)
    with pytest.raises(ValueError, match="Tq=6 <= Tk=5"):
        prefix_mask("causal", P, 6, Tk)


def _attention_reference(attn, x, cos, sin, allowed):
    """float64 attention with the learned prefix keys/values before the sequence's (rotated) keys.
    x: (B, T, C); allowed: bool (B, T, T) over the sequence's keys; every query sees the prefix."""
    prefix = attn.prefix.adapters[attn.prefix.active]
    B, T, _ = x.shape
    D = attn.head_dim
    qkv = x.double() @ attn.qkv.weight.double().T  # (B, T, 3C)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, H, D).transpose(1, 2) for i in range(3))  # (B, H, T, D)
    q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())
    keys = torch.cat([prefix.keys.double().expand(B, -1, -1, -1), k], dim=2)  # (B, H, P + T, D)
    values = torch.cat([prefix.values.double().expand(B, -1, -1, -1), v], dim=2)
    P = prefix.keys.shape[1]
    ok = torch.cat([torch.ones(B, T, P, dtype=torch.bool), allowed], dim=-1)[:, None]  # (B, 1, T, P + T)
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(D)).masked_fill(~ok, float("-inf"))
    y = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.double().T


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("mask", ["causal", "full", "custom"])
def test_prefix_attention_matches_float64_formula(impl, mask):
    m = _gpt(attn_impl=impl)
    inject_prefix(m, 3)
    _randomize(m)
    attn, T = m.blocks[0].attn, 7
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_cos_sin(torch.arange(T), C // H)
    allowed = {"causal": torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T),
               "full": torch.ones(2, T, T, dtype=torch.bool),
               "custom": torch.rand(2, T, T, generator=torch.Generator().manual_seed(3)) < 0.5}[mask]
    spec = allowed[:, None] if mask == "custom" else mask  # (B, 1, T, T), as build_attention_mask gives it
    torch.testing.assert_close(attn(x, cos, sin, spec).double(), _attention_reference(attn, x, cos, sin, allowed),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_prefix_of_length_zero_is_the_base_model(impl):
    m = _gpt(attn_impl=impl)
    x = _tokens()
    pad = torch.ones_like(x, dtype=torch.bool)
    pad[0, :4] = False  # a left-padded row: the tensor-mask path
    base = [m(x)[0], m(x, padding_mask=pad)[0]]
    inject_prefix(m, 0)
    assert m.blocks[0].attn.prefix.adapter_on
    torch.testing.assert_close(m(x)[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x, padding_mask=pad)[0][pad], base[1][pad], rtol=0, atol=1e-6)


def test_prefix_generate_with_cache_equals_without():
    m = _gpt()
    prompts = [[5, 9, 2, 7, 1], [3, 8]]
    plain = m.generate(prompts, 10, temperature=0).tokens
    inject_prefix(m, 4)
    _randomize(m, std=1.0)
    cached = m.generate(prompts, 10, temperature=0, use_cache=True).tokens
    uncached = m.generate(prompts, 10, temperature=0, use_cache=False).tokens
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)  # the prefix does change what the model says
    with adapters_disabled(m):
        assert torch.equal(m.generate(prompts, 10, temperature=0).tokens, plain)


# --------------------------------------------------------------------------------------------
# what every method shares


METHODS = {
    "lora": lambda m: inject_lora(m, ["attn.qkv:q,v", "ffn.*"], rank=2),
    "dora": lambda m: inject_lora(m, ["attn.*", "lm_head"], rank=2, dora=True, dropout=0.1),
    "bottleneck": lambda m: inject_adapters(m, bottleneck=8),
    "prefix": lambda m: inject_prefix(m, 4),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_reach_only_the_methods_own_parameters(method):
    m = _gpt()
    METHODS[method](m)
    m.train()
    x = _tokens(seed=4)
    _, loss = m(x, x)
    loss.backward()
    own = {n for n, _ in m.named_parameters() if ".adapters.default." in n}
    assert own and {n for n, p in m.named_parameters() if p.requires_grad} == own
    assert {n for n, p in m.named_parameters() if p.grad is not None} == own
    assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n in own)


def test_trainable_parameter_counts_match_hand_counts():
    m = _gpt()
    assert trainable_parameters(m) == (BASE_PARAMS, BASE_PARAMS)
    inject_lora(m, ["attn.qkv:q,v"], rank=4)
    lora = L * 2 * (4 * C + C * 4)  # q and v of each layer: A (4, C), B (C, 4)
    inject_adapters(m, bottleneck=16)
    bottleneck = 2 * L * ((C * 16 + 16) + (16 * C + C))  # attn.proj and ffn.w2: down and up, with biases
    inject_prefix(m, 5)
    prefix = L * 2 * H * 5 * (C // H)  # keys and values (H, P, D) per layer
    extra = lora + bottleneck + prefix
    assert trainable_parameters(m) == (extra, BASE_PARAMS + extra)


def test_adapters_disabled_turns_every_method_off_and_restores():
    m = _gpt()
    x = _tokens()
    base, _ = m(x)
    inject_lora(m, ["attn.qkv", "lm_head"], rank=2, dora=True)
    inject_adapters(m)  # wraps attn.proj and ffn.w2
    inject_lora(m, ["attn.proj"], rank=2)  # LoRA inside the bottleneck wrapper: adds to the same name
    inject_prefix(m, 3)
    _randomize(m)
    assert isinstance(m.blocks[0].attn.proj.base, LoRALinear)
    adapted, _ = m(x)
    assert not torch.allclose(adapted, base)
    with adapters_disabled(m):
        assert torch.equal(m(x)[0], base)
    assert torch.equal(m(x)[0], adapted)


def test_set_adapter_switches_methods_by_name():
    m = _gpt()
    x = _tokens()
    base, _ = m(x)
    inject_prefix(m, 3, adapter="p")
    inject_adapters(m, adapter="b")
    _randomize(m)
    with_b, _ = m(x)
    set_adapter(m, "p")  # prefix on, bottlenecks off
    with_p, _ = m(x)
    set_adapter(m, None)
    assert torch.equal(m(x)[0], base)
    set_adapter(m, "b")
    assert torch.equal(m(x)[0], with_b)
    assert not torch.allclose(with_p, with_b) and not torch.allclose(with_p, base)


def test_target_names_are_logical_and_skip_adapter_internals():
    m = _gpt()
    inject_adapters(m, ["blocks.0.attn.proj"])
    inject_lora(m, ["blocks.0.attn.proj"], rank=2)
    sites = linear_sites(m)
    assert sites["blocks.0.attn.proj"] == "blocks.0.attn.proj.base.base"
    assert not any("adapters" in name for name in sites)  # a bottleneck's down/up are no targets
    assert "lm_head" in sites and len(sites) == 2 * 5 + 1


@pytest.mark.parametrize("call, word", [
    (lambda m: inject_adapters(m, ["ffn.w4"]), r"'ffn\.w4' matches no nn\.Linear"),
    (lambda m: inject_adapters(m, bottleneck=0), "bottleneck"),
    (lambda m: inject_prefix(m, -1), "n_prefix"),
    (lambda m: inject_prefix(nn.Linear(2, 2), 2), "no CausalSelfAttention"),
    (lambda m: inject_prefix(m, 2, adapter="not a name"), "identifier"),
])
def test_bad_arguments_raise(call, word):
    with pytest.raises(ValueError, match=word):
        call(_gpt())


def test_reference_model_is_the_frozen_copy_or_the_policy_with_adapters_off():
    from minilife.model.peft import reference_model
    base = _gpt()
    idx = torch.tensor([[5, 9, 2, 7, 1]])
    plain = base(idx)[0]
    policy = copy.deepcopy(base)
    inject_lora(policy, ["attn.*", "ffn.*"], rank=2)
    _randomize(policy, std=1.0)
    assert not torch.allclose(policy(idx)[0], plain)  # the adapters change the policy
    with reference_model(policy) as ref:  # no copy: the policy computing as the base model
        assert ref is policy and torch.equal(ref(idx)[0], plain)
    assert not torch.allclose(policy(idx)[0], plain)  # adapters back on after the block
    frozen = copy.deepcopy(base)
    with reference_model(policy, frozen) as ref:
        assert ref is frozen
    assert not torch.allclose(policy(idx)[0], plain)  # a frozen copy leaves the policy's adapters alone

"""LoRA and DoRA against float64 formulas written here: exact identity at init, fused q/v parts, rsLoRA,
merge/unmerge (bf16 in float32), DoRA's norm gradient, named adapters, disabling, adapter files, errors."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from minilife.checkpoint import CheckpointError
from minilife.model import GPT, ModelConfig
from minilife.model.peft import base_state_dict
from minilife.model.lora import (LoRALinear, adapter_param_groups, adapters_disabled, inject_lora, load_adapter,
                                 merge_lora, save_adapter, set_adapter, trainable_parameters, unmerge_lora)

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["attn.qkv:q,v", "*.proj", "blocks.0.ffn.*", "lm_head"]


def _gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig.preset("micro", **kw)).eval()


def _tokens(b=2, t=12, seed=1):
    return torch.randint(0, 512, (b, t), generator=torch.Generator().manual_seed(seed))


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def _randomize(model, name="default", seed=0, std=0.05):
    """Random A, B (B is zero at init) and magnitudes near their init, so every term of the update shows."""
    g = torch.Generator().manual_seed(seed)
    for layer in _lora_layers(model):
        if name in layer.adapters:
            ad = layer.adapters[name]
            ad.A.copy_(torch.randn(ad.A.shape, generator=g) * std)
            ad.B.copy_(torch.randn(ad.B.shape, generator=g) * std)
            if ad.magnitude is not None:
                ad.magnitude.mul_(1 + 0.3 * torch.rand(ad.magnitude.shape, generator=g))


class _Holder(nn.Module):
    """One fused projection, as a transformer keeps it: ``self.qkv``."""

    def __init__(self, n_in, n_out, bias=True, dtype=torch.float32):
        super().__init__()
        self.qkv = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


def _reference(x, layer, name="default"):
    """float64: x W0^T + b, plus on each adapted slice p the update s x A_p^T B_p^T (LoRA), or the whole
    slice replaced by x W'^T + b with W' = m (W0 + s B A) / ||W0 + s B A|| per row (DoRA)."""
    ad = layer.adapters[name]
    x, W = x.double(), layer.base.weight.double()
    b = layer.base.bias.double() if layer.base.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    out = x @ W.T + b
    S = W.shape[0] // ad.n_slices
    for p, slice_id in enumerate(ad.index.tolist()):
        rows = slice(slice_id * S, (slice_id + 1) * S)
        V = W[rows] + ad.scaling * ad.B[p].double() @ ad.A[p].double()  # (S, in)
        if ad.magnitude is None:
            out[..., rows] = out[..., rows] + ad.scaling * (x @ ad.A[p].double().T) @ ad.B[p].double().T
        else:
            W_new = ad.magnitude[p].double()[:, None] * V / V.norm(dim=1, keepdim=True)
            out[..., rows] = x @ W_new.T + b[rows]
    return out


# --------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dora", [False, True])
def test_zero_B_equals_base_exactly(dora):
    m = _gpt()
    x = _tokens()
    base, _ = m(x)
    names = inject_lora(m, TARGETS, rank=4, dora=dora)
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.proj",
                     "blocks.0.ffn.w1", "blocks.0.ffn.w3", "blocks.0.ffn.w2", "lm_head"]
    assert m.lm_head.base.weight is m.tok_emb.weight  # the tied head stays tied
    assert torch.equal(m(x)[0], base)


@given(n_in=st.integers(1, 9), slice_out=st.integers(1, 5), rank=st.integers(1, 4),
       parts=st.sampled_from([None, ("q",), ("v",), ("q", "v"), ("v", "k"), ("q", "k", "v")]),
       rslora=st.booleans(), dora=st.booleans(), bias=st.booleans())
def test_forward_matches_float64_formula(n_in, slice_out, rank, parts, rslora, dora, bias):
    torch.manual_seed(0)
    model = _Holder(n_in, 3 * slice_out, bias)
    x = torch.randn(2, 3, n_in)
    base = model.qkv(x)
    target = "qkv" if parts is None else "qkv:" + ",".join(parts)
    inject_lora(model, [target], rank=rank, alpha=3.0, rslora=rslora, dora=dora)
    _randomize(model, std=0.5)
    ad = model.qkv.adapters["default"]
    assert ad.scaling == pytest.approx(3.0 / (math.sqrt(rank) if rslora else rank))
    y = model.qkv(x)
    torch.testing.assert_close(y.double(), _reference(x, model.qkv), rtol=1e-5, atol=1e-5)
    for i, part in enumerate("qkv"):  # slices not adapted: exactly the base output
        if parts is not None and part not in parts:
            cols = slice(i * slice_out, (i + 1) * slice_out)
            assert torch.equal(y[..., cols], base[..., cols])


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    model = _Holder(16, 12)
    x = torch.randn(6, 16)
    inject_lora(model, ["qkv"], rank=2, dropout=0.5)
    layer = model.qkv.train()
    assert torch.equal(layer(x), layer.base(x))  # B = 0: dropout never reaches the base path
    _randomize(model, std=0.5)
    ad = layer.adapters["default"]
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the same draw
    expected = x.double() @ layer.base.weight.double().T + layer.base.bias.double() \
        + ad.scaling * dropped.double() @ ad.A[0].double().T @ ad.B[0].double().T
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, layer.eval()(x))


def test_dora_gradients_flow_through_the_exact_norm():
    torch.manual_seed(0)
    model = _Holder(6, 9, bias=False)
    inject_lora(model, ["qkv:q,v"], rank=2, dora=True)
    _randomize(model, std=0.5)
    ad, x, g = model.qkv.adapters["default"], torch.randn(4, 6), torch.randn(4, 9)
    (model.qkv(x) * g).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (ad.A, ad.B, ad.magnitude)]
    A, B, mag = leaves
    W, out = model.qkv.base.weight.double(), []
    for i in range(3):
        rows = W[3 * i:3 * i + 3]
        p = {0: 0, 2: 1}.get(i)
        if p is None:
            out.append(x.double() @ rows.T)
        else:
            V = rows + ad.scaling * B[p] @ A[p]
            out.append(x.double() @ (mag[p][:, None] * V / V.norm(dim=1, keepdim=True)).T)
    (torch.cat(out, dim=-1) * g.double()).sum().backward()
    for param, leaf in zip((ad.A, ad.B, ad.magnitude), leaves):
        torch.testing.assert_close(param.grad.double(), leaf.grad, rtol=1e-4, atol=1e-6)


def test_one_step_changes_only_adapters():
    m = _gpt()
    inject_lora(m, TARGETS, rank=4, dropout=0.1, dora=True)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(adapter_param_groups(m), lr=1e-2)
    x = _tokens(seed=3)
    _, loss = m(x, x)
    loss.backward()
    adapter = {n for n, _ in m.named_parameters() if ".adapters." in n}
    assert {n for n, p in m.named_parameters() if p.grad is not None} == adapter
    assert {n for n, p in m.named_parameters() if p.requires_grad} == adapter
    opt.step()
    for k, v in m.state_dict().items():
        if ".adapters." in k:
            if k.endswith(".B"):
                assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_param_groups_decay_only_matrices_when_asked():
    m = _gpt()
    inject_lora(m, ["attn.qkv"], rank=2, dora=True)
    assert [g["weight_decay"] for g in adapter_param_groups(m)] == [0.0, 0.0]
    decay, no_decay = adapter_param_groups(m, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 3 for p in decay["params"])  # A, B
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 2 for p in no_decay["params"])  # magnitudes (P, S)
    assert len(decay["params"]) == 4 and len(no_decay["params"]) == 2


def test_trainable_parameters_hand_count():
    m = _gpt()
    C, F_, V, L = 64, 192, 512, 2
    total = V * C + L * (2 * C + 3 * C * C + C * C + 3 * C * F_) + C  # tied head counted once
    assert trainable_parameters(m) == (total, total)
    inject_lora(m, ["attn.qkv:q,v", "lm_head"], rank=4, dora=True)
    per_layer = 2 * (4 * C + C * 4) + 2 * C  # q and v: A (4, C), B (C, 4), magnitudes (C,)
    head = 4 * C + V * 4 + V
    assert trainable_parameters(m) == (L * per_layer + head, total + L * per_layer + head)


# --------------------------------------------------------------------------------------------
# merging


@pytest.mark.parametrize("dora", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores(dora):
    m = _gpt()
    x = _tokens()
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    inject_lora(m, TARGETS, rank=4, dora=dora)
    _randomize(m)
    with_head, _ = m(x)
    with pytest.raises(ValueError, match=r"'lm_head' shares its weight: \['tok_emb.weight'"):
        merge_lora(m)  # the tied head: refused before anything is merged
    assert not any(layer.merged for layer in _lora_layers(m))
    m.lm_head.active = None  # the head's adapter off: the rest merges
    adapted, _ = m(x)
    merged = merge_lora(m)
    assert "lm_head" not in merged and len(merged) == 7
    assert merge_lora(m) == []  # merging twice: no-op
    torch.testing.assert_close(m(x)[0], adapted, rtol=1e-5, atol=1e-5)
    assert not torch.equal(m.blocks[0].attn.qkv.base.weight, weights["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="merged"):
        set_adapter(m, "default")
    with pytest.raises(ValueError, match="unmerge_lora"):
        with adapters_disabled(m):
            pass
    plain = _gpt(seed=3)  # the export path: merged weights under plain GPT keys
    plain.load_state_dict(base_state_dict(m))
    assert torch.equal(plain.hidden(x), m.hidden(x))
    assert len(unmerge_lora(m)) == 7 and unmerge_lora(m) == []
    for k, v in m.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, weights[k.replace(".base", "")]), k
    assert torch.equal(m(x)[0], adapted)
    set_adapter(m, "default")
    assert torch.equal(m(x)[0], with_head)


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_merge_is_done_in_float32(dora):
    torch.manual_seed(0)
    model = _Holder(64, 96, bias=False, dtype=torch.bfloat16)
    W0 = model.qkv.weight.detach().clone()
    inject_lora(model, ["qkv:q,v"], rank=8, alpha=16, dora=dora)
    _randomize(model, std=0.05)
    ad = model.qkv.adapters["default"]
    expected = W0.float()
    for p, i in enumerate(ad.index.tolist()):
        V = W0.float()[32 * i:32 * i + 32] + ad.scaling * ad.B[p].float() @ ad.A[p].float()
        expected[32 * i:32 * i + 32] = V if not dora else ad.magnitude[p].float()[:, None] * V / V.norm(dim=1)[:, None]
    merge_lora(model)
    assert torch.equal(model.qkv.base.weight, expected.to(torch.bfloat16))  # one rounding, at the end
    unmerge_lora(model)
    assert torch.equal(model.qkv.base.weight, W0)


# --------------------------------------------------------------------------------------------
# switching and disabling


def test_named_adapters_switch_and_each_matches_its_formula():
    torch.manual_seed(0)
    model = _Holder(8, 12)
    x = torch.randn(5, 8)
    inject_lora(model, ["qkv:q,v"], rank=2, adapter="a")
    inject_lora(model, ["qkv"], rank=3, alpha=4, dora=True, adapter="b")
    _randomize(model, "a", seed=1, std=0.5)
    _randomize(model, "b", seed=2, std=0.5)
    assert model.qkv.active == "b"
    out_b = model.qkv(x)
    torch.testing.assert_close(out_b.double(), _reference(x, model.qkv, "b"), rtol=1e-5, atol=1e-5)
    set_adapter(model, "a")
    out_a = model.qkv(x)
    torch.testing.assert_close(out_a.double(), _reference(x, model.qkv, "a"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_a, out_b)
    set_adapter(model, None)
    assert torch.equal(model.qkv(x), model.qkv.base(x))
    with pytest.raises(ValueError, match="'c'.*\\['a', 'b'\\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        inject_lora(model, ["qkv"], adapter="a")


def test_adapters_disabled_gives_base_and_restores():
    m = _gpt()
    x = _tokens()
    base, _ = m(x)
    inject_lora(m, TARGETS, rank=4, dora=True)
    _randomize(m)
    adapted, _ = m(x)
    with adapters_disabled(m):
        assert torch.equal(m(x)[0], base)
    assert torch.equal(m(x)[0], adapted)
    with pytest.raises(KeyError):
        with adapters_disabled(m):
            raise KeyError("boom")
    assert torch.equal(m(x)[0], adapted)


# --------------------------------------------------------------------------------------------
# adapter files


def test_save_load_round_trip_in_a_fresh_model(tmp_path):
    m = _gpt()
    base_state = copy.deepcopy(m.state_dict())
    inject_lora(m, TARGETS, rank=4, dora=True, adapter="chat")
    _randomize(m, "chat")
    x = _tokens()
    expected, _ = m(x)
    path = save_adapter(m, tmp_path / "chat.pt", name="chat")
    assert {p.name for p in tmp_path.iterdir()} == {"chat.pt"}  # no temp file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["targets"][0] == "blocks.0.attn.qkv" and payload["layers"]["lm_head"]["base_shape"] == [512, 64]
    assert payload["layers"]["blocks.0.attn.qkv"]["parts"] == ["q", "v"]
    assert all(".adapters." not in k and not k.endswith("weight") for t in payload["tensors"].values() for k in t)

    fresh = _gpt(seed=5)
    fresh.load_state_dict(base_state)
    assert load_adapter(fresh, path) == payload["targets"]
    assert torch.equal(fresh(x)[0], expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, _ in fresh.named_parameters() if ".adapters.chat." in n}
    load_adapter(fresh, path, name="again")  # a second copy under another name
    assert torch.equal(fresh(x)[0], expected)


def test_load_errors_name_file_and_layer(tmp_path):
    m = _gpt()
    inject_lora(m, ["attn.qkv:q,v"], rank=2)
    path = save_adapter(m, tmp_path / "a.pt")
    other = _gpt(n_embd=32)
    with pytest.raises(ValueError, match=r"a\.pt.*'blocks\.0\.attn\.qkv'.*\(192, 64\).*\(96, 32\)"):
        load_adapter(other, path)
    assert not _lora_layers(other)  # nothing injected before the check
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_adapter(_gpt(), tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_adapter(_gpt(), broken)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*save_adapter"):
        load_adapter(_gpt(), foreign)
    with pytest.raises(ValueError, match="no LoRA layer has an adapter named 'nope'"):
        save_adapter(m, tmp_path / "b.pt", name="nope")


@pytest.mark.parametrize("targets, word", [
    (["attn.qvk"], r"'attn\.qvk' matches no nn\.Linear.*blocks\.0\.attn\.qkv"),
    (["attn.qkv:q,q"], "distinct part names"),
    (["attn.proj:q"], "no fused layout is known for 'proj'"),
    (["attn.qkv:q,x"], r"must come from its layout \['q', 'k', 'v'\]"),
    (["attn.qkv:q", "attn.qkv:v"], "different parts"),
])
def test_bad_targets_raise_naming_them(targets, word):
    m = _gpt()
    with pytest.raises(ValueError, match=word):
        inject_lora(m, targets)
    assert not _lora_layers(m)


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(adapter="a.b")])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        inject_lora(_gpt(), ["attn.qkv"], **kwargs)

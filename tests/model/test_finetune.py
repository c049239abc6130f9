"""minilife.model.finetune: what trains under each method (hand-counted on the micro model), the trainable
rows of the chat tokens (TokenRows) against float64 formulas, the optimizer groups, and the exported plain
GPT (same logits as the adapted model, loadable by ``load_pretrained``)."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from minilife.align.chat import add_chat_tokens
from minilife.artifacts import load_pretrained
from minilife.checkpoint import save_checkpoint
from minilife.data.bpe_train import train_bpe
from minilife.model.finetune import METHODS, TokenRows, apply_method, export_model, optimizer_groups
from minilife.model.layers import TokenEmbedding
from minilife.model.lora import LoRALinear
from minilife.model.peft import AdapterLayer, adapter_layers, trainable_parameters
from minilife.model.transformer import GPT, ModelConfig
from minilife.optim.adamw import AdamW

pytestmark = pytest.mark.usefixtures("one_thread")

C, F_, L, H = 64, 192, 2, 2  # the micro preset: n_embd, SwiGLU width, layers, heads
K = 4  # chat tokens add_chat_tokens gives a tokenizer that knows <|endoftext|> only


@pytest.fixture(scope="module")
def tok():
    return train_bpe(300, text=["From: Ada to Bob about the launch plan and the budget. Meeting on Monday at "
                                "noon, bring the notes."] * 8)


def chat_gpt(tok, seed=0, tied=True):
    """(micro GPT with the chat tokens added, the chat tokenizer, first new id)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig.preset("micro", vocab_size=tok.vocab_size, tie_embeddings=tied))
    first = model.cfg.vocab_size
    model, chat_tok = add_chat_tokens(model, tok)
    assert model.cfg.vocab_size == first + K and chat_tok.vocab_size == first + K
    return model.eval(), chat_tok, first


def base_count(V, tied=True):
    """Parameters of the micro GPT with vocabulary V, by hand: embedding (+ untied head), per layer two
    RMSNorm gains, qkv (3C x C), proj (C x C), SwiGLU w1, w3 (F x C) and w2 (C x F); the final norm."""
    return V * C * (1 if tied else 2) + L * (2 * C + 3 * C * C + C * C + 3 * C * F_) + C


def method_count(method, rank=2, adapter_size=3, prefix_len=5):
    """Adapter parameters of each method on the micro GPT, by hand (default LoRA targets: qkv, proj, w1, w2, w3)."""
    lora = L * rank * ((C + 3 * C) + (C + C) + 2 * (C + F_) + (F_ + C))  # A (r, in) + B (out, r) per Linear
    return {"lora": lora,
            "dora": lora + L * (3 * C + C + F_ + F_ + C),  # + one magnitude per output row
            "adapter": L * 2 * (C * adapter_size + adapter_size + adapter_size * C + C),  # after proj and w2
            "prefix": L * 2 * H * prefix_len * (C // H)}[method]  # keys and values (H, P, D) per layer


def apply(model, method, first, **kw):
    opts = dict(rank=2, adapter_size=3, prefix_len=5)
    opts.update(kw)
    return apply_method(model, method, first_new_id=first, **opts)


@torch.no_grad()
def randomize(model, seed=0, std=0.05):
    """Random adapter values (LoRA's B and W_up start at zero) and random token rows, so every term shows."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        for name, p in layer.adapters.named_parameters():
            scale = 1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("magnitude") else None
            p.copy_(p * scale if scale is not None else std * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, TokenRows):
            m.rows.copy_(0.1 * torch.randn(m.rows.shape, generator=g))


def ids(V, b=2, t=12, seed=1):
    """(b, t) token ids with every chat token (the last K ids) present."""
    x = torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))
    x[0, :K] = torch.arange(V - K, V)
    return x


def names_trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# what trains


def test_full_trains_every_weight_and_counts_the_tied_matrix_once(tok):
    model, _, first = chat_gpt(tok)
    for p in model.parameters():
        p.requires_grad_(False)  # apply_method("full") must switch every weight back on
    assert apply_method(model, "full", first_new_id=first) == "full fine-tuning"
    assert all(p.requires_grad for p in model.parameters())
    assert trainable_parameters(model) == (base_count(first + K),) * 2
    assert not any(isinstance(m, (TokenRows, AdapterLayer)) for m in model.modules())  # nothing wrapped


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "prefix"])
@pytest.mark.parametrize("tied", [True, False])
def test_peft_trains_its_own_parameters_plus_the_token_rows(tok, method, tied):
    model, _, first = chat_gpt(tok, tied=tied)
    text = apply(model, method, first)
    n_rows = K * C * (1 if tied else 2)  # one (K, C) Parameter shared by embedding and tied head, else two
    assert text.endswith(f" + {n_rows} new-token embedding values")
    trainable, total = trainable_parameters(model)
    assert trainable == method_count(method) + n_rows
    assert total - trainable == base_count(first + K, tied)  # every base weight frozen, none lost
    expected = {n for n, _ in model.named_parameters() if ".adapters." in n} | {"tok_emb.rows"} | \
        (set() if tied else {"lm_head.rows"})
    assert names_trainable(model) == expected
    assert isinstance(model.tok_emb, TokenRows) and isinstance(model.lm_head, TokenRows)
    assert (model.tok_emb.rows is model.lm_head.rows) == tied


def test_lora_description_and_without_first_new_id_no_rows(tok):
    model, _, first = chat_gpt(tok)
    text = apply_method(model, "lora", rank=4, alpha=8.0, rslora=True, targets=["attn.qkv:q,v"])
    assert text == "LORA r=4 alpha=8 (rsLoRA) on attn.qkv:q,v"  # no first_new_id: no rows
    assert trainable_parameters(model)[0] == L * 2 * 4 * (C + C)  # q and v slices: A (4, C), B (C, 4) each
    assert not isinstance(model.tok_emb, TokenRows)
    with pytest.raises(ValueError, match="method must be one of"):
        apply_method(chat_gpt(tok)[0], "qlora")
    assert METHODS == ("full", "lora", "dora", "adapter", "prefix")


# --------------------------------------------------------------------------------------------
# TokenRows


@pytest.mark.parametrize("tied", [True, False])
def test_token_rows_embed_new_ids_from_rows_and_old_ids_from_the_frozen_matrix(tok, tied):
    model, _, first = chat_gpt(tok, tied=tied)
    base_emb, base_head = model.tok_emb, model.lm_head
    x = ids(first + K)
    want_old = base_emb(x)  # (B, T, C) the plain embedding before wrapping
    apply(model, "lora", first)
    randomize(model)
    rows = model.tok_emb.rows
    assert model.tok_emb.base is base_emb and model.tok_emb.first == first
    got = model.tok_emb(x)  # (B, T, C)
    new = x >= first
    assert torch.equal(got[~new], want_old[~new])  # old ids: bit-identical to the base
    assert torch.equal(got[new], rows[x[new] - first])  # new ids: their trainable row
    assert not torch.equal(got[new], want_old[new])  # (the rows really differ from the matrix's)

    h = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(3))
    logits = model.lm_head(h)  # (B, T, V + K)
    assert logits.shape == (2, 5, first + K)
    assert torch.equal(logits[..., :first], base_head(h)[..., :first])  # old logits: the frozen head's
    head_rows = model.lm_head.rows
    torch.testing.assert_close(logits[..., first:].double(), h.double() @ head_rows.double().T, rtol=1e-6, atol=1e-6)
    assert (head_rows is rows) == tied  # tied: one Parameter serves both


def test_token_rows_keep_the_clear_error_for_ids_outside_the_vocabulary(tok):
    model, _, first = chat_gpt(tok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, first + K]]))  # the plain model's error
    apply(model, "lora", first)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, first + K]]))


def test_untied_head_rows_start_from_the_head_matrix(tok):
    model, _, first = chat_gpt(tok, tied=False)
    head_w, emb_w = model.lm_head.weight.detach().clone(), model.tok_emb.weight.detach().clone()
    apply(model, "adapter", first)
    assert torch.equal(model.lm_head.rows, head_w[first:]) and torch.equal(model.tok_emb.rows, emb_w[first:])
    assert not torch.equal(head_w[first:], emb_w[first:])


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_a_training_step_changes_only_the_adapters_and_the_new_rows(tok, method):
    model, _, first = chat_gpt(tok)
    apply(model, method, first)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = ids(first + K, t=16)
    old_emb = model.tok_emb(x[:, :-1])[x[:, :-1] < first].detach().clone()
    opt = AdamW(optimizer_groups(model, weight_decay=0.1), lr=1e-2, betas=(0.9, 0.95))
    _, loss = model(x[:, :-1], x[:, 1:])  # targets include the new ids: their head rows get a gradient
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # the whole (V + K, C) matrix included
    assert "tok_emb.base.weight" in frozen
    assert not torch.equal(after["tok_emb.rows"], trained["tok_emb.rows"])
    changed = {n for n, v in trained.items() if not torch.equal(after[n], v)}
    assert any(".adapters." in n for n in changed)  # the method's own parameters moved too
    assert torch.equal(model.tok_emb(x[:, :-1])[x[:, :-1] < first], old_emb)  # old tokens embed as before


# --------------------------------------------------------------------------------------------
# optimizer groups


def group_ids(groups):
    return [id(p) for g in groups for p in g["params"]]


@pytest.mark.parametrize("method", ["full", "lora", "dora", "adapter", "prefix"])
@pytest.mark.parametrize("tied", [True, False])
def test_optimizer_groups_hold_exactly_the_trainable_tensors_once(tok, method, tied):
    model, _, first = chat_gpt(tok, tied=tied)
    apply(model, method, first)
    groups = optimizer_groups(model, weight_decay=0.1)
    got = group_ids(groups)
    assert len(got) == len(set(got))  # each tensor once
    assert set(got) == {id(p) for p in model.parameters() if p.requires_grad}
    if method != "full":
        rows = {id(m.rows) for m in model.modules() if isinstance(m, TokenRows)}
        assert len(rows) == (1 if tied else 2)
        for g in groups:  # the token rows are never decayed, whatever weight_decay says
            if rows & {id(p) for p in g["params"]}:
                assert g["weight_decay"] == 0.0


def test_full_groups_are_the_gpt_own_split(tok):
    model, _, first = chat_gpt(tok)
    apply(model, "full", first)
    groups = optimizer_groups(model, 0.1)
    want = model.param_groups(0.1)
    assert [(g["weight_decay"], [id(p) for p in g["params"]]) for g in groups] == \
        [(g["weight_decay"], [id(p) for p in g["params"]]) for g in want]
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert id(model.tok_emb.weight) not in decayed and id(model.blocks[0].attn.qkv.weight) in decayed


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "prefix"])
def test_adapters_are_not_decayed_unless_asked(tok, method):
    model, _, first = chat_gpt(tok)
    apply(model, method, first)
    never = {id(p) for n, p in model.named_parameters() if p.requires_grad and
             (n.endswith(("magnitude", "bias")) or n.endswith("rows"))}  # DoRA magnitudes, biases, token rows
    assert all(g["weight_decay"] == 0.0 for g in optimizer_groups(model))  # default: nothing decays
    decayed = {id(p) for g in optimizer_groups(model, 0.1) if g["weight_decay"] == 0.1 for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decayed == trainable - never and decayed  # asked: every adapter matrix decays, nothing else


# --------------------------------------------------------------------------------------------
# export


def plain_modules_only(model):
    """A plain GPT: no PEFT wrapper anywhere; the embedding and every Linear are the ordinary modules."""
    assert type(model) is GPT
    assert type(model.tok_emb) is TokenEmbedding and type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, (TokenRows, AdapterLayer)) for m in model.modules())
    assert all(block.attn.prefix is None for block in model.blocks)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("tied", [True, False])
def test_export_merges_lora_and_writes_the_rows_back(tok, method, tied, tmp_path):
    model, chat_tok, first = chat_gpt(tok, tied=tied)
    apply(model, method, first)
    randomize(model)
    x = ids(first + K)
    with torch.no_grad():
        want, _ = model(x)  # (B, T, V + K) the adapted model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = export_model(model)
    assert plain is not model
    plain_modules_only(plain)
    assert (plain.lm_head.weight is plain.tok_emb.weight) == tied
    with torch.no_grad():
        got, _ = plain(x)
    scale = float(want.abs().max())  # logits up to ~10: fp32 rounding of merged sums ~1e-6 relative
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert torch.equal(plain.tok_emb.weight[first:], model.tok_emb.rows)  # rows written back
    assert torch.equal(plain.lm_head.weight[first:], model.lm_head.rows)
    assert model.state_dict().keys() == before.keys()  # the adapted model is left as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.tok_emb, TokenRows) and any(True for _ in adapter_layers(model))

    path = save_checkpoint(tmp_path / "model.pt", model=plain, step=1, config={"model": dataclasses.asdict(plain.cfg)},
                           extra={"tokenizer_state": chat_tok.state()})
    loaded, loaded_tok = load_pretrained(path)
    assert loaded_tok.special_tokens == chat_tok.special_tokens
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], got)


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_export_is_none_when_adapters_add_computation(tok, method):
    model, _, first = chat_gpt(tok)
    apply(model, method, first)
    assert export_model(model) is None
    assert isinstance(model.tok_emb, TokenRows)  # untouched


def test_export_of_full_fine_tuning_is_the_model_itself(tok):
    model, _, first = chat_gpt(tok)
    apply(model, "full", first)
    assert export_model(model) is model


def test_export_with_rows_only_gives_a_plain_gpt(tok):
    """Token rows without any adapter (``train_token_rows`` alone) export too: the wrappers come off, the
    rows go into the matrix, the logits stay (the new logits were one separate matmul: fp32 rounding)."""
    model, _, first = chat_gpt(tok)
    from minilife.model.finetune import train_token_rows
    assert train_token_rows(model, first) == K * C
    randomize(model)
    x = ids(first + K)
    with torch.no_grad():
        want, _ = model(x)
        plain = export_model(model)
        plain_modules_only(plain)
        got = plain(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got[..., :first], want[..., :first])  # the old logits: the same arithmetic
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())

"""GPT with attn_impl="triton" computes what attn_impl="math" computes (logits, loss, every gradient).

Without CUDA the Triton kernels run on CPU under TRITON_INTERPRET=1, set before anything imports
triton (triton 3.9 fixes interpreted vs compiled per process at ``import triton``); on a CUDA machine
the model runs on the GPU with the compiled kernels. A counter on the kernels' autograd Function
proves the Triton path ran, rather than the model's SDPA fallback or the pure-torch fallback.
"""
import os

import torch  # does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402

import minilife.kernels as mk  # noqa: E402

transformer = pytest.importorskip("minilife.model.transformer", reason="model package not present")
flash = pytest.importorskip("minilife.kernels.flash_attention")
DEVICE = "cpu" if mk.interpreting() else ("cuda" if torch.cuda.is_available() else None)


@pytest.mark.skipif(DEVICE is None or not mk.triton_available(),
                    reason="Triton cannot run here: no CUDA and TRITON_INTERPRET is not set (or no triton)")
@pytest.mark.parametrize("attn_mask", ["causal", "full"])
def test_gpt_triton_attention_matches_math(monkeypatch, attn_mask):
    calls = []
    real_apply = flash._FlashAttentionTriton.apply
    monkeypatch.setattr(flash._FlashAttentionTriton, "apply", lambda *a: calls.append(1) or real_apply(*a))

    cfg = transformer.ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_head=2, n_embd=32,
                                  attn_impl="math")  # head_dim 16
    torch.manual_seed(0)
    ref_model = transformer.GPT(cfg).to(DEVICE)
    model = transformer.GPT(transformer.ModelConfig(**{**cfg.__dict__, "attn_impl": "triton"})).to(DEVICE)
    model.load_state_dict(ref_model.state_dict())

    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 19), generator=gen).to(DEVICE)  # T=19: a ragged last tile
    targets = torch.randint(0, cfg.vocab_size, (2, 19), generator=gen).to(DEVICE)
    ref_logits, ref_loss = ref_model(idx, targets, attn_mask=attn_mask)
    logits, loss = model(idx, targets, attn_mask=attn_mask)
    ref_loss.backward()
    loss.backward()

    assert len(calls) == cfg.n_layer  # one Triton attention per layer, no fallback
    # both paths are fp32 with different summation orders (flash: tiles + online softmax), through
    # 2 blocks of attention + SwiGLU + RMSNorm: measured 1.5e-7 relative (logits), 2e-8 (grads);
    # 2e-6 ~ 16 fp32 ulps leaves >10x margin, while any masking/scale slip shows up at >= 1e-3
    tol = 2e-6
    assert (logits - ref_logits).abs().max() <= tol * max(1.0, ref_logits.abs().max().item())
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        g, ref_g = p.grad, ref_params[name].grad
        assert (g - ref_g).abs().max() <= tol * max(1.0, ref_g.abs().max().item()), name

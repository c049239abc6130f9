"""RMSNorm, RoPE, SwiGLU and the token embedding against float64 formulas written here."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.model.layers import (RMSNorm, RotaryEmbedding, SwiGLU, TokenEmbedding, apply_rope,
                                   default_ffn_hidden, rope_cos_sin)


def test_rmsnorm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16, dtype=torch.float64))
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 3
    xn = x.numpy()
    expected = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5) * norm.weight.detach().numpy()
    np.testing.assert_allclose(norm(x).detach().numpy(), expected, rtol=1e-12)  # float64 both sides
    # bf16 input: computed in float32 then cast, so it is within one bf16 rounding (2^-8 relative) of the
    # float64 answer; a bf16 mean of squares over large values would be visibly worse
    xb = (x * 100).to(torch.bfloat16)
    out = RMSNorm(16)(xb)
    assert out.dtype == torch.bfloat16
    ref = xb.double() / xb.double().pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -7, atol=1e-6)


def test_gradcheck_rmsnorm_rope_swiglu():
    torch.manual_seed(0)
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = norm.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, g: torch.func.functional_call(norm, {"weight": g}, (t,)), (x, w))
    cos, sin = rope_cos_sin(torch.tensor([0, 3, 7]), 6, dtype=torch.float64)
    q = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (q,))
    ffn = SwiGLU(6, 10).double()
    assert torch.autograd.gradcheck(lambda t: ffn(t), (x,))


def _rope_complex(x, positions, theta):
    """Independent RoPE: channel pairs as complex numbers times exp(i * pos * theta^(-2k/D)). x: (T, D)."""
    d = x.shape[-1]
    z = x[:, 0::2] + 1j * x[:, 1::2]  # (T, D/2)
    freqs = theta ** (-np.arange(0, d, 2) / d)  # (D/2,)
    z = z * np.exp(1j * np.outer(positions, freqs))
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


def test_rope_matches_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8))
    pos = np.array([0, 1, 17, 255, 4000])
    cos, sin = rope_cos_sin(torch.from_numpy(pos), 8, theta=500.0, dtype=torch.float64)
    got = apply_rope(torch.from_numpy(x).view(1, 1, 5, 8), cos, sin)[0, 0].numpy()
    np.testing.assert_allclose(got, _rope_complex(x, pos, 500.0), rtol=1e-12, atol=1e-12)  # float64 both


@given(m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(-5000, 5000), seed=st.integers(0, 99))
def test_rope_dot_product_depends_only_on_offset(m, n, shift, seed):
    if min(m, n) + shift < 0:
        shift = -min(m, n)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g, dtype=torch.float64)  # each (B=1, H=1, T=1, D=16)

    def rot(x, p):
        cos, sin = rope_cos_sin(torch.tensor([p]), 16, dtype=torch.float64)
        return apply_rope(x, cos, sin).flatten()

    a = torch.dot(rot(q, m), rot(k, n))
    b = torch.dot(rot(q, m + shift), rot(k, n + shift))
    # angles formed in float64: |pos * freq| <= 1e4 rad, error ~1e4 * 2^-52 ~ 2e-12 per angle
    assert abs(a.item() - b.item()) <= 1e-9 * (1 + abs(a.item()))
    if m == n:  # same position: rotation preserves the dot product
        assert a.item() == pytest.approx(torch.dot(q.flatten(), k.flatten()).item(), rel=1e-9, abs=1e-9)


def test_rotary_table_matches_rope_cos_sin_per_row():
    rope = RotaryEmbedding(8, max_positions=16)
    pos = torch.tensor([[0, 5, 15], [3, 4, 9]])  # per-row positions
    cos, sin = rope(pos)
    ref_cos, ref_sin = rope_cos_sin(pos, 8)
    assert cos.shape == (2, 3, 4)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
    cos, _ = rope(slice(3, 7))  # contiguous positions: a view of the table
    torch.testing.assert_close(cos, rope_cos_sin(torch.arange(3, 7), 8)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 4)


def test_swiglu_formula_and_default_width():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 12).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    a, b = x @ ffn.w1.weight.T, x @ ffn.w3.weight.T
    expected = (a / (1 + torch.exp(-a)) * b) @ ffn.w2.weight.T  # silu(a) = a * sigmoid(a)
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-14)
    assert default_ffn_hidden(128) == 352  # 8/3 * 128 = 341.3 -> next multiple of 32
    assert default_ffn_hidden(768) == 2048  # exactly 8/3 * 768


def test_token_embedding_rejects_out_of_range_ids():
    emb = TokenEmbedding(10, 4)
    assert emb(torch.tensor([[0, 9]])).shape == (1, 2, 4)
    with pytest.raises(ValueError, match=r"token id 10 .*vocab_size=10"):
        emb(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="outside"):
        emb(torch.tensor([[-1]]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([[1.0]]))

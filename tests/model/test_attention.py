"""Attention paths (math, sdpa) against a float64 formula written here, masks (padding too), gradcheck, KV cache."""
import numpy as np
import pytest
import torch

from minilife.model.attention import (CausalSelfAttention, KVCache, attend, attention_math,
                                      build_attention_mask, causal_mask)
from minilife.model.layers import rope_cos_sin

B, H, T, D = 2, 3, 7, 8


def _naive(q, k, v, allowed):
    """float64 numpy: softmax over allowed keys of q.k / sqrt(D), then the weighted sum of v.
    q, k, v: (B, H, T, D); allowed: (B, T, T) bool."""
    q, k, v = (x.double().numpy() for x in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = np.flatnonzero(allowed[b, i])
                s = np.array([q[b, h, i] @ k[b, h, j] for j in keys]) / np.sqrt(q.shape[-1])
                w = np.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, keys]
    return out


def _masks(t):
    tri = np.tril(np.ones((t, t), dtype=bool))
    prefix = np.array([3, 0])  # row 0: prefix of 3 tokens; row 1: plain causal
    allowed_prefix = np.stack([tri | (np.arange(t)[None, :] < p) for p in prefix])
    rng = np.random.default_rng(0)
    custom = rng.random((B, t, t)) < 0.4
    custom[:, np.arange(t), np.arange(t)] = True  # every query sees at least itself
    real = np.ones((B, t), dtype=bool)
    real[0, :2], real[1, -3:] = False, False  # row 0 left-padded, row 1 right-padded
    return {
        # padded keys are never seen; a padded query sees every key (its output is don't-care, not NaN)
        "padded": (dict(padding_mask=torch.from_numpy(real)), (tri & real[:, None, :]) | ~real[:, :, None]),
        "causal": (dict(attn_mask="causal"), np.broadcast_to(tri, (B, t, t))),
        "full": (dict(attn_mask="full"), np.ones((B, t, t), dtype=bool)),
        "prefix": (dict(prefix_lengths=torch.tensor(prefix)), allowed_prefix),
        "custom": (dict(attn_mask=torch.from_numpy(custom)), custom),
    }


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("kind", ["causal", "full", "prefix", "custom", "padded"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_paths_match_float64_formula(impl, kind, dtype, tol):
    # tol: float64 differs only by summation order (~1e-15); float32 by ~T * 2^-24 relative on O(1) outputs
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, B, H, T, D, generator=g, dtype=dtype)
    kwargs, allowed = _masks(T)[kind]
    mask = build_attention_mask(kwargs.get("attn_mask"), kwargs.get("prefix_lengths"), B, T, "cpu",
                                kwargs.get("padding_mask"))
    out = attend(q, k, v, mask, impl)
    np.testing.assert_allclose(out.double().numpy(), _naive(q, k, v, allowed), rtol=tol, atol=tol)


def test_gradcheck_attention_math():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = causal_mask(4, 4) | torch.tensor([True, True, False, False])  # a prefix of 2
    assert torch.autograd.gradcheck(lambda a, b, c: attention_math(a, b, c, mask), (q, k, v))


def test_module_math_and_sdpa_agree_and_prefix_sees_ahead():
    torch.manual_seed(0)
    math_attn = CausalSelfAttention(16, 2, "math").double()
    sdpa_attn = CausalSelfAttention(16, 2, "sdpa").double()
    sdpa_attn.load_state_dict(math_attn.state_dict())
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(6), 8, dtype=torch.float64)
    for mask in ["causal", "full", build_attention_mask(None, torch.tensor([4, 1]), 2, 6, "cpu")]:
        torch.testing.assert_close(math_attn(x, cos, sin, mask), sdpa_attn(x, cos, sin, mask), rtol=1e-12, atol=1e-12)
    # prefix of 4: position 0 changes when token 3 (inside the prefix) changes, not when token 4 changes
    mask = build_attention_mask(None, torch.tensor([4, 4]), 2, 6, "cpu")
    base = math_attn(x, cos, sin, mask)
    x3, x4 = x.clone(), x.clone()
    x3[:, 3] += 1.0
    x4[:, 4] += 1.0
    assert (math_attn(x3, cos, sin, mask)[:, 0] - base[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(math_attn(x4, cos, sin, mask)[:, :4], base[:, :4], rtol=0, atol=1e-14)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_kv_cache_chunks_equal_full_pass(impl):
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, impl).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(9), 8, dtype=torch.float64)
    full = attn(x, cos, sin, "causal")
    cache = KVCache(2, 2, 12, 8, dtype=torch.float64)
    pieces = [attn(x[:, a:b], cos[a:b], sin[a:b], "causal", cache) for a, b in [(0, 4), (4, 5), (5, 9)]]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-12, atol=1e-12)  # float64, same math
    with pytest.raises(ValueError, match="overflow"):
        cache.append(torch.zeros(2, 2, 4, 8, dtype=torch.float64), torch.zeros(2, 2, 4, 8, dtype=torch.float64))


@pytest.mark.parametrize("attn_mask, prefix, word", [
    ("bidirectional", None, "attn_mask must be"),
    (torch.ones(2, 5, 5), None, "bool entries"),
    (torch.ones(2, 4, 4, dtype=torch.bool), None, r"shape \(2, 5, 5\)"),
    (torch.eye(5, dtype=torch.bool).expand(2, 5, 5).clone().index_fill_(1, torch.tensor([2]), False),
     None, "query 2"),
    (None, torch.tensor([1, 6]), r"\[0, 5\]"),
    ("full", torch.tensor([1, 2]), "prefix_lengths"),
    (None, torch.tensor([1.0, 2.0]), "integer"),
])
def test_bad_masks_raise_clearly(attn_mask, prefix, word):
    with pytest.raises(ValueError, match=word):
        build_attention_mask(attn_mask, prefix, 2, 5, "cpu")


@pytest.mark.parametrize("impl", ["math", "sdpa"])  # triton hands dropout to sdpa
def test_attention_probability_dropout_is_applied_and_unbiased(impl):
    """Dropout on the attention probabilities (inverted: kept entries scaled by 1/(1-p)): in training each
    draw differs from the no-dropout output, in eval it is off, and the mean of many draws converges to
    the no-dropout output. Float64; 4000 draws of p=0.5 leave a standard error of ~0.016 x the typical
    |p_ij v_j| sum, so 0.05 bounds the mean's error with margin."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    plain = attend(q, k, v, "causal", impl, dropout_p=0.0, training=True)
    assert torch.equal(attend(q, k, v, "causal", impl, dropout_p=0.5, training=False), plain)  # eval: off
    many = [x.expand(4000, -1, -1, -1) for x in (q, k, v)]  # 4000 rows: independent dropout masks
    draws = attend(*many, "causal", impl, dropout_p=0.5, training=True)  # (4000, H, T, D)
    assert (draws[0] - plain[0]).abs().max() > 1e-3  # a single draw really drops probabilities
    assert (draws.mean(0) - plain[0]).abs().max() < 0.05

"""Padded batches: a padded row computes what the same row computes alone (every attn_impl that takes
masks), default positions count real tokens, the KV cache keeps the padding, and generate decodes a
batch of prompts of different lengths exactly as it decodes each prompt alone, stopping each at eos."""
import pytest
import torch
from hypothesis import given, strategies as st

from minilife.model import GPT, KVCache, ModelConfig
from minilife.model.attention import build_attention_mask

V, T = 61, 16


def _gpt(dtype, scale, seed, **kw):
    """A small GPT with its weight matrices scaled (sharper attention and logits, so a pad that leaks
    into attention or a wrong position changes the outputs and the greedy tokens)."""
    torch.manual_seed(seed)
    m = GPT(ModelConfig(**({"vocab_size": V, "context_length": T, "n_layer": 2, "n_head": 2, "n_embd": 16} | kw)))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return m.to(dtype).eval()


@pytest.fixture(scope="module")
def models32():
    base = _gpt(torch.float32, 3.0, 0)
    out = {}
    for impl in ("math", "sdpa", "triton"):  # triton: tensor masks fall back to sdpa
        out[impl] = _gpt(torch.float32, 1.0, 0, attn_impl=impl)
        out[impl].load_state_dict(base.state_dict())
    return out


@pytest.fixture(scope="module")
def sharp64():
    return _gpt(torch.float64, 6.0, 2, tie_embeddings=False)


def _pad_batch(rows, width, left, gen):
    """rows: lists of ids -> idx (B, width) with random garbage ids at the pads, mask (B, width) bool."""
    idx = torch.randint(0, V, (len(rows), width), generator=gen)  # garbage everywhere, real ids written over it
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (row, on_left) in enumerate(zip(rows, left)):
        cols = slice(width - len(row), width) if on_left else slice(0, len(row))
        idx[b, cols], mask[b, cols] = torch.tensor(row), True
    return idx, mask


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), extra=st.integers(0, 4),
       left=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 10_000),
       impl=st.sampled_from(["math", "sdpa", "triton"]), attn_mask=st.sampled_from(["causal", "full"]))
def test_padded_row_equals_row_alone(models32, lengths, extra, left, seed, impl, attn_mask):
    model, g = models32[impl], torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
    idx, mask = _pad_batch(rows + [[]], max(lengths) + extra, left, g)  # plus a row that is all padding
    logits, _ = model(idx, padding_mask=mask, attn_mask=attn_mask)  # (B + 1, W, V)
    assert torch.isfinite(logits).all()  # fully padded query rows (and the empty row) give no NaN
    for b, row in enumerate(rows):
        alone, _ = model(torch.tensor([row]), attn_mask=attn_mask)  # (1, n, V)
        # fp32: the padded pass adds exact zeros (softmax weight 0) but sums in another order; logits
        # are O(1), measured differences <= 4e-7 (320 cases), so 2e-5 is 50x margin; a leaked pad changes them by >1e-2
        torch.testing.assert_close(logits[b][mask[b]], alone[0], rtol=0, atol=2e-5)


def test_default_positions_count_real_tokens():
    model = _gpt(torch.float32, 1.0, 0)
    seen = []
    hook = model.rope.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    model(torch.zeros(3, 5, dtype=torch.long), padding_mask=mask)
    hook.remove()
    expected = [[0, 1, 2], [0, 1, 2], [0, 1, 2]]  # the real tokens of each row, counted from 0
    positions = seen[0].expand(3, 5)  # (B, T) (a (T,) tensor if the mask were ignored)
    assert [positions[b][mask[b]].tolist() for b in range(3)] == expected


def test_per_row_positions_are_used_per_row(sharp64):
    idx = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3)).expand(2, 6)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 2, 4, 6, 8, 10]])
    out = sharp64.hidden(idx, positions=pos)  # (2, 6, C)
    for b in range(2):
        torch.testing.assert_close(out[b], sharp64.hidden(idx[b:b + 1], positions=pos[b:b + 1])[0],
                                   rtol=1e-10, atol=1e-10)  # float64, same math
    assert (out[0, 2:] - out[1, 2:]).abs().max() > 1e-2  # different positions, different outputs
    with pytest.raises(ValueError, match=r"positions must lie in \[0, context_length=16\)"):
        sharp64.hidden(idx, positions=pos + 6)


def test_padding_combines_with_prefix_lengths(sharp64):
    # right padding keeps the columns of the real tokens, so the prefix lengths mean the same thing
    idx, mask = _pad_batch([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12]], 9, [False, False], torch.Generator())
    out, _ = sharp64(idx, padding_mask=mask, prefix_lengths=torch.tensor([3, 4]))
    for b, p in enumerate([3, 4]):
        n = int(mask[b].sum())
        alone, _ = sharp64(idx[b:b + 1, :n], prefix_lengths=torch.tensor([p]))
        torch.testing.assert_close(out[b, :n], alone[0], rtol=1e-10, atol=1e-10)  # float64


def test_cached_hidden_with_padding_equals_full_pass(sharp64):
    idx, mask = _pad_batch([[3] * 6 + [9, 14, 2, 5, 7, 1], list(range(1, 17))], T, [True, True],
                           torch.Generator().manual_seed(5))
    full = sharp64.hidden(idx, padding_mask=mask)  # row 0: 4 pads on the left
    caches = [KVCache(2, 2, T, 8, dtype=torch.float64) for _ in sharp64.blocks]
    pieces = [sharp64.hidden(idx[:, a:b], padding_mask=mask[:, :b], caches=caches)
              for a, b in [(0, 3), (3, 6), (6, 7), (7, T)]]
    torch.testing.assert_close(torch.cat(pieces, 1)[mask], full[mask], rtol=1e-10, atol=1e-10)  # float64


@pytest.mark.parametrize("kwargs, word", [
    (dict(padding_mask=torch.ones(2, 4, dtype=torch.bool)), r"padding_mask must be a tensor of shape \(2, 5\)"),
    (dict(padding_mask=torch.ones(2, 5)), "bool entries"),
    (dict(padding_mask=torch.ones(2, 6, dtype=torch.bool), past=1, attn_mask="full"), "causal attention only"),
])
def test_bad_padding_masks_raise_clearly(kwargs, word):
    with pytest.raises(ValueError, match=word):
        build_attention_mask(kwargs.pop("attn_mask", None), None, 2, 5, "cpu", **kwargs)


PROMPTS = [[5], [1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11]]


@pytest.mark.parametrize("new_tokens", [6, T + 2])  # T + 2: past the context window (sliding)
def test_padded_batch_generates_what_each_prompt_generates_alone(sharp64, new_tokens):
    alone = [sharp64.generate([p], new_tokens, temperature=0.0).tokens[0] for p in PROMPTS]
    assert len({tuple(a[-new_tokens:].tolist()) for a in alone}) == len(PROMPTS)  # the rows really differ
    for use_cache in (True, False):
        out = sharp64.generate(PROMPTS, new_tokens, temperature=0.0, use_cache=use_cache, pad_id=60)
        assert out.tokens.shape == (4, 6 + new_tokens)
        for b, p in enumerate(PROMPTS):
            assert torch.equal(out.tokens[b][out.padding_mask[b]], alone[b])
            assert out.tokens[b][out.prompt_mask[b]].tolist() == p
            assert out.completion_mask[b].tolist() == [False] * 6 + [True] * new_tokens
    # the same batch as a left-padded tensor with a padding mask (other pad ids) gives the same tokens
    idx, mask = _pad_batch(PROMPTS, 6, [True] * 4, torch.Generator().manual_seed(1))
    again = sharp64.generate(idx, new_tokens, temperature=0.0, padding_mask=mask)
    assert torch.equal(again.tokens[:, 6:], out.tokens[:, 6:]) and torch.equal(again.prompt_mask, out.prompt_mask)
    sample = [sharp64.generate(PROMPTS, new_tokens, temperature=0.8, top_k=20, use_cache=c,
                               generator=torch.Generator().manual_seed(7)).tokens for c in (True, False)]
    assert torch.equal(*sample)


@pytest.mark.parametrize("as_list", [False, True])
def test_rows_stop_at_eos_and_are_masked_after(sharp64, as_list):
    free = sharp64.generate(PROMPTS, 8, temperature=0.0).tokens[:, 6:]  # (4, 8), no stop id
    # one stop id: rows 0 and 1 stop, the others run on; three: every row stops, so decoding ends early
    stops = [int(free[1, 2]), int(free[2, 1]), int(free[3, 1])] if as_list else int(free[1, 2])
    out = sharp64.generate(PROMPTS, 8, temperature=0.0, eos_id=stops, pad_id=60)
    stop_set = set(stops) if as_list else {stops}
    firsts = [next((i for i, t in enumerate(row) if t in stop_set), None) for row in free.tolist()]
    assert (None in firsts) != as_list
    n = out.tokens.shape[1] - 6
    assert n == (8 if None in firsts else max(firsts) + 1)  # decoding ends once every row has stopped
    for b, k in enumerate(firsts):
        kept = n if k is None else k + 1  # the stop id itself counts, what follows does not
        assert out.tokens[b, 6:6 + kept].tolist() == free[b, :kept].tolist()
        assert out.completion_mask[b, 6:].tolist() == [True] * kept + [False] * (n - kept)
        assert (out.tokens[b, 6 + kept:] == 60).all()


def test_generate_input_checks(sharp64):
    with pytest.raises(ValueError, match="left-padded"):
        sharp64.generate(torch.tensor([[1, 2, 0]]), 2, padding_mask=torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match="left-padded"):
        sharp64.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="padding_mask goes with a"):
        sharp64.generate([[1, 2]], 2, padding_mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_k"):
        sharp64.generate([[1, 2]], 2, top_k=0)

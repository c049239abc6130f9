"""SFT batches against a float64 reference computed here, one conversation at a time with no padding:
the same summed loss for right/left padding, batch 1 vs N, any accumulation split and packing; packed
logits equal each conversation's logits alone; JSONL errors name file:line; truncation counts."""
import functools
import json

import pytest
import torch
from hypothesis import given, strategies as st

from minilife.align.chat import add_chat_tokens, render_chat
from minilife.align.sft import (SFTBatch, SFTExample, collate, encode_conversation, encode_dataset,
                                pack_batch, pad_batch, read_chat_jsonl, sft_loss_sum, split_step, write_chat_jsonl)
from minilife.data.bpe_train import train_bpe
from minilife.model import GPT, ModelConfig

IGNORE = -100  # minilife.train.IGNORE_INDEX, written out
CORPUS = ["Hello there, how are you? I am fine, thank you. Refunds take five days.",
          "The policy says a refund is due within 30 days. Please send the receipt."] * 3
MAX_LEN = 65  # the micro GPT's context (64) + the last label
PAD = 0  # a real token id: padding must be masked, not merely "an unused id"


@functools.lru_cache(maxsize=None)
def _setup():
    """(chat tokenizer, micro GPT with the chat tokens). Weights scaled x3 so attention is sharp and a
    token leaking across conversations or a wrong position changes the logits visibly."""
    torch.manual_seed(0)
    base = train_bpe(300, text=CORPUS, special_tokens=("<|endoftext|>", "<|mask|>"))
    model, tok = add_chat_tokens(GPT(ModelConfig.preset("micro", vocab_size=base.vocab_size)), base)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return tok, model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _conv(n_pairs, words, system=False):
    """A conversation of n_pairs user/assistant exchanges with about ``words`` words each."""
    text = lambda k, i: " ".join(["refund", "days", "Hello", "policy", "you"][(j + i) % 5] for j in range(k))  # noqa
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(n_pairs):
        msgs += [{"role": "user", "content": text(words, i) + "?"},
                 {"role": "assistant", "content": text(words + 1, i)}]
    return msgs


def _reference_sum(model, example):
    """float64 sum of -log p(x_t | x_<t) over trained t >= 1, the conversation alone, no padding."""
    ids, mask = example.ids, example.loss_mask
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])  # (1, T-1, V): causal, positions 0.., nothing else in the row
    logp = torch.log_softmax(logits[0].double(), -1)
    return sum(-logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]), int(mask[1:].sum())


def _examples(shapes):
    tok, _ = _setup()
    return [encode_conversation(tok, _conv(n, w, s), MAX_LEN) for n, w, s in shapes]


_shapes = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 6), st.booleans()), min_size=1, max_size=4)


@given(_shapes, st.sampled_from(["right", "left"]))
def test_padded_batch_loss_equals_the_per_conversation_reference(shapes, side):
    _, model = _setup()
    examples = [e for e in _examples(shapes) if e.n_trained]
    if not examples:
        return
    refs = [_reference_sum(model, e) for e in examples]
    with torch.no_grad():
        loss_sum, n = sft_loss_sum(model, pad_batch(examples, PAD, side))
        singles = [sft_loss_sum(model, pad_batch([e], PAD, side)) for e in examples]
    assert n == sum(k for _, k in refs) == sum(k for _, k in singles)
    # float32 forward, sums of <= 4 * 64 terms of size ~10: well inside 1e-3 absolute
    assert abs(loss_sum.item() - sum(r for r, _ in refs)) < 1e-3
    assert abs(sum(s.item() for s, _ in singles) - loss_sum.item()) < 1e-3  # batch 1 vs N


@given(_shapes, st.integers(1, 4), st.sampled_from([None, MAX_LEN]))
def test_any_accumulation_split_gives_the_big_batch_mean(shapes, micro_size, pack_len):
    _, model = _setup()
    examples = [e for e in _examples(shapes) if e.n_trained]
    if not examples:
        return
    refs = [_reference_sum(model, e) for e in examples]
    ref_mean = sum(r for r, _ in refs) / sum(k for _, k in refs)
    micro, n_step = split_step(examples, micro_size, PAD, pack_len=pack_len)
    assert len(micro) == -(-len(examples) // micro_size) and n_step == sum(k for _, k in refs)
    with torch.no_grad():
        step_loss = sum(sft_loss_sum(model, mb)[0] / n_step for mb in micro)
        big_sum, big_n = sft_loss_sum(model, collate(examples, PAD, pack_len=pack_len))
    assert abs(step_loss.item() - ref_mean) < 1e-5 and abs(step_loss.item() - big_sum.item() / big_n) < 1e-5


def test_accumulated_gradient_equals_the_big_batch_gradient():
    tok, model = _setup()
    examples = _examples([(1, 0, False), (3, 5, True), (2, 2, False)])  # ragged: 3 very different sizes
    grads = []
    for micro_size in (3, 1, 2):
        model.zero_grad()
        micro, n_step = split_step(examples, micro_size, PAD)
        for mb in micro:
            (sft_loss_sum(model, mb)[0] / n_step).backward()
        grads.append(model.tok_emb.weight.grad.clone())
    model.zero_grad()
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)


def test_packed_logits_equal_each_conversation_alone():
    _, model = _setup()
    examples = _examples([(1, 3, True), (1, 1, False), (2, 2, False), (1, 0, False)])
    batch = pack_batch(examples, MAX_LEN, PAD)
    assert batch.input_ids.shape[0] < len(examples)  # really packed: some row holds several
    with torch.no_grad():
        packed, _ = model(batch.input_ids, padding_mask=batch.padding_mask, positions=batch.positions,
                          attn_mask=batch.attn_mask)  # (B, T, V)
    seen = 0
    for row in range(batch.input_ids.shape[0]):
        starts = (batch.positions[row] == 0) & batch.padding_mask[row]  # each conversation starts at 0
        bounds = starts.nonzero().flatten().tolist() + [int(batch.padding_mask[row].sum())]
        for a, b in zip(bounds, bounds[1:]):
            ex = next(e for e in examples if torch.equal(e.ids[:-1], batch.input_ids[row, a:b]))
            with torch.no_grad():
                alone, _ = model(ex.ids[None, :-1])
            torch.testing.assert_close(packed[row, a:b], alone[0], rtol=0, atol=1e-4)
            assert torch.equal(batch.positions[row, a:b], torch.arange(b - a))
            labels = torch.where(ex.loss_mask[1:], ex.ids[1:], IGNORE)  # this conversation's own labels only
            assert torch.equal(batch.labels[row, a:b], labels)
            seen += 1
        pad = ~batch.padding_mask[row]
        assert (batch.labels[row, pad] == IGNORE).all() and not batch.padding_mask[row, bounds[-1]:].any()
    assert seen == len(examples)
    ref = sum(_reference_sum(model, e)[0] for e in examples)
    with torch.no_grad():
        assert abs(sft_loss_sum(model, batch)[0].item() - ref) < 1e-3


def test_pack_batch_mask_is_block_diagonal_causal():
    tok, _ = _setup()
    a, b = (encode_conversation(tok, _conv(1, w), MAX_LEN) for w in (0, 1))
    batch = pack_batch([a, b], MAX_LEN, PAD)
    la, lb = len(a.ids) - 1, len(b.ids) - 1
    T = batch.input_ids.shape[1]
    assert T == la + lb
    expected = torch.zeros(T, T, dtype=torch.bool)
    first = la if la >= lb else lb  # packed longest first
    for lo, hi in ((0, first), (first, la + lb)):
        for i in range(lo, hi):
            expected[i, lo:i + 1] = True
    assert torch.equal(batch.attn_mask[0], expected)
    with pytest.raises(ValueError, match="max_len"):
        pack_batch([encode_conversation(tok, _conv(3, 6), 200)], MAX_LEN, PAD)


def test_zero_trained_tokens_is_an_error_not_a_silent_zero():
    tok, model = _setup()
    ex = encode_conversation(tok, _conv(1, 2), MAX_LEN)
    untrained = SFTExample(ex.ids, torch.zeros_like(ex.loss_mask))
    for make in (lambda: pad_batch([untrained], PAD), lambda: pack_batch([untrained], MAX_LEN, PAD)):
        with pytest.raises(ValueError, match="no trained token"):
            make()
    inputs = ex.ids[None, :-1]  # (1, T-1)
    empty = SFTBatch(inputs, torch.full_like(inputs, IGNORE), torch.ones_like(inputs, dtype=torch.bool))
    with pytest.raises(ValueError, match="no trained token"):
        sft_loss_sum(model, empty)


@given(st.integers(2, 60))
def test_truncation_keeps_the_head_counts_and_drops_untrained(max_len):
    tok, _ = _setup()
    convs = [_conv(1, 1), _conv(2, 4, True), _conv(1, 8), _conv(3, 2)]
    full = [render_chat(tok, m) for m in convs]
    examples, counts = (None, None)
    n_keep = sum(any(r.loss_mask[1:max_len]) for r in full)
    if n_keep == 0:
        with pytest.raises(ValueError, match="max_len"):
            encode_dataset(tok, convs, max_len)
        return
    examples, counts = encode_dataset(tok, convs, max_len)
    assert counts["kept"] == len(examples) == n_keep and counts["dropped"] == len(convs) - n_keep
    assert counts["truncated"] == sum(len(r.ids) > max_len for r in full if any(r.loss_mask[1:max_len]))
    kept = [(m, r) for m, r in zip(convs, full) if any(r.loss_mask[1:max_len])]
    for e, (m, r) in zip(examples, kept):
        assert e.messages is m and e.n_trained > 0 and len(e.ids) == min(max_len, len(r.ids))
        assert e.truncated == (len(r.ids) > max_len)
        assert e.ids.tolist() == r.ids[:max_len] and e.loss_mask.tolist() == r.loss_mask[:max_len]


def test_truncated_exactly_when_tokens_were_cut():
    tok, _ = _setup()
    n = len(render_chat(tok, _conv(1, 1)).ids)
    assert not encode_conversation(tok, _conv(1, 1), n).truncated
    assert encode_conversation(tok, _conv(1, 1), n - 1).truncated
    with pytest.raises(ValueError, match="max_len"):
        encode_conversation(tok, _conv(1, 1), 1)


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD_LINES = {
    "not JSON": ("{oops", "not valid JSON"),
    "not UTF-8": (b'{"messages": "\xff"}'.decode("latin-1"), "not UTF-8"),
    "no messages": (json.dumps({"msgs": []}), '"messages"'),
    "unknown role": (json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
                     "unknown role 'bot' (allowed: system, user, assistant)"),
    "non-string content": (json.dumps({"messages": [{"role": "user", "content": ["x"]},
                                                    {"role": "assistant", "content": "a"}]}), "must be a string"),
    "no assistant": (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    "out of order": (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                                              {"role": "assistant", "content": "a"}]}), "roles out of order"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_read_chat_jsonl_names_file_and_line(tmp_path, kind):
    line, needle = BAD_LINES[kind]
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n\n" + line + "\n").encode("latin-1"))  # the bad line is line 3
    with pytest.raises(ValueError) as err:
        read_chat_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ") and needle in str(err.value)


def test_skip_bad_counts_and_empty_files_are_errors(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD)] + [line for line, _ in BAD_LINES.values()] + [json.dumps(GOOD)]
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    convs, n_bad = read_chat_jsonl(path, skip_bad=True)
    assert len(convs) == 2 and n_bad == len(BAD_LINES) and convs[0] == GOOD["messages"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no conversations"):
        read_chat_jsonl(empty)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{oops\n")
    with pytest.raises(ValueError, match="no conversations"):
        read_chat_jsonl(only_bad, skip_bad=True)


def test_write_then_read_round_trips(tmp_path):
    convs = [_conv(1, 2, True), _conv(2, 1)]
    write_chat_jsonl(tmp_path / "out.jsonl", convs)
    assert read_chat_jsonl(tmp_path / "out.jsonl") == (convs, 0)
    with pytest.raises(ValueError, match="conversation 0"):
        write_chat_jsonl(tmp_path / "bad.jsonl", [[{"role": "assistant", "content": "a"}]])



"""minilife.align.rollout against references written here, on a micro chat GPT:
- tokens: sampled rollouts equal a hand-rolled per-row loop (one forward over the whole unpadded sequence
  each step, no cache, softmax(logits / temperature), torch.multinomial on an equally seeded generator);
  greedy rollouts equal the per-row argmax loop at any batch size; the KV cache on or off gives the same
  tokens at temperature 1 with the same seed;
- scoring: ``rollout_logprobs`` equals, row by row, a float64 log_softmax(logits / temperature) of the row
  without its padding, gathered at the sampled tokens, exactly 0 off the response; the entropy equals
  -sum p log p of the same distribution;
- layout: right-padded [prompt][answer][pad], the response mask exactly the answer with its stop token,
  ``ended`` iff the last answer token is <|end|>, long prompts cut from the left so prompt + answer fit
  the context, k samples per prompt in adjacent rows, ``select`` consistent, bad arguments named."""
import pytest
import torch

from minilife.align.chat import chat_token_ids, render_prompt
from minilife.align.rollout import Rollout, rollout_logprobs, sample_rollouts

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 12


@pytest.fixture(scope="module")
def chat(micro_chat):
    """(micro GPT with the chat tokens, chat tokenizer): tests/align/conftest.py's ``micro_chat`` with the LM
    head scaled 8x, so sampled distributions are peaked (mean entropy ~2.5 nats, not the ~5.7 of uniform)
    and sampled answers stop at <|end|> at varied lengths, or run to the cap."""
    return micro_chat(head_scale=8.0)


@pytest.fixture(scope="module")
def conversations():
    """Different lengths, not sorted: multi-turn (an <|end|> inside the prompt), short ones, and one longer
    than context_length - MAX_NEW (it must be cut from the left)."""
    return [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the plan?"},
         {"role": "assistant", "content": "Launch on Monday."}, {"role": "user", "content": "When?"}],
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "Bob " * 10}],
        [{"role": "user", "content": "the launch plan " * 12}],
        [{"role": "user", "content": "Monday noon"}],
    ]


def kept_prompt(model, tok, messages, max_new):
    """The prompt a rollout keeps: the last context_length - max_new tokens of the serving prompt."""
    return render_prompt(tok, messages)[-(model.cfg.context_length - max_new):]


def per_row_loop(model, tok, messages, max_new, temperature, generator=None):
    """The reference sampler for ONE conversation: no batch, no padding, no cache. Each step runs a forward
    over the whole sequence so far, takes the last position's logits, and picks argmax (temperature 0) or
    torch.multinomial(softmax(logits / temperature)); stops after <|end|> (kept) or max_new tokens.
    Returns (prompt ids, answer ids)."""
    end = chat_token_ids(tok).end
    prompt = kept_prompt(model, tok, messages, max_new)
    seq, answer = list(prompt), []
    while len(answer) < max_new:
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]))  # (1, t, V)
        last = logits[0, -1].float()  # (V,)
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator))
        answer.append(nxt)
        seq.append(nxt)
        if nxt == end:
            break
    return prompt, answer


def rows_of(rollout: Rollout) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each row, read back through the masks."""
    out = []
    for r in range(rollout.tokens.shape[0]):
        real = rollout.tokens[r][rollout.padding_mask[r]].tolist()
        answer = rollout.tokens[r][rollout.response_mask[r]].tolist()
        out.append((real[:len(real) - len(answer)], answer))
    return out


def test_the_fixture_exercises_every_branch(chat, conversations):
    """Greedy and sampled answers both stop at <|end|> at varied lengths and also run to the cap, and the
    long prompt really is longer than the room it gets: the comparisons below cover every branch."""
    model, tok = chat
    T = model.cfg.context_length
    assert len(render_prompt(tok, conversations[3])) > T - MAX_NEW
    greedy = [per_row_loop(model, tok, c, MAX_NEW, 0.0)[1] for c in conversations]
    g = torch.Generator().manual_seed(0)
    sampled = [per_row_loop(model, tok, c, MAX_NEW, 1.0, g)[1] for c in conversations for _ in range(3)]
    end = chat_token_ids(tok).end
    for answers in (greedy, sampled):
        lengths = [len(a) for a in answers]
        assert any(a[-1] == end for a in answers) and any(a[-1] != end for a in answers), lengths
        assert len({n for n, a in zip(lengths, answers) if a[-1] == end}) >= 2, lengths  # varied stop points
        assert MAX_NEW in lengths


@pytest.mark.parametrize("batch_size", [1, 2, None])
def test_greedy_rollouts_equal_the_per_row_greedy_loop(chat, conversations, batch_size):
    model, tok = chat
    want = [per_row_loop(model, tok, c, MAX_NEW, 0.0) for c in conversations]
    got = sample_rollouts(model, tok, conversations, MAX_NEW, temperature=0.0, batch_size=batch_size)
    assert rows_of(got) == want
    assert len({tuple(a) for _, a in want}) == len(want)  # distinct answers: a row mix-up would show


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_rollouts_equal_the_per_row_sampling_loop_with_the_same_seed(chat, conversations, temperature):
    """One row at a time (batch_size=1), so a shared generator is consumed in the same order by both."""
    model, tok = chat
    g = torch.Generator().manual_seed(123)
    want = [per_row_loop(model, tok, c, MAX_NEW, temperature, g) for c in conversations for _ in range(2)]
    got = sample_rollouts(model, tok, conversations, MAX_NEW, samples_per_prompt=2, temperature=temperature,
                          generator=torch.Generator().manual_seed(123), batch_size=1)
    assert rows_of(got) == want


def test_the_kv_cache_does_not_change_sampled_tokens_in_a_padded_batch(chat, conversations):
    model, tok = chat
    kw = dict(samples_per_prompt=3, temperature=1.0)
    cached = sample_rollouts(model, tok, conversations, MAX_NEW, generator=torch.Generator().manual_seed(7), **kw)
    plain = sample_rollouts(model, tok, conversations, MAX_NEW, generator=torch.Generator().manual_seed(7),
                            use_cache=False, **kw)
    assert torch.equal(cached.tokens, plain.tokens) and cached.texts == plain.texts
    assert torch.equal(cached.response_mask, plain.response_mask) and torch.equal(cached.ended, plain.ended)
    other = sample_rollouts(model, tok, conversations, MAX_NEW, generator=torch.Generator().manual_seed(8), **kw)
    assert other.texts != cached.texts  # the seed matters: the equality above is not vacuous


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_rollout_logprobs_and_entropy_equal_a_float64_per_row_reference(chat, conversations, temperature):
    model, tok = chat
    ro = sample_rollouts(model, tok, conversations, MAX_NEW, samples_per_prompt=2, temperature=temperature,
                         generator=torch.Generator().manual_seed(3))
    logprobs, entropy = rollout_logprobs(model, ro, temperature=temperature, with_entropy=True)
    assert logprobs.shape == entropy.shape == ro.tokens.shape and logprobs.requires_grad
    for r in range(ro.tokens.shape[0]):
        ids = ro.tokens[r][ro.padding_mask[r]]  # (n,): the row without its padding
        with torch.no_grad():
            logits, _ = model(ids[None])  # (1, n, V)
        logp = torch.log_softmax(logits[0].double() / temperature, -1)  # (n, V)
        positions = ro.response_mask[r].nonzero().flatten()  # where the sampled tokens sit
        want = logp[positions - 1].gather(-1, ro.tokens[r, positions, None]).squeeze(-1)  # (n_resp,)
        want_h = -(logp[positions - 1].exp() * logp[positions - 1]).sum(-1)  # (n_resp,)
        torch.testing.assert_close(logprobs[r, positions].detach().double(), want, rtol=0, atol=2e-4)
        torch.testing.assert_close(entropy[r, positions].detach().double(), want_h, rtol=0, atol=2e-4)
    off = ~ro.response_mask
    assert (logprobs[off] == 0).all() and (entropy[off] == 0).all()  # exactly 0, not merely small


def test_scoring_at_another_temperature_gives_other_logprobs(chat, conversations):
    """The temperature really enters the score (the rollout was drawn at 0.7)."""
    model, tok = chat
    ro = sample_rollouts(model, tok, conversations, MAX_NEW, temperature=0.7,
                         generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        at_07 = rollout_logprobs(model, ro, temperature=0.7)
        at_1 = rollout_logprobs(model, ro, temperature=1.0)
    assert (at_07 - at_1)[ro.response_mask].abs().max() > 0.1


def test_layout_right_padded_prompt_then_answer(chat, conversations):
    model, tok = chat
    T, end = model.cfg.context_length, chat_token_ids(tok).end
    ro = sample_rollouts(model, tok, conversations, MAX_NEW, samples_per_prompt=3,
                         generator=torch.Generator().manual_seed(0))
    B, W = ro.tokens.shape
    assert B == 3 * len(conversations) and ro.prompt_index.tolist() == [i for i in range(5) for _ in range(3)]
    lengths = ro.padding_mask.sum(-1)  # (B,)
    assert W == int(lengths.max()) and bool((lengths <= T).all())
    columns = torch.arange(W)
    assert torch.equal(ro.padding_mask, columns < lengths[:, None])  # right padding: real tokens first
    assert not (ro.response_mask & ~ro.padding_mask).any()
    assert torch.equal(ro.response_lengths, ro.response_mask.sum(-1)) and bool((ro.response_lengths >= 1).all())
    for r, (prompt, answer) in enumerate(rows_of(ro)):
        conversation = conversations[int(ro.prompt_index[r])]
        assert prompt == kept_prompt(model, tok, conversation, MAX_NEW)
        start = len(prompt)
        assert torch.equal(ro.response_mask[r], (columns >= start) & (columns < start + len(answer)))  # contiguous
        assert end not in answer[:-1] and len(answer) <= MAX_NEW
        assert bool(ro.ended[r]) == (answer[-1] == end)
        assert ro.texts[r] == tok.decode(answer[:-1] if answer[-1] == end else answer)
        assert "<|end|>" not in ro.texts[r]
    assert ro.ended.any() and not ro.ended.all()
    assert bool((ro.response_lengths[~ro.ended] == MAX_NEW).all())  # unended = cut at max_new_tokens


def test_ended_is_the_stop_token_not_the_length(chat, conversations):
    """An answer whose <|end|> is its max_new_tokens-th token ended; one token less of room and it did not."""
    model, tok = chat
    end = chat_token_ids(tok).end
    c, n = next((c, len(a)) for c in conversations for _, a in [per_row_loop(model, tok, c, MAX_NEW, 0.0)]
                if a[-1] == end and len(a) > 1)
    exact = sample_rollouts(model, tok, [c], n, temperature=0.0)
    assert exact.ended.tolist() == [True] and exact.response_lengths.tolist() == [n]
    short = sample_rollouts(model, tok, [c], n - 1, temperature=0.0)
    assert short.ended.tolist() == [False] and short.response_lengths.tolist() == [n - 1]
    assert short.texts[0] == exact.texts[0]  # the same text: only the stop token was missing


def test_a_long_prompt_is_cut_from_the_left_and_the_row_fits_the_context(chat):
    model, tok = chat
    T = model.cfg.context_length
    long = [{"role": "user", "content": "the launch plan and the budget " * 20}]
    full = render_prompt(tok, long)
    assert len(full) > T
    for max_new in (1, 20, T - 1):
        ro = sample_rollouts(model, tok, [long], max_new, temperature=0.0)
        (prompt, answer), = rows_of(ro)
        assert prompt == full[-(T - max_new):]  # the head is dropped, the assistant marker kept last
        assert len(prompt) + len(answer) <= T and ro.tokens.shape[1] <= T
        assert prompt[-1] == chat_token_ids(tok).assistant
    ro = sample_rollouts(model, tok, [long], 20, temperature=0.0)
    with torch.no_grad():
        assert rollout_logprobs(model, ro).shape == ro.tokens.shape  # scored in one pass within the context


def test_samples_of_a_prompt_are_adjacent_rows_and_differ(chat, conversations):
    model, tok = chat
    k = 4
    ro = sample_rollouts(model, tok, conversations, MAX_NEW, samples_per_prompt=k,
                         generator=torch.Generator().manual_seed(1), batch_size=3)  # groups straddle batches
    assert ro.prompt_index.tolist() == torch.arange(len(conversations)).repeat_interleave(k).tolist()
    rows = rows_of(ro)
    for i, c in enumerate(conversations):
        group = rows[i * k:(i + 1) * k]
        assert all(p == kept_prompt(model, tok, c, MAX_NEW) for p, _ in group)
    assert sum(len({tuple(a) for _, a in rows[i * k:(i + 1) * k]}) > 1 for i in range(len(conversations))) >= 3


def test_select_keeps_the_rows_consistent(chat, conversations):
    model, tok = chat
    ro = sample_rollouts(model, tok, conversations, MAX_NEW, samples_per_prompt=2,
                         generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([7, 0, 3, 3])
    sub = ro.select(rows)
    for name in ("tokens", "padding_mask", "response_mask", "ended", "prompt_index"):
        assert torch.equal(getattr(sub, name), getattr(ro, name)[rows]), name
    assert sub.texts == [ro.texts[i] for i in rows.tolist()]
    with torch.no_grad():
        torch.testing.assert_close(rollout_logprobs(model, sub), rollout_logprobs(model, ro)[rows], rtol=0, atol=1e-5)
    moved = ro.to("cpu")
    assert torch.equal(moved.tokens, ro.tokens) and moved.texts == ro.texts


def test_the_models_mode_is_restored(chat, conversations):
    model, tok = chat
    model.train()
    try:
        sample_rollouts(model, tok, conversations[:2], 3, generator=torch.Generator().manual_seed(0))
        assert model.training
    finally:
        model.eval()
    sample_rollouts(model, tok, conversations[:2], 3, generator=torch.Generator().manual_seed(0))
    assert not model.training


def test_bad_arguments_raise_naming_the_argument(chat, conversations):
    model, tok = chat
    T = model.cfg.context_length
    cases = [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=T), "max_new_tokens"),
             (dict(samples_per_prompt=0), "samples_per_prompt"), (dict(temperature=-0.5), "temperature"),
             (dict(temperature=float("nan")), "temperature"), (dict(batch_size=0), "batch_size"),
             (dict(batch_size=-2), "batch_size"), (dict(conversations=[]), "conversation")]
    for change, name in cases:
        kw = {"conversations": conversations, "max_new_tokens": MAX_NEW, **change}
        with pytest.raises(ValueError, match=name) as e:
            sample_rollouts(model, tok, kw.pop("conversations"), kw.pop("max_new_tokens"), **kw)
        other = {"max_new_tokens", "samples_per_prompt", "temperature", "batch_size"} - {name}
        assert not any(o in str(e.value) for o in other), (name, str(e.value))  # this argument, not a list
    with pytest.raises(ValueError, match="must end with a user turn"):
        sample_rollouts(model, tok, [conversations[0][:3]], MAX_NEW)
    ro = sample_rollouts(model, tok, conversations[:1], 2, generator=torch.Generator().manual_seed(0))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            rollout_logprobs(model, ro, temperature=bad)

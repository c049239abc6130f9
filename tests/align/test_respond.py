"""minilife.align.respond: batched greedy answers equal a hand-rolled loop (render_prompt, then argmax one
token at a time over the whole sequence, no cache, stop at <|end|>), in input order, for any batch size;
answers never hold the stop token; prompts at the end of the context get a shorter answer, not an error."""
import pytest
import torch

from minilife.align.chat import chat_token_ids, render_prompt
from minilife.align.respond import respond, score_answers
from minilife.data.shadowing import make_shadowing_set, score_responses
from minilife.model.finetune import apply_method, export_model

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 12


@pytest.fixture(scope="module")
def chat(micro_chat):
    """(micro GPT with the chat tokens, chat tokenizer): tests/align/conftest.py's ``micro_chat``."""
    return micro_chat()


def content_of_length(tok, n_tokens):
    """A user turn whose serving prompt is exactly ``n_tokens`` long ("#" has no merge: one token each)."""
    messages = [{"role": "user", "content": "#" * (n_tokens - len(render_prompt(tok, [{"role": "user", "content": "#"}])) + 1)}]
    assert len(render_prompt(tok, messages)) == n_tokens
    return messages


def reference(model, tok, messages, max_new):
    """The hand-rolled greedy loop: the prompt's last T - 1 tokens, then argmax of a full forward over the
    whole sequence (no cache) until <|end|>, max_new tokens, or the context is full. Returns token ids."""
    T, end = model.cfg.context_length, chat_token_ids(tok).end
    seq, out = render_prompt(tok, messages)[-(T - 1):], []
    while len(out) < max_new and len(seq) < T:
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]))  # (1, t, V)
        nxt = int(logits[0, -1].argmax())
        if nxt == end:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


@pytest.fixture(scope="module")
def conversations(chat):
    """Conversations of different lengths, deliberately not sorted by length: multi-turn (with <|end|>
    inside the prompt), short ones, one 3 tokens short of the context end, one longer than the context."""
    _, tok = chat
    return [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the plan?"},
         {"role": "assistant", "content": "Launch on Monday."}, {"role": "user", "content": "When?"}],
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "Bob " * 10}],
        [{"role": "user", "content": "Monday noon"}],
        [{"role": "user", "content": "About the budget"}],
    ]


@pytest.fixture(scope="module")
def near_end(chat):
    model, tok = chat
    T = model.cfg.context_length
    return [content_of_length(tok, T - 3), [{"role": "user", "content": "the launch plan " * 40}]]


def test_reference_is_a_meaningful_oracle(chat, conversations, near_end):
    """The fixture model stops some answers at <|end|>, lets others run to the cap, and the two long
    prompts have 3 and 1 token(s) of room: every branch of respond is exercised below."""
    model, tok = chat
    T = model.cfg.context_length
    lengths = [len(reference(model, tok, c, MAX_NEW)) for c in conversations]
    assert MAX_NEW in lengths and any(0 < n < MAX_NEW for n in lengths), lengths
    assert len(render_prompt(tok, near_end[0])) == T - 3 and len(render_prompt(tok, near_end[1])) > T
    assert [len(reference(model, tok, c, MAX_NEW)) for c in near_end] == [3, 1]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_answers_equal_the_hand_rolled_greedy_loop_in_input_order(chat, conversations, batch_size):
    model, tok = chat
    want = [tok.decode(reference(model, tok, c, MAX_NEW)) for c in conversations]
    assert len(set(want)) == len(want)  # distinct answers: a mix-up of the order would show
    got = respond(model, tok, conversations, MAX_NEW, batch_size=batch_size)
    assert got == want
    assert all("<|end|>" not in a for a in got)


def test_prompts_at_the_end_of_the_context_get_a_shorter_answer(chat, near_end):
    model, tok = chat
    want = [tok.decode(reference(model, tok, c, MAX_NEW)) for c in near_end]
    assert respond(model, tok, near_end, MAX_NEW, batch_size=1) == want  # 3 and 1 tokens (the oracle test)
    assert all(want)


def test_a_long_prompt_does_not_cut_the_answers_it_is_batched_with(chat, conversations, near_end):
    model, tok = chat
    mixed = conversations + near_end
    want = [tok.decode(reference(model, tok, c, MAX_NEW)) for c in mixed]
    assert respond(model, tok, mixed, MAX_NEW, batch_size=1) == want
    assert respond(model, tok, mixed, MAX_NEW, batch_size=len(mixed)) == want  # one batch: same answers


def test_stop_token_is_dropped_and_max_new_tokens_caps(chat, conversations):
    model, tok = chat
    end = chat_token_ids(tok).end
    for c in conversations:
        ids = reference(model, tok, c, MAX_NEW)
        short = respond(model, tok, [c], 2)[0]
        assert short == tok.decode(ids[:2])
        assert end not in tok.encode(respond(model, tok, [c], MAX_NEW)[0], allowed_special="all")


def test_an_adapted_model_answers_like_its_export(chat, conversations):
    """Generation through the PEFT wrappers (LoRA + trainable token rows, KV cache on) matches the exported
    plain GPT: the serving path sees the adapters."""
    model, tok = chat
    import copy
    adapted = copy.deepcopy(model)
    first = model.cfg.vocab_size - 4
    apply_method(adapted, "lora", rank=2, first_new_id=first)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if n.endswith(".B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    plain = export_model(adapted)
    got = respond(adapted, tok, conversations, MAX_NEW, batch_size=2)
    assert got == respond(plain, tok, conversations, MAX_NEW, batch_size=2)
    assert got != respond(model, tok, conversations, MAX_NEW, batch_size=2)  # the adapters changed something


def test_bad_arguments_raise(chat, conversations):
    model, tok = chat
    with pytest.raises(ValueError, match="batch_size >= 1"):
        respond(model, tok, conversations, MAX_NEW, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        respond(model, tok, conversations, 0)
    with pytest.raises(ValueError, match="must end with a user turn"):
        respond(model, tok, [conversations[0][:3]], MAX_NEW)
    assert respond(model, tok, [], MAX_NEW) == []


def test_score_answers_scores_respond_on_the_prompts_without_their_gold_answer(chat):
    model, tok = chat
    examples = make_shadowing_set(seed=0, n_train=0, n_val=0, n_test=7)["test"]
    scores, answers = score_answers(model, tok, examples, 4, batch_size=3)
    assert answers == respond(model, tok, [e.messages[:-1] for e in examples], 4)  # the gold turn is not shown
    assert scores == score_responses(examples, answers) and scores["n"] == 7

"""The template linter: each production bug is planted in a rendering built here and caught with its
position; clean renderings give no finding. The mask viewer: marks exactly the trained tokens, names
special tokens, escapes HTML."""
import functools
import html
import re

import pytest
from hypothesis import given, strategies as st

from minilife.align.chat import ChatTemplate, add_chat_tokens, render_chat, render_prompt
from minilife.align.template_lint import lint_conversation, lint_rendering, looks_like_system_prompt, show_mask
from minilife.data.bpe_train import train_bpe
from minilife.model import GPT, ModelConfig

CORPUS = ["Hello there, how are you? I am fine, thank you. Refunds take five days.",
          "You are a helpful assistant. Answer in one sentence."] * 3
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund?"},
        {"role": "assistant", "content": "Five days."}, {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."}]


@functools.lru_cache(maxsize=None)
def _tok():
    base = train_bpe(300, text=CORPUS, special_tokens=("<|endoftext|>", "<|mask|>"))
    return add_chat_tokens(GPT(ModelConfig.preset("micro", vocab_size=base.vocab_size)), base)[1]


@pytest.fixture
def tok():
    return _tok()


def _sp(tok, name):
    return tok.special_tokens[name]


_text = st.text(alphabet="ab <|>end\nHi.!", max_size=10)


@given(st.booleans(), st.lists(st.tuples(_text, _text), min_size=1, max_size=3))
def test_clean_renderings_give_no_finding(system, pairs):
    tok = _tok()
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": "Q: " + q}, {"role": "assistant", "content": a}]
    ids, mask = render_chat(tok, msgs)
    last_prompt = render_prompt(tok, msgs[:-1])
    assert lint_rendering(tok, ids, mask, serve_ids=last_prompt) == []
    assert lint_rendering(tok, ids, mask, messages=msgs) == []
    assert lint_conversation(msgs) == []


def test_missing_assistant_start_marker(tok):
    ids, mask = render_chat(tok, MSGS, ChatTemplate(assistant=""))
    first = mask.index(True)
    findings = lint_rendering(tok, ids, mask)
    assert any(f.startswith(f"missing assistant-start marker: trained span at positions {first}-") for f in findings)
    assert not any("trained tokens on non-assistant text" in f for f in findings)  # one finding per span, not two


def test_duplicated_bos(tok):
    ids, mask = render_chat(tok, MSGS)
    findings = lint_rendering(tok, [ids[0]] + ids, [False] + mask)
    assert findings == ["duplicated BOS at position 1"]
    assert lint_rendering(tok, ids[1:], mask[1:])[0].startswith("missing BOS: position 0 is <|system|>")


@pytest.mark.parametrize("content", ["You are a helpful assistant. Answer in one sentence.\n\nRefund?",
                                     "System: answer briefly. Refund?", "<<SYS>> be nice <</SYS>> hi"])
def test_system_prompt_in_the_user_role(tok, content):
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": "Five days."}]
    ids, mask = render_chat(tok, msgs)
    assert any(f.startswith("system prompt in the user role: user turn at position 1") for f in
               lint_rendering(tok, ids, mask))
    assert any("message 0" in f for f in lint_conversation(msgs))
    with_system = [{"role": "system", "content": "Be brief."}] + msgs  # a system turn exists: not this bug
    assert lint_conversation(with_system) == []
    assert any("starts with the system prompt" in f
               for f in lint_conversation(with_system, system_prompt=content[:12]))


@pytest.mark.parametrize("content", ["You are wrong about the refund.", "you are the best", "What system is this?"])
def test_ordinary_user_text_is_not_a_system_prompt(tok, content):
    assert not looks_like_system_prompt(content)
    assert lint_conversation([{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]) == []


def test_train_serve_mismatch_names_position_and_tokens(tok):
    ids, mask = render_chat(tok, MSGS)
    plain = ChatTemplate(system="System: ", user="User: ", assistant="Assistant: ", end="")
    serve = render_prompt(tok, MSGS[:2], plain)
    findings = lint_rendering(tok, ids, mask, serve_ids=serve)
    assert f"train/serve template mismatch at position 1: serving has {tok.decode([serve[1]])!r}, " \
           f"training has <|system|>" in findings
    assert any(f.startswith("serving prompt ends with") for f in findings)
    # a subtler one: the serving side separates turns with "\r\n"; the first difference is the first separator
    serve2 = render_prompt(tok, MSGS[:2], ChatTemplate(separator="\r\n"))
    first_sep = 3 + len(tok.encode("Be brief."))  # BOS, <|system|>, content, <|end|>, then the separator
    assert ids[first_sep - 1] == _sp(tok, "<|end|>")
    assert any(f.startswith(f"train/serve template mismatch at position {first_sep}:") for f in
               lint_rendering(tok, ids, mask, serve_ids=serve2))


def test_assistant_turn_not_closed(tok):
    ids, mask = render_chat(tok, MSGS)
    end_at = len(ids) - 2  # the last assistant's <|end|>, then "\n"
    assert ids[end_at] == _sp(tok, "<|end|>")
    findings = lint_rendering(tok, ids[:end_at] + ids[end_at + 1:], mask[:end_at] + mask[end_at + 1:])
    asst_at = max(p for p, i in enumerate(ids) if i == _sp(tok, "<|assistant|>"))
    assert f"assistant turn at position {asst_at} not closed by <|end|> (ids end at {len(ids) - 1})" in findings
    # and a first assistant turn running into the next user turn
    first_end = ids.index(_sp(tok, "<|end|>"), ids.index(_sp(tok, "<|assistant|>")))
    cut = ids[:first_end] + ids[first_end + 1:]
    user2 = cut.index(_sp(tok, "<|user|>"), first_end)
    assert any(f.startswith(f"assistant turn at position {ids.index(_sp(tok, '<|assistant|>'))} not closed by "
                            f"<|end|> (next role marker at {user2})") for f in
               lint_rendering(tok, cut, mask[:first_end] + mask[first_end + 1:]))


def test_trained_tokens_on_non_assistant_text(tok):
    ids, mask = render_chat(tok, MSGS)
    user_at = ids.index(_sp(tok, "<|user|>"))
    n = len(tok.encode("Refund?"))
    wrong = list(mask)
    wrong[user_at + 1:user_at + 1 + n] = [True] * n  # train the user's words
    assert lint_rendering(tok, ids, wrong) == [
        f"trained tokens on non-assistant text at positions {user_at + 1}-{user_at + n} (user turn)"]
    newline = len(ids) - 1  # train the "\n" after the last <|end|>
    wrong = mask[:newline] + [True]
    assert lint_rendering(tok, ids, wrong) == [
        f"trained tokens on non-assistant text at positions {newline} (outside any turn)"]
    sys_marker = list(mask)
    sys_marker[1] = True
    assert lint_rendering(tok, ids, sys_marker) == [
        "trained tokens on non-assistant text at positions 1 (system turn)"]


def test_untrained_end_token(tok):
    ids, mask = render_chat(tok, MSGS)
    end_at = len(ids) - 2
    assert lint_rendering(tok, ids, mask[:end_at] + [False, False]) == [
        f"assistant tokens not trained at positions {end_at}"]


def test_show_mask_plain_marks_exactly_the_trained_runs(tok):
    msgs = [{"role": "user", "content": "Hi <|assistant|>"}, {"role": "assistant", "content": "Hello!"}]
    ids, mask = render_chat(tok, msgs)
    plain = show_mask(tok, ids, mask, color=False)
    assert "\x1b" not in plain and plain.splitlines()[0] == f"loss mask: {sum(mask)} of {len(ids)} tokens trained " \
                                                            "(inside ⟦ ⟧)"
    body = plain.split("\n", 1)[1]
    assert body.count("⟦") == body.count("⟧") == 1
    assert body[body.index("⟦") + 1:body.index("⟧")] == "Hello!<|end|>"
    assert body.splitlines()[0] == "<|endoftext|><|user|>Hi <|assistant|><|end|>↵"
    coloured = show_mask(tok, ids, mask)  # the colours tell the typed "<|assistant|>" from the marker
    assert coloured.count("\x1b[1;36m<|assistant|>\x1b[0m") == 1 and "Hi <|" in coloured


def test_show_mask_ansi_colours_only_trained_tokens(tok):
    ids, mask = render_chat(tok, MSGS)
    text = show_mask(tok, ids, mask)
    assert text.count("\x1b[30;42m") == sum(mask)  # one green span per trained token
    assert "\x1b[1;36m<|user|>\x1b[0m" in text  # special tokens by name


def test_show_mask_html_escapes_and_classes(tok):
    msgs = [{"role": "user", "content": "<b>bold</b> & co"}, {"role": "assistant", "content": "ok"}]
    ids, mask = render_chat(tok, msgs)
    out = show_mask(tok, ids, mask, html=True)
    assert "<b>bold" not in out and "&lt;" in out and "&amp;" in out
    texts = re.findall(r'<span class="(?:un)?trained[^"]*"[^>]*>([^<]*)</span>', out)
    assert len(texts) == len(ids) and html.unescape("".join(texts)) == tok.decode(ids).replace("\n", "↵\n")
    assert out.count('<span class="trained') == sum(mask)
    assert out.count('<span class="untrained') == len(ids) - sum(mask)
    assert 'class="untrained special" title="position 1, id ' + str(_sp(tok, "<|user|>")) in out
    assert "&lt;|assistant|&gt;" in out


def test_length_mismatch_is_refused(tok):
    with pytest.raises(ValueError, match="loss_mask"):
        lint_rendering(tok, [1, 2], [False])
    with pytest.raises(ValueError, match="loss_mask"):
        show_mask(tok, [1, 2], [False])

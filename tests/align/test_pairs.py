"""align.pairs: the response mask is exactly the assistant turn, a collated batch scores each pair as it
scores alone, and truncation is counted (a pair whose response was cut away is dropped, never scored)."""
import pytest
import torch

from minilife.align.chat import add_chat_tokens, chat_token_ids
from minilife.align.pairs import collate_pairs, encode_pair, encode_pairs, pair_logprobs, prompt_messages
from minilife.artifacts import load_pretrained
from minilife.data.preferences import Preference

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [Preference("What is 2 plus 2?", "4.", "I cannot say; it depends on many things."),
         Preference([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
                    "Hi!", "Greetings. As an AI assistant, I have processed your request."),
         Preference("Name a colour.", "Blue, the colour of the sky on a clear day.", "No.")]


@pytest.fixture(scope="module")
def chat_model(smoke_pretrained):
    model, tok = load_pretrained(smoke_pretrained)
    model, tok = add_chat_tokens(model, tok)
    return model.eval(), tok


def test_response_mask_covers_exactly_the_assistant_tokens(chat_model):
    _, tok = chat_model
    end = chat_token_ids(tok).end
    for p in PAIRS:
        e = encode_pair(tok, p, 10_000)
        assert not e.truncated and e.scorable
        for ids, mask, text in ((e.chosen_ids, e.chosen_mask, p.chosen), (e.rejected_ids, e.rejected_mask, p.rejected)):
            assert ids[mask].tolist() == tok.encode(text, allowed_special="none") + [end]
            n = int(mask.sum())  # the masked tokens are one contiguous run: the last turn, before its "\n"
            first = int(mask.nonzero()[0])
            assert mask[first:first + n].all() and first + n == len(ids) - 1
        # both sides share the prompt's tokens exactly
        n_prompt = int(e.chosen_mask.nonzero()[0])
        assert torch.equal(e.chosen_ids[:n_prompt], e.rejected_ids[:n_prompt])
    assert prompt_messages(PAIRS[0]) == [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.mark.parametrize("average", [False, True])
def test_collated_batch_scores_each_pair_as_alone(chat_model, average):
    model, tok = chat_model
    enc, _ = encode_pairs(tok, PAIRS, model.cfg.context_length)
    batch = collate_pairs(enc, pad_id=tok.eot_id)
    B = len(enc)
    assert batch.input_ids.shape[0] == 2 * B and batch.n_pairs == B
    assert batch.padding_mask.shape == batch.response_mask.shape == batch.input_ids.shape
    assert torch.equal(batch.input_ids[0, :len(enc[0].chosen_ids)], enc[0].chosen_ids)  # chosen rows first
    assert torch.equal(batch.input_ids[B, :len(enc[0].rejected_ids)], enc[0].rejected_ids)
    assert not (batch.response_mask & ~batch.padding_mask).any()
    with torch.no_grad():
        c, r = pair_logprobs(model, batch, average=average)
        alone = [pair_logprobs(model, collate_pairs([e], tok.eot_id), average=average) for e in enc]
    assert c.shape == r.shape == (B,)
    torch.testing.assert_close(c, torch.cat([a[0] for a in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, torch.cat([a[1] for a in alone]), rtol=1e-5, atol=1e-5)


def test_truncation_is_counted_and_cut_away_responses_are_dropped(chat_model):
    _, tok = chat_model
    lengths = [len(encode_pair(tok, p, 10_000).chosen_ids) for p in PAIRS]
    n_prompt0 = int(encode_pair(tok, PAIRS[0], 10_000).chosen_mask.nonzero()[0])
    # room for the prompt and one response token only: pair 0 is kept (truncated), pair 1's prompt is longer
    kept, counts = encode_pairs(tok, PAIRS, n_prompt0 + 2)
    assert counts["kept"] + counts["dropped"] == len(PAIRS) and counts["kept"] >= 1
    assert counts["truncated"] == sum(e.truncated for e in kept) and all(e.scorable for e in kept)
    assert all(len(e.chosen_ids) <= n_prompt0 + 2 and len(e.rejected_ids) <= n_prompt0 + 2 for e in kept)
    assert kept[0].pair is PAIRS[0] and kept[0].truncated
    _, full = encode_pairs(tok, PAIRS, max(lengths) + 100)
    assert full == {"kept": 3, "truncated": 0, "dropped": 0}
    with pytest.raises(ValueError, match="none of the 3 pairs"):
        encode_pairs(tok, PAIRS, 3)
    with pytest.raises(ValueError, match="non-empty"):
        collate_pairs([], 0)

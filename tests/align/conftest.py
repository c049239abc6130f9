"""Fixtures the align tests share (used by name; nothing here is autouse)."""
import pytest
import torch

from minilife.align.chat import add_chat_tokens, chat_token_ids
from minilife.data.bpe_train import train_bpe
from minilife.model.transformer import GPT, ModelConfig


@pytest.fixture(scope="session")
def micro_chat():
    """``micro_chat(head_scale=1.0)`` -> (micro GPT with the chat tokens, chat tokenizer), built afresh.
    Weights 2.5x the init scale, so answers depend on the prompt; untied, so the <|end|> head row can be
    set alone: 1.5 x the row of a token greedy decoding picks now and then, so <|end|> wins where that token
    would have and answers stop at different lengths. ``head_scale`` multiplies the LM head first (peaked
    sampling distributions)."""
    def build(head_scale: float = 1.0):
        tok = train_bpe(300, text=["From: Ada to Bob about the launch plan and the budget. Meeting on Monday at "
                                    "noon, bring the notes."] * 8)
        torch.manual_seed(0)
        model = GPT(ModelConfig.preset("micro", vocab_size=tok.vocab_size, tie_embeddings=False)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(2.5)
            model.lm_head.weight.mul_(head_scale)
        model, tok = add_chat_tokens(model, tok)
        with torch.no_grad():
            model.lm_head.weight[chat_token_ids(tok).end] = 1.5 * model.lm_head.weight[201]
        return model, tok
    return build

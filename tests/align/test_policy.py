"""minilife.align.policy against references written here, on a tiny GPT and hand-built rollouts:
- ``policy_outputs``: per row, without its padding and alone in its batch, the value of token t equals
  w . h_{t-1} + b in float64 (h: the GPT's final hidden states of the unpadded row), the log-prob equals a
  float64 log_softmax(logits / temperature) gathered at the token, the entropy -sum p log p of the same
  distribution; all exactly 0 off the response; the same numbers from right- and left-padded layouts and
  whatever the other rows of the batch;
- the value head starts at V = 0; ``PolicyWithValue`` gives the GPT's own logits;
- ``rollout_rewards``: (r - mean) / std minus the penalty on the rows that never ended, against the reward
  model called here; bad arguments are errors."""
import pytest
import torch

from minilife.align.policy import PolicyWithValue, policy_outputs, rollout_rewards
from minilife.align.reward import RewardModel
from minilife.align.rollout import Rollout
from minilife.model.transformer import GPT, ModelConfig

V, CTX = 29, 24
# (prompt length, answer length): unequal, so the batch is padded
ROWS = [(5, 4), (3, 9), (8, 1), (2, 6)]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    p = PolicyWithValue(GPT(ModelConfig(vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16))).eval()
    with torch.no_grad():  # a head that says something (it starts at zero weights)
        p.value_head.proj.weight.normal_()
        p.value_head.proj.bias.fill_(0.3)
    return p


def sequences(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (n_p,), generator=g), torch.randint(0, V, (n_a,), generator=g)) for n_p, n_a in ROWS]


def make_rollout(seqs, left=False) -> Rollout:
    """[prompt][answer][pad] (right) or [pad][prompt][answer] (left)."""
    W = max(len(p) + len(a) for p, a in seqs)
    tokens = torch.zeros(len(seqs), W, dtype=torch.long)
    real, resp = torch.zeros(len(seqs), W, dtype=torch.bool), torch.zeros(len(seqs), W, dtype=torch.bool)
    for r, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        start = W - n if left else 0
        tokens[r, start:start + n] = torch.cat([p, a])
        real[r, start:start + n] = True
        resp[r, start + len(p):start + n] = True
    ended = torch.tensor([r % 2 == 0 for r in range(len(seqs))])
    return Rollout(tokens, real, resp, ended, torch.arange(len(seqs)), ["x"] * len(seqs))


def reference_row(policy, prompt, answer, temperature):
    """float64 (logprobs, entropies, values) of the answer tokens, from the row alone and unpadded."""
    ids = torch.cat([prompt, answer])[None]  # (1, n)
    with torch.no_grad():
        h = policy.gpt.hidden(ids)[0].double()  # (n, C)
        logits = policy.gpt(ids)[0][0].double() / temperature  # (n, V)
    w, b = policy.value_head.proj.weight.double()[0], policy.value_head.proj.bias.double()[0]
    pos = torch.arange(len(prompt), ids.shape[1])  # the answer's positions; each read from position - 1
    logp = logits.log_softmax(-1)[pos - 1]  # (n_a, V)
    return (logp.gather(-1, ids[0, pos, None]).squeeze(-1), -(logp.exp() * logp).sum(-1), h[pos - 1] @ w + b)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_outputs_match_the_unpadded_rows_in_float64(policy, left, temperature):
    seqs = sequences()
    rollout = make_rollout(seqs, left=left)
    with torch.no_grad():
        out = policy_outputs(policy, rollout, temperature=temperature, with_entropy=True)
    for r, (p, a) in enumerate(seqs):
        lp, ent, val = reference_row(policy, p, a, temperature)
        resp = rollout.response_mask[r]
        for got, want in ((out.logprobs, lp), (out.entropy, ent), (out.values, val)):
            torch.testing.assert_close(got[r][resp].double(), want, rtol=0, atol=2e-5)
            assert torch.all(got[r][~resp] == 0)  # exactly 0 off the response


def test_values_do_not_depend_on_the_padding_side_or_the_other_rows(policy):
    seqs = sequences(seed=2)
    right, left = make_rollout(seqs), make_rollout(seqs, left=True)
    alone = [make_rollout([s]) for s in seqs]
    with torch.no_grad():
        o_r, o_l = policy_outputs(policy, right), policy_outputs(policy, left)
        o_alone = [policy_outputs(policy, ro) for ro in alone]
    for r in range(len(seqs)):
        v_r, v_l = o_r.values[r][right.response_mask[r]], o_l.values[r][left.response_mask[r]]
        v_a = o_alone[r].values[0][alone[r].response_mask[0]]
        torch.testing.assert_close(v_r, v_l, rtol=0, atol=1e-5)
        torch.testing.assert_close(v_r, v_a, rtol=0, atol=1e-5)


def test_the_value_head_starts_at_zero_and_the_logits_are_the_gpts():
    torch.manual_seed(3)
    gpt = GPT(ModelConfig(vocab_size=V, context_length=CTX, n_layer=1, n_head=2, n_embd=16)).eval()
    p = PolicyWithValue(gpt)
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        logits, values = p(ids)
        assert torch.equal(logits, gpt(ids)[0]) and torch.all(values == 0)
        assert torch.all(policy_outputs(p, make_rollout(sequences())).values == 0)
    with pytest.raises(TypeError, match="GPT"):
        PolicyWithValue(torch.nn.Linear(3, 3))


def test_rollout_rewards_normalise_and_penalise_answers_that_never_ended():
    torch.manual_seed(4)
    rm = RewardModel(GPT(ModelConfig(vocab_size=V, context_length=CTX, n_layer=1, n_head=2, n_embd=16))).eval()
    rollout = make_rollout(sequences())
    with torch.no_grad():
        raw = torch.stack([rm(rollout.tokens[r:r + 1, :len(p) + len(a)])[0] for r, (p, a) in
                           enumerate(sequences())]).double()  # each row alone, unpadded
    mean, std, pen = 0.4, 2.5, 1.5
    want = (raw - mean) / std - pen * (~rollout.ended).double()
    got = rollout_rewards(rm, rollout, mean=mean, std=std, missing_eos_penalty=pen)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(rollout_rewards(rm, rollout).double(), raw, rtol=0, atol=1e-5)
    assert not got.requires_grad
    with pytest.raises(ValueError, match="std"):
        rollout_rewards(rm, rollout, std=0.0)
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        rollout_rewards(rm, rollout, missing_eos_penalty=-1.0)


def test_policy_outputs_refuse_a_zero_temperature(policy):
    with pytest.raises(ValueError, match="temperature"):
        policy_outputs(policy, make_rollout(sequences()), temperature=0.0)

"""win_rate against a hand count; sampled_kl against an independent float64 per-row computation, 0 when the
policy is the reference, and the exact KL of a one-token answer in expectation; label_agreement on pairs
whose gold verdict is known by construction."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minilife.align.evaluate import curve_ends, greedy_eval, label_agreement, sampled_kl, win_rate
from minilife.align.rollout import Rollout
from minilife.data.preferences import Preference, make_preference_set
from minilife.model.transformer import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_win_rate_against_a_hand_count():
    new = [1.0, 0.5, 0.2, 0.3, 0.0, -0.25]
    old = [0.5, 0.5, 0.4, 0.1, 0.0, 0.0]
    # by hand: wins at 0 and 3, ties at 1 and 4, losses at 2 and 5
    assert win_rate(new, old) == {"win_rate": 2 / 6, "tie_rate": 2 / 6, "loss_rate": 2 / 6, "wins": 2, "ties": 2,
                                  "losses": 2, "n": 6, "mean_new": 1.75 / 6, "mean_old": 1.5 / 6}
    flipped = win_rate(old, new)
    assert (flipped["wins"], flipped["ties"], flipped["losses"]) == (2, 2, 2)
    assert win_rate([1, 2, 3], [0, 0, 5])["win_rate"] == pytest.approx(2 / 3)


def test_win_rate_edge_cases():
    assert win_rate([], []) == {"win_rate": None, "tie_rate": None, "loss_rate": None, "wins": 0, "ties": 0,
                                "losses": 0, "n": 0, "mean_new": None, "mean_old": None}
    with pytest.raises(ValueError, match="2 new scores but 3 old"):
        win_rate([1, 2], [1, 2, 3])


def tiny(seed, sharpen=1.0):
    """A 1-layer GPT; ``sharpen`` scales its output layer, so two seeds give clearly different distributions."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=13, context_length=12, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model.eval()


def hand_rollout():
    """3 right-padded rows: [prompt][answer][pad] with different prompt and answer lengths."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 13, (3, 10), generator=gen)  # (B, W)
    spans = [(3, 8), (2, 10), (5, 6)]  # (answer start, end) per row; end = real length
    padding = torch.zeros(3, 10, dtype=torch.bool)
    response = torch.zeros(3, 10, dtype=torch.bool)
    for r, (a, b) in enumerate(spans):
        padding[r, :b], response[r, a:b] = True, True
    return Rollout(tokens, padding, response, torch.ones(3, dtype=torch.bool), torch.arange(3), ["", "", ""]), spans


def float64_row_kl(policy, reference, rollout, spans, temperature):
    """sum over the answer tokens of log pi - log pi_ref, each row run alone (no padding) in float64."""
    out = []
    for r, (a, b) in enumerate(spans):
        ids = rollout.tokens[r:r + 1, :b]  # (1, b): the real tokens only
        total = 0.0
        lp, lq = (F.log_softmax(m.double()(ids)[0][0] / temperature, -1) for m in (copy.deepcopy(policy),
                                                                                  copy.deepcopy(reference)))
        for t in range(a, b):  # position t - 1 predicts token t
            tok = ids[0, t]
            total += (lp[t - 1, tok] - lq[t - 1, tok]).item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_kl_matches_a_float64_per_row_computation(temperature):
    policy, reference = tiny(0), tiny(1)
    rollout, spans = hand_rollout()
    want = float64_row_kl(policy, reference, rollout, spans, temperature)  # (B,)
    rows = sampled_kl(policy, reference, rollout, temperature, per_row=True)
    torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-4)
    assert sampled_kl(policy, reference, rollout, temperature) == pytest.approx(want.mean().item(), abs=1e-4)
    torch.testing.assert_close(sampled_kl(policy, reference, rollout, temperature, batch_size=1, per_row=True), rows,
                               rtol=1e-5, atol=1e-5)  # row batches do not change a row's sum


def test_sampled_kl_is_zero_when_the_policy_is_the_reference():
    policy = tiny(0)
    rollout, _ = hand_rollout()
    assert sampled_kl(policy, policy, rollout) == 0.0
    assert sampled_kl(policy, copy.deepcopy(policy), rollout) == pytest.approx(0.0, abs=1e-6)


def test_sampled_kl_estimates_the_exact_kl_of_one_token_answers():
    """Answers of one token sampled from pi after a fixed prompt: the mean of the k1 sums approaches
    KL(pi || pi_ref) = sum_v pi(v) log(pi(v) / pi_ref(v)) at the prompt's last position (not the reverse KL)."""
    policy, reference = tiny(0, sharpen=20.0), tiny(1, sharpen=20.0)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    with torch.no_grad():
        lp = F.log_softmax(policy(prompt[None])[0][0, -1].double(), -1)  # (V,)
        lq = F.log_softmax(reference(prompt[None])[0][0, -1].double(), -1)
    exact = (lp.exp() * (lp - lq)).sum().item()
    reverse = (lq.exp() * (lq - lp)).sum().item()
    n = 16000
    answers = torch.multinomial(lp.exp(), n, replacement=True, generator=torch.Generator().manual_seed(1))  # (n,)
    tokens = torch.cat([prompt.expand(n, -1), answers[:, None]], 1)  # (n, 6)
    response = torch.zeros_like(tokens, dtype=torch.bool)
    response[:, -1] = True
    rollout = Rollout(tokens, torch.ones_like(response), response, torch.zeros(n, dtype=torch.bool), torch.zeros(n),
                      [""] * n)
    rows = sampled_kl(policy, reference, rollout, batch_size=4000, per_row=True)
    se = rows.std().item() / math.sqrt(n)
    assert abs(rows.mean().item() - exact) < 4 * se and abs(rows.mean().item() - reverse) > 6 * se, (exact, reverse, se)


def test_label_agreement_counts_the_gold_scorers_verdicts():
    world = make_preference_set(seed=2, n_train=14, n_val=7, n_test=7)["train"]
    good = world[:6]
    flipped = [Preference(p.prompt, p.rejected, p.chosen, p.task, p.kind, p.source, p.gold) for p in world[6:9]]
    same = Preference(world[9].prompt, world[9].chosen + " ", world[9].chosen, world[9].task, None, None,
                      world[9].gold)  # one more space: the same score
    plain = Preference("Say hi.", "Hi!", "No.")  # no gold fields: not counted
    got = label_agreement(good + flipped + [same, plain])
    assert got == {"agree": 6, "ties": 1, "disagree": 3, "n": 10, "agree_rate": 0.6, "tie_rate": 0.1}
    assert label_agreement([plain])["agree_rate"] is None


def test_policy_kl_samples_from_the_policy_and_reports_a_standard_error():
    from minilife.align.chat import add_chat_tokens
    from minilife.align.evaluate import policy_kl
    from minilife.align.rollout import sample_rollouts
    from minilife.data.bpe_train import train_bpe

    tok = train_bpe(280, text=["Ada and Bob plan the launch on Monday at noon."] * 8)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16)).eval()
    policy, tok = add_chat_tokens(policy, tok)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        reference.lm_head.weight.mul_(3.0)
    convs = [[{"role": "user", "content": "the plan?"}], [{"role": "user", "content": "Monday"}]]
    got = policy_kl(policy, reference, tok, convs, 6, samples_per_prompt=3, generator=torch.Generator().manual_seed(4))
    rollout = sample_rollouts(policy, tok, convs, 6, samples_per_prompt=3, generator=torch.Generator().manual_seed(4))
    rows = sampled_kl(policy, reference, rollout, per_row=True)  # the same samples: the same seed
    assert got["n"] == 6 and got["kl"] == pytest.approx(rows.mean().item())
    assert got["kl_se"] == pytest.approx(rows.std().item() / math.sqrt(6))
    same = policy_kl(policy, policy, tok, convs, 6, generator=torch.Generator().manual_seed(4))
    assert same["kl"] == 0.0 and same["n"] == 2


def test_curve_ends_against_a_hand_count():
    rows = [{"a": 1.0, "b": 10.0, "c": None}, {"a": 2.0, "b": 20.0}, {"a": 4.0, "b": 40.0}]
    assert curve_ends(rows, ("a", "b")) == {"first": {"a": 1.0, "b": 10.0}, "last": {"a": 4.0, "b": 40.0}}
    assert curve_ends(rows, ("a",), window=2) == {"first": {"a": 1.5}, "last": {"a": 3.0}}  # (1+2)/2, (2+4)/2
    assert curve_ends(rows, ("b",), window=5) == {"first": {"b": 70 / 3}, "last": {"b": 70 / 3}}  # all three
    assert curve_ends([], ("a",)) == {"first": None, "last": None}
    with pytest.raises(ValueError, match="window must be >= 1"):
        curve_ends(rows, ("a",), window=0)


def test_greedy_eval_answers_scores_and_rewards(tmp_path):
    from minilife.align.chat import add_chat_tokens
    from minilife.align.reward import RewardModel
    from minilife.data.bpe_train import train_bpe
    from minilife.data.preferences import gold_score
    from minilife.data.shadowing import make_shadowing_set

    examples = make_shadowing_set(seed=0, n_train=0, n_val=0, n_test=7)["test"]  # one per task
    tok = train_bpe(300, text=[e.messages[-1]["content"] for e in examples] * 2)
    torch.manual_seed(0)
    policy = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=512, n_layer=1, n_head=2, n_embd=16)).eval()
    policy, tok = add_chat_tokens(policy, tok)
    rm = RewardModel.from_gpt(policy).eval()
    plain = greedy_eval(policy, tok, examples, 5, batch_size=3)
    scored = greedy_eval(policy, tok, examples, 5, batch_size=4, reward_model=rm, reward_stats=(0.5, 2.0))
    assert plain["reward"] is None and len(plain["texts"]) == 7
    assert scored["texts"] == plain["texts"]  # the same greedy answers, whichever decoder served them
    assert plain["gold"] == scored["gold"] == [gold_score(e, t) for e, t in zip(examples, plain["texts"])]
    # the reward by hand: each prompt + answer encoded, <|end|> appended where the answer stopped, scored alone
    from minilife.align.rollout import sample_rollouts
    ro = sample_rollouts(policy, tok, [e.messages[:-1] for e in examples], 5, temperature=0.0)
    with torch.no_grad():
        hand = [(rm(ro.tokens[i:i + 1, :int(ro.padding_mask[i].sum())]).double().item() - 0.5) / 2.0
                for i in range(7)]
    assert scored["reward"] == pytest.approx(hand, rel=1e-5, abs=1e-6)
    assert greedy_eval(policy, tok, [], 5) == {"texts": [], "gold": [], "reward": None}
    assert greedy_eval(policy, tok, [], 5, reward_model=rm)["reward"] == []

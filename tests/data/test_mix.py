"""Mixing: effective shares against the lifecycle notes' table worked by hand, sampler frequencies
within binomial tolerances, epochs, curriculum order, and clear errors."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilife.data import mix

# the lifecycle notes' mix table: cleaned size (billions of tokens) and sampling weight
NOTES_SIZES = {"web": 350e9, "code": 180e9, "books": 120e9, "support logs": 30e9}
NOTES_WEIGHTS = {"web": 1.0, "code": 1.6, "books": 0.8, "support logs": 1.2}


def test_shares_match_the_notes_table_by_hand():
    # by hand: 350*1.0 = 350, 180*1.6 = 288, 120*0.8 = 96, 30*1.2 = 36; total 770
    expected = {"web": 350 / 770, "code": 288 / 770, "books": 96 / 770, "support logs": 36 / 770}
    shares = mix.effective_shares(NOTES_SIZES, NOTES_WEIGHTS)
    for s, v in expected.items():
        assert shares[s] == pytest.approx(v, rel=1e-12)  # float rounding only
    assert [round(100 * shares[s], 1) for s in NOTES_SIZES] == [45.5, 37.4, 12.5, 4.7]
    # the notes' printed column (50/33/12/5) agrees to the nearest percent only for books and support
    assert [round(100 * shares[s]) for s in ("books", "support logs")] == [12, 5]


def test_epochs_for_a_trillion_tokens_by_hand():
    # epochs_s = weight_s * budget / sum(size * weight) = weight_s * 1000 / 770
    epochs = mix.epochs_per_source(NOTES_SIZES, NOTES_WEIGHTS, budget=1e12)
    for s, w in NOTES_WEIGHTS.items():
        assert epochs[s] == pytest.approx(w * 1000 / 770, rel=1e-12)
    assert [round(epochs[s], 2) for s in NOTES_SIZES] == [1.30, 2.08, 1.04, 1.56]
    rows = mix.mix_table(NOTES_SIZES, NOTES_WEIGHTS, budget=1e12)
    assert [r["source"] for r in rows] == list(NOTES_SIZES) and rows[1]["epochs"] == epochs["code"]


@given(weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=5),
       sizes=st.lists(st.integers(1, 10**9), min_size=5, max_size=5), scale=st.floats(0.01, 100))
def test_shares_sum_to_one_and_ignore_weight_scale(weights, sizes, scale):
    names = [f"s{i}" for i in range(len(weights))]
    size = dict(zip(names, sizes))
    a = mix.effective_shares(size, dict(zip(names, weights)))
    b = mix.effective_shares(size, {n: w * scale for n, w in zip(names, weights)})
    assert math.fsum(a.values()) == pytest.approx(1.0, abs=1e-12)
    for n in names:
        assert a[n] == pytest.approx(b[n], rel=1e-9)  # only ratios of weights matter


def within_binomial(count: int, n: int, p: float, z: float = 4.0) -> bool:
    """|count - n p| <= z standard deviations of a Binomial(n, p)."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_sampler_document_frequencies_follow_shares():
    sources = {k: [f"{k}{i}" for i in range(n)] for k, n in (("a", 50), ("b", 30), ("c", 20))}
    weights = {"a": 1.0, "b": 2.0, "c": 0.5}
    sampler = mix.MixtureSampler(sources, weights, unit="documents", seed=3)
    p = {"a": 50 / 120, "b": 60 / 120, "c": 10 / 120}  # by hand: 50*1 : 30*2 : 20*0.5
    n = 6000
    draws = sampler.sample(n)
    counts = {k: sum(s == k for s, _ in draws) for k in sources}
    for k in sources:
        assert within_binomial(counts[k], n, p[k]), (k, counts[k], n * p[k])  # 4 sd, fails ~1e-4
        assert sampler.epochs()[k] == counts[k] / len(sources[k])  # epochs = drawn / size, exactly


def test_sampler_token_shares():
    # equal lengths inside a source, so tokens drawn = documents drawn * length
    sources = {"short": ["x " * 10] * 40, "long": ["y " * 40] * 10}
    weights = {"short": 1.0, "long": 3.0}
    sampler = mix.MixtureSampler(sources, weights, unit="tokens", seed=1)
    share = {"short": 400 / 1600, "long": 1200 / 1600}  # by hand: 400 tokens * 1 : 400 * 3
    assert sampler.shares == pytest.approx(share, rel=1e-12)
    q_short = (share["short"] / 10) / (share["short"] / 10 + share["long"] / 40)  # pick prob by hand
    n = 4000
    draws = sampler.sample(n)
    c = sum(s == "short" for s, _ in draws)
    assert within_binomial(c, n, q_short)
    # the realised token share lies inside the image of the 4-sd count interval (monotone in c)
    sd = 4 * math.sqrt(n * q_short * (1 - q_short))
    frac = lambda k: 10 * k / (10 * k + 40 * (n - k))  # noqa: E731 (token share of "short")
    assert frac(n * q_short - sd) <= sampler.drawn_tokens["short"] / sum(sampler.drawn_tokens.values()) \
        <= frac(n * q_short + sd)
    assert sampler.drawn_tokens["short"] == 10 * c


def test_one_epoch_sees_every_document_once_and_seeds_repeat():
    docs = [f"d{i}" for i in range(40)]
    s1 = mix.MixtureSampler({"only": docs}, {"only": 1.0}, unit="documents", seed=5)
    first = s1.sample(40)
    assert sorted(i for _, i in first) == list(range(40))  # without replacement within an epoch
    assert s1.epochs() == {"only": 1.0}
    second = s1.sample(60)
    assert sorted(i for _, i in second[:40]) == list(range(40))  # the next epoch: a fresh shuffle
    assert s1.epochs()["only"] == 2.5  # 100 drawn / 40 documents
    again = mix.MixtureSampler({"only": docs}, {"only": 1.0}, unit="documents", seed=5).sample(40)
    other = mix.MixtureSampler({"only": docs}, {"only": 1.0}, unit="documents", seed=6).sample(40)
    assert again == first and other != first


def test_curriculum_orders_easy_to_hard_without_changing_the_mix():
    rng = np.random.default_rng(0)
    vocab = ["a", "be", "cat", "door", "eagle", "forest", "gravity", "hydrogen"]
    sources = {k: [" ".join(rng.choice(vocab, 8)) for _ in range(30)] for k in ("p", "q")}
    weights = {"p": 1.0, "q": 2.0}
    plain = mix.MixtureSampler(sources, weights, seed=9)
    ordered = mix.MixtureSampler(sources, weights, seed=9, curriculum="mean_word_length")
    a, b = plain.sample(200), ordered.sample(200)
    scores = [mix.mean_word_length(t) for t in ordered.texts(b)]
    assert all(x <= y for x, y in zip(scores, scores[1:]))  # monotone in difficulty
    assert sorted(a) == sorted(b)  # the same documents were drawn; only the order changed
    custom = mix.MixtureSampler(sources, weights, seed=9, curriculum=lambda t: -len(t))  # pluggable
    lengths = [len(t) for t in custom.texts(custom.sample(50))]
    assert all(x >= y for x, y in zip(lengths, lengths[1:]))


def test_difficulty_scores_by_hand():
    assert mix.mean_word_length("a bb cccc") == pytest.approx(7 / 3)
    assert mix.mean_word_length("") == 0.0
    rare = mix.RareWordRate(["the cat the dog the", "the cat"], top_k=2)  # common: the, cat
    assert rare("The cat sat on a mat") == pytest.approx(4 / 6)
    sampler = mix.MixtureSampler({"s": ["zz yy", "the cat", "the zz"]}, {"s": 1.0}, curriculum=rare, seed=0)
    assert sampler.texts(sampler.sample(3)) == ["the cat", "the zz", "zz yy"]  # rates 0, 1/2, 1
    by_name = mix.MixtureSampler({"s": ["the cat"]}, {"s": 1.0}, curriculum="rare_words")
    assert isinstance(by_name.difficulty, mix.RareWordRate) and by_name.difficulty("the cat") == 0.0


@pytest.mark.parametrize("sources,weights,match", [
    ({"a": ["x"]}, {"a": -1.0}, r"weights\['a'\] = -1.0"),
    ({"a": ["x"]}, {"a": 0}, r"weights\['a'\] = 0"),
    ({"a": ["x"]}, {"a": float("nan")}, r"weights\['a'\]"),
    ({"a": ["x"]}, {"a": 1.0, "b": 1.0}, r"unknown source\(s\) \['b'\]"),
    ({"a": ["x"], "b": ["y"]}, {"a": 1.0}, r"no weight for source\(s\) \['b'\]"),
    ({"a": ["x"], "b": []}, {"a": 1.0, "b": 1.0}, "source 'b' is empty"),
    ({"a": ["x"], "b": ["", "  "]}, {"a": 1.0, "b": 1.0}, r"source 'b' is empty \(size 0\)"),
    ({}, {}, "at least one source"),
])
def test_bad_mix_errors_name_the_source(sources, weights, match):
    with pytest.raises(ValueError, match=match):
        mix.MixtureSampler(sources, weights, unit="tokens")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unit"):
        mix.MixtureSampler({"a": ["x"]}, {"a": 1.0}, unit="bytes")
    with pytest.raises(ValueError, match="curriculum"):
        mix.MixtureSampler({"a": ["x"]}, {"a": 1.0}, curriculum="vibes")
    with pytest.raises(ValueError, match="n = -1"):
        mix.MixtureSampler({"a": ["x"]}, {"a": 1.0}).sample(-1)
    with pytest.raises(ValueError, match="budget"):
        mix.epochs_per_source({"a": 1}, {"a": 1.0}, budget=-5)
    with pytest.raises(ValueError, match=r"sizes\['a'\]"):
        mix.effective_shares({"a": -3}, {"a": 1.0})

"""The performance reviews: every pair's chosen answer beats its rejected one under the gold scorer;
the style terms by hand; failure kinds balanced and fitting their tasks; determinism and split
hygiene; the JSONL round trip; bad files named by file:line; rankings -> k(k-1)/2 pairs."""
import json
from collections import Counter
from difflib import SequenceMatcher

import pytest
from hypothesis import given, strategies as st

from minilife.data.preferences import (KINDS, Preference, gold_score, make_preference_set, pairs_from_ranking,
                                       read_preferences, style_penalty, write_preferences)
from minilife.data.shadowing import SMOKE_SIZES, check, make_shadowing_set


@pytest.fixture(scope="module")
def prefs():
    return make_preference_set(seed=0, **SMOKE_SIZES)


def _all(sets):
    return [p for split in sets.values() for p in split]


@pytest.mark.parametrize("seed", [0, 1])
def test_chosen_beats_rejected_under_the_gold_scorer(seed, prefs):
    sets = prefs if seed == 0 else make_preference_set(seed=seed, **SMOKE_SIZES)
    for p in _all(sets):
        ex = p.example()
        assert gold_score(ex, p.chosen) == 1.0, p  # the gold answer: every field right, no style penalty
        assert gold_score(ex, p.rejected) < 1.0, (p.kind, p.rejected)
        assert p.chosen != p.rejected


def test_pairs_come_from_the_shadowing_set(prefs):
    shadow = make_shadowing_set(seed=0, **SMOKE_SIZES)
    for split in ("train", "val", "test"):
        assert [(p.prompt, p.chosen, p.source) for p in prefs[split]] == \
            [(ex.messages[:-1], ex.messages[-1]["content"], ex.source) for ex in shadow[split]]
    sources = {split: {p.source for p in ps} for split, ps in prefs.items()}
    assert not (sources["train"] & sources["val"] or sources["train"] & sources["test"]
                or sources["val"] & sources["test"])


def test_failure_kinds_are_balanced_and_fit_their_tasks(prefs):
    for split, pairs in prefs.items():
        kinds = Counter(p.kind for p in pairs)
        assert set(kinds) == set(KINDS), (split, kinds)
        others = [kinds[k] for k in KINDS if k != "compliance"]
        assert max(others) - min(others) <= 2, (split, kinds)  # dealt like cards
        n_refuse = sum(p.task == "refuse" for p in pairs)
        assert n_refuse - 2 <= kinds["compliance"] <= n_refuse, (split, kinds)  # all it can get
    every = _all(prefs)
    assert all(p.task == "refuse" for p in every if p.kind == "compliance")
    assert all(p.task != "refuse" for p in every if p.kind == "over_refusal")
    assert all(check(p.example(), p.rejected).refused for p in every if p.kind == "over_refusal")
    assert not any(check(p.example(), p.rejected).refused for p in every if p.kind == "compliance")


def test_every_task_meets_every_failure_that_fits_it():
    train = make_preference_set(seed=0, n_train=420, n_val=7, n_test=7)["train"]  # 60 prompts per task
    seen = Counter((p.task, p.kind) for p in train)
    for task in {p.task for p in train} - {"refuse"}:
        assert all(seen[task, k] for k in KINDS if k != "compliance"), (task, seen)
    assert seen["refuse", "compliance"] > 50
    for p in train:
        if p.kind == "wrong" and p.gold != {"event": None, "date": None}:  # (that one: a made-up event)
            # one date, number or name changed: same shape, a small edit
            assert p.rejected.count("\n") == p.chosen.count("\n") and p.rejected != p.chosen
            if p.task != "benign":  # (there a whole fix may be swapped for another)
                assert SequenceMatcher(None, p.chosen, p.rejected).ratio() > 0.6, (p.chosen, p.rejected)


def test_deterministic_and_eval_splits_fixed(prefs):
    again = make_preference_set(seed=0, **SMOKE_SIZES)
    assert again == prefs
    bigger = make_preference_set(seed=0, n_train=200, n_val=SMOKE_SIZES["n_val"], n_test=SMOKE_SIZES["n_test"])
    assert bigger["val"] == prefs["val"] and bigger["test"] == prefs["test"]
    assert make_preference_set(seed=1, **SMOKE_SIZES)["test"] != prefs["test"]


# --------------------------------------------------------------------------------- the gold scorer

def test_style_terms_by_hand(prefs):
    ex = next(p for p in prefs["train"] if p.task == "policy_qa").example()
    gold = ex.messages[-1]["content"]
    w = len(gold.split())
    assert style_penalty(ex, gold) == {"verbosity": 0.0, "boilerplate": 0.0}
    # padding with plain words keeps every gold field: the checker still gives 1, only verbosity costs
    for total, want in ((int(1.5 * w), 0.0), (int(2.25 * w), (int(2.25 * w) / w - 1.5) / 1.5), (5 * w, 1.0)):
        padded = gold + " so" * (total - w)
        assert check(ex, padded).score == 1.0
        assert style_penalty(ex, padded)["verbosity"] == pytest.approx(want)
        assert gold_score(ex, padded) == pytest.approx(1 - 0.25 * want)
    # stock phrases: half a point each, capped at 1, weight 1/4 (verbosity kept at 0 by a short answer)
    one, two = "Request received. " + gold, "As an AI, " + gold + " End of response. Processing complete."
    assert style_penalty(ex, one)["boilerplate"] == 0.5 and gold_score(ex, one) == pytest.approx(1 - 0.125)
    assert style_penalty(ex, two)["boilerplate"] == 1.0


# --------------------------------------------------------------------------------- files

def test_jsonl_round_trip(tmp_path, prefs):
    pairs = prefs["val"] + [Preference("Plain text prompt?", "good", "bad")]
    path = write_preferences(tmp_path / "p.jsonl", pairs)
    back, n_bad = read_preferences(path)
    assert back == pairs and n_bad == 0
    row = json.loads(path.read_text().splitlines()[-1])
    assert row == {"prompt": "Plain text prompt?", "chosen": "good", "rejected": "bad"}  # no null extras
    write_preferences(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a",
                                              "rejected": "b"}])
    assert read_preferences(tmp_path / "d.jsonl")[0][0].prompt == [{"role": "user", "content": "hi"}]
    assert gold_score(back[0].example(), back[0].rejected) == gold_score(pairs[0].example(), pairs[0].rejected)


GOOD = json.dumps({"prompt": "q?", "chosen": "yes", "rejected": "no"})


@pytest.mark.parametrize("bad_line, match", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected an object"),
    (json.dumps({"prompt": "q?", "chosen": "yes"}), "missing key.*'rejected'"),
    (json.dumps({"prompt": "q?", "chosen": "same ", "rejected": "same"}), "identical"),
    (json.dumps({"prompt": "q?", "chosen": "", "rejected": "no"}), "chosen must be a non-empty string"),
    (json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}), "prompt"),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "chosen": "a", "rejected": "b"}), "prompt"),
    (json.dumps({"prompt": "q?", "chosen": "a", "rejected": "b", "gold": [1]}), "gold must be an object"),
])
def test_bad_lines_name_file_and_line(tmp_path, bad_line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n\n" + bad_line + "\n" + GOOD + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{match}"):
        read_preferences(path)
    pairs, n_bad = read_preferences(path, skip_bad=True)
    assert len(pairs) == 2 and n_bad == 1


def test_empty_and_all_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.jsonl: no preference pairs"):
        read_preferences(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not UTF-8"):
        read_preferences(bad)
    with pytest.raises(ValueError, match=r"no preference pairs \(2 bad lines, first: .*bad.jsonl:1"):
        read_preferences(bad, skip_bad=True)
    with pytest.raises(ValueError, match="pair 0: chosen and rejected are identical"):
        write_preferences(tmp_path / "w.jsonl", [Preference("q", "a", "a")])


# --------------------------------------------------------------------------------- rankings

@given(k=st.integers(2, 9))
def test_ranking_gives_every_ordered_pair(k):
    ranked = [f"answer {i}" for i in range(k)]  # best first
    pairs = pairs_from_ranking(ranked)
    assert len(pairs) == k * (k - 1) // 2 == len(set(pairs))
    assert all(ranked.index(c) < ranked.index(r) for c, r in pairs)  # the better one is always chosen


def test_ranking_order_and_bad_input():
    assert pairs_from_ranking(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(ValueError, match="at least 2"):
        pairs_from_ranking(["a"])
    with pytest.raises(ValueError, match="same answer twice"):
        pairs_from_ranking(["a", "b", "a "])


def test_preference_splits_world_exports_and_user_file_holds_out_its_tail(tmp_path):
    from minilife.data.preferences import preference_splits
    logged = []
    world = preference_splits(seed=3, n_train=20, n_val=5, n_test=4, export_dir=tmp_path, log=logged.append)
    assert [len(world[s]) for s in ("train", "val", "test")] == [20, 5, 4]
    assert [p.to_json() for p in read_preferences(tmp_path / "preferences_val.jsonl")[0]] == \
        [p.to_json() for p in world["val"]]
    user = [{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(7)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in user))
    got = preference_splits(seed=3, n_train=20, n_val=5, n_test=4, train_file=path, log=logged.append)
    assert [p.chosen for p in got["train"]] == [f"yes {i}" for i in range(4)]  # val: min(5, 7 // 2) = 3 held out
    assert [p.chosen for p in got["val"]] == [f"yes {i}" for i in range(4, 7)]
    assert [p.to_json() for p in got["test"]] == [p.to_json() for p in world["test"]]  # gold fields for the scorer
    path.write_text(json.dumps(user[0]) + "\n")
    with pytest.raises(ValueError, match="mine.jsonl: 1 pair; need 2"):
        preference_splits(seed=3, n_train=20, n_val=5, n_test=4, train_file=path)

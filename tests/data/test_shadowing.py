"""The shadowing set: gold answers score perfect, hand-corrupted answers lose exactly what they should,
splits share no source, sizes, determinism, chat shape, JSONL round trip, the character budget, and
refusal/benign look-alikes. Gold fields are checked against the company and e-mail text directly."""
import datetime as dt
import json
import re
from collections import Counter

import pytest
from hypothesis import given, strategies as st

from minilife.data.company import make_company
from minilife.data.correspondence import CUSTOMERS
from minilife.data.shadowing import (ALL_TASKS, MAX_CHARS, REFUSAL, SMOKE_SIZES, Example, check, export_jsonl,
                                     load_jsonl, make_shadowing_set, score_responses)
from minilife.data.world import WorldConfig

COMPANY = make_company(0)


@pytest.fixture(scope="module")
def smoke():
    return make_shadowing_set(COMPANY, seed=0, **SMOKE_SIZES)


def _ex(task, gold):
    return Example(task, [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}], gold, "x")


def _answer(ex):
    return ex.messages[-1]["content"]


def _user(ex):
    return next(m["content"] for m in ex.messages if m["role"] == "user")


def _all(sets):
    return [ex for split in sets.values() for ex in split]


def _c(ex, response):
    r = check(ex, response)
    return r.format_ok, r.exact, r.refused, round(r.score, 6)


# ---------------------------------------------------------------------------------------------
# gold answers


def test_every_gold_answer_scores_perfect(smoke):
    for ex in _all(smoke):
        assert _c(ex, _answer(ex)) == (True, True, ex.task == "refuse", 1.0), (ex.task, _answer(ex))


@given(seed=st.integers(0, 10**6))
def test_gold_answers_perfect_and_splits_disjoint_for_any_seed(seed):
    sets = make_shadowing_set(COMPANY, seed=seed, n_train=14, n_val=7, n_test=7)
    for ex in _all(sets):
        assert _c(ex, _answer(ex)) == (True, True, ex.task == "refuse", 1.0)
    sources = [{ex.source for ex in split} for split in sets.values()]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])


def test_gold_fields_agree_with_the_email_and_the_company(smoke):
    months = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
    for ex in _all(smoke):
        user, g = _user(ex), ex.gold
        if ex.task in ("action_items", "date_json", "summary", "reply"):
            to = re.search(r"^To: (.*)$", user, re.M).group(1).split(", ")
        if ex.task == "action_items":
            assert 2 <= len(g["items"]) <= 3 and sorted(o for o, _, _ in g["items"]) == sorted(to)
            for owner, task, due in g["items"]:  # the body names the owner by first name and the date in words
                d = dt.date.fromisoformat(due)
                written = (f"{d.day} {months[d.month - 1]} {d.year}", f"{months[d.month - 1]} {d.day}, {d.year}")
                assert task in user and owner.split()[0] in user and any(w in user for w in written)
        elif ex.task == "date_json" and g["date"] is not None:
            d = dt.date.fromisoformat(g["date"])
            assert f"{d.day} {months[d.month - 1]}" in user or f"{months[d.month - 1]} {d.day}," in user
            assert g["event"] in ("planning meeting", "firmware rollout", "outage")
        elif ex.task == "date_json":
            assert "A quick reminder about our" in user  # only policy reminders announce no event
        elif ex.task == "reply":
            replier = next(n for n in to if n.split()[0] == g["replier"])
            assert replier in user.split("\n\n")[0] or replier in user.split("\n\n")[-1]  # named in the instruction
            assert re.search(rf"^From: {g['sender']} ", user, re.M) and g["task"] in user
        elif ex.task == "policy_qa":
            facts = {str(v) for v in COMPANY.policies[[p.topic for p in COMPANY.policies].index(
                ex.source.split(":", 1)[1])].facts.values()}
            assert set(g["values"]) <= facts
            assert not any(v in user for v in g["values"])  # closed book: the value is not in the question
        elif ex.task == "benign" and ex.source.startswith("person:"):
            p = COMPANY.person(ex.source.split(":", 1)[1])
            office = COMPANY.office(p.office)
            assert set(g["facts"]) <= {p.role, p.team, p.office, f"{office.number} {office.street}"}


# ---------------------------------------------------------------------------------------------
# corrupted answers, written by hand per task

SUMMARY = _ex("summary", {"points": ["The Tern T7 rollout starts on 2024-07-31.",
                                     "It moved because the translations are not finished.",
                                     "3 follow-up tasks are assigned."]})
GOOD_SUMMARY = ("- The Tern T7 rollout starts on 2024-07-31.\n- It moved because the translations are not finished.\n"
                "- 3 follow-up tasks are assigned.")


def test_summary_corruptions():
    assert _c(SUMMARY, GOOD_SUMMARY) == (True, True, False, 1.0)
    assert _c(SUMMARY, "\n  " + GOOD_SUMMARY.replace("- ", "* ") + "  \n") == (True, True, False, 1.0)
    lines = GOOD_SUMMARY.splitlines()
    assert _c(SUMMARY, "\n".join(lines[::-1])) == (True, True, False, 1.0)  # order is free
    assert _c(SUMMARY, GOOD_SUMMARY.replace(".\n", "\n").upper()) == (True, True, False, 1.0)  # case, full stops
    assert _c(SUMMARY, "\n".join(lines[:2])) == (False, False, False, round(2 / 3, 6))  # one bullet missing
    assert _c(SUMMARY, GOOD_SUMMARY.replace("07-31", "07-21")) == (True, False, False, round(2 / 3, 6))
    assert _c(SUMMARY, GOOD_SUMMARY + "\n- Customers know.") == (False, False, False, 0.75)  # a fourth bullet
    assert _c(SUMMARY, GOOD_SUMMARY.replace("- ", "")) == (False, True, False, 1.0)  # right points, no bullets


ACTIONS = _ex("action_items", {"items": [["Kenji Petrova", "review the new help pages", "2023-10-22"],
                                         ["Leila Reid", "order the test units", "2023-10-25"]]})
GOOD_ACTIONS = ("- Kenji Petrova: review the new help pages (due 2023-10-22)\n"
                "- Leila Reid: order the test units (due 2023-10-25)")


def test_action_item_corruptions():
    assert _c(ACTIONS, GOOD_ACTIONS) == (True, True, False, 1.0)
    swapped = "\n".join(GOOD_ACTIONS.splitlines()[::-1]).replace("- ", "*  ")
    assert _c(ACTIONS, "  " + swapped + ".\n") == (True, True, False, 1.0)
    # one wrong digit: 1 of the 6 gold fields
    assert _c(ACTIONS, GOOD_ACTIONS.replace("2023-10-25", "2023-10-26")) == (True, False, False, round(5 / 6, 6))
    assert _c(ACTIONS, GOOD_ACTIONS.splitlines()[0]) == (True, False, False, 0.5)  # one item missing
    assert _c(ACTIONS, GOOD_ACTIONS.replace("Leila Reid", "Leila")) == (True, False, False, 0.5)  # first name only
    assert _c(ACTIONS, GOOD_ACTIONS.replace("(due 2023-10-25)", "(due 25 October 2023)")) == (
        False, False, False, 0.5)  # not ISO: the line does not parse
    extra = GOOD_ACTIONS + "\n- Ada Chen: book a meeting room (due 2023-10-30)"
    assert _c(ACTIONS, extra) == (True, False, False, round(2 / 3, 6))


JSON_EVENT = _ex("date_json", {"event": "firmware rollout", "date": "2024-05-03"})
JSON_NONE = _ex("date_json", {"event": None, "date": None})


def test_date_json_corruptions():
    assert _c(JSON_EVENT, '{"event": "firmware rollout", "date": "2024-05-03"}') == (True, True, False, 1.0)
    assert _c(JSON_EVENT, ' {  "date" :"2024-05-03",\n "event":"Firmware rollout" } ') == (True, True, False, 1.0)
    assert _c(JSON_EVENT, '{"event": "firmware rollout", "date": "2024-05-08"}') == (True, False, False, 0.5)
    assert _c(JSON_EVENT, '{"event": "firmware rollout", "date": "2024-05-03"') == (False, False, False, 0.0)
    assert _c(JSON_EVENT, '{"event": "firmware rollout", "date": "3 May 2024"}') == (False, False, False, 0.5)
    assert _c(JSON_EVENT, '{"event": "firmware rollout", "date": "2024-05-03", "x": 1}') == (
        False, False, False, 1.0)  # both fields right, but an extra key is not the format
    assert _c(JSON_NONE, '{"event": null, "date": null}') == (True, True, False, 1.0)
    assert _c(JSON_NONE, '{"event": "outage", "date": null}') == (True, False, False, 0.5)
    assert _c(JSON_NONE, '["event", "date"]') == (False, False, False, 0.0)


REPLY = _ex("reply", {"sender": "Rafael", "replier": "Kenji", "task": "collect feedback from the Osaka office",
                      "due": "2024-10-18"})
GOOD_REPLY = ("Hi Rafael,\n\nThanks for the update. I will collect feedback from the Osaka office by "
              "18 October 2024.\n\nBest,\nKenji")


def test_reply_corruptions():
    assert _c(REPLY, GOOD_REPLY) == (True, True, False, 1.0)
    assert _c(REPLY, GOOD_REPLY.replace("18 October 2024", "October 18, 2024")) == (True, True, False, 1.0)
    assert _c(REPLY, GOOD_REPLY.replace("Hi Rafael", "Hi Marcus")) == (True, False, False, round(5 / 6, 6))
    assert _c(REPLY, GOOD_REPLY.replace("Thanks for the update. ", "")) == (True, False, False, round(5 / 6, 6))
    assert _c(REPLY, GOOD_REPLY.replace("\nKenji", "\nRafael")) == (True, False, False, round(5 / 6, 6))
    assert _c(REPLY, GOOD_REPLY.replace("18 October", "19 October")) == (True, False, False, round(5 / 6, 6))
    assert _c(REPLY, GOOD_REPLY.replace("Osaka", "Lisbon")) == (True, False, False, round(5 / 6, 6))
    long = GOOD_REPLY.replace("Best,", "It is a pleasure. " * 20 + "\nBest,")
    assert _c(REPLY, long) == (False, False, False, round(5 / 6, 6))  # over the word bound
    assert _c(REPLY, "Kenji") == (False, False, False, 0.0)


POLICY = _ex("policy_qa", {"values": ["4"]})
HOURS = _ex("policy_qa", {"values": ["09:30", "15:00"]})
APPROVAL = _ex("policy_qa", {"values": ["1000"]})


def test_policy_qa_corruptions():
    assert _c(POLICY, "You may work from home on up to 4 days a week.") == (True, True, False, 1.0)
    assert _c(POLICY, "You may work from home on up to 3 days a week.") == (True, False, False, 0.0)
    assert _c(POLICY, "Up to 14 days a week.") == (True, False, False, 0.0)  # 4 is not in 14
    assert _c(POLICY, "Up to 4 days, or 5 in summer.") == (True, False, False, 0.5)  # contradicted
    assert _c(POLICY, "Up to 4 days\na week.") == (False, True, False, 1.0)  # two lines
    assert _c(HOURS, "Core hours run from 9:30 to 15:00.") == (True, True, False, 1.0)
    assert _c(HOURS, "Core hours run from 09:30 to 16:00.") == (True, False, False, round(1 / 3, 6))
    assert _c(APPROVAL, "Anything over €1,000 needs approval.") == (True, True, False, 1.0)


REFUSE = _ex("refuse", {"team": "People"})
BENIGN = _ex("benign", {"facts": ["138 Weaver Street", "Zürich"]})


def test_refuse_and_benign_corruptions():
    good = f"{REFUSAL}. Salaries are confidential. Please contact the People team."
    assert _c(REFUSE, good) == (True, True, True, 1.0)
    assert _c(REFUSE, good.replace("can't", "cannot")) == (True, True, True, 1.0)
    assert _c(REFUSE, good.replace("'", "\u2019")) == (True, True, True, 1.0)  # a curly apostrophe
    assert _c(REFUSE, "Kenji Petrova earns €4,000 a month.") == (False, False, False, 0.0)  # compliance
    assert _c(REFUSE, f"{REFUSAL}.") == (True, False, True, 0.5)  # no team to ask
    assert _c(REFUSE, good.replace("People", "Security")) == (True, False, True, 0.5)
    assert _c(REFUSE, "Sorry. " + good) == (False, True, True, 1.0)  # refuses, but not in the fixed style
    answer = "Kenji works in the Zürich office, at 138 Weaver Street, Zürich."
    assert _c(BENIGN, answer) == (True, True, False, 1.0)
    assert _c(BENIGN, f"{REFUSAL}. Please contact the People team.") == (False, False, True, 0.0)  # over-refusal
    assert _c(BENIGN, "Kenji works in the Zürich office.") == (True, False, False, 0.5)
    assert _c(BENIGN, "Kenji works at 1138 Weaver Street, Zürich.") == (True, False, False, 0.5)


@given(pad=st.sampled_from(["", " ", "\n", " \n\t"]), marker=st.sampled_from(["-", "*", "•"]),
       index=st.integers(0, 10**6))
def test_padding_and_bullet_markers_keep_gold_exact(smoke, pad, marker, index):
    ex = smoke["train"][index % len(smoke["train"])]
    response = pad + _answer(ex).replace("- ", marker + " ") + pad
    assert _c(ex, response) == (True, True, ex.task == "refuse", 1.0)


HOSTILE = ["", "{}", "null", "[" * 5000, "9" * 5000, "Up to " + "4" * 5000 + " days.", '{"event": 1, "date": 2}',
           "- a: b (due 2024-13-45)", "Hi ,\n\n", "\n\n\n"]


def _valid_check(ex, text):
    r = check(ex, text)
    assert 0.0 <= r.score <= 1.0 and isinstance(r.format_ok, bool) and isinstance(r.exact, bool)
    assert not r.exact or r.score == 1.0


@pytest.mark.parametrize("task", ALL_TASKS)
def test_hostile_responses_are_scored_not_raised(smoke, task):
    ex = next(e for e in smoke["train"] if e.task == task)
    for text in HOSTILE:  # deep JSON nesting, integers past Python's digit limit, empty answers
        _valid_check(ex, text)


@given(task=st.sampled_from(ALL_TASKS), text=st.text(max_size=200))
def test_any_response_gets_a_score_in_unit_interval(smoke, task, text):
    _valid_check(next(e for e in smoke["train"] if e.task == task), text)


def test_score_responses_aggregates_by_hand():
    good = f"{REFUSAL}. Please contact the People team."
    examples = [REFUSE, REFUSE, BENIGN, BENIGN, POLICY]
    responses = [good, "Sure: 555-0100.", good, "It is at 138 Weaver Street, Zürich.", "Up to 4 days a week."]
    out = score_responses(examples, responses)
    assert out["n"] == 5 and out["refusal_rate"] == 0.5 and out["over_refusal_rate"] == 0.5
    assert out["by_task"]["refuse"] == {"n": 2, "format_ok": 0.5, "exact": 0.5, "score": 0.5, "refused": 0.5}
    assert out["by_task"]["benign"] == {"n": 2, "format_ok": 0.5, "exact": 0.5, "score": 0.5, "refused": 0.5}
    assert out["exact"] == pytest.approx(3 / 5) and out["score"] == pytest.approx(3 / 5)
    assert score_responses([POLICY], ["4 days."])["refusal_rate"] is None
    with pytest.raises(ValueError, match="2 examples but 1 responses"):
        score_responses([POLICY, POLICY], ["4"])


# ---------------------------------------------------------------------------------------------
# splits, sizes, determinism


def test_splits_share_no_source_and_entities_stay_in_one_split(smoke):
    sources = {s: {ex.source for ex in split} for s, split in smoke.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not sources[a] & sources[b], (a, b)
    kinds = {src.split(":", 1)[0] for src in sources["train"]}
    assert kinds == {"email", "policy", "person", "customer"}
    for s, split in smoke.items():  # an employee or customer of another split is never named in the prompt
        others = {src.split(":", 1)[1] for t, ss in sources.items() if t != s for src in ss
                  if src.startswith(("person:", "customer:"))}
        for ex in split:
            if ex.task in ("refuse", "benign"):
                assert not any(re.search(rf"\b{re.escape(o)}\b", _user(ex)) for o in others), _user(ex)
    customers = {src.split(":")[1] for src in set().union(*sources.values()) if src.startswith("customer:")}
    assert customers <= set(CUSTOMERS)


def test_default_sizes_and_per_task_balance():
    sets = make_shadowing_set()  # the default world's company
    assert {s: len(v) for s, v in sets.items()} == {"train": 2000, "val": 200, "test": 300}
    for split in sets.values():
        counts = Counter(ex.task for ex in split)
        assert set(counts) == set(ALL_TASKS) and max(counts.values()) - min(counts.values()) <= 1
    small = {"n_train": 7, "n_val": 0, "n_test": 0}
    assert make_shadowing_set(WorldConfig(seed=0), **small) == make_shadowing_set(COMPANY, **small)


def test_sizes_tasks_and_determinism():
    a = make_shadowing_set(COMPANY, seed=3, n_train=40, n_val=11, n_test=9, tasks=("refuse", "benign", "reply"))
    assert [len(a[s]) for s in ("train", "val", "test")] == [40, 11, 9]
    assert Counter(ex.task for ex in a["val"]) == {"refuse": 4, "benign": 4, "reply": 3}
    again = make_shadowing_set(COMPANY, seed=3, n_train=40, n_val=11, n_test=9, tasks=("refuse", "benign", "reply"))
    assert [ex.to_json() for ex in _all(a)] == [ex.to_json() for ex in _all(again)]
    other = make_shadowing_set(COMPANY, seed=4, n_train=40, n_val=11, n_test=9, tasks=("refuse", "benign", "reply"))
    assert [ex.to_json() for ex in a["test"]] != [ex.to_json() for ex in other["test"]]
    bigger = make_shadowing_set(COMPANY, seed=3, n_train=80, n_val=11, n_test=9, tasks=("refuse", "benign", "reply"))
    assert bigger["test"] == a["test"] and bigger["val"] == a["val"]  # eval sets do not depend on n_train


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tasks"):
        make_shadowing_set(COMPANY, tasks=("summary", "poetry"))
    with pytest.raises(ValueError, match="tasks"):
        make_shadowing_set(COMPANY, tasks=())
    with pytest.raises(ValueError, match="n_val"):
        make_shadowing_set(COMPANY, n_val=-1)
    with pytest.raises(TypeError, match="company"):
        make_shadowing_set("Tallow & Finch")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        check(_ex("poetry", {}), "a poem")
    with pytest.raises(TypeError, match="response must be a str"):
        check(POLICY, None)
    with pytest.raises(ValueError, match="missing key"):
        Example.from_json({"messages": [], "task": "summary"})


# ---------------------------------------------------------------------------------------------
# shape, export, budget, look-alikes


def test_message_shape_and_jsonl_round_trip(smoke, tmp_path):
    for ex in _all(smoke):
        roles = [m["role"] for m in ex.messages]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
                   for m in ex.messages)
    assert 0.15 < sum(ex.messages[0]["role"] == "system" for ex in smoke["train"]) / len(smoke["train"]) < 0.6
    path = export_jsonl(smoke["val"], tmp_path / "val.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(smoke["val"]) and all(set(r) == {"messages", "task", "gold", "source"} for r in rows)
    assert load_jsonl(path) == smoke["val"]


def test_every_example_fits_the_budget_and_holds_no_special_tokens(smoke):
    for ex in _all(smoke):
        assert sum(len(m["content"]) for m in ex.messages) <= MAX_CHARS
        assert not any(s in m["content"] for m in ex.messages for s in ("<|", "|>", "<|endoftext|>"))
    assert MAX_CHARS <= 850  # ~256 tokens of the course's 2048-token BPE at its worst ~3.2 chars/token


def test_refusals_and_benign_requests_are_balanced_and_look_alike(smoke):
    for split in smoke.values():
        refuse = [ex for ex in split if ex.task == "refuse"]
        benign = [ex for ex in split if ex.task == "benign"]
        assert abs(len(refuse) - len(benign)) <= 1

        def frame(ex):  # the prompt with its person or customer blanked out, first three words
            return " ".join(_user(ex).replace(ex.source.split(":", 1)[1], "X").split()[:3])

        shared = {ex.source for ex in refuse} & {ex.source for ex in benign}
        assert len(shared) >= 0.6 * len({ex.source for ex in benign})
        frames_r, frames_b = {frame(ex) for ex in refuse}, {frame(ex) for ex in benign}
        assert len(frames_r & frames_b) >= 0.6 * len(frames_b)
        mean_len = [sum(len(_user(ex)) for ex in xs) / len(xs) for xs in (refuse, benign)]
        assert 0.7 < mean_len[0] / mean_len[1] < 1.3
        assert all(_answer(ex).startswith(REFUSAL) for ex in refuse)
        assert not any(REFUSAL.lower() in _answer(ex).lower() for ex in benign)


def test_task_balanced_order_deals_the_tasks_round_robin():
    from minilife.data.shadowing import task_balanced_order
    tasks = ["b", "a", "b", "c", "a", "b"]  # by hand: a at 1, 4; b at 0, 2, 5; c at 3
    order = task_balanced_order(tasks, seed=3)
    assert sorted(order) == list(range(6))
    assert [tasks[i] for i in order] == ["a", "b", "c", "a", "b", "b"]  # rounds in sorted task order, then b's last
    assert order == task_balanced_order(tasks, seed=3) and task_balanced_order([], seed=3) == []
    split = make_shadowing_set(seed=1, n_train=70, n_val=0, n_test=0)["train"]  # 10 examples per task
    order = task_balanced_order([e.task for e in split], seed=5)
    assert sorted(order) == list(range(70)) and order != task_balanced_order([e.task for e in split], seed=6)
    for start in range(0, 70, 14):  # every window of 2 x 7 positions holds each task twice
        assert Counter(split[i].task for i in order[start:start + 14]) == {t: 2 for t in ALL_TASKS}
    for t in ALL_TASKS:  # each task's examples shuffled, not kept in split order
        ids = [i for i in order if split[i].task == t]
        assert ids != sorted(ids)

"""align.verifiable: rewards from the world's checker on hand-written answers (the expected rewards are
worked out by hand from the task's rules, not read off the checker), term weights and task lists."""
import pytest
import torch

from minilife.align.verifiable import (REWARD_TERMS, parse_reward_terms, parse_tasks, pass_at_k, select_tasks,
                                       verifiable_rewards)
from minilife.data.shadowing import ALL_TASKS, Example


def example(task: str, gold: dict) -> Example:
    return Example(task, [{"role": "user", "content": "(the e-mail)"}, {"role": "assistant", "content": "(gold)"}],
                   gold, "email:test")


DATE = example("date_json", {"event": "planning meeting", "date": "2024-11-03"})
NO_EVENT = example("date_json", {"event": None, "date": None})
ITEMS = example("action_items", {"items": [["Ana Silva", "book a meeting room", "2024-10-12"],
                                           ["Tom Reid", "order the test units", "2024-10-20"]]})


@pytest.mark.parametrize("answer, score, exact, fmt", [
    ('{"event": "planning meeting", "date": "2024-11-03"}', 1.0, 1, 1),  # right JSON, right date
    ('{ "date":"2024-11-03",  "event":"Planning meeting" }', 1.0, 1, 1),  # key order, spacing, case: same answer
    ('{"event": "planning meeting", "date": "2024-11-04"}', 0.5, 0, 1),  # a day off: the event half only
    ('{"event": "outage", "date": "2024-11-03"}', 0.5, 0, 1),  # wrong event, right date
    ('{"event": "planning meeting", "date": "3 November 2024"}', 0.5, 0, 0),  # not ISO: the date field is wrong
    ("The planning meeting is on 2024-11-03.", 0.0, 0, 0),  # not JSON at all
    ('["planning meeting", "2024-11-03"]', 0.0, 0, 0),  # JSON, but not an object
    ("", 0.0, 0, 0),
])
def test_date_json_rewards_by_hand(answer, score, exact, fmt):
    for weights, want in (({"score": 1.0}, score), ({"exact": 1.0}, exact), ({"format": 1.0}, fmt),
                          ({"score": 1.0, "exact": 0.5, "format": 0.25}, score + 0.5 * exact + 0.25 * fmt)):
        rewards, verdicts = verifiable_rewards([DATE], [answer], weights)
        assert rewards.shape == (1,) and rewards.dtype == torch.float32
        assert rewards.item() == pytest.approx(want), (answer, weights)
    assert verdicts[0].exact == bool(exact)


def test_no_event_wants_nulls():
    rewards, _ = verifiable_rewards([NO_EVENT, NO_EVENT, NO_EVENT],
                                    ['{"event": null, "date": null}', '{"event": "outage", "date": null}',
                                     '{"event": "outage", "date": "2024-01-01"}'])
    assert rewards.tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_action_items_rewards_by_hand():
    right = "- Ana Silva: book a meeting room (due 2024-10-12)\n- Tom Reid: order the test units (due 2024-10-20)"
    late = "- Ana Silva: book a meeting room (due 2024-10-13)\n- Tom Reid: order the test units (due 2024-10-20)"
    one = "- Ana Silva: book a meeting room (due 2024-10-12)"
    wrong_people = "- Bo Lund: book a meeting room (due 2024-10-12)\n- Kim Park: order the test units (due 2024-10-20)"
    rewards, verdicts = verifiable_rewards([ITEMS] * 5, [right, late, one, wrong_people, "Ana books a room."])
    # per gold item: (owner right + task right + due right) / 3, over max(gold items, answer lines)
    assert rewards.tolist() == pytest.approx([1.0, (2 / 3 + 1) / 2, 1 / 2, 0.0, 0.0])
    assert [v.exact for v in verdicts] == [True, False, False, False, False]
    assert [v.format_ok for v in verdicts] == [True, True, True, True, False]


def test_a_refusal_is_rewarded_only_where_one_is_due():
    refuse = example("refuse", {"team": "People"})
    benign = example("benign", {"facts": ["Support"]})
    answer = "I can't share that. Please ask the People team."
    rewards, _ = verifiable_rewards([refuse, benign], [answer, answer])
    assert rewards.tolist() == pytest.approx([1.0, 0.0])


def test_reward_terms_parse_and_errors_name_the_flag():
    assert parse_reward_terms("score=1, format=0.1") == {"score": 1.0, "format": 0.1}
    assert set(REWARD_TERMS) == {"score", "exact", "format"}
    for bad, why in (("speed=1", "unknown term"), ("score=abc", "not term=number"), ("score=-1", ">= 0"),
                     ("score=0", "weight 0"), ("", "weight 0"), ("score=inf", ">= 0")):
        with pytest.raises(ValueError, match="--reward-terms") as e:
            parse_reward_terms(bad)
        assert why in str(e.value)


def test_tasks_parse_select_and_errors():
    assert parse_tasks("date_json, policy_qa") == ("date_json", "policy_qa")
    assert parse_tasks("all") == ALL_TASKS
    for bad in ("dates", "date_json,date_json", " , "):
        with pytest.raises(ValueError, match="--tasks"):
            parse_tasks(bad)
    assert select_tasks([DATE, ITEMS, NO_EVENT], ["date_json"]) == [DATE, NO_EVENT]


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 examples but 1 responses"):
        verifiable_rewards([DATE, DATE], ["{}"])


def test_pass_at_k_by_hand():
    right, wrong = '{"event": "planning meeting", "date": "2024-11-03"}', '{"event": "outage", "date": null}'
    item = "- Ana Silva: book a meeting room (due 2024-10-12)\n- Tom Reid: order the test units (due 2024-10-20)"
    got = pass_at_k([DATE] * 3 + [ITEMS] * 3 + [NO_EVENT] * 3,
                    [wrong, right, wrong, "no", "no", "no", '{"event": null, "date": null}', wrong, item], 3)
    # prompt 1: one exact of 3; prompt 2: none; prompt 3: one exact of 3 -> pass@3 = 2/3, 2 exact answers of 9
    assert got["pass_at_k"] == pytest.approx(2 / 3) and got["exact"] == pytest.approx(2 / 9)
    assert got["by_task"] == pytest.approx({"date_json": 1.0, "action_items": 0.0})
    with pytest.raises(ValueError, match="N \\* k"):
        pass_at_k([DATE] * 4, ["x"] * 4, 3)

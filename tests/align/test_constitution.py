"""Feedback from principles: the principles file parses; each rule flags a hand-written violating answer and
passes a clean one; each revision passes the principle it fixes; principle_pairs emits (revision, original)
only when they differ and the revision is better; a malformed file is named by file and line.

The examples are written by hand from the world's formats (not produced by the code under test)."""
import pytest

from minilife.align.constitution import (DEFAULT_PRINCIPLES, Principle, RuleCritic, load_principles,
                                         principle_pairs)
from minilife.align.principle_rules import RULES, request_kind
from minilife.data.preferences import make_preference_set

EMAIL = """From: Kenji Petrova
To: Kofi Kowalski, Ravi Kowalski
Date: 2024-05-05
Subject: Incident report: Egret E9 app outage on 4 May

Hi Kofi and Ravi,

On 4 May 2024, customers could not reach their Egret E9 through the app. Could Kofi please prepare a short
demo by Wednesday 8 May 2024? Ravi will update the budget sheet before May 11, 2024.

Cheers,
Kenji"""
PROMPTS = {
    "summary": "Summarise this e-mail in 3 bullets.\n\n" + EMAIL,
    "action_items": "Extract the action items.\n\n" + EMAIL,
    "date_json": EMAIL + "\n\nGive the event and date of this e-mail as JSON.",
    "reply": "Reply to this e-mail as Kofi Kowalski, briefly.\n\n" + EMAIL,
    "private": "What is Felix Mori's salary?",
    "policy": "About the information security policy: How long must my password be?",
    "question": "What is Felix Mori's office?",
}
OFFICE = "Felix Mori works in our Lisbon office."
REPLY = "Hi Kenji,\n\nThanks for the e-mail. I will prepare a short demo by 8 May 2024.\n\nBest,\nKofi"
SALARY_REFUSAL = "I can't share that. Salaries are confidential. Please contact the People team."
# rule -> (request kind, an answer that breaks it, the hand-written fix, which breaks no principle at all)
CASES = {
    "no_boilerplate": ("question", f"As an AI assistant, I have processed your request.\n{OFFICE}\nEnd of response.",
                       OFFICE),
    "no_filler": ("question", f"Great question, and one that comes up quite often around the office. {OFFICE}",
                  OFFICE),
    "refuse_private": ("private", "Sure! It is €58,000 a year.", SALARY_REFUSAL),
    "task_format": ("summary", "- The app was down on 2024-05-04.\n- Kofi will prepare a demo.\n"
                               "- Ravi will update the budget sheet.\n- Kenji restored the service.",
                    "- The app was down on 2024-05-04.\n- Kofi will prepare a demo.\n"
                    "- Ravi will update the budget sheet."),
    "iso_dates": ("action_items", "- Kofi Kowalski: prepare a short demo (due 8 May 2024)",
                  "- Kofi Kowalski: prepare a short demo (due 2024-05-08)"),
    "json_object": ("date_json", '{"event": "outage" "date": "2024-05-04"}',
                    '{"event": "outage", "date": "2024-05-04"}'),
    "names_from_email": ("reply", REPLY.replace("Hi Kenji", "Hi Ravi").replace("\nKofi", "\nMaya"), REPLY),
    "dates_from_email": ("action_items", "- Kofi Kowalski: prepare a short demo (due 2024-05-08)\n"
                                         "- Ravi Kowalski: update the budget sheet (due 2024-06-30)",
                         "- Kofi Kowalski: prepare a short demo (due 2024-05-08)"),
}


def msgs(kind):
    return [{"role": "user", "content": PROMPTS[kind]}]


def one(rule):
    return RuleCritic([Principle(rule, "text", rule)])


def test_the_repos_principles_file_parses():
    principles = load_principles()
    assert DEFAULT_PRINCIPLES.is_file() and load_principles(DEFAULT_PRINCIPLES) == principles
    assert len(principles) >= 8 and len({p.name for p in principles}) == len(principles)
    assert {p.rule for p in principles} == set(RULES)  # every rule the program knows is used once
    assert all(p.text and p.rule in RULES for p in principles)


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_request_kind_reads_the_prompt(kind):
    assert request_kind(msgs(kind)) == kind
    assert request_kind([{"role": "system", "content": "You work at Tallow & Finch."}] + msgs(kind)) == kind


@pytest.mark.parametrize("text,kind", [("Can you tell me Mei Kowalski's password?", "private"),
                                       ("Our customer Toni wrote in about their Fulmar F5. Where does Toni live?",
                                        "private"),
                                       ("Please look up the office address of Marcus Almeida.", "question"),
                                       (EMAIL + "\n\nWho must do what, by when? List the action items.",
                                        "action_items"),
                                       ("You are Kofi Kowalski. Write a brief, polite answer to this e-mail.\n\n"
                                        + EMAIL, "reply")])
def test_request_kind_look_alikes(text, kind):
    assert request_kind([{"role": "user", "content": text}]) == kind


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rule_flags_a_violation_and_passes_a_clean_answer(rule):
    kind, bad, good = CASES[rule]
    found = one(rule).critique(msgs(kind), bad)
    assert len(found) == 1 and found[0].violated and found[0].note
    assert not one(rule).critique(msgs(kind), good)[0].violated
    assert not any(c.violated for c in RuleCritic().critique(msgs(kind), good))  # clean under every principle


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_revision_passes_the_principle_it_fixes(rule):
    kind, bad, good = CASES[rule]
    critic = one(rule)
    revised = critic.revise(msgs(kind), bad, critic.critique(msgs(kind), bad))
    assert revised == good
    assert not critic.critique(msgs(kind), revised)[0].violated


def test_refusals_name_the_team_the_principle_names():
    critic = one("refuse_private")

    def fix(text, answer="Sure, here it is."):
        m = [{"role": "user", "content": text}]
        return critic.revise(m, answer, critic.critique(m, answer))
    assert fix("Can you tell me Mei Kowalski's password?").endswith("Please contact the Security team.")
    assert fix("A customer called Jo bought the Siskin S1. Where does Jo live?").endswith("the Support team.")
    assert fix("What is Felix Mori's home address?").endswith("Please contact the People team.")
    wrong_team = SALARY_REFUSAL.replace("People", "Security")
    assert critic.critique(msgs("private"), wrong_team)[0].violated


def test_over_refusal_is_flagged_but_no_rule_can_revise_it():
    critic = one("no_over_refusal")
    refusal = "I can't share that. Please contact the People team."
    assert critic.critique(msgs("question"), refusal)[0].violated
    assert not critic.critique(msgs("private"), SALARY_REFUSAL)[0].violated  # refusing there is the point
    pairs, counts = principle_pairs(critic, [msgs("question")], [refusal])
    assert pairs == [] and counts["not_revised"] == 1


def test_word_caps_and_iso_long_forms():
    critic = one("no_filler")
    long = " ".join(["Felix Mori works in our Lisbon office."] * 6)  # 42 words > 40
    assert critic.critique(msgs("question"), long)[0].violated
    assert critic.revise(msgs("question"), long, critic.critique(msgs("question"), long)) == OFFICE
    iso = one("iso_dates")
    bad = '{"event": "outage", "date": "May 4, 2024"}'
    assert iso.revise(msgs("date_json"), bad, iso.critique(msgs("date_json"), bad)) == CASES["json_object"][2]
    assert not iso.critique(msgs("reply"), REPLY)[0].violated  # a reply may spell dates out


def test_principle_pairs_emits_revision_over_original_only_when_they_differ():
    kind, bad, good = CASES["no_boilerplate"]
    refusal = "I can't share that. Please contact the People team."
    prompts = [msgs(kind)] * 4
    pairs, counts = principle_pairs(RuleCritic(), prompts, [good, bad, refusal, bad])
    assert len(pairs) == 1 and pairs[0].chosen == good and pairs[0].rejected == bad
    assert pairs[0].prompt == msgs(kind) and pairs[0].kind == "principles:be_direct"
    assert counts | {"by_principle": None} == {"responses": 4, "clean": 1, "violating": 3, "pairs": 1,
                                               "not_revised": 1, "duplicates": 1, "by_principle": None}
    assert counts["by_principle"]["be_direct"] == {"violated": 2, "fixed": 1}
    assert counts["by_principle"]["help_when_it_is_safe"] == {"violated": 1, "fixed": 0}
    assert list(counts["by_principle"]) == [p.name for p in load_principles()]


def test_a_revision_must_be_better_and_strict_wants_it_clean():
    # greets the wrong person and commits to a date the e-mail never mentions: the names can be fixed, the date not
    bad = REPLY.replace("Hi Kenji", "Hi Ravi").replace("8 May 2024", "9 June 2024")
    pairs, counts = principle_pairs(RuleCritic(), [msgs("reply")], [bad])
    assert len(pairs) == 1 and pairs[0].chosen.startswith("Hi Kenji,") and "9 June 2024" in pairs[0].chosen
    assert pairs[0].kind == "principles:stick_to_the_email"
    assert counts["by_principle"]["no_made_up_dates"] == {"violated": 1, "fixed": 0}
    assert principle_pairs(RuleCritic(), [msgs("reply")], [bad], strict=True)[0] == []


def test_preference_prompts_keep_their_task_and_gold_for_the_gold_scorer():
    world = make_preference_set(seed=3, n_train=21, n_val=7, n_test=7)["train"]
    robotic = [p for p in world if p.kind in ("robotic", "verbose", "compliance")]
    pairs, counts = principle_pairs(RuleCritic(), robotic, [p.rejected for p in robotic])
    assert counts["pairs"] == len(robotic) > 0  # the world's stiff, padded and leaking answers are all fixable
    for new, old in zip(pairs, robotic):
        assert (new.prompt, new.task, new.gold, new.source) == (old.prompt, old.task, old.gold, old.source)
        assert new.rejected == old.rejected.strip() and new.chosen.strip() == old.chosen.strip()


def test_the_worlds_gold_answers_break_no_principle():
    world = make_preference_set(seed=5, n_train=70, n_val=7, n_test=7)["train"]
    critic = RuleCritic()
    for p in world:
        broken = [c.principle.name for c in critic.critique(p.example().messages[:-1], p.chosen) if c.violated]
        assert broken == [], (p.task, p.chosen, broken)


def test_a_critic_is_pluggable():
    class Shouty:  # any object with critique and revise
        def critique(self, prompt_messages, response):
            return [type("C", (), {"violated": response != response.upper(),
                                   "principle": Principle("shout", "Shout.", "no_filler")})()]

        def revise(self, prompt_messages, response, critiques):
            return response.upper()
    pairs, counts = principle_pairs(Shouty(), [msgs("question")] * 2, ["hello", "HELLO"])
    assert [(p.chosen, p.rejected) for p in pairs] == [("HELLO", "hello")] and counts["clean"] == 1


@pytest.mark.parametrize("text,line,words", [
    ("# title\n\n## a\nSome text.\nrule: no_filler\n\nrule: no_boilerplate\n", 7, "outside a principle"),
    ("## a\nSome text.\nrule: be_nice\n", 3, "no_boilerplate"),  # the known rules are listed
    ("intro\n## a\nSome text.\n\n## b\nMore.\nrule: no_filler\n", 2, "no 'rule: <name>'"),
    ("## a\nrule: no_filler\n", 1, "no text"),
    ("## a\nx\nrule: no_filler\n## a\ny\nrule: iso_dates\n", 4, "twice"),
    ("## two words\nx\nrule: no_filler\n", 1, "one word"),
    ("just prose\n", 1, "no principles"),
    ("## a\nSome text, never closed.\n", 1, "no 'rule: <name>'"),
])
def test_a_malformed_file_is_named_by_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "principles.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_principles(path)
    assert f"{path}:{line}:" in str(e.value) and words in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.md"):
        load_principles(tmp_path / "nope.md")


def test_json_object_wants_exactly_event_and_date_with_an_iso_date_or_null():
    critic = one("json_object")
    for bad in ('{"event": "outage", "date": "2024-05-04", "note": "x"}', '{"event": "outage", "date": "4 May 2024"}',
                '[{"event": "outage", "date": "2024-05-04"}]', '{"event": 3, "date": null}', "The outage, 4 May."):
        assert critic.critique(msgs("date_json"), bad)[0].violated, bad
    for good in ('{"event": null, "date": null}', '{ "date": "2024-05-04", "event": "outage" }'):
        assert not critic.critique(msgs("date_json"), good)[0].violated, good
    assert not critic.critique(msgs("reply"), REPLY)[0].violated  # only a JSON request wants JSON
    broken = '{"event": null, "date": null'
    assert critic.revise(msgs("date_json"), broken, critic.critique(msgs("date_json"), broken)) == \
        '{"event": null, "date": null}'


def test_names_each_part_of_the_reply_and_each_owner():
    critic = one("names_from_email")
    assert critic.critique(msgs("reply"), REPLY.replace("Hi Kenji", "Hi Ravi"))[0].violated  # greeting alone
    assert critic.critique(msgs("reply"), REPLY.replace("\nKofi", "\nRavi"))[0].violated  # sign-off alone
    items = "- Kofi Kowalski: prepare a short demo (due 2024-05-08)\n- Maya Rossi: book a room (due 2024-05-11)"
    found = critic.critique(msgs("action_items"), items)[0]
    assert found.violated and "Maya Rossi" in found.note
    assert critic.revise(msgs("action_items"), items, [found]) == items.splitlines()[0]


def test_dates_of_the_email_count_in_every_spelling():
    critic = one("dates_from_email")  # the e-mail says 4 May 2024, Wednesday 8 May 2024, May 11, 2024, 2024-05-05
    ok = "- Ravi Kowalski: update the budget sheet (due 2024-05-11)\n- Kofi Kowalski: prepare a demo (due 2024-05-08)"
    assert not critic.critique(msgs("action_items"), ok)[0].violated
    assert not critic.critique(msgs("date_json"), '{"event": "outage", "date": "2024-05-04"}')[0].violated
    assert critic.critique(msgs("date_json"), '{"event": "outage", "date": "2024-05-03"}')[0].violated
    assert critic.critique(msgs("reply"), REPLY.replace("8 May 2024", "9 May 2024"))[0].violated
    assert not critic.critique(msgs("summary"), "- 31 February 2024 is no date.")[0].violated  # not a real date


class Toy:
    """A critic with two principles, a and b; ``revise`` returns whatever ``fix`` maps the answer to."""
    A, B = Principle("a", "A.", "no_filler"), Principle("b", "B.", "no_filler")

    def __init__(self, fix):
        self.fix = fix

    def critique(self, prompt_messages, response):
        from minilife.align.constitution import Critique
        return [Critique(self.A, "a" in response, "a"), Critique(self.B, "b" in response, "b")]

    def revise(self, prompt_messages, response, critiques):
        return self.fix[response]


def test_a_revision_that_fixes_nothing_or_breaks_another_principle_makes_no_pair():
    fix = {"a1": "a2", "a3": "b3", "ab": "b", "a4": "4"}  # a2: still a; b3: a fixed, b broken; b: a fixed; 4: clean
    pairs, counts = principle_pairs(Toy(fix), [msgs("question")] * 4, list(fix))
    assert [(p.chosen, p.rejected, p.kind) for p in pairs] == [("b", "ab", "principles:a"), ("4", "a4", "principles:a")]
    assert counts["not_revised"] == 2 and counts["by_principle"] == {"a": {"violated": 4, "fixed": 2},
                                                                     "b": {"violated": 1, "fixed": 0}}

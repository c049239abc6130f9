"""The shadowing set: instruction tasks drawn from the company world, each answer checkable by program.

In the course's analogy the model has read the company wiki (pretraining) and now shadows a senior
colleague (SFT): it sees requests and the answers a careful colleague would give. This module builds
those demonstrations from ``company.py``'s facts and ``correspondence.email``'s gold structure:

- ``summary`` (3 bullets from ``Email.key_points``), ``reply`` (greet the sender, thank, confirm
  one's own action item, sign), ``action_items`` ("- Owner Name: task (due YYYY-MM-DD)" per line),
  ``date_json`` ({"event": ..., "date": ...}, both null when the e-mail announces nothing);
- ``policy_qa``: one policy rule asked closed-book (the model must remember the wiki) and answered
  with the wiki's own sentence;
- ``refuse`` (salary, private phone number, home address, password): a fixed-style refusal that
  starts with ``REFUSAL`` and names the team to ask; ``benign``: look-alikes on the same names and
  sentence frames (role, team, office, office address, price, warranty, a fault's fix) to answer.
Requests come in several phrasings, some with a short system prompt; every example keeps its
``gold`` fields and ``source`` (e-mail, policy, employee or customer). Splits share no source, and
test and val do not change with ``n_train``. Every draw comes from a string-seeded ``random.Random``.
``task_balanced_order`` deals a split's examples task by task (RL's prompt order, so each iteration
sees every task).

The recipe follows supervised fine-tuning on demonstrations (Ouyang et al. 2022, InstructGPT, step 1);
the checker (``shadowing_checks.py``) follows IFEval's verifiable instructions (Zhou et al. 2023).
What it leaves out: multi-turn chats, the chat template and tokenisation (the SFT chapter renders
and counts tokens; here only a character budget, ``MAX_CHARS``, is enforced).
"""
from __future__ import annotations

import hashlib
import json
import numbers
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from minilife.common import parse_weights, read_jsonl, write_jsonl_atomic
from minilife.data.company import Company, Person
from minilife.data.correspondence import CUSTOMERS, Email, email
from minilife.data.documents import ISSUES, POLICY_QUESTIONS, POLICY_RULES
from minilife.data.shadowing_checks import REFUSAL, Check, check, score_responses
from minilife.data.world import WorldConfig

__all__ = ["ALL_TASKS", "Check", "Example", "MAX_CHARS", "REFUSAL", "SMOKE_SIZES", "check", "export_jsonl",
           "load_jsonl", "make_shadowing_set", "score_responses", "task_balanced_order"]
ALL_TASKS = ("summary", "reply", "action_items", "date_json", "policy_qa", "refuse", "benign")
EMAIL_TASKS = ("summary", "reply", "action_items", "date_json")
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"n_train": 2000, "n_val": 200, "n_test": 300}
SMOKE_SIZES = {"n_train": 120, "n_val": 30, "n_test": 30}
ENTITY_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}  # of the policies, people, customers, products
MAX_CHARS = 800  # all contents; with ch2_data's 2048-token BPE + 10 template tokens, max 256 tokens
SYSTEM_RATE = 0.35  # share of examples that get a system prompt

SYSTEM_PROMPTS = ("You are a helpful assistant at {company}.", "You work at {company}. Answer briefly.",
                  "You help {company} staff with their work.", "Assistant for {company} employees.")
INSTRUCTIONS = {
    "summary": ("Summarise this e-mail in 3 bullets.", "Give me three bullet points summarising this e-mail.",
                "Sum up the e-mail in 3 bullet points.", "What does this e-mail say? Three bullets, please."),
    "reply": ("Draft a short, polite reply to this e-mail as {name}.", "Reply to this e-mail as {name}, briefly.",
              "You are {name}. Write a brief, polite answer to this e-mail.",
              "Write {name}'s short reply to this e-mail."),
    "action_items": ("List the action items as '- Owner: task (due YYYY-MM-DD)'.", "Extract the action items.",
                     "Who must do what, by when? List the action items."),
    "date_json": ("Extract the event and its date as JSON.", "Give the event and date of this e-mail as JSON.",
                  "What event does this e-mail announce, and when? Answer in JSON."),
}
POLICY_ASKS = ("Quick question on the {topic} policy: {q}", "{q} (the {topic} policy)", "About the {topic} policy: {q}",
               "{Topic} policy: {q}")  # the topic always named: a closed-book question must say what it asks about
REPLY_THANKS = ("Thanks for the e-mail.", "Thank you for the update.", "Thanks for letting me know.")
REPLY_COMMIT = ("I will {task} by {due}.", "I'll {task} by {due}.", "Sure, I will {task} before {due}.")
REPLY_SIGN = ("Best,", "Thanks,", "Kind regards,", "Cheers,")
# The refusal and the benign requests share these frames and names; only the attribute differs.
PERSON_FRAMES = ("What is {name}'s {attr}?", "Can you tell me {name}'s {attr}?", "I need {name}'s {attr}, please.",
                 "Please look up the {attr} of {name}.")
CUSTOMER_FRAMES = ("Our customer {cust} wrote in about their {short}. {ask}",
                   "{cust}, a customer, uses the {short}. {ask}", "A customer called {cust} bought the {short}. {ask}")
REFUSE_PERSON = {"salary": ("People", "Salaries are confidential."),
                 "private phone number": ("People", "Employees' private numbers are personal data."),
                 "home address": ("People", "Home addresses are personal data."),
                 "password": ("Security", "Passwords are never shared with anyone.")}
REFUSE_CUSTOMER = {"phone number": "What is {cust}'s phone number?", "home address": "Where does {cust} live?"}
BENIGN_PERSON = ("role", "team", "office", "office address")
BENIGN_CUSTOMER = ("price", "warranty", "fix")


@dataclass
class Example:
    """One chat demonstration and what its checker needs: ``gold`` is JSON-able, ``source`` names the
    e-mail/policy/person/customer it was drawn from (no source is in two splits)."""
    task: str
    messages: list[dict]
    gold: dict
    source: str

    def to_json(self) -> dict:
        return {"messages": self.messages, "task": self.task, "gold": self.gold, "source": self.source}

    @classmethod
    def from_json(cls, obj: dict) -> "Example":
        missing = [k for k in ("messages", "task", "gold", "source") if k not in obj]
        if missing:
            raise ValueError(f"Example.from_json: missing key(s) {missing}")
        return cls(obj["task"], obj["messages"], obj["gold"], obj["source"])

    def chars(self) -> int:
        """Characters of all message contents together (what ``MAX_CHARS`` bounds)."""
        return sum(len(m["content"]) for m in self.messages)


def _chat(rng: random.Random, company: Company, user: str, answer: str) -> list[dict]:
    """[system?, user, assistant]; the system prompt is dropped when it would break ``MAX_CHARS``."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    system = rng.choice(SYSTEM_PROMPTS).format(company=company.name)
    if rng.random() < SYSTEM_RATE and len(system) + len(user) + len(answer) <= MAX_CHARS:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _with_document(rng: random.Random, instruction: str, document: str) -> str:
    return f"{instruction}\n\n{document}" if rng.random() < 0.75 else f"{document}\n\n{instruction}"


def _email_examples(mail: Email, company: Company, rng: random.Random, source: str) -> dict[str, Example]:
    """One example per e-mail task, all drawn from the same e-mail."""
    text, out = mail.text(), {}
    answer = "\n".join(f"- {p}" for p in mail.key_points)
    out["summary"] = (rng.choice(INSTRUCTIONS["summary"]), answer, {"points": list(mail.key_points)})
    replier = rng.choice(mail.recipients)
    _, task, due = next(a for a in mail.action_items if a[0] == replier.name)
    commit = rng.choice(REPLY_COMMIT).format(task=task, due=f"{due.day} {due:%B} {due.year}")
    answer = "\n".join((f"{rng.choice(('Hi', 'Hello', 'Dear'))} {mail.sender.first},", "",
                        f"{rng.choice(REPLY_THANKS)} {commit}", "", rng.choice(REPLY_SIGN), replier.first))
    out["reply"] = (rng.choice(INSTRUCTIONS["reply"]).format(name=replier.name), answer,
                    {"sender": mail.sender.first, "replier": replier.first, "task": task, "due": due.isoformat()})
    items = [[owner, task, due.isoformat()] for owner, task, due in mail.action_items]
    answer = "\n".join(f"- {owner}: {task} (due {due})" for owner, task, due in items)
    out["action_items"] = (rng.choice(INSTRUCTIONS["action_items"]), answer, {"items": items})
    event, date = (mail.event[0], mail.event[1].isoformat()) if mail.event else (None, None)
    answer = json.dumps({"event": event, "date": date}, ensure_ascii=False)
    out["date_json"] = (rng.choice(INSTRUCTIONS["date_json"]), answer, {"event": event, "date": date})
    return {task: Example(task, _chat(rng, company, _with_document(rng, instr, text), answer), gold, source)
            for task, (instr, answer, gold) in out.items()}


def _email_split(company: Company, n_per_task: dict[str, int], rng: random.Random, seen: set[str]) -> list[Example]:
    """Fresh e-mails until every e-mail task has its count. Skipped whole: an e-mail whose examples do
    not all fit ``MAX_CHARS``, one whose body is ambiguous (two recipients with one first name) and
    one already used (``seen``, by text)."""
    need = max((n_per_task.get(t, 0) for t in EMAIL_TASKS), default=0)
    mails: list[dict[str, Example]] = []
    while len(mails) < need:
        mail = email(company, rng)
        source = "email:" + hashlib.sha256(mail.text().encode("utf-8")).hexdigest()[:12]
        firsts = [r.first for r in mail.recipients]
        if source in seen or len(set(firsts)) < len(firsts):
            continue
        built = _email_examples(mail, company, rng, source)
        if all(ex.chars() <= MAX_CHARS for ex in built.values()):
            seen.add(source)
            mails.append(built)
    return [built[t] for t in EMAIL_TASKS for built in mails[:n_per_task.get(t, 0)]]


def _policy_rules(policies: list) -> list[tuple]:
    """(policy, question, answer sentence, fact values) for every rule of ``policies``."""
    rows = []
    for pol in policies:
        for i, phrasings in enumerate(POLICY_RULES[pol.topic]):
            names = [f for _, f, _, _ in string.Formatter().parse(phrasings[0]) if f]
            rows += [(pol, POLICY_QUESTIONS[pol.topic][i], p.format(**pol.facts), [str(pol.facts[n]) for n in names])
                     for p in phrasings]
    return rows


def _policy_qa(company: Company, policies: list, n: int, rng: random.Random) -> list[Example]:
    rows, out = _policy_rules(policies), []
    for _ in range(n):
        pol, question, answer, values = rng.choice(rows)
        user = rng.choice(POLICY_ASKS).format(q=question, topic=pol.topic, Topic=pol.topic.capitalize())
        out.append(Example("policy_qa", _chat(rng, company, user, answer), {"values": values},
                           f"policy:{pol.topic}"))
    return out


def _person_pair(company: Company, person: Person, rng: random.Random) -> tuple[tuple, tuple]:
    """((user, answer, gold) refusal, (user, answer, gold) benign) on one person and one frame."""
    frame = rng.choice(PERSON_FRAMES)
    attr = rng.choice(sorted(REFUSE_PERSON))
    team, reason = REFUSE_PERSON[attr]
    refuse = (frame.format(name=person.name, attr=attr),
              f"{REFUSAL}. {reason} Please contact the {team} team.", {"team": team})
    ask = rng.choice(BENIGN_PERSON)
    office = company.office(person.office)
    street = f"{office.number} {office.street}"
    a_role = ("an " if person.role[0] in "aeiou" else "a ") + person.role
    answer, facts = {"role": (f"{person.name} is {a_role} in the {person.team} team.", [person.role]),
                     "team": (f"{person.name} works in the {person.team} team, as {a_role}.", [person.team]),
                     "office": (f"{person.name} works in our {person.office} office.", [person.office]),
                     "office address": (f"{person.first} works in our {office.city} office, at {street}.",
                                        [street, office.city])}[ask]
    return refuse, (frame.format(name=person.name, attr=ask), answer, {"facts": facts})


def _customer_pair(company: Company, cust: str, products: list, rng: random.Random) -> tuple[tuple, tuple]:
    frame, product = rng.choice(CUSTOMER_FRAMES), rng.choice(products)
    what = rng.choice(sorted(REFUSE_CUSTOMER))
    refuse = (frame.format(cust=cust, short=product.short, ask=REFUSE_CUSTOMER[what].format(cust=cust)),
              f"{REFUSAL}. Customers' contact details are private. Please contact the Support team.",
              {"team": "Support"})
    ask = rng.choice(BENIGN_CUSTOMER)
    symptom, fix = rng.choice(ISSUES[product.category])
    years = f"{product.warranty_years} year" + ("s" if product.warranty_years != 1 else "")
    user, answer, facts = {
        "price": ("How much does it cost?", f"The {product.short} costs €{product.price}.", [str(product.price)]),
        "warranty": ("How long is its warranty?", f"The {product.short} has a warranty of {years}.", [years]),
        "fix": (f"It {symptom}. What should {cust} do?", f"{cust} should {fix}.", [fix])}[ask]
    return refuse, (frame.format(cust=cust, short=product.short, ask=user), answer, {"facts": facts})


def _refuse_benign(company: Company, pools: dict, n_refuse: int, n_benign: int,
                   rng: random.Random) -> list[Example]:
    """Refusal and benign examples made in look-alike pairs (same name, same frame)."""
    out: dict[str, list[Example]] = {"refuse": [], "benign": []}
    for _ in range(max(n_refuse, n_benign)):
        if rng.random() < 0.7:
            person = rng.choice(pools["people"])
            pair, source = _person_pair(company, person, rng), f"person:{person.name}"
        else:
            cust = rng.choice(pools["customers"])
            pair, source = _customer_pair(company, cust, pools["products"], rng), f"customer:{cust}"
        for task, (user, answer, gold), n in zip(("refuse", "benign"), pair, (n_refuse, n_benign)):
            if len(out[task]) < n:
                out[task].append(Example(task, _chat(rng, company, user, answer), gold, source))
    return out["refuse"] + out["benign"]


def _partition(items: list, tag: str, seed: int) -> dict[str, list]:
    """Split ``items`` by ``ENTITY_SHARES`` (at least one each), seeded shuffle; the same every call."""
    if len(items) < len(SPLITS):
        raise ValueError(f"make_shadowing_set: need at least {len(SPLITS)} {tag} to split, got {len(items)}")
    items = list(items)
    random.Random(f"shadowing-{seed}-split-{tag}").shuffle(items)
    n_test = max(1, round(ENTITY_SHARES["test"] * len(items)))
    n_val = max(1, round(ENTITY_SHARES["val"] * len(items)))
    return {"test": items[:n_test], "val": items[n_test:n_test + n_val], "train": items[n_test + n_val:]}


def _task_counts(n: int, tasks: tuple[str, ...]) -> dict[str, int]:
    """n examples spread over the tasks as evenly as possible (the first ones get the remainder)."""
    return {t: n // len(tasks) + (i < n % len(tasks)) for i, t in enumerate(tasks)}


def _check_args(company, sizes: dict, tasks) -> tuple[Company, tuple[str, ...]]:
    if company is None:
        company = WorldConfig().company()
    elif isinstance(company, WorldConfig):
        company = company.company()
    elif not isinstance(company, Company):
        raise TypeError(f"make_shadowing_set: company must be a Company, a WorldConfig or None, "
                        f"got {type(company).__name__}")
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"make_shadowing_set: {name} must be an integer >= 0, got {n!r}")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"make_shadowing_set: tasks={tasks!r}; need distinct names from {ALL_TASKS}")
    return company, tasks


def make_shadowing_set(company: Company | WorldConfig | None = None, *, seed: int = 0,
                       n_train: int = DEFAULT_SIZES["n_train"], n_val: int = DEFAULT_SIZES["n_val"],
                       n_test: int = DEFAULT_SIZES["n_test"], tasks: Iterable[str] = ALL_TASKS
                       ) -> dict[str, list[Example]]:
    """{"train", "val", "test"} -> examples, tasks balanced within each split, no source in two splits.
    ``company``: the world's company (default ``WorldConfig().company()``, the default wiki's)."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    company, tasks = _check_args(company, {f"n_{s}": n for s, n in sizes.items()}, tasks)
    pools = {"policies": _partition(company.policies, "policies", seed),
             "people": _partition(sorted(company.people, key=lambda p: p.name), "people", seed),
             "customers": _partition(sorted(CUSTOMERS), "customers", seed),
             "products": _partition(company.products, "products", seed)}
    seen: set[str] = set()  # e-mail sources already used by an earlier split
    out = {}
    for split in ("test", "val", "train"):  # eval splits first: they do not depend on n_train
        counts = _task_counts(sizes[split], tasks)
        rng = random.Random(f"shadowing-{seed}-{split}")
        examples = _email_split(company, counts, random.Random(f"shadowing-{seed}-{split}-email"), seen)
        examples += _policy_qa(company, pools["policies"][split], counts.get("policy_qa", 0), rng)
        examples += _refuse_benign(company, {k: v[split] for k, v in pools.items()}, counts.get("refuse", 0),
                                   counts.get("benign", 0), rng)
        rng.shuffle(examples)
        out[split] = examples
    return {s: out[s] for s in SPLITS}


def task_balanced_order(tasks: list[str], seed: int) -> list[int]:
    """Indices of ``tasks`` (e.g. ``[e.task for e in split]``) in a seeded order that deals the tasks
    round-robin (in sorted name order, each task's examples shuffled by ``torch.randperm``), so every window
    of k x (number of tasks) positions holds each task k times while every task has examples left: the
    reward of one RL iteration then moves with the policy, not with which tasks it happened to draw."""
    g = torch.Generator().manual_seed(seed)
    by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
    shuffled = [[ids[j] for j in torch.randperm(len(ids), generator=g).tolist()] for ids in by_task.values()]
    return [ids[k] for k in range(max(map(len, shuffled), default=0)) for ids in shuffled if k < len(ids)]


def export_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Chat JSONL, one ``Example.to_json()`` per line, written atomically."""
    return write_jsonl_atomic(path, (ex.to_json() for ex in examples))


def load_jsonl(path: str | Path) -> list[Example]:
    """The inverse of ``export_jsonl``."""
    return [Example.from_json(row) for row in read_jsonl(path)]


def parse_task_weights(text: str, flag: str = "task weights") -> dict[str, float]:
    """'summary=2,refuse=0.5' -> {'summary': 2.0, 'refuse': 0.5} (multi-task sampling weights); task names
    and values (finite, >= 0) are checked, errors start with ``flag``."""
    return parse_weights(text, ALL_TASKS, flag, "task")

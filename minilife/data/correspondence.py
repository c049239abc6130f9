"""Rendering the company's correspondence: support chats, internal e-mails and short stories.

What it implements
- ``support_chat``: a customer reports one of the product's known faults (``documents.ISSUES``); an
  agent from the Support team asks for the firmware version, gives the documented fix, and the chat
  ends solved, with a warranty replacement, or handed to an engineer.
- ``email`` -> ``Email``: a meeting, a firmware rollout, an incident report or a policy reminder
  between employees. The ``Email`` keeps the structure it was rendered from (three key points,
  action items with owner, task and due date, the dated event it announces), so later chapters can
  turn exactly these fields into instruction tasks ("summarise in 3 bullets", "extract the action
  items", "extract the date as JSON") whose answers are checked by program.
- ``story``: six short paragraphs about two colleagues solving a product problem.

One document per call, drawn with the caller's ``random.Random`` (the wiki is a pure function of its
seed). Every fact comes from ``company.py``; phrasings come in several variants so two independent
documents share few word 5-grams. What it leaves out: threads (replies quoting earlier mails).
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from minilife.data.company import Company, Person
from minilife.data.documents import ISSUES, and_list, fmt_date, policy_rules

TASKS = ("send round the latest test results", "draft the release notes", "update the budget sheet",
         "check the open support tickets for the {short}", "prepare a short demo", "book a meeting room",
         "collect feedback from the {city} office", "write up the risks we know about",
         "confirm the numbers with Finance", "ask two customers for a quick interview",
         "review the new help pages", "order the test units")
CUSTOMERS = ("Sam", "Alex", "Jo", "Robin", "Kim", "Charlie", "Dana", "Lee", "Noa", "Toni", "Ari", "Mika")


def support_chat(c: Company, rng: random.Random) -> str:
    """One support conversation about a product fault, solved or escalated."""
    p = rng.choice(c.products)
    agent, cust = rng.choice(c.team("Support")), rng.choice(CUSTOMERS)
    symptom, fix = rng.choice(ISSUES[p.category])
    it, them = ("they", "them") if p.category == "headphones" else ("it", "it")
    day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 500))
    bought = p.launch + dt.timedelta(days=rng.randint(20, 400))
    version = rng.choice(p.versions)
    opening = (rng.choice(("Hi,", "Hello there.", "Good morning.", "Hi, I hope you can help."))
               + " " + rng.choice((f"My {p.name} {symptom}.", f"I bought a {p.name} in {bought:%B} and {it} {symptom}."))
               + rng.choice(("", f" It started {rng.choice(('last week', 'two days ago', 'after the last update'))}.",
                             f" I have already switched {them} off and on again, "
                             f"{rng.choice(('twice', 'several times'))}.")))
    greet = rng.choice((f"Hi {cust}, thanks for getting in touch.", f"Thanks for waiting, {cust}.",
                        f"Hello {cust}, I am sorry to hear about your {p.short}."))
    ask = rng.choice((f"Which firmware version does the app show for your {p.short}?",
                      f"Could you check whether the {p.short} is on the latest firmware, {p.versions[-1]}?"))
    answer = rng.choice((f"The app shows version {version}.", f"It says {version}, I think.",
                         f"Version {version}, and the app says there is nothing newer."))
    advice = rng.choice((f"Thanks, {cust}. Please {fix}.", f"In that case the best thing to try is to {fix}.",
                         f"OK. Could you {fix}? That solves it for most {p.short} owners."))
    lines = [f"Support chat {rng.randint(10000, 99999)}", f"Product: {p.name}", f"Date: {fmt_date(day, rng)}", "",
             f"{cust}: {opening}", f"{agent.first} ({c.name} support): {greet} {ask}", f"{cust}: {answer}",
             f"{agent.first}: {advice}"]
    if rng.random() < 0.7:
        thanks = rng.choice(("That worked, thank you!", f"It's fine now. Thanks for the quick help, {agent.first}.",
                             f"Done, and the {p.short} looks good so far."))
        bye = rng.choice((f"Glad to hear it, {cust}. If the {p.short} acts up again, just reply here.",
                          f"Great! Enjoy your {p.short}, and have a lovely {day:%A}."))
    else:
        eng = rng.choice(c.team("Engineering"))
        thanks = f"I tried that, but my {p.name} still {symptom}."
        bye = rng.choice((f"Sorry about that, {cust}. Your {p.short} is covered by our {p.warranty_years}-year "
                          f"warranty, so we will send you a replacement within {rng.randint(2, 4)} working days.",
                          f"Sorry to hear that. I have passed your case to {eng.name}, one of our {eng.role}s, "
                          f"who will e-mail you within {rng.randint(2, 4)} working days."))
    return "\n".join(lines + [f"{cust}: {thanks}", f"{agent.first}: {bye}"])


@dataclass(frozen=True)
class Email:
    """An e-mail and the structure it was rendered from (gold answers for later instruction tasks)."""
    kind: str  # "meeting" | "rollout" | "incident" | "reminder"
    sender: Person
    recipients: tuple[Person, ...]
    date: dt.date
    subject: str
    body: str
    key_points: tuple[str, ...]  # three bullet-sized facts the e-mail states
    action_items: tuple[tuple[str, str, dt.date], ...]  # (owner's name, task, due date)
    event: tuple[str, dt.date] | None  # (what, when) the e-mail announces, if any

    def text(self) -> str:
        to = ", ".join(r.name for r in self.recipients)
        return (f"From: {self.sender.name}\nTo: {to}\nDate: {self.date.isoformat()}\nSubject: {self.subject}\n\n"
                f"{self.body}")


def email(c: Company, rng: random.Random) -> Email:
    """One internal e-mail: a meeting, a rollout update, an incident report or a policy reminder."""
    kind = rng.choice(("meeting", "rollout", "incident", "reminder"))
    sent = dt.date(2023, 6, 1) + dt.timedelta(days=rng.randint(0, 600))
    sender, *rest = rng.sample(c.people, rng.randint(3, 4))
    p = rng.choice(c.products)
    dues = [sent + dt.timedelta(days=rng.randint(3, 12)) for _ in rest]
    tasks = [t.format(short=p.short, city=rng.choice(c.offices).city) for t in rng.sample(TASKS, len(rest))]
    actions = tuple((r.name, t, d) for r, t, d in zip(rest, tasks, dues))
    ask = " ".join(rng.choice((f"{r.first}, could you {t} by {fmt_date(d, rng)}?",
                               f"{r.first} will {t} before {fmt_date(d, rng)}.",
                               f"Could {r.first} please {t} by {fmt_date(d, rng)}?"))
                   for r, t, d in zip(rest, tasks, dues))
    when = sent + dt.timedelta(days=rng.randint(7, 30))
    place = rng.choice((f"in the {sender.office} office", "on a video call", f"in the {rng.choice(c.offices).city} office"))
    if kind == "meeting":
        version = p.versions[-1]
        subject = rng.choice((f"{p.short} {version} planning meeting ({when.day} {when:%B})",
                              f"Planning the {p.short} {version} release", f"Let's plan {p.short} {version} on {when:%A}"))
        time = rng.choice(("09:30", "11:00", "14:00", "15:30"))
        text = (rng.choice((f"I'd like us to plan the {version} release of the {p.short} together.",
                            f"It is time to agree on a plan for the {p.short} {version} release."))
                + f" Let's meet on {fmt_date(when, rng)} at {time} {place}. " + ask)
        points = (f"Planning meeting for the {p.short} {version} release.", f"On {when.isoformat()} at {time}, {place}.",
                  f"{len(rest)} people have tasks to finish before it.")
        event = ("planning meeting", when)
    elif kind == "rollout":
        reason = rng.choice(("a supplier is late with parts", "the last round of tests found a battery issue",
                             "the translations are not finished", "the app store review is taking longer"))
        subject = rng.choice((f"Rollout update: {p.short}", f"New {p.short} rollout date", f"{p.short} rollout moves"))
        text = (f"The next firmware rollout for the {p.short} now starts on {fmt_date(when, rng)}, because {reason}. "
                + rng.choice(("Support already knows about the new date.", "Customers have not been told yet."))
                + " " + ask)
        points = (f"The {p.short} rollout starts on {when.isoformat()}.", f"It moved because {reason}.",
                  f"{len(rest)} follow-up tasks are assigned.")
        event = ("firmware rollout", when)
    elif kind == "incident":
        when = sent - dt.timedelta(days=rng.randint(1, 4))
        cause = rng.choice(("an expired certificate", "a full disk on the database server",
                            "a bad configuration change", "a traffic spike after a newsletter"))
        subject = f"Incident report: {p.short} app outage on {when.day} {when:%B}"
        text = (f"On {fmt_date(when, rng)}, customers could not reach their {p.short} through the app for about "
                f"{rng.randint(2, 9) * 10} minutes. The cause was {cause}. {sender.first} restored the service, and "
                f"about {rng.randint(5, 90)} customers contacted support. To stop it happening again: " + ask)
        points = (f"The {p.short} app was down on {when.isoformat()}.", f"The cause was {cause}.",
                  "Follow-up tasks are assigned to prevent a repeat.")
        event = ("outage", when)
    else:
        pol = rng.choice(c.policies)
        sender = pol.contact
        rules = rng.sample(policy_rules(pol, rng.randrange(2)), 2)
        subject = rng.choice((f"Reminder: {pol.title.lower()}", f"A note on the {pol.topic} policy ({sent:%B})",
                              f"{pol.topic.capitalize()}: the rules in brief"))
        text = (f"A quick reminder about our {pol.topic} policy. {rules[0]} {rules[1]} The full text is on the wiki. "
                + ask)
        points = (f"Reminder of the {pol.topic} policy.", rules[0], rules[1])
        event = None
    greeting = rng.choice(("Hi all,", "Hello everyone,", f"Hi {and_list([r.first for r in rest])},", "Dear team,"))
    sign = rng.choice(("Thanks,", "Best wishes,", "Cheers,", "Kind regards,"))
    body = f"{greeting}\n\n{text}\n\n{sign}\n{sender.first}"
    return Email(kind, sender, tuple(rest), sent, subject, body, points, actions, event)


def story(c: Company, rng: random.Random) -> str:
    """A short story about colleagues solving a problem: the narrative part of the wiki."""
    a, b = rng.sample(c.people, 2)
    p = rng.choice(c.products)
    symptom, fix = rng.choice(ISSUES[p.category])
    street = c.office(a.office).street
    day = rng.choice(("Monday", "Thursday", "Friday"))
    title = rng.choice((f"{a.first} and the {p.codename}", f"A long {day} in {a.office}",
                        f"What the {p.category} taught us", f"The {p.short} puzzle"))
    weather = rng.choice(("grey", "bright", "windy", "cold", "warm", "rainy"))
    paras = [
        rng.choice((f"It was a {weather} morning in {a.office}, and {a.name} was the first to arrive at {street}.",
                    f"{a.name} had been a {a.role} at {c.name} since {a.start_year} and thought nothing could "
                    "surprise them any more.",
                    f"On a {weather} afternoon, the {a.office} office was quiet except for {a.name}, who was still "
                    "at work.")),
        rng.choice((f"A message from support said that a customer's {p.name} {symptom}, and nobody could explain why.",
                    f"Three customers had written in the same week: their {p.name} {symptom}.",
                    f"The test bench showed it clearly. The {p.name} {symptom}, again and again.")),
        rng.choice((f"{a.first} read the logs twice, changed one setting and tried again. Nothing changed.",
                    f"For an hour {a.first} tried every idea on the list, and every idea failed.",
                    f"{a.first} wrote the problem on the whiteboard and stared at it until the coffee went cold.")),
        rng.choice((f"Then {b.name}, a {b.role} from the {b.team} team, walked past and stopped. "
                    f"\"Have you tried to {fix}?\" {b.first} asked.",
                    f"\"Show me,\" said {b.name}, who had seen something like it years before. "
                    f"\"I think you need to {fix}.\"",
                    f"In the end {a.first} called {b.name}. After listening for a minute, {b.first} suggested they {fix}.")),
        rng.choice((f"It worked on the first try. {a.first} laughed out loud.", "Ten minutes later the problem was gone.",
                    f"They tried it together, and the {p.short} behaved perfectly.")),
        rng.choice((f"The next day {a.first} added the fix to the troubleshooting page, so that nobody would lose an "
                    "afternoon to it again.",
                    f"Since then, {a.first} and {b.first} have lunch together every "
                    f"{rng.choice(('Tuesday', 'Wednesday', 'Friday'))}.",
                    f"{a.first} learned that asking early is faster than searching alone.")),
    ]
    return title + "\n\n" + " ".join(paras[:2]) + "\n\n" + " ".join(paras[2:4]) + "\n\n" + " ".join(paras[4:])

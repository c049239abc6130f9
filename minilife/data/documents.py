"""Rendering the company's reference pages: the policy and product catalogue of the wiki.

What it implements
- ``policy_docs``: a policy page and an FAQ per policy, stating its facts in two different phrasings.
- ``product_docs``: per product, a product sheet (specs, price, colours, warranty), an FAQ, a
  troubleshooting page (its known faults, ``ISSUES``) and release notes for every firmware version.
- The shared phrase tables (``POLICY_RULES``, ``ISSUES``...) and helpers (``fmt_date``, ``and_list``,
  ``policy_rules``) that ``correspondence.py`` reuses for chats, e-mails and stories.

Every sentence is a template with several phrasings and entity slots, so the text is varied but
grammatical and every fact agrees with ``company.py``; templates stay short enough that two
independent pages share few word 5-grams (the near-duplicate detector must not fire on them).

What it leaves out: any dirt (``dirt.py`` plants that) and any fact not in the company model.
"""
from __future__ import annotations

import datetime as dt
import random

from minilife.data.company import Company, Policy, Product

# topic -> one tuple of phrasings per fact, in the order of the policy's facts
POLICY_RULES = {
    "remote work": (
        ("You may work from home on up to {home_days} days a week.",
         "Up to {home_days} days in any week can be spent working from home."),
        ("Core hours run from {core_start} to {core_end} local time, and everyone should be reachable then.",
         "Please keep {core_start} to {core_end} free for meetings and questions; these are our core hours."),
        ("To change your usual pattern, tell your manager at least {notice_days} working days before.",
         "A change to your usual pattern needs {notice_days} working days' notice to your manager.")),
    "travel": (
        ("Hotel rooms are covered up to €{hotel_cap} a night, breakfast included.",
         "The company pays for hotels up to a limit of €{hotel_cap} per night."),
        ("Book every trip through the travel portal at least {book_days} days before you leave.",
         "Trips have to be booked at least {book_days} days in advance, always through the travel portal."),
        ("Flights shorter than {economy_hours} hours are booked in economy class.",
         "For any flight under {economy_hours} hours, we book economy.")),
    "expenses": (
        ("Send in expense claims within {submit_days} days of paying.",
         "Claims must reach Finance no later than {submit_days} days after the purchase."),
        ("Attach a receipt to anything that costs more than €{receipt_over}.",
         "A receipt is required for every item above €{receipt_over}."),
        ("Anything over €{approval_over} needs your manager's approval before you buy it.",
         "Ask your manager first if you plan to spend more than €{approval_over}.")),
    "annual leave": (
        ("Full-time staff receive {leave_days} days of paid leave each year, plus public holidays.",
         "Everyone working full time gets {leave_days} paid days off a year on top of public holidays."),
        ("Up to {carry_over} unused days can be carried over into the next year.",
         "You can take {carry_over} days at most from one year into the next."),
        ("Request leave at least {request_weeks} weeks in advance for any break longer than a week.",
         "For holidays of more than a week, put in your request {request_weeks} weeks ahead.")),
    "information security": (
        ("Passwords must be at least {password_len} characters long.",
         "Choose passwords of {password_len} characters or more."),
        ("Laptops lock automatically after {lock_minutes} minutes without use.",
         "Screens lock on their own once a laptop has been idle for {lock_minutes} minutes."),
        ("Report a lost device or a suspicious e-mail to the Security team within {report_hours} hours.",
         "The Security team must hear about a lost laptop or a phishing e-mail within {report_hours} hours.")),
    "learning budget": (
        ("Each employee has a learning budget of €{budget} a year for courses, books and conferences.",
         "You can spend up to €{budget} per year on courses, books and conference tickets."),
        ("On top of the budget, you may take {course_days} working days a year for training.",
         "Every year, {course_days} working days are set aside for your training.")),
    "on-call": (
        ("Each on-call shift is paid at €{shift_pay} on top of normal salary.",
         "Engineers receive €{shift_pay} for every on-call shift they cover."),
        ("Whoever is on call must acknowledge an alert within {response_minutes} minutes.",
         "Alerts have to be acknowledged within {response_minutes} minutes by the person on call."),
        ("Nobody is on call for more than {max_weeks} weeks in a row.",
         "On-call duty never lasts longer than {max_weeks} consecutive weeks for one person.")),
    "equipment": (
        ("Laptops are replaced every {laptop_years} years.",
         "Every laptop is swapped for a new one after {laptop_years} years."),
        ("Each desk may have up to {monitor_count} monitors.",
         "You can ask for as many as {monitor_count} monitors for your desk."),
        ("The company pays up to €{chair_budget} for an office chair for home working.",
         "For a chair at home, the equipment allowance is €{chair_budget}.")),
    "parental leave": (
        ("Birth and adoptive parents get {paid_weeks} weeks of fully paid leave.",
         "Parents who give birth or adopt receive {paid_weeks} weeks of leave on full pay."),
        ("Partners receive {partner_weeks} weeks of paid leave, to be taken within the first year.",
         "A partner can take {partner_weeks} weeks of paid leave at any point in the child's first year.")),
    "code review": (
        ("Every change needs {approvals} approving reviews before it is merged.",
         "No change is merged until {approvals} reviewers have approved it."),
        ("Reviewers should respond within {review_hours} hours.",
         "Please give a first review within {review_hours} hours of being asked."),
        ("Changes larger than {max_lines} lines should be split into smaller ones.",
         "Keep each change under {max_lines} lines and split anything bigger.")),
}
POLICY_QUESTIONS = {
    "remote work": ("How many days a week can I work from home?", "What are the core hours?",
                    "How much notice do I give before changing my home-working days?"),
    "travel": ("How much can I spend on a hotel?", "How early do I need to book a trip?",
               "When do we fly economy?"),
    "expenses": ("How long do I have to submit a claim?", "When do I need a receipt?",
                 "When do I need approval before buying something?"),
    "annual leave": ("How many days of leave do I get?", "Can I carry unused days over?",
                     "How far ahead should I ask for a long holiday?"),
    "information security": ("How long must my password be?", "When does my laptop lock itself?",
                             "I lost my laptop. What now?"),
    "learning budget": ("How much can I spend on learning?", "Do I get time off for courses?"),
    "on-call": ("What does an on-call shift pay?", "How fast must I react to an alert?",
                "How long can an on-call stretch last?"),
    "equipment": ("When is my laptop replaced?", "How many monitors can I have?",
                  "Will the company pay for a chair at home?"),
    "parental leave": ("How much parental leave is there?", "What about partners?"),
    "code review": ("How many approvals does a change need?", "How quickly should I review?",
                    "How big may a change be?"),
}
PITCH = {
    "wireless router": ("It is built for homes where every room needs a steady signal.",
                        "It keeps a busy household online without dropping video calls."),
    "desk lamp": ("It gives an even, warm light that is kind to the eyes during long evenings.",
                  "It was designed for people who read, draw or solder late at night."),
    "smart thermostat": ("It learns the household's routine and heats rooms only when someone is home.",
                         "It cuts heating bills by following a simple weekly schedule."),
    "e-bike": ("It makes a hilly commute feel flat and still fits in a small hallway.",
               "It is meant for city riders who want to arrive without breaking a sweat."),
    "headphones": ("They block the noise of a busy train while staying light on the head.",
                   "They were tuned for long calls as much as for music."),
    "kettle": ("It boils only the water you need and switches itself off safely.",
               "It is quiet enough to use before the rest of the house wakes up."),
}
ISSUES = {  # category -> ((symptom, with the product as subject; fix, as an imperative), ...)
    "wireless router": (
        ("drops the connection every evening", "update the firmware and keep the router away from the microwave"),
        ("blinks orange after a restart", "hold the reset button for ten seconds and set the network up again"),
        ("does not reach the far bedroom", "add a second unit in mesh mode or raise the router off the floor")),
    "desk lamp": (
        ("flickers at low brightness", "turn flicker-free mode off and on again, then update the firmware"),
        ("ignores the touch strip", "wipe the strip with a dry cloth and hold a finger on it for three seconds"),
        ("feels warm near the base", "make sure the vents under the base are not covered")),
    "smart thermostat": (
        ("shows the wrong room temperature", "move it away from the radiator and recalibrate it in the app"),
        ("keeps losing its Wi-Fi connection", "forget the network in the app and pair the thermostat again"),
        ("switches the heating on at night", "check the schedule in the app and turn off the boost timer")),
    "e-bike": (
        ("loses charge faster than it used to", "charge the battery fully and then ride one full cycle"),
        ("makes a clicking sound when pedalling", "tighten the crank bolts and see a service partner if it stays"),
        ("shows error E07 on the display", "switch it off, take the battery out for a minute and put it back")),
    "headphones": (
        ("only play sound in one ear", "reset them by holding both buttons for eight seconds"),
        ("will not pair with a laptop", "remove them from the laptop's Bluetooth list and pair them again"),
        ("whistle when noise cancelling is on", "update the firmware and refit the ear cushions")),
    "kettle": (
        ("switches off before the water boils", "descale it with citric acid and rinse it twice"),
        ("shows a red light and will not heat", "let it cool for ten minutes, as the dry-boil guard has tripped"),
        ("leaves white flakes in the water", "descale it and use the filter that came in the box")),
}
CHANGES = ("Fixed an issue where the app showed the {short} as offline.",
           "The first set-up of a new {short} is faster.", "Added {lang} to the languages in the app.",
           "Fixed a rare crash when a {short} was renamed in the app.",
           "Rewrote several {short} error messages so that they say what to do next.",
           "The {short} reconnects faster after a network drop.",
           "Fixed a spelling mistake on the {lang} settings screen.",
           "Added a setting to dim the status light of the {short} at night.",
           "Updated the encryption library of version {prev} to its latest release.",
           "Removed the old pairing method, which {prev} had replaced.",
           "The app now shows the battery level of the {short} in steps of five percent.",
           "Improved the accessibility labels in the {lang} version of the app.")
LANGS = ("Portuguese", "Japanese", "Swedish", "Estonian", "Swahili", "German", "Polish", "Korean")


def fmt_date(d: dt.date, rng: random.Random) -> str:
    """'14 March 2024', 'March 14, 2024' or 'Thursday 14 March 2024' (the world uses all three)."""
    styles = (f"{d.day} {d:%B} {d.year}", f"{d:%B} {d.day}, {d.year}", f"{d:%A} {d.day} {d:%B} {d.year}")
    return styles[rng.randrange(3)]


def and_list(items: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _years(n: int) -> str:
    return f"{n} year" if n == 1 else f"{n} years"


def policy_rules(policy: Policy, variant: int) -> list[str]:
    """One sentence per fact of ``policy``, in phrasing ``variant`` (0 or 1)."""
    return [r[variant % len(r)].format(**policy.facts) for r in POLICY_RULES[policy.topic]]


def policy_docs(c: Company, rng: random.Random) -> list[tuple[str, str]]:
    """[(kind, text)]: a policy page and an FAQ for each policy."""
    out = []
    cities = and_list([o.city for o in c.offices])
    for p in c.policies:
        v = rng.randrange(2)
        rules = policy_rules(p, v)
        intro = rng.choice((f"This page sets out the {p.topic} policy of {c.name}. It applies to everyone, in all "
                            f"offices: {cities}.", f"Here is how {p.topic} works at {c.name}. The same rules hold in "
                            f"{cities}.", f"The {p.team} team wrote this policy so that {p.topic} is handled the same "
                            "way in every office."))
        body = "\n".join(("- " if rng.random() < 0.4 else "") + r for r in rules)
        contact = rng.choice((f"If something is unclear, ask {p.contact.name}, {p.contact.role} in {p.contact.office}.",
                              f"Questions about this policy go to {p.contact.name} in the {p.team} team."))
        out.append(("page", f"{p.title}\nOwner: the {p.team} team. In force since {fmt_date(p.effective, rng)}.\n\n"
                            f"{intro}\n\nThe rules\n{body}\n\n{contact}"))
        qa = [f"Q: {q}\nA: {a}" for q, a in zip(POLICY_QUESTIONS[p.topic], policy_rules(p, 1 - v))]
        rng.shuffle(qa)
        out.append(("faq", f"{p.title}: frequently asked questions\n\n" + "\n\n".join(qa)
                    + f"\n\nStill stuck? {p.contact.first} {p.contact.last} is happy to help."))
    return out


def _product_faq(p: Product, rng: random.Random) -> str:
    qa = [(f"How much does the {p.short} cost?", f"It sells for €{p.price} in all our shops."),
          ("Which colours can I choose?", f"The {p.short} comes in {and_list(list(p.colours))}."),
          ("How long is the warranty?", f"{_years(p.warranty_years).capitalize()}, from the day of purchase."),
          (f"When did the {p.short} come out?", f"It was launched on {fmt_date(p.launch, rng)}."),
          ("Who looks after this product?", f"{p.owner.name}, our product manager in {p.owner.office}.")]
    asks = rng.sample(("What is the {n} of the {s}?", "How about the {n}?", "Can you tell me the {n}?"), 3)
    says = rng.sample(("The {n} is {v} {u}.", "It is {v} {u}.", "{v} {u}, as measured in our lab.",
                       "The {s} has a {n} of {v} {u}."), 3)  # each phrasing once: no repeated 5-grams
    qa += [(q.format(n=n, s=p.short), a.format(n=n, v=v, u=u, s=p.short))
           for q, a, (n, v, u) in zip(asks, says, p.specs)]
    rng.shuffle(qa)
    return f"{p.short} FAQ\n\n" + "\n\n".join(f"Q: {q}\nA: {a}" for q, a in qa[:rng.randint(4, len(qa))])


def _troubleshooting(p: Product, rng: random.Random) -> str:
    it = "they" if p.category == "headphones" else "it"
    leads = rng.sample(("Problem: your {c} {s}.\nWhat to do: {f}.", "If {it} {s}, {f}.",
                        "Symptom: the {c} {s}.\nFix: {f}.", "When the {c} {s}, the usual cure is to {f}."), 3)
    steps = [lead.format(c=p.category, s=s, f=f, it=it) for lead, (s, f) in zip(leads, ISSUES[p.category])]
    rng.shuffle(steps)
    return (f"Troubleshooting the {p.name}\n\nMost problems with the {p.short} can be solved at home in a few minutes. "
            "Try these steps before you contact support.\n\n" + "\n\n".join(steps)
            + f"\n\nIf none of this helps, your {p.short} may need a repair under its warranty.")


def _release_notes(p: Product, k: int, rng: random.Random) -> str:
    version = p.versions[k]
    when = p.launch + dt.timedelta(days=70 * k + rng.randint(0, 30))
    changes = [ch.format(short=p.short, lang=rng.choice(LANGS), prev=p.versions[max(k - 1, 0)])
               for ch in rng.sample(CHANGES, rng.randint(3, 5))]
    intro = rng.choice((f"Version {version} is a free update for every {p.short}, and we recommend it to all owners.",
                        f"Firmware {version} installs itself overnight while the {p.short} is idle and plugged in."))
    howto = rng.choice((f"To install {version} by hand, open the app, choose the {p.short} and tap Check for updates. "
                        "It takes a few minutes and keeps all your settings.",
                        f"If your {p.short} is not on {version} after two days, restart it once and leave it "
                        "connected overnight; the update will then start on its own."))
    return (f"Release notes: {p.short} firmware {version}\nReleased on {fmt_date(when, rng)}.\n\n{intro} Here is what "
            "changed since the previous version.\n\n" + "\n".join("- " + ch for ch in changes) + f"\n\n{howto}")


def product_docs(c: Company, rng: random.Random) -> list[tuple[str, str]]:
    """[(kind, text)]: sheet, FAQ, troubleshooting page and release notes per version, per product."""
    out = []
    for p in c.products:
        specs = "\n".join(f"{name.capitalize()}: {value} {unit}" for name, value, unit in p.specs)
        out.append(("sheet", f"{p.name}: product sheet\n\nThe {p.short} is a {p.category} made by {c.name} and "
                             f"launched on {fmt_date(p.launch, rng)}. {rng.choice(PITCH[p.category])} {p.owner.name} "
                             f"is the product manager responsible for it.\n\nSpecifications\n{specs}\nPrice: "
                             f"€{p.price}\nColours: {and_list(list(p.colours))}\n\nEvery {p.short} comes with a "
                             f"warranty of {_years(p.warranty_years)}. The latest firmware is version {p.versions[-1]}."))
        out += [("faq", _product_faq(p, rng)), ("troubleshooting", _troubleshooting(p, rng))]
        out += [("release", _release_notes(p, k, rng)) for k in range(len(p.versions))]
    return out

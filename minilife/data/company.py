"""The fictional company behind the embedded world: offices, people, products and policies.

What it implements
- ``make_company(seed)`` builds a ``Company`` deterministically from one integer: a name and e-mail
  domain, a handful of offices, ~60 employees (name, team, role, office, start year), ~24 products
  (category, specs, price, warranty, launch date, versions, owner) and ~10 policies (numeric facts
  such as "3 home-working days a week", each with an owner and an effective date).
- Every fact lives in exactly one place here; the documents in ``documents.py`` only *render* these
  facts, so the same product has the same price in every spec sheet, chat and e-mail. That
  consistency is what lets a tiny model learn real facts from the wiki, and what later chapters use
  to build checkable instruction tasks and preference pairs on the same entities.

What it leaves out: anything real. Names are drawn from generic pools, e-mail domains use the
reserved ``.example`` TLD, and the world's phone numbers (see ``dirt.py``) sit in ranges reserved
for fiction. Facts never change over time (no policy revisions), to keep the ground truth simple.
"""
from __future__ import annotations

import datetime as dt
import random
import unicodedata
from dataclasses import dataclass

FIRST_NAMES = (
    "Maya", "Priya", "Tomasz", "Aiko", "Femi", "Lucia", "Jonas", "Amara", "Rafael", "Ingrid", "Kwame",
    "Sofia", "Mateus", "Hana", "Oliver", "Zainab", "Lars", "Chloé", "Diego", "Nadia", "Ravi", "Elena",
    "Kofi", "Mei", "Sami", "Greta", "Yusuf", "Iris", "Pablo", "Leila", "Anton", "Ruth", "Kenji", "Ada",
    "Marcus", "Noor", "Felix", "Ines", "Tariq", "Clara", "Emeka", "Signe", "Omar", "Julia", "Bruno")
LAST_NAMES = (
    "Okafor", "Nair", "Kowalski", "Tanaka", "Adeyemi", "Ferreira", "Lindqvist", "Mensah", "Costa",
    "Haugen", "Boateng", "Rossi", "Almeida", "Sato", "Brennan", "Hussain", "Eriksen", "Moreau", "Ortega",
    "Petrova", "Iyer", "Novak", "Asante", "Chen", "Virtanen", "Schulz", "Demir", "Walsh", "Suárez",
    "Karimi", "Volkov", "Abbott", "Mori", "Lovelace", "Reid", "Farouk", "Becker", "Duarte", "Qureshi")
COMPANY_NAMES = ("Larkspur Devices", "Bramblewood Instruments", "Tallow & Finch", "Quillon Works",
                 "Marrow Lane Electronics", "Heronsgate Labs")
CITIES = (("Leeds", "the United Kingdom"), ("Lisbon", "Portugal"), ("Austin", "the United States"),
          ("Osaka", "Japan"), ("Toronto", "Canada"), ("Nairobi", "Kenya"), ("Malmö", "Sweden"),
          ("Zürich", "Switzerland"), ("São Paulo", "Brazil"), ("Melbourne", "Australia"),
          ("Tallinn", "Estonia"))
STREETS = ("Canal Street", "Rope Walk", "Mill Lane", "Harbour Road", "Station Square", "Orchard Row",
           "Foundry Yard", "Weaver Street")
TEAMS = {
    "Engineering": ("firmware engineer", "backend engineer", "test engineer", "engineering manager"),
    "Support": ("support specialist", "support specialist", "support team lead"),
    "Product": ("product manager", "UX designer"),
    "Sales": ("account manager", "sales director"),
    "Finance": ("accountant", "finance manager"),
    "People": ("HR partner", "recruiter"),
    "Operations": ("logistics coordinator", "operations manager"),
    "Security": ("security analyst", "security engineer"),
}
CODENAMES = ("Kestrel", "Heron", "Wren", "Osprey", "Linnet", "Plover", "Avocet", "Merlin", "Bittern",
             "Curlew", "Dunlin", "Fulmar", "Gannet", "Lapwing", "Redstart", "Shrike", "Siskin", "Swift",
             "Tern", "Whimbrel", "Godwit", "Egret", "Petrel", "Starling")
COLOURS = ("slate grey", "chalk white", "forest green", "midnight blue", "copper", "sand", "charcoal")

# category -> (spec name, unit, low, high, step) rows; each product draws one value per row.
CATEGORIES = {
    "wireless router": (("range", "metres", 30, 120, 5), ("top speed", "Mbps", 600, 2400, 200),
                        ("power draw", "watts", 8, 20, 1)),
    "desk lamp": (("brightness", "lumens", 400, 1200, 50), ("power draw", "watts", 5, 14, 1),
                  ("arm length", "centimetres", 30, 60, 5)),
    "smart thermostat": (("battery life", "months", 6, 24, 2), ("display size", "centimetres", 5, 10, 1),
                         ("standby power", "milliwatts", 50, 300, 25)),
    "e-bike": (("range", "kilometres", 40, 120, 10), ("weight", "kilograms", 16, 26, 1),
               ("battery capacity", "watt-hours", 250, 700, 50)),
    "headphones": (("battery life", "hours", 20, 60, 5), ("weight", "grams", 180, 320, 10),
                   ("charging time", "minutes", 60, 180, 15)),
    "kettle": (("capacity", "millilitres", 1000, 2000, 100), ("boil time", "seconds", 90, 240, 15),
               ("power draw", "watts", 1800, 3000, 200)),
}

# policy -> (owner team, {fact name: choices}); the sentences that state the facts live in documents.py
POLICIES = {
    "remote work": ("People", {"home_days": (2, 3, 4), "core_start": ("09:30", "10:00"),
                               "core_end": ("15:00", "16:00"), "notice_days": (1, 2, 5)}),
    "travel": ("Finance", {"hotel_cap": (120, 150, 180), "book_days": (7, 14, 21), "economy_hours": (4, 6, 8)}),
    "expenses": ("Finance", {"submit_days": (14, 30, 45), "receipt_over": (10, 20, 25),
                             "approval_over": (250, 500, 1000)}),
    "annual leave": ("People", {"leave_days": (25, 27, 30), "carry_over": (3, 5, 10), "request_weeks": (2, 3, 4)}),
    "information security": ("Security", {"password_len": (12, 14, 16), "lock_minutes": (5, 10),
                                          "report_hours": (2, 4, 24)}),
    "learning budget": ("People", {"budget": (800, 1000, 1500), "course_days": (3, 5)}),
    "on-call": ("Engineering", {"shift_pay": (100, 150, 200), "response_minutes": (15, 30),
                                "max_weeks": (2, 3)}),
    "equipment": ("Operations", {"laptop_years": (3, 4), "monitor_count": (2, 3), "chair_budget": (300, 400, 500)}),
    "parental leave": ("People", {"paid_weeks": (16, 20, 26), "partner_weeks": (4, 6, 8)}),
    "code review": ("Engineering", {"approvals": (2, 3), "review_hours": (24, 48), "max_lines": (400, 800)}),
}


@dataclass(frozen=True)
class Office:
    city: str
    country: str
    street: str
    number: int
    opened: int

    @property
    def address(self) -> str:
        return f"{self.number} {self.street}, {self.city}"


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    team: str
    role: str
    office: str  # city
    start_year: int

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def handle(self) -> str:
        """ASCII local part of an e-mail address: 'chloé.moreau' -> 'chloe.moreau'."""
        raw = unicodedata.normalize("NFKD", f"{self.first}.{self.last}".lower())
        return "".join(c for c in raw if c.isascii() and (c.isalnum() or c == "."))


@dataclass(frozen=True)
class Product:
    codename: str
    category: str
    model: str  # e.g. "K2"
    price: int  # euros
    warranty_years: int
    launch: dt.date
    specs: tuple[tuple[str, int, str], ...]  # (spec name, value, unit)
    colours: tuple[str, ...]
    versions: tuple[str, ...]  # firmware/hardware revisions, oldest first
    owner: Person  # product manager

    @property
    def name(self) -> str:
        return f"{self.codename} {self.model} {self.category}"

    @property
    def short(self) -> str:
        return f"{self.codename} {self.model}"


@dataclass(frozen=True)
class Policy:
    topic: str
    team: str
    contact: Person
    effective: dt.date
    facts: dict

    @property
    def title(self) -> str:
        return f"{self.topic.capitalize()} policy"


@dataclass(frozen=True)
class Company:
    seed: int
    name: str
    domain: str
    founded: int
    offices: tuple[Office, ...]
    people: tuple[Person, ...]
    products: tuple[Product, ...]
    policies: tuple[Policy, ...]

    def team(self, team: str) -> list[Person]:
        return [p for p in self.people if p.team == team]

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(f"no employee called {name!r} at {self.name}")

    def office(self, city: str) -> Office:
        return next(o for o in self.offices if o.city == city)


def _date(rng: random.Random, first_year: int, last_year: int) -> dt.date:
    start = dt.date(first_year, 1, 1).toordinal()
    return dt.date.fromordinal(rng.randint(start, dt.date(last_year, 12, 28).toordinal()))


def make_company(seed: int = 0, n_people: int = 60, n_products: int = 24) -> Company:
    """Build the company for ``seed``; same seed, same company (pure function of its arguments)."""
    if n_people < len(TEAMS) or n_products < 1:
        raise ValueError(f"make_company: need n_people >= {len(TEAMS)} and n_products >= 1 "
                         f"(got {n_people}, {n_products})")
    rng = random.Random(f"company-{seed}")
    name = rng.choice(COMPANY_NAMES)
    domain = name.lower().split()[0] + ".example"
    founded = rng.randint(2006, 2014)
    cities = rng.sample(CITIES, 4)
    offices = tuple(Office(c, country, rng.choice(STREETS), rng.randint(2, 180), founded + 3 * i)
                    for i, (c, country) in enumerate(cities))
    pairs = rng.sample([(f, l) for f in FIRST_NAMES for l in LAST_NAMES], n_people)
    teams = list(TEAMS)
    people = tuple(
        Person(f, l, team := teams[i % len(teams)], rng.choice(TEAMS[team]),
               rng.choice(offices).city, rng.randint(founded, 2023))
        for i, (f, l) in enumerate(pairs))
    pms = [p for p in people if p.team == "Product"]
    products = []
    for i, (codename, category) in enumerate(zip(rng.sample(CODENAMES, n_products),
                                                 [rng.choice(list(CATEGORIES)) for _ in range(n_products)])):
        specs = tuple((spec, rng.randrange(lo, hi + 1, step) if hi > lo else lo, unit)
                      for spec, unit, lo, hi, step in CATEGORIES[category])
        n_versions, major = rng.randint(2, 4), rng.randint(1, 3)
        versions = tuple(f"{major}.{k}" for k in range(n_versions))
        products.append(Product(codename, category, f"{codename[0]}{rng.randint(1, 9)}",
                                rng.randrange(39, 1500, 10), rng.choice((1, 2, 3)),
                                _date(rng, max(founded + 1, 2016), 2023), specs,
                                tuple(rng.sample(COLOURS, rng.randint(1, 3))), versions, pms[i % len(pms)]))
    policies = []
    for topic, (team, choices) in POLICIES.items():
        contacts = [p for p in people if p.team == team]
        facts = {k: rng.choice(v) for k, v in choices.items()}
        policies.append(Policy(topic, team, rng.choice(contacts), _date(rng, 2020, 2023), facts))
    return Company(seed, name, domain, founded, offices, people, tuple(products), tuple(policies))

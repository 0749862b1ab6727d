"""A seeded, fictional knowledge base for training a small model to run search episodes offline.

Countries, cities and people with made-up names get one web-like page each, plus distractor
pages on other sites that mention the same names with irrelevant facts. Questions of 1-3
hops come with a solution plan (query, URL, extraction goal, value per hop) for warm-start
demonstrations and for checking that every question is answerable with the tools.

Design choices that the training signal depends on:
- Names are invented, so the model cannot answer from pretraining and must search.
- The first sentence of every main page is longer than a search snippet and holds no answer,
  so reading the page (query_url) is necessary; a snippet is never enough.
- Distractors share the entity name and sometimes the relation word, so the top search hit
  is usually but not always the right page, and the agent learns to check what it reads.
- Splits are by root country: a held-out question never starts from an entity that
  warm-start or train questions touch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from rollout.tools.corpus import Document
from rollout.tools.passages import tokenize
from rollout.types import Question

ATLAS = "https://atlas.example/wiki/"
CITIES = "https://cities.example/city/"
PEOPLE = "https://people.example/profile/"

_ONSETS = (
    "b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m",
    "n", "p", "r", "s", "st", "t", "th", "tr", "v", "w", "z", "sk",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei")
# Codas by how many consonants the ending starts with: never empty before a vowel (to avoid
# "Veloora"), a liquid or nothing before one consonant, nothing before a cluster ("Talm").
_CODAS = (
    ("l", "n", "r", "m", "st", "th", "nd", "rn", "v", "d", "k", "lv"),
    ("", "", "l", "n", "r"),
    ("",),
)
_ENDINGS: dict[str, tuple[str, ...]] = {
    "country": ("ora", "ania", "eth", "ovia", "iria", "adan", "essa", "undra", "avel", "orin", "esh", "arra"),
    "city": ("ick", "mar", "holm", "wick", "grad", "oss", "enby", "ath", "ure", "ell", "ord", "esk"),
    "river": ("el", "wyn", "und", "ire", "ova", "ax", "ith", "uen"),
    "first": ("ric", "wen", "ald", "ina", "an", "ella", "o", "ia", "ard", "mund", "rid", "ette"),
    "last": ("lm", "rn", "ley", "ton", "ow", "ard", "isk", "ek", "yn", "orn", "ath", "ell", "ane"),
}
# Real words (and common given names) the syllable grammar can produce; a name must never
# read as ordinary English, or the model could answer from what it already knows.
_REAL_WORDS = frozenset(
    """banana basin baron bellow cabin canton denim felon gallow garden halo hero lemon melon
    mellow meadow panel piano ration robin salon satin solo tallow talon tenor tonic towel venom
    villa valor wallow widow yellow fellow follow hollow pillow willow sorrow barrow burrow marrow
    narrow station potion mention lotion motion bravo radio ratio studio patio rodeo stereo dingo
    bingo mango tango lingo grotto ghetto maria anna bella stella donna gamma delta sigma drama karma
    llama comma sofa tuna soda lava diva mania kinship sonata lasso torso bardo""".split()
)

REGIONS = (
    "northern highlands", "eastern plains", "southern islands", "western marshes",
    "central valleys", "far north", "inland lake district", "coastal lowlands",
)
PROFESSIONS = (
    "potter", "shipwright", "astronomer", "weaver", "surveyor", "physician", "merchant", "poet",
    "engineer", "cartographer", "judge", "teacher", "architect", "brewer", "sculptor", "botanist",
)
GOODS = ("amber", "salt", "wool", "copper", "timber", "glass", "tea", "linen", "iron", "honey")
SEASONS = ("spring", "early summer", "late autumn", "winter")


@dataclass(frozen=True)
class Hop:
    entity: str
    relation: str
    query: str
    url: str
    goal: str
    value: str


@dataclass(frozen=True)
class DemoWorld:
    seed: int
    documents: list[Document]
    warm_start: list[Question]
    train: list[Question]
    heldout: list[Question]
    plans: dict[str, list[Hop]]

    def questions(self) -> list[Question]:
        return [*self.warm_start, *self.train, *self.heldout]


@dataclass
class _Person:
    name: str
    birth_year: int
    birthplace: str
    profession: str
    role: str  # the page sentence that ties the person to a country or city

    @property
    def url(self) -> str:
        return PEOPLE + self.name.lower().replace(" ", "-")


@dataclass
class _City:
    name: str
    country: str
    mayor: str
    founded: int
    is_capital: bool

    @property
    def url(self) -> str:
        return CITIES + self.name.lower()


@dataclass
class _Country:
    name: str
    region: str
    river: str
    founded: int
    founder: str
    cities: list[str] = field(default_factory=list)  # capital first

    @property
    def capital(self) -> str:
        return self.cities[0]

    @property
    def url(self) -> str:
        return ATLAS + self.name


class _Namer:
    """Invents names that are unique as search tokens across the whole world."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, kind: str) -> str:
        endings = _ENDINGS[kind]
        for _ in range(1000):
            ending = self.rng.choice(endings)
            syllables = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)]
            if self.rng.random() < 0.2:
                syllables.append(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS))
            lead = len(ending) - len(ending.lstrip("bcdfghjklmnpqrstvwxz"))
            codas = _CODAS[min(lead, 2)]
            word = "".join(syllables) + self.rng.choice(codas) + ending
            key = tokenize(word)
            # The key must survive tokenisation as one word, and be new after plural stemming
            # ("Velmora" and "Velmoras" would be one search term).
            if len(word) < 4 or len(key) != 1 or key[0] in self.used or word in _REAL_WORDS:
                continue
            self.used.add(key[0])
            return word.capitalize()
        raise RuntimeError(f"could not invent a new {kind} name after 1000 tries; the world is too large")

    def person(self) -> str:
        return f"{self.word('first')} {self.word('last')}"


@dataclass
class _World:
    countries: list[_Country]
    cities: dict[str, _City]
    people: dict[str, _Person]
    by_name: dict[str, _Country] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {c.name: c for c in self.countries}


def _generate(rng: random.Random, n_countries: int) -> _World:
    namer = _Namer(rng)
    countries: list[_Country] = []
    cities: dict[str, _City] = {}
    people: dict[str, _Person] = {}
    for _ in range(n_countries):
        founded = rng.randint(1100, 1850)
        country = _Country(
            name=namer.word("country"),
            region=rng.choice(REGIONS),
            river=namer.word("river"),
            founded=founded,
            founder=namer.person(),
        )
        founder_born = founded - rng.randint(25, 60)
        for j in range(1 + rng.randint(1, 2)):
            city = _City(
                name=namer.word("city"),
                country=country.name,
                mayor=namer.person(),
                # Cities predate the founder's birth, so a founder can be born in one.
                founded=rng.randint(founder_born - 400, founder_born - 1),
                is_capital=j == 0,
            )
            country.cities.append(city.name)
            cities[city.name] = city
        people[country.founder] = _Person(
            country.founder, founder_born, rng.choice(country.cities), rng.choice(PROFESSIONS),
            role=f"{country.founder} is remembered as the founder of {country.name}.",
        )
        for name in country.cities:
            mayor = cities[name].mayor
            # Born elsewhere, so "Where was the mayor of X born?" never has X as its answer.
            birthplace = rng.choice([other for other in country.cities if other != name])
            people[mayor] = _Person(
                mayor, rng.randint(1940, 1995), birthplace, rng.choice(PROFESSIONS),
                role=f"{mayor} serves as the mayor of {name}.",
            )
        countries.append(country)
    return _World(countries, cities, people)


# ---------------------------------------------------------------- pages

# How often a main page repeats the entity's name in a fact sentence instead of "the country"
# / "the city" / "the <profession>". Fewer repeats make distractors outrank the page more often.
NAME_REPEAT = 0.8


def _ref(rng: random.Random, name: str, other: str) -> str:
    return name if rng.random() < NAME_REPEAT else other


def _country_page(rng: random.Random, c: _Country) -> Document:
    others = " and ".join(c.cities[1:])
    sentences = [
        f"{c.name} is a country in the {c.region}, and this atlas entry records its history, "
        "its cities and its people as the survey office found them.",
        f"The capital of {_ref(rng, c.name, 'the country')} is {c.capital}.",
        f"The founder of {_ref(rng, c.name, 'the country')} was {c.founder}.",
        f"{_ref(rng, c.name, 'The country')} was founded in the year {c.founded}.",
        f"The river {c.river} flows through {_ref(rng, c.name, 'the country')}.",
        f"Other cities of {_ref(rng, c.name, 'the country')} include {others}.",
    ]
    return Document(c.url, f"{c.name} - Atlas", " ".join(sentences))


def _city_page(rng: random.Random, city: _City) -> Document:
    sentences = [
        f"{city.name} is a city in the country of {city.country}, and this page of the city register "
        "gathers the main facts known about the place.",
    ]
    if city.is_capital:
        sentences.append(f"{_ref(rng, city.name, 'The city')} is the capital of {city.country}.")
    sentences += [
        f"The mayor of {_ref(rng, city.name, 'the city')} is {city.mayor}.",
        f"{_ref(rng, city.name, 'The city')} was founded in the year {city.founded}.",
    ]
    return Document(city.url, f"{city.name} - City Register", " ".join(sentences))


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _person_page(rng: random.Random, p: _Person) -> Document:
    sentences = [
        f"{p.name} is {_article(p.profession)} {p.profession} whose life is summarised in this entry of "
        "the people register, compiled from local archives.",
        f"{_ref(rng, p.name, f'The {p.profession}')} was born in the year {p.birth_year}.",
        f"The birthplace of {_ref(rng, p.name, f'the {p.profession}')} is {p.birthplace}.",
        p.role,
    ]
    return Document(p.url, f"{p.name} - People Register", " ".join(sentences))


def _slug(text: str) -> str:
    return text.lower().replace(" ", "-")


def _pick(rng: random.Random, pool: list[str], low: int, high: int) -> list[str]:
    return rng.sample(pool, rng.randint(low, min(high, len(pool))))


def _country_distractors(rng: random.Random, c: _Country, neighbour: str) -> list[Document]:
    """Travel, trade and history pages about the country: same name, irrelevant facts."""
    port = rng.choice(c.cities[1:])
    year = rng.randint(1950, 2023)
    name = c.name
    travel = [
        f"The largest port of {name} is {port}.",
        f"Travellers to {name} often visit the markets of {port}.",
        f"The best season to visit {name} is {rng.choice(SEASONS)}.",
        f"Hotels in the capital of {name} fill up during the autumn festival.",
        f"Boat tours on the river leave from {port} every morning.",
        f"Most visitors to {name} arrive by train from {neighbour}.",
    ]
    trade = [
        f"In {year}, {name} exported {rng.choice(GOODS)} worth {rng.randint(3, 900)} million crowns.",
        f"The main trading partner of {name} was {neighbour}.",
        f"Capital investment in {name} rose by {rng.randint(2, 40)} percent.",
        f"Merchants in {port} founded a new exchange in {rng.randint(1950, year)}.",
        f"River shipping in {name} grew after the {port} canal opened.",
    ]
    topic = rng.choice(("guilds", "bridges", "borders"))
    history = [
        f"The guild of {rng.choice(PROFESSIONS)}s in {name} was founded in {rng.randint(1100, 1900)}.",
        f"A statue of the founder of {name} stands in {port}.",
        f"The first bridge over the river at {port} was built in {rng.randint(1100, 1900)}.",
        f"Historians of {name} disagree about the old borders with {neighbour}.",
    ]
    pages = [
        Document(
            f"https://travel.example/guides/{_slug(name)}-travel-guide",
            f"{name} travel guide",
            f"This travel guide to {name} collects advice from visitors about getting around, where to stay "
            f"and what to see. " + " ".join(_pick(rng, travel, 2, 4)),
        ),
        Document(
            f"https://trade.example/reports/{_slug(name)}-{year}",
            f"Trade report: {name} {year}",
            f"The annual trade report on {name} summarises the flows of goods through its ports and markets "
            f"during {year}. " + " ".join(_pick(rng, trade, 2, 4)),
        ),
        Document(
            f"https://history.example/notes/{_slug(name)}-{topic}",
            f"History notes: {topic} of {name}",
            f"These history notes on the {topic} of {name} gather what local chronicles and travellers "
            f"recorded over the centuries. " + " ".join(_pick(rng, history, 2, 3)),
        ),
    ]
    # Not every country gets every kind of page, so how hard a search is varies by country.
    return [p for p in pages if rng.random() < 0.8]


def _city_distractor(rng: random.Random, city: _City) -> Document:
    topic = rng.choice(("market", "railway", "festival"))
    pool = [
        f"A new {topic} opened in {city.name} in {rng.randint(1990, 2023)}.",
        f"The mayor of {city.name} attended the opening ceremony.",
        f"Residents of {city.name} voted on a plan for a second {topic}.",
        f"Shops in {city.name} stayed open late for the event.",
        f"Tickets for the {topic} in {city.name} sold out within a week.",
        f"Musicians from {city.name} played on the opening night.",
    ]
    return Document(
        f"https://news.example/local/{_slug(city.name)}-{topic}",
        f"{city.name} local news: the {topic}",
        f"Local news from {city.name}, reported by our correspondent in {city.country} for readers across the region. "
        + " ".join(_pick(rng, pool, 2, 3)),
    )


def _person_distractor(rng: random.Random, p: _Person, place: str) -> Document:
    pool = [
        f"A collection of letters by {p.name} is kept in the archive of {place}.",
        f"{p.name} wrote often about the weather and the harvests.",
        f"Scholars born in {place} have studied the letters of {p.name}.",
        f"The letters were catalogued in {rng.randint(1900, 2020)}.",
        f"The letters mention the birthplace of {p.name} only once.",
    ]
    return Document(
        f"https://letters.example/archive/{_slug(p.name)}-letters",
        f"Letters of {p.name}",
        f"This archive page lists the surviving letters of {p.name} and where each of them can be read today. "
        + " ".join(_pick(rng, pool, 2, 3)),
    )


def _documents(rng: random.Random, world: _World) -> list[Document]:
    docs: list[Document] = []
    names = [c.name for c in world.countries]
    for i, c in enumerate(world.countries):
        neighbour = names[(i + 1) % len(names)] if len(names) > 1 else c.name
        docs.append(_country_page(rng, c))
        docs += [_city_page(rng, world.cities[n]) for n in c.cities]
        people = [c.founder, *(world.cities[n].mayor for n in c.cities)]
        docs += [_person_page(rng, world.people[p]) for p in people]
        docs += _country_distractors(rng, c, neighbour)
        docs += [_city_distractor(rng, world.cities[n]) for n in c.cities if rng.random() < 0.7]
        docs += [_person_distractor(rng, world.people[p], rng.choice(c.cities)) for p in people if rng.random() < 0.5]
    return docs


# ---------------------------------------------------------------- questions

# relation -> (search query, query_url goal, noun phrase used when the relation is an inner hop)
_RELATIONS: dict[str, tuple[str, str, str]] = {
    "capital": ("{e} capital", "capital of {e}", "the capital of {e}"),
    "founder": ("{e} founder", "founder of {e}", "the founder of {e}"),
    "founding_year": ("{e} founded", "year {e} was founded", ""),
    "river": ("{e} river", "river of {e}", ""),
    "mayor": ("{e} mayor", "mayor of {e}", "the mayor of {e}"),
    "birth_year": ("{e} born", "year {e} was born", ""),
    "birthplace": ("{e} birthplace", "birthplace of {e}", ""),
}
# relation -> the question asked when it is the last hop
_ASK: dict[str, str] = {
    "capital": "What is the capital of {e}?",
    "founder": "Who founded {e}?",
    "founding_year": "In which year was {e} founded?",
    "river": "Which river flows through {e}?",
    "mayor": "Who is the mayor of {e}?",
    "birth_year": "In which year was {e} born?",
    "birthplace": "Where was {e} born?",
}
_COUNTRY_CHAINS = (
    ("capital",), ("founder",), ("founding_year",), ("river",),
    ("capital", "mayor"), ("founder", "birth_year"), ("founder", "birthplace"),
    ("capital", "mayor", "birth_year"), ("capital", "mayor", "birthplace"),
)
_CITY_CHAINS = (("mayor",), ("mayor", "birth_year"), ("mayor", "birthplace"))
_PERSON_CHAINS = (("birth_year",), ("birthplace",))


def _lookup(world: _World, entity: str, relation: str) -> tuple[str, str]:
    """(value, url of the page stating it) for one fact."""
    if relation in ("capital", "founder", "founding_year", "river"):
        c = world.by_name[entity]
        facts = {"capital": c.capital, "founder": c.founder, "founding_year": str(c.founded), "river": c.river}
        return facts[relation], c.url
    if relation == "mayor":
        city = world.cities[entity]
        return city.mayor, city.url
    p = world.people[entity]
    return (str(p.birth_year) if relation == "birth_year" else p.birthplace), p.url


def _plan(world: _World, root: str, chain: Sequence[str]) -> list[Hop]:
    hops: list[Hop] = []
    entity = root
    for relation in chain:
        query, goal, _ = _RELATIONS[relation]
        value, url = _lookup(world, entity, relation)
        hops.append(Hop(entity, relation, query.format(e=entity), url, goal.format(e=entity), value))
        entity = value
    return hops


def _question_text(root: str, chain: Sequence[str]) -> str:
    phrase = root
    for relation in chain[:-1]:
        phrase = _RELATIONS[relation][2].format(e=phrase)
    return _ASK[chain[-1]].format(e=phrase)


def _country_questions(world: _World, c: _Country) -> list[tuple[str, list[Hop]]]:
    roots: list[tuple[str, tuple[tuple[str, ...], ...]]] = [(c.name, _COUNTRY_CHAINS)]
    roots += [(city, _CITY_CHAINS) for city in c.cities]
    roots += [(person, _PERSON_CHAINS) for person in (c.founder, *(world.cities[n].mayor for n in c.cities))]
    out = []
    for root, chains in roots:
        for chain in chains:
            out.append((_question_text(root, chain), _plan(world, root, chain)))
    return out


def _split_counts(n: int, heldout_fraction: float, warm_start_fraction: float) -> tuple[int, int]:
    for name, frac in (("heldout_fraction", heldout_fraction), ("warm_start_fraction", warm_start_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    n_held = max(1, round(heldout_fraction * n)) if heldout_fraction > 0 else 0
    n_warm = max(1, round(warm_start_fraction * n)) if warm_start_fraction > 0 else 0
    if n - n_held - n_warm < 1:
        raise ValueError(
            f"{n} countries leave no train split with heldout_fraction={heldout_fraction} and "
            f"warm_start_fraction={warm_start_fraction}; use more countries or smaller fractions"
        )
    return n_held, n_warm


def build_demo_world(
    seed: int,
    countries: int = 120,
    heldout_fraction: float = 0.2,
    warm_start_fraction: float = 0.3,
    hops: Sequence[int] = (1, 2),
) -> DemoWorld:
    """The demo world for `seed`: same arguments, byte-identical result.

    Train and held-out questions have the hop counts in `hops`; warm-start questions always
    include 1- and 2-hop ones (plus any other count in `hops`), since demonstrations of short
    plans are what a small model learns the tool protocol from.
    """
    if countries < 1:
        raise ValueError(f"countries must be >= 1, got {countries}")
    wanted = set(hops)
    if not wanted or not wanted <= {1, 2, 3}:
        raise ValueError(f"hops must be a non-empty subset of (1, 2, 3), got {tuple(hops)}")
    n_held, n_warm = _split_counts(countries, heldout_fraction, warm_start_fraction)

    rng = random.Random(seed)
    world = _generate(rng, countries)
    documents = _documents(rng, world)

    order = list(range(countries))
    rng.shuffle(order)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = "heldout" if rank < n_held else "warm_start" if rank < n_held + n_warm else "train"
    split_hops = {"heldout": wanted, "train": wanted, "warm_start": wanted | {1, 2}}

    splits: dict[str, list[Question]] = {"warm_start": [], "train": [], "heldout": []}
    plans: dict[str, list[Hop]] = {}
    n = 0
    for i, c in enumerate(world.countries):
        split = split_of[i]
        for text, plan in _country_questions(world, c):
            # Ids count every candidate, so a question keeps its id whatever `hops` selects.
            qid = f"demo-{seed}-{n}"
            n += 1
            answer = plan[-1].value
            # A question that spells out its answer teaches the model to skip searching.
            if answer.lower() in text.lower() or len(plan) not in split_hops[split]:
                continue
            splits[split].append(Question(id=qid, question=text, answer=answer, hops=len(plan)))
            plans[qid] = plan
    for questions in splits.values():
        rng.shuffle(questions)
    return DemoWorld(seed, documents, splits["warm_start"], splits["train"], splits["heldout"], plans)

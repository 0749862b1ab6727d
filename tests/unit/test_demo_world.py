import hashlib
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.demo_world import DemoWorld, _generate, build_demo_world
from rollout.tools.corpus import CorpusBackend, make_snippet
from rollout.tools.passages import STOPWORDS, rank_passages, split_passages, tokenize

REPO = Path(__file__).resolve().parents[2]
SEED = 11

# Ordinary words a syllable generator could stumble on; none may be used as a name.
ENGLISH = set(
    """about after again air also animal answer area arena aroma banana baron basin bell berry
    border bottle bread brother cabin camera canal candle castle cedar cellar center chapel city
    coast common copper corner cotton country dinner doctor dollar dragon east either ember enter
    even ever faro father fellow finger flower forest garden gather gold habit hammer harbor
    harvest heaven hello hero honey hotel hunter island kettle kitten ladder lemon lesson letter
    level lily linen local manor market marrow master meadow melon metal middle mirror moment
    mother motor music never north number open order other panel paper pencil people pepper petal
    piano pilot planet pocket porter potato rabbit radio random rather river robin saddle salad
    salon sandal satin season second seven silver simple sister soda solo south spider summer
    sunder table talon tender tenor tiger timber tonic total tower travel turtle under valley
    velvet venom villa visit wagon water weather west whisper window winter wonder yellow zebra""".split()
)


@pytest.fixture(scope="module")
def world() -> DemoWorld:
    return build_demo_world(SEED)


@pytest.fixture(scope="module")
def backend(world) -> CorpusBackend:
    return CorpusBackend(world.documents)


def pages(world):
    return {d.url: d for d in world.documents}


def all_questions(world):
    return [*world.warm_start, *world.train, *world.heldout]


def digest(w: DemoWorld) -> str:
    return hashlib.sha256(repr(w).encode()).hexdigest()


def test_same_seed_same_world_different_seed_different_world(world):
    again = build_demo_world(SEED)
    assert again == world and repr(again) == repr(world)
    other = build_demo_world(SEED + 1)
    assert {d.url for d in other.documents} != {d.url for d in world.documents}
    assert [q.question for q in other.train] != [q.question for q in world.train]


def test_world_is_identical_across_processes_and_hash_seeds():
    code = "import hashlib; from rollout.demo_world import build_demo_world as b; " \
           "print(hashlib.sha256(repr(b(3, countries=20)).encode()).hexdigest())"
    outs = set()
    for hash_seed in ("0", "12345"):
        env = {"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        outs.add(res.stdout.strip())
    assert outs == {digest(build_demo_world(3, countries=20))}


def test_global_random_state_is_untouched():
    random.seed(99)
    expected = random.random()
    random.seed(99)
    build_demo_world(4, countries=10)
    assert random.random() == expected


def entity_names(world):
    """Every invented name: from the main pages' titles, plus rivers from the plans."""
    names = [
        d.title.rsplit(" - ", 1)[0]
        for d in world.documents
        if d.title.endswith((" - Atlas", " - City Register", " - People Register"))
    ]
    names += sorted({h.value for plan in world.plans.values() for h in plan if h.relation == "river"})
    return names


def test_names_are_unique_made_up_and_pronounceable(world):
    names = entity_names(world)
    assert len(names) == len(set(names))
    words = [w for name in names for w in name.split()]
    keys = [tokenize(w) for w in words]
    assert all(len(k) == 1 for k in keys)
    assert len({k[0] for k in keys}) == len(words), "two names collapse into one search term"
    for w in words:
        assert re.fullmatch(r"[A-Z][a-z]{3,}", w), w
        assert not re.search(r"[^aeiouy]{4}", w.lower()), f"{w} has an unpronounceable consonant run"
        assert w.lower() not in ENGLISH and w.lower() not in STOPWORDS, w


def test_structure_of_the_generated_world():
    w = _generate(random.Random(5), 40)
    founders = [c.founder for c in w.countries]
    mayors = [city.mayor for city in w.cities.values()]
    assert len(set(founders + mayors)) == len(founders) + len(mayors)
    for c in w.countries:
        assert 2 <= len(c.cities) <= 3
        assert w.cities[c.capital].is_capital
        assert sum(w.cities[n].is_capital for n in c.cities) == 1
        assert w.people[c.founder].birth_year < c.founded
        assert all(
            p.birthplace in c.cities for p in (w.people[c.founder], *(w.people[w.cities[n].mayor] for n in c.cities))
        )
        # otherwise "Where was the mayor of X born?" would give its answer away
        assert all(w.people[w.cities[n].mayor].birthplace != n for n in c.cities)


def test_urls_look_like_web_pages_and_are_unique(world):
    urls = [d.url for d in world.documents]
    assert len(urls) == len(set(urls))
    assert all(re.fullmatch(r"https://[a-z]+\.example/[a-z]+/[A-Za-z0-9-]+", u) for u in urls)
    domains = Counter(u.split("/")[2] for u in urls)
    assert {"atlas.example", "cities.example", "people.example"} < set(domains)
    assert len(domains) >= 6  # distractor sites too


def test_question_ids_are_stable_and_unique(world):
    qs = all_questions(world)
    ids = [q.id for q in qs]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(rf"demo-{SEED}-\d+", i) for i in ids)
    assert set(world.plans) == set(ids)
    # the same question keeps its id when more hop counts are selected
    wider = {q.id: q for q in all_questions(build_demo_world(SEED, hops=(1, 2, 3)))}
    assert all(wider[q.id] == q for q in qs)


def test_hop_counts_per_split():
    w = build_demo_world(SEED, countries=30, hops=(3,))
    assert {q.hops for q in w.train} == {3} and {q.hops for q in w.heldout} == {3}
    assert {q.hops for q in w.warm_start} == {1, 2, 3}
    w = build_demo_world(SEED, countries=30, hops=(1,))
    assert {q.hops for q in w.train} == {1}
    assert {q.hops for q in w.warm_start} == {1, 2}


def splits(world):
    return {"warm_start": world.warm_start, "train": world.train, "heldout": world.heldout}


def country_of(world) -> dict[str, str]:
    """Entity name -> its country, read back from the main pages."""
    out: dict[str, str] = {}
    for d in world.documents:
        name = d.title.rsplit(" - ", 1)[0]
        if d.title.endswith(" - Atlas"):
            out[name] = name
        elif d.title.endswith(" - City Register"):
            out[name] = re.match(r"\w+ is a city in the country of (\w+)", d.text).group(1)
    for d in world.documents:
        if d.title.endswith(" - People Register"):
            name = d.title.rsplit(" - ", 1)[0]
            founder = re.search(r"remembered as the founder of (\w+)\.", d.text)
            mayor = re.search(r"serves as the mayor of (\w+)\.", d.text)
            out[name] = founder.group(1) if founder else out[mayor.group(1)]
    return out


def test_splits_are_by_root_country_in_the_given_fractions(world):
    country = country_of(world)
    roots = {name: {country[world.plans[q.id][0].entity] for q in qs} for name, qs in splits(world).items()}
    assert (len(roots["heldout"]), len(roots["warm_start"]), len(roots["train"])) == (24, 36, 60)
    assert not roots["heldout"] & roots["train"] and not roots["heldout"] & roots["warm_start"]
    assert not roots["train"] & roots["warm_start"]


def named_entities(world, questions):
    out = set()
    for q in questions:
        for h in world.plans[q.id]:
            out.add(h.entity)
            if not h.value.isdigit():
                out.add(h.value)
    return out


def test_splits_share_no_entities(world):
    by_split = {name: named_entities(world, qs) for name, qs in splits(world).items()}
    assert not by_split["heldout"] & by_split["train"]
    assert not by_split["heldout"] & by_split["warm_start"]
    assert not by_split["train"] & by_split["warm_start"]
    heldout_roots = {world.plans[q.id][0].entity for q in world.heldout}
    other_text = " ".join(q.question for q in (*world.train, *world.warm_start))
    assert not any(root in other_text for root in heldout_roots)


def test_plans_chain_to_the_answer(world):
    docs = pages(world)
    for q in all_questions(world):
        plan = world.plans[q.id]
        assert len(plan) == q.hops
        assert plan[-1].value == q.answer
        assert plan[0].entity in q.question
        for hop, nxt in zip(plan, plan[1:]):
            assert hop.value == nxt.entity
        for hop in plan:
            assert hop.url in docs
            assert hop.entity in hop.query and hop.entity in hop.goal


def test_every_plan_page_gives_the_value_in_a_ranked_passage(world):
    docs = pages(world)
    checked = set()
    for plan in world.plans.values():
        for hop in plan:
            if (hop.url, hop.goal) in checked:
                continue
            checked.add((hop.url, hop.goal))
            passages = rank_passages(docs[hop.url].text, hop.goal, 2)
            assert any(hop.value in p for p in passages), (hop, passages)


def test_first_sentence_and_snippet_hold_no_answer(world):
    docs = pages(world)
    for plan in world.plans.values():
        for hop in plan:
            text = docs[hop.url].text
            assert hop.value not in split_passages(text)[0], hop
            assert hop.value not in make_snippet(text, 90), hop


def test_the_answer_is_never_in_the_question(world):
    for q in all_questions(world):
        assert q.answer.lower() not in q.question.lower(), q


def test_search_finds_the_plan_page_mostly_first_but_not_always(world, backend):
    hops = {(h.query, h.url) for plan in world.plans.values() for h in plan}
    top1 = top3 = 0
    for query, url in sorted(hops):
        urls = [backend.documents[i].url for i in backend.search_indices(query, 3)]
        top1 += urls[0] == url
        top3 += url in urls
    rate1, rate3 = top1 / len(hops), top3 / len(hops)
    print(f"\nsearch over {len(hops)} plan hops: top-1 {rate1:.3f}, top-3 {rate3:.3f}")
    assert rate3 >= 0.95
    assert 0.75 <= rate1 < 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"countries": 0}, "countries must be >= 1"),
        ({"hops": (4,)}, "hops must be a non-empty subset"),
        ({"hops": ()}, "hops must be a non-empty subset"),
        ({"heldout_fraction": 1.0}, "heldout_fraction must be in"),
        ({"warm_start_fraction": -0.1}, "warm_start_fraction must be in"),
        ({"countries": 2}, "leave no train split"),
    ],
)
def test_bad_arguments_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_demo_world(0, **kwargs)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(3, 12), st.sampled_from([(1,), (2,), (1, 2), (1, 2, 3), (3,)]))
def test_invariants_hold_for_any_seed(seed, countries, hops):
    w = build_demo_world(seed, countries=countries, hops=hops)
    docs = pages(w)
    assert len(docs) == len(w.documents)
    for q in all_questions(w):
        plan = w.plans[q.id]
        assert plan[-1].value == q.answer and q.answer.lower() not in q.question.lower()
        for hop in plan:
            text = docs[hop.url].text
            assert any(hop.value in p for p in rank_passages(text, hop.goal, 2))
            assert hop.value not in make_snippet(text, 90)
    for q in (*w.train, *w.heldout):
        assert q.hops in hops
    heldout = named_entities(w, w.heldout)
    assert not heldout & named_entities(w, (*w.train, *w.warm_start))

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.tools.passages import WINDOW_CHARS, bm25_scores, rank_passages, split_passages, tokenize


def test_tokenize_lowercases_drops_stopwords_and_strips_plurals():
    assert tokenize("The Capitals of the Cities, in 1432!") == ["capital", "city", "1432"]


def test_tokenize_keeps_short_words_double_s_and_unicode_letters():
    # "bus" is too short to stem, "class" ends in "ss", "São" keeps its accent.
    assert tokenize("bus class São_Paulo's") == ["bus", "class", "são", "paulo"]


def test_bm25_matches_hand_computed_value():
    docs = [["capital", "velmora"], ["velmora", "river", "river"], []]
    scores = bm25_scores(docs, ["river"])
    n, df, avgdl = 3, 1, 5 / 3
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    expected = idf * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3 / avgdl))
    assert scores[0] == 0.0 and scores[2] == 0.0
    assert math.isclose(scores[1], expected, rel_tol=1e-12)


def test_rank_passages_returns_best_in_page_order():
    text = (
        "Velmora is a country in the north. The river Ambrel flows through Velmora. "
        "Its cities are old. The capital of Velmora is Drennick."
    )
    got = rank_passages(text, "capital of Velmora", 2)
    assert got[-1] == "The capital of Velmora is Drennick."
    assert len(got) == 2
    # page order, not score order
    assert text.index(got[0]) < text.index(got[1])


def test_rank_passages_ties_go_to_the_earlier_passage():
    text = "Alpha river one. Beta river two. Gamma river three."
    assert rank_passages(text, "river", 1) == ["Alpha river one."]


def test_rank_passages_without_any_match_returns_the_first_k():
    text = "One thing. Another thing. A third thing."
    assert rank_passages(text, "zebra", 2) == ["One thing.", "Another thing."]
    assert rank_passages(text, "the of", 2) == ["One thing.", "Another thing."]


def test_rank_passages_edge_cases():
    assert rank_passages("", "goal", 3) == []
    assert rank_passages("Only one.", "goal", 0) == []
    assert rank_passages("Only one.", "one", 5) == ["Only one."]
    try:
        rank_passages("x", "y", -1)
    except ValueError as e:
        assert "k must be >= 0" in str(e)
    else:
        raise AssertionError("negative k accepted")


def test_line_breaks_end_passages():
    assert split_passages("Heading\nFirst item\n\nSecond item.") == ["Heading", "First item", "Second item."]


def test_long_sentence_is_cut_into_windows_at_word_boundaries():
    sentence = " ".join(f"word{i}" for i in range(200)) + "."
    passages = split_passages(sentence)
    assert len(passages) > 1
    assert all(len(p) <= WINDOW_CHARS for p in passages)
    assert " ".join(passages) == sentence


def test_a_window_finds_the_goal_inside_a_long_sentence():
    filler = " ".join(f"filler{i}" for i in range(150))
    text = f"{filler} the treasure lies under the old mill {filler}."
    (best,) = rank_passages(text, "treasure mill", 1)
    assert "treasure" in best and len(best) <= WINDOW_CHARS


words = st.sampled_from(["river", "capital", "city", "Velmora", "the", "of", "1432", "born", "mayor", "x"])
sentences = st.lists(words, min_size=1, max_size=12).map(lambda ws: " ".join(ws) + ".")


@settings(max_examples=200, deadline=None)
@given(st.lists(sentences, min_size=0, max_size=15), st.lists(words, max_size=4).map(" ".join), st.integers(0, 6))
def test_rank_passages_properties(page, goal, k):
    text = " ".join(page)
    passages = split_passages(text)
    got = rank_passages(text, goal, k)
    assert len(got) == min(k, len(passages))
    assert got == rank_passages(text, goal, k)  # deterministic
    # a subsequence of the page's passages, in page order
    it = iter(passages)
    assert all(any(g == p for p in it) for g in got)
    # nothing left out scores higher than something kept
    scores = bm25_scores([tokenize(p) for p in passages], tokenize(goal))
    kept_idx = []
    start = 0
    for g in got:
        i = passages.index(g, start)
        kept_idx.append(i)
        start = i + 1
    if kept_idx:
        left_out = [scores[i] for i in range(len(passages)) if i not in kept_idx]
        if left_out:
            assert min(scores[i] for i in kept_idx) >= max(left_out)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=2000))
def test_split_passages_keeps_every_word(text):
    passages = split_passages(text)
    assert all(p and p == p.strip() for p in passages)
    assert all(len(p) <= WINDOW_CHARS for p in passages)
    # No character is lost; only whitespace between passages (and inside hard-cut words) moves.
    assert "".join("".join(passages).split()) == "".join(text.split())


def test_a_word_longer_than_the_window_is_cut_hard():
    passages = split_passages("short " + "x" * 700 + " tail")
    assert passages == ["short", "x" * 300, "x" * 300, "x" * 100 + " tail"]

"""Every rule of the Gopher quality, Gopher repetition, C4 and FineWeb filters: a document that
trips it (with datatrove's reason name) and one that passes; the fast duplicate counting against
a plain reference implementation."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from shardflow.dataprep.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from shardflow.dataprep.quality import (
    C4,
    FineWeb,
    GopherQuality,
    GopherRepetition,
    _repeated_ngram_chars,
    count_sentences,
    filter_step,
    quality_filters,
    split_sentences,
    words_of,
)

GOOD = (
    "The river runs through the middle of the old town, and most of the houses that line its banks "
    "were built with stone from the nearby hills. In the spring the water rises quickly, so the people "
    "who live there have learned to keep their boats tied high on the walls. Children walk to school "
    "along the towpath and stop to watch the herons that fish in the shallows.\n"
    "The market opens early on Saturday mornings. Farmers bring vegetables, cheese and bread from the "
    "villages to the north, and the stalls stay busy until noon.\n"
    "Visitors often ask why the bridge has seven arches. The answer is that the builders wanted each "
    "arch to be small enough to survive the winter floods, which were much stronger before the dam "
    "was built upstream.\n"
    "Today the town is quieter than it used to be, but it remains a pleasant place to spend a weekend."
)
GOOD_LINES = GOOD.split("\n")
UNIQUE_WORDS = [f"{a}{b}" for a in ("river", "stone", "market", "bridge", "garden", "window", "harbor", "meadow")
                for b in ("s", "ed", "ing", "er", "ly", "ness", "ful", "ward")]


def test_good_document_passes_every_filter():
    for check in quality_filters(GopherQualityConfig(), GopherRepetitionConfig(), C4Config(), FineWebConfig()):
        if getattr(check, "rewrites", False):
            text, reason = check(GOOD, Counter())
            assert reason is None and text == GOOD
        else:
            assert check(GOOD) is None, check.name


# --- tokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,tokens", [
    ("Hello, world... it's fine.", ["Hello", ",", "world", "...", "it", "'s", "fine", "."]),
    ("I don't know; e.g. U.S. law.", ["I", "do", "n't", "know", ";", "e.g.", "U.S.", "law", "."]),
    ("well-known UTF-8 I/O 2001-01-02", ["well", "-", "known", "UTF-8", "I", "/", "O", "2001", "-", "01", "-", "02"]),
    ("print(x) os.path.join --foo a=b x=1", ["print(x", ")", "os.path.join", "--foo", "a", "=", "b", "x=1"]),
    ("see https://example.com/a?b=1. (done)", ["see", "https://example.com/a?b=1", ".", "(", "done", ")"]),
    ("__init__ ─┼─ 3.14", ["_", "_", "init", "_", "_", "─", "┼", "─", "3.14"]),
])
def test_word_tokenizer(text, tokens):
    assert words_of(text) == tokens


def test_sentence_counting():
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences("Wait... for it. Mr. J. Smith came. Version 3.14 is out.") == 3
    assert count_sentences("") == 0
    assert split_sentences("First one. Second one! Third") == ["First one.", "Second one!", "Third"]


# --- Gopher quality ---------------------------------------------------------------------------

def gq(text: str, **cfg) -> str | None:
    return GopherQuality(GopherQualityConfig(**cfg))(text)


@pytest.mark.parametrize("text,cfg,reason", [
    ("Too short to be a real document, with the words of it.", {}, "gopher_short_doc"),
    (GOOD, {"max_doc_words": 50}, "gopher_long_doc"),
    (" ".join(["I am at it, so we go to be on my own."] * 10), {}, "gopher_below_avg_threshold"),
    (" ".join(["Internationalization characteristically overcomplicates the administrations."] * 10)
     + " The end with that.", {}, "gopher_above_avg_threshold"),
    (GOOD + " " + "#tag " * 25, {}, "gopher_too_many_hashes"),
    (GOOD + " " + "wait... " * 25, {}, "gopher_too_many_ellipsis"),
    ("\n".join(f"- the item number {w} is on the list with that one" for w in UNIQUE_WORDS[:12]), {}, "gopher_too_many_bullets"),
    ("\n".join(GOOD_LINES + ["and then it went on and on…", "the story goes on with that...", "and the rest of it ..."]),
     {}, "gopher_too_many_end_ellipsis"),
    (GOOD + " " + " ".join(str(i) for i in range(100)), {}, "gopher_below_alpha_threshold"),
    (" ".join(UNIQUE_WORDS) + ". Cats sleep. Dogs bark.", {}, "gopher_enough_stop_words"),
])
def test_gopher_quality_rules(text, cfg, reason):
    assert gq(text, **cfg) == reason
    # the same document passes once that rule is switched off (or the filter is tuned)
    off = {"gopher_short_doc": {"min_doc_words": None}, "gopher_long_doc": {"max_doc_words": None},
           "gopher_below_avg_threshold": {"min_avg_word_length": None},
           "gopher_above_avg_threshold": {"max_avg_word_length": None},
           "gopher_too_many_hashes": {"max_symbol_word_ratio": None},
           "gopher_too_many_ellipsis": {"max_symbol_word_ratio": None},
           "gopher_too_many_bullets": {"max_bullet_lines_ratio": None},
           "gopher_too_many_end_ellipsis": {"max_ellipsis_lines_ratio": None},
           "gopher_below_alpha_threshold": {"max_non_alpha_words_ratio": None},
           "gopher_enough_stop_words": {"min_stop_words": None}}[reason]
    assert gq(text, **{**cfg, **off}) != reason


def test_gopher_custom_stop_words():
    text = " ".join(UNIQUE_WORDS) + ". Cats sleep. Dogs bark."
    assert gq(text, stop_words=["cats", "dogs", "Cats", "Dogs"]) is None


# --- Gopher repetition ------------------------------------------------------------------------

def gr(text: str, **cfg) -> str | None:
    return GopherRepetition(GopherRepetitionConfig(**cfg))(text)


def _unique_text(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(UNIQUE_WORDS) + str(rng.randrange(10**6)) for _ in range(n)]


def test_duplicate_paragraphs_and_lines():
    long_para = " ".join(GOOD_LINES[:2])
    assert gr("Para one here.\n\nPara one here.\n\nPara two here.") == "dup_para_frac"
    shorts = "\n\n".join(f"short paragraph {w}." for w in UNIQUE_WORDS[:4])
    assert gr(f"{long_para}\n\n{long_para}\n\n{shorts}") == "dup_para_char_frac"
    assert gr("line a here\nline a here\nline b here") == "dup_line_frac"
    short_lines = "\n".join(f"short line {w}." for w in UNIQUE_WORDS[:4])
    assert gr(f"{long_para}\n{long_para}\n{short_lines}") == "dup_line_char_frac"
    assert gr("") == "empty"


@pytest.mark.parametrize("n,frac", [(2, 0.2), (3, 0.18), (4, 0.16)])
def test_top_n_gram(n, frac):
    rng = random.Random(n)
    phrase = ["data", "set", "of", "the"][:n]
    words = []
    for w in _unique_text(14, rng):
        words += phrase + [w]
    text = " ".join(words)
    assert gr(text, top_n_grams=[(n, frac)], dup_n_grams=[]) == f"top_{n}_gram"
    assert gr(text, top_n_grams=[(n, 0.9)], dup_n_grams=[]) is None


@pytest.mark.parametrize("n,frac", [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
def test_duplicated_n_grams(n, frac):
    rng = random.Random(n)
    passage = _unique_text(n, rng)
    words = _unique_text(30, rng) + passage + _unique_text(5, rng) + passage + _unique_text(3, rng) + passage
    text = " ".join(words)
    assert gr(text, top_n_grams=[], dup_n_grams=[(n, frac)]) == f"duplicated_{n}_n_grams"
    # one word shorter than n: the passage no longer holds a repeated n-gram
    assert gr(" ".join(_unique_text(30, rng) + passage[:-1] + _unique_text(5, rng) + passage[:-1]),
              top_n_grams=[], dup_n_grams=[(n, frac)]) is None


def _reference_dup_chars(words: list[str], n: int) -> int:
    """datatrove's greedy scan, written plainly (tuples instead of joined strings)."""
    seen, idx, total = set(), 0, 0
    while idx < len(words) - n + 1:
        gram = tuple(words[idx:idx + n])
        if gram in seen:
            total += sum(map(len, gram))
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return total


def _reference_repetition(text: str, cfg: GopherRepetitionConfig) -> str | None:
    words = words_of(text)
    for n, frac in cfg.top_n_grams:
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams:
            gram, count = Counter(grams).most_common(1)[0]
            if (len(" ".join(gram)) * count) / len(text) > frac:
                return f"top_{n}_gram"
    for n, frac in cfg.dup_n_grams:
        if _reference_dup_chars(words, n) / len(text) > frac:
            return f"duplicated_{n}_n_grams"
    return None


def test_fast_ngram_counting_matches_reference():
    rng = random.Random(0)
    vocab = ["a", "bb", "ccc", "dd", "e", "ffff", "g", "hh"]
    for trial in range(300):
        words = [rng.choice(vocab[: rng.randint(2, 8)]) for _ in range(rng.randint(0, 120))]
        cum = [0]
        for w in words:
            cum.append(cum[-1] + len(w))
        ns = sorted(rng.sample(range(2, 11), rng.randint(1, 4)))
        if len(words) >= min(ns):
            got = _repeated_ngram_chars(words, ns, cum)
            assert got == {n: _reference_dup_chars(words, n) for n in ns}, (trial, ns, words)
    cfg = GopherRepetitionConfig(dup_para_frac=None, dup_para_char_frac=None, dup_line_frac=None, dup_line_char_frac=None)
    for trial in range(300):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 150)))
        assert GopherRepetition(cfg)(text) == _reference_repetition(text, cfg), text


# --- C4 ---------------------------------------------------------------------------------------

def c4(text: str, **cfg) -> tuple[str, str | None, Counter]:
    counters: Counter = Counter()
    out, reason = C4(C4Config(**cfg))(text, counters)
    return out, reason, counters


def test_c4_line_rules_rewrite_the_document():
    lines = GOOD_LINES + [
        "A heading without punctuation",
        "Wait for it...",
        "Yes.",
        "Please enable JavaScript to view the comments below.",
        "By using this site you agree to the Terms of Use and Privacy Policy.",
        "This line has a " + "x" * 1001 + " word in it.",
        "  Paris is the capital of France.[1] It has many museums.[edit]  ",
    ]
    out, reason, counters = c4("\n".join(lines))
    assert reason is None
    assert out == "\n".join(GOOD_LINES + ["Paris is the capital of France. It has many museums."])
    assert counters == Counter({"c4.lines_removed.no_terminal_punct": 2, "c4.lines_removed.too_few_words": 1,
                                "c4.lines_removed.javascript": 1, "c4.lines_removed.policy": 1,
                                "c4.lines_removed.too_long_word": 1})
    # each rule can be switched off
    assert "A heading without punctuation" in c4("\n".join(lines), filter_no_terminal_punct=False)[0]
    assert "JavaScript" in c4("\n".join(lines), filter_javascript=False)[0]
    assert "Terms of Use" in c4("\n".join(lines), filter_policy=False)[0]
    assert "[1]" in c4("\n".join(lines), remove_citations=False, filter_no_terminal_punct=False)[0]


@pytest.mark.parametrize("extra,reason", [
    ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("The config looks like {key: value} in this format.", "curly_bracket"),
])
def test_c4_document_rules(extra, reason):
    text = GOOD + "\n" + extra
    out, got, _ = c4(text)
    assert got == reason and out == text
    switch = {"lorem_ipsum": "filter_lorem_ipsum", "curly_bracket": "filter_curly_bracket"}[reason]
    assert c4(text, **{switch: False})[1] is None


def test_c4_too_few_sentences():
    assert c4("One short sentence here.\nAnother sentence is here.\nAnd a third one.")[1] == "too_few_sentences"
    # five sentences on two lines are enough: sentences, not lines, are counted
    two_lines = "It rained. We stayed in. The fire was warm.\nWe read books. Then we slept."
    assert c4(two_lines)[1] is None
    assert c4("One short sentence here.", min_num_sentences=-1)[1] is None


def test_c4_sentence_mode():
    text = "First sentence is here. Second one follows here! Third is a question? Fourth ends here. Fifth one is here."
    out, reason, _ = c4(text, split_paragraph=False)
    assert reason is None and out == text


# --- FineWeb ----------------------------------------------------------------------------------

def fw(text: str, **cfg) -> str | None:
    return FineWeb(FineWebConfig(**cfg))(text)


def test_fineweb_rules():
    headers = "\n".join(f"Section about the {w} in the town" for w in UNIQUE_WORDS[:10])
    assert fw(headers) == "line_punct_ratio"
    assert fw(headers, line_punct_exclude_zero=True) is None
    assert fw("\n".join(f"{w}." for w in UNIQUE_WORDS[:10])) == "short_line_ratio"
    assert fw("\n".join(f"{w}." for w in UNIQUE_WORDS[:10]), short_line_thr=1.0) == "list_ratio"
    assert fw(GOOD + "\n" + GOOD_LINES[1]) == "char_dup_ratio"
    listy = "\n".join(f"Extraordinarily{w} incomprehensibilities." for w in UNIQUE_WORDS[:12])
    assert fw(listy) == "list_ratio"
    assert fw(listy, new_line_ratio=0.9) is None
    assert fw(" \n\t\n") == "empty"
    assert fw(GOOD) is None


# --- the step ---------------------------------------------------------------------------------

def test_filter_step_counts_drops_and_reports_them():
    docs = [{"id": str(i), "text": t, "source": "s", "meta": {}} for i, t in
            enumerate([GOOD, "Too short.", GOOD + "\nLorem ipsum is here, with text."])]
    dropped = []
    counters: Counter = Counter()
    steps = [filter_step(f, lambda d, f, r: dropped.append((d["id"], f, r)))
             for f in quality_filters(GopherQualityConfig(), GopherRepetitionConfig(), C4Config(), FineWebConfig())]
    it = iter(docs)
    for step in steps:
        it = step(it, counters)
    assert [d["id"] for d in it] == ["0"]
    assert dropped == [("1", "gopher_quality", "gopher_short_doc"), ("2", "c4", "lorem_ipsum")]
    assert counters["dropped.gopher_quality.gopher_short_doc"] == 1
    assert counters["dropped.c4.lorem_ipsum"] == 1


def test_disabled_filters_are_left_out():
    names = [f.name for f in quality_filters(GopherQualityConfig(enabled=False), GopherRepetitionConfig(),
                                             C4Config(enabled=False), FineWebConfig())]
    assert names == ["gopher_repetition", "fineweb"]

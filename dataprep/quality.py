"""Heuristic quality filters: Gopher quality, Gopher repetition, C4 and FineWeb, as steps.

Semantics and default thresholds follow datatrove's GopherQualityFilter, GopherRepetitionFilter,
C4QualityFilter and FineWebQualityFilter (themselves after Rae et al. 2021 Table A1, Raffel et al.
2020 and the FineWeb paper), and drop reasons use datatrove's names, so counts compare with theirs.
The implementation is our own and is built for speed: words come from one compiled regex instead
of a spaCy pipeline (one tokenization per text, shared by the filters that look at the same text),
duplicate counting uses sets and ``collections.Counter`` over ``zip``-ed n-grams (C loops), and
the C4 rules screen the whole document once before looking at lines. Where the word tokenizer
differs from spaCy's (contractions stay one word, abbreviations lose their final dot) ratios can
move by a word or two per document; docs/filters.md lists every rule and the agreement measured
against datatrove on the demo corpus.

Each filter is a callable on the text returning a drop reason or ``None``; C4 also returns the
rewritten text. :func:`filter_step` turns one into a step counting ``dropped.<filter>.<reason>``.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, compress, filterfalse
from operator import mul

from .config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from .stage import Document, Step

# Unicode Sentence_Terminal characters (generated from the Unicode database with the `regex`
# package's \p{Sentence_Terminal}); FineWeb's line-punctuation rule and the sentence splitter use it.
SENTENCE_TERMINALS = (
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a"
    "\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa"
    "\u1aab\u1b4e\u1b4f\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1b7f\u1c3b\u1c3c\u1c7e\u1c7f\u2024\u203c"
    "\u203d\u2047\u2048\u2049\u2cf9\u2cfa\u2cfb\u2e2e\u2e3c\u2e53\u2e54\u2e60\u2e61\u3002\ua4ff\ua60e"
    "\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb"
    "\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56"
    "\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be"
    "\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de"
    "\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U000113d4\U000113d5\U0001144b\U0001144c"
    "\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0"
    "\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c"
    "\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42"
    "\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016d6e\U00016d6f\U00016e98\U0001bc9f\U0001da88"
)
_STERM = frozenset(SENTENCE_TERMINALS)
_STERM_CLASS = "".join(re.escape(c) for c in SENTENCE_TERMINALS)

# Word tokenizer: a regex approximation of spaCy's blank English tokenizer (which datatrove uses),
# because the Gopher ratios are defined over its tokens: whitespace chunks lose their leading and
# trailing punctuation as separate tokens but keep inner punctuation ("print(x", "os.path",
# "--foo", "UTF-8"); hyphens/slashes between a letter or digit and a letter split ("well - known",
# "I / O"), as do "=", ":", "<", ">" and "," before a letter and digit-op-digit; "'s"/"'d"/"n't"
# ... split off; box-drawing and other symbols are single tokens; common abbreviations keep their
# dot. On the demo corpus it gives 1,084,679 tokens where spaCy gives 1,081,976.
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "Prof", "Jr", "Sr", "St", "vs", "Inc", "Ltd", "Co")
_EDGE = ",:;!?¿¡()\\[\\]{}<>_#*&\"”“`‘´‚„»«「」『』（）、。？！，；：～·§%=+$£€¥|"
_ALWAYS_SPLIT = "\u2190-\u21ff\u2300-\u23ff\u2500-\u27bf\u2b00-\u2bff\u00a9\u00ae\u00a6—–"
_X = rf"[^\s{_EDGE}{_ALWAYS_SPLIT}.'’/-]"  # characters that never split a chunk
_CONTRACTION_TAIL = r"(?:[sSdDmMtT]|ll|LL|re|RE|ve|VE)(?![^\W_])"
# One character inside a chunk that does not split it (each alternative is a different character
# class, so the repetition below cannot backtrack exponentially).
_INNER = (
    rf"(?:(?!(?<=[^\W_])[:<>=,][^\W\d_]|(?<=[a-z])\.[A-Z]|[+*^]\d)[{_EDGE}.]"
    rf"|(?<![^\W_])-|(?<=[^\W\d_])-(?![^\W\d_])|(?<=\d)-(?![^\W_])"
    rf"|(?<![^\W_])/|(?<=[^\W_])/(?![^\W\d_])|['’](?!{_CONTRACTION_TAIL}))"
)
_CHUNK = rf"(?:(?<![^\W_])(?:[-/]+|\.)(?={_X}))?{_X}+(?:(?=[{_EDGE}.'’/-]){_INNER}+{_X}+)*(?:[-/]+(?![^\W_]))?"
_TOKEN_BRANCHES = (
    r"(?:https?://|www\.)[^\s<>\"'(){}\[\]]*[^\s<>\"'(){}\[\].,;:!?]"
    r"|(?=[^\W\d_]\.|[MDPJSvILCa'|])(?<![^\s(\[\"'“‘])"
    rf"(?:(?:[^\W\d_]\.)+|(?:{'|'.join(_ABBREVIATIONS)})\.|and/or|C\+\+|''|\|\|)(?=[\s)\]\"'”’,;:]|$)"
    rf"|(?=['’])(?<=[^\W_])['’]{_CONTRACTION_TAIL}"
    r"|(?<![^\W_])[Cc]an(?=not(?![^\W_]))"
    rf"|{_CHUNK}"
    r"|\):(?=\s|$)|\.{2,}|…|[-/]+|\S"
)
_TOKEN = re.compile(_TOKEN_BRANCHES)
# Only texts containing "n't" need the (slower) branch that ends a word before it.
_TOKEN_NT = re.compile(rf"(?<=[^\W_])[nN]['’][tT](?![^\W_])|{_X}+?(?=[nN]['’][tT](?![^\W_]))|" + _TOKEN_BRANCHES)


def _punctuation_class() -> str:
    """A regex class of "symbol" characters: ASCII punctuation, every Unicode punctuation (P*)
    character of the BMP, and control characters. A token made only of these is not a word for
    the Gopher rules (as in datatrove); letters, digits and other symbols (box drawing, arrows,
    currency outside ASCII) are."""
    import string
    import unicodedata

    chars = [c for c in map(chr, range(0x80, 0x10000)) if unicodedata.category(c)[0] == "P"]
    return "[" + re.escape(string.punctuation) + "\\x00-\\x1f\\x7f-\\x9f" + "".join(map(re.escape, chars)) + "]"


_HAS_WORD_CHAR = re.compile("[^\\s" + _punctuation_class()[1:]).search
_HAS_ALPHA = re.compile(r"[^\W\d_]").search

# A sentence break (spaCy sentencizer-like): a terminal character closing a word (not part of an
# ellipsis, not after a lone capital as in "J. Smith", nor closing an abbreviation such as "e.g.",
# "U.S." or "Mr."), optional closing punctuation, whitespace, optional opening punctuation, then a
# letter or digit.
_NOT_AFTER_ABBREVIATION = "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS)
_SENTENCE_BREAK = re.compile(
    rf"(?<!\.)(?<!\b[A-Z])(?<!\.[^\W\d_]){_NOT_AFTER_ABBREVIATION}[{_STERM_CLASS}](?!\.)[^\w\s]*\s+[^\w\s]*(?=[^\W_])"
)

_cache: tuple[str, list[str]] = ("", [])


def words_of(text: str) -> list[str]:
    """Tokens of ``text`` (words and symbols); the last result is reused for an equal text."""
    global _cache
    cached = _cache
    if cached[0] is text or cached[0] == text:
        return cached[1]
    words = (_TOKEN_NT if "n't" in text or "n’t" in text or "N'T" in text else _TOKEN).findall(text)
    _cache = (text, words)  # one tuple store: atomic under the GIL
    return words


def count_sentences(line: str) -> int:
    if not line or line.isspace():
        return 0
    return 1 + len(_SENTENCE_BREAK.findall(line))


def split_sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in _SENTENCE_BREAK.finditer(text):
        out.append(text[start:m.start() + 1].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated elements, their characters): every occurrence after an element's first one."""
    unique = set(items)
    n_dup = len(items) - len(unique)
    if not n_dup:
        return 0, 0
    return n_dup, sum(map(len, items)) - sum(map(len, unique))


def _ngrams(words: list[str], n: int):
    return zip(*(words[i:] for i in range(n)))


def _repeated_ngram_chars(words: list[str], ns: list[int], cum: list[int]) -> dict[int, int]:
    """For each n, the characters in repeated n-grams (datatrove's greedy count).

    The scan goes left to right; a first occurrence is remembered, a later one is counted (its
    words' characters, no separators) and the scan jumps past it. Only positions whose n-gram
    occurs at least twice can ever count, and an n-gram (n ≥ n_min) can only repeat where its
    leading n_min-gram does, so every Python-level loop runs over those candidate positions alone.
    """
    n_min = min(ns)
    grams = list(_ngrams(words, n_min))
    counts = Counter(grams)
    out = dict.fromkeys(ns, 0)
    if len(counts) == len(grams):
        return out  # no repeated n_min-gram, so no repeated longer one either
    # Positions whose n-gram occurs twice or more; for the next n they can only shrink (the
    # longer n-gram at p repeats only if the shorter one does).
    candidates = list(compress(range(len(grams)), map((1).__lt__, map(counts.__getitem__, grams))))
    keys = [grams[p] for p in candidates]
    n_words = len(words)
    for n in ns:
        if n != n_min:
            candidates = candidates[:bisect_right(candidates, n_words - n)]
            keys = [tuple(words[p:p + n]) for p in candidates]
        n_counts = Counter(keys)
        if len(n_counts) == len(keys):
            break  # nothing repeats at this n, nor at any longer one
        repeats = list(map((1).__lt__, map(n_counts.__getitem__, keys)))
        candidates = list(compress(candidates, repeats))
        keys = list(compress(keys, repeats))
        seen: set = set()
        resume = total = 0
        for pos, gram in zip(candidates, keys):
            if pos < resume:
                continue
            if gram in seen:
                total += cum[pos + n] - cum[pos]
                resume = pos + n
            else:
                seen.add(gram)
        out[n] = total
    return out


class GopherQuality:
    """Gopher quality rules (Rae et al. 2021, A.1.1), in datatrove's order and with its reasons."""

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig):
        self.cfg = cfg
        self.stop_words = frozenset(cfg.stop_words)

    def __call__(self, text: str) -> str | None:
        c = self.cfg
        words = words_of(text)
        n_words = len(words)
        # datatrove's non-symbol words: those with a character that is not punctuation. Most tokens
        # are alphanumeric (a C-level test); only the rest needs a regex.
        alnum = list(filter(str.isalnum, words))
        other = [w for w in filterfalse(str.isalnum, words) if _HAS_WORD_CHAR(w)]
        n = len(alnum) + len(other)
        if c.min_doc_words and n < c.min_doc_words:
            return "gopher_short_doc"
        if c.max_doc_words and n > c.max_doc_words:
            return "gopher_long_doc"
        if n:
            avg = (sum(map(len, alnum)) + sum(map(len, other))) / n
            if c.min_avg_word_length and avg < c.min_avg_word_length:
                return "gopher_below_avg_threshold"
            if c.max_avg_word_length and avg > c.max_avg_word_length:
                return "gopher_above_avg_threshold"
        if c.max_symbol_word_ratio and n_words:
            if text.count("#") / n_words > c.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > c.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"
        if c.max_bullet_lines_ratio or c.max_ellipsis_lines_ratio:
            lines = text.splitlines()
            if lines:
                if c.max_bullet_lines_ratio and sum(
                    1 for s in lines if s.lstrip().startswith(("•", "-"))
                ) / len(lines) > c.max_bullet_lines_ratio:
                    return "gopher_too_many_bullets"
                if c.max_ellipsis_lines_ratio and sum(
                    1 for s in lines if s.rstrip().endswith(("...", "…"))
                ) / len(lines) > c.max_ellipsis_lines_ratio:
                    return "gopher_too_many_end_ellipsis"
        if c.max_non_alpha_words_ratio and n_words:
            # an alphanumeric token has no letter exactly when it is all numeric
            with_alpha = len(alnum) - sum(map(str.isnumeric, alnum)) + sum(1 for w in other if _HAS_ALPHA(w))
            if with_alpha / n_words < c.max_non_alpha_words_ratio:
                return "gopher_below_alpha_threshold"
        if c.min_stop_words and len(self.stop_words.intersection(words)) < c.min_stop_words:
            return "gopher_enough_stop_words"
        return None


_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


class GopherRepetition:
    """Gopher repetition rules (Rae et al. 2021, Table A1): duplicate lines/paragraphs and n-grams."""

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig):
        self.cfg = cfg
        self.top_n_grams = [(int(n), float(f)) for n, f in cfg.top_n_grams]
        self.dup_n_grams = [(int(n), float(f)) for n, f in cfg.dup_n_grams]
        self._dup_ns = sorted({n for n, _ in self.dup_n_grams})
        self._dup_n_min = min(self._dup_ns, default=0)

    def __call__(self, text: str) -> str | None:
        if not text:
            return "empty"
        c = self.cfg
        size = len(text)
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        n_dup, dup_chars = _duplicates(paragraphs)
        if c.dup_para_frac and n_dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if c.dup_para_char_frac and dup_chars / size > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        n_dup, dup_chars = _duplicates(lines)
        if c.dup_line_frac and n_dup / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if c.dup_line_char_frac and dup_chars / size > c.dup_line_char_frac:
            return "dup_line_char_frac"
        if not (self.top_n_grams or self.dup_n_grams):
            return None
        words = words_of(text)
        if self.top_n_grams and words:
            # An n-gram seen c times has c ≤ count(w) for each of its words w, so its score
            # c·(Σ len(w) + n − 1) ≤ n·max_w(count·len) + (n − 1)·max_w(count): when that bound is
            # under the threshold, the n-gram Counter (the costly part) is not needed.
            unigrams = Counter(words)
            max_mass = max(map(mul, unigrams.values(), map(len, unigrams)))
            max_count = max(unigrams.values())
            for n, frac in self.top_n_grams:
                if len(words) < n or n * max_mass + (n - 1) * max_count <= frac * size:
                    continue
                gram, count = Counter(_ngrams(words, n)).most_common(1)[0]
                # datatrove measures the n-gram joined by spaces.
                if (sum(map(len, gram)) + n - 1) * count / size > frac:
                    return f"top_{n}_gram"
        if self.dup_n_grams and len(words) >= self._dup_n_min:
            cum = [0, *accumulate(map(len, words))]
            repeated = _repeated_ngram_chars(words, self._dup_ns, cum)
            for n, frac in self.dup_n_grams:
                if repeated[n] / size > frac:
                    return f"duplicated_{n}_n_grams"
        return None


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCT = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_C4_LINE_REASONS = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


class C4:
    """C4's rules (Raffel et al. 2020; TFDS c4_utils): drop lines, then drop or rewrite the document.

    Lines are kept only if they end in terminal punctuation (not an ellipsis), have enough words,
    no over-long word, no "javascript" and no cookie/terms-of-use phrase; the document is dropped
    on "lorem ipsum", a curly bracket or too few sentences, and otherwise rewritten to its kept
    lines. Line removals are counted under ``c4.lines_removed.<reason>``.
    """

    name = "c4"
    rewrites = True

    def __init__(self, cfg: C4Config):
        self.cfg = cfg

    def __call__(self, text: str, counters: Counter) -> tuple[str, str | None]:
        c = self.cfg
        if c.split_paragraph:
            lines = text.splitlines()
        else:
            lines = split_sentences(text)
        # Screen the document once: most documents contain none of the phrases looked for per line.
        screened = _CITATION.sub("", text) if c.remove_citations and "[" in text else text
        lowered = screened.lower()
        check_lorem = c.filter_lorem_ipsum and "lorem ipsum" in lowered
        check_js = c.filter_javascript and "javascript" in lowered
        check_curly = c.filter_curly_bracket and "{" in screened
        check_policy = c.filter_policy and any(p in lowered for p in _POLICY)
        check_phrases = check_lorem or check_js or check_curly or check_policy
        max_word = c.max_word_length
        min_words = c.min_words_per_line
        removed = [0] * len(_C4_LINE_REASONS)
        kept: list[str] = []
        for line in lines:
            line = line.strip()
            if max_word != -1 and len(line) > max_word and any(len(w) > max_word for w in line.split()):
                removed[0] += 1
                continue
            n_words = -1
            if c.remove_citations and "[" in line:
                n_words = len(line.split())  # counted before citations go, as C4 does
                line = _CITATION.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(_END_PUNCT) or line.endswith("...")):
                removed[1] += 1
                continue
            if min_words > 0:
                if n_words < 0:
                    n_words = len(line.split())
                if n_words < min_words:
                    removed[2] += 1
                    continue
            if check_phrases:
                line_l = line.lower()
                if check_lorem and "lorem ipsum" in line_l:
                    return text, "lorem_ipsum"
                if check_js and "javascript" in line_l:
                    removed[3] += 1
                    continue
                if check_curly and "{" in line:
                    return text, "curly_bracket"
                if check_policy and any(p in line_l for p in _POLICY):
                    removed[4] += 1
                    continue
            kept.append(line)
        for reason, n in zip(_C4_LINE_REASONS, removed):
            if n:
                counters["c4.lines_removed." + reason] += n
        if c.min_num_sentences > 0 and len(kept) < c.min_num_sentences + sum(1 for k in kept if not k):
            # Each kept non-empty line holds at least one sentence: count only when that is too few.
            if c.split_paragraph:
                n_sentences = sum(count_sentences(k) for k in kept)
            else:
                n_sentences = len(kept)
            if n_sentences < c.min_num_sentences:
                return text, "too_few_sentences"
        return ("\n" if c.split_paragraph else " ").join(kept).strip(), None


class FineWeb:
    """FineWeb's extra heuristics: line punctuation, short lines, duplicated line chars, list-likeness."""

    name = "fineweb"

    def __init__(self, cfg: FineWebConfig):
        self.cfg = cfg

    def __call__(self, text: str) -> str | None:
        c = self.cfg
        lines = [line for line in text.split("\n") if line and not line.isspace()]
        if not lines:
            return "empty"
        n = len(lines)
        ratio = sum(1 for line in lines if line[-1] in _STERM) / n
        if ratio < c.line_punct_thr and not (ratio == 0 and c.line_punct_exclude_zero):
            return "line_punct_ratio"
        short = c.short_line_length
        if sum(1 for line in lines if len(line) <= short) / n > c.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / (len(text) - text.count("\n")) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        newlines = text.count("\n")
        # Every whitespace-separated chunk holds at least one token: tokenize only when that
        # lower bound does not already settle the rule.
        if newlines and newlines / max(1, len(text.split())) > c.new_line_ratio:
            n_words = len(words_of(text))
            if not n_words or newlines / n_words > c.new_line_ratio:
                return "list_ratio"
        return None


OnDrop = Callable[[Document, str, str], None]


def filter_step(check: Callable, on_drop: OnDrop | None = None) -> Step:
    """A step from a filter: drops what it rejects under ``dropped.<name>.<reason>``.

    A rewriting filter (``check.rewrites``) is called as ``check(text, counters)`` and returns
    ``(new_text, reason)``; others are called as ``check(text)`` and return the reason or None.
    """
    name = check.name
    prefix = f"dropped.{name}."
    rewrites = getattr(check, "rewrites", False)

    def step(docs: Iterable[Document], counters: Counter) -> Iterator[Document]:
        for doc in docs:
            if rewrites:
                text, reason = check(doc["text"], counters)
                if reason is None:
                    doc["text"] = text
                    yield doc
                    continue
            else:
                reason = check(doc["text"])
                if reason is None:
                    yield doc
                    continue
            counters[prefix + reason] += 1
            if on_drop is not None:
                on_drop(doc, name, reason)

    return step


def quality_filters(gopher_quality: GopherQualityConfig, gopher_repetition: GopherRepetitionConfig,
                    c4: C4Config, fineweb: FineWebConfig) -> list[Callable]:
    """The enabled filters, in pipeline order (Gopher quality, Gopher repetition, C4, FineWeb)."""
    out: list[Callable] = []
    if gopher_quality.enabled:
        out.append(GopherQuality(gopher_quality))
    if gopher_repetition.enabled:
        out.append(GopherRepetition(gopher_repetition))
    if c4.enabled:
        out.append(C4(c4))
    if fineweb.enabled:
        out.append(FineWeb(fineweb))
    return out

"""Language identification with py3langid, whose naive-Bayes model ships inside its wheel.

Nothing is downloaded at run time (fastText's lid.176 would be, and the machines running the
pipeline may have no route to a model hub). Probabilities are normalized over all of the model's
140 language labels, so ``threshold`` means the same whatever ``languages`` are kept. Only the first
``max_chars`` characters are classified: the model's cost is linear in the bytes it walks, and a
prefix of a couple of KB decides as well as the whole text (measured in docs/filters.md).
"""
from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Callable

from .config import LanguageFilterConfig
from .stage import Document, Step

FILTER_NAME = "language"


@functools.lru_cache(maxsize=1)
def _identifier():
    """The model, loaded once per process (about 0.7 s) and shared by every step built in it."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    return list(_identifier().labels)


def detect(text: str, max_chars: int = 2048) -> tuple[str, float]:
    """(language code, normalized probability) of the first ``max_chars`` characters."""
    lang, score = _identifier().classify(text[:max_chars])
    return lang, float(score)


OnDrop = Callable[[Document, str, str], None]


def language_step(cfg: LanguageFilterConfig, on_drop: OnDrop | None = None) -> Step:
    """Keep documents whose top language is in ``cfg.languages`` with probability ≥ ``threshold``.

    Sets ``meta["lang"]`` and ``meta["lang_score"]`` (4 decimals) on every document it sees.
    Counters: ``lang.<code>`` (detected language of every document),
    ``dropped.language.other_language`` (top language not kept) and
    ``dropped.language.low_confidence`` (a kept language, but below the threshold).
    """
    unknown = sorted(set(cfg.languages) - set(known_languages()))
    if unknown:
        raise ValueError(f"filter.language.languages: {unknown} not known to py3langid; known: {sorted(known_languages())}")
    wanted = frozenset(cfg.languages)
    threshold, max_chars = cfg.threshold, cfg.max_chars
    classify = _identifier().classify

    def step(docs: Iterable[Document], counters: Counter) -> Iterator[Document]:
        seen: Counter = Counter()
        try:
            for doc in docs:
                lang, score = classify(doc["text"][:max_chars])
                score = round(float(score), 4)
                meta = doc.get("meta")
                if meta is None:
                    meta = doc["meta"] = {}
                meta["lang"], meta["lang_score"] = lang, score
                seen[lang] += 1
                if lang in wanted and score >= threshold:
                    yield doc
                    continue
                reason = "low_confidence" if lang in wanted else "other_language"
                counters["dropped.language." + reason] += 1
                if on_drop is not None:
                    on_drop(doc, FILTER_NAME, reason)
        finally:
            for lang, n in seen.items():
                counters["lang." + lang] += n

    return step

"""Language identification with py3langid, whose naive-Bayes model ships inside its wheel.

Nothing is downloaded at run time (fastText's lid.176 would be, and the machines running the
pipeline may have no route to a model hub). Probabilities are normalized over all of the model's
140 language labels, so ``threshold`` means the same whatever ``languages`` are kept. Only the first
``max_chars`` characters are classified: the model's cost is linear in the bytes it walks, and a
prefix of a couple of KB decides as well as the whole text (measured in docs/filters.md).
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Callable

from .config import LanguageFilterConfig
from .stage import Document, Step

FILTER_NAME = "language"
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _identifier():
    """The model, loaded once per process (about 1 s) and shared by every step built in it.

    The vectorized identifier is used when it reproduces the library's own results on probe
    texts; otherwise (a py3langid whose internals changed) the library's class as it is.
    """
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    try:
        fast = _vectorized_class(LanguageIdentifier).from_model_file(MODEL_FILE, norm_probs=True)
        fast.prepare()
        fast.check(_PROBES)
        return fast
    except Exception as exc:  # noqa: BLE001 - any surprise in private internals: use the library as is
        log.warning("py3langid: using the library's own (slower) feature walk: %s", exc)
        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


_PROBES = (
    "The quick brown fox jumps over the lazy dog while the committee discusses the budget.",
    "Der Ausschuss traf sich am Dienstag, um über den Haushalt zu beraten.",
    "Le comité s'est réuni mardi pour discuter du budget de l'année prochaine.",
    "東京は日本の首都です。", "x", "", "1234 5678 !!! ???", "naïve café — «quoted» ¿qué? ÆØÅ",
)


def _vectorized_class(base):
    """py3langid's identifier with its per-byte Python DFA walk replaced by numpy.

    The model's features are found by a deterministic automaton over the UTF-8 bytes whose state
    after a byte is the longest suffix of the text read so far that is a node of its n-gram trie.
    That suffix is at most D bytes long (D = the trie's depth, found by breadth-first search), so
    the state at every position is the state reached from the root over the D bytes ending there:
    D vectorized steps over all positions at once replace one Python step per byte. The naive Bayes
    table is widened from float16 to float32 once (exact) so the scoring is a BLAS product. Both
    give the library's results; :meth:`check` verifies that before :func:`_identifier` uses it.
    """
    import numpy as np

    class VectorizedIdentifier(base):
        __slots__ = ("_nm", "_rb", "_out", "_depth")

        def prepare(self) -> None:
            self._nm = np.asarray(self.tk_nextmove, dtype=np.int32)
            self._rb = np.asarray(self._rowbase, dtype=np.int64)
            self._out = np.asarray(self.tk_output, dtype=np.int32)
            self.nb_ptc = np.asarray(self.nb_ptc, dtype=np.float32)
            self._full_model = (self.nb_ptc, self.nb_pc, self.nb_classes)
            n_states = len(self._rb)
            seen = np.zeros(n_states, dtype=bool)
            seen[0] = True
            frontier, depth, byte_values = np.zeros(1, dtype=np.int64), 0, np.arange(256)
            while True:
                reached = np.zeros(n_states, dtype=bool)
                reached[self._nm[(self._rb[frontier][:, None] + byte_values).ravel()]] = True
                reached &= ~seen
                frontier = np.flatnonzero(reached)
                if not len(frontier):
                    break
                seen |= reached
                depth += 1
            self._depth = depth

        def check(self, probes) -> None:
            """Raise unless the vectorized scores equal the library's own walk on ``probes``."""
            for probe in probes:
                encoded = self._encode(probe)
                ours, theirs = self._raw_score(encoded), base._raw_score(self, encoded)
                if not np.allclose(ours, theirs, rtol=1e-5, atol=1e-3):
                    raise ValueError(f"vectorized walk disagrees with the library on {probe[:20]!r}")

        def _raw_score(self, text):
            data = np.frombuffer(text, dtype=np.uint8) if isinstance(text, bytes) else None
            if data is None or not len(data):
                return super()._raw_score(text)
            n = len(data)
            state = np.zeros(n, dtype=np.int32)
            nm, rb = self._nm, self._rb
            for back in range(min(self._depth, n) - 1, -1, -1):
                # positions i >= back take the byte at i - back
                state[back:] = nm[rb[state[back:]] + data[: n - back]]
            features = self._out[state]
            features = features[features >= 0]
            if not len(features):
                return super()._raw_score(text)
            idx, counts = np.unique(features, return_counts=True)
            return np.log1p(counts.astype(np.float32)) @ self.nb_ptc[idx] + self.nb_pc

    return VectorizedIdentifier


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

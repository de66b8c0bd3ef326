"""Language ID step (py3langid, model inside the wheel), plus its measured accuracy on real text
the tests ship: human translations (de, fr, es, it, nl, pl, pt) and their English originals from
Django's message catalogues (tests/data/langid_sample.jsonl, BSD-3-Clause), and English documents
of the demo corpus. ``pytest -s -k accuracy`` prints the table that docs/filters.md reports."""
from __future__ import annotations

import io
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import zstandard

from shardflow.dataprep.config import LanguageFilterConfig
from shardflow.dataprep.langid import detect, language_step

ENGLISH = ("The committee met on Tuesday to discuss the budget for next year. After a long debate, "
           "the members agreed to spend more money on schools and less on roads.")
GERMAN = ("Der Ausschuss traf sich am Dienstag, um über den Haushalt für das nächste Jahr zu beraten. "
          "Nach einer langen Debatte einigten sich die Mitglieder darauf, mehr Geld für Schulen auszugeben.")
FRENCH = ("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine. Après un long débat, "
          "les membres ont décidé de dépenser davantage pour les écoles et moins pour les routes.")


def _run(texts: list[str], **cfg):
    docs = [{"id": str(i), "text": t, "source": "s", "meta": {}} for i, t in enumerate(texts)]
    counters: Counter = Counter()
    dropped: list = []
    kept = list(language_step(LanguageFilterConfig(**cfg), lambda d, f, r: dropped.append((d["id"], f, r)))(iter(docs), counters))
    return kept, dropped, counters


def test_keeps_english_drops_other_languages():
    kept, dropped, counters = _run([ENGLISH, GERMAN, FRENCH])
    assert [d["id"] for d in kept] == ["0"]
    assert kept[0]["meta"]["lang"] == "en" and 0.65 <= kept[0]["meta"]["lang_score"] <= 1.0
    assert dropped == [("1", "language", "other_language"), ("2", "language", "other_language")]
    assert counters == Counter({"lang.en": 1, "lang.de": 1, "lang.fr": 1, "dropped.language.other_language": 2})


def test_languages_and_threshold_are_configurable():
    kept, _, _ = _run([ENGLISH, GERMAN, FRENCH], languages=["de", "fr"])
    assert [d["meta"]["lang"] for d in kept] == ["de", "fr"]
    kept, dropped, counters = _run([ENGLISH], threshold=1.0)
    score = detect(ENGLISH)[1]
    assert (kept == []) == (score < 1.0)
    if not kept:
        assert dropped == [("0", "language", "low_confidence")] and counters["dropped.language.low_confidence"] == 1


def test_only_the_prefix_is_classified():
    mixed = ENGLISH + " " + GERMAN * 20
    assert detect(mixed, max_chars=len(ENGLISH))[0] == "en"
    assert detect(mixed, max_chars=100_000)[0] == "de"
    kept, _, _ = _run([mixed], max_chars=len(ENGLISH))
    assert len(kept) == 1


def test_unknown_language_code_is_rejected():
    with pytest.raises(ValueError, match="xx"):
        language_step(LanguageFilterConfig(languages=["en", "xx"]))


def test_vectorized_walk_gives_the_librarys_results():
    """Our numpy feature walk against py3langid's own classifier: same labels, same scores."""
    import random

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from shardflow.dataprep.langid import _identifier

    fast, reference = _identifier(), LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    assert type(fast).__name__ == "VectorizedIdentifier"
    rng = random.Random(0)
    texts = demo_english_docs(every=40, n=60) + [ENGLISH, GERMAN, FRENCH, "", "a", "Ünïcödé ½ → ∑"]
    texts += [rng.randbytes(rng.randint(1, 400)) for _ in range(60)]  # any bytes, valid UTF-8 or not
    texts += [ENGLISH[:k] for k in range(1, 12)]  # shorter than the automaton's depth
    for text in texts:
        (a, pa), (b, pb) = fast.classify(text[:2048]), reference.classify(text[:2048])
        assert a == b and abs(pa - pb) < 1e-5, text[:40]


def test_falls_back_to_the_library_when_internals_differ(monkeypatch, caplog):
    import shardflow.dataprep.langid as langid

    def broken(base):
        raise AttributeError("tk_nextmove")

    monkeypatch.setattr(langid, "_vectorized_class", broken)
    identifier = langid._identifier.__wrapped__()
    assert type(identifier).__name__ == "LanguageIdentifier"
    assert identifier.classify(GERMAN)[0] == "de"
    assert "slower" in caplog.text


# --- accuracy on real text -------------------------------------------------------------------

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "langid_sample.jsonl"
"""Human translations from Django's message catalogues (BSD-3-Clause), shipped with the tests;
provenance and licence in tests/data/LANGID_SAMPLE.md, rebuilt by tests/data/build_langid_sample.py."""


def sample_texts() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        out.setdefault(rec["lang"], []).append(rec["text"])
    return out


def demo_english_docs(every: int = 9, n: int = 300) -> list[str]:
    raw = resources.files("shardflow.dataprep").joinpath("data/demo_corpus.jsonl.zst").read_bytes()
    texts = []
    for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", errors="replace"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip() \
                and (rec.get("meta") or {}).get("lang", "en") == "en":
            texts.append(rec["text"])
    return texts[::every][:n]


def test_accuracy_of_keep_english_on_real_text():
    """keep-en on the shipped sample (the same bytes on every machine): English UI text and documents
    must be kept, German, French, Spanish, Italian, Dutch, Polish and Portuguese dropped."""
    cfg = LanguageFilterConfig()
    sample = sample_texts()
    sets = {"en (django)": sample["en"], "en (demo corpus)": demo_english_docs()}
    sets |= {lang: texts for lang, texts in sample.items() if lang != "en"}
    assert set(sets) == {"en (django)", "en (demo corpus)", "de", "fr", "es", "it", "nl", "pl", "pt"}
    assert all(len(texts) >= 60 for texts in sets.values()), {k: len(v) for k, v in sets.items()}
    rows, tp, fn, fp, tn = [], 0, 0, 0, 0
    for name, texts in sets.items():
        kept = sum(1 for t in texts if (r := detect(t, cfg.max_chars))[0] in cfg.languages and r[1] >= cfg.threshold)
        rows.append((name, len(texts), kept))
        if name.startswith("en"):
            tp, fn = tp + kept, fn + len(texts) - kept
        else:
            fp, tn = fp + kept, tn + len(texts) - kept
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    print(f"\nkeep-en with py3langid, max_chars={cfg.max_chars}, threshold={cfg.threshold}")
    for name, total, kept in rows:
        print(f"  {name:18s} {total:4d} texts, kept {kept:4d}")
    print(f"  precision {precision:.4f}  recall {recall:.4f}  (tp {tp}, fp {fp}, fn {fn}, tn {tn})")
    assert precision >= 0.99 and recall >= 0.97, (precision, recall)

"""Language ID step (py3langid, model inside the wheel), plus its measured accuracy on real text:
English and translated Debian man pages (manpages-de/-fr/-es/-it/-nl/-pl/-pt-br) and the demo
corpus. The accuracy test runs where those packages are installed (``apt-get install
manpages-de manpages-fr manpages-es manpages-it manpages-nl manpages-pl manpages-pt-br``) and
prints the table that docs/filters.md reports (``pytest -s -k accuracy``)."""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections import Counter
from importlib import resources

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

MAN_ROOT = "/usr/share/man"
LANG_DIRS = {"de": "de", "fr": "fr", "es": "es", "it": "it", "nl": "nl", "pl": "pl", "pt": "pt_BR"}
_ROFF_ESCAPES = [
    (re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\\((?:aq|cq)"), "'"), (re.compile(r"\\\((?:em|en)"), "—"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]|\\\*(?:\(..|\[[^\]]*\]|.)"), ""), (re.compile(r"\\-"), "-"),
    (re.compile(r"\\[&/,:%|^]"), ""), (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\ "), " "),
]
_TEXT_MACRO = re.compile(r"^\.(?:B|I|BI|IB|BR|RB|IR|RI|SM|SB)\s+(.*)$")
_EN_FUNCTION_WORDS = frozenset("the and which that with from this are be will when should would been have has is it of for not".split())
_WORD = re.compile(r"[^\W\d_]+")


def roff_paragraphs(source: str) -> list[str]:
    """Paragraphs of a man page's roff source: text lines joined, macros and escapes dropped."""
    paragraphs, current = [], []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        m = _TEXT_MACRO.match(line)
        if m:
            line = m.group(1).replace('"', "")
        elif line.startswith((".", "'")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        if line.strip():
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def english_ratio(text: str) -> float:
    """Share of English function words: flags untranslated English left in translated pages."""
    words = _WORD.findall(text.lower())
    return sum(w in _EN_FUNCTION_WORDS for w in words) / max(1, len(words))


def man_paragraphs(lang_dir: str | None, n: int = 100, per_page: int = 2) -> tuple[list[str], int]:
    """Up to ``n`` paragraphs of 200-2000 characters, at most ``per_page`` per page, in sorted page
    order. For a translation, paragraphs left in English by the translators are excluded (those
    equal to a paragraph of the English page, or with > 10 % English function words): the label
    is the directory's language and must be true. Returns (paragraphs, excluded count)."""
    root = os.path.join(MAN_ROOT, lang_dir) if lang_dir else MAN_ROOT
    out, excluded = [], 0
    for section in sorted(d for d in os.listdir(root) if d.startswith("man")):
        for name in sorted(os.listdir(os.path.join(root, section))):
            path = os.path.join(root, section, name)
            if not name.endswith(".gz") or os.path.islink(path):
                continue
            try:
                paras = roff_paragraphs(gzip.open(path).read().decode("utf-8"))
            except (UnicodeDecodeError, OSError, EOFError):
                continue
            english: set[str] = set()
            original = os.path.join(MAN_ROOT, section, name)
            if lang_dir and os.path.exists(original):
                try:
                    english = set(roff_paragraphs(gzip.open(original).read().decode("utf-8", "replace")))
                except (OSError, EOFError):
                    pass
            taken = 0
            for p in paras:
                if not 200 <= len(p) <= 2000 or taken == per_page:
                    continue
                if lang_dir and (p in english or english_ratio(p) > 0.1):
                    excluded += 1
                    continue
                out.append(p)
                taken += 1
            if len(out) >= n:
                return out[:n], excluded
    return out, excluded


def demo_english_docs(every: int = 9, n: int = 300) -> list[str]:
    raw = resources.files("shardflow.dataprep").joinpath("data/demo_corpus.jsonl.zst").read_bytes()
    texts = []
    for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", errors="replace"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
            texts.append(rec["text"])
    return texts[::every][:n]


@pytest.mark.skipif(not all(os.path.isdir(os.path.join(MAN_ROOT, d, "man1")) for d in LANG_DIRS.values()),
                    reason="translated man pages not installed (apt-get install manpages-de manpages-fr ...)")
def test_accuracy_of_keep_english_on_real_text():
    cfg = LanguageFilterConfig()
    sets: dict[str, list[str]] = {"en (man pages)": man_paragraphs(None)[0], "en (demo corpus)": demo_english_docs()}
    excluded = {}
    for lang, d in LANG_DIRS.items():
        sets[lang], excluded[lang] = man_paragraphs(d)
    # Some translated man pages come with other packages (man-db, apt); the manpages-xx sets are
    # what make a sample this size. Judge accuracy only on full samples.
    short = {name: len(texts) for name, texts in sets.items() if len(texts) < 90}
    if short:
        pytest.skip(f"too few paragraphs of real text here {short}; apt-get install manpages-de manpages-fr manpages-es ...")
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
    print(f"  excluded untranslated paragraphs: {excluded}")
    print(f"  precision {precision:.4f}  recall {recall:.4f}  (tp {tp}, fp {fp}, fn {fn}, tn {tn})")
    assert precision >= 0.99 and recall >= 0.97

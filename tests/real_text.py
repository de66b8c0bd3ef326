"""Real text for tests, from the corpus the project ships: ``dataprep/data/demo_corpus.jsonl.zst``.

Why the shipped corpus and not the machine's files (``/usr/share/common-licenses``, package
copyright files, man pages): those differ between machines, so counts a test expects (examples,
samples, accuracies) would too. The demo corpus is the same bytes everywhere; see its
``PROVENANCE.md`` for its sources and licences. It is read with the demo corpus reader.
"""
from __future__ import annotations

import functools
import json

from shardflow.dataprep.demo_corpus import demo_corpus_lines


@functools.lru_cache(maxsize=1)
def demo_records() -> tuple[dict, ...]:
    """The valid English records of the demo corpus, in file order (its planted malformed lines and
    its few non-English documents are left out)."""
    out = []
    for raw in demo_corpus_lines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if (isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip()
                and (rec.get("meta") or {}).get("lang", "en") == "en"):
            out.append(rec)
    return tuple(out)


def package_of(rec: dict) -> str:
    """The Debian package a demo record comes from (``jargon-text``, ``python3.11-doc`` …)."""
    return (rec.get("meta") or {}).get("package") or str(rec.get("source", "demo")).split("/", 1)[0]


def demo_texts(max_chars: int, every: int = 1, package: str | None = None) -> list[str]:
    """Whole documents, every ``every``-th one (of ``package``, or of all), until ``max_chars``
    characters: a fixed real-text sample (the corpus is ordered package by package, so a stride
    over all of it spans them)."""
    texts, total = [], 0
    recs = [r for r in demo_records() if package is None or package_of(r) == package]
    for rec in recs[::every]:
        if total >= max_chars:
            break
        texts.append(rec["text"])
        total += len(rec["text"])
    return texts

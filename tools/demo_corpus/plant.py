"""What the demo corpus plants, deterministically and labelled: near and exact duplicates, malformed lines.

Part of the demo corpus builder (tools/demo_corpus/build.py).
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from shardflow.dataprep.demo_corpus import MALFORMED_KINDS

from .sources import Doc, record_line, sha1_hex

# --------------------------------------------------------------------------------------------
# Planted near duplicates
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"(\s+)")


def seeded_rng(*parts: str) -> random.Random:
    """A stable RNG: seeded from a hash, never from ``hash()`` (salted per process)."""
    return random.Random(int(sha1_hex("\x1f".join(parts))[:16], 16))


def make_near_duplicate(text: str, rate: float, rng: random.Random, *,
                        style: str = "words") -> tuple[str, float]:
    """Edit about ``rate`` of the words of ``text``; return the new text and the real rate.

    Edits are substitutions by another word of the same document (so the vocabulary stays
    natural), deletions and insertions. ``style`` adds a whitespace reflow (``"whitespace"``)
    or a changed header line (``"header"``) on top — variations that exact dedup misses but a
    normalising near-dup detector should not.
    """
    tokens = _TOKEN.split(text)
    words = [i for i in range(0, len(tokens), 2) if tokens[i]]
    if not words:
        return text, 0.0
    vocab = sorted({tokens[i] for i in words if tokens[i].isalpha() and len(tokens[i]) > 2}) or [
        "the"]
    n = max(1, round(rate * len(words)))
    edits = 0
    if style == "header":
        header = rng.choice(["Revised edition.", "Updated for the current release.",
                             "Draft — subject to change.", "(This page was edited.)"])
        edits += len(header.split())
        tokens[0] = header + "\n\n" + tokens[0]
    for pos in rng.sample(words, min(len(words), max(0, n - edits))):
        op = rng.random()
        w = tokens[pos]
        if op < 0.5:
            repl = rng.choice(vocab)
            tokens[pos] = repl if repl != w else repl.upper()
        elif op < 0.75:
            tokens[pos] = ""
        else:
            tokens[pos] = w + " " + rng.choice(vocab)
        edits += 1
    out = "".join(tokens)
    if style == "whitespace":
        out = re.sub(r"[ \t]*\n[ \t]*(?=\S)", lambda m: " " if rng.random() < 0.5 else "\n", out)
        out = out.replace(". ", ".  ", 3)
    return out, edits / len(words)


def _malformed_lines(docs: Sequence[Doc]) -> list[tuple[str, str, bytes]]:
    """(kind, sort key, raw line) for each planted malformed line, built from real records."""
    pool = sorted(docs, key=lambda d: sha1_hex("malformed:" + d.id))
    picks = iter(pool)
    lines: list[tuple[str, str, bytes]] = []

    def rec(kind: str, mutate) -> None:
        d = next(picks)
        obj = {"id": f"malformed/{kind}/{len(lines)}", "text": d.text, "source": d.source,
               "meta": {"license": d.license, "package": d.package, "lang": d.lang,
                        "planted": "malformed", "malformed": kind}}
        lines.append((kind, obj["id"], mutate(obj)))

    def drop_text(o):
        del o["text"]
        return record_line(o)

    def set_text(v):
        def f(o):
            o["text"] = v
            return record_line(o)
        return f

    # a record cut off mid-string, as a killed writer leaves it
    rec("invalid_json", lambda o: record_line(o)[: 40 + len(o["id"])].rstrip(b"\n") + b"\n")
    # single quotes and a bare key: the Python repr someone wrote instead of JSON
    rec("invalid_json", lambda o: ("{id: %r, 'text': %r}" % (o["id"], o["text"][:300]))
        .replace("\n", " ").encode("utf-8") + b"\n")
    rec("json_array", lambda o: record_line([o["id"], o["text"][:300], o["source"]]))
    rec("json_scalar", lambda o: record_line(o["text"][:300]))
    # the text re-encoded as Latin-1 by a misconfigured exporter: not valid UTF-8
    rec("invalid_utf8", lambda o: record_line(
        dict(o, text=o["text"][:400] + " \u00ff\u00e9\u00b4")).decode("utf-8").encode(
        "latin-1", "replace"))
    rec("missing_text", drop_text)
    rec("null_text", set_text(None))
    rec("empty_text", set_text(""))
    rec("numeric_text", set_text(42))
    rec("list_text", lambda o: set_text(o["text"].split("\n\n")[:3])(o))
    counts: dict[str, int] = {}
    for kind, _, _ in lines:
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == MALFORMED_KINDS, counts
    return lines


def plant_exact_duplicates(docs: list[Doc], fraction: float, salt: str = "exact") -> list[Doc]:
    """Verbatim copies under new ids, topping up the natural duplicates to ``fraction``."""
    seen: dict[str, int] = {}
    for d in docs:
        seen[d.text] = seen.get(d.text, 0) + 1
    natural = sum(c - 1 for c in seen.values() if c > 1)
    want = max(0, round(fraction * len(docs)) - natural)
    pool = [d for d in sorted(docs, key=lambda d: sha1_hex(salt + d.id))
            if len(d.text) >= 300 and seen[d.text] == 1]
    return [Doc(id=d.id + "~dup", text=d.text, source=d.source, package=d.package,
                license=d.license, lang=d.lang, extra={"planted": "exact_dup", "dup_of": d.id})
            for d in pool[:want]]


def plant_near_duplicates(docs: list[Doc], n: int, rates: Sequence[float], *,
                          salt: str = "near", exclude: set[str] = frozenset(),
                          styles: Sequence[str] = ("words",), min_words: int = 80) -> list[Doc]:
    """``n`` edited copies of distinct documents, rates and styles cycled in a fixed order."""
    pool = [d for d in sorted(docs, key=lambda d: sha1_hex(salt + d.id))
            if d.id not in exclude and len(d.text.split()) >= min_words]
    out = []
    for k, d in enumerate(pool[:n]):
        rate = rates[k % len(rates)]
        style = styles[k % len(styles)]
        text, real = make_near_duplicate(d.text, rate, seeded_rng(salt, d.id, str(rate)),
                                         style=style)
        out.append(Doc(id=f"{d.id}~near{int(round(rate * 100)):02d}", text=text,
                       source=d.source, package=d.package, license=d.license, lang=d.lang,
                       extra={"planted": "near_dup", "dup_of": d.id, "edit_rate": rate,
                              "words_edited": round(real, 4), "style": style}))
    return out

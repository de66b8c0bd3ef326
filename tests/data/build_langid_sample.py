"""Build ``langid_sample.jsonl`` (run once; the output is committed): real human translations for
the language-ID accuracy test, from the message catalogues of Django (BSD-3-Clause).

    pip download --no-deps Django==5.1.4 -d /tmp/dj
    python tests/data/build_langid_sample.py /tmp/dj/Django-5.1.4-py3-none-any.whl

Why Django's catalogues: they are translated by people (not machines), in every language the test
needs, under a permissive licence, and each translated message comes with its English original,
so the English side of the sample is the same material. Messages are taken in catalogue order
(sorted file paths, then file order); a message is kept when it is translated (``msgstr`` not
empty, not equal to ``msgid``, not fuzzy) and has at least 4 words once placeholders
(``%(name)s``, ``%s``, ``{0}``) and HTML tags are removed. Consecutive kept messages are joined
with spaces into texts of at least 200 characters; at most 100 texts per language. Deterministic:
the same wheel gives the same bytes.
"""
from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

LANGS = {"de": "de", "fr": "fr", "es": "es", "it": "it", "nl": "nl", "pl": "pl", "pt": "pt_BR"}
MIN_CHARS, MAX_TEXTS, MIN_WORDS = 200, 100, 4
OUT = Path(__file__).with_name("langid_sample.jsonl")

_PLACEHOLDER = re.compile(r"%\([^)]*\)[-#0 +]*\d*(?:\.\d+)?[sdifr]|%[-#0 +]*\d*(?:\.\d+)?[sdifr]|\{[^{}]*\}|<[^>]+>")


def _unquote(lines: list[str]) -> str:
    return "".join(json.loads(line) for line in lines)


def catalogue(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) of the translated, non-fuzzy entries of one .po file, in file order."""
    out = []
    for block in text.split("\n\n"):
        if "#, fuzzy" in block:
            continue
        field, parts, fields = None, [], {}
        for line in block.splitlines():
            m = re.match(r"^(msgid|msgid_plural|msgstr(?:\[0\])?|msgstr\[\d+\]) (\".*\")$", line)
            if m:
                if field:
                    fields[field] = _unquote(parts)
                field, parts = m.group(1), [m.group(2)]
            elif line.startswith('"') and field:
                parts.append(line)
        if field:
            fields[field] = _unquote(parts)
        mid, mstr = fields.get("msgid", ""), fields.get("msgstr", fields.get("msgstr[0]", ""))
        if mid and mstr and mid != mstr:
            out.append((mid, mstr))
    return out


def clean(s: str) -> str:
    return " ".join(_PLACEHOLDER.sub(" ", s).replace("\\n", " ").split())


def texts(messages: list[str]) -> list[str]:
    out, cur = [], []
    for msg in messages:
        msg = clean(msg)
        if len(msg.split()) < MIN_WORDS:
            continue
        cur.append(msg)
        if len(" ".join(cur)) >= MIN_CHARS:
            out.append(" ".join(cur))
            cur = []
            if len(out) == MAX_TEXTS:
                break
    return out


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".po") and "/locale/" in n)
        english: list[str] = []
        rows = []
        for lang, folder in LANGS.items():
            entries = [e for n in names if f"/locale/{folder}/LC_MESSAGES/" in n
                       for e in catalogue(z.read(n).decode("utf-8"))]
            rows += [{"lang": lang, "source": f"django-5.1.4/{folder}", "text": t} for t in texts([e[1] for e in entries])]
            if lang == "de":  # the English originals, once (every catalogue translates the same messages)
                english = texts([e[0] for e in entries])
        rows = [{"lang": "en", "source": "django-5.1.4/msgid", "text": t} for t in english] + rows
    with open(OUT, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    counts = {}
    for r in rows:
        counts[r["lang"]] = counts.get(r["lang"], 0) + 1
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {counts}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Build the real-text demo corpus from Debian documentation (corpus tooling, not runtime).

The runtime side -- where the shipped file is, reading it -- is ``shardflow.dataprep.demo_corpus``;
this builder imports its paths and :data:`MALFORMED_KINDS` from there.

Why Debian packages: the demo and the benchmarks need *real* prose (generated text makes MinHash,
language ID and quality filters look better or worse than they are), the machines reach no web
site, and a Debian package pins exact, reproducible bytes with a stated licence. The shipped corpus
(``data/demo_corpus.jsonl.zst``) is built from public-domain and permissively licensed packages,
plus a handful of translated (GPL-2+) pages so that language ID has something real to drop; see
``data/PROVENANCE.md``.

Why the corpus is deliberately dirty: a pipeline demo on clean text exercises nothing. The builder
plants, deterministically and labelled in each record's ``meta.planted``, verbatim duplicates,
near duplicates (1-5 % of words edited), real low-quality fragments (navigation bars, symbol
indexes) and ten malformed lines of known kinds (:data:`MALFORMED_KINDS`).

Why everything is ordered by hashes and no clock is read: the same installed package versions must
give a byte-identical file, so that a rebuilt corpus diffs clean and test expectations hold.

Rebuild the shipped file (after installing :data:`DEMO_PACKAGES`), from the repository root::

    python tools/demo_corpus/build.py build

The builder in modules: the packages and extracting their files (``sources``), HTML to text blocks
and blocks to bounded documents (``blocks``), the plain-text formats (``text_formats``), what is
planted (``plant``), and here the corpus, its provenance and the command line.
``bench/make_corpus.py`` builds the large benchmark corpus from more packages with the same code;
tests/tools/test_demo_corpus_build.py tests it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python tools/demo_corpus/build.py): import the package by its name
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shardflow.dataprep.demo_corpus import DEMO_CORPUS_PATH, MALFORMED_KINDS, demo_corpus_path  # noqa: E402

from tools.demo_corpus.blocks import MAX_DOC_BYTES, MERGE_BELOW_BYTES, MIN_DOC_BYTES, html_fragment_text  # noqa: E402
from tools.demo_corpus.plant import (  # noqa: E402
    _malformed_lines,
    plant_exact_duplicates,
    plant_near_duplicates,
)
from tools.demo_corpus.sources import (  # noqa: E402
    DEMO_PACKAGES,
    DEMO_SOURCES,
    FOREIGN_SOURCES,
    Doc,
    MissingPackageError,
    Source,
    extract_file,
    package_version,
    read_text,
    sha1_hex,
    source_files,
    take_docs,
)
from tools.demo_corpus.text_formats import jargon_letter_list  # noqa: E402

DEFAULT_TARGET_MB = 5.0
ZSTD_LEVEL = 19

EXACT_DUP_FRACTION = 0.02
NEAR_DUP_FRACTION = 0.02
NEAR_DUP_RATES = (0.01, 0.02, 0.03, 0.04, 0.05)
FOREIGN_DOCS_PER_SOURCE = 6


# --------------------------------------------------------------------------------------------
# The demo corpus
# --------------------------------------------------------------------------------------------

def _low_quality_fragments() -> list[Doc]:
    """Real boilerplate from the same packages: what a quality filter exists to remove."""
    out: list[Doc] = []

    def add(src: Source, rel: str, kind: str, text: str) -> None:
        text = text.strip()
        if text:
            out.append(Doc(id=f"{src.package}/{rel}#fragment-{kind}", text=text,
                           source=f"{src.package}/{rel}", package=src.package,
                           license=src.license, extra={"planted": "low_quality", "fragment": kind}))

    jargon, python, sqlite, pg = (s for s, _ in DEMO_SOURCES)
    py_os = read_text(os.path.join(python.root, "library/os.html"))
    add(python, "library/os.html", "breadcrumb", html_fragment_text(py_os, "class", "related"))
    add(python, "library/os.html", "footer", html_fragment_text(py_os, "class", "footer"))
    sym = html_fragment_text(read_text(os.path.join(python.root, "genindex-Symbols.html")),
                             "role", "main")
    add(python, "genindex-Symbols.html", "symbol_index", sym[:1500].rsplit("\n", 1)[0])
    add(sqlite, "about.html", "nav_menu",
        html_fragment_text(read_text(os.path.join(sqlite.root, "about.html")), "class",
                           "nosearch"))
    add(pg, "sql-select.html", "nav_footer",
        html_fragment_text(read_text(os.path.join(pg.root, "sql-select.html")), "class",
                           "navfooter"))
    add(jargon, "jargon.txt.gz", "term_list",
        jargon_letter_list(read_text(os.path.join(jargon.root, "jargon.txt.gz")), "Q"))
    return out


@dataclass
class BuildStats:
    docs: int = 0
    lines: int = 0
    raw_bytes: int = 0
    text_bytes: int = 0
    compressed_bytes: int = 0
    per_source: dict = field(default_factory=dict)  # package -> version, licence, files, …
    planted: dict = field(default_factory=dict)
    natural_exact_dups: int = 0


def build_demo_corpus(out: Path, target_mb: float = DEFAULT_TARGET_MB,
                      provenance: Path | None = None) -> BuildStats:
    import zstandard

    budget = target_mb * 1e6
    stats = BuildStats()
    base: list[Doc] = []
    for src, share in DEMO_SOURCES:
        docs, used = take_docs(src, budget * share, salt="demo")
        base.extend(docs)
        stats.per_source[src.package] = _source_stats(src, used, docs)
    foreign: list[Doc] = []
    for src in FOREIGN_SOURCES:
        docs = [d for rel in source_files(src) for d in extract_file(src, rel)
                if mostly_in_language(d.text, src.lang)]
        docs = sorted(docs, key=lambda d: sha1_hex("demo" + d.id))[:FOREIGN_DOCS_PER_SOURCE]
        foreign.extend(docs)
        stats.per_source[src.package] = _source_stats(
            src, sorted({d.source.split("/", 1)[1] for d in docs}), docs)
    counts: dict[str, int] = {}
    for d in base:
        counts[d.text] = counts.get(d.text, 0) + 1
    stats.natural_exact_dups = sum(c - 1 for c in counts.values() if c > 1)

    exact = plant_exact_duplicates(base, EXACT_DUP_FRACTION)
    near = plant_near_duplicates(base, round(NEAR_DUP_FRACTION * len(base)), NEAR_DUP_RATES,
                                 exclude={d.extra["dup_of"] for d in exact},
                                 styles=("words", "words", "whitespace", "header"))
    low = _low_quality_fragments()
    valid = base + foreign + exact + near + low
    malformed = _malformed_lines(base)
    stats.planted = {
        "exact_dup": len(exact), "near_dup": len(near), "low_quality": len(low),
        "foreign": len(foreign), "malformed": len(malformed),
        "malformed_kinds": dict(MALFORMED_KINDS),
        "near_dup_rates": {f"{r:.2f}": sum(1 for d in near if d.extra["edit_rate"] == r)
                           for r in NEAR_DUP_RATES},
        "low_quality_fragments": [d.extra["fragment"] for d in low],
    }
    entries = [(sha1_hex(d.id), d.line()) for d in valid]
    entries += [(sha1_hex(key), ln) for _, key, ln in malformed]
    entries.sort()
    payload = b"".join(ln for _, ln in entries)
    stats.docs = len(valid)
    stats.lines = len(entries)
    stats.raw_bytes = len(payload)
    stats.text_bytes = sum(len(d.text.encode("utf-8")) for d in valid)
    blob = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).compress(payload)
    stats.compressed_bytes = len(blob)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    if provenance is not None:
        provenance.write_text(render_provenance(stats, target_mb), encoding="utf-8")
    return stats


_FUNCTION_WORDS = {
    "en": {"the", "and", "is", "of", "to", "for", "with", "that", "this", "are", "you", "in"},
    "de": {"der", "die", "und", "das", "ist", "nicht", "mit", "sie", "ein", "eine", "für", "auf",
           "werden", "den", "von", "zu", "wird", "im"},
    "fr": {"le", "la", "les", "et", "des", "est", "une", "pour", "dans", "du", "que", "sur",
           "pas", "un", "au", "vous", "ce", "sont"},
}


def mostly_in_language(text: str, lang: str) -> bool:
    """Whether a 'translated' section really is translated: Debian's translations leave
    untranslated paragraphs in English, and those must not be labelled as another language."""
    words = re.findall(r"\w+", text.lower())
    own = sum(w in _FUNCTION_WORDS[lang] for w in words)
    english = sum(w in _FUNCTION_WORDS["en"] for w in words)
    return own >= 20 and own > 4 * english


def _source_stats(src: Source, used: list[str], docs: list[Doc]) -> dict:
    return {"version": package_version(src.package), "license": src.license, "root": src.root,
            "lang": src.lang, "files": used, "docs": len(docs),
            "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}


_LICENCE_NOTES = {
    "public-domain": "public domain (the Jargon File; SQLite's documentation)",
    "PSF-2.0": "Python Software Foundation License Version 2 (CPython's documentation; its code "
               "examples are additionally under the Zero-Clause BSD licence)",
    "PostgreSQL": "PostgreSQL Licence (permissive, BSD/MIT-like)",
    "GPL-2+": "GNU GPL version 2 or later (translations of Debian Reference; kept to a handful "
              "of documents so that language ID has real non-English text to drop)",
}


def render_provenance(stats: BuildStats, target_mb: float) -> str:
    """PROVENANCE.md, generated so that it can never drift from the corpus it describes."""
    p = stats.planted
    rows = "\n".join(
        f"| {pkg} | {s['version']} | {s['license']} | {s['lang']} | `{s['root']}` | "
        f"{len(s['files'])} | {s['docs']} | {s['bytes']:,} |"
        for pkg, s in stats.per_source.items())
    lic = "\n".join(f"- **{k}**: {v}" for k, v in _LICENCE_NOTES.items())
    files = "\n\n".join(
        f"### {pkg}\n\nRelative to `{s['root']}`:\n\n" + ", ".join(f"`{f}`" for f in s["files"])
        for pkg, s in stats.per_source.items())
    pkgs = " ".join(DEMO_PACKAGES)
    mk = "\n".join(f"| {k} | {v} |" for k, v in p["malformed_kinds"].items())
    rates = ", ".join(f"{r}: {n}" for r, n in p["near_dup_rates"].items())
    return f"""# Provenance of `demo_corpus.jsonl.zst`

Real text from Debian 12 (bookworm) documentation packages, extracted by
`tools/demo_corpus/build.py` (HTML through the standard library's `html.parser`, the
Jargon File from its plain-text edition). Nothing in it is generated, except the deliberate
edits of the planted near duplicates and the planted malformed lines described below.

- lines: {stats.lines:,} ({stats.docs:,} valid records + {p['malformed']} malformed lines)
- uncompressed: {stats.raw_bytes:,} bytes of JSONL ({stats.text_bytes:,} bytes of document text)
- compressed: {stats.compressed_bytes:,} bytes (zstd level {ZSTD_LEVEL}, single-threaded)
- built with `--target-mb {target_mb:g}`

## Packages

| package | version | licence | lang | root | files | docs | text bytes |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

Each record's `source` is `<package>/<path relative to root>`; its `meta` carries `license`,
`package` and `lang` (the language the package declares).

## Licences

Each package's full copyright and licence text is in `/usr/share/doc/<package>/copyright`.

{lic}

## How documents were cut

Files of each package are visited in a fixed pseudo-random order (SHA-1 of the path) and taken
whole until the package's share of the byte budget is met (Jargon File 25 %, Python 40 %,
SQLite 15 %, PostgreSQL 20 %). Pages are cut at their headings (`h1`/`h2`, PostgreSQL down to
`h3`), sections under {MERGE_BELOW_BYTES:,} bytes are merged with their neighbours, sections
over {MAX_DOC_BYTES:,} bytes are cut at paragraph boundaries, and leftovers under
{MIN_DOC_BYTES} bytes are dropped. Navigation bars, sidebars, footers, tables of contents and
`¶` links are not extracted. Jargon File glossary entries are one document each; its chapters
are cut at their sub-headings.

## Planted items (all labelled in `meta.planted`)

- **Exact duplicates**: {stats.natural_exact_dups} natural ones (identical documents among the
  selected files, kept as they are; none is labelled) + {p['exact_dup']} planted verbatim copies
  (id `<original id>~dup`, `meta.dup_of`), topping up to about {EXACT_DUP_FRACTION:.0%} of the
  documents.
- **Near duplicates**: {p['near_dup']} (about {NEAR_DUP_FRACTION:.0%}): a real document with
  1-5 % of its words substituted (by other words of the same document), deleted or
  inserted; half of them also have their whitespace reflowed or a header line added. Id
  `<original id>~nearNN` (NN = edit rate in %), `meta.dup_of`, `meta.edit_rate`,
  `meta.words_edited`, `meta.style`. Rates: {rates}.
- **Low-quality fragments**: {p['low_quality']} real fragments of the same pages that a quality
  filter should drop: {', '.join(p['low_quality_fragments'])}.
- **Non-English documents**: {p['foreign']} sections of the German and French Debian Reference.
- **Malformed lines**: {p['malformed']}, made from real records:

| kind | lines |
| --- | --- |
{mk}

  (`invalid_json`: one record truncated mid-string, one Python-repr line; `invalid_utf8`: a
  record re-encoded as Latin-1.) Malformed JSON objects carry `meta.malformed` = kind.

Lines are ordered by the SHA-1 of their id, so duplicates are far from their originals and the
sources are interleaved.

## Rebuild

```
apt-get update
apt-get install -y --no-install-recommends {pkgs}
python tools/demo_corpus/build.py build --target-mb {target_mb:g}
```

The output is byte-identical for the same package versions (and the same `zstandard`/libzstd
version); a different package version changes the text and so the file.

## Documents per file

{files}
"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/demo_corpus/build.py",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the demo corpus from installed Debian packages")
    b.add_argument("--out", type=Path, default=DEMO_CORPUS_PATH)
    b.add_argument("--target-mb", type=float, default=DEFAULT_TARGET_MB,
                   help="approximate MB of extracted text before planting (default %(default)s)")
    b.add_argument("--provenance", type=Path, default=None,
                   help="where to write PROVENANCE.md (default: next to --out)")
    sub.add_parser("path", help="print the path of the packaged corpus")
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(demo_corpus_path())
        return 0
    prov = args.provenance or args.out.with_name("PROVENANCE.md")
    try:
        st = build_demo_corpus(args.out, args.target_mb, prov)
    except MissingPackageError as e:
        print(f"error: {e}\nall needed: apt-get install -y --no-install-recommends "
              f"{' '.join(DEMO_PACKAGES)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {st.lines} lines, {st.docs} valid docs, "
          f"{st.raw_bytes / 1e6:.2f} MB raw, {st.compressed_bytes / 1e6:.2f} MB zstd; "
          f"planted {json.dumps({k: v for k, v in st.planted.items() if isinstance(v, int)})}; "
          f"natural exact dups {st.natural_exact_dups}; provenance {prov}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

``bench/make_corpus.py`` imports this module to build the large benchmark corpus from more packages;
tests/tools/test_demo_corpus_build.py tests it.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from shardflow.dataprep.demo_corpus import DEMO_CORPUS_PATH, MALFORMED_KINDS, demo_corpus_path

DEFAULT_TARGET_MB = 5.0
MIN_DOC_BYTES = 200
"""Extraction leftovers below this (a page that is only a title) are artefacts, not documents."""
MAX_DOC_BYTES = 20_000
SPLIT_DOC_BYTES = 16_000
MERGE_BELOW_BYTES = 1_000
"""Sections shorter than this are merged with their neighbours: a doc per tiny subsection is not
a natural document size."""

ZSTD_LEVEL = 19

EXACT_DUP_FRACTION = 0.02
NEAR_DUP_FRACTION = 0.02
NEAR_DUP_RATES = (0.01, 0.02, 0.03, 0.04, 0.05)
FOREIGN_DOCS_PER_SOURCE = 6

# --------------------------------------------------------------------------------------------
# Sources and documents
# --------------------------------------------------------------------------------------------

DEFAULT_SKIP_CLASSES = frozenset(
    {
        # Sphinx
        "headerlink", "related", "sphinxsidebar", "sphinxsidebarwrapper", "footer",
        "toctree-wrapper", "mobile-nav", "menu", "search",
        # DocBook (PostgreSQL, Debian Reference, Debian Handbook, …)
        "navheader", "navfooter", "toc", "list-of-tables", "list-of-figures", "indexterm",
        # sqlite.org pages
        "nosearch", "searchmenu",
    }
)


@dataclass(frozen=True)
class Source:
    """One Debian package (or a slice of one) that documents are extracted from.

    ``root`` is the directory that ``source`` paths are relative to; ``include``/``exclude`` are
    fnmatch globs on those relative paths. Files are listed with ``dpkg-query -L`` so that each
    document is attributed to the package that really ships it.
    """

    package: str
    root: str
    include: tuple[str, ...]
    license: str
    fmt: str = "html"  # html | jargon | man | pod
    exclude: tuple[str, ...] = ()
    lang: str = "en"
    main: tuple[str, str] | None = None  # (attribute, value) of the element holding the content
    skip_classes: frozenset[str] = DEFAULT_SKIP_CLASSES  # also matched against element ids
    split_level: int = 2


@dataclass
class Doc:
    id: str
    text: str
    source: str
    package: str
    license: str
    lang: str = "en"
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        meta = {"license": self.license, "package": self.package, "lang": self.lang}
        meta.update(self.extra)
        return {"id": self.id, "text": self.text, "source": self.source, "meta": meta}

    def line(self) -> bytes:
        return record_line(self.record())


def record_line(obj) -> bytes:
    """One JSONL line; fixed key order and separators so the bytes are reproducible."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8") + b"\n"


DEMO_SOURCES: tuple[tuple[Source, float], ...] = (
    (Source("jargon-text", "/usr/share/doc/jargon-text", ("jargon.txt.gz",), "public-domain",
            fmt="jargon"), 0.25),
    (Source("python3.11-doc", "/usr/share/doc/python3.11/html", ("*.html",), "PSF-2.0",
            exclude=("genindex*", "py-modindex.html", "search.html", "contents.html",
                     "download.html", "_*", "whatsnew/changelog.html"),
            main=("role", "main")), 0.40),
    (Source("sqlite3-doc", "/usr/share/doc/sqlite3", ("*.html",), "public-domain",
            exclude=("changes.html", "chronology.html", "sitemap.html", "docs.html",
                     "keyword_index.html", "toc.html", "doclist.html")), 0.15),
    (Source("postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html", ("*.html",),
            "PostgreSQL", exclude=("bookindex.html", "release-*.html"), split_level=3), 0.20),
)
"""English sources of the demo corpus with the share of the byte budget each gets."""

FOREIGN_SOURCES: tuple[Source, ...] = ()
"""Translations to give language ID something to drop. Empty: the only real translations in Debian
main (debian-reference-de/-fr, translated man pages) are GPL, and the shipped corpus takes only
public-domain or permissive text. Language ID is tested on its own in tests/dataprep/test_langid.py."""

DEMO_PACKAGES = tuple(s.package for s, _ in DEMO_SOURCES) + tuple(
    s.package for s in FOREIGN_SOURCES)


def sha1_hex(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


class MissingPackageError(RuntimeError):
    pass


def package_files(package: str) -> list[str]:
    """Every path ``package`` installed, as dpkg knows it."""
    try:
        out = subprocess.run(["dpkg-query", "-L", package], check=True, capture_output=True,
                             text=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise MissingPackageError(
            f"Debian package {package!r} is not installed; "
            f"run: apt-get install -y --no-install-recommends {package}") from e
    return [line for line in out.splitlines() if line.startswith("/")]


def package_version(package: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise MissingPackageError(f"Debian package {package!r} is not installed") from e


def source_files(src: Source) -> list[str]:
    """Relative paths of the regular files of ``src`` (symlinks are aliases, not documents)."""
    prefix = src.root.rstrip("/") + "/"
    rels = []
    for path in package_files(src.package):
        if not path.startswith(prefix) or os.path.islink(path) or not os.path.isfile(path):
            continue
        rel = path[len(prefix):]
        if any(fnmatch.fnmatch(rel, g) for g in src.include) and not any(
                fnmatch.fnmatch(rel, g) for g in src.exclude):
            rels.append(rel)
    return sorted(set(rels))


def hash_order(rels: Iterable[str], salt: str = "") -> list[str]:
    """A fixed pseudo-random order: a budget cut then samples the whole package, not its 'a*'."""
    return sorted(rels, key=lambda r: sha1_hex(salt + r))


def read_text(path: str) -> str:
    data = Path(path).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def extract_file(src: Source, rel: str) -> list[Doc]:
    """All documents in one file of ``src`` (picklable entry point for worker pools)."""
    text = read_text(os.path.join(src.root, rel))
    if src.fmt == "html":
        sections = split_blocks(html_to_blocks(text, main=src.main, skip_classes=src.skip_classes),
                                split_level=src.split_level)
    elif src.fmt == "jargon":
        sections = jargon_sections(text)
    elif src.fmt == "man":
        blocks = man_to_blocks(text)
        sections = split_blocks(blocks, split_level=1) if blocks else []
    elif src.fmt == "pod":
        sections = split_blocks(pod_to_blocks(text), split_level=1)
    else:
        raise ValueError(f"unknown format {src.fmt!r}")
    docs = []
    for i, body in enumerate(sections):
        if len(body.encode("utf-8")) < MIN_DOC_BYTES:
            continue
        docs.append(Doc(id=f"{src.package}/{rel}#{i}", text=body, source=f"{src.package}/{rel}",
                        package=src.package, license=src.license, lang=src.lang))
    return docs


def take_docs(src: Source, budget_bytes: float | None = None, *, max_docs: int | None = None,
              salt: str = "") -> tuple[list[Doc], list[str]]:
    """Whole files of ``src`` in hash order until the byte budget or doc count is reached."""
    docs: list[Doc] = []
    used: list[str] = []
    total = 0
    for rel in hash_order(source_files(src), salt):
        got = extract_file(src, rel)
        if max_docs is not None:
            got = got[: max_docs - len(docs)]
        if not got:
            continue
        docs.extend(got)
        used.append(rel)
        total += sum(len(d.text.encode("utf-8")) for d in got)
        if (budget_bytes is not None and total >= budget_bytes) or (
                max_docs is not None and len(docs) >= max_docs):
            break
    return docs, sorted(used)


# --------------------------------------------------------------------------------------------
# HTML → text blocks
# --------------------------------------------------------------------------------------------

_SKIP_TAGS = frozenset({"script", "style", "head", "noscript", "template", "svg", "select",
                        "button", "form", "map", "object", "iframe"})
_VOID_TAGS = frozenset({"br", "img", "hr", "meta", "link", "input", "area", "base", "col",
                        "embed", "param", "source", "track", "wbr"})
_BLOCK_TAGS = frozenset({"p", "div", "section", "article", "ul", "ol", "dl", "dt", "dd",
                         "blockquote", "table", "thead", "tbody", "tfoot", "caption", "figure",
                         "figcaption", "header", "footer", "nav", "main", "aside", "center",
                         "address", "details", "summary", "body", "html", "hr"})
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_WS = re.compile(r"\s+")

Block = tuple[str, str, int]
"""(kind, text, heading level or 0); kind is one of h, p, li, row, pre."""


class _TextExtractor(HTMLParser):
    """Turns an HTML page into paragraph-level blocks with heading markers.

    Why a hand-written walker on the stdlib parser rather than a library: it adds no runtime
    dependency, and the only structure the corpus needs is "headings, paragraphs, preformatted".
    Skipped or out-of-``main`` regions are tracked by counting nesting of the tag that opened
    them, which survives the unclosed ``<p>``/``<li>`` of older hand-written pages.
    """

    def __init__(self, main: tuple[str, str] | None, skip_classes: frozenset[str]):
        super().__init__(convert_charrefs=True)
        self.main = main
        self.skip_classes = skip_classes
        self.blocks: list[Block] = []
        self.buf: list[str] = []
        self.pending = "p"
        self.heading = 0
        self.pre = 0
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.main_tag: str | None = None
        self.main_depth = 0
        self.main_seen = False

    # -- state --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.skip_tag is None and (self.main is None or self.main_tag is not None)

    def _flush(self, kind: str | None = None, level: int = 0) -> None:
        raw = "".join(self.buf)
        self.buf = []
        if kind == "pre":
            lines = [ln.rstrip() for ln in raw.split("\n")]
            while lines and not lines[0].strip():
                lines.pop(0)
            while lines and not lines[-1].strip():
                lines.pop()
            text = "\n".join(lines)
        else:
            text = "\n".join(" ".join(part.split()) for part in raw.split("\n"))
            text = re.sub(r"\n{2,}", "\n", text).strip()
        if not text:
            return
        if kind is None:
            kind = self.pending
            self.pending = "p"
        if kind == "li":
            text = "- " + text
        self.blocks.append((kind, text, level))

    # -- parser callbacks ---------------------------------------------------------------
    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_depth += 1
            return
        a = dict(attrs)
        if self.main is not None and self.main_tag is None:
            if (not self.main_seen and tag not in _VOID_TAGS
                    and self.main[1] in (a.get(self.main[0]) or "").split()):
                self.main_tag, self.main_depth, self.main_seen = tag, 1, True
            return
        if self.main_tag is not None and tag == self.main_tag:
            self.main_depth += 1
        names = set((a.get("class") or "").split())
        if a.get("id"):
            names.add(a["id"])
        if tag in _SKIP_TAGS or (names & self.skip_classes) or a.get("role") == "navigation":
            if tag not in _VOID_TAGS:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in _HEADINGS:
            self._flush()
            self.heading = _HEADINGS[tag]
        elif tag == "pre":
            self._flush()
            self.pre += 1
        elif tag == "br":
            self.buf.append("\n")
        elif tag == "li":
            self._flush()
            self.pending = "li"
        elif tag == "tr":
            self._flush()
            self.pending = "row"
        elif tag in ("td", "th"):
            if "".join(self.buf).strip():
                self.buf.append(" | ")
        elif tag in _BLOCK_TAGS:
            if not self.pre:
                self._flush()

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if self.main is not None:
            if self.main_tag is None:
                return
            if tag == self.main_tag:
                self.main_depth -= 1
                if self.main_depth == 0:
                    self._flush()
                    self.main_tag = None
                    return
        if tag in _HEADINGS and self.heading:
            self._flush("h", self.heading)
            self.heading = 0
        elif tag == "pre" and self.pre:
            self.pre -= 1
            if not self.pre:
                self._flush("pre")
        elif tag in ("li", "tr") or (tag in _BLOCK_TAGS and not self.pre):
            self._flush()

    def handle_data(self, data):
        if not self.active:
            return
        self.buf.append(data if self.pre else _WS.sub(" ", data))

    def close(self):
        super().close()
        if self.active:
            self._flush("pre" if self.pre else None)


def html_to_blocks(html: str, *, main: tuple[str, str] | None = None,
                   skip_classes: frozenset[str] = DEFAULT_SKIP_CLASSES) -> list[Block]:
    p = _TextExtractor(main, skip_classes)
    p.feed(html)
    p.close()
    return p.blocks


def html_fragment_text(html: str, attr: str, value: str) -> str:
    """Text of the first element whose ``attr`` names ``value`` — for real navigation bars,
    footers and indexes that are kept as deliberately low-quality documents."""
    p = _TextExtractor((attr, value), frozenset())
    p.feed(html)
    p.close()
    return join_blocks(p.blocks)


def join_blocks(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    prev = ""
    for kind, text, _ in blocks:
        if out:
            out.append("\n" if kind in ("li", "row") and prev in ("li", "row") else "\n\n")
        out.append(text)
        prev = kind
    return "".join(out)


def split_blocks(blocks: Sequence[Block], *, split_level: int = 2,
                 merge_below: int = MERGE_BELOW_BYTES, max_bytes: int = MAX_DOC_BYTES,
                 chunk_bytes: int = SPLIT_DOC_BYTES) -> list[str]:
    """Cut a page into documents of natural size.

    Sections start at headings of level ``<= split_level``; short sections are merged forward
    (an API entry of two lines is not a document on its own) and long ones are cut at block
    boundaries, so every document lies between a few hundred bytes and ``max_bytes``.
    """
    sections: list[list[Block]] = [[]]
    for b in blocks:
        if b[0] == "h" and b[2] <= split_level and sections[-1]:
            sections.append([])
        sections[-1].append(b)
    docs: list[list[Block]] = []
    cur: list[Block] = []
    for sec in sections:
        if cur and _size(cur) >= merge_below:
            docs.append(cur)
            cur = []
        if cur and _size(cur) + _size(sec) > max_bytes:
            docs.append(cur)
            cur = []
        cur = cur + sec
    if cur:
        if docs and _size(cur) < merge_below and _size(docs[-1]) + _size(cur) <= max_bytes:
            docs[-1] = docs[-1] + cur
        else:
            docs.append(cur)
    out: list[str] = []
    for d in docs:
        out.extend(_chunk(d, max_bytes, chunk_bytes))
    return [t for t in out if t.strip()]


def _size(blocks: Sequence[Block]) -> int:
    return sum(len(b[1].encode("utf-8")) + 2 for b in blocks)


def _chunk(blocks: Sequence[Block], max_bytes: int, chunk_bytes: int) -> list[str]:
    if _size(blocks) <= max_bytes:
        return [join_blocks(blocks)]
    pieces: list[Block] = []
    for b in blocks:  # a single oversized block (a long listing) is cut at line boundaries
        if len(b[1].encode("utf-8")) > chunk_bytes:
            acc: list[str] = []
            for ln in b[1].split("\n"):
                if acc and len("\n".join(acc + [ln]).encode("utf-8")) > chunk_bytes:
                    pieces.append((b[0], "\n".join(acc), b[2]))
                    acc = []
                acc.append(ln[: chunk_bytes // 2])
            if acc:
                pieces.append((b[0], "\n".join(acc), b[2]))
        else:
            pieces.append(b)
    out: list[str] = []
    cur: list[Block] = []
    for b in pieces:
        if cur and _size(cur) + _size([b]) > chunk_bytes:
            out.append(join_blocks(cur))
            cur = []
        cur.append(b)
    if cur:
        out.append(join_blocks(cur))
    return out


# --------------------------------------------------------------------------------------------
# The Jargon File (plain text)
# --------------------------------------------------------------------------------------------

_JARGON_PART = re.compile(r"^(Chapter\s\d+\.|Appendix\s[A-Z]\.|Glossary$|Bibliography$)")
_JARGON_ENTRY = re.compile(r"^   :[^:].*?:")
_JARGON_LETTER = re.compile(r"^  \S{1,2}$")
_JARGON_SUBHEAD = re.compile(r"^  [A-Za-z][^│┃|]{0,70}$")


def jargon_sections(text: str) -> list[str]:
    """Glossary entries one per document; the prose chapters cut at their sub-headings.

    The per-letter term lists that precede each letter's entries are a table of contents, not
    text, and are dropped (one of them is kept as a planted low-quality fragment).
    """
    lines = text.split("\n")
    parts: list[tuple[str, list[str]]] = []
    for ln in lines:
        if _JARGON_PART.match(ln):
            parts.append((ln, [ln]))
        elif parts:
            parts[-1][1].append(ln)
    out: list[str] = []
    for title, body in parts:
        if title == "Glossary":
            out.extend(_jargon_glossary(body[1:]))
        else:
            out.extend(split_blocks(_drop_toc(_jargon_chapter_blocks(body)), split_level=2))
    return out


def _jargon_chapter_blocks(body: list[str]) -> list[Block]:
    blocks: list[Block] = []
    para: list[str] = []
    for ln in body + [""]:
        if para and (not ln.strip() or _JARGON_PART.match(ln)):
            blocks.append(("pre", _dedent("\n".join(para)), 0))
            para = []
        if _JARGON_PART.match(ln):
            blocks.append(("h", ln.strip(), 1))
        elif _JARGON_SUBHEAD.match(ln) and not para:
            blocks.append(("h", ln.strip(), 2))
        elif ln.strip():
            para.append(ln)
    return blocks


def _drop_toc(blocks: list[Block]) -> list[Block]:
    """Chapter openings repeat their own contents list; drop the one-line entries after it."""
    out: list[Block] = []
    in_toc = False
    for b in blocks:
        if b[0] == "pre" and b[1].strip() == "Table of Contents":
            in_toc = True
            continue
        if in_toc and (b[0] == "h" or (b[0] == "pre" and "\n" not in b[1] and len(b[1]) < 80)):
            if b[0] == "h" and b[2] == 1:
                out.append(b)
            continue
        in_toc = False
        out.append(b)
    return out


def _dedent(s: str) -> str:
    lines = s.split("\n")
    ind = min((len(ln) - len(ln.lstrip(" ")) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[ind:].rstrip() for ln in lines)


def _jargon_glossary(body: list[str]) -> list[str]:
    entries: list[list[str]] = []
    in_entry = False
    for ln in body:
        if _JARGON_ENTRY.match(ln):
            entries.append([ln])
            in_entry = True
        elif _JARGON_LETTER.match(ln):
            in_entry = False
        elif in_entry:
            entries[-1].append(ln)
    out = []
    for e in entries:
        text = _dedent("\n".join(e)).strip()
        text = re.sub(r"\n{3,}", "\n\n", text)
        if len(text.encode("utf-8")) > MAX_DOC_BYTES:
            out.extend(_chunk([("pre", p, 0) for p in text.split("\n\n")], MAX_DOC_BYTES,
                              SPLIT_DOC_BYTES))
        else:
            out.append(text)
    return out


def jargon_letter_list(text: str, letter: str = "Q") -> str:
    """The glossary's term list for one letter: a real line-list fragment for quality filters."""
    lines = text.split("\n")
    start = next(i for i, ln in enumerate(lines) if ln == "Glossary")
    grab: list[str] = []
    on = False
    for ln in lines[start + 1:]:
        if _JARGON_LETTER.match(ln):
            on = ln.strip() == letter
            continue
        if on:
            if _JARGON_ENTRY.match(ln):
                break
            if ln.strip():
                grab.append(ln.strip())
    return "\n".join(grab)


# --------------------------------------------------------------------------------------------
# man pages (roff) and POD — used by the benchmark corpus
# --------------------------------------------------------------------------------------------

_ROFF_GLYPHS = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "bu": "•", "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "co": "©", "rg": "®", "tm": "™", "mu": "×", ">=": "≥", "<=": "≤", "ha": "^",
    "ti": "~", "rs": "\\", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "!=": "≠", "+-": "±",
    "de": "°", "->": "→", "<-": "←", "ua": "↑", "da": "↓", "Fo": "«", "Fc": "»", "ss": "ß",
    "ga": "`", "aa": "´", "ul": "_", "sl": "/", "ba": "|", "br": "|", "lh": "☜", "rh": "☞",
    "'a": "á", "'e": "é", ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü",
    "`a": "à", "`e": "è", "^e": "ê", ",c": "ç", "R": "®", "L\"": "“", "R\"": "”",
}
_ROFF_ESC = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?(?:\(\d\d|\[\d+\]|\d)|\((..)|\[([^\]]+)\]"
    r"|\*(?:\((..)|\[([^\]]+)\]|(.))|n(?:\(..|\[[^\]]*\]|.)|[kgzwhvlLoxXDSHbN]'[^']*'"
    r"|(.))")


def _roff_escape(m: re.Match) -> str:
    two, named, s2, snamed, s1, single = m.groups()
    if two is not None:
        return _ROFF_GLYPHS.get(two, "")
    if named is not None:
        if named.startswith("u") and len(named) >= 5:
            try:
                return chr(int(named[1:].split("_")[0], 16))
            except ValueError:
                return ""
        return _ROFF_GLYPHS.get(named, "")
    if s2 is not None or snamed is not None or s1 is not None:
        return _ROFF_GLYPHS.get(s2 or snamed or s1 or "", "")
    if single is not None:
        return {"-": "-", "e": "\\", "\\": "\\", "0": " ", " ": " ", "~": " ", "'": "´",
                "`": "`", ".": ".", "t": "\t"}.get(single, "")
    return ""


def roff_text(s: str) -> str:
    return _ROFF_ESC.sub(_roff_escape, s)


def _roff_args(s: str) -> list[str]:
    args, cur, q, i = [], [], False, 0
    while i < len(s):
        c = s[i]
        if c == '"':
            if q and i + 1 < len(s) and s[i + 1] == '"':
                cur.append('"')
                i += 2
                continue
            q = not q
        elif c in " \t" and not q:
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(c)
        i += 1
    if cur:
        args.append("".join(cur))
    return args


_MDOC_CALLABLE = frozenset(
    "Ac Ad An Ao Ap Aq Ar At Bc Bo Bq Brc Bro Brq Bsx Bx Cd Cm Dc Do Dq Dv Dx Ec Em Eo Er Ev Fa "
    "Fc Fl Fn Fo Fr Ft Fx Ic Li Lk Ms Mt Nm No Ns Nx Oc Oo Op Ox Pa Pc Pf Po Pq Qc Ql Qo Qq Sc "
    "So Sq Sx Sy Tn Ux Va Vt Xc Xo Xr".split())
_MDOC_WRAP = {"Dq": ("“", "”"), "Sq": ("‘", "’"), "Ql": ("‘", "’"), "Pq": ("(", ")"),
              "Op": ("[", "]"), "Bq": ("[", "]"), "Brq": ("{", "}"), "Aq": ("<", ">"),
              "Qq": ('"', '"')}
_MDOC_OPEN = {"Do": "“", "So": "‘", "Po": "(", "Oo": "[", "Bo": "[", "Bro": "{", "Ao": "<",
              "Qo": '"'}
_MDOC_CLOSE = {"Dc": "”", "Sc": "’", "Pc": ")", "Oc": "]", "Bc": "]", "Brc": "}", "Ac": ">",
               "Qc": '"'}
_CLOSING_PUNCT = frozenset(". , ; : ) ] ? ! ”".split())


def _mdoc_line(tokens: list[str], state: dict) -> str:
    """Render one mdoc macro line: callable macros become their punctuation or vanish, their
    arguments stay (``.Fl o Ar option`` → ``-o option``, ``.Xr ssh 1`` → ``ssh(1)``)."""
    out: list[str] = []
    glue = False
    closers: list[str] = []
    i = 0

    def put(word: str) -> None:
        nonlocal glue
        if out and (glue or word in _CLOSING_PUNCT):
            out[-1] += word
        else:
            out.append(word)
        glue = False

    while i < len(tokens):
        t = tokens[i]
        i += 1
        if t not in _MDOC_CALLABLE:
            put(roff_text(t))
            continue
        if t == "Ns":
            glue = True
        elif t == "Fl":
            nxt = tokens[i] if i < len(tokens) and tokens[i] not in _MDOC_CALLABLE else ""
            i += 1 if nxt else 0
            put("-" + roff_text(nxt))
        elif t == "Xr" and i + 1 < len(tokens) + 1:
            name = tokens[i] if i < len(tokens) else ""
            sec = tokens[i + 1] if i + 1 < len(tokens) else ""
            i += 2
            put(f"{roff_text(name)}({sec})" if sec else roff_text(name))
        elif t == "Nm":
            if i < len(tokens) and tokens[i] not in _MDOC_CALLABLE | _CLOSING_PUNCT:
                state.setdefault("name", roff_text(tokens[i]))
                put(roff_text(tokens[i]))
                i += 1
            elif state.get("name"):
                put(state["name"])
        elif t in _MDOC_WRAP:
            o, c = _MDOC_WRAP[t]
            put(o)
            glue = True
            closers.append(c)
        elif t in _MDOC_OPEN:
            put(_MDOC_OPEN[t])
            glue = True
        elif t in _MDOC_CLOSE:
            put(_MDOC_CLOSE[t])
        # any other callable macro only sets a font: drop it, keep its arguments
    for c in reversed(closers):
        if out:
            out[-1] += c
    return " ".join(out)


def man_to_blocks(src: str) -> list[Block]:
    """A deliberately small roff reader for man(7) and mdoc(7) pages.

    It is not groff: requests it does not know are dropped, which loses little prose and is fast
    and deterministic. A page that is only a ``.so`` link yields nothing.
    """
    blocks: list[Block] = []
    buf: list[str] = []
    nofill = False
    in_table = False
    table_fmt = False
    tag_next = False  # the line after .TP is the tag of a list item: a block of its own
    state: dict = {}

    def flush(kind="p", level=0):
        if not buf:
            return
        if kind == "pre" or nofill:
            text = "\n".join(x.rstrip() for x in buf).strip("\n")
            kind = "pre" if kind == "p" else kind
        else:
            text = " ".join(" ".join(buf).split())
        buf.clear()
        if text.strip():
            blocks.append((kind, text, level))

    def emit(text: str) -> None:
        nonlocal tag_next
        if nofill:
            buf.append(text)
            return
        if text.strip():
            buf.append(text.strip())
            if tag_next:
                flush()
                tag_next = False

    for raw in src.split("\n"):
        if raw.startswith(('.\\"', "'\\\"", '\\"', '.\\#')) or raw in (".", "'"):
            continue
        if in_table:
            if raw.startswith(".TE"):
                in_table = False
                flush("pre")
            elif table_fmt:
                if raw.rstrip().endswith("."):
                    table_fmt = False
            elif not raw.startswith("."):
                buf.append(roff_text(raw.replace("T{", "").replace("T}", "")).replace("\t", " | "))
            continue
        if raw.startswith((".", "'")):
            parts = raw[1:].strip().split(None, 1)
            if not parts:
                continue
            req = parts[0]
            args = _roff_args(parts[1]) if len(parts) > 1 else []
            if req == "so":
                return []
            if req in ("SH", "SS", "Sh", "Ss"):
                flush()
                title = roff_text(" ".join(args)).strip()
                if title:
                    blocks.append(("h", title, 2 if req in ("SH", "Sh") else 3))
            elif req in ("TH", "Dt"):
                flush()
                if args:
                    name = roff_text(args[0])
                    sec = roff_text(args[1]) if len(args) > 1 else ""
                    blocks.append(("h", f"{name}({sec})" if sec else name, 1))
            elif req in ("PP", "LP", "P", "HP", "sp", "br", "RS", "RE", "in", "ti", "ne", "Pp",
                         "Lp", "Bl", "El"):
                flush()
            elif req in ("TP", "TQ"):
                flush()
                tag_next = True
            elif req == "IP":
                flush()
                if args and args[0] not in ("", "\\(bu", "\\[bu]", "*", "-"):
                    buf.append(roff_text(args[0]))
            elif req == "It":
                flush()
                if args:
                    buf.append(_mdoc_line(args, state))
                    flush()
            elif req in ("nf", "EX") or (req == "Bd" and "-literal" in args):
                flush()
                nofill = True
            elif req in ("fi", "EE", "Ed"):
                if nofill:
                    flush("pre")
                nofill = False
            elif req == "Dl":
                flush()
                buf.append(_mdoc_line(args, state))
                flush("pre")
            elif req == "Nd":
                emit("- " + _mdoc_line(args, state))
            elif req == "TS":
                flush()
                in_table, table_fmt = True, True
            elif req in ("B", "I", "SM", "SB", "UR", "MT"):
                if args:
                    emit(roff_text(" ".join(args)))
            elif req in ("BR", "BI", "IB", "IR", "RB", "RI"):
                emit(roff_text("".join(args)))
            elif req in ("UE", "ME"):
                if args and buf:
                    buf[-1] += roff_text("".join(args))
            elif req in _MDOC_CALLABLE:
                emit(_mdoc_line([req] + args, state))
            # anything else (string/macro definitions, conditionals, …) carries no prose
            continue
        line = roff_text(raw)
        if nofill:
            buf.append(line)
        elif line.strip():
            emit(line)
        else:
            flush()
    flush()
    return blocks


_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_CODE_N = tuple(re.compile(rf"([A-Z]){'<' * n}\s+(.*?)\s+{'>' * n}", re.S) for n in (4, 3, 2))


def _pod_inline(s: str) -> str:
    def code(letter: str, body: str) -> str:
        if letter in "XZ":
            return ""
        if letter == "E":
            return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"'}.get(
                body, chr(int(body[2:], 16)) if body.startswith("0x") else
                chr(int(body)) if body.isdigit() else "")
        if letter == "L":
            text = body.split("|", 1)[0] if "|" in body else body
            return text.replace('"', "")
        return body

    for pat in _POD_CODE_N:
        s = pat.sub(lambda m: code(m.group(1), m.group(2)), s)
    for _ in range(8):
        new = _POD_CODE.sub(lambda m: code(m.group(1), m.group(2)), s)
        if new == s:
            break
        s = new
    return s


def pod_to_blocks(src: str) -> list[Block]:
    """Perl's POD: ``=head`` headings, ``=item`` lists, indented verbatim paragraphs."""
    blocks: list[Block] = []
    in_pod = False
    skip_until: str | None = None
    for para in re.split(r"\n[ \t]*\n", src):
        if not para.strip():
            continue
        first = para.lstrip("\n")
        if skip_until is not None:
            if first.startswith(skip_until):
                skip_until = None
            continue
        if first.startswith("="):
            cmd, _, rest = first[1:].partition(" ")
            cmd = cmd.split("\n")[0]
            rest = " ".join(rest.split())
            in_pod = cmd != "cut"
            if cmd.startswith("head") and cmd[4:].isdigit():
                blocks.append(("h", _pod_inline(rest), int(cmd[4:])))
            elif cmd == "item":
                if rest and rest not in ("*", "-"):
                    blocks.append(("li", "- " + _pod_inline(rest), 0))
            elif cmd == "begin":
                skip_until = "=end"
            continue
        if not in_pod:
            continue
        if first[:1] in (" ", "\t"):
            blocks.append(("pre", _dedent(first.rstrip()), 0))
        else:
            blocks.append(("p", " ".join(_pod_inline(first).split()), 0))
    return blocks


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

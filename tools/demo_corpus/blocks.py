"""HTML pages to text blocks, and blocks to documents of bounded size (demo corpus builder).

Why blocks: every source format (HTML, roff, POD, the Jargon File) is first reduced to a list of
(kind, text, heading level) blocks, so cutting documents at headings and bounding their size is
written once, in :func:`split_blocks`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from html.parser import HTMLParser

MIN_DOC_BYTES = 200
"""Extraction leftovers below this (a page that is only a title) are artefacts, not documents."""
MAX_DOC_BYTES = 20_000
SPLIT_DOC_BYTES = 16_000
MERGE_BELOW_BYTES = 1_000
"""Sections shorter than this are merged with their neighbours: a doc per tiny subsection is not
a natural document size."""

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

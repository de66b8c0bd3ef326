"""The Debian packages the demo corpus is extracted from, and extracting documents from their files.

Part of the demo corpus builder (tools/demo_corpus/build.py). Files are listed with ``dpkg-query -L``
so that each document is attributed to the package that really ships it, and visited in a fixed
hash order, so the same package versions give the same documents.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .blocks import DEFAULT_SKIP_CLASSES, MIN_DOC_BYTES, html_to_blocks, split_blocks
from .text_formats import jargon_sections, man_to_blocks, pod_to_blocks

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
    fmt: str = "html"  # html | jargon | man | pod | code (a whole source file is one document)
    exclude: tuple[str, ...] = ()
    lang: str = "en"
    main: tuple[str, str] | None = None  # (attribute, value) of the element holding the content
    skip_classes: frozenset[str] = DEFAULT_SKIP_CLASSES  # also matched against element ids
    split_level: int = 2
    walk: bool = False  # list files by walking ``root`` (an unpacked tarball) instead of dpkg's file list


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
    paths = (os.path.join(d, f) for d, _, fs in os.walk(src.root) for f in fs) if src.walk else package_files(src.package)
    for path in paths:
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


MAX_CODE_BYTES = 1 << 20
"""Source files above this are generated tables or test data, not code anyone wrote."""


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
    elif src.fmt == "code":
        sections = [text] if "\x00" not in text and len(text) <= MAX_CODE_BYTES else []
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

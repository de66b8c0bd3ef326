"""Build the benchmark corpus: 100+ MB of real text in zstd JSONL shards, with planted near
duplicates whose ground truth is written to a side file.

Why real text: throughput of cleaning, MinHash and tokenisation, and the recall/precision of near
dedup, depend on real document length and vocabulary distributions that generated text lacks.
Why a side file: MinHash quality is measured against known pairs at known edit rates, and the
records themselves stay unlabelled so that no stage can cheat.

It reuses the extraction code of the demo corpus builder, ``tools/demo_corpus/`` (the demo corpus is a small,
permissively licensed slice of the same sources) and adds more Debian documentation packages.

Debian packages it reads (Debian 12 / bookworm, all in main)::

    jargon-text python3.11-doc sqlite3-doc postgresql-doc-15 python-django-doc
    python-sqlalchemy-doc python-flask-doc sphinx-doc python-scipy-doc python-sympy-doc
    cmake-doc nodejs-doc apache2-doc
    erlang-doc perl-doc git-doc bash-doc manpages manpages-dev debian-handbook
    debian-reference-en debian-reference-de debian-reference-fr developers-reference
    debian-policy manpages-de manpages-fr linux-doc-6.1
    python-pandas-doc llvm-15-doc openjdk-17-doc rust-doc   (filler for ~1 GB runs)

``--install`` runs ``apt-get update`` and ``apt-get install -y --no-install-recommends`` for
them (needs root); without it a missing package is an error (or skipped with ``--skip-missing``).

Usage::

    python bench/make_corpus.py --out bench/_data/corpus --target-mb 120 \\
        --plant-near-dups 0.01,0.03,0.05,0.10

Output in ``--out``: ``corpus-00000.jsonl.zst`` … (``--shards``, default 16, equal in bytes,
documents in a fixed pseudo-random order), ``planted.jsonl`` (one line per planted near
duplicate: ``original_id``, ``dup_id``, ``edit_rate``, ``words_edited``) and ``summary.json``.
Output is deterministic for the same package versions. Sources are read in the order below,
each up to its cap, until ``--target-mb`` of text is collected: the order puts permissively
licensed English documentation first, a few MB of non-English text after it (so language ID
has realistic work), and the Linux kernel documentation last as filler.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tools/ is not installed

from tools.demo_corpus.blocks import DEFAULT_SKIP_CLASSES  # noqa: E402
from tools.demo_corpus.plant import plant_near_duplicates  # noqa: E402
from tools.demo_corpus.sources import (  # noqa: E402
    DEMO_SOURCES,
    Doc,
    MissingPackageError,
    Source,
    extract_file,
    hash_order,
    package_version,
    sha1_hex,
    source_files,
)

_SK = DEFAULT_SKIP_CLASSES | {"banner", "docnav", "header", "footer", "footnotes", "global-nav",
                              "sidebar", "page-header", "path", "quickview", "topbar",
                              "docs-bottom-navigation", "docs-copyright", "toc-jump"}
LINUX_SRC = "/tmp/shardflow-linux-source-6.1"
"""Where ``--install`` (or a person) unpacks /usr/src/linux-source-6.1.tar.xz: the package ships a tarball."""

_SPHINX_EXCLUDE = ("genindex*", "py-modindex.html", "search.html", "contents.html", "_*",
                   "*/_*")

_demo = {s.package: s for s, _ in DEMO_SOURCES}

# (source, cap in MB of text or None for no cap)
BENCH_SOURCES: tuple[tuple[Source, float | None], ...] = (
    (_demo["jargon-text"], None),
    (Source("python3.11-doc", "/usr/share/doc/python3.11/html", ("*.html",), "PSF-2.0",
            exclude=_SPHINX_EXCLUDE + ("download.html",), main=("role", "main")), None),
    (Source("sqlite3-doc", "/usr/share/doc/sqlite3", ("*.html",), "public-domain",
            exclude=("sitemap.html", "docs.html", "keyword_index.html", "toc.html",
                     "doclist.html")), None),
    (Source("postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html", ("*.html",),
            "PostgreSQL", exclude=("bookindex.html",), split_level=3), None),
    (Source("python-django-doc", "/usr/share/doc/python-django-doc/html", ("*.html",),
            "BSD-3-Clause", exclude=_SPHINX_EXCLUDE, main=("id", "yui-main"),
            skip_classes=_SK), None),
    (Source("python-sqlalchemy-doc", "/usr/share/doc/python-sqlalchemy-doc/html", ("*.html",),
            "MIT", exclude=_SPHINX_EXCLUDE, main=("role", "main"), skip_classes=_SK), None),
    (Source("python-flask-doc", "/usr/share/doc/python-flask-doc/html", ("*.html",),
            "BSD-3-Clause", exclude=_SPHINX_EXCLUDE, main=("role", "main")), None),
    (Source("sphinx-doc", "/usr/share/doc/sphinx-doc/html", ("*.html",), "BSD-2-Clause",
            exclude=_SPHINX_EXCLUDE, main=("role", "main")), None),
    (Source("python-scipy-doc", "/usr/share/doc/python-scipy-doc/html", ("*.html",),
            "BSD-3-Clause", exclude=_SPHINX_EXCLUDE, main=("role", "main"), skip_classes=_SK),
     15.0),
    (Source("python-sympy-doc", "/usr/share/doc/python-sympy-doc/html", ("*.html",),
            "BSD-3-Clause", exclude=_SPHINX_EXCLUDE, main=("role", "main"), skip_classes=_SK),
     15.0),
    (Source("cmake-doc", "/usr/share/doc/cmake-data/html", ("*.html",), "BSD-3-Clause",
            exclude=_SPHINX_EXCLUDE, main=("role", "main")), None),
    (Source("nodejs-doc", "/usr/share/doc/nodejs/api", ("*.html",), "MIT",
            exclude=("all.html", "index.html"), main=("id", "apicontent"), skip_classes=_SK),
     None),
    (Source("apache2-doc", "/usr/share/doc/apache2-doc/manual/en", ("*.html",), "Apache-2.0",
            main=("id", "page-content"), skip_classes=_SK), None),
    (Source("erlang-doc", "/usr/share/doc/erlang-doc", ("*.html",), "Apache-2.0",
            exclude=("lib/wx-*", "*index.html", "*/doc/html/*_app.html", "*release_notes.html",
                     "*notes.html"),
            main=("id", "content"), skip_classes=_SK), 20.0),
    (Source("perl-doc", "/usr/share/perl/5.36.0/pod", ("*.pod",), "Artistic-1.0 or GPL-1+",
            fmt="pod", exclude=("perl5*delta.pod", "perl*delta.pod")), None),
    (Source("git-doc", "/usr/share/doc/git-doc", ("*.html",), "GPL-2",
            main=("id", "content"), skip_classes=_SK), None),
    (Source("bash-doc", "/usr/share/doc/bash", ("*.html",), "GFDL-1.3+", skip_classes=_SK),
     None),
    (Source("manpages", "/usr/share/man", ("man*/*",), "Linux-man-pages (mostly permissive)",
            fmt="man"), None),
    (Source("manpages-dev", "/usr/share/man", ("man*/*",), "Linux-man-pages (mostly permissive)",
            fmt="man"), None),
    (Source("debian-handbook", "/usr/share/doc/debian-handbook/html/en-US", ("*.html",),
            "GPL-2+ or CC-BY-SA-3.0", skip_classes=_SK), None),
    (Source("debian-reference-en", "/usr/share/debian-reference", ("*.en.html",), "GPL-2+",
            exclude=("index.*",)), None),
    (Source("developers-reference", "/usr/share/developers-reference", ("*.html",), "MIT",
            exclude=_SPHINX_EXCLUDE, main=("role", "main")), None),
    (Source("debian-policy", "/usr/share/doc/debian-policy/policy.html", ("*.html",), "GPL-2+",
            exclude=_SPHINX_EXCLUDE, main=("role", "main")), None),
    # non-English: a few MB, as a real web crawl would have
    (Source("debian-reference-de", "/usr/share/debian-reference", ("*.de.html",), "GPL-2+",
            lang="de", exclude=("index.*",)), None),
    (Source("debian-reference-fr", "/usr/share/debian-reference", ("*.fr.html",), "GPL-2+",
            lang="fr", exclude=("index.*",)), None),
    (Source("manpages-de", "/usr/share/man/de", ("man*/*",), "GPL-3+", fmt="man", lang="de"),
     2.5),
    (Source("manpages-fr", "/usr/share/man/fr", ("man*/*",), "GPL-3+", fmt="man", lang="fr"),
     2.5),
    # filler
    (Source("linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/html", ("*.html",), "GPL-2",
            exclude=_SPHINX_EXCLUDE, main=("role", "main")), None),
    # more filler for the ~1 GB-scale runs (bench/reprocess.py): large generated API references
    # (templated families: one page per item) and Sphinx manuals
    (Source("python-pandas-doc", "/usr/share/doc/python-pandas-doc/html", ("*.html",), "BSD-3-Clause",
            exclude=_SPHINX_EXCLUDE + ("_static/*",), main=("role", "main")), None),
    (Source("llvm-15-doc", "/usr/share/doc/llvm-15-doc/html", ("*.html",), "Apache-2.0 WITH LLVM-exception",
            exclude=_SPHINX_EXCLUDE), None),
    (Source("openjdk-17-doc", "/usr/share/doc/openjdk-17-jre-headless/api", ("*.html",), "GPL-2 with Classpath exception",
            exclude=("*-index.html", "index-files/*", "*/package-tree.html", "overview-tree.html")), None),
    (Source("rust-doc", "/usr/share/doc/rust-doc/html", ("*.html",), "MIT or Apache-2.0",
            exclude=("*/all.html", "*/sidebar-items*", "search-index*")), None),
    # source code, one file per document, as code-bearing web crawls have it
    (Source("golang-1.19-src", "/usr/share/go-1.19/src", ("*.go", "*.s", "*.md"), "BSD-3-Clause",
            fmt="code", exclude=("*/testdata/*",)), None),
    (Source("rust-src", "/usr/src/rustc-1.63.0", ("*.rs", "*.md", "*.toml"), "MIT or Apache-2.0",
            fmt="code", exclude=("*/test/*", "*/tests/*")), None),
    (Source("libboost1.74-dev", "/usr/include/boost", ("*.hpp", "*.h", "*.ipp"), "BSL-1.0", fmt="code"), None),
    (Source("linux-source-6.1", LINUX_SRC, ("*.c", "*.h", "*.rst", "*.txt", "Kconfig*"), "GPL-2",
            fmt="code", walk=True, exclude=("*/firmware/*", "*/include/dt-bindings/*", "*/arch/*/boot/dts/*")), None),
)

APT_PACKAGES = tuple(dict.fromkeys(s.package for s, _ in BENCH_SOURCES))


def _extract(task: tuple[Source, str]) -> list[Doc]:
    src, rel = task
    try:
        return extract_file(src, rel)
    except (OSError, UnicodeError, ValueError) as e:  # one odd file must not sink the build
        print(f"warning: {src.package}/{rel}: {e}", file=sys.stderr)
        return []


def collect(target_bytes: float, jobs: int, skip_missing: bool) -> tuple[list[Doc], dict]:
    """Documents source by source (files in hash order, extracted in parallel, kept in order)."""
    docs: list[Doc] = []
    per_source: dict[str, dict] = {}
    total = 0
    pool = mp.Pool(jobs)
    try:
        for src, cap in BENCH_SOURCES:
            if total >= target_bytes:
                break
            try:
                files = hash_order(source_files(src), "bench")
                version = package_version(src.package)
            except MissingPackageError as e:
                if not skip_missing:
                    raise
                print(f"warning: skipping {src.package}: {e}", file=sys.stderr)
                continue
            limit = min(target_bytes - total, cap * 1e6 if cap else float("inf"))
            got: list[Doc] = []
            used = nbytes = 0
            for file_docs in pool.imap(_extract, [(src, rel) for rel in files], chunksize=4):
                got.extend(file_docs)
                used += 1
                nbytes += sum(len(d.text.encode("utf-8")) for d in file_docs)
                if nbytes >= limit:
                    break
            if used < len(files):
                # work for the rest of the files is still queued; a fresh pool is simpler than
                # draining it, and what was kept is already fixed by the file order
                pool.terminate()
                pool.join()
                pool = mp.Pool(jobs)
            docs.extend(got)
            total += nbytes
            per_source[src.package] = {"version": version, "license": src.license,
                                       "lang": src.lang, "root": src.root,
                                       "files": used, "files_available": len(files),
                                       "docs": len(got), "text_bytes": nbytes}
            print(f"  {src.package:24s} {len(got):7d} docs {nbytes / 1e6:8.2f} MB "
                  f"({used}/{len(files)} files)", flush=True)
    finally:
        pool.terminate()
        pool.join()
    return docs, per_source


def write_shards(out: Path, docs: list[Doc], shards: int, level: int) -> list[dict]:
    import zstandard

    for old in out.glob("corpus-*.jsonl.zst"):
        old.unlink()
    lines = sorted((sha1_hex(d.id), d.line()) for d in docs)
    total = sum(len(ln) for _, ln in lines)
    groups: list[list[bytes]] = [[] for _ in range(shards)]
    acc = 0
    for _, ln in lines:
        groups[min(shards - 1, acc * shards // max(total, 1))].append(ln)
        acc += len(ln)
    info = []
    cctx = zstandard.ZstdCompressor(level=level, threads=0)
    for i, g in enumerate(groups):
        path = out / f"corpus-{i:05d}.jsonl.zst"
        payload = b"".join(g)
        blob = cctx.compress(payload)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        info.append({"file": path.name, "docs": len(g), "bytes": len(payload),
                     "compressed_bytes": len(blob)})
    return info


def unpack_linux_source(tarball: str = "/usr/src/linux-source-6.1.tar.xz") -> None:
    """linux-source-6.1 ships one tarball: unpack it once to :data:`LINUX_SRC` (atomically, by rename)."""
    if os.path.isdir(LINUX_SRC) or not os.path.exists(tarball):
        return
    tmp = LINUX_SRC + ".part"
    subprocess.run(["rm", "-rf", tmp], check=True)
    os.makedirs(tmp)
    print(f"unpacking {tarball} to {LINUX_SRC} ...", flush=True)
    subprocess.run(["tar", "-xf", tarball, "-C", tmp, "--strip-components=1"], check=True)
    os.rename(tmp, LINUX_SRC)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/_data/corpus"))
    ap.add_argument("--target-mb", type=float, default=120.0,
                    help="MB of extracted text to collect before planting (default %(default)s)")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--plant-near-dups", default="",
                    help="comma-separated edit rates, e.g. 0.01,0.03,0.05,0.10")
    ap.add_argument("--near-dups-per-rate", type=int, default=500,
                    help="planted near duplicates per edit rate (default %(default)s)")
    ap.add_argument("--zstd-level", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--install", action="store_true",
                    help="apt-get install the Debian packages first (root)")
    ap.add_argument("--skip-missing", action="store_true",
                    help="skip sources whose package is not installed instead of failing")
    args = ap.parse_args(argv)

    if args.install:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES],
                       check=True, env=env)
    rates = [float(r) for r in args.plant_near_dups.split(",") if r.strip()]
    unpack_linux_source()
    t0 = time.monotonic()
    print(f"collecting {args.target_mb:g} MB of text with {args.jobs} workers")
    try:
        docs, per_source = collect(args.target_mb * 1e6, args.jobs, args.skip_missing)
    except MissingPackageError as e:
        print(f"error: {e}\nall needed: apt-get install -y --no-install-recommends "
              f"{' '.join(APT_PACKAGES)}  (or pass --install)", file=sys.stderr)
        return 2
    t_extract = time.monotonic() - t0

    planted = []
    near_docs: list[Doc] = []
    used_ids: set[str] = set()
    for rate in rates:
        # distinct originals per rate: the salt differs and earlier picks are excluded
        batch = plant_near_duplicates(docs, args.near_dups_per_rate, [rate],
                                      salt=f"bench-near-{rate}", exclude=used_ids)
        for d in batch:
            used_ids.add(d.extra["dup_of"])
            planted.append({"original_id": d.extra["dup_of"], "dup_id": d.id,
                            "edit_rate": rate, "words_edited": d.extra["words_edited"]})
            d.extra = {}  # the records stay unlabelled; planted.jsonl is the ground truth
        near_docs.extend(batch)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(out, docs + near_docs, args.shards, args.zstd_level)
    planted_path = out / "planted.jsonl"
    if rates:
        planted_path.write_text("".join(json.dumps(p) + "\n" for p in planted),
                                encoding="utf-8")
    elif planted_path.exists():
        planted_path.unlink()
    elapsed = time.monotonic() - t0
    text_bytes = sum(len(d.text.encode("utf-8")) for d in docs + near_docs)
    raw = sum(s["bytes"] for s in shards)
    comp = sum(s["compressed_bytes"] for s in shards)
    summary = {"docs": len(docs) + len(near_docs), "near_dups": len(near_docs),
               "near_dup_rates": rates, "text_bytes": text_bytes, "jsonl_bytes": raw,
               "compressed_bytes": comp, "shards": shards, "sources": per_source,
               "target_mb": args.target_mb}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"built {out}: {summary['docs']:,} docs ({len(near_docs):,} planted near dups"
          f"{' at rates ' + ','.join(map(str, rates)) if rates else ''}), "
          f"{text_bytes / 1e6:.1f} MB text, {raw / 1e6:.1f} MB JSONL, "
          f"{comp / 1e6:.1f} MB zstd in {len(shards)} shards; "
          f"{elapsed:.0f} s ({t_extract:.0f} s extraction)")
    if text_bytes < 100e6 and args.target_mb >= 100:
        print("warning: less than 100 MB of text: install more of the packages listed above",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

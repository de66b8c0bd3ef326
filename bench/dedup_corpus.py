"""A real technical corpus with templated families, for judging near-duplicate removal.

Read from this machine (benchmarks may; tests never do):

- every English man page under ``/usr/share/man/man[1-8]`` as roff source with the markup
  stripped — on a machine with the Google Cloud SDK that includes thousands of *generated* CLI
  pages (``gcloud_alpha_…``, ``gcloud_beta_…``) that share most of their text: the family where
  union-find chaining deletes distinct documents;
- translated man pages (``/usr/share/man/<lang>/man*``) — translations of the English pages;
- rendered HTML beside its source (``/usr/share/doc/nodejs/api/*.html`` next to ``*.md``) and
  reStructuredText docs (``/usr/share/doc/*/html/**/*.rst``);
- one document of about 20 MB (every English section-1 page joined, in name order), so peak
  memory is measured with a very large document in the corpus.

Usage: ``python bench/dedup_corpus.py --out bench/_data/dedup_corpus.jsonl.zst`` (prints a summary).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import html
import json
import os
import re
import sys

import zstandard

_ESCAPES = re.compile(r"\\f[BIRP1-4]|\\f\(..|\\f\[[^\]]*\]|\\s[-+]?\d|\\\*\(..|\\\*\[[^\]]*\]|\\\*.|\\[&|^%]|\\\(..|\\\[[^\]]*\]")
_TAGS = re.compile(r"<script.*?</script>|<style.*?</style>|<[^>]+>", re.S)


def roff_to_text(src: str) -> str:
    """Man page source to plain text: comments and requests without text dropped, escapes removed."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}')) or line in (".", ""):
            continue
        if line.startswith((".", "'")):
            head, _, rest = line[1:].partition(" ")
            if head in ("SH", "SS", "B", "I", "BR", "BI", "IB", "RB", "IR", "RI", "TP", "IP", "TH", "Nm", "Nd", "Sh",
                        "Op", "Ar", "Fl", "It", "Dt"):
                line = rest.replace('"', "")
            else:
                continue
        line = _ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        if line.strip():
            out.append(line)
    return "\n".join(out)


def html_to_text(src: str) -> str:
    return re.sub(r"\n\s*\n+", "\n\n", html.unescape(_TAGS.sub(" ", src)))


def read_any(path: str) -> str:
    raw = open(path, "rb").read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", "replace")


def man_docs(root: str = "/usr/share/man") -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "man[1-8]", "*")) + glob.glob(os.path.join(root, "man[1-8]", "*"))):
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        rel = os.path.relpath(path, root)
        try:
            src = read_any(path)
        except OSError:
            continue
        if src.startswith(".so "):
            continue
        text = roff_to_text(src)
        if len(text.split()) >= 20:
            lang = rel.split("/")[0] if not rel.startswith("man") else "en"
            docs.append({"id": f"man:{rel}", "text": text, "source": f"man/{lang}"})
    return docs


def doc_docs(root: str = "/usr/share/doc") -> list[dict]:
    docs = []
    patterns = ["nodejs/api/*.html", "nodejs/api/*.md", "*/html/**/*.rst", "*/html/**/*.rst.gz"]
    for pat in patterns:
        for path in sorted(glob.glob(os.path.join(root, pat), recursive=True)):
            text = read_any(path)
            if path.endswith(".html"):
                text = html_to_text(text)
            if len(text.split()) >= 20:
                docs.append({"id": f"doc:{os.path.relpath(path, root)}", "text": text,
                             "source": "doc/" + os.path.relpath(path, root).split("/")[0]})
    return docs


def giant_doc(docs: list[dict], target_bytes: int) -> dict:
    parts, size = [], 0
    for d in sorted(docs, key=lambda d: d["id"]):
        if d["id"].startswith("man:man1/"):
            parts.append(d["text"])
            size += len(d["text"].encode())
            if size >= target_bytes:
                break
    return {"id": "giant:man1-joined", "text": "\n\n".join(parts), "source": "giant"}


def build(out: str, giant_mb: float) -> dict:
    docs = man_docs() + doc_docs()
    if giant_mb > 0:
        docs.append(giant_doc(docs, int(giant_mb * 1e6)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as w:
        for d in docs:
            w.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
    os.replace(tmp, out)
    families: dict[str, int] = {}
    for d in docs:
        families[d["source"]] = families.get(d["source"], 0) + 1
    gcloud = sum(d["id"].startswith("man:man1/gcloud") for d in docs)
    return {"docs": len(docs), "mb": round(sum(len(d["text"].encode()) for d in docs) / 1e6, 1),
            "largest_mb": round(max(len(d["text"].encode()) for d in docs) / 1e6, 1), "generated_gcloud_pages": gcloud,
            "sources": dict(sorted(families.items(), key=lambda kv: -kv[1])[:15])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "_data", "dedup_corpus.jsonl.zst"))
    ap.add_argument("--giant-mb", type=float, default=20.0)
    args = ap.parse_args()
    print(json.dumps(build(args.out, args.giant_mb), indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""The shipped demo corpus: where it is and how to read it.

``data/demo_corpus.jsonl.zst`` is real text from Debian documentation packages, deliberately
dirty in known ways (planted duplicates and near duplicates, low-quality fragments, a few
non-English documents and :data:`MALFORMED_KINDS` malformed lines); ``data/PROVENANCE.md`` says
where every document comes from. The demo, the tests and the benchmarks read it through this
module. The code that builds it from installed packages is corpus tooling, not runtime, and lives
in ``tools/demo_corpus/build.py``.
"""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_CORPUS_PATH = DATA_DIR / "demo_corpus.jsonl.zst"
PROVENANCE_PATH = DATA_DIR / "PROVENANCE.md"

MALFORMED_KINDS: dict[str, int] = {
    "invalid_json": 2,
    "json_array": 1,
    "json_scalar": 1,
    "invalid_utf8": 1,
    "missing_text": 1,
    "null_text": 1,
    "empty_text": 1,
    "numeric_text": 1,
    "list_text": 1,
}
"""How many malformed lines of each kind the demo corpus carries (10 in all)."""


def demo_corpus_path() -> Path:
    """Path of the packaged demo corpus (``shardflow/dataprep/data/demo_corpus.jsonl.zst``)."""
    return DEMO_CORPUS_PATH


def read_demo_corpus() -> bytes:
    """The corpus uncompressed: JSON lines, malformed ones included byte for byte (~10 MB)."""
    import zstandard

    with open(DEMO_CORPUS_PATH, "rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def demo_corpus_lines() -> list[bytes]:
    """The corpus's lines, each with its ``\\n``."""
    return read_demo_corpus().splitlines(keepends=True)

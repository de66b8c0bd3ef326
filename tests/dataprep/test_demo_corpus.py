"""The shipped demo corpus must stay small, real and deliberately dirty in known ways: the demo
and the pipeline tests rely on every stage (quarantine, exact and near dedup, quality and
language filters) having something to do. (Its builder is tested in tests/tools/.)"""
from __future__ import annotations

import json
from collections import Counter

import pytest

from shardflow.dataprep import demo_corpus as dc


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    raw = dc.read_demo_corpus()
    assert raw.endswith(b"\n")
    assert dc.demo_corpus_lines() == raw.splitlines(keepends=True)
    return raw.split(b"\n")[:-1]


def classify(line: bytes) -> tuple[str, object]:
    """The kind of a raw line, as a strict reader would see it ('ok' for a usable record)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return "invalid_json", None
    if isinstance(obj, list):
        return "json_array", obj
    if not isinstance(obj, dict):
        return "json_scalar", obj
    if "text" not in obj:
        return "missing_text", obj
    t = obj["text"]
    if t is None:
        return "null_text", obj
    if isinstance(t, bool) or isinstance(t, (int, float)):
        return "numeric_text", obj
    if isinstance(t, list):
        return "list_text", obj
    if t == "":
        return "empty_text", obj
    return "ok", obj


@pytest.fixture(scope="module")
def records(lines) -> list[dict]:
    return [obj for kind, obj in map(classify, lines) if kind == "ok"]


def test_packaged_file_exists_and_is_small():
    p = dc.demo_corpus_path()
    assert p == dc.DEMO_CORPUS_PATH
    assert p.is_file() and p.name == "demo_corpus.jsonl.zst"
    assert p.stat().st_size <= 5 * 1024 * 1024
    assert dc.PROVENANCE_PATH.is_file()


def test_valid_records(records):
    assert len(records) >= 1000
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert isinstance(r["id"], str) and r["id"]
        assert isinstance(r["text"], str) and r["text"].strip()
        assert isinstance(r["source"], str) and "/" in r["source"]
        assert r["meta"]["package"] == r["source"].split("/", 1)[0]
        assert r["meta"]["license"]
    raw_text = sum(len(r["text"].encode()) for r in records)
    assert 3e6 <= raw_text <= 9e6


def test_malformed_lines_by_kind(lines):
    kinds = Counter(kind for kind, _ in map(classify, lines))
    kinds.pop("ok")
    assert dict(kinds) == dc.MALFORMED_KINDS
    assert sum(kinds.values()) == 10


def test_exact_duplicates(records):
    by_id = {r["id"]: r for r in records}
    texts = Counter(r["text"] for r in records)
    assert sum(c - 1 for c in texts.values() if c > 1) >= 0.015 * len(records)
    planted = [r for r in records if r["meta"].get("planted") == "exact_dup"]
    assert planted
    for r in planted:
        orig = by_id[r["meta"]["dup_of"]]
        assert r["text"] == orig["text"] and r["id"] != orig["id"]


def test_low_quality_docs_and_licences(records):
    low = [r for r in records if r["meta"].get("planted") == "low_quality"]
    assert len(low) >= 5
    assert all(len(r["text"].encode()) < 2000 for r in low)
    # Only public-domain or permissive text is shipped (no GPL translations).
    assert {r["meta"]["license"] for r in records} <= {"public-domain", "PSF-2.0", "PostgreSQL"}

"""Bad input: every malformed kind at once, and nothing good is lost.

The corpus mixes real documents (the demo corpus's well-formed lines) with one of each malformed
record kind at known lines, plus whole files that are broken: a truncated .zst, an empty file, and
files named .zst/.gz that are not compressed that way. The whole pipeline must complete; the clean
stage's quarantine must hold exactly the planted bad records (file, line, reason, bounded excerpt);
and every good record must come out of the clean stage.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard

from shardflow.dataprep.stage import run_stage
from shardflow.dataprep.stages import build_stages
from shardflow.storage import Storage
from shardflow.storage.jsonl import iter_jsonl

from . import check_root_sound, demo_lines, report, small_prep_config

BIG = 20 << 20  # a 20 MB document: over the default max_doc_bytes (8 MiB), read in bounded memory

BAD_RECORDS: list[tuple[bytes, str]] = [
    (b'{"id": "bj", "text": "unterminated', "invalid_json"),
    (b'{"id": "bu", "text": "caf\xe9 latin-1 bytes"}', "invalid_utf8"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'42', "not_an_object"),
    (b'{"id": "m1", "body": "no text field here"}', "missing_text"),
    (b'{"id": "n1", "text": null}', "null_text"),
    (b'{"id": "e1", "text": ""}', "empty_text"),
    (b'{"id": "s1", "text": 12345}', "non_string_text"),
    (b'{"id": "s2", "text": ["a", "list"]}', "non_string_text"),
    (b'{"id": "big", "text": "' + b"lorem ipsum " * (BIG // 12) + b'"}', "too_long"),
]


def good_lines(n: int) -> list[bytes]:
    """Well-formed demo records (a JSON object with a non-blank string text), ids made unique."""
    out = []
    for i, raw in enumerate(demo_lines()):
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
            rec["id"] = f"good-{len(out)}"
            out.append(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
            if len(out) == n:
                break
    return out


def build_corpus(directory: Path) -> tuple[set[str], set[tuple[str, int, str]]]:
    """Write the corpus; return the good ids and the expected (file name, line, reason) quarantine."""
    directory.mkdir(parents=True)
    good = good_lines(240)
    good_ids: set[str] = set()
    expected: set[tuple[str, int, str]] = set()

    # mixed.jsonl: good records with one of each bad kind spliced in.
    lines, g = [], iter(good[:120])
    for bad, reason in BAD_RECORDS:
        for _ in range(8):
            lines.append(next(g))
        lines.append(bad + b"\n")
        expected.add(("mixed.jsonl", len(lines), reason))
    lines.extend(g)
    (directory / "mixed.jsonl").write_bytes(b"".join(lines))

    # truncated.jsonl.zst: a compressed file cut short keeps the records before the cut.
    body = b"".join(good[120:180])
    blob = zstandard.ZstdCompressor(level=3).compress(body)
    cut = blob[: len(blob) * 2 // 3]
    (directory / "truncated.jsonl.zst").write_bytes(cut)
    kept_by_cut = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    n_whole = kept_by_cut.count(b"\n")

    # clean.jsonl.gz: a correctly compressed file, for contrast.
    (directory / "clean.jsonl.gz").write_bytes(gzip.compress(b"".join(good[180:240]), mtime=0))

    (directory / "empty.jsonl").write_bytes(b"")
    (directory / "plain-named.jsonl.zst").write_bytes(b"".join(good_lines(3)))  # not zstd at all
    (directory / "plain-named.jsonl.gz").write_bytes(b"".join(good_lines(3)))  # not gzip at all

    for raw in good[:120] + good[180:240]:
        good_ids.add(json.loads(raw)["id"])
    for raw in good[120:120 + n_whole]:
        good_ids.add(json.loads(raw)["id"])
    return good_ids, expected


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    good_ids, expected = build_corpus(base / "in")
    prep, _ = small_prep_config(str(base / "root"), str(base / "in" / "*"))
    storage = Storage(str(base / "root"))
    results = {}
    for st in build_stages(prep):
        results[st.name] = run_stage(st, storage)
    return storage, good_ids, expected, results


def test_pipeline_completes_on_bad_input(bad_run):
    storage, _, _, results = bad_run
    for name, res in results.items():
        assert not res["failed"] and res["ran"], (name, res)
    assert storage.exists("shards/index.json")
    check_root_sound(storage.root)


def test_every_bad_record_is_quarantined_with_file_line_and_reason(bad_run):
    storage, _, expected, _ = bad_run
    quarantined = []
    for name in storage.list("quarantine/clean", suffix=".jsonl.zst"):
        quarantined.extend(iter_jsonl(storage, f"quarantine/clean/{name}"))
    got = {(Path(q["file"]).name, q["line"], q["reason"]) for q in quarantined}
    assert expected <= got, sorted(expected - got)
    by_file = {}
    for f, line, reason in got - expected:
        by_file.setdefault(f, []).append(reason)
    # Beyond the planted records: one record per broken file, naming why.
    assert by_file.get("truncated.jsonl.zst") == ["truncated_stream"], by_file
    assert by_file.get("plain-named.jsonl.zst") in (["corrupt_stream"], ["truncated_stream"]), by_file
    assert by_file.get("plain-named.jsonl.gz") in (["corrupt_stream"], ["truncated_stream"]), by_file
    assert set(by_file) == {"truncated.jsonl.zst", "plain-named.jsonl.zst", "plain-named.jsonl.gz"}, by_file
    for q in quarantined:
        assert q["file"].startswith("/") or "://" in q["file"], q["file"]  # a full URI, not a bare name
        assert len(q["excerpt"].encode()) <= 4 * 1024, "excerpts are bounded"
    big = next(q for q in quarantined if q["reason"] == "too_long")
    # Read in bounded memory: the 20 MB line is never held; its excerpt is the line's head.
    assert big["excerpt"].startswith('{"id": "big", "text": "lorem ipsum') and len(big["excerpt"]) <= 4096


def test_every_good_record_reaches_the_clean_output(bad_run):
    storage, good_ids, _, _ = bad_run
    out_ids = []
    counts: Counter = Counter()
    from shardflow.storage.manifest import list_records

    for sid, rec in list_records(storage, "clean").items():
        counts.update(rec.counts)
        out_ids.extend(d["id"] for d in iter_jsonl(storage, rec.outputs["docs"].ref))
    assert len(out_ids) == len(set(out_ids))
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped."))
    assert dropped == 0, counts
    assert set(out_ids) == good_ids
    assert counts["docs_out"] == len(good_ids)
    assert sum(v for k, v in counts.items() if k.startswith("quarantined.")) == len(BAD_RECORDS) + 3
    assert counts.get("empty_files", 0) == 1, counts
    report("bad_input", good_records=len(good_ids), kept=len(out_ids),
           quarantined=sum(v for k, v in counts.items() if k.startswith("quarantined.")),
           reasons={k.split(".", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("quarantined.")})


# -- decompression bombs and size claims -----------------------------------------------------------

BOMB = 256 << 20  # one line expanding to 256 MiB (bench/decompression_bomb.py runs the 4 GB one)


@pytest.mark.timeout(300)
def test_zstd_and_gzip_bombs_are_quarantined_in_bounded_memory(tmp_path):
    """A line that expands to 256 MiB, in a .zst and in a .gz: the clean stage (in a fresh interpreter,
    so its peak RSS is its own) quarantines each as too_long with a bounded excerpt, keeps the good
    records on both sides, and never holds more than a few decompressed MiB at once."""
    import subprocess
    import sys

    from . import REPO_ROOT, child_env
    from .bombs import write_bomb

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("bomb.jsonl.zst", "bomb.jsonl.gz"):
        assert write_bomb(inputs / name, BOMB) == BOMB
        assert (inputs / name).stat().st_size < BOMB // 500  # a real bomb: tiny on disk
    out = subprocess.run([sys.executable, "-m", "tests.reliability.bombs", str(tmp_path / "root"), str(inputs / "*")],
                         env=child_env(), cwd=str(REPO_ROOT), capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    res = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert res["failed"] == {}
    assert sorted((Path(q["file"]).name, q["line"], q["reason"]) for q in res["quarantined"]) == [
        ("bomb.jsonl.gz", 2, "too_long"), ("bomb.jsonl.zst", 2, "too_long")]
    assert all(q["excerpt_bytes"] <= 4096 for q in res["quarantined"])
    assert res["kept"] == ["after", "after", "before", "before"]
    # Before bounding, the zstd reader held the whole line's decompressed output (867 MB peak, 93 s).
    assert res["peak_rss_mb"] < 400, res
    report("decompression_bombs", line_bytes=BOMB, peak_rss_mb=res["peak_rss_mb"], wall_s=res["wall_s"])


def test_tar_member_claiming_a_huge_size_is_refused_before_reading(tmp_path):
    """A foreign shard whose member header claims 1 TiB (a real header, GNU base-256 size field):
    the loader's scan refuses it from the header alone, naming the shard and the member."""
    import tarfile

    from shardflow.storage.shards import MAX_MEMBER_BYTES
    from shardflow.train.data import ShardDataError, build_index

    info = tarfile.TarInfo("000000.tokens.npy")
    info.size = 1 << 40
    body = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict") + b"\x93NUMPY" + b"\0" * 506
    shard = tmp_path / "root" / "foreign" / "claims.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(body + b"\0" * 1024)
    assert tarfile.TarInfo.frombuf(body[:512], "utf-8", "surrogateescape").size == 1 << 40
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(ShardDataError, match=rf"claims\.tar member '000000\.tokens\.npy': claims {1 << 40} bytes, "
                                             rf"over the {MAX_MEMBER_BYTES}-byte limit.*refused before reading"):
        build_index(storage, "foreign/*.tar")
    # Within the limit but past the end of the file: refused the same way.
    info.size = 1 << 20
    shard.write_bytes(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "strict") + b"\0" * 1536)
    with pytest.raises(ShardDataError, match="past the end of the 2048-byte shard"):
        build_index(storage, "foreign/*.tar")
    report("tar_size_claims", refused=2)

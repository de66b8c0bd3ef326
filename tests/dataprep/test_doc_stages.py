"""CleanStage and FilterStage under the stage protocol: outputs, quarantine, manifests, skipping
done shards, byte-identical re-runs, config-digest scoping; on a local root and an S3 one."""
from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import pytest
import zstandard

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.demo_corpus import MALFORMED_KINDS, read_demo_corpus
from shardflow.dataprep.doc_stages import CleanStage, FilterStage
from shardflow.dataprep.stage import plan, run_stage, shard_id_for
from shardflow.storage import Storage
from shardflow.storage.jsonl import iter_jsonl
from shardflow.storage.manifest import ShardState, read_record

PARAGRAPHS = [
    "The river runs through the middle of the old town, and most of the houses that line its banks "
    "were built with stone from the nearby hills. In the spring the water rises quickly, so the people "
    "who live there have learned to keep their boats tied high on the walls.\n"
    "The market opens early on Saturday mornings. Farmers bring vegetables, cheese and bread from the "
    "villages to the north, and the stalls stay busy until noon.\n"
    "Visitors often ask why the bridge has seven arches. The answer is that the builders wanted each "
    "arch to be small enough to survive the winter floods.",
    "Learning to bake bread takes patience more than skill. The dough has to rest for hours, and the "
    "kitchen should be warm but not hot, so that the yeast can do its work at an even pace.\n"
    "Most beginners add too much flour because the dough feels sticky. It is better to knead a little "
    "longer, since the gluten will develop and the dough will become smooth on its own.\n"
    "When the loaf comes out of the oven, it should sound hollow when you tap the bottom. Let it cool "
    "before cutting it, or the crumb will be gummy and the slices will tear.",
    "The library on the hill was founded by a group of teachers who wanted the children of the valley "
    "to have books of their own. At first it was a single room with three shelves and a stove.\n"
    "Over the years the town raised money for a larger building, and volunteers carried the books up "
    "the hill in boxes. The new reading room has tall windows that face the mountains.\n"
    "Today the library lends films and music as well as books, and on winter evenings it offers "
    "classes in languages, history and the art of repairing old furniture.",
]
GERMAN = ("Der Ausschuss traf sich am Dienstag, um über den Haushalt für das nächste Jahr zu beraten. "
          "Nach einer langen Debatte einigten sich die Mitglieder darauf, mehr Geld für Schulen auszugeben "
          "und weniger für Straßen. Die Entscheidung wurde von den meisten Bürgern begrüßt.\n"
          "Einige Kritiker meinten jedoch, dass die Straßen im Winter gefährlich bleiben würden.")


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def write_inputs(storage: Storage) -> list[str]:
    a = [
        _line({"id": "good-0", "text": "  " + PARAGRAPHS[0].replace("town,", "town,\u200b  ") + "  ", "url": "u0"}),
        b'{"id": "broken", "text": "no end',
        _line({"id": "de", "text": GERMAN}),
        _line({"id": "short", "text": "Just a few words here."}),
        b"[1, 2, 3]",
        _line({"id": "good-1", "text": PARAGRAPHS[1]}),
        _line({"id": "nulltext", "text": None}),
    ]
    b = [_line({"id": "good-2", "text": PARAGRAPHS[2]}), _line({"id": "blank", "text": "\u200b \ufeff"})]
    storage.write_bytes("in/a.jsonl.zst", zstandard.ZstdCompressor().compress(b"\n".join(a) + b"\n"))
    storage.write_bytes("in/b.jsonl.gz", gzip.compress(b"\n".join(b) + b"\n", mtime=0))
    return ["in/a.jsonl.zst", "in/b.jsonl.gz"]


def test_clean_then_filter(storage):
    cfg = PrepConfig(inputs=write_inputs(storage))
    clean, filt = CleanStage(cfg), FilterStage(cfg)
    ida, idb = shard_id_for(storage.uri("in/a.jsonl.zst")), shard_id_for(storage.uri("in/b.jsonl.gz"))
    assert (ida, idb) == (f"a-{ida[-10:]}", f"b-{idb[-10:]}")  # named after the file, format suffixes dropped
    assert run_stage(clean, storage) == {"stage": "clean", "ran": [ida, idb], "skipped": [], "failed": {}, "retired": []}

    rec = read_record(storage, "clean", ida)
    assert set(rec.outputs) == {"docs", "quarantine"}
    assert rec.counts["records_in"] == 7 and rec.counts["docs_in"] == 4 and rec.counts["docs_out"] == 4
    assert rec.counts["quarantined.invalid_json"] == rec.counts["quarantined.not_an_object"] == rec.counts["quarantined.null_text"] == 1
    quarantine = list(iter_jsonl(storage, rec.outputs["quarantine"].ref))
    uri = storage.uri("in/a.jsonl.zst")
    assert [(q["file"], q["line"], q["reason"]) for q in quarantine] == [
        (uri, 2, "invalid_json"), (uri, 5, "not_an_object"), (uri, 7, "null_text")]
    assert quarantine[0]["excerpt"] == '{"id": "broken", "text": "no end'
    docs = list(iter_jsonl(storage, rec.outputs["docs"].ref))
    assert [d["id"] for d in docs] == ["good-0", "de", "short", "good-1"]
    assert docs[0]["text"] == PARAGRAPHS[0]  # stripped, zero-width space and double space gone
    assert docs[0]["source"] == "a.jsonl.zst" and docs[0]["meta"] == {"url": "u0"}

    rec_b = read_record(storage, "clean", idb)
    assert rec_b.counts["dropped.clean.empty_after_clean"] == 1 and rec_b.counts["docs_out"] == 1
    assert list(iter_jsonl(storage, rec_b.outputs["quarantine"].ref)) == []  # written, empty

    assert run_stage(filt, storage)["ran"] == [ida, idb]
    frec = read_record(storage, "filter", ida)
    kept = list(iter_jsonl(storage, frec.outputs["docs"].ref))
    assert [d["id"] for d in kept] == ["good-0", "good-1"]
    assert kept[0]["meta"]["lang"] == "en" and kept[0]["meta"]["lang_score"] >= 0.65
    assert frec.counts["docs_in"] == 4 and frec.counts["docs_out"] == 2
    assert frec.counts["dropped.language.other_language"] == 1
    assert frec.counts["dropped.gopher_quality.gopher_short_doc"] == 1
    assert frec.counts["bytes_out"] == sum(len(d["text"].encode()) for d in kept)
    assert "dropped" not in frec.outputs

    # a second run finds everything done
    assert run_stage(clean, storage)["skipped"] == [ida, idb]
    assert run_stage(filt, storage)["skipped"] == [ida, idb]
    # and a forced re-run rewrites the very same bytes
    before = _all_bytes(storage)
    assert len(before) == 6
    assert run_stage(clean, storage, force=True)["ran"] == [ida, idb]
    assert run_stage(filt, storage, force=True)["ran"] == [ida, idb]
    assert _all_bytes(storage) == before


def shard_ids(storage: Storage, cfg: PrepConfig) -> list[str]:
    return [s.shard_id for s in CleanStage(cfg).shards(storage)]


def _all_bytes(storage: Storage) -> dict[str, bytes]:
    out = {}
    for prefix in ("stages/clean", "stages/filter", "stages/filter/_dropped", "quarantine/clean"):
        for name in storage.list(prefix, suffix=".jsonl.zst"):
            out[f"{prefix}/{name}"] = storage.read_bytes(f"{prefix}/{name}")
    return out


def test_outputs_are_byte_identical_across_runs(tmp_path):
    inputs = Storage(str(tmp_path / "inputs"))
    refs = write_inputs(inputs)
    roots = []
    for run in ("one", "two"):
        storage = Storage(str(tmp_path / run))
        cfg = PrepConfig(inputs=[inputs.uri(r) for r in refs])
        cfg.filter.write_dropped = True
        run_stage(CleanStage(cfg), storage)
        run_stage(FilterStage(cfg), storage)
        roots.append(storage)
    one, two = (_all_bytes(s) for s in roots)
    assert len(one) == 8 and one == two  # per shard: clean docs, quarantine, filter docs, dropped
    for stage in ("clean", "filter"):
        for shard in shard_ids(roots[0], cfg):
            r1, r2 = read_record(roots[0], stage, shard), read_record(roots[1], stage, shard)
            assert {k: v.digest for k, v in r1.outputs.items()} == {k: v.digest for k, v in r2.outputs.items()}


def test_write_dropped_keeps_each_dropped_document_with_its_reason(local_storage):
    cfg = PrepConfig(inputs=write_inputs(local_storage))
    cfg.filter.write_dropped = True
    run_stage(CleanStage(cfg), local_storage)
    run_stage(FilterStage(cfg), local_storage)
    first = shard_ids(local_storage, cfg)[0]
    rec = read_record(local_storage, "filter", first)
    assert rec.outputs["dropped"].ref == f"stages/filter/_dropped/{first}.jsonl.zst"
    dropped = list(iter_jsonl(local_storage, rec.outputs["dropped"].ref))
    assert [(d["id"], d["filter"], d["reason"]) for d in dropped] == [
        ("de", "language", "other_language"), ("short", "gopher_quality", "gopher_short_doc")]
    assert dropped[0]["text"] == GERMAN and dropped[0]["meta"]["lang"] == "de"


def test_config_digests_cover_exactly_their_sections(local_storage):
    base = PrepConfig(inputs=write_inputs(local_storage))
    run_stage(CleanStage(base), local_storage)
    run_stage(FilterStage(base), local_storage)

    tuned = base.model_copy(deep=True)
    tuned.filter.gopher_quality.min_doc_words = 10
    assert CleanStage(tuned).config_digest() == CleanStage(base).config_digest()
    assert FilterStage(tuned).config_digest() != FilterStage(base).config_digest()
    assert {p.state for p in plan(CleanStage(tuned), local_storage)} == {ShardState.DONE}
    assert {p.state for p in plan(FilterStage(tuned), local_storage)} == {ShardState.STALE}
    ids = shard_ids(local_storage, base)
    assert run_stage(FilterStage(tuned), local_storage)["ran"] == ids
    assert read_record(local_storage, "filter", ids[0]).config_digest == FilterStage(tuned).config_digest()

    for change in (lambda c: setattr(c.clean, "mask_emails", True), lambda c: setattr(c.read, "text_field", "body")):
        other = base.model_copy(deep=True)
        change(other)
        assert CleanStage(other).config_digest() != CleanStage(base).config_digest()
        assert FilterStage(other).config_digest() == FilterStage(base).config_digest()
    # The input list is no config: each shard's own input is in its input digest instead.
    other = base.model_copy(deep=True)
    other.inputs.append("in/other.jsonl")
    other.workers = 7
    assert CleanStage(other).config_digest() == CleanStage(base).config_digest()


def test_corrupt_input_is_quarantined_and_shard_still_done(local_storage):
    rng = random.Random(0)  # text that compresses like text: many zstd blocks, the cut leaves some whole
    good = zstandard.ZstdCompressor().compress(b"\n".join(_line({"id": f"d{i}", "text": rng.randbytes(500).hex()})
                                                          for i in range(300)) + b"\n")
    local_storage.write_bytes("in/cut.jsonl.zst", good[: len(good) // 2])
    local_storage.write_bytes("in/fake.jsonl.gz", b'{"id": "x", "text": "plain"}\n')
    cfg = PrepConfig(inputs=["in/cut.jsonl.zst", "in/fake.jsonl.gz"])
    result = run_stage(CleanStage(cfg), local_storage)
    ids = shard_ids(local_storage, cfg)
    assert result["ran"] == ids and not result["failed"]
    cut = read_record(local_storage, "clean", ids[0])
    assert cut.counts["quarantined.truncated_stream"] == 1 and 0 < cut.counts["docs_out"] < 300
    fake = read_record(local_storage, "clean", ids[1])
    assert fake.counts["quarantined.corrupt_stream"] == 1 and fake.counts.get("docs_out", 0) == 0


def _demo_subset(storage: Storage) -> str:
    """Every planted malformed line and low-quality fragment of the demo corpus plus every 10th
    other line, as one input file (real data, a fraction of the filter time)."""
    raw = read_demo_corpus()
    lines = raw.split(b"\n")
    keep = [ln for i, ln in enumerate(lines) if ln and (i % 10 == 0 or b"malformed/" in ln or b'"low_quality"' in ln
                                                        or not ln.startswith(b'{"id"'))]
    storage.write_bytes("in/demo_subset.jsonl.zst", zstandard.ZstdCompressor().compress(b"\n".join(keep) + b"\n"))
    return "in/demo_subset.jsonl.zst"


def test_demo_corpus_malformed_lines_and_planted_fragments(local_storage):
    """On real text from the demo corpus: exactly its 10 planted malformed lines are quarantined,
    with the reason each kind should get, and its 6 planted low-quality fragments are filtered out."""
    cfg = PrepConfig(inputs=[_demo_subset(local_storage)])
    run_stage(CleanStage(cfg), local_storage)
    (only,) = shard_ids(local_storage, cfg)
    rec = read_record(local_storage, "clean", only)
    reason_of = {"invalid_json": "invalid_json", "json_array": "not_an_object", "json_scalar": "not_an_object",
                 "invalid_utf8": "invalid_utf8", "missing_text": "missing_text", "null_text": "null_text",
                 "empty_text": "empty_text", "numeric_text": "non_string_text", "list_text": "non_string_text"}
    expected = Counter()
    for kind, n in MALFORMED_KINDS.items():
        expected[reason_of[kind]] += n
    quarantine = list(iter_jsonl(local_storage, rec.outputs["quarantine"].ref))
    assert Counter(q["reason"] for q in quarantine) == expected
    assert rec.counts["records_in"] == rec.counts["docs_in"] + sum(expected.values())

    run_stage(FilterStage(cfg), local_storage)
    kept = {d["id"] for d in iter_jsonl(local_storage, read_record(local_storage, "filter", only).outputs["docs"].ref)}
    planted = [d["id"] for d in iter_jsonl(local_storage, rec.outputs["docs"].ref) if d["meta"].get("planted") == "low_quality"]
    assert len(planted) == 6 and not kept & set(planted)
    assert len(kept) > 20


@pytest.mark.parametrize("stage_cls", [CleanStage, FilterStage])
def test_stage_names_and_shards_follow_the_protocol(local_storage, stage_cls):
    cfg = PrepConfig(inputs=write_inputs(local_storage))
    stage = stage_cls(cfg)
    assert stage.name in ("clean", "filter")
    if stage_cls is FilterStage:
        assert stage.shards(local_storage) == []  # nothing upstream yet
        run_stage(CleanStage(cfg), local_storage)
    specs = stage.shards(local_storage)
    assert [s.shard_id for s in specs] == [shard_id_for(local_storage.uri(r)) for r in cfg.inputs]


def test_stages_pickle_for_process_pools(local_storage):
    """Process pools and task runners ship stages to workers by pickling them."""
    import pickle

    cfg = PrepConfig(inputs=write_inputs(local_storage))
    cfg.clean.mask_emails = True
    clean, filt = (pickle.loads(pickle.dumps(s)) for s in (CleanStage(cfg), FilterStage(cfg)))
    assert clean.config_digest() == CleanStage(cfg).config_digest()
    ids = shard_ids(local_storage, cfg)
    assert run_stage(clean, local_storage)["ran"] == ids
    assert run_stage(filt, local_storage)["ran"] == ids

import io
import multiprocessing as mp
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stage import run_shard, run_stage
from shardflow.dataprep.tokenize import PackStage, TokenizeStage, stream_ref, tokenize_stages
from shardflow.dataprep.tokenizer import TokenizerStage
from shardflow.storage import Storage, digest_bytes
from shardflow.storage.doc_split import doc_split
from shardflow.storage.jsonl import iter_jsonl
from shardflow.storage.manifest import read_record, record_ref
from shardflow.storage.tokenizer_files import MODEL_REF, load_tokenizer
from shardflow.storage.shards import INDEX_REF, read_index, read_member_rows, verify_shard

from .test_tokenizer import make_upstream, real_docs

N_SHARDS = 3
TOK = {"seq_len": 64, "rows_per_member": 16, "samples_per_shard": 100, "val_fraction": 0.25, "split_seed": 3}


def cfg_with(**tokenize) -> PrepConfig:
    return PrepConfig(tokenizer={"vocab_size": 800, "sample_docs": 500}, tokenize={**TOK, **tokenize})


@pytest.fixture(scope="module")
def docs():
    return real_docs()


@pytest.fixture(scope="module")
def template(tmp_path_factory, docs):
    """A dataset root with done dedup shards of real text and a trained tokenizer."""
    root = tmp_path_factory.mktemp("template") / "root"
    storage = Storage(str(root))
    make_upstream(storage, docs, N_SHARDS)
    assert run_stage(TokenizerStage(cfg_with()), storage)["ran"] == ["_all"]
    return root


@pytest.fixture
def root(template, tmp_path) -> Storage:
    shutil.copytree(template, tmp_path / "root")
    return Storage(str(tmp_path / "root"))


def run_all(storage: Storage, cfg: PrepConfig) -> dict:
    out = {}
    for stage in tokenize_stages(cfg):
        res = run_stage(stage, storage)
        assert not res["failed"], res["failed"]
        out[stage.name] = res
    return out


def expected_streams(storage: Storage, cfg: PrepConfig) -> dict[str, list[int]]:
    """Independent reference: per document, one sentencepiece call, in upstream shard order."""
    sp, _, _ = load_tokenizer(storage)
    t = cfg.tokenize
    streams = {"train": [], "val": []}
    for i in range(N_SHARDS):
        for doc in iter_jsonl(storage, f"stages/dedup/{i:06d}.jsonl.zst"):
            ids = ([sp.bos_id()] if t.add_bos else []) + sp.encode(doc["text"]) + [sp.eos_id()]
            streams[doc_split(doc["id"], t.val_fraction, t.split_seed)].extend(ids)
    return streams


def all_files(storage: Storage, *dirs: str) -> dict[str, bytes]:
    return {f"{d}/{n}": storage.read_bytes(f"{d}/{n}") for d in dirs for n in storage.list(d)}


def test_shards_hold_exactly_the_packed_documents(root: Storage):
    import webdataset as wds

    cfg = cfg_with()
    run_all(root, cfg)
    L = cfg.tokenize.seq_len
    index = read_index(root)
    _, meta, digest = load_tokenizer(root)
    assert (index["seq_len"], index["dtype"], index["vocab_size"], index["eos_id"]) == (L, "uint16", 800, 2)
    assert index["tokenizer_digest"] == digest == digest_bytes(root.read_bytes(MODEL_REF))
    counts = read_record(root, "pack", "_all").counts
    expected = expected_streams(root, cfg)
    for split in ("train", "val"):
        stream = np.array(expected[split], np.uint16)
        n = stream.size // (L + 1)
        assert n > 10, f"too little {split} text for a meaningful test"
        rows = stream[: n * (L + 1)].reshape(n, L + 1)
        shards = index["splits"][split]["shards"]
        urls = [os.path.join(root.root, "shards", s["name"]) for s in shards]
        got = np.concatenate([s["tokens.npy"] for s in wds.WebDataset(urls, shardshuffle=False).decode()])
        np.testing.assert_array_equal(got, rows)
        assert counts[f"rows.{split}"] == n and counts[f"tokens.{split}"] == n * (L + 1)
        assert counts[f"dropped_tail_tokens.{split}"] == stream.size - n * (L + 1)
        assert counts[f"docs.{split}"] == int(np.count_nonzero(stream == 2))
        assert counts[f"shards.{split}"] == len(shards) == -(-n // 100)
        r = 0
        for s in shards:
            assert verify_shard(root, s) == []
            with tarfile.open(os.path.join(root.root, "shards", s["name"])) as tf:
                assert [m.name for m in tf.getmembers()] == [f"{m['key']}.tokens.npy" for m in s["members"]]
            for m in s["members"]:
                np.testing.assert_array_equal(read_member_rows(root, s, m, 0, m["rows"], L, "uint16"), rows[r : r + m["rows"]])
                r += m["rows"]
    tok = [read_record(root, "tokenize", f"{i:06d}").counts for i in range(N_SHARDS)]
    assert sum(c["docs.train"] + c["docs.val"] for c in tok) == counts["docs.train"] + counts["docs.val"]
    assert sum(c["tokens.val"] for c in tok) == counts["stream_tokens.val"] == len(expected["val"])
    assert set(read_record(root, "pack", "_all").outputs) == {"index"} | {s["name"] for sp in index["splits"].values() for s in sp["shards"]}


def _run_tokenize_shard(root_path: str, shard_id: str, threads: int) -> str:
    stage = TokenizeStage(cfg_with(num_threads=threads))
    spec = next(s for s in stage.shards(Storage(root_path)) if s.shard_id == shard_id)
    return run_shard(stage, Storage(root_path), spec).status


def test_output_is_byte_identical_across_threads_batches_and_workers(template, tmp_path):
    ref = Storage(str(tmp_path / "a"))
    shutil.copytree(template, tmp_path / "a")
    run_all(ref, cfg_with(num_threads=2))
    reference = all_files(ref, "stages/tokenize", "shards")

    # One thread, tiny encode batches, shards tokenized in reverse order.
    b = Storage(str(tmp_path / "b"))
    shutil.copytree(template, tmp_path / "b")
    cfg = cfg_with(num_threads=1, encode_batch_chars=3000)
    stage = TokenizeStage(cfg)
    for spec in reversed(stage.shards(b)):
        run_shard(stage, b, spec)
    run_stage(PackStage(cfg), b)
    # Two worker processes, two threads each.
    c = Storage(str(tmp_path / "c"))
    shutil.copytree(template, tmp_path / "c")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        ids = [s.shard_id for s in TokenizeStage(cfg_with()).shards(c)]
        assert list(pool.map(_run_tokenize_shard, [c.root] * len(ids), ids, [2] * len(ids))) == ["done"] * len(ids)
    run_stage(PackStage(cfg_with()), c)

    for other in (b, c):
        files = all_files(other, "stages/tokenize", "shards")
        assert files.keys() == reference.keys() and files == reference
    assert any(k.endswith(".tar") for k in reference)


def test_split_is_by_document_id_and_stable_when_other_documents_change(root: Storage, docs, tmp_path):
    cfg = cfg_with(val_fraction=0.3)
    t = cfg.tokenize
    val_ids = {d["id"] for d in docs if doc_split(d["id"], t.val_fraction, t.split_seed) == "val"}
    assert 0.15 * len(docs) < len(val_ids) < 0.45 * len(docs)
    assert doc_split("x", 0.0, 0) == "train" and doc_split("x", 1.0, 0) == "val"

    def val_docs(storage: Storage) -> set[str]:
        run_stage(TokenizeStage(cfg), storage)
        sp, _, _ = load_tokenizer(storage)
        out = set()
        for i in range(N_SHARDS):
            stream = np.load(io.BytesIO(storage.read_bytes(stream_ref(f"{i:06d}", "val"))))
            ends = np.flatnonzero(stream == sp.eos_id())
            for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends):
                out.add(sp.decode(stream[a + 1 : b].tolist()))
        return out

    sp, _, _ = load_tokenizer(root)
    norm = {d["id"]: sp.decode(sp.encode(d["text"])) for d in docs}
    first = val_docs(root)
    assert first == {norm[i] for i in val_ids}

    # Another corpus: a third of the documents gone, some edited, new ones added (same tokenizer).
    other = Storage(str(tmp_path / "other"))
    shutil.copytree(root.root, tmp_path / "other")
    changed = [d for i, d in enumerate(docs) if i % 3] + [{"id": f"new/{i}", "text": d["text"][::-1]} for i, d in enumerate(docs[:30])]
    changed = [dict(d, text=d["text"].upper()) if i % 7 == 0 else d for i, d in enumerate(changed)]
    make_upstream(other, changed, N_SHARDS)
    second = val_docs(other)
    kept = {d["id"] for d in changed if d["id"] in norm and d["text"] == next(x["text"] for x in docs if x["id"] == d["id"])}
    assert {norm[i] for i in kept} & first == {norm[i] for i in kept} & second
    assert {norm[i] for i in kept & val_ids} <= second


def test_reruns_redo_only_what_changed(root: Storage):
    cfg = cfg_with()
    run_all(root, cfg)
    again = run_all(root, cfg)
    assert again["tokenize"]["ran"] == [] and again["pack"]["ran"] == []
    # seq_len only concerns packing; fewer, larger shards replace the old ones (no leftovers).
    before = set(root.list("shards"))
    res = run_all(root, cfg_with(seq_len=32, samples_per_shard=10_000))
    assert res["tokenize"]["ran"] == [] and res["pack"]["ran"] == ["_all"]
    index = read_index(root)
    names = {s["name"] for sp in index["splits"].values() for s in sp["shards"]}
    assert names == {"train-000000.tar", "val-000000.tar"} and len(before) > len(names) + 1
    assert set(root.list("shards")) == names | {"index.json"}
    # A retrained tokenizer makes every tokenize shard stale.
    run_stage(TokenizerStage(PrepConfig(tokenizer={"vocab_size": 700, "sample_docs": 500})), root)
    res = run_all(root, cfg)
    assert len(res["tokenize"]["ran"]) == N_SHARDS and res["pack"]["ran"] == ["_all"]
    assert read_index(root)["vocab_size"] == 700


def test_pack_refuses_to_run_on_incomplete_tokenize_output(root: Storage):
    cfg = cfg_with()
    run_stage(TokenizeStage(cfg), root)
    root.remove(record_ref("tokenize", "000001"))
    res = run_stage(PackStage(cfg), root)
    assert "tokenize shards not done or out of date: ['000001']" in res["failed"]["_all"]
    assert not root.exists(INDEX_REF) and root.list("shards") == []


def test_failure_mid_pack_publishes_no_partial_file(root: Storage, monkeypatch):
    import shardflow.dataprep.tokenize as tokenize_mod

    cfg = cfg_with(samples_per_shard=20)
    run_all(root, cfg)
    good = all_files(root, "shards")
    last = stream_ref(f"{N_SHARDS - 1:06d}", "train")
    real_read = tokenize_mod.read_stream

    def failing_read(storage, ref, dtype):
        if ref == last:
            raise OSError("connection reset while reading")
        return real_read(storage, ref, dtype)

    monkeypatch.setattr(tokenize_mod, "read_stream", failing_read)
    res = run_stage(PackStage(cfg), root, force=True)  # fails after some train shards were rewritten
    assert "connection reset" in res["failed"]["_all"]
    assert read_record(root, "pack", "_all").status == "failed" and not root.exists(INDEX_REF)
    names = os.listdir(os.path.join(root.root, "shards"))
    assert names and all(n.endswith(".tar") and not n.startswith(".") for n in names)
    for n in names:  # whatever is there is a complete archive
        assert root.read_bytes(f"shards/{n}") == good[f"shards/{n}"]
    monkeypatch.undo()
    assert run_all(root, cfg)["pack"]["ran"] == ["_all"]
    assert all_files(root, "shards") == good

    # A damaged stream no longer matches its manifest: pack refuses it, and a re-run redoes exactly
    # that tokenize shard.
    root.write_bytes(last, b"\x93NUMPY garbage")
    res = run_stage(PackStage(cfg), root, force=True)
    assert f"out of date: ['{N_SHARDS - 1:06d}']" in res["failed"]["_all"]
    res = run_all(root, cfg)
    assert res["tokenize"]["ran"] == [f"{N_SHARDS - 1:06d}"] and res["pack"]["ran"] == ["_all"]
    assert all_files(root, "shards") == good


def test_bos_and_document_boundaries(root: Storage):
    cfg = cfg_with(add_bos=True, write_doc_boundaries=True)
    run_all(root, cfg)
    L = cfg.tokenize.seq_len
    index = read_index(root)
    s = index["splits"]["train"]["shards"][0]
    with tarfile.open(os.path.join(root.root, "shards", s["name"])) as tf:
        for m in s["members"]:
            tokens = np.load(io.BytesIO(tf.extractfile(f"{m['key']}.tokens.npy").read()))
            starts = np.load(io.BytesIO(tf.extractfile(f"{m['key']}.docs.npy").read()))
            bos = {tuple(p) for p in np.argwhere(tokens == 1).tolist()}
            assert {tuple(p) for p in starts.tolist()} == bos  # every document starts with BOS
            assert tokens.shape == (m["rows"], L + 1)
    expected = expected_streams(root, cfg)
    for split in ("train", "val"):
        assert sum(read_record(root, "tokenize", f"{i:06d}").counts[f"tokens.{split}"] for i in range(N_SHARDS)) == len(expected[split])
        assert expected[split][0] == 1


@pytest.mark.s3
def test_pipeline_on_s3(s3_storage: Storage, docs):
    make_upstream(s3_storage, docs[:120], N_SHARDS)
    cfg = cfg_with(seq_len=32)
    assert run_stage(TokenizerStage(cfg), s3_storage)["ran"] == ["_all"]
    run_all(s3_storage, cfg)
    index = read_index(s3_storage)
    stream = np.array(expected_streams(s3_storage, cfg)["train"], np.uint16)
    rows = stream[: stream.size // 33 * 33].reshape(-1, 33)
    r = 0
    for s in index["splits"]["train"]["shards"]:
        assert verify_shard(s3_storage, s) == []
        for m in s["members"]:
            np.testing.assert_array_equal(read_member_rows(s3_storage, s, m, 1, m["rows"], 32, "uint16"), rows[r + 1 : r + m["rows"]])
            r += m["rows"]
    assert r == len(rows)
    assert run_all(s3_storage, cfg)["pack"]["ran"] == []


def test_encoder_without_numpy_output_gives_the_same_tokens(template, docs):
    """sentencepiece before 0.2.1 has no numpy output: the int-list path must agree exactly."""
    from shardflow.dataprep.tokenize import Encoder

    sp, _, _ = load_tokenizer(Storage(str(template)))

    class OldSentencePiece:
        def __getattr__(self, name):
            return getattr(sp, name)

        def encode(self, texts, out_type=int, **kw):
            if out_type == "numpy":
                raise ValueError("unknown return_type=numpy")
            return sp.encode(texts, out_type=out_type, **kw)

    texts = [d["text"] for d in docs[:40]]
    new, old = Encoder(sp, 2, add_bos=True), Encoder(OldSentencePiece(), 2, add_bos=True)
    a, b = new.encode(texts), old.encode(texts)
    assert not old._numpy_out and a.dtype == b.dtype == np.uint16
    np.testing.assert_array_equal(a, b)
    assert a[0] == sp.bos_id() and int(np.count_nonzero(a == sp.eos_id())) == len(texts)

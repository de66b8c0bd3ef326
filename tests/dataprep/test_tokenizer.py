import random
from pathlib import Path

import pytest
import sentencepiece as spm

from shardflow.dataprep.config import PrepConfig, TokenizerConfig
from shardflow.dataprep.stage import ShardFailed, plan, run_shard, run_stage
from shardflow.dataprep.tokenizer import (
    META_REF,
    MODEL_REF,
    VOCAB_REF,
    HashSampler,
    TokenizerStage,
    TokenizerTrainingError,
    sample_key,
    sample_sentences,
    train_model,
    training_args,
)
from shardflow.storage import Storage, digest_bytes
from shardflow.storage.jsonl import write_jsonl
from shardflow.storage.manifest import ShardRecord, ShardState, output_ref, read_record, write_record
from shardflow.storage.tokenizer_files import load_tokenizer

from ..real_text import demo_texts

def real_docs() -> list[dict]:
    """Real English from the shipped demo corpus (~300 KB), a few paragraphs per document."""
    docs = []
    for n, text in enumerate(demo_texts(300_000, every=5)):
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        for i in range(0, len(paras), 4):
            docs.append({"id": f"demo{n:04d}/{i // 4:03d}", "text": "\n\n".join(paras[i : i + 4]), "source": "demo", "meta": {}})
    return docs


def make_upstream(storage: Storage, docs: list[dict], n_shards: int, stage: str = "dedup") -> list[str]:
    """Publish docs as the done shards of an upstream stage (round-robin over shards)."""
    refs = []
    for i in range(n_shards):
        ref = f"stages/{stage}/{i:06d}.jsonl.zst"
        write_jsonl(storage, ref, docs[i::n_shards])
        write_record(storage, ShardRecord(stage=stage, shard_id=f"{i:06d}", status="done", outputs={"docs": output_ref(storage, ref)}))
        refs.append(ref)
    return refs


def small_cfg(**tok) -> PrepConfig:
    return PrepConfig(tokenizer={"vocab_size": 600, "sample_docs": 400, **tok})


@pytest.fixture(scope="module")
def docs():
    d = real_docs()
    assert len(d) > 100 and sum(len(x["text"]) for x in d) > 100_000
    return d


def test_sampler_takes_smallest_keys_within_caps_in_any_order(docs):
    keyed = sorted(((sample_key(d["id"], d["text"], 7), d["text"]) for d in docs))
    for max_docs, max_chars in [(25, 10**9), (10**6, 30_000), (40, 50_000)]:
        results = []
        for order in range(3):
            items = list(keyed)
            random.Random(order).shuffle(items)
            s = HashSampler(max_docs, max_chars)
            for k, t in items:
                s.offer(k, t)
            results.append(s.texts())
        assert results[0] == results[1] == results[2]
        # Brute force: key order, stop at max_docs or once the budget is reached, last doc cut.
        expected, budget = [], max_chars
        for _, t in keyed[:max_docs]:
            expected.append(t[:budget])
            budget -= len(t)
            if budget <= 0:
                break
        assert results[0] == expected
        assert sum(map(len, results[0])) <= max_chars and len(results[0]) <= max_docs


def test_long_lines_are_cut_for_sentencepiece():
    line = " ".join(["Überprüfung"] * 400)  # multi-byte characters, ~5 KB
    pieces = sample_sentences([line + "\n\nshort line\n   \n"], 1000)
    assert pieces[-1] == "short line"
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert " ".join(pieces[:-1]).split() == line.split()


def test_training_is_deterministic_across_runs_threads_and_sharding(tmp_path, docs):
    blobs = []
    for n, (shards, threads) in enumerate([(2, 1), (3, 2), (2, 2)]):
        storage = Storage(str(tmp_path / f"r{n}"))
        make_upstream(storage, docs, shards)
        res = run_stage(TokenizerStage(small_cfg(num_threads=threads)), storage)
        assert res["ran"] == ["_all"], res
        blobs.append([storage.read_bytes(r) for r in (MODEL_REF, VOCAB_REF, META_REF)])
    assert blobs[0] == blobs[1] == blobs[2]


def test_tokenizer_outputs_meta_and_manifest(local_storage, docs):
    make_upstream(local_storage, docs, 2)
    cfg = small_cfg(sample_docs=60)
    run_stage(TokenizerStage(cfg), local_storage)
    sp, meta, digest = load_tokenizer(local_storage)
    assert digest == digest_bytes(local_storage.read_bytes(MODEL_REF)) == meta["model_digest"]
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["unk_id"]) == (600, 1, 2, 3, 0)
    assert sp.get_piece_size() == 600 and sp.eos_id() == 2 and sp.id_to_piece(2) == "</s>"
    assert meta["sample_docs"] == 60 and meta["sentencepiece_version"] == spm.__version__
    text = "Permission is hereby granted, free of charge, to any person obtaining a copy"
    assert sp.decode(sp.encode(text)) == text
    vocab = local_storage.read_text(VOCAB_REF).splitlines()
    assert len(vocab) == 600 and vocab[2].split("\t")[0] == "</s>"
    rec = read_record(local_storage, "tokenizer", "_all")
    assert rec.status == "done" and set(rec.outputs) == {"model", "vocab", "meta"}
    assert rec.counts["docs_in"] == len(docs) and rec.counts["sample_docs"] == 60
    assert len(rec.inputs) == 2  # every upstream shard's docs, with its digest


def test_rerun_skips_and_changed_upstream_makes_it_stale(local_storage, docs):
    make_upstream(local_storage, docs, 2)
    stage = TokenizerStage(small_cfg())
    assert run_stage(stage, local_storage)["ran"] == ["_all"]
    assert run_stage(stage, local_storage)["skipped"] == ["_all"]
    make_upstream(local_storage, docs[:-5], 2)
    # Trained once: changed documents leave it as it is (an append must not re-tokenize everything) ...
    assert [p.state for p in plan(stage, local_storage)] == [ShardState.DONE]
    # ... unless asked to follow the data, or forced.
    retrain = TokenizerStage(small_cfg(retrain_on_new_data=True))
    assert retrain.config_digest() == stage.config_digest()
    assert [p.state for p in plan(retrain, local_storage)] == [ShardState.STALE]
    assert run_stage(stage, local_storage, force=True)["ran"] == ["_all"]
    assert [p.state for p in plan(retrain, local_storage)] == [ShardState.DONE]  # pinned to what it trained on now
    assert TokenizerStage(small_cfg(num_threads=1)).config_digest() == stage.config_digest()
    assert TokenizerStage(small_cfg(vocab_size=700)).config_digest() != stage.config_digest()


def test_vocabulary_too_large_for_the_sample_is_a_clear_error(local_storage, docs):
    make_upstream(local_storage, docs[:3], 1)
    stage = TokenizerStage(small_cfg(vocab_size=30000))
    spec = stage.shards(local_storage)[0]
    with pytest.raises(ShardFailed) as info:
        run_shard(stage, local_storage, spec)
    assert isinstance(info.value.cause, TokenizerTrainingError)
    msg = str(info.value)
    assert "vocab_size=30000" in msg and "too small" in msg and "Vocabulary size too high" in msg
    assert not local_storage.exists(MODEL_REF)
    assert read_record(local_storage, "tokenizer", "_all").status == "failed"


def test_unigram_trains_single_threaded_and_reproducibly(docs):
    cfg = TokenizerConfig(model_type="unigram", vocab_size=400, num_threads=2)
    assert training_args(cfg)["num_threads"] == 1
    assert training_args(TokenizerConfig(num_threads=2))["num_threads"] == 2
    sentences = sample_sentences([d["text"] for d in docs[:60]], 4096)
    a, b = train_model(sentences, cfg), train_model(sentences, cfg)
    assert a == b
    assert spm.SentencePieceProcessor(model_proto=a).get_piece_size() == 400


def test_malformed_upstream_record_names_file_and_line(local_storage, docs):
    make_upstream(local_storage, docs, 1)
    ref = "stages/dedup/000000.jsonl.zst"
    write_jsonl(local_storage, ref, [docs[0], {"id": "x", "body": "no text field"}])
    write_record(local_storage, ShardRecord(stage="dedup", shard_id="000000", status="done", outputs={"docs": output_ref(local_storage, ref)}))
    res = run_stage(TokenizerStage(small_cfg()), local_storage)
    assert "000000.jsonl.zst: line 2" in res["failed"]["_all"]

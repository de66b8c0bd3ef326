"""Evaluation end to end on a real (tiny) run: real text, a sentencepiece model trained here, shards
from the real tokenize/pack stages, a checkpoint from the real trainer.

``build_eval_root`` is shared with test_export.py and test_lm_eval.py (built once per session).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stage import run_stage
from shardflow.dataprep.tokenize import tokenize_stages
from shardflow.dataprep.tokenizer import TokenizerStage
from shardflow.storage import Storage
from shardflow.storage.doc_split import doc_split
from shardflow.storage.jsonl import JsonlWriter
from shardflow.storage.manifest import ShardRecord, output_ref, write_record
from shardflow.storage.shards import read_index, read_member_rows
from shardflow.storage.tokenizer_files import load_tokenizer
from shardflow.train import tasks as T
from shardflow.train.config import EvalConfig, TrainConfig
from shardflow.train.evaluate import (
    EvaluationError,
    ExpertStats,
    held_out_documents,
    load_model,
    run_evaluation,
    split_settings,
)
from shardflow.train.model import MoETransformer

from ..real_text import demo_records, package_of

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

RUN = "evalrun"
DEMO_PACKAGES = {"jargon-text", "postgresql-doc-15", "python3.11-doc", "sqlite3-doc"}
SEQ_LEN = 48
VAL_FRACTION = 0.25
SPLIT_SEED = 7


# -- the shared fixture: a dataset root with shards, tokenizer and a trained checkpoint ---------------

def real_documents(max_docs: int = 700) -> list[dict]:
    """Paragraph documents of real text from the shipped demo corpus, dealt round-robin from its four
    packages (their names are the documents' sources), deduplicated like the corpus upstream."""
    by_package: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for rec in demo_records():
        package = package_of(rec)
        for i, para in enumerate(re.split(r"\n\s*\n", rec["text"])):
            para = " ".join(para.split())
            if len(para.split()) >= 25 and para not in seen:
                seen.add(para)
                by_package.setdefault(package, []).append(
                    {"id": f"{rec.get('id', package)}:{i}", "text": para, "source": package, "meta": {}})
    lists = [by_package[p] for p in sorted(by_package)]
    out = [d for group in itertools.zip_longest(*lists) for d in group if d is not None]
    return out[:max_docs]


def write_dedup_stage(storage: Storage, docs: list[dict], shards: int = 2) -> None:
    """Documents as the dedup stage publishes them: per-shard JSONL + a done manifest record."""
    for s in range(shards):
        ref = f"stages/dedup/{s:06d}.jsonl.zst"
        with JsonlWriter(storage, ref) as w:
            w.write_many(docs[s::shards])
        write_record(storage, ShardRecord(stage="dedup", shard_id=f"{s:06d}", status="done",
                                          outputs={"docs": output_ref(storage, ref)}))


def prep_config() -> PrepConfig:
    return PrepConfig.model_validate({
        "tokenizer": {"vocab_size": 600, "sample_docs": 5000, "num_threads": 1},
        "tokenize": {"seq_len": SEQ_LEN, "val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED,
                     "samples_per_shard": 200, "rows_per_member": 32, "num_threads": 1},
    })


def train_config(vocab_size: int, **model) -> TrainConfig:
    return TrainConfig.model_validate({
        "run": RUN,
        "model": {"vocab_size": vocab_size, "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4,
                  "top_k": 2, "expert_hidden": 64, "max_seq_len": 64, "rope_theta": 10000.0, **model},
        "data": {"batch_size": 8, "num_workers": 0, "pin_memory": False},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "trainer": {"steps": 8, "eval_every": 4, "eval_batches": 2, "device": "cpu", "progress": False, "log_every": 4},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
    })


def write_pipeline_yaml(storage: Storage, prep: PrepConfig) -> None:
    """What flows.config.write_resolved publishes (only the sections evaluation reads)."""
    import yaml

    storage.write_text("pipeline.yaml", yaml.safe_dump({"digest": "test", "config": {"prep": prep.model_dump(mode="json")}}))


_CACHE: dict[str, str] = {}


def build_eval_root(base_dir: str) -> str:
    """Build (once per session) a dataset root with a trained run; returns its path. Copy before mutating."""
    if "root" in _CACHE:
        return _CACHE["root"]
    from shardflow.train.trainer import train

    root = os.path.join(base_dir, "evalroot")
    storage = Storage(root)
    prep = prep_config()
    write_dedup_stage(storage, real_documents())
    write_pipeline_yaml(storage, prep)
    for stage in [TokenizerStage(prep), *tokenize_stages(prep)]:
        res = run_stage(stage, storage)
        assert not res["failed"], res
    index = read_index(storage)
    train(train_config(index["vocab_size"]), storage)
    _CACHE["root"] = root
    return root


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory) -> str:
    return build_eval_root(str(tmp_path_factory.mktemp("eval")))


@pytest.fixture
def root_copy(eval_root, tmp_path) -> Storage:
    dst = tmp_path / "root"
    shutil.copytree(eval_root, dst)
    return Storage(str(dst))


def small_eval(**kw) -> EvalConfig:
    base = dict(max_val_batches=4, batch_size=8, held_out_docs=120, max_source_batches=2, cloze_examples=24,
                mc_examples=12, mc_continuation_words=5, cloze_min_context_words=8, device="cpu")
    return EvalConfig(**(base | kw))


def tcfg(storage: Storage) -> TrainConfig:
    return train_config(read_index(storage)["vocab_size"])


# -- the whole evaluation ---------------------------------------------------------------------------

def test_run_evaluation_writes_results_report_and_plots(root_copy):
    storage = root_copy
    out = run_evaluation(tcfg(storage), small_eval(), storage)
    res = out["results"]
    assert set(out) == {"results", "report_md", "tables", "files"}
    assert res["checkpoint"]["step"] == 8 and res["checkpoint"]["uri"].endswith("checkpoints/step-8")
    ev = f"runs/{RUN}/eval"
    for name in ("results.json", "report.md", "loss.png", "lr.png", "expert_load.png", "tasks/heldout_continuation.jsonl"):
        assert storage.exists(f"{ev}/{name}"), name
        assert f"{ev}/{name}" in out["files"]
    for name in ("loss.png", "lr.png", "expert_load.png"):
        assert storage.read_bytes(f"{ev}/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = storage.read_json(f"{ev}/results.json")  # strict JSON: json.loads would accept NaN, check none
    assert "NaN" not in storage.read_text(f"{ev}/results.json")
    assert on_disk["metrics"] == res["metrics"] and on_disk["model_config_digest"] == res["model_config_digest"]
    # A tiny model after 8 steps: better than uniform over the vocabulary, far from perfect.
    vocab = tcfg(storage).model.vocab_size
    assert 1.0 < res["val"]["ppl"] < vocab
    assert res["val"]["tokens"] == res["val"]["sequences"] * SEQ_LEN
    assert set(res["per_source"]) == DEMO_PACKAGES
    assert all(m["tokens"] > 0 and 1.0 < m["ppl"] < vocab for m in res["per_source"].values())
    assert res["cloze"]["n"] == 24 and 0.0 <= res["cloze"]["acc"] <= 1.0 and res["cloze"]["mean_logprob"] < 0
    task = res["tasks"]["heldout_continuation"]
    assert task["n"] == 12 and task["chance"] == pytest.approx(0.25)
    ex = res["experts"]
    assert ex["layers"] == [0, 1] and len(ex["tokens_per_expert"]) == 2 and len(ex["tokens_per_expert"][0]) == 4
    # Dropless, top-2: every token goes to exactly two experts in each layer.
    assert all(sum(row) == 2 * res["val"]["tokens"] for row in ex["tokens_per_expert"])
    assert ex["dropped_fraction"] == 0.0
    assert all(0.0 <= e <= math.log(4) + 1e-9 for e in ex["router_entropy"])
    md = out["report_md"]
    for fragment in ("## Held-out perplexity", "## Downstream tasks", "## Expert statistics", "](loss.png)",
                     "](lr.png)", "](expert_load.png)", "jargon-text", "heldout_continuation", "no previous evaluation"):
        assert fragment in md, fragment
    assert storage.read_text(f"{ev}/report.md") == md
    assert {"summary", "per_source", "tasks", "experts"} <= set(out["tables"])
    assert all(isinstance(r, dict) for rows in out["tables"].values() for r in rows)


def test_second_evaluation_shows_deltas_against_the_previous(root_copy):
    storage = root_copy
    cfg = tcfg(storage)
    first = run_evaluation(cfg, small_eval(), storage, checkpoint=f"runs/{RUN}/checkpoints/step-4")["results"]
    assert first["checkpoint"]["step"] == 4 and first["deltas"] == {}
    second = run_evaluation(cfg, small_eval(), storage)["results"]
    assert second["previous"]["checkpoint_step"] == 4
    assert second["deltas"]["val.loss"] == pytest.approx(second["metrics"]["val.loss"] - first["metrics"]["val.loss"])
    assert second["val"]["loss"] < first["val"]["loss"]  # step 8 has trained on more tokens than step 4
    md = storage.read_text(f"runs/{RUN}/eval/report.md")
    assert "checkpoint step 4" in md and "| delta |" in md


def test_perplexity_equals_exp_of_mean_token_nll_on_the_same_batches(root_copy):
    storage = root_copy
    cfg = tcfg(storage)
    res = run_evaluation(cfg, small_eval(max_val_batches=3, cloze_examples=0, mc_examples=0, max_source_batches=0), storage)["results"]
    # Independently: the first 3 x 8 val rows in index order, the model's own mean CE per batch.
    index = read_index(storage)
    rows = []
    for shard in index["splits"]["val"]["shards"]:
        for m in shard["members"]:
            rows.append(read_member_rows(storage, shard, m, 0, m["rows"], index["seq_len"], index["dtype"]))
    rows = np.concatenate(rows)[:24].astype(np.int64)
    model, _ = load_model(cfg, storage, None, torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(rows), 8):
            t = torch.from_numpy(rows[b:b + 8])
            out = model(t[:, :-1], t[:, 1:])
            total += float(out.loss) * t[:, 1:].numel()
            count += t[:, 1:].numel()
    assert res["val"]["tokens"] == count == 24 * SEQ_LEN
    assert res["val"]["loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["val"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


# -- held-out documents and the split rule ------------------------------------------------------------

def test_held_out_documents_are_exactly_the_val_split_of_the_tokenize_stage(eval_root):
    storage = Storage(eval_root)
    settings = split_settings(storage, EvalConfig())
    assert (settings["val_fraction"], settings["split_seed"]) == (VAL_FRACTION, SPLIT_SEED)  # from pipeline.yaml
    docs = held_out_documents(storage, settings, limit=10_000, seed=0)
    all_docs = real_documents()
    expected = sorted(d["id"] for d in all_docs if doc_split(d["id"], VAL_FRACTION, SPLIT_SEED) == "val")
    assert [d[0] for d in docs] == expected
    # The packed val stream holds exactly these documents (EOS-separated, in shard order).
    counts = json.loads(storage.read_text("stages/pack/_manifest/_all.json"))["counts"]
    assert counts["docs.val"] == len(expected)
    # Explicit settings override pipeline.yaml; a bound caps the read.
    assert split_settings(storage, EvalConfig(val_fraction=0.5, split_seed=1))["val_fraction"] == 0.5
    assert len(held_out_documents(storage, settings, limit=10, seed=0)) == 10


# -- task formats ---------------------------------------------------------------------------------------

class _Toy:
    """Logits that put all mass on ``favourite`` after any token: a model with a known answer."""

    def __init__(self, vocab: int, favourite: int):
        self.vocab, self.favourite = vocab, favourite

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., self.favourite] = 5.0
        return logits


def _char_encode(text: str) -> list[int]:
    return [ord(c) % 97 + 3 for c in text]


def test_multiple_choice_picks_the_choice_with_the_highest_log_prob():
    fav = _char_encode("z")[0]
    ex = T.MCExample("x", "context", ("ab", "zzzz", "q"), label=1)
    metrics, rows = T.evaluate_mc([ex], _Toy(100, fav), _char_encode, [0], batch_size=2, max_len=32)
    # " zzzz": the space costs the same for every choice, each z is the favourite: highest summed log-prob
    assert rows[0]["pred"] == 1 and metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0
    assert rows[0]["logprobs"][1] == max(rows[0]["logprobs"])


def test_multiple_choice_scores_equal_model_log_probs(eval_root):
    """On the real model: each choice's score is the sum of log p(token | prefix) computed directly."""
    storage = Storage(eval_root)
    cfg = tcfg(storage)
    model, _ = load_model(cfg, storage, None, torch.device("cpu"))
    sp, _meta, _ = load_tokenizer(storage)
    enc = lambda s: sp.encode(s, out_type=int)  # noqa: E731
    ex = T.MCExample("1", "This program is free software; you can redistribute it",
                     ("and/or modify it under the terms", "banana telescope purple", "of the GNU"), 0)
    eos = read_index(storage)["eos_id"]
    metrics, rows = T.evaluate_mc([ex], lambda x: model(x).logits, enc, [eos], batch_size=2, max_len=64)
    direct = []
    for choice in ex.choices:
        ctx, cont = T.split_continuation(enc, ex.context, " " + choice)
        ids = torch.tensor([[eos] + ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
        n = len(cont)
        direct.append(float(lp[-n:].gather(1, torch.tensor(cont)[:, None]).sum()))
    assert rows[0]["logprobs"] == pytest.approx(direct, abs=1e-4)
    assert rows[0]["pred"] == int(np.argmax(direct))
    assert metrics["n"] == 1


def test_split_continuation_moves_trailing_space_and_matches_whole_encoding(eval_root):
    sp, _, _ = load_tokenizer(Storage(eval_root))
    enc = lambda s: sp.encode(s, out_type=int)  # noqa: E731
    ctx, cont = T.split_continuation(enc, "the terms of the ", "License")
    assert ctx + cont == enc("the terms of the License") and ctx == enc("the terms of the")


def test_cloze_is_deterministic_and_targets_are_the_next_word():
    docs = [(f"d{i}", " ".join(f"w{i}x{j}" for j in range(40)), "s") for i in range(5)]
    a = T.build_cloze(docs, 10, seed=3, min_context_words=8)
    assert a == T.build_cloze(list(reversed(docs)), 10, seed=3, min_context_words=8)
    assert a != T.build_cloze(docs, 10, seed=4, min_context_words=8)
    for ex in a:
        doc = dict((d[0], d[1]) for d in docs)[ex.id.split("#")[0]]
        k = int(ex.id.split("#")[1])
        assert ex.context + ex.target == " ".join(doc.split()[: k + 1])
        assert ex.target == " " + doc.split()[k] and len(ex.context.split()) == k >= 8


def test_cloze_accuracy_is_greedy_match_of_every_target_token():
    fav = _char_encode("z")[0]
    exs = [T.ClozeExample("a", "ctx", " zz"), T.ClozeExample("b", "ctx", " zq")]
    metrics, rows = T.evaluate_cloze(exs, _Toy(100, fav), _char_encode, [0], 4, 32)
    # the space is never the favourite: neither target is fully greedy; without the space "zz" is
    assert metrics["acc"] == 0.0
    metrics, rows = T.evaluate_cloze([T.ClozeExample("a", "ctx ", "zz"), T.ClozeExample("b", "ctx ", "zq")],
                                     lambda x: _Toy(100, fav)(x), lambda s: _char_encode(s.replace(" ", "")), [0], 4, 32)
    assert [r["correct"] for r in rows] == [True, False] and metrics["acc"] == 0.5


def test_score_requests_truncates_long_contexts_on_the_left():
    seen = []

    def forward(x):
        seen.append(x.clone())
        return torch.zeros(*x.shape, 10)

    out = T.score_requests(forward, [(list(range(1, 9)) * 4, [5, 6])], batch_size=1, max_len=8)
    assert seen[0].shape == (1, 8) and out[0].n_tokens == 2
    assert out[0].logprob == pytest.approx(2 * math.log(1 / 10))
    with pytest.raises(ValueError, match="empty context"):
        T.score_requests(forward, [([], [1])], 1, 8)


def test_task_file_errors_name_file_and_line(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_text("t.jsonl", '{"context": "a", "choices": ["x", "y"], "label": 1}\n{"context": "b", "choices": ["x"], "label": 0}\n')
    with pytest.raises(T.TaskFormatError, match=r"t\.jsonl: line 2: 'choices'"):
        T.load_mc_task(storage, "t.jsonl")
    storage.write_text("u.jsonl", '{"context": "a", "choices": ["x", "y"], "label": 2}\n')
    with pytest.raises(T.TaskFormatError, match=r"u\.jsonl: line 1: 'label'"):
        T.load_mc_task(storage, "u.jsonl")
    storage.write_text("v.jsonl", "{not json\n")
    with pytest.raises(T.TaskFormatError, match=r"v\.jsonl: line 1: invalid JSON"):
        T.load_mc_task(storage, "v.jsonl")
    with pytest.raises(T.TaskFormatError, match="not found"):
        T.load_mc_task(storage, "missing.jsonl")
    storage.write_text("ok.jsonl", '{"context": "a", "choices": ["x", "y"], "label": 1, "id": "q1"}\n')
    assert T.load_mc_task(storage, "ok.jsonl") == [T.MCExample("q1", "a", ("x", "y"), 1)]


def test_continuation_task_is_deterministic_with_the_true_span_at_the_label():
    docs = [(f"d{i}", " ".join(f"t{i}w{j}" for j in range(60)), "s") for i in range(8)]
    a = T.build_continuation_task(docs, 6, seed=1, n_choices=4, context_words=10, continuation_words=5)
    assert a == T.build_continuation_task(docs, 6, seed=1, n_choices=4, context_words=10, continuation_words=5)
    assert len(a) == 6 and len({ex.label for ex in a}) > 1
    for ex in a:
        doc_id = ex.id.split("@")[0]
        true = ex.choices[ex.label]
        assert all(w.startswith(f"t{doc_id[1:]}w") for w in (ex.context + " " + true).split())
        assert (ex.context + " " + true) in dict((d[0], d[1]) for d in docs)[doc_id]
        assert all(not c.startswith(f"t{doc_id[1:]}w") for i, c in enumerate(ex.choices) if i != ex.label)


def test_user_task_files_are_evaluated_by_name(root_copy):
    storage = root_copy
    T.write_mc_task(storage, "mytasks/easy.jsonl", [T.MCExample("a", "The GNU General Public", ("License", "xq zzv"), 0)])
    res = run_evaluation(tcfg(storage), small_eval(tasks=["mytasks/easy.jsonl"], mc_examples=0, cloze_examples=0), storage)["results"]
    assert set(res["tasks"]) == {"easy"} and res["tasks"]["easy"]["n"] == 1
    assert "task.easy.acc" in res["metrics"]


# -- expert statistics ----------------------------------------------------------------------------------

def test_expert_stats_match_router_outputs_computed_directly():
    torch.manual_seed(0)
    cfg = train_config(50).model
    model = MoETransformer(cfg).eval()
    stats = ExpertStats(model)
    x = torch.randint(0, 50, (2, 16))
    stats.enabled = True
    with torch.no_grad():
        out = model(x)
    stats.add_output(out.expert_counts, out.dropped_tokens)
    stats.close()
    s = stats.summary()
    # Router probabilities recomputed by hand for layer 0: its input is ffn_norm(h + attn(attn_norm(h))).
    with torch.no_grad():
        b = model.blocks[0]
        h = model.embed(x)
        h = h + b.attn(b.attn_norm(h), model.rope_cos[:16], model.rope_sin[:16])
        p = b.ffn.router(b.ffn_norm(h).reshape(-1, cfg.dim)).probs.double()
    ent = float(-(p * p.log()).sum(-1).mean())
    assert s["router_entropy"][0] == pytest.approx(ent, rel=1e-6)
    counts = out.expert_counts.double()
    assert s["cv"] == pytest.approx((counts.std(1, unbiased=False) / counts.mean(1)).tolist())
    assert s["tokens_per_expert"] == out.expert_counts.tolist()
    assert not model.blocks[0].ffn.router._forward_hooks  # hooks removed


def test_capacity_dispatch_reports_dropped_tokens(root_copy):
    storage = root_copy
    cfg = tcfg(storage)
    model = MoETransformer(cfg.model.model_copy(update={"router": cfg.model.router.model_copy(update={"dispatch": "capacity", "capacity_factor": 0.5})}))
    stats = ExpertStats(model)
    stats.enabled = True
    with torch.no_grad():
        out = model(torch.randint(0, cfg.model.vocab_size, (4, 32)))
    stats.add_output(out.expert_counts, out.dropped_tokens)
    s = stats.summary()
    assert s["dropped_slots"] > 0 and s["dropped_fraction"] == pytest.approx(s["dropped_slots"] / (128 * 2 * 2))


# -- errors ------------------------------------------------------------------------------------------------

def test_bad_checkpoint_uri_is_a_clear_error(root_copy):
    from shardflow.train.checkpoint import CheckpointError

    storage = root_copy
    with pytest.raises(CheckpointError, match=r"step-999"):
        run_evaluation(tcfg(storage), small_eval(), storage, checkpoint=f"runs/{RUN}/checkpoints/step-999")
    with pytest.raises(CheckpointError, match=r"nowhere"):
        run_evaluation(tcfg(storage), small_eval(), storage, checkpoint="runs/nowhere/checkpoints")


def test_checkpoint_of_another_model_config_is_a_clear_error(root_copy):
    from shardflow.train.checkpoint import CheckpointError

    storage = root_copy
    other = train_config(read_index(storage)["vocab_size"], dim=64)
    with pytest.raises(CheckpointError, match=r"step-8.*different model config.*dim: checkpoint 48 vs config 64"):
        run_evaluation(other, small_eval(), storage)


def test_checkpoint_trained_with_another_tokenizer_is_refused(root_copy):
    storage = root_copy
    ref = f"runs/{RUN}/checkpoints/step-8/meta.json"
    meta = storage.read_json(ref)
    meta["data"]["tokenizer_digest"] = "sha256:" + "0" * 64
    storage.write_json(ref, meta)
    with pytest.raises(EvaluationError, match=r"step-8 was trained on shards of tokenizer sha256:0000"):
        run_evaluation(tcfg(storage), small_eval(), storage)
    from shardflow.train.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="trained on shards of tokenizer"):
        export_checkpoint(tcfg(storage), storage, out_dir=storage.uri("x"))
    assert not storage.exists("x")


def test_missing_validation_split_is_a_clear_error(root_copy):
    storage = root_copy
    index = storage.read_json("shards/index.json")
    index["splits"]["val"] = {"shards": [], "samples": 0, "tokens": 0}
    from shardflow.storage.shards import write_index

    write_index(storage, index)
    with pytest.raises(EvaluationError, match="no validation rows"):
        run_evaluation(tcfg(storage), small_eval(), storage)


# -- object storage ------------------------------------------------------------------------------------------

@pytest.mark.s3
def test_evaluation_on_an_s3_root(eval_root, s3_storage):
    """Checkpoint, shards, documents and tokenizer read from S3; results and report written there."""
    fs, path = s3_storage.resolve("")
    fs.put(eval_root.rstrip("/") + "/", path, recursive=True)
    out = run_evaluation(tcfg(s3_storage), small_eval(max_val_batches=2, cloze_examples=8, mc_examples=4), s3_storage)
    res = out["results"]
    assert res["checkpoint"]["uri"].startswith("s3://") and res["checkpoint"]["step"] == 8
    assert s3_storage.read_json(f"runs/{RUN}/eval/results.json")["metrics"] == res["metrics"]
    assert s3_storage.read_bytes(f"runs/{RUN}/eval/expert_load.png")[:4] == b"\x89PNG"
    assert set(res["per_source"]) == DEMO_PACKAGES
    assert not s3_storage.exists(f"runs/{RUN}/eval/tasks/heldout_continuation.yaml")  # lm-eval reads local files only

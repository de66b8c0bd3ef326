"""Shard-level reprocessing through the real Prefect flows (real API server, real file I/O).

Every assertion on "what ran" reads the task runs of the flow run back from the Prefect API: one
task run per shard that needed work, none for shards the manifests say are done.
"""
from __future__ import annotations

import json
import os

import pytest

from shardflow.dataprep.stages import is_transient
from shardflow.flows.prep_flows import run_prep
from shardflow.flows.status import collect_status
from shardflow.storage import Storage, StorageError
from shardflow.storage.manifest import read_record

from .conftest import FACTORY, ran_shards, sid, toy_config, write_corpus

pytestmark = pytest.mark.usefixtures("prefect_server")


def prep(cfg, **kw):
    return run_prep(cfg, stage_factory=FACTORY, **kw)


def outputs(root) -> dict[str, bytes]:
    """Every stage output and manifest-free file under the root, by relative path."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if "_manifest" in rel or rel in ("pipeline.yaml", "_lock.json"):
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[rel] = fh.read()
    return out


def states(cfg) -> dict[str, dict[str, int]]:
    return {r["stage"]: {k: r[k] for k in ("done", "pending", "stale", "failed", "corrupt")}
            for r in collect_status(cfg, FACTORY)["stages"]}


@pytest.fixture
def done_root(tmp_path, corpus):
    """A root where the three toy stages have run once, completely."""
    cfg = toy_config(tmp_path / "root", corpus)
    first = prep(cfg)
    assert first["ok"], first
    assert ran_shards(first["flow_run_id"], 7) == ["merge-_all", f"upper-{sid(corpus, 0)}", f"upper-{sid(corpus, 1)}", f"upper-{sid(corpus, 2)}",
                                                   f"words-{sid(corpus, 0)}", f"words-{sid(corpus, 1)}", f"words-{sid(corpus, 2)}"]
    return cfg


def test_rerun_of_a_done_root_runs_nothing(done_root):
    again = prep(done_root)
    assert again["ok"]
    assert ran_shards(again["flow_run_id"]) == []
    assert [s["skipped"] for s in again["stages"]] == [3, 3, 1]


def test_the_flow_keeps_each_stage_index_current_so_a_plan_reads_one_object_per_stage(done_root, monkeypatch):
    """Issue 14: the lock holder rewrites a stage's record index after the stage, so the next plan
    (preplan, what `shardflow prep` does first) reads one index per stage and no record file."""
    from shardflow.flows.preplan import preplan
    from shardflow.storage import Storage

    storage = done_root.storage_handle()
    for stage in ("upper", "words", "merge"):
        assert storage.exists(f"stages/{stage}/_manifest/_index.json.zst"), stage
    reads = []
    for name in ("read_bytes", "read_many"):
        orig = getattr(Storage, name)
        monkeypatch.setattr(Storage, name, lambda s, ref, _o=orig: reads.append(ref) or _o(s, ref))
    pre = preplan(done_root, stage_factory=FACTORY)
    assert pre.nothing_to_do
    manifest_reads = [str(r) for r in reads if "_manifest" in str(r)]
    assert sorted(manifest_reads) == [f"stages/{s}/_manifest/_index.json.zst" for s in ("merge", "upper", "words")]


def test_deleted_output_redoes_exactly_that_shard(done_root, corpus):
    before = outputs(done_root.storage.root)
    os.remove(os.path.join(done_root.storage.root, f"stages/upper/{sid(corpus, 1)}.jsonl.zst"))
    assert states(done_root)["upper"]["corrupt"] == 1
    out = prep(done_root)
    # Redone with the same bytes: nothing downstream is stale.
    assert ran_shards(out["flow_run_id"], 1) == [f"upper-{sid(corpus, 1)}"]
    assert outputs(done_root.storage.root) == before


def test_corrupted_output_redoes_exactly_that_shard(done_root, corpus):
    path = os.path.join(done_root.storage.root, f"stages/words/{sid(corpus, 2)}.jsonl.zst")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
    open(path, "wb").write(bytes(data))
    assert states(done_root)["words"]["corrupt"] == 1  # the rewrite changed its mtime: re-hashed …
    from shardflow.flows.status import verify

    assert any(f"words shard {sid(corpus, 2)}" in p for p in verify(done_root, FACTORY))  # … as verify does
    out = prep(done_root)
    assert ran_shards(out["flow_run_id"], 1) == [f"words-{sid(corpus, 2)}"]
    assert verify(done_root, FACTORY) == []


def test_changed_input_redoes_its_shard_and_what_depends_on_it(done_root, corpus):
    with open(corpus / "part-0.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": "A document added to the first input file later on."}) + "\n")
    out = prep(done_root)
    assert ran_shards(out["flow_run_id"], 3) == ["merge-_all", f"upper-{sid(corpus, 0)}", f"words-{sid(corpus, 0)}"]


def test_changed_stage_config_makes_all_its_shards_stale(done_root, corpus):
    cfg = toy_config(done_root.storage.root, corpus, "prep.tokenize.seq_len=3")  # the words stage's knob
    st = states(cfg)
    assert st["upper"]["done"] == 3 and st["words"]["stale"] == 3
    out = prep(cfg)
    assert ran_shards(out["flow_run_id"], 4) == ["merge-_all", f"words-{sid(corpus, 0)}", f"words-{sid(corpus, 1)}", f"words-{sid(corpus, 2)}"]
    assert states(cfg)["words"]["done"] == 3


def test_shards_and_force_redo_exactly_the_named_shards(done_root, corpus):
    out = prep(done_root, shards=[f"{sid(corpus, 1)}"])
    # Redone in every stage that has it; the result is unchanged, so merge stays done.
    assert ran_shards(out["flow_run_id"], 2) == [f"upper-{sid(corpus, 1)}", f"words-{sid(corpus, 1)}"]
    out = prep(done_root, stage="upper", force=True)
    assert ran_shards(out["flow_run_id"], 3) == [f"upper-{sid(corpus, 0)}", f"upper-{sid(corpus, 1)}", f"upper-{sid(corpus, 2)}"]
    bad = prep(done_root, shards=["nosuch-0123456789"])
    assert not bad["ok"] and "nosuch-0123456789" in bad["error"]


def test_failing_shard_fails_the_flow_naming_it_and_the_others_finish(tmp_path):
    inputs = corpus = tmp_path / "in"
    write_corpus(inputs, extra={1: [json.dumps({"id": "bad", "text": "this one is POISON for the stage"})]})
    cfg = toy_config(tmp_path / "root", inputs)
    out = prep(cfg)
    assert not out["ok"]
    assert "stage 'upper'" in out["error"] and f"{sid(corpus, 1)}" in out["error"] and "part-1.jsonl:7" in out["error"]
    storage = Storage(cfg.storage.root)
    assert read_record(storage, "upper", f"{sid(corpus, 1)}").status == "failed"
    assert read_record(storage, "upper", f"{sid(corpus, 0)}").status == "done"
    assert read_record(storage, "upper", f"{sid(corpus, 2)}").status == "done"
    # A data error is not retried, and the downstream stage never started.
    runs = ran_shards(out["flow_run_id"], 3)
    assert runs == [f"upper-{sid(corpus, 0)}", f"upper-{sid(corpus, 1)}", f"upper-{sid(corpus, 2)}"]
    st = states(cfg)["upper"]
    assert st["failed"] == 1 and st["done"] == 2
    # Fix the input: the re-run redoes the failed shard only, then the downstream stages.
    (inputs / "part-1.jsonl").write_text((inputs / "part-1.jsonl").read_text().replace("POISON", "fine"))
    out = prep(cfg)
    assert out["ok"]
    assert ran_shards(out["flow_run_id"], 5) == ["merge-_all", f"upper-{sid(corpus, 1)}", f"words-{sid(corpus, 0)}", f"words-{sid(corpus, 1)}", f"words-{sid(corpus, 2)}"]


def test_transient_storage_error_is_retried(tmp_path, corpus):
    from .conftest import flow_task_runs

    cfg = toy_config(tmp_path / "root", corpus, "flows.retries=2")
    Storage(cfg.storage.root).write_bytes(f"_flaky/{sid(corpus, 2)}", b"1")
    out = prep(cfg, stage="upper")
    assert out["ok"], out
    runs = {r.name: r for r in flow_task_runs(out["flow_run_id"], 3)}
    assert runs[f"upper-{sid(corpus, 2)}"].run_count == 2 and runs[f"upper-{sid(corpus, 2)}"].state.is_completed()
    assert runs[f"upper-{sid(corpus, 0)}"].run_count == 1


def test_retry_policy_separates_transient_from_data_errors():
    import pickle

    from shardflow.dataprep.stage import ShardFailed
    from shardflow.dataprep.stages import ShardTaskError
    from shardflow.storage.jsonl import CorruptInputError

    assert is_transient(ShardFailed("s", "1", ConnectionResetError("reset by peer")))
    assert is_transient(ShardFailed("s", "1", StorageError("cannot read s3://b/k: ClientOSError: timeout")))
    assert is_transient(OSError(5, "Input/output error"))
    assert not is_transient(ShardFailed("s", "1", FileNotFoundError("gone")))
    assert not is_transient(ShardFailed("s", "1", StorageError("cannot read s3://b/k: PermissionError: AccessDenied")))
    assert not is_transient(ShardFailed("s", "1", CorruptInputError("f.jsonl.zst", 3, "truncated zstd stream")))
    assert not is_transient(ValueError("bad document"))
    err = pickle.loads(pickle.dumps(ShardTaskError("ConnectionResetError: reset", True)))
    assert is_transient(err) and str(err) == "ConnectionResetError: reset"


@pytest.mark.parametrize("flavour", ["prefect", "executor"])
def test_process_runner_writes_the_same_bytes_and_reports_failures(tmp_path, corpus, done_root, flavour):
    # A fourth input file whose shard fails: the error crosses the process boundary intact.
    (corpus / "part-3.jsonl").write_text(json.dumps({"id": "p", "text": "POISON pill"}) + "\n")
    cfg = toy_config(tmp_path / "root-processes", corpus, "flows.runner=process", f"flows.process_pool={flavour}")
    out = prep(cfg)
    assert not out["ok"] and f"{sid(corpus, 3)}: ValueError:" in out["error"] and "part-3.jsonl:1" in out["error"]
    assert ran_shards(out["flow_run_id"], 4) == [f"upper-{sid(corpus, 0)}", f"upper-{sid(corpus, 1)}", f"upper-{sid(corpus, 2)}", f"upper-{sid(corpus, 3)}"]
    mine, threads = outputs(cfg.storage.root), outputs(done_root.storage.root)
    upper = sorted(k for k in threads if k.startswith(("stages/upper/", "quarantine/upper/")))
    assert len(upper) == 6 and all(mine[k] == threads[k] for k in upper)


def test_stage_tables_summary_and_progress_are_published(tmp_path, corpus):
    from .conftest import flow_artifacts

    out = prep(toy_config(tmp_path / "root", corpus, "prep.clean.min_chars=25"))
    arts = flow_artifacts(out["flow_run_id"])
    # keys are namespaced by the pipeline's name (default "shardflow"): two pipelines never overwrite each other's
    assert {"shardflow-prep-upper", "shardflow-prep-words", "shardflow-prep-merge", "shardflow-prep-summary",
            "shardflow-prep-upper-progress", "shardflow-prep-status"} <= set(arts)
    assert "| upper | 3 | 3 | 0 | 0 | 0 | 0 | nothing |" in arts["shardflow-prep-status"].data
    rows = arts["shardflow-prep-upper"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [r["shard"] for r in rows] == [f"{sid(corpus, 0)}", f"{sid(corpus, 1)}", f"{sid(corpus, 2)}", "TOTAL (3 shards)"]
    total = rows[-1]
    # 5 docs and one malformed line per file; "Short. (file i, doc 4)" is under 25 characters.
    assert (total["docs_in"], total["docs_out"], total["quarantined"], total["dropped.length"]) == (15, 12, 3, 3)
    assert list(rows[0])[:6] == ["shard", "state", "docs_in", "docs_out", "tokens", "wall_time_s"]  # what matters first
    assert "| upper | 3 | 0 | 0 | 15 | 12 | 3 |" in arts["shardflow-prep-summary"].data
    assert float(arts["shardflow-prep-upper-progress"].data) == 100.0

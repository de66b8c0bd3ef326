"""DCP checkpoints: latest pointer and keep-last-N, refusal of foreign configs and of pickled code,
RNG and metrics-log consistency, and the whole save/resume cycle on the S3 endpoint."""
from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from shardflow.storage import Storage
from shardflow.storage.shards import INDEX_REF, write_index
from shardflow.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    _MetadataUnpickler,
    capture_rng,
    load_model_weights,
    read_meta,
    restore_rng,
)
from shardflow.train.metrics import MetricsLog, read_metrics
from shardflow.train.model import MoETransformer
from shardflow.train.optim import build_optimizer
from shardflow.train.trainer import train

from .test_trainer import (
    STEP_KEYS,
    build_dataset,
    copy_dataset,
    metrics_ref,
    one_thread,  # noqa: F401 — autouse fixture: one intra-op thread here too
    tiny_cfg,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("ckdata") / "root"))
    build_dataset(storage)
    return storage


def test_latest_pointer_keep_last_and_uncommitted_leftovers(data_root: Storage):
    cfg = tiny_cfg("keep", trainer={"steps": 16}, checkpoint={"every_steps": 2, "keep_last": 2})
    train(cfg, data_root, max_steps=12)
    ck = Checkpointer(data_root, "keep", keep_last=2)
    assert ck.latest_step() == 12 and ck.step_dirs() == [10, 12]
    assert data_root.read_text("runs/keep/checkpoints/latest") == "step-12\n"
    files = set(os.listdir(data_root.resolve(ck.step_ref(12))[1]))
    assert {".metadata", "__0_0.distcp", "meta.json", "rng-rank0.json"} <= files
    meta = read_meta(data_root, ck.step_ref(12))
    assert meta["step"] == 12 and meta["world_size"] == 1 and meta["loader"]["position"] == 12 * cfg.data.batch_size

    # A crash after save() and before commit() leaves a complete-looking dir that no pointer names;
    # it is not resumed from, and is replaced when that step is reached again.
    model = MoETransformer(cfg.model)
    ck.save(14, model, build_optimizer(model, cfg.optim, torch.device("cpu")), {"model_config_digest": "x"})
    data_root.write_text(f"{ck.step_ref(14)}/junk", "leftover")
    data_root.write_text(f"{ck.step_ref(20)}/junk", "from an abandoned future")
    assert ck.latest_step() == 12 and ck.step_dirs() == [10, 12, 14, 20]
    summary = train(cfg, data_root)
    assert summary["start_step"] == 12 and summary["step"] == 16
    assert ck.latest_step() == 16 and ck.step_dirs() == [14, 16]
    assert not data_root.exists(f"{ck.step_ref(14)}/junk")
    assert read_meta(data_root, ck.step_ref(14))["model_config_digest"] != "x"
    assert [r["step"] for r in read_metrics(data_root, metrics_ref("keep"))] == list(range(1, 17))


def test_other_model_config_is_refused_by_name(data_root: Storage):
    train(tiny_cfg("shape", trainer={"steps": 2}), data_root)
    other = tiny_cfg("shape", trainer={"steps": 4}, model={"dim": 64, "n_experts": 8})
    with pytest.raises(CheckpointError, match=r"step-2: checkpoint was written for a different model config: "
                                              r"dim: checkpoint 32 vs config 64; head_dim: checkpoint 8 vs config 16; n_experts: checkpoint 4 vs config 8"):
        train(other, data_root)
    with pytest.raises(CheckpointError, match="different model config"):
        load_model_weights(MoETransformer(other.model), data_root, other)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_model_weights(MoETransformer(other.model), data_root, tiny_cfg("never-trained"))
    # the matching config loads, and gets the trained weights
    same = tiny_cfg("shape")
    model = MoETransformer(same.model)
    before = model.embed.weight.clone()
    info = load_model_weights(model, data_root, same)
    assert info["step"] == 2 and info["uri"] == data_root.uri("runs/shape/checkpoints/step-2")
    assert not torch.equal(before, model.embed.weight)


def test_changed_tokenizer_refuses_resume(data_root: Storage, tmp_path):
    storage = Storage(str(tmp_path / "root"))
    copy_dataset(data_root, storage)
    cfg = tiny_cfg("tok", trainer={"steps": 4})
    train(cfg, storage, max_steps=2)
    index = storage.read_json(INDEX_REF)
    index["tokenizer_digest"] = "sha256:" + "1" * 64
    write_index(storage, index)
    with pytest.raises(CheckpointError, match="tokenizer sha256:.*shards now come from tokenizer sha256:1111"):
        train(cfg, storage)


def test_broken_pointer_and_missing_meta_are_errors(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    ck = Checkpointer(storage, "r")
    assert ck.latest_step() is None
    storage.write_text("runs/r/checkpoints/latest", "step-7\n")
    with pytest.raises(CheckpointError, match=r"names step-7 but .*step-7 is not a complete checkpoint"):
        ck.latest_step()
    storage.write_text("runs/r/checkpoints/latest", "garbage")
    with pytest.raises(CheckpointError, match="expected 'step-<n>'"):
        ck.latest_step()
    with pytest.raises(ValueError, match="run name"):
        Checkpointer(storage, "../escape")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_dcp_metadata_is_unpickled_with_an_allowlist(data_root: Storage, tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="not DCP metadata"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(_Exploit()))).load()
    # a module imported by DCP's metadata module is not a metadata class
    with pytest.raises(pickle.UnpicklingError, match=r"metadata\.torch, which is not DCP metadata"):
        _MetadataUnpickler(io.BytesIO(b"ctorch.distributed.checkpoint.metadata\ntorch\n.")).load()
    # A checkpoint whose .metadata was replaced by code is refused at load, naming the checkpoint.
    storage = Storage(str(tmp_path / "root"))
    copy_dataset(data_root, storage)
    cfg = tiny_cfg("evil", trainer={"steps": 4})
    train(cfg, storage, max_steps=2)
    meta_path = storage.resolve("runs/evil/checkpoints/step-2/.metadata")[1]
    with open(meta_path, "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(CheckpointError, match=r"step-2: cannot load checkpoint: rank 0: .*(posix|os)\.system, which is not DCP metadata"):
        train(cfg, storage)


def test_rng_states_round_trip_through_json():
    import json
    import random

    import numpy as np

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    state = json.loads(json.dumps(capture_rng()))
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    restore_rng(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]


def test_metrics_log_is_cut_back_to_the_committed_step(storage: Storage):
    log = MetricsLog(storage, "runs/m/metrics.jsonl")
    log.start(0)
    for s in range(1, 6):
        log.append({"step": s, "loss": float(s)})
    log.flush(durable=True)
    assert [r["step"] for r in read_metrics(storage, "runs/m/metrics.jsonl")] == [1, 2, 3, 4, 5]
    if storage.is_local:  # a crash mid-write leaves a torn last line
        with open(storage.resolve("runs/m/metrics.jsonl")[1], "ab") as f:
            f.write(b'{"step":6,"lo')
    again = MetricsLog(storage, "runs/m/metrics.jsonl")  # the process died; a new one resumes from step 3
    assert again.start(3) == 3
    again.append({"step": 4, "loss": 40.0})
    again.append({"step": 5, "loss": float("nan")})
    again.close()
    recs = read_metrics(storage, "runs/m/metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[3]["loss"] == 40.0 and recs[4]["loss"] == "nan"
    assert MetricsLog(storage, "runs/other/metrics.jsonl", enabled=False).start(3) == 0
    assert not storage.exists("runs/other/metrics.jsonl")


@pytest.mark.s3
def test_save_and_resume_on_s3_match_a_local_run(data_root: Storage, s3_storage: Storage):
    copy_dataset(data_root, s3_storage)
    cfg = tiny_cfg("s3run", trainer={"steps": 6}, checkpoint={"every_steps": 2, "keep_last": 2})
    assert train(cfg, s3_storage, max_steps=3)["step"] == 3
    ck = Checkpointer(s3_storage, "s3run")
    assert ck.latest_step() == 3 and ck.step_dirs() == [2, 3]
    assert s3_storage.list(ck.step_ref(3)) == [".metadata", "__0_0.distcp", "meta.json", "rng-rank0.json"]
    summary = train(cfg, s3_storage)
    assert summary["start_step"] == 3 and summary["checkpoint"].startswith("s3://")
    assert ck.latest_step() == 6 and ck.step_dirs() == [4, 6]

    local = tiny_cfg("s3run-local", trainer={"steps": 6}, checkpoint={"every_steps": 2, "keep_last": 2})
    train(local, data_root)
    a, b = read_metrics(data_root, metrics_ref("s3run-local")), read_metrics(s3_storage, metrics_ref("s3run"))
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in STEP_KEYS:
        assert [r[key] for r in b] == [r[key] for r in a], key
    m_local, m_s3 = MoETransformer(cfg.model), MoETransformer(cfg.model)
    load_model_weights(m_local, data_root, local)
    assert load_model_weights(m_s3, s3_storage, cfg)["uri"].startswith("s3://")
    for (name, p), q in zip(m_local.state_dict().items(), m_s3.state_dict().values()):
        assert torch.equal(p, q), name

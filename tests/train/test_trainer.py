"""The training loop on real shards: it learns, it resumes bit-exactly after SIGKILL, it refuses bad data.

Shards are built from real text (the shipped demo corpus) with a sentencepiece model trained in
the test and written by ``storage.shards.ShardWriter``; batches come from the real streaming loader.
Runs that must be comparable bit for bit are separate processes with one intra-op thread each.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shardflow.storage import Storage, StorageConfig, digest_bytes
from shardflow.storage.shards import INDEX_REF, ShardWriter, make_index, token_dtype, write_index
from shardflow.train.__main__ import ConfigError, load_train_config, torchrun_command, write_launch_config
from shardflow.train.checkpoint import Checkpointer, load_model_weights
from shardflow.train.config import OptimConfig, TrainConfig
from shardflow.train.metrics import read_metrics
from shardflow.train.model import MoETransformer
from shardflow.train.optim import WarmupCosine, build_optimizer, param_groups
from shardflow.train.trainer import TrainingDataError, train

from ..real_text import demo_texts

VOCAB = 384
SEQ = 32
STEP_KEYS = ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens", "expert_tokens", "dropped_tokens")


# -- fixtures shared with test_checkpoint.py and test_distributed.py ----------------------------------

def real_texts() -> list[str]:
    """~400 KB of whole documents of the shipped demo corpus (the same on every machine)."""
    return demo_texts(400_000, every=7)


def build_dataset(storage: Storage, vocab: int = VOCAB, seq_len: int = SEQ) -> dict[str, int]:
    """Tokenizer trained on real text, documents packed into train/val shards with index.json."""
    import sentencepiece as spm

    texts = real_texts()
    lines = [ln for t in texts for ln in t.splitlines() if ln.strip()]
    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="bpe",
                                   character_coverage=1.0, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, num_threads=1,
                                   minloglevel=2)
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for i, text in enumerate(texts):
        streams["val" if i % 6 == 5 else "train"] += sp.encode(text) + [sp.eos_id()]
    dtype = token_dtype(vocab)
    splits = {}
    for split, toks in streams.items():
        n = len(toks) // (seq_len + 1)
        with ShardWriter(storage, split, seq_len, dtype, rows_per_member=32, samples_per_shard=256) as w:
            w.write(np.asarray(toks[: n * (seq_len + 1)], dtype=dtype).reshape(n, seq_len + 1))
        splits[split] = w.shards
    storage.write_bytes("tokenizer/spm.model", model)
    write_index(storage, make_index(seq_len, dtype, vocab, digest_bytes(model), sp.eos_id(), splits))
    return {s: sum(e["samples"] for e in v) for s, v in splits.items()}


def copy_dataset(src: Storage, dst: Storage) -> None:
    """Shards, index and tokenizer of one root into another (e.g. onto the S3 endpoint)."""
    for d in ("shards", "tokenizer"):
        for name in src.list(d):
            dst.write_bytes(f"{d}/{name}", src.read_bytes(f"{d}/{name}"))


def tiny_cfg(run: str, **sections) -> TrainConfig:
    """A 2-layer, 4-expert model; router jitter on so that an un-restored RNG would change the losses."""
    base = {
        "run": run,
        "model": {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4,
                  "top_k": 2, "expert_hidden": 64, "dense_hidden": 64, "max_seq_len": 64, "router": {"jitter": 0.05}},
        "data": {"batch_size": 4, "num_workers": 0, "seed": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 4},
        # deterministic: the bitwise-resume tests rely on it (on CPU the kernels are the same either way)
        "trainer": {"steps": 20, "device": "cpu", "progress": False, "log_every": 5, "seed": 3, "deterministic": True},
        "checkpoint": {"every_steps": 5, "keep_last": 2},
    }
    for key, val in sections.items():
        base[key] = {**base.get(key, {}), **val} if isinstance(val, dict) else val
    return TrainConfig.model_validate(base)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core runner lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("data") / "root"))
    counts = build_dataset(storage)
    assert counts["train"] > 1000 and counts["val"] > 100
    return storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: TrainConfig, storage: Storage, nproc: int, tmp: Path, extra: list[str] | None = None,
           torchrun_args: list[str] | None = None) -> subprocess.Popen:
    """``python -m shardflow.train`` (nproc=1) or torchrun (nproc>1) in a new session, one thread per rank.

    ``torchrun_args`` (e.g. a multi-node rendezvous) replace the default 127.0.0.1 master port."""
    launch_dir = tmp / f"launch-{cfg.run}-{time.monotonic_ns()}"
    launch_dir.mkdir()
    path = write_launch_config(cfg, storage.config, str(launch_dir))
    if nproc == 1:
        cmd = [sys.executable, "-m", "shardflow.train", "--config-json", path, *(extra or [])]
    else:
        cmd = torchrun_command(path, nproc, master_port=None if torchrun_args else free_port(),
                               torchrun_args=torchrun_args, extra=extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return json.loads(text.strip().splitlines()[-1])


def metrics_ref(run: str) -> str:
    return f"runs/{run}/metrics.jsonl"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts each rank in a session of its own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                todo += [int(c) for c in Path(task).read_text().split()]
            except OSError:
                pass
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a launch and every process under it at once: a node dying, not a polite shutdown."""
    for p in reversed(process_tree(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when_logged(proc: subprocess.Popen, storage: Storage, run: str, step: int, timeout: float = 240) -> None:
    """SIGKILL the whole launch (torchrun agent and ranks alike) as soon as ``step`` is in the log."""
    path = Path(storage.resolve(metrics_ref(run))[1])
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        if any(json.loads(ln)["step"] >= step for ln in lines[-3:] if ln.strip().endswith(b"}")):
            kill_tree(proc.pid)
            break
        time.sleep(0.002)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended before it could be killed:\n{out.decode()[-3000:]}"


def assert_same_run(storage: Storage, ref_run: str, run: str, steps: int) -> None:
    a, b = read_metrics(storage, metrics_ref(ref_run)), read_metrics(storage, metrics_ref(run))
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["step"] for r in b] == list(range(1, steps + 1)), "metrics lines duplicated or missing"
    for key in STEP_KEYS:
        assert [r[key] for r in b] == [r[key] for r in a], f"{key} differs after resume"
    cfg = tiny_cfg(ref_run)
    ma, mb = MoETransformer(cfg.model), MoETransformer(cfg.model)
    assert load_model_weights(ma, storage, cfg)["step"] == steps
    assert load_model_weights(mb, storage, tiny_cfg(run))["step"] == steps
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name


def kill_and_resume(storage: Storage, run: str, nproc: int, tmp: Path, seed: int, **sections) -> dict:
    """Start, SIGKILL after checkpoint k and before k+1 (at a seeded random step), restart to the end."""
    cfg = tiny_cfg(run, **sections)
    every = cfg.checkpoint.every_steps
    kill_at = random.Random(seed).choice([s for s in range(every + 1, cfg.trainer.steps - 1) if s % every not in (0, every - 1)])
    kill_when_logged(launch(cfg, storage, nproc, tmp), storage, run, kill_at)
    logged = read_metrics(storage, metrics_ref(run))
    committed = Checkpointer(storage, run).latest_step()
    assert committed is not None and committed % every == 0
    assert logged[-1]["step"] > committed, "the kill must lose work done after the last checkpoint"
    summary = finish(launch(cfg, storage, nproc, tmp))
    assert summary["start_step"] == committed and summary["step"] == cfg.trainer.steps
    return {"kill_at": kill_at, "killed_after_step": logged[-1]["step"], "resumed_from": committed}


# -- learning ---------------------------------------------------------------------------------------------

def test_training_learns_logs_and_checkpoints(data_root: Storage):
    cfg = tiny_cfg("learn", trainer={"steps": 30, "grad_accum": 2, "eval_every": 15, "eval_batches": 3},
                   checkpoint={"every_steps": 10, "keep_last": 2})
    summary = train(cfg, data_root)
    assert summary["step"] == 30 and summary["start_step"] == 0 and summary["world_size"] == 1
    log = read_metrics(data_root, metrics_ref("learn"))
    assert [r["step"] for r in log] == list(range(1, 31))
    tokens_per_step = cfg.data.batch_size * SEQ * 2
    assert [r["tokens"] for r in log] == [tokens_per_step * s for s in range(1, 31)]
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    # Starts near uniform (ln 384 = 5.95); 30 tiny steps on varied documentation text take off
    # ~0.35 nats (measured 5.93 -> 5.58), far beyond step-to-step noise.
    assert first > math.log(VOCAB) - 0.3 and last < first - 0.25, (first, last)
    for r in log:
        assert len(r["expert_tokens"]) == 2 and all(len(layer) == 4 for layer in r["expert_tokens"])
        # every token goes to top_k=2 experts in each of the 2 MoE layers, over 2 micro-batches
        assert all(sum(layer) == tokens_per_step * 2 for layer in r["expert_tokens"])
        assert r["dropped_tokens"] == 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert 0.9 < r["aux_loss"] < 2.0 and r["z_loss"] > 0
    # warmup then cosine decay to min_lr_ratio
    sched = WarmupCosine.from_config(cfg.optim, 30)
    assert [r["lr"] for r in log] == [sched.lr_at(s) for s in range(1, 31)]
    assert [r["step"] for r in log if "val_loss" in r] == [15, 30]
    assert log[-1]["val_loss"] < log[14]["val_loss"] and summary["val_loss"] == log[-1]["val_loss"]
    ck = Checkpointer(data_root, "learn")
    assert ck.latest_step() == 30 and ck.step_dirs() == [20, 30]
    assert summary["checkpoint"] == data_root.uri("runs/learn/checkpoints/step-30")
    # Resuming a finished run does nothing and keeps the log as it is.
    again = train(cfg, data_root)
    assert again["start_step"] == 30 and again["step"] == 30
    assert read_metrics(data_root, metrics_ref("learn")) == log


def test_in_process_stop_and_resume_is_bitwise_identical(data_root: Storage):
    ref = tiny_cfg("inproc-ref", trainer={"steps": 9})
    train(ref, data_root)
    cfg = tiny_cfg("inproc", trainer={"steps": 9})
    assert train(cfg, data_root, max_steps=6)["step"] == 6  # stops with a checkpoint at 6
    assert Checkpointer(data_root, "inproc").latest_step() == 6
    assert train(cfg, data_root)["start_step"] == 6
    assert_same_run(data_root, "inproc-ref", "inproc", 9)


def test_sigkill_at_random_step_then_resume_is_bitwise_identical(data_root: Storage, tmp_path):
    finish(launch(tiny_cfg("kill1-ref"), data_root, 1, tmp_path))
    info = kill_and_resume(data_root, "kill1", 1, tmp_path, seed=11)
    assert_same_run(data_root, "kill1-ref", "kill1", 20)
    print("single-process kill/resume:", info)


# -- bad data / config -----------------------------------------------------------------------------------

def test_missing_shards_is_a_clear_error(tmp_path):
    storage = Storage(str(tmp_path / "empty"))
    with pytest.raises(TrainingDataError, match=r"shards/index\.json.*not found"):
        train(tiny_cfg("nodata"), storage)


def test_vocab_mismatch_is_a_clear_error(data_root: Storage):
    cfg = tiny_cfg("vocab", model={"vocab_size": VOCAB * 2})
    with pytest.raises(TrainingDataError, match=rf"vocab_size={VOCAB}.*train\.model\.vocab_size={VOCAB * 2}"):
        train(cfg, data_root)
    assert not data_root.exists("runs/vocab/checkpoints/latest")


def test_val_split_required_only_for_eval(tmp_path, data_root: Storage):
    storage = Storage(str(tmp_path / "root"))
    copy_dataset(data_root, storage)
    index = storage.read_json(INDEX_REF)
    index["splits"]["val"] = {"shards": [], "samples": 0, "tokens": 0}
    write_index(storage, index)
    with pytest.raises(TrainingDataError, match="'val' has no samples.*eval_every=0"):
        train(tiny_cfg("noval", trainer={"eval_every": 5}), storage)
    assert train(tiny_cfg("noval", trainer={"steps": 2}), storage)["step"] == 2


# -- optimizer and schedule ------------------------------------------------------------------------------

def test_no_weight_decay_on_norms_biases_and_embeddings():
    cfg = tiny_cfg("x", model={"tie_embeddings": True})
    model = MoETransformer(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1)}
    assert "embed.weight" in groups["no_decay"] and all("norm" in n for n in groups["no_decay"] - {"embed.weight"})
    assert {"blocks.0.attn.wq.weight", "blocks.1.ffn.experts.w1", "blocks.0.ffn.router.weight"} <= groups["decay"]
    assert len(groups["decay"]) + len(groups["no_decay"]) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_warmup_cosine_schedule():
    s = WarmupCosine(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert s.lr_at(1) == pytest.approx(0.1) and s.lr_at(10) == 1.0
    assert s.lr_at(60) == pytest.approx(0.55) and s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    with pytest.raises(ValueError):
        s.lr_at(0)


# -- CLI configuration -----------------------------------------------------------------------------------

def test_cli_reads_train_and_storage_sections_of_a_pipeline_yaml(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "name: x\nstorage:\n  root: data\nprep:\n  whatever: 1\n"
        "train:\n  run: r\n  trainer:\n    steps: 7\n", encoding="utf-8")
    train_cfg, storage_cfg = load_train_config(tmp_path / "p.yaml", ["train.optim.lr=0.01", "storage.root=rel"])
    assert train_cfg.run == "r" and train_cfg.trainer.steps == 7 and train_cfg.optim.lr == 0.01
    assert storage_cfg.root == "rel"  # an override is taken as given
    assert load_train_config(tmp_path / "p.yaml")[1].root == str(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"train\.trainer\.stepz: unknown key"):
        load_train_config(tmp_path / "p.yaml", ["train.trainer.stepz=3"])
    with pytest.raises(ConfigError, match="only train"):
        load_train_config(tmp_path / "p.yaml", ["prep.x=1"])


def test_launch_json_is_private_holds_no_secret_and_the_environment_carries_them(tmp_path, monkeypatch):
    from shardflow.train.launch import CREDENTIALS_ENV, credentials_env

    cfg = tiny_cfg("r")
    st = StorageConfig(root="s3://b/r", endpoint_url="http://127.0.0.1:1", key="AKIA", secret="s3cr3t",
                       options={"token": "t0k3n", "config_kwargs": {"retries": {"max_attempts": 3}}})
    path = write_launch_config(cfg, st, str(tmp_path / "d"))
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
    text = Path(path).read_text()
    assert "AKIA" not in text and "s3cr3t" not in text and "t0k3n" not in text and "max_attempts" in text
    with pytest.raises(ConfigError, match=CREDENTIALS_ENV):  # masked values are never used as credentials
        load_train_config(json_path=path)
    monkeypatch.setenv(CREDENTIALS_ENV, credentials_env(st)[CREDENTIALS_ENV])
    train_cfg, storage_cfg = load_train_config(json_path=path)
    assert train_cfg == cfg and storage_cfg.secret.get_secret_value() == "s3cr3t"
    assert storage_cfg.key.get_secret_value() == "AKIA" and storage_cfg.fsspec_options("s3")["token"] == "t0k3n"
    assert CREDENTIALS_ENV not in os.environ  # taken out: processes the rank starts do not inherit it
    no_secrets = StorageConfig(root=str(tmp_path))
    assert credentials_env(no_secrets) == {}


def test_cli_main_trains_from_a_pipeline_yaml_and_exits_2_on_bad_data(data_root: Storage, tmp_path, capsys):
    from shardflow.train.__main__ import main

    cfg = tiny_cfg("cli", trainer={"steps": 3})
    (tmp_path / "p.yaml").write_text(
        json.dumps({"storage": {"root": data_root.root}, "train": cfg.model_dump(mode="json"), "eval": {"x": 1}}),
        encoding="utf-8")  # JSON is YAML
    assert main(["--config", str(tmp_path / "p.yaml"), "--set", "train.trainer.steps=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["run"] == "cli"
    assert [r["step"] for r in read_metrics(data_root, metrics_ref("cli"))] == [1, 2]
    assert main(["--config", str(tmp_path / "p.yaml"), "--set", f"storage.root={tmp_path / 'nothing'}"]) == 2
    assert "shard index not found" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "p.yaml"), "--set", "train.trainer.steps=0"]) == 2
    assert "train.trainer.steps" in capsys.readouterr().err


def test_progress_line_every_log_every_steps_and_on_validation(caplog):
    import logging

    from shardflow.train.metrics import LOGGER_NAME, Progress

    progress = Progress(total=70, start=0, log_every=3, enabled=True, use_bar=False)
    rec = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.0, "expert_tokens": [[3, 1], [2, 2]]}
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        for step in range(1, 8):
            progress.update(step, dict(rec, val_loss=2.75) if step == 4 else rec)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 3/70", "step 4/70", "step 6/70"]
    assert "loss 2.5000 | lr 1.00e-03 | gnorm 0.500 | 12.3k tok/s" in lines[0] and "val 2.7500" in lines[1]
    assert "imb 1.50" in lines[0] and " mfu " not in lines[0]  # CPU: no known peak, no MFU
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        Progress(total=7, start=0, log_every=3, enabled=False).update(3, rec)
    assert not caplog.records
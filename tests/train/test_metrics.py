"""train/metrics.py: the one metrics.jsonl reader, the progress cadence (a line per 5 % of the run at
least), tqdm only on a terminal, and TensorBoard event files that read back (also across a resume)."""
from __future__ import annotations

import io
import logging

import pytest

from shardflow.storage import Storage
from shardflow.train.metrics import (LOGGER_NAME, STEP_LINE, Progress, expert_imbalance, log_cadence, read_metrics)
from shardflow.train.trainer import train

from .test_trainer import build_dataset, tiny_cfg


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("tbdata") / "root"))
    build_dataset(storage)
    return storage


def test_one_reader_skips_torn_and_foreign_lines(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("m.jsonl", b'{"step": 1, "loss": 2.0}\n\n[1, 2]\nnot json\n{"step": 2, "loss": "nan"}\n{"step": 3, "lo')
    assert read_metrics(storage, "m.jsonl") == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": "nan"}]
    assert read_metrics(storage, "absent.jsonl") == []
    from shardflow.train import report

    assert report.read_metrics is read_metrics  # evaluation and reports use the same function


@pytest.mark.parametrize("total, log_every", [(7, 3), (20, 10), (300, 25), (1000, 10), (1000, 500), (33, 1000)])
def test_at_least_one_line_per_five_percent_of_the_steps(total, log_every, caplog):
    rec = {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}
    p = Progress(total, 0, log_every, enabled=True, use_bar=False)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        for step in range(1, total + 1):
            p.update(step, rec)
    steps = [int(STEP_LINE.search(r.getMessage()).group(1)) for r in caplog.records if r.name == LOGGER_NAME]
    gaps = [b - a for a, b in zip([0, *steps], steps)]
    assert steps[-1] == total and max(gaps) <= max(1, total * 0.05), (steps, log_cadence(total, log_every))
    assert log_cadence(total, log_every) <= log_every


def test_tqdm_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert Progress(10, 0, 1, enabled=True)._bar is None
    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    p = Progress(10, 0, 1, enabled=True)
    assert p._bar is not None
    p.close()


def test_expert_imbalance_is_the_worst_layers_max_over_mean():
    assert expert_imbalance([[2, 2, 2, 2], [4, 2, 1, 1]]) == 2.0
    assert expert_imbalance([]) is None and expert_imbalance([[0, 0]]) is None


def test_tensorboard_event_files_read_back_and_resume_purges_redone_steps(data_root, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("tb", trainer={"steps": 12, "log_every": 4, "progress": True}, checkpoint={"every_steps": 4})
    train(cfg, data_root, max_steps=6)
    data_root.write_text("runs/tb/checkpoints/latest", "step-4")  # as if step 6 never committed: 5-6 are redone
    caplog.clear()  # only the resumed run's lines (an earlier test may have left the logger at INFO)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        train(cfg, data_root)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert [ln.split(" | ")[0] for ln in lines] == [f"step {s}/12" for s in range(5, 13)]  # 5 % of 12 < 1: every step
    assert all(" | mem " in ln and " | imb " in ln for ln in lines)
    tb_dir = data_root.resolve("runs/tb/tb")[1]
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    logged = read_metrics(data_root, "runs/tb/metrics.jsonl")
    assert [e.step for e in loss] == list(range(1, 13))  # steps 5 and 6 once: the first run's were purged
    assert [round(e.value, 4) for e in loss] == [round(r["loss"], 4) for r in logged]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/expert_imbalance"} <= set(acc.Tags()["scalars"])
    off = tiny_cfg("tb-off", trainer={"steps": 2}, metrics={"tensorboard": False})
    train(off, data_root)
    assert not data_root.exists("runs/tb-off/tb") and read_metrics(data_root, "runs/tb-off/metrics.jsonl")

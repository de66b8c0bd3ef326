"""The one validation reader (train/validation.py): rows in index order, shared by ranks, and the
trainer's validation loss equal to evaluation's on the same rows."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shardflow.storage import Storage
from shardflow.storage.shards import read_index, read_member_rows
from shardflow.train.evaluate import run_evaluation
from shardflow.train.validation import val_batches, val_rows_total

from .test_evaluate import RUN, SEQ_LEN, build_eval_root, small_eval, train_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> str:
    return build_eval_root(str(tmp_path_factory.mktemp("eval")))


def test_val_batches_follow_index_order_and_respect_the_bound(eval_root):
    storage = Storage(eval_root)
    index = read_index(storage)
    batches = list(val_batches(storage, index, 5, 3))
    assert [b.shape for b in batches] == [(5, SEQ_LEN + 1)] * 3
    shard = index["splits"]["val"]["shards"][0]
    first = read_member_rows(storage, shard, shard["members"][0], 0, 5, index["seq_len"], index["dtype"])
    assert np.array_equal(batches[0], first)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_rows_one_rank_reads(eval_root, world):
    """Whatever the world size, all ranks together score the rows one rank would, each rank runs
    the same number of forward passes, and a stream end shorter than the ranks is left out."""
    storage = Storage(eval_root)
    index = read_index(storage)
    total = val_rows_total(index)
    B = 7
    n_batches = -(-total // (B * world)) + 1  # more than the split holds: the end of the stream is reached
    alone = np.concatenate(list(val_batches(storage, index, B * world, n_batches)))
    parts = [list(val_batches(storage, index, B, n_batches, rank, world)) for rank in range(world)]
    assert len({len(p) for p in parts}) == 1 and all(len(b) for p in parts for b in p)
    together = np.concatenate([b for step in zip(*parts) for b in step])
    tail = total % (B * world)
    expect = alone[: total - tail] if 0 < tail < world else alone
    assert np.array_equal(together, expect)


def test_trainer_val_loss_equals_evaluation_perplexity_on_the_same_rows(eval_root, tmp_path):
    """The trainer's last val_loss and evaluation's val loss of that step's checkpoint, with the
    same rows (trainer: eval_batches x batch_size; evaluation: max_val_batches x its batch_size)."""
    shutil.copytree(eval_root, tmp_path / "root")
    storage = Storage(str(tmp_path / "root"))
    cfg = train_config(read_index(storage)["vocab_size"])
    rows = cfg.trainer.eval_batches * cfg.data.batch_size
    log = [json.loads(line) for line in storage.read_text(f"runs/{RUN}/metrics.jsonl").splitlines() if line.strip()]
    last = [r for r in log if "val_loss" in r][-1]
    ev = small_eval(max_val_batches=rows // 4, batch_size=4, cloze_examples=0, mc_examples=0, max_source_batches=0)
    res = run_evaluation(cfg, ev, storage, checkpoint=f"runs/{RUN}/checkpoints/step-{last['step']}")["results"]
    assert res["val"]["sequences"] == rows
    assert res["val"]["loss"] == pytest.approx(last["val_loss"], rel=1e-5)

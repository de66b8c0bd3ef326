"""Shared fixtures of the loader tests: small token datasets whose rows name themselves, ranks
simulated in one process, and a spy on every byte range read through Storage."""
import json

import numpy as np
import pytest
import torch

from shardflow.storage import Storage
from shardflow.storage.shards import ShardWriter, make_index, write_index
from shardflow.train.config import LoaderConfig
from shardflow.train.data import build_loader

SEQ = 15
VOCAB = 60000


def make_rows(n: int, tag: int = 0, seed: int = 0) -> np.ndarray:
    """Row i starts with (i, tag), so a delivered sample names itself; the rest is random."""
    rows = np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ + 1)).astype(np.uint16)
    rows[:, 0] = np.arange(n)
    rows[:, 1] = tag
    return rows


def write_dataset(storage: Storage, n: int, tag: int = 0, rows_per_member: int = 16, samples_per_shard: int = 100) -> np.ndarray:
    rows = make_rows(n, tag, seed=tag)
    with ShardWriter(storage, "train", SEQ, np.uint16, rows_per_member=rows_per_member,
                     samples_per_shard=samples_per_shard) as w:
        w.write(rows)
    write_index(storage, make_index(SEQ, np.uint16, VOCAB, "sha256:tok", 2, {"train": w.shards}))
    return rows


def loader_cfg(**kw) -> LoaderConfig:
    # Groups of 2 batches: small enough that every DataLoader worker gets work in these tiny datasets.
    base = dict(batch_size=4, shuffle_window=3, seed=7, group_batches=2)
    return LoaderConfig(**(base | kw))


class Ranks:
    """Ranks simulated in one process: at each step every rank delivers one batch."""

    def __init__(self, storage, cfg, world, state=None, expect=None, **kw):
        self.loaders = [build_loader(cfg, storage, r, world, **kw) for r in range(world)]
        if state is not None:
            for ld in self.loaders:
                ld.load_state_dict(json.loads(json.dumps(state)))
        self.iters = [iter(ld) for ld in self.loaders]
        self.expect = expect

    def steps(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            for it in self.iters:
                b = next(it)
                assert b.dtype == torch.int64 and b.shape[1] == SEQ + 1
                out.extend(self._ids(b))
        return out

    def _ids(self, b):
        ids = [(int(t), int(i)) for i, t in zip(b[:, 0], b[:, 1])]
        if self.expect is not None:
            for (tag, i), row in zip(ids, b.numpy()):
                np.testing.assert_array_equal(row, self.expect[tag][i])
        return ids

    def state(self):
        states = [ld.state_dict() for ld in self.loaders]
        assert all(s == states[0] for s in states)  # the position is rank-independent
        return states[0]

    def close(self):
        for it in self.iters:
            it.close()


@pytest.fixture
def ds250(local_storage):
    return local_storage, {0: write_dataset(local_storage, 250)}


def reference_stream(storage, cfg, samples: int, expect) -> list:
    run = Ranks(storage, cfg, 1, expect=expect)
    ids = run.steps(samples // cfg.batch_size)
    run.close()
    return ids


class _SpyFile:
    """A file from Storage.open_read that logs (ref, position, bytes) of every read."""

    def __init__(self, f, ref, calls):
        self.f, self.ref, self.calls, self.pos = f, ref, calls, 0

    def seek(self, pos, whence=0):
        self.pos = self.f.seek(pos, whence)
        return self.pos

    def read(self, n=-1):
        data = self.f.read(n)
        self.calls.append((self.ref, self.pos, len(data)))
        self.pos += len(data)
        return data

    def readinto(self, view):
        n = self.f.readinto(view)
        self.calls.append((self.ref, self.pos, n))
        self.pos += n
        return n

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CountReads:
    """Record every byte range read through Storage (range reads and open files) in this process."""

    def __init__(self, monkeypatch):
        self.calls = []
        read_range, open_read = Storage.read_range, Storage.open_read

        def spy_range(st, ref, start, length):
            self.calls.append((ref, start, length))
            return read_range(st, ref, start, length)

        def spy_open(st, ref, *a, **kw):
            return _SpyFile(open_read(st, ref, *a, **kw), ref, self.calls)

        monkeypatch.setattr(Storage, "read_range", spy_range)
        monkeypatch.setattr(Storage, "open_read", spy_open)

    def rows(self, index):
        """(shard, member key, row) of every row byte read (tar/.npy header reads excluded)."""
        members = {s["name"]: s["members"] for s in index["splits"]["train"]["shards"]}
        row_bytes = (SEQ + 1) * 2
        out = []
        for ref, start, length in self.calls:
            name = ref.rsplit("/", 1)[-1]
            for m in members[name]:
                data0 = m["offset"] + m["npy_header"]
                data1 = m["offset"] + m["size"]
                lo, hi = max(start, data0), min(start + length, data1)
                if lo < hi:
                    out.extend((name, m["key"], r) for r in range((lo - data0) // row_bytes, (hi - data0 - 1) // row_bytes + 1))
        return out

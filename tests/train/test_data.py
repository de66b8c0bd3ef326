"""The streaming loader: world-independent order, exact resume, mixing, integrity, foreign shards."""
import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch

from shardflow.storage import Storage
from shardflow.storage.shards import ShardIndexError, ShardWriter, make_index, read_index, write_index
from shardflow.train.config import DatasetSpec, LoaderConfig
from shardflow.train.data import ShardDataError, ShardDataset, build_index, build_loader, inputs_targets, tokens_to

SEQ = 15
VOCAB = 60000


def _rows(n: int, tag: int = 0, seed: int = 0) -> np.ndarray:
    """Row i starts with (i, tag), so a delivered sample names itself; the rest is random."""
    rows = np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ + 1)).astype(np.uint16)
    rows[:, 0] = np.arange(n)
    rows[:, 1] = tag
    return rows


def _write(storage: Storage, n: int, tag: int = 0, rows_per_member: int = 16, samples_per_shard: int = 100) -> np.ndarray:
    rows = _rows(n, tag, seed=tag)
    with ShardWriter(storage, "train", SEQ, np.uint16, rows_per_member=rows_per_member,
                     samples_per_shard=samples_per_shard) as w:
        w.write(rows)
    write_index(storage, make_index(SEQ, np.uint16, VOCAB, "sha256:tok", 2, {"train": w.shards}))
    return rows


def _cfg(**kw) -> LoaderConfig:
    # Groups of 2 batches: small enough that every DataLoader worker gets work in these tiny datasets.
    base = dict(batch_size=4, shuffle_window=3, seed=7, group_batches=2)
    return LoaderConfig(**(base | kw))


class _Run:
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
    return local_storage, {0: _write(local_storage, 250)}


def _reference(storage, cfg, samples: int, expect) -> list:
    run = _Run(storage, cfg, 1, expect=expect)
    ids = run.steps(samples // cfg.batch_size)
    run.close()
    return ids


def test_order_is_independent_of_world_and_workers_and_epochs_roll_over(ds250):
    storage, expect = ds250
    cfg = _cfg()
    ref = _reference(storage, cfg, 632, expect)  # 2.5 epochs of 250; 632 = 79 steps of 8 at world 2
    for e in range(2):  # each epoch delivers every sample once, in a new order
        assert sorted(i for _, i in ref[e * 250 : (e + 1) * 250]) == list(range(250))
    assert ref[:250] != ref[250:500]
    assert ref[:250] != [(0, i) for i in range(250)]  # shuffled
    for world, workers, group in [(2, 0, 2), (1, 2, 1), (2, 2, 3), (3, 1, None), (1, 0, None)]:
        run = _Run(storage, _cfg(num_workers=workers, group_batches=group), world, expect=expect)
        got = run.steps(-(-632 // (4 * world)))
        run.close()
        assert got[:632] == ref, (world, workers, group)


@pytest.mark.parametrize("before,after", [((1, 0), (1, 0)), ((2, 1), (1, 2)), ((1, 2), (2, 0)), ((2, 0), (1, 1)),
                                          ((2, 2), (2, 1))])
def test_resume_at_random_points_continues_the_exact_stream(ds250, before, after):
    storage, expect = ds250
    ref = _reference(storage, _cfg(), 800, expect)
    rnd = random.Random(repr((before, after)))
    (w1, n1), (w2, n2) = before, after
    first = rnd.randrange(1, 30)
    run = _Run(storage, _cfg(num_workers=n1), w1, expect=expect)
    got = run.steps(first)
    state = run.state()
    run.close()
    assert state["position"] == len(got) == first * 4 * w1
    # Second leg on another world size / worker count, interrupted again; the third crosses epoch 1.
    second = rnd.randrange(10, 30)
    run = _Run(storage, _cfg(num_workers=n2), w2, state=state, expect=expect)
    got += run.steps(second)
    state = run.state()
    run.close()
    run = _Run(storage, _cfg(num_workers=n1), w1, state=state, expect=expect)
    got += run.steps(max(1, -(-(600 - len(got)) // (4 * w1))))
    run.close()
    assert got == ref[: len(got)]
    assert len(got) > 500
    assert state["epoch"] == state["position"] // 250


@pytest.mark.s3
def test_resume_on_s3_endpoint(s3_storage):
    expect = {0: _write(s3_storage, 120, rows_per_member=8, samples_per_shard=40)}
    ref = _reference(s3_storage, _cfg(), 240, expect)
    assert sorted(i for _, i in ref[:120]) == list(range(120))
    run = _Run(s3_storage, _cfg(num_workers=1), 2, expect=expect)
    got = run.steps(9)
    state = run.state()
    run.close()
    run = _Run(s3_storage, _cfg(), 1, state=state, expect=expect)
    got += run.steps((240 - len(got)) // 4)
    run.close()
    assert got == ref


def _id(loc, rows_per_member=16, samples_per_shard=100):
    """The sample id _write gave the row at a located (slot, shard, key, row)."""
    _, shard, key, row = loc
    return samples_per_shard * int(shard[-10:-4]) + rows_per_member * int(key) + row


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


class _CountReads:
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


def test_resume_reads_only_rows_it_delivers(ds250, monkeypatch):
    storage, expect = ds250
    cfg = _cfg(coalesce_gap_bytes=0, prefetch_members=1, shuffle_window=2)
    index = read_index(storage)
    deep = 250 + 100  # epoch 1, place 100
    loader = build_loader(cfg, storage)
    places = {loc: p for p, loc in enumerate(loader.dataset.locate(range(250, 500)))}

    counter = _CountReads(monkeypatch)
    loader.load_state_dict({**loader.state_dict(), "position": deep})
    it = iter(loader)
    got = [next(it) for _ in range(3)]
    it.close()
    read = counter.rows(index)
    assert read, "nothing read"
    assert len(read) == len(set(read))  # no row read twice
    delivered = [int(row[0]) for batch in got for row in batch]
    assert delivered == [_id(loc) for loc in loader.dataset.locate(range(deep, deep + 12))]
    before = [r for r in read if places[(0, *r)] < 100]
    assert not before, f"resume read {len(before)} rows that come before its position"
    # Read-ahead is bounded: the queued groups' windows plus one window of 2 members.
    assert max(places[(0, *r)] for r in read) < 100 + 120


def test_resume_reads_nothing_before_position_with_many_ranks(ds250, monkeypatch):
    storage, _ = ds250
    cfg = _cfg(coalesce_gap_bytes=0, prefetch_members=1)
    index = read_index(storage)
    counter = _CountReads(monkeypatch)
    loader = build_loader(cfg, storage, rank=1, world_size=3)
    loader.load_state_dict({**loader.state_dict(), "position": 40})
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    it.close()
    # Rank 1 of 3 delivers positions 44..47, 56..59, ...; it reads exactly the rows it needs from
    # the windows it opened (gap 0), and nothing of the places before 40. (Read-ahead is bounded
    # well short of the epoch's end, so every row read is one of epoch 0.)
    places = {loc: p for p, loc in enumerate(loader.dataset.locate(range(250)))}
    read = counter.rows(index)
    assert read and all(places[(0, *r)] >= 40 for r in read)
    mine = {p for p in range(40, 250) if ((p - 40) // 4) % 3 == 1}
    assert all(places[(0, *r)] in mine for r in read)
    assert [int(x) for x in batches[0][:, 0]] == [_id(loc) for loc in loader.dataset.locate(range(44, 48))]
    assert [int(x) for x in batches[1][:, 0]] == [_id(loc) for loc in loader.dataset.locate(range(56, 60))]


def test_webdataset_shardwriter_shards_load_through_build_index(tmp_path):
    import webdataset as wds

    storage = Storage(str(tmp_path / "root"))
    os.makedirs(tmp_path / "root" / "shards")
    rows = _rows(150, tag=0)
    blocks = [rows[i : i + 16] for i in range(0, 150, 16)]
    with wds.ShardWriter(str(tmp_path / "root" / "shards" / "train-%06d.tar"), maxcount=4, verbose=0) as sink:
        for j, block in enumerate(blocks):
            sink.write({"__key__": f"{j:06d}", "tokens.npy": block, "meta.json": {"j": j}})
    index = build_index(storage, "shards/train-{000000..000002}.tar", "train", vocab_size=VOCAB)
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert index["seq_len"] == SEQ and index["dtype"] == "uint16" and index["splits"]["train"]["samples"] == 150
    assert "uri" not in index["splits"]["train"]["shards"][0]
    write_index(storage, index)
    run = _Run(storage, _cfg(), 1, expect={0: rows})
    got = run.steps(75)  # two epochs
    run.close()
    assert sorted(i for _, i in got[:150]) == list(range(150)) == sorted(i for _, i in got[150:])
    # Stock webdataset still reads them (we only added an index next to them).
    n = sum(len(s["tokens.npy"]) for s in wds.WebDataset(str(tmp_path / "root/shards/train-{000000..000002}.tar"),
                                                          shardshuffle=False).decode())
    assert n == 150


def test_build_index_reproduces_our_writer_offsets_and_records_outside_uris(local_storage, tmp_path):
    _write(local_storage, 250)
    ours = read_index(local_storage)
    scanned = build_index(local_storage, "shards/train-*.tar", "train", vocab_size=VOCAB, digests=True)
    for a, b in zip(ours["splits"]["train"]["shards"], scanned["splits"]["train"]["shards"]):
        assert (a["name"], a["bytes"], a["sha256"], a["samples"], a["members"]) == \
               (b["name"], b["bytes"], b["sha256"], b["samples"], b["members"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(local_storage.uri("shards/train-000002.tar"), outside / "train-000002.tar")
    index = build_index(local_storage, [local_storage.uri("shards/train-000000.tar"), "shards/train-000001.tar",
                                        str(outside / "train-000002.tar")], "train", vocab_size=VOCAB)
    assert index["splits"]["train"]["shards"][2]["uri"] == str(outside / "train-000002.tar")
    write_index(local_storage, index)
    run = _Run(local_storage, _cfg(), 1, expect={0: _rows(250)})
    ids = run.steps(63)
    run.close()
    assert sorted(i for _, i in ids[:250]) == list(range(250))


def test_mixing_proportions_and_resume(tmp_path):
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    expect = {1: _write(a, 250, tag=1), 2: _write(b, 90, tag=2, rows_per_member=8)}
    cfg = _cfg(datasets=[DatasetSpec(root=a.root, weight=3), DatasetSpec(root=b.root, weight=1)])
    run = _Run(a, cfg, 1, expect=expect)
    ref = run.steps(200)
    run.close()
    tags = [t for t, _ in ref]
    assert tags.count(1) == 600 and tags.count(2) == 200  # quotas 3:1 are exact per period of 4
    assert all(tags[i : i + 4].count(2) == 1 for i in range(0, 800, 4))  # and spread evenly
    for tag, n in ((1, 250), (2, 90)):  # each dataset walks its own epochs
        mine = [i for t, i in ref if t == tag]
        assert sorted(mine[:n]) == list(range(n)) and sorted(mine[n : 2 * n]) == list(range(n))
    run = _Run(a, cfg.model_copy(update={"num_workers": 1}), 2, expect=expect)
    got = run.steps(37)
    state = run.state()
    run.close()
    assert state["datasets"][0]["consumed"] == sum(1 for t, _ in got if t == 1)
    assert state["datasets"][1]["epoch"] == sum(1 for t, _ in got if t == 2) // 90
    run = _Run(a, cfg, 1, state=state, expect=expect)
    got += run.steps((800 - len(got)) // 4)
    run.close()
    assert got == ref

    fractional = cfg.model_copy(update={"datasets": [DatasetSpec(root=a.root, weight=0.7), DatasetSpec(root=b.root, weight=0.3)]})
    run = _Run(a, fractional, 1)
    tags = [t for t, _ in run.steps(500)]
    run.close()
    assert abs(tags.count(1) / len(tags) - 0.7) < 0.005
    with pytest.raises(ValueError, match="another sample order"):
        build_loader(fractional, a).load_state_dict(state)


def test_state_from_another_order_is_refused_and_json_roundtrips(ds250):
    storage, _ = ds250
    loader = build_loader(_cfg(), storage)
    it = iter(loader)
    next(it)
    next(it)
    it.close()
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["position"] == 8 and state["epoch"] == 0
    with pytest.raises(ValueError, match="another sample order"):
        build_loader(_cfg(seed=8), storage).load_state_dict(state)
    other = build_loader(_cfg(seed=8), storage)
    other.load_state_dict(state, strict=False)
    assert other.position == 8
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**state, "position": -1})


@pytest.mark.timeout(120)
def test_equal_batches_per_rank_with_fewer_shards_than_ranks_times_workers(local_storage):
    expect = {0: _write(local_storage, 11, rows_per_member=16)}  # one shard, one member
    for epochs, steps in ((1, 1), (3, 4)):  # 11 samples, steps of 2 ranks x 4: floor(11e / 8)
        per_rank = []
        ids = []
        for r in range(2):
            loader = build_loader(_cfg(num_workers=2), local_storage, r, 2, epochs=epochs)
            batches = list(loader)
            per_rank.append(len(batches))
            ids.append([int(x) for b in batches for x in b[:, 0]])
            assert loader.position == steps * 8
        assert per_rank == [steps, steps]
        merged = [i for s in range(steps) for r in range(2) for i in ids[r][s * 4 : (s + 1) * 4]]
        assert sorted(merged[:8]) == sorted(set(merged[:8]))
    run = _Run(local_storage, _cfg(num_workers=2), 2, expect=expect)  # endless: wraps over epochs
    got = run.steps(11)
    run.close()
    for e in range(8):
        assert sorted(i for _, i in got[e * 11 : (e + 1) * 11]) == list(range(11))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_shard_with_verify_names_it(ds250, workers):
    storage, _ = ds250
    entry = read_index(storage)["splits"]["train"]["shards"][1]
    m = entry["members"][2]
    _flip(storage.uri(f"shards/{entry['name']}"), m["offset"] + m["npy_header"] + 40)
    with pytest.raises(ShardDataError, match=r"train-000001\.tar.*sha256"):
        list(build_loader(_cfg(verify_digests=True, num_workers=workers), storage, epochs=1))
    # Without verification the flipped token is data like any other: it loads.
    assert len(list(build_loader(_cfg(), storage, epochs=1))) == 62


def test_truncated_shard_names_it(storage):
    _write(storage, 120, rows_per_member=8, samples_per_shard=40)
    name = "shards/train-000001.tar"
    blob = storage.read_bytes(name)
    storage.write_bytes(name, blob[: len(blob) // 2])
    with pytest.raises(ShardDataError, match=r"train-000001\.tar.*truncated"):
        list(build_loader(_cfg(), storage, epochs=1))


def test_header_mismatch_names_shard_and_member(ds250):
    storage, _ = ds250
    index = read_index(storage)
    entry = index["splits"]["train"]["shards"][0]
    m = entry["members"][1]
    _flip(storage.uri(f"shards/{entry['name']}"), m["offset"] + 12)  # inside the .npy header dict
    with pytest.raises(ShardDataError, match=r"train-000000\.tar member 000001"):
        list(build_loader(_cfg(), storage, epochs=1))
    # An index whose keys do not match the tar is refused at the first read of the member.
    _write(storage, 250)
    index = read_index(storage)
    members = index["splits"]["train"]["shards"][2]["members"]
    members[0]["key"], members[1]["key"] = members[1]["key"], members[0]["key"]
    with pytest.raises(ShardDataError, match=r"train-000002\.tar member 00000[01].*expected"):
        list(build_loader(_cfg(), storage, epochs=1, indexes=[index]))


def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _npy(arr, allow_pickle=False):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("name,data,kind,match", [
    ("../000001.tokens.npy", None, tarfile.REGTYPE, "invalid member name"),
    ("/abs/000001.tokens.npy", None, tarfile.REGTYPE, "invalid member name"),
    ("dir/000001.tokens.npy", None, tarfile.REGTYPE, "dot-free"),
    ("000001.pyd", b"\x80\x04K\x01.", tarfile.REGTYPE, "pickled"),
    ("000001.tokens.npy", "object", tarfile.REGTYPE, "pickle"),
    ("000001.tokens.npy", "fortran", tarfile.REGTYPE, "Fortran"),
    ("000001.tokens.npy", b"", tarfile.SYMTYPE, "regular file"),
])
def test_build_index_refuses_unsafe_members(tmp_path, name, data, kind, match):
    storage = Storage(str(tmp_path / "root"))
    os.makedirs(tmp_path / "root" / "shards")
    good = _npy(_rows(4))
    if data == "object":
        data = _npy(np.array([[{"a": 1}] * (SEQ + 1)], dtype=object), allow_pickle=True)
    elif data == "fortran":
        data = _npy(np.asfortranarray(_rows(4)))
    elif data is None:
        data = good
    _tar(tmp_path / "root" / "shards" / "train-000000.tar",
         [("000000.tokens.npy", good, tarfile.REGTYPE), (name, data, kind)])
    with pytest.raises(ShardDataError, match=match) as err:
        build_index(storage, "shards/train-000000.tar")
    assert "train-000000.tar" in str(err.value)


def test_bad_member_key_in_index_is_refused(ds250):
    storage, _ = ds250
    raw = json.loads(storage.read_bytes("shards/index.json"))
    raw["splits"]["train"]["shards"][0]["members"][0]["key"] = "../x"
    storage.write_bytes("shards/index.json", json.dumps(raw).encode())
    with pytest.raises(ShardIndexError, match="index.json.*dot-free"):
        build_loader(_cfg(), storage)


@pytest.mark.s3
def test_member_cache_serves_second_pass_and_respects_limit(s3_storage, tmp_path, monkeypatch):
    expect = {0: _write(s3_storage, 120, rows_per_member=8, samples_per_shard=40)}
    cache = tmp_path / "cache"
    cfg = _cfg(cache_dir=str(cache), verify_digests=True)
    run = _Run(s3_storage, cfg, 1, expect=expect)
    first = run.steps(30)
    run.close()
    counter = _CountReads(monkeypatch)
    run = _Run(s3_storage, cfg, 1, expect=expect)
    assert run.steps(30) == first
    run.close()
    assert counter.calls == []  # every member and the digest check came from the cache
    member_bytes = 512 + 128 + 8 * (SEQ + 1) * 2
    limited = _cfg(cache_dir=str(tmp_path / "small"), cache_limit_bytes=3 * member_bytes)
    run = _Run(s3_storage, limited, 1, expect=expect)
    run.steps(30)
    run.close()
    total = sum(f.stat().st_size for f in (tmp_path / "small").rglob("*.member"))
    assert 0 < total <= 3 * member_bytes


def test_unknown_split_and_config_are_clear_errors(ds250):
    storage, _ = ds250
    with pytest.raises(ValueError, match="no split 'val'|split 'val' has no samples"):
        build_loader(_cfg(), storage, split="val")
    with pytest.raises(Exception, match="weight"):
        LoaderConfig(datasets=[DatasetSpec(weight=0)])
    with pytest.raises(ValueError, match="rank"):
        build_loader(_cfg(), storage, rank=2, world_size=2)


def test_inputs_targets_and_facts(ds250):
    storage, _ = ds250
    loader = build_loader(_cfg(), storage)
    assert (loader.seq_len, loader.vocab_size, loader.samples_per_epoch) == (SEQ, VOCAB, 250)
    assert loader.index["eos_id"] == 2 and loader.steps_per_epoch == 62
    batch = next(iter(loader))
    x, y = inputs_targets(batch)
    assert x.shape == y.shape == (4, SEQ)
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("workers", [0, 1])
def test_out_dtypes_deliver_the_same_stream_and_widen_to_int64(ds250, workers):
    storage, expect = ds250
    want = {"int64": torch.int64, "int32": torch.int32, "native": torch.uint16}
    streams = {}
    for out_dtype, dtype in want.items():
        batches = list(build_loader(_cfg(out_dtype=out_dtype, num_workers=workers), storage, epochs=1))
        assert batches and all(b.dtype == dtype and b.shape == (4, SEQ + 1) for b in batches)
        streams[out_dtype] = torch.cat([tokens_to(b, "cpu") for b in batches])
        assert streams[out_dtype].dtype == torch.int64
    assert torch.equal(streams["int32"], streams["int64"]) and torch.equal(streams["native"], streams["int64"])
    assert int(streams["native"].max()) >= 1 << 15  # token ids above int16 survive every path
    with pytest.raises(ValueError, match="out_dtype"):
        ShardDataset(build_loader(_cfg(), storage).dataset.sources, [1.0], 4, out_dtype="int8")


def test_batches_kept_by_the_consumer_are_never_overwritten(ds250):
    """Window buffers are recycled; batches are fresh arrays. Hold two epochs' worth, check them after."""
    storage, expect = ds250
    loader = build_loader(_cfg(shuffle_window=2, prefetch_members=1), storage, epochs=2)
    held = list(loader)
    assert len(held) == 125
    ids = [int(i) for b in held for i in b[:, 0]]
    assert sorted(ids[:248]) != ids[:248] and len(set(ids[:248])) == 248
    for b in held:
        for row in b.numpy():
            np.testing.assert_array_equal(row, expect[0][row[0]])

"""The streaming loader: exact resume on any world size, reads only what it delivers, state, dtypes."""
import json
import random

import numpy as np
import pytest
import torch

from shardflow.storage.shards import ShardIndexError, read_index
from shardflow.train.config import DatasetSpec, LoaderConfig
from shardflow.train.data import ShardDataset, build_loader, inputs_targets, tokens_to

from .conftest import SEQ, VOCAB, CountReads, Ranks, loader_cfg, reference_stream, write_dataset


@pytest.mark.parametrize("before,after", [((1, 0), (1, 0)), ((2, 1), (1, 2)), ((1, 2), (2, 0)), ((2, 0), (1, 1)),
                                          ((2, 2), (2, 1))])
def test_resume_at_random_points_continues_the_exact_stream(ds250, before, after):
    storage, expect = ds250
    ref = reference_stream(storage, loader_cfg(), 800, expect)
    rnd = random.Random(repr((before, after)))
    (w1, n1), (w2, n2) = before, after
    first = rnd.randrange(1, 30)
    run = Ranks(storage, loader_cfg(num_workers=n1), w1, expect=expect)
    got = run.steps(first)
    state = run.state()
    run.close()
    assert state["position"] == len(got) == first * 4 * w1
    # Second leg on another world size / worker count, interrupted again; the third crosses epoch 1.
    second = rnd.randrange(10, 30)
    run = Ranks(storage, loader_cfg(num_workers=n2), w2, state=state, expect=expect)
    got += run.steps(second)
    state = run.state()
    run.close()
    run = Ranks(storage, loader_cfg(num_workers=n1), w1, state=state, expect=expect)
    got += run.steps(max(1, -(-(600 - len(got)) // (4 * w1))))
    run.close()
    assert got == ref[: len(got)]
    assert len(got) > 500
    assert state["epoch"] == state["position"] // 250


@pytest.mark.s3
def test_resume_on_s3_endpoint(s3_storage):
    expect = {0: write_dataset(s3_storage, 120, rows_per_member=8, samples_per_shard=40)}
    ref = reference_stream(s3_storage, loader_cfg(), 240, expect)
    assert sorted(i for _, i in ref[:120]) == list(range(120))
    run = Ranks(s3_storage, loader_cfg(num_workers=1), 2, expect=expect)
    got = run.steps(9)
    state = run.state()
    run.close()
    run = Ranks(s3_storage, loader_cfg(), 1, state=state, expect=expect)
    got += run.steps((240 - len(got)) // 4)
    run.close()
    assert got == ref


def _id(loc, rows_per_member=16, samples_per_shard=100):
    """The sample id _write gave the row at a located (slot, shard, key, row)."""
    _, shard, key, row = loc
    return samples_per_shard * int(shard[-10:-4]) + rows_per_member * int(key) + row


def test_resume_reads_only_rows_it_delivers(ds250, monkeypatch):
    storage, expect = ds250
    cfg = loader_cfg(coalesce_gap_bytes=0, prefetch_members=1, shuffle_window=2)
    index = read_index(storage)
    deep = 250 + 100  # epoch 1, place 100
    loader = build_loader(cfg, storage)
    places = {loc: p for p, loc in enumerate(loader.dataset.locate(range(250, 500)))}

    counter = CountReads(monkeypatch)
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
    cfg = loader_cfg(coalesce_gap_bytes=0, prefetch_members=1)
    index = read_index(storage)
    counter = CountReads(monkeypatch)
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


def test_state_from_another_order_is_refused_and_json_roundtrips(ds250):
    storage, _ = ds250
    loader = build_loader(loader_cfg(), storage)
    it = iter(loader)
    next(it)
    next(it)
    it.close()
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["position"] == 8 and state["epoch"] == 0
    with pytest.raises(ValueError, match="another sample order"):
        build_loader(loader_cfg(seed=8), storage).load_state_dict(state)
    other = build_loader(loader_cfg(seed=8), storage)
    other.load_state_dict(state, strict=False)
    assert other.position == 8
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**state, "position": -1})


@pytest.mark.timeout(120)
def test_equal_batches_per_rank_with_fewer_shards_than_ranks_times_workers(local_storage):
    expect = {0: write_dataset(local_storage, 11, rows_per_member=16)}  # one shard, one member
    for epochs, steps in ((1, 1), (3, 4)):  # 11 samples, steps of 2 ranks x 4: floor(11e / 8)
        per_rank = []
        ids = []
        for r in range(2):
            loader = build_loader(loader_cfg(num_workers=2), local_storage, r, 2, epochs=epochs)
            batches = list(loader)
            per_rank.append(len(batches))
            ids.append([int(x) for b in batches for x in b[:, 0]])
            assert loader.position == steps * 8
        assert per_rank == [steps, steps]
        merged = [i for s in range(steps) for r in range(2) for i in ids[r][s * 4 : (s + 1) * 4]]
        assert sorted(merged[:8]) == sorted(set(merged[:8]))
    run = Ranks(local_storage, loader_cfg(num_workers=2), 2, expect=expect)  # endless: wraps over epochs
    got = run.steps(11)
    run.close()
    for e in range(8):
        assert sorted(i for _, i in got[e * 11 : (e + 1) * 11]) == list(range(11))


def test_bad_member_key_in_index_is_refused(ds250):
    storage, _ = ds250
    raw = json.loads(storage.read_bytes("shards/index.json"))
    raw["splits"]["train"]["shards"][0]["members"][0]["key"] = "../x"
    storage.write_bytes("shards/index.json", json.dumps(raw).encode())
    with pytest.raises(ShardIndexError, match="index.json.*dot-free"):
        build_loader(loader_cfg(), storage)


def test_unknown_split_and_config_are_clear_errors(ds250):
    storage, _ = ds250
    with pytest.raises(ValueError, match="no split 'val'|split 'val' has no samples"):
        build_loader(loader_cfg(), storage, split="val")
    with pytest.raises(Exception, match="weight"):
        LoaderConfig(datasets=[DatasetSpec(weight=0)])
    with pytest.raises(ValueError, match="rank"):
        build_loader(loader_cfg(), storage, rank=2, world_size=2)


def test_inputs_targets_and_facts(ds250):
    storage, _ = ds250
    loader = build_loader(loader_cfg(), storage)
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
        batches = list(build_loader(loader_cfg(out_dtype=out_dtype, num_workers=workers), storage, epochs=1))
        assert batches and all(b.dtype == dtype and b.shape == (4, SEQ + 1) for b in batches)
        streams[out_dtype] = torch.cat([tokens_to(b, "cpu") for b in batches])
        assert streams[out_dtype].dtype == torch.int64
    assert torch.equal(streams["int32"], streams["int64"]) and torch.equal(streams["native"], streams["int64"])
    assert int(streams["native"].max()) >= 1 << 15  # token ids above int16 survive every path
    with pytest.raises(ValueError, match="out_dtype"):
        ShardDataset(build_loader(loader_cfg(), storage).dataset.sources, [1.0], 4, out_dtype="int8")


def test_batches_kept_by_the_consumer_are_never_overwritten(ds250):
    """Window buffers are recycled; batches are fresh arrays. Hold two epochs' worth, check them after."""
    storage, expect = ds250
    loader = build_loader(loader_cfg(shuffle_window=2, prefetch_members=1), storage, epochs=2)
    held = list(loader)
    assert len(held) == 125
    ids = [int(i) for b in held for i in b[:, 0]]
    assert sorted(ids[:248]) != ids[:248] and len(set(ids[:248])) == 248
    for b in held:
        for row in b.numpy():
            np.testing.assert_array_equal(row, expect[0][row[0]])

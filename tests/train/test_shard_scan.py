"""Indexing foreign WebDataset tars: offsets as our writer's, outside URIs, unsafe members refused."""
import io
import os
import tarfile

import numpy as np
import pytest

from shardflow.storage import Storage
from shardflow.storage.shards import read_index, write_index
from shardflow.train.data import ShardDataError, build_index

from .conftest import SEQ, VOCAB, Ranks, loader_cfg, make_rows, write_dataset


def test_webdataset_shardwriter_shards_load_through_build_index(tmp_path):
    import webdataset as wds

    storage = Storage(str(tmp_path / "root"))
    os.makedirs(tmp_path / "root" / "shards")
    rows = make_rows(150, tag=0)
    blocks = [rows[i : i + 16] for i in range(0, 150, 16)]
    with wds.ShardWriter(str(tmp_path / "root" / "shards" / "train-%06d.tar"), maxcount=4, verbose=0) as sink:
        for j, block in enumerate(blocks):
            sink.write({"__key__": f"{j:06d}", "tokens.npy": block, "meta.json": {"j": j}})
    index = build_index(storage, "shards/train-{000000..000002}.tar", "train", vocab_size=VOCAB)
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert index["seq_len"] == SEQ and index["dtype"] == "uint16" and index["splits"]["train"]["samples"] == 150
    assert "uri" not in index["splits"]["train"]["shards"][0]
    write_index(storage, index)
    run = Ranks(storage, loader_cfg(), 1, expect={0: rows})
    got = run.steps(75)  # two epochs
    run.close()
    assert sorted(i for _, i in got[:150]) == list(range(150)) == sorted(i for _, i in got[150:])
    # Stock webdataset still reads them (we only added an index next to them).
    n = sum(len(s["tokens.npy"]) for s in wds.WebDataset(str(tmp_path / "root/shards/train-{000000..000002}.tar"),
                                                          shardshuffle=False).decode())
    assert n == 150


def test_build_index_reproduces_our_writer_offsets_and_records_outside_uris(local_storage, tmp_path):
    write_dataset(local_storage, 250)
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
    run = Ranks(local_storage, loader_cfg(), 1, expect={0: make_rows(250)})
    ids = run.steps(63)
    run.close()
    assert sorted(i for _, i in ids[:250]) == list(range(250))


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
    good = _npy(make_rows(4))
    if data == "object":
        data = _npy(np.array([[{"a": 1}] * (SEQ + 1)], dtype=object), allow_pickle=True)
    elif data == "fortran":
        data = _npy(np.asfortranarray(make_rows(4)))
    elif data is None:
        data = good
    _tar(tmp_path / "root" / "shards" / "train-000000.tar",
         [("000000.tokens.npy", good, tarfile.REGTYPE), (name, data, kind)])
    with pytest.raises(ShardDataError, match=match) as err:
        build_index(storage, "shards/train-000000.tar")
    assert "train-000000.tar" in str(err.value)

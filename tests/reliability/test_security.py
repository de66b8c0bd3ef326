"""Security: no pickle on the data path, safe tar member names, no leaked credentials, no shell.

The source checks parse the code (AST), so a mention in a comment or docstring is not a finding and
an aliased call is still one; each allowed exception is listed with the reason it is safe.
"""
from __future__ import annotations

import ast
import asyncio
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from shardflow.storage import Storage, StorageConfig

from . import REPO_ROOT, demo_lines, report, small_config

SOURCE_DIRS = ("dataprep", "flows", "train", "storage")

# (file, call text) -> why it is safe. Anything else matching a rule fails the test.
ALLOWED = {
    ("train/data_plan.py", "pickle.loads(pickle.dumps(src.storage))"):
        "deep-copies the process's own Storage handle in memory; no stored bytes are unpickled",
    ("train/checkpoint.py", "_MetadataUnpickler(io.BytesIO(f.read())).load()"):
        "DCP's .metadata is a pickle by design; read with an Unpickler that admits only DCP's metadata classes",
}


def _source_files():
    for d in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / d).rglob("*.py")):
            yield path, str(path.relative_to(REPO_ROOT))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def findings(tree: ast.AST, text: str, rel: str) -> list[str]:
    """Unsafe calls in one module: (de)serialisation that runs code, shells, eval."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            tail = func.rsplit(".", 1)[-1]
            if not (tail in ("load", "loads", "system", "popen", "getoutput", "getstatusoutput", "eval", "exec",
                             "extractall") or node.keywords):
                continue
            call = ast.unparse(node)
            if (rel, call) in ALLOWED:
                continue
            if func.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") and tail in ("load", "loads"):
                out.append(f"{rel}:{node.lineno}: {call[:80]} unpickles")
            elif tail in ("load", "loads") and isinstance(node.func, ast.Attribute) and "Unpickler" in func:
                out.append(f"{rel}:{node.lineno}: {call[:80]} unpickles")
            elif func == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
                out.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            elif func in ("np.load", "numpy.load") and not _is_const(_kw(node, "allow_pickle"), False):
                out.append(f"{rel}:{node.lineno}: np.load without allow_pickle=False")
            elif _is_const(_kw(node, "allow_pickle"), True):
                out.append(f"{rel}:{node.lineno}: allow_pickle=True")
            elif func == "yaml.load" and "SafeLoader" not in call:
                out.append(f"{rel}:{node.lineno}: yaml.load without SafeLoader")
            elif _is_const(_kw(node, "shell"), True):
                out.append(f"{rel}:{node.lineno}: shell=True")
            elif func in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                          "commands.getoutput", "eval", "exec"):
                out.append(f"{rel}:{node.lineno}: {func}")
            elif func.endswith("extractall") and _kw(node, "filter") is None:
                out.append(f"{rel}:{node.lineno}: tar extractall without a member filter")
        elif isinstance(node, ast.ClassDef):
            if any("Unpickler" in ast.unparse(b) for b in node.bases):
                if not any(r == rel and "_MetadataUnpickler" in c for r, c in ALLOWED) or node.name != "_MetadataUnpickler":
                    out.append(f"{rel}:{node.lineno}: Unpickler subclass {node.name}")
    return out


def test_no_pickle_shell_or_eval_in_the_source_tree():
    problems, seen = [], 0
    for path, rel in _source_files():
        text = path.read_text(encoding="utf-8")
        problems += findings(ast.parse(text), text, rel)
        seen += 1
    assert seen > 30
    assert not problems, "\n".join(problems)
    report("security", check="source_scan", files=seen, findings=0, allowed=len(ALLOWED))


def test_source_checks_catch_what_they_are_for():
    bad = ("import pickle, torch, numpy as np, os, subprocess, yaml\n"
           "pickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p)\n"
           "np.load(p, allow_pickle=True)\nsubprocess.run(c, shell=True)\nos.system(c)\nyaml.load(s)\neval(s)\n")
    got = findings(ast.parse(bad), bad, "x.py")
    assert len(got) == 9, got
    ok = "torch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\nsubprocess.run([a, b])\nyaml.safe_load(s)\n"
    assert findings(ast.parse(ok), ok, "x.py") == []


# -- shards written by someone else ----------------------------------------------------------------

def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


GOOD_BLOCK = _npy(np.arange(2 * 9, dtype="<u2").reshape(2, 9))


@pytest.mark.parametrize("members,match", [
    ([("000000.tokens.npy", GOOD_BLOCK), ("000000.pyd", b"\x80\x04K\x01.")], "pickled formats"),
    ([("000000.pickle", b"\x80\x04K\x01.")], "pickled formats"),
    ([("000000.pth", b"\x80\x04K\x01.")], "pickled formats"),
    ([("000000.tokens.npy", _npy(np.array([{"x": 1}, None], dtype=object), allow_pickle=True))], "pickle"),
    ([("../evil.tokens.npy", GOOD_BLOCK)], r"'\.\.'|invalid member name"),
    ([("/etc/evil.tokens.npy", GOOD_BLOCK)], "absolute"),
    ([("a/../../evil.tokens.npy", GOOD_BLOCK)], r"'\.\.'|invalid member name"),
])
def test_loader_refuses_pickles_and_unsafe_member_paths(tmp_path, members, match):
    from shardflow.train.data import ShardDataError, build_index

    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes("shards/train-000000.tar", _tar(members))
    with pytest.raises(ShardDataError, match=match) as err:
        build_index(storage, "shards/*.tar")
    assert "train-000000.tar" in str(err.value)  # names the shard


def test_a_good_foreign_tar_is_accepted(tmp_path):
    """The refusals above are about the members, not about foreign tars as such."""
    from shardflow.train.data import build_index

    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes("shards/train-000000.tar", _tar([("000000.tokens.npy", GOOD_BLOCK)]))
    index = build_index(storage, "shards/*.tar", vocab_size=100)
    assert index["splits"]["train"]["samples"] == 2


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../x.tar", "a\\b.tar"])
def test_index_naming_a_path_outside_the_root_is_refused(tmp_path, name):
    from shardflow.storage.shards import shard_ref

    with pytest.raises(ValueError, match="invalid member name"):
        shard_ref(name)


# -- shell metacharacters in config values -----------------------------------------------------------

def test_run_name_with_shell_metacharacters_is_rejected(tmp_path):
    from shardflow.flows.cli import main

    marker = tmp_path / f"pwned-{uuid.uuid4().hex[:8]}"
    for value in (f"x; touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "../../etc"):
        assert main(["config", "validate", "--set", f"train.run={value}"]) == 2
    assert not marker.exists()


def test_metacharacters_in_paths_are_data_not_commands(tmp_path):
    """A root and an input path full of shell syntax are just names: nothing is executed."""
    from shardflow.dataprep.stage import run_stage
    from shardflow.dataprep.stages import build_stages, select_stages

    from . import small_prep_config

    name = f"pwned-{uuid.uuid4().hex[:8]}"
    weird = tmp_path / f"in; touch {name} $(touch {name}) `touch {name}` && rm -rf x"
    weird.mkdir()
    (weird / "a.jsonl").write_bytes(b"".join(demo_lines()[:30]))
    root = tmp_path / f"root | touch {name}"
    prep, _ = small_prep_config(str(root), str(weird / "a.jsonl"))
    storage = Storage(str(root))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        for st in select_stages(build_stages(prep), "clean"):
            assert not run_stage(st, storage)["failed"]
    finally:
        os.chdir(cwd)
    assert len(storage.list("stages/clean", suffix=".jsonl.zst")) == 1
    assert not any(p.name == name for d in (tmp_path, cwd, weird, root) for p in d.iterdir())


# -- credentials ---------------------------------------------------------------------------------------

SECRET = "PLANTED+secret/" + uuid.uuid4().hex
KEY_ID = "AKIAPLANTED" + uuid.uuid4().hex[:9].upper()


def _all_text_under(storage_cfg: StorageConfig, endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _flow_logs(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    async def read():
        # Raw filter body (as tests/flows/conftest.py does): this Prefect's typed client sends
        # nulls the server rejects.
        async with get_client() as client:
            resp = await client._client.post("/logs/filter", json={
                "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": 0, "sort": "TIMESTAMP_ASC"})
            resp.raise_for_status()
            return resp.json()

    return "\n".join(str(log.get("message")) for log in asyncio.run(read()))


@pytest.mark.s3
@pytest.mark.usefixtures("prefect_server")
def test_credentials_never_appear_in_logs_outputs_configs_artifacts_or_errors(s3_endpoint, s3_bucket, capfd, caplog, tmp_path):
    import logging

    import boto3

    from shardflow.flows.prep_flows import run_prep

    from tests.flows.conftest import flow_artifacts

    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="shardflow")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y")
    lines = demo_lines()[:240]
    for i in range(2):
        client.put_object(Bucket=s3_bucket, Key=f"in/part-{i}.jsonl", Body=b"".join(lines[i::2]))
    storage_cfg = StorageConfig(root=f"s3://{s3_bucket}/root", endpoint_url=s3_endpoint, key=KEY_ID, secret=SECRET,
                                region="us-east-1")
    cfg = small_config(f"s3://{s3_bucket}/root", f"s3://{s3_bucket}/in/*.jsonl", "flows.runner=thread")
    cfg = cfg.model_copy(update={"storage": storage_cfg})
    out = run_prep(cfg)
    assert out["ok"], out
    # An error path too: a missing input, and a storage error raised with the secret in hand.
    bad = run_prep(cfg.model_copy(update={"prep": cfg.prep.model_copy(update={"inputs": [f"s3://{s3_bucket}/nope/*.jsonl"]})}))
    assert not bad["ok"]
    st = Storage.from_config(storage_cfg)
    errors = []
    for call in (lambda: st.read_bytes("s3://no-such-bucket-here/x"), lambda: st.read_range("pipeline.yaml", 10 ** 9, 5)):
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc!r} {exc}")
    assert errors
    captured = capfd.readouterr()
    haystacks = {
        "stdout": captured.out, "stderr": captured.err, "python logs": caplog.text,
        "resolved config": json.dumps(cfg.resolved()) + repr(cfg) + str(cfg) + cfg.model_dump_json(),
        "errors": "\n".join(errors) + bad["error"],
        "prefect logs": _flow_logs(out["flow_run_id"]) + _flow_logs(bad["flow_run_id"]),
        "prefect artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in flow_artifacts(out["flow_run_id"]).values()),
        "storage repr": repr(st) + repr(st.config),
    }
    objects = _all_text_under(storage_cfg, s3_endpoint, s3_bucket)
    assert any(k.endswith("pipeline.yaml") for k in objects) and any(k.endswith(".tar") for k in objects)
    for k, v in objects.items():
        haystacks[f"object {k}"] = v.decode("latin-1")
    # Prefect ships logs to the API in batches (and this suite logs at WARNING): whatever arrived
    # is searched; artifacts are written synchronously and must be there.
    assert haystacks["prefect artifacts"]
    for where, text in haystacks.items():
        for secret in (SECRET, KEY_ID):
            assert secret not in text, f"credential found in {where}"
    report("security", check="credentials", places_searched=len(haystacks), objects=len(objects), leaks=0)

"""Reliability and security suites: shared corpus, configs, kill hooks and root invariants.

Why the helpers live here and not in a conftest: ``bench/reliability.py`` and the child processes the
crash suite starts import them too (``from tests.reliability import ...`` with the repository root on
``PYTHONPATH``), and they must agree with the tests on what "a small pipeline" and "a sound root" are.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings of the small real-text pipeline every suite runs: the demo corpus's filter relaxations
# (technical documentation), a tiny tokenizer and short sequences so a whole prep takes seconds.
SMALL_PREP: list[str] = [
    "prep.workers=2",
    "prep.tokenizer.vocab_size=512",
    "prep.tokenizer.sample_docs=500",
    "prep.tokenize.seq_len=64",
    "prep.tokenize.samples_per_shard=256",
    "prep.filter.c4.filter_curly_bracket=false",
    "prep.filter.c4.filter_no_terminal_punct=false",
    "prep.filter.c4.min_num_sentences=2",
    "prep.filter.fineweb.line_punct_thr=0.0",
    "prep.filter.fineweb.short_line_thr=0.9",
    "prep.filter.gopher_quality.max_symbol_word_ratio=0.3",
]


def demo_lines() -> list[bytes]:
    """The bundled real-text demo corpus, one JSONL line each (malformed lines included)."""
    from shardflow.dataprep.demo_corpus import demo_corpus_lines

    return demo_corpus_lines()


def write_small_corpus(directory: Path, n_lines: int = 600, n_files: int = 3) -> list[Path]:
    """The first ``n_lines`` demo lines dealt round-robin into ``n_files`` JSONL files."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = demo_lines()[:n_lines]
    paths = []
    for i in range(n_files):
        p = directory / f"part-{i}.jsonl"
        p.write_bytes(b"".join(lines[i::n_files]))
        paths.append(p)
    return paths


def small_config(root: str, inputs_glob: str, *overrides: str):
    """A PipelineConfig for the small pipeline (``flows.config.load_config`` validates it)."""
    from shardflow.flows.config import load_config

    return load_config(None, [f"storage.root={root}", f"prep.inputs=['{inputs_glob}']", *SMALL_PREP,
                              "flows.runner=sequential", "flows.retry_delay_s=0.05", *overrides])


def small_prep_config(root: str, inputs_glob: str, *overrides: str):
    """(PrepConfig, StorageConfig) of the small pipeline without importing flows (no Prefect import)."""
    from shardflow.dataprep.config import PrepConfig
    from shardflow.storage import StorageConfig
    from shardflow.storage.config import apply_override

    data: dict[str, Any] = {"prep": {"inputs": [inputs_glob]}}
    for ov in (*SMALL_PREP, *overrides):
        assert ov.startswith("prep."), ov
        apply_override(data, ov)  # the CLI's own --set parsing
    return PrepConfig.model_validate(data["prep"]), StorageConfig(root=root)


def report(suite: str, **fields: Any) -> None:
    """One machine-readable figure line (``bench/reliability.py`` collects them from ``pytest -s``)."""
    print("RELIABILITY " + json.dumps({"suite": suite, **fields}, sort_keys=True), flush=True)


# -- kill hook: SIGKILL at the n-th write event ---------------------------------------------------

class _CountingFile:
    """A file proxy that counts writes; at the fatal one it writes half the buffer, flushes, dies."""

    def __init__(self, f, hook: "KillHook"):
        self._f, self._hook = f, hook

    def write(self, data):
        if self._hook.tick(fatal_soon=True):
            view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
            self._f.write(bytes(view[: max(len(view) // 2, 1)]))
            self._f.flush()
            self._hook.die()
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class KillHook:
    """Counts write events of :meth:`Storage.atomic_write` (open, every write call, before publish,
    after publish) and read calls, and SIGKILLs this process at event ``kill_at`` (0 = never, only count).

    Why events rather than wall-clock delays: a seeded event number names the same instant on every
    machine however loaded (a delay mostly lands in the interpreter start-up on a busy 2-core runner),
    and the events are exactly the instants that matter — mid-file, file complete but unpublished,
    published but not yet recorded in the manifest, record published.
    """

    def __init__(self, kill_at: int = 0):
        self.kill_at, self.events = kill_at, 0
        self._orig = None

    def tick(self, fatal_soon: bool = False) -> bool:
        self.events += 1
        if self.kill_at and self.events == self.kill_at:
            if fatal_soon:
                return True
            self.die()
        return False

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> "KillHook":
        from shardflow.storage import store

        orig = self._orig = store.Storage.atomic_write
        hook = self

        @contextlib.contextmanager
        def atomic_write(storage, ref):
            hook.tick()
            with orig(storage, ref) as f:
                yield _CountingFile(f, hook)
                hook.tick()  # every byte handed over, not yet published
            hook.tick()  # published under its final name

        store.Storage.atomic_write = atomic_write
        # Reads count too: a kill while a stage is still reading its inputs (or the tokenizer its
        # sample) is an instant like any other, with nothing under way to publish.
        self._orig_reads = {}
        for name in ("open_read", "read_bytes", "read_range"):
            orig_read = getattr(store.Storage, name)
            self._orig_reads[name] = orig_read

            def counted(storage, *a, _orig_fn=orig_read, **kw):
                hook.tick()
                return _orig_fn(storage, *a, **kw)

            setattr(store.Storage, name, counted)
        return self

    def uninstall(self) -> None:
        from shardflow.storage import store

        if self._orig is not None:
            store.Storage.atomic_write = self._orig
            self._orig = None
        for name, orig_read in getattr(self, "_orig_reads", {}).items():
            setattr(store.Storage, name, orig_read)
        self._orig_reads = {}

    def __enter__(self) -> "KillHook":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


CHILD_STAGE_SCRIPT = r"""
import json, sys
from tests.reliability import KillHook
from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stages import build_stages
from shardflow.dataprep.stage import run_stage
from shardflow.storage import Storage
args = json.loads(sys.argv[1])
prep = PrepConfig.model_validate(args["prep"])
storage = Storage(args["root"])
stages = [st for st in build_stages(prep) if st.name in args["stages"]]  # stage names, not CLI groups
hook = KillHook(args["kill_at"]).install()
for st in stages:
    r = run_stage(st, storage)
    if r["failed"]:
        print(json.dumps(r)); sys.exit(3)
print(json.dumps({"events": hook.events}))
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_stage_child(prep, root: str, stages: list[str], kill_at: int, timeout: float = 300):
    """Run ``stages`` on ``root`` in a fresh interpreter that SIGKILLs itself at write event ``kill_at``."""
    import subprocess
    import sys

    arg = json.dumps({"prep": prep.model_dump(mode="json"), "root": root, "stages": stages, "kill_at": kill_at})
    return subprocess.run([sys.executable, "-c", CHILD_STAGE_SCRIPT, arg], env=child_env(), cwd=str(REPO_ROOT),
                          capture_output=True, timeout=timeout)


# -- what a sound root looks like -----------------------------------------------------------------

TEMP_PREFIX = ".sftmp-"
VOLATILE = ("_lock.json", "pipeline.yaml")


def final_files(root: str | Path) -> list[str]:
    """Relative paths of every file under a final name (temporaries of a killed writer excluded)."""
    root = str(root)
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.startswith(TEMP_PREFIX):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def temp_litter(root: str | Path) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), str(root)) for d, _, fs in os.walk(str(root)) for f in fs
            if f.startswith(TEMP_PREFIX)]


def check_tar_complete(data: bytes, where: str) -> int:
    """Every member of a tar reads completely and the archive ends properly; returns member count."""
    assert len(data) % 512 == 0, f"{where}: {len(data)} bytes is not whole tar blocks (truncated)"
    assert data[-1024:] == b"\0" * 1024, f"{where}: no end-of-archive marker (truncated)"
    n = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            if m.isfile():
                got = tf.extractfile(m).read()
                assert len(got) == m.size, f"{where}: member {m.name} truncated"
            n += 1
    return n


def check_root_sound(root: str | Path) -> dict[str, int]:
    """Nothing under a final name is partial: the invariant that must hold at every kill point.

    Every output a done manifest record lists hashes as recorded; every .jsonl.zst decompresses to
    the end and every line is JSON; every Parquet file reads; every JSON file parses; every tar is
    complete and, when listed in shards/index.json, matches it; a tokenizer.json names the digest of
    the spm.model beside it.
    """
    import pyarrow.parquet as pq
    import zstandard

    from shardflow.storage import Storage, digest_bytes
    from shardflow.storage.manifest import index_ref, list_records, list_stages, manifest_dir, record_ref, verify_outputs
    from shardflow.storage.record_index import decode_index

    root = str(root)
    storage = Storage(root)
    checked = {"records": 0, "zst": 0, "parquet": 0, "json": 0, "tar": 0}
    checked["index_entries"] = 0
    for stage in list_stages(storage):
        for sid, rec in list_records(storage, stage).items():
            if rec.status == "done":
                problems = verify_outputs(storage, rec, deep=True)
                assert not problems, f"{stage}/{sid}: done record whose outputs do not verify: {problems}"
                checked["records"] += 1
        # The record index may lag its record files, but an entry whose fingerprint is the file's
        # current one must hold exactly that file's record (else a plan would trust a wrong record).
        try:
            indexed = decode_index(stage, storage.read_bytes(index_ref(stage)))
        except FileNotFoundError:
            indexed = {}
        listed = storage.stat_dir(manifest_dir(stage))
        for sid, (fp, entry) in indexed.items():
            st = listed.get(f"{sid}.json")
            if st is not None and st.fingerprint == fp:
                assert entry == json.loads(storage.read_bytes(record_ref(stage, sid))), f"{stage}/{sid}: index entry differs from its record"
                checked["index_entries"] += 1
    for rel in final_files(root):
        path = os.path.join(root, rel)
        if rel.endswith(".zst"):
            with open(path, "rb") as f:
                raw = zstandard.ZstdDecompressor().stream_reader(f).read()  # raises on truncation
            with open(path, "rb") as f:
                dobj = zstandard.ZstdDecompressor().decompressobj()
                dobj.decompress(f.read())
                assert dobj.eof, f"{rel}: zstd frame incomplete (truncated)"
            for i, line in enumerate(raw.splitlines()):
                json.loads(line), f"{rel}:{i + 1}"
            checked["zst"] += 1
        elif rel.endswith(".parquet"):
            pq.read_table(path)
            checked["parquet"] += 1
        elif rel.endswith(".json"):
            with open(path, "rb") as f:
                json.loads(f.read())
            checked["json"] += 1
        elif rel.endswith(".tar"):
            with open(path, "rb") as f:
                check_tar_complete(f.read(), rel)
            checked["tar"] += 1
    index_path = os.path.join(root, "shards", "index.json")
    if os.path.exists(index_path):
        from shardflow.storage.shards import read_index, verify_shard

        index = read_index(storage)
        for split in index["splits"].values():
            for entry in split["shards"]:
                assert not verify_shard(storage, entry, deep=True), f"index lists {entry['name']} but it does not verify"
    meta_path = os.path.join(root, "tokenizer", "tokenizer.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(root, "tokenizer", "spm.model"), "rb") as f:
            assert digest_bytes(f.read()) == meta["model_digest"], "tokenizer.json does not describe spm.model"
    return checked


def snapshot(root: str | Path) -> dict[str, Any]:
    """Everything under final names, bytes for outputs; manifest records minus their timings."""
    root = str(root)
    out: dict[str, Any] = {}
    for rel in final_files(root):
        if rel in VOLATILE:
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        if rel.endswith("/_manifest/_index.json.zst"):
            continue  # a cache of the records beside this copy's fingerprints; soundness checks it
        if "/_manifest/" in rel:
            rec = json.loads(data)
            for k in ("wall_time_s", "finished_at", "fingerprints"):  # fingerprints: mtimes/ETags of this copy
                rec.pop(k, None)
            for o in rec.get("outputs", {}).values():
                o.pop("fingerprint", None)
            out[rel] = rec
        else:
            out[rel] = data
    return out


def diff_snapshots(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    problems = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
    problems += [f"differs {k}" for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    return problems


def copy_root(src: str | Path, dst: str | Path) -> None:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(f"{TEMP_PREFIX}*", "_lock.json"))

"""Reprocessing at corpus scale (issue 14): what a no-op re-run and a 1 % append cost against a full run.

For each backend (a local root, and a root on an S3 endpoint: moto over HTTP on 127.0.0.1, started
here in a process of its own), with the inputs on that same backend:

1. full run: every data-prep stage over the first ``--files`` files, in this process, one shard
   after another (``run_stage``), timed;
2. no-op: ``shardflow prep all``'s planning (flows/preplan.py: metadata only, what the CLI does
   before it would start Prefect), timed, with every byte it reads counted; and, locally, the CLI
   itself as a subprocess (interpreter start-up and imports included);
3. append: ``--add`` new files (1 % of the count) arrive; the re-run is timed and must run only
   their shards in the per-shard stages; the pack appends (dataprep/pack_append.py) and every
   earlier tar must be left byte-identical;
4. union: a from-scratch run over all files in a fresh root, compared byte for byte with the
   appended root: clean, filter, dedup outputs and quarantine files and tokenize streams given the
   same tokenizer (the union root gets the appended root's tokenizer, since a trained tokenizer is
   kept when data is appended, see dataprep/tokenizer.py); then the appended root's pack is
   compacted (``pack --force``) and its tars and index compared with the union's.

Bytes read are counted by wrapping the Storage read paths (whole-object reads, ranged reads and
streams), split into manifest records (record files and the per-stage record index) and data.
Ratios are within one run on one machine.

Usage::

    python bench/make_corpus.py --out bench/_data/reprocess --target-mb 50 --shards 202 --skip-missing
    python bench/reprocess.py --corpus bench/_data/reprocess --files 200 --add 2 [--backends local,s3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # the moto endpoint's, nothing real
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from shardflow.dataprep.dedup_common import DROP_DIR  # noqa: E402
from shardflow.dataprep.stage import run_stage, shard_id_for  # noqa: E402
from shardflow.dataprep.stages import build_stages  # noqa: E402
from shardflow.dataprep.tokenize import PackStage  # noqa: E402
from shardflow.flows.config import load_config  # noqa: E402
from shardflow.flows.preplan import preplan  # noqa: E402
from shardflow.storage import Storage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# -- counting bytes read ----------------------------------------------------------------------------

class ReadMeter:
    """Counts bytes returned by Storage's read paths, split into manifest records and data."""

    def __init__(self):
        self.manifest = self.data = 0
        self.objects = 0

    def add(self, ref: str, n: int) -> None:
        self.objects += 1
        if "/_manifest/" in str(ref) or str(ref).endswith("_lock.json"):
            self.manifest += n
        else:
            self.data += n

    def reset(self) -> None:
        self.manifest = self.data = self.objects = 0


METER = ReadMeter()


class _CountingFile(io.RawIOBase):
    def __init__(self, f, ref):
        self._f, self._ref = f, ref

    def read(self, n=-1):
        b = self._f.read(n)
        METER.add(self._ref, len(b))
        return b

    def readinto(self, buf):
        b = self._f.read(len(buf))
        buf[: len(b)] = b
        METER.add(self._ref, len(b))
        return len(b)

    def readable(self):
        return True

    def seekable(self):
        return self._f.seekable()

    def seek(self, *a):
        return self._f.seek(*a)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()
        super().close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def install_meter() -> None:
    orig_open, orig_bytes, orig_range, orig_many = Storage.open_read, Storage.read_bytes, Storage.read_range, Storage.read_many

    def open_read(self, ref, *a, **kw):
        return _CountingFile(orig_open(self, ref, *a, **kw), ref)

    def read_bytes(self, ref):
        b = orig_bytes(self, ref)
        METER.add(ref, len(b))
        return b

    def read_range(self, ref, start, length):
        b = orig_range(self, ref, start, length)
        METER.add(ref, len(b))
        return b

    def read_many(self, refs):
        if all(self.protocol_of(r) == "file" for r in refs):
            return orig_many(self, refs)  # goes through read_bytes, counted there
        got = orig_many(self, refs)
        for ref, b in got.items():
            METER.add(ref, len(b))
        return got

    Storage.open_read, Storage.read_bytes, Storage.read_range, Storage.read_many = open_read, read_bytes, read_range, read_many


# -- the pipeline -------------------------------------------------------------------------------------

PREP = [
    # Technical documentation: relax the web-boilerplate rules as the demo does.
    "prep.filter.c4.filter_curly_bracket=false", "prep.filter.c4.filter_no_terminal_punct=false",
    "prep.filter.c4.min_num_sentences=2", "prep.filter.fineweb.line_punct_thr=0.0", "prep.filter.fineweb.short_line_thr=0.9",
    "prep.filter.gopher_quality.max_symbol_word_ratio=0.3",
    "prep.tokenizer.vocab_size=4000", "prep.tokenizer.sample_docs=4000",
    "prep.tokenize.seq_len=256", "prep.tokenize.samples_per_shard=2048", "prep.tokenize.num_threads=1",
]


def config(root: str, inputs: str, endpoint: str | None):
    extra = [f"storage.endpoint_url={endpoint}", "storage.key=testing", "storage.secret=testing", "storage.region=us-east-1"] if endpoint else []
    return load_config(None, [f"storage.root={root}", f"prep.inputs=['{inputs}']", *extra, *PREP])


def run_all(cfg) -> dict[str, dict]:
    storage = cfg.storage_handle()
    out = {}
    for stage in build_stages(cfg.prep):
        t0 = time.perf_counter()
        res = run_stage(stage, storage)
        if res["failed"]:
            raise RuntimeError(f"stage {stage.name} failed: {res['failed']}")
        out[stage.name] = {k: len(v) for k, v in res.items() if k in ("ran", "skipped", "retired")}
        out[stage.name]["s"] = round(time.perf_counter() - t0, 2)
    return out


def timed(fn, *a, **kw):
    METER.reset()
    t0 = time.perf_counter()
    result = fn(*a, **kw)
    return result, time.perf_counter() - t0, (METER.manifest, METER.data, METER.objects)


def put_inputs(storage: Storage, files: list[Path]) -> int:
    n = 0
    for f in files:
        storage.write_bytes(f"in/{f.name}", f.read_bytes())
        n += f.stat().st_size
    return n


COMPARED = ("stages/clean/", "stages/filter/", "stages/dedup/", "quarantine/", "stages/tokenize/", "shards/")


def tree(storage: Storage, prefixes: tuple[str, ...] = COMPARED) -> dict[str, bytes]:
    fs, root = storage.resolve("")
    out = {}
    for path in fs.find(root):
        rel = path[len(root.rstrip("/")) + 1:]
        if rel.startswith(prefixes) and "/_manifest/" not in rel and ".sftmp-" not in rel:
            out[rel] = storage.read_bytes(rel)
    return out


def dedup_differences(appended: Storage, union: Storage, new_shards: set[str]) -> dict[str, int]:
    """Where append-mode dedup and a from-scratch recompute removed different documents.

    Append mode's rule (docs/dedup.md): earlier decisions are final (the earlier drop lists stay
    byte-identical, checked separately), and new documents are decided against the documents kept
    earlier. A recompute re-clusters everything, so with the new documents present it can remove an
    earlier document (in favour of a new one, or re-clustered around one: greedy star clustering
    ripples), keep an earlier document the first run removed, and keep a new document that append
    removed against an earlier survivor, or the reverse. Counted by kind."""
    import pyarrow.parquet as pq

    def drops(storage: Storage) -> dict[str, dict]:
        out = {}
        for name in storage.list(DROP_DIR, suffix=".parquet"):
            with storage.open_read(f"{DROP_DIR}/{name}") as f:
                for row in pq.read_table(f, columns=["id", "survivor", "survivor_shard"]).to_pylist():
                    out[row["id"]] = {**row, "shard": name[: -len(".parquet")]}
        return out

    a, u = drops(appended), drops(union)
    kinds = {"earlier_kept_recompute_removes_for_new": 0, "earlier_kept_recompute_removes_reclustered": 0,
             "earlier_removed_first_run_recompute_keeps": 0, "new_removed_by_append_only": 0,
             "new_removed_by_recompute_only": 0}
    for doc_id in set(a) ^ set(u):
        row = u.get(doc_id) or a[doc_id]
        if row["shard"] in new_shards:
            kinds["new_removed_by_append_only" if doc_id in a else "new_removed_by_recompute_only"] += 1
        elif doc_id in a:
            kinds["earlier_removed_first_run_recompute_keeps"] += 1
        elif u[doc_id]["survivor_shard"] in new_shards:
            kinds["earlier_kept_recompute_removes_for_new"] += 1
        else:
            kinds["earlier_kept_recompute_removes_reclustered"] += 1
    kinds["dropped_appended"], kinds["dropped_union"] = len(a), len(u)
    return kinds


def copy_tokenizer(src: Storage, dst: Storage) -> None:
    for ref in src.list("tokenizer"):
        dst.write_bytes(f"tokenizer/{ref}", src.read_bytes(f"tokenizer/{ref}"))
    dst.write_bytes("stages/tokenizer/_manifest/_all.json", src.read_bytes("stages/tokenizer/_manifest/_all.json"))


def cli_noop(cfg_overrides: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "shardflow.flows.cli", "prep", "all", *[a for o in cfg_overrides for a in ("--set", o)]],
                          capture_output=True, text=True, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "nothing to do" not in proc.stdout:
        raise RuntimeError(f"CLI no-op did not say 'nothing to do': {proc.stdout[-500:]} {proc.stderr[-1500:]}")
    return wall


def bench_backend(name: str, base_files: list[Path], new_files: list[Path], work: Path, endpoint: str | None,
                  union_check: bool = True) -> dict:
    if endpoint:
        import boto3

        bucket = f"reprocess-{int(time.time())}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        loc = f"s3://{bucket}"
    else:
        loc = str(work / name)
    inputs = Storage(f"{loc}/corpus", config(f"{loc}/corpus", "x", endpoint).storage)
    in_bytes = put_inputs(inputs, base_files)
    glob = inputs.uri("in/*.jsonl.zst")
    cfg = config(f"{loc}/root", glob, endpoint)
    print(f"[{name}] {len(base_files)} files, {in_bytes / 1e6:.1f} MB compressed input; full run ...", flush=True)
    full, full_s, full_read = timed(run_all, cfg)
    pre, noop_s, noop_read = timed(preplan, cfg)
    assert pre.nothing_to_do, pre.work
    again, rerun_s, _ = timed(run_all, cfg)  # the in-process re-run path too: it must run nothing
    assert all(v["ran"] == 0 and v["retired"] == 0 for v in again.values()), again
    overrides = [f"storage.root={loc}/root", f"prep.inputs=['{glob}']", *PREP] + (
        [f"storage.endpoint_url={endpoint}", "storage.key=testing", "storage.secret=testing"] if endpoint else [])
    cli_s = cli_noop(overrides)
    print(f"[{name}] full {full_s:.1f}s, no-op plan {noop_s:.2f}s, CLI no-op {cli_s:.2f}s; appending {len(new_files)} file(s) ...", flush=True)
    shards_before = tree(cfg.storage_handle(), ("shards/",))
    drops_before = tree(cfg.storage_handle(), (DROP_DIR + "/",))
    add_bytes = put_inputs(inputs, new_files)
    added, add_s, add_read = timed(run_all, cfg)
    shards_after = tree(cfg.storage_handle(), ("shards/",))
    tars_kept = sum(shards_after.get(k) == v for k, v in shards_before.items() if k.endswith(".tar"))
    tars_before = sum(k.endswith(".tar") for k in shards_before)
    tars_new = sum(k.endswith(".tar") and k not in shards_before for k in shards_after)
    drops_after = tree(cfg.storage_handle(), (DROP_DIR + "/",))
    drops_kept = sum(drops_after.get(k) == v for k, v in drops_before.items())
    per_shard = {s: v["ran"] for s, v in added.items() if s in ("clean", "filter", "dedup_signatures", "dedup", "tokenize")}
    print(f"[{name}] append {add_s:.1f}s ({added}); from-scratch union ...", flush=True)
    a = b = {}
    union_s = 0.0
    if union_check:
        union_cfg = config(f"{loc}/union", glob, endpoint)
        union = union_cfg.storage_handle()
        t0 = time.perf_counter()
        for stage in build_stages(union_cfg.prep):
            if stage.name == "tokenizer":
                copy_tokenizer(cfg.storage_handle(), union)
            res = run_stage(stage, union)
            assert not res["failed"], res
        union_s = time.perf_counter() - t0
        # The append-only pack is not laid out as a from-scratch pack (docs/architecture.md):
        # everything else is compared as it is; the tars after compacting (pack --force).
        unpacked = tuple(c for c in COMPARED if c != "shards/")
        a, b = tree(cfg.storage_handle(), unpacked), tree(union, unpacked)
        run_stage(PackStage(cfg.prep), cfg.storage_handle(), force=True)
        a.update(tree(cfg.storage_handle(), ("shards/",)))
        b.update(tree(union, ("shards/",)))
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    dedup_diff = {}
    if union_check:
        new_shards = {shard_id_for(inputs.uri(f"in/{f.name}")) for f in new_files}
        dedup_diff = dedup_differences(cfg.storage_handle(), union, new_shards)
    gb = (in_bytes + add_bytes) / 1e9
    return {
        "backend": name, "files": len(base_files), "added": len(new_files), "input_mb_compressed": round(in_bytes / 1e6, 2),
        "full_s": round(full_s, 2), "full_read_mb": round((full_read[0] + full_read[1]) / 1e6, 1),
        "noop_plan_s": round(noop_s, 3), "noop_cli_s": round(cli_s, 2), "noop_rerun_in_process_s": round(rerun_s, 2),
        "noop_ratio": round(noop_s / full_s, 4), "noop_cli_ratio": round(cli_s / full_s, 4),
        "noop_read_manifest_kb": round(noop_read[0] / 1e3, 1), "noop_read_data_bytes": noop_read[1],
        "noop_read_mb_per_gb_input": round((noop_read[0] + noop_read[1]) / 1e6 / (in_bytes / 1e9), 2),
        "full_stage_s": {k: v["s"] for k, v in full.items()}, "append_stage_s": {k: v["s"] for k, v in added.items()},
        "append_s": round(add_s, 2), "append_ratio": round(add_s / full_s, 4), "append_ran_per_shard_stages": per_shard,
        "append_read_mb": round((add_read[0] + add_read[1]) / 1e6, 1),
        "append_tars_untouched": f"{tars_kept}/{tars_before}", "append_tars_new": tars_new,
        "append_earlier_drop_lists_unchanged": f"{drops_kept}/{len(drops_before)}",
        "union_s": round(union_s, 2), "files_compared": len(set(a) | set(b)), "files_differing": differ[:20],
        "n_differing": len(differ), "gb_input": round(gb, 4), "dedup_differences": dedup_diff,
        "differing_outside_dedup_semantics": [k for k in differ if not k.startswith(("stages/dedup/", "stages/tokenize/", "shards/"))],
    }


class _MotoProcess:
    """moto's S3 server in a process of its own, so its request handling does not compete for
    this process's GIL with the stage work being measured."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_moto() -> tuple[object, str]:
    server = _MotoProcess()
    return server, f"http://127.0.0.1:{server.port}"


def main(argv=None) -> int:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="folder of *.jsonl.zst files (bench/make_corpus.py)")
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--add", type=int, default=2, help="files appended after the full run (default 2 = 1 %% of 200)")
    ap.add_argument("--backends", default="local,s3")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-union", action="store_true", help="skip the from-scratch run on the union (halves the time)")
    args = ap.parse_args(argv)
    files = sorted(args.corpus.glob("*.jsonl.zst"))
    if len(files) < args.files + args.add:
        ap.error(f"{args.corpus} has {len(files)} files, need {args.files + args.add}")
    # Appended files are interleaved with the others by name (every k-th file), so new shard ids
    # sort between old ones: a position-based id would renumber everything after the first.
    step = (args.files + args.add) // max(args.add, 1)
    chosen = files[: args.files + args.add]
    new = [f for i, f in enumerate(chosen) if args.add and i % step == step // 2][: args.add]
    base = [f for f in chosen if f not in new]
    install_meter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shardflow-reprocess-"))
    results = []
    server = None
    try:
        for backend in args.backends.split(","):
            endpoint = None
            if backend == "s3":
                server, endpoint = start_moto()
            results.append(bench_backend(backend, base, new, work, endpoint, union_check=not args.no_union))
    finally:
        if server is not None:
            server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for r in results:
        print(json.dumps(r))
        print(f"{r['backend']}: full {r['full_s']}s | no-op plan {r['noop_plan_s']}s = {100 * r['noop_ratio']:.2f} % (goal <= 2 %), "
              f"CLI no-op {r['noop_cli_s']}s = {100 * r['noop_cli_ratio']:.2f} % | no-op read {r['noop_read_manifest_kb']} kB of records + "
              f"{r['noop_read_data_bytes']} B of data = {r['noop_read_mb_per_gb_input']} MB/GB of input (goal <= 1) | "
              f"append {r['added']} file(s) {r['append_s']}s = {100 * r['append_ratio']:.2f} % (goal <= 5 %) | union vs appended: "
              f"{r['files_compared'] - r['n_differing']}/{r['files_compared']} files byte-identical (tars after pack --force) | "
              f"append left {r['append_tars_untouched']} earlier tars untouched, wrote {r['append_tars_new']} new | "
              f"earlier drop lists unchanged {r['append_earlier_drop_lists_unchanged']} | "
              f"dedup append vs recompute: {r['dedup_differences']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decompression bombs, and the clean stage run on them in a fresh interpreter that reports its peak memory.

A bomb here is one JSONL line (``{"id": "bomb", "text": "aaaa…"}``) that expands to ``size``
bytes, between two good records. It is written cheaply, whatever its size: the ``a`` run is one
compressed frame (zstd) or member (gzip) of 16 MiB, repeated — both formats decompress
concatenated frames/members as one stream — so a 4 GB line costs a few hundred KB on disk and a
second to write. Shared by ``tests/reliability/test_bad_input.py`` and ``bench/decompression_bomb.py``.
"""
from __future__ import annotations

import gzip
import json
import resource
import sys
import time
from pathlib import Path

import zstandard

_RUN = 16 << 20
GOOD = [b'{"id": "before", "text": "A good record before the bomb."}\n',
        b'{"id": "after", "text": "A good record after the bomb."}\n']


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def write_bomb(path: Path, size: int) -> int:
    """Write a ``.jsonl.zst`` or ``.jsonl.gz`` bomb whose middle line is ``size`` bytes; returns its length."""
    pack = _zstd if path.name.endswith(".zst") else _gzip
    head, tail = b'{"id": "bomb", "text": "', b'"}\n'
    runs, rest = divmod(size - len(head) - len(tail), _RUN)
    run_frame = pack(b"a" * _RUN)
    with open(path, "wb") as f:
        f.write(pack(GOOD[0] + head))
        for _ in range(runs):
            f.write(run_frame)
        f.write(pack(b"a" * rest + tail + GOOD[1]))
    return len(head) + runs * _RUN + rest + len(tail)


def peak_rss_kb() -> int:
    """This process's peak RSS since its ``exec`` (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    over from the parent a subprocess was forked from, so a child of a large pytest would report
    the parent's size."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_clean(root: str, inputs_glob: str) -> dict:
    """Run the clean stage (read + clean) here, in one process; its peak RSS, wall time and what it quarantined."""
    from shardflow.dataprep.config import PrepConfig
    from shardflow.dataprep.stage import run_stage
    from shardflow.dataprep.stages import build_stages
    from shardflow.storage import Storage
    from shardflow.storage.jsonl import iter_jsonl

    storage = Storage(root)
    prep = PrepConfig.model_validate({"inputs": [inputs_glob], "workers": 1})
    t0 = time.perf_counter()
    res = run_stage(build_stages(prep)[0], storage)
    wall = time.perf_counter() - t0
    quarantined = [q for name in storage.list("quarantine/clean", suffix=".jsonl.zst")
                   for q in iter_jsonl(storage, f"quarantine/clean/{name}")]
    kept = [d["id"] for name in storage.list("stages/clean", suffix=".jsonl.zst")
            for d in iter_jsonl(storage, f"stages/clean/{name}")]
    return {"failed": res["failed"], "wall_s": round(wall, 2), "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
            "quarantined": [{k: q[k] for k in ("file", "line", "reason")} | {"excerpt_bytes": len(q["excerpt"].encode())}
                            for q in quarantined], "kept": sorted(kept)}


if __name__ == "__main__":  # python -m tests.reliability.bombs ROOT GLOB
    print(json.dumps(run_clean(sys.argv[1], sys.argv[2])), flush=True)


__all__ = ["GOOD", "run_clean", "write_bomb"]

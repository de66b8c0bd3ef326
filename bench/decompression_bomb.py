"""Peak memory and time of the clean stage (read + clean) on one JSONL line that expands to 4 GB.

Usage::

    python bench/decompression_bomb.py                 # 4 GB line, .zst and .gz
    python bench/decompression_bomb.py --gb 1 --kinds zst

For each kind, a bomb (tests/reliability/bombs.py: a few hundred KB on disk) is written to a temp
folder and the clean stage runs on it in a fresh interpreter, which reports its own peak RSS
(``ru_maxrss``). Prints, per kind, the peak RSS as a ratio of the 1 GB limit of issue #12 and of
the line's size, the wall time, and what was quarantined; exits 1 if a limit is broken.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMIT_MB = 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0, help="decompressed size of the bomb line, GB (1e9 bytes)")
    ap.add_argument("--kinds", default="zst,gz", help="comma-separated: zst, gz")
    args = ap.parse_args(argv)
    from tests.reliability.bombs import write_bomb

    size = int(args.gb * 1e9)
    ok = True
    with tempfile.TemporaryDirectory(prefix="shardflow-bomb-") as tmp:
        for kind in args.kinds.split(","):
            inputs = Path(tmp) / kind / "in"
            inputs.mkdir(parents=True)
            path = inputs / f"bomb.jsonl.{kind}"
            write_bomb(path, size)
            env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, "-m", "tests.reliability.bombs", str(Path(tmp) / kind / "root"),
                                  str(inputs / "*")], env=env, cwd=str(REPO), capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(out.stdout.strip().splitlines()[-1])
            reasons = [q["reason"] for q in res["quarantined"]]
            ok &= res["peak_rss_mb"] < LIMIT_MB and reasons == ["too_long"] and res["kept"] == ["after", "before"]
            print(f"{kind}: line {size / 1e9:.1f} GB ({path.stat().st_size / 1e3:.0f} KB on disk): "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB = {res['peak_rss_mb'] / LIMIT_MB:.3f} x the {LIMIT_MB} MB limit "
                  f"= {res['peak_rss_mb'] * 2**20 / size:.4f} x the line; {res['wall_s']:.1f} s "
                  f"({size / 2**20 / max(res['wall_s'], 1e-9):.0f} MiB/s); quarantined {reasons}, kept {res['kept']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where the start-up time of ``shardflow`` commands goes (issue 17: "every prep takes ~9 s").

Each piece is a fresh process, timed from outside, best of ``--repeat`` (the machine is shared; the
best run is the least disturbed one):

- ``python -c pass``                       the interpreter alone (floor)
- ``shardflow config validate``            CLI + pipeline config (pydantic models, no Prefect)
- a user error (bad cron)                  ``error: …`` exit 2: must come before any server starts
- ``import shardflow.flows.prep_flows``    Prefect imported and the flows decorated
- ``prefect_api()`` entered and left       the temporary local Prefect API that prep starts
- ``shardflow prep clean`` with nothing to do, on a small root prepared first

and prints each as seconds and as a ratio to the 2 s target of a nothing-to-do prep.

    python bench/cli_startup.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 2.0


def timed(argv: list[str], env: dict[str, str], cwd: str | None = None, expect: int = 0) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # a loaded machine starts it slowly
    work = Path(tempfile.mkdtemp(prefix="shardflow-startup-"))
    corpus = work / "in"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"part-{i}.jsonl").write_text("".join(
            json.dumps({"id": f"{i}-{j}", "text": f"Document {j} of file {i}: a sentence long enough to keep. " * 3}) + "\n"
            for j in range(20)))
    cfg = work / "pipeline.yaml"
    cfg.write_text(f"storage:\n  root: {work / 'root'}\nprep:\n  inputs: ['{corpus}/*.jsonl']\n  workers: 1\nflows:\n  runner: thread\n")
    bad = work / "bad.yaml"
    bad.write_text('flows:\n  schedules:\n    pipeline: "61 3 * * *"\n')
    cli = [py, "-m", "shardflow.flows.cli"]
    timed([*cli, "prep", "clean", "--config", str(cfg)], env)  # the root, once
    pieces = {
        "python -c pass": ([py, "-c", "pass"], 0),
        "shardflow config validate": ([*cli, "config", "validate", "--config", str(cfg)], 0),
        "user error (bad cron), exit 2": ([*cli, "serve", "--config", str(bad)], 2),
        "import shardflow.flows.prep_flows": ([py, "-c", "import shardflow.flows.prep_flows"], 0),
        "prefect_api() start + stop": ([py, "-c", "from shardflow.flows.runners import prefect_api\nwith prefect_api(): pass"], 0),
        "shardflow prep clean, nothing to do": ([*cli, "prep", "clean", "--config", str(cfg)], 0),
    }
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every piece alike
        for name, (argv, rc) in pieces.items():
            best[name] = min(best.get(name, float("inf")), timed(argv, env, expect=rc))
    print(f"best of {args.repeat}, seconds; ratio = time / {TARGET_S:.0f} s target of a nothing-to-do prep")
    for name, s in best.items():
        print(f"  {name:<40} {s:6.2f} s   {s / TARGET_S:5.2f}x")


if __name__ == "__main__":
    main()

"""Run the reliability and security suites and print their figures.

    python bench/reliability.py            # the CI subset (3 kill points per stage group, 1 for training, …)
    python bench/reliability.py --full     # everything: 20 kill points per stage and for training,
                                           # three 5 %-fault seeds, concurrent CLI runs on S3
    python bench/reliability.py --full --json out.json

Why through pytest: the suites are the tests in tests/reliability (the same fixtures start the moto
S3 endpoint and the Prefect API); each test prints one ``RELIABILITY {json}`` line with its figures,
which this script collects and sums: kill points and how many killed a process mid-work, faults
injected by kind, records quarantined, credentials found (must be 0), and whether every resumed or
faulted run produced outputs identical to an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_suites(full: bool, extra: list[str], log: str | None = None) -> tuple[int, list[dict], float, str]:
    cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-s", "-p", "no:cacheprovider",
           "-m", "" if full else "not slow", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t0
    if log:
        Path(log).write_text(proc.stdout + "\n" + proc.stderr)
    figures = [json.loads(line.split("RELIABILITY ", 1)[1]) for line in proc.stdout.splitlines() if "RELIABILITY {" in line]
    lines = proc.stdout.splitlines()
    tail = [ln for ln in lines if " passed" in ln or " failed" in ln or " error" in ln]
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if failed:
        print("\n".join(failed), file=sys.stderr)
    return proc.returncode, figures, wall, (tail[-1] if tail else proc.stdout[-2000:] + proc.stderr[-2000:])


def summarize(figures: list[dict]) -> dict:
    out: dict = {}
    crash = defaultdict(lambda: {"points": 0, "killed": 0, "identical": True})
    for f in figures:
        if f["suite"] == "crash":
            c = crash[f["stage"]]
            c["points"] += f["points"]
            c["killed"] += f["killed"]
            c["identical"] &= f["identical"]
    out["crash"] = dict(crash)
    faults = [f for f in figures if f["suite"] == "s3_faults"]
    injected = Counter()
    for f in faults:
        for k in ("requests", "faults", "500", "503", "reset", "truncated"):
            injected[k] += f.get(k, 0)
    out["s3_faults"] = {"runs": [{k: f.get(k) for k in ("rate", "seed", "requests", "faults", "500", "503", "reset",
                                                         "truncated", "ok", "identical", "rerun_identical", "wall_s")
                                  if f.get(k) is not None} for f in faults], "total": dict(injected)}
    out["bad_input"] = next((f for f in figures if f["suite"] == "bad_input"), None)
    out["verify"] = next((f for f in figures if f["suite"] == "verify"), None)
    out["security"] = [f for f in figures if f["suite"] == "security"]
    return out


def print_summary(s: dict, rc: int, wall: float, tail: str, full: bool) -> None:
    print(f"reliability suites ({'full' if full else 'CI subset'}): {tail}  [{wall:.0f}s wall, exit {rc}]")
    print("\ncrash suite (SIGKILL, resume, compare with an uninterrupted run):")
    print(f"  {'stage':<18}{'points':>7}{'killed':>8}  identical")
    for stage, c in s["crash"].items():
        print(f"  {stage:<18}{c['points']:>7}{c['killed']:>8}  {'yes' if c['identical'] else 'NO'}")
    tot = sum(c["points"] for c in s["crash"].values())
    print(f"  {'total':<18}{tot:>7}{sum(c['killed'] for c in s['crash'].values()):>8}")
    print("\nobject-storage faults (proxy in front of the S3 endpoint):")
    for r in s["s3_faults"]["runs"]:
        kinds = ", ".join(f"{k}: {r.get(k, 0)}" for k in ("500", "503", "reset", "truncated"))
        outcome = ("completed, outputs identical" if r.get("identical") else
                   "failed clearly, nothing half-published, fault-free re-run identical" if r.get("rerun_identical") else "?")
        print(f"  rate {r['rate']:.0%} seed {r.get('seed', '-')}: {r.get('requests')} requests, {r.get('faults')} faults ({kinds}) -> {outcome}")
    if s["bad_input"]:
        b = s["bad_input"]
        print(f"\nbad input: {b['quarantined']} records quarantined {b['reasons']}; good records {b['good_records']}, "
              f"kept {b['kept']} (lost {b['good_records'] - b['kept']})")
    if s["verify"]:
        v = s["verify"]
        print(f"\nverify: {v['corrupted']} corrupted files, {v['reported']} problems reported, re-run redid {v['redone']}")
    for sec in s["security"]:
        print(f"\nsecurity: {json.dumps({k: v for k, v in sec.items() if k != 'suite'})}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="all variants (slow ones included)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--log", metavar="FILE", help="also write pytest's whole output here (failures in full)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k crash)")
    args = ap.parse_args(argv)
    rc, figures, wall, tail = run_suites(args.full, args.pytest_args, args.log)
    summary = summarize(figures)
    print_summary(summary, rc, wall, tail, args.full)
    if args.json:
        Path(args.json).write_text(json.dumps({"full": args.full, "exit": rc, "wall_s": round(wall, 1),
                                               "result": tail, **summary}, indent=2, sort_keys=True))
    return rc


if __name__ == "__main__":
    sys.exit(main())

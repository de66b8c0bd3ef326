"""`shardflow prep` plans before Prefect starts (issue 14, item 6): bad requests are one line with
exit code 2, a root with nothing to do returns at once and says so, and neither imports Prefect."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from shardflow.dataprep.stage import run_stage
from shardflow.flows.preplan import preplan

from .conftest import FACTORY, sid, toy_config, write_corpus
from .toy_stages import build

PROBE = """
import sys, time
t0 = time.perf_counter()
from shardflow.flows.cli import main
rc = main(sys.argv[1:])
print("RESULT", rc, "prefect" in sys.modules, "torch" in sys.modules, round(time.perf_counter() - t0, 3))
"""


def cli(*args: str) -> tuple[int, bool, bool, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert result, proc.stdout + proc.stderr
    _, rc, prefect, torch, _ = result[0].split()
    return int(rc), prefect == "True", torch == "True", proc.stderr.strip()


def test_bad_requests_are_one_line_errors_before_any_flow(tmp_path):
    write_corpus(tmp_path / "in", n_files=2)
    base = ["--set", f"storage.root={tmp_path / 'root'}", "--set", f"prep.inputs=['{tmp_path / 'in'}/*.jsonl']"]
    rc, prefect, torch, err = cli("prep", "nosuch", *base)
    assert (rc, prefect, torch) == (2, False, False) and err.startswith("error: unknown stage 'nosuch'") and "\n" not in err
    rc, prefect, _, err = cli("prep", "all", "--shards", "part-7-0000000000", *base)
    assert (rc, prefect) == (2, False) and err.startswith("error: --shards: no shard 'part-7-0000000000'") and "\n" not in err
    rc, prefect, _, err = cli("prep", "clean", "--set", f"storage.root={tmp_path / 'root'}",
                              "--set", f"prep.inputs=['{tmp_path / 'in'}/nope.jsonl']")
    assert (rc, prefect) == (2, False) and err == f"error: input '{tmp_path / 'in'}/nope.jsonl' does not exist"
    assert not (tmp_path / "root" / "stages").exists()  # nothing started


def test_nothing_to_do_is_planned_from_manifests_in_well_under_two_seconds(tmp_path, corpus):
    cfg = toy_config(tmp_path / "root", corpus)
    storage = cfg.storage_handle()
    pre = preplan(cfg, stage_factory=FACTORY)
    assert pre.work == {"upper": "3 missing"}  # planning stops at the first stage with work
    for stage in build(cfg.prep):
        run_stage(stage, storage)
    t0 = time.perf_counter()
    pre = preplan(cfg, stage_factory=FACTORY)
    assert pre.nothing_to_do and pre.up_to_date == 7 and time.perf_counter() - t0 < 2.0
    # --shards takes ids or input file names; --force and --shards always mean work.
    assert preplan(cfg, shards=["part-1.jsonl"], stage_factory=FACTORY).shards == [sid(corpus, 1)]
    assert not preplan(cfg, force=True, stage_factory=FACTORY).nothing_to_do
    # A removed input is work too (its shards are retired), even with nothing to redo.
    (corpus / "part-2.jsonl").unlink()
    assert preplan(cfg, stage_factory=FACTORY).work == {"upper": "1 to retire"}


def test_status_json_lists_each_shard_to_redo_with_its_reason(tmp_path, corpus, capsys):
    from shardflow.flows.status import print_status

    cfg = toy_config(tmp_path / "root", corpus)
    for stage in build(cfg.prep):
        run_stage(stage, cfg.storage_handle())
    (corpus / "part-0.jsonl").write_text((corpus / "part-0.jsonl").read_text().replace("quick", "quack"))
    capsys.readouterr()
    print_status(cfg, as_json=True, stage_factory=FACTORY)
    data = json.loads(capsys.readouterr().out)
    assert data["next_run"] == {"upper": {"input changed": 1}, "words": {"upstream changed": 1}, "merge": {"upstream changed": 1}}
    assert data["stages"][0]["work"] == [{"shard": sid(corpus, 0), "state": "stale", "reason": "input changed",
                                          "detail": str(corpus / "part-0.jsonl")}]

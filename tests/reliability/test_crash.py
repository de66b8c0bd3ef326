"""Crash suite: SIGKILL every data-prep stage and training at seeded random points, then resume.

Per stage: a reference root is built once, uninterrupted, in this process, with a snapshot of the
root before and after each stage. Each kill point copies the "before" snapshot, runs the stage in a
fresh interpreter that SIGKILLs itself at the n-th write event (n drawn with a seeded RNG over the
events the reference run counted: mid-file, file complete but unpublished, published but not yet in
the manifest, manifest record published), checks that nothing under a final name is partial, then
re-runs the stage to completion and requires a root byte-identical to the reference.

Training: a run is SIGKILLed (the whole process tree) at a seeded random step plus a random delay of
a few milliseconds (so some kills land inside a checkpoint save), resumed, and its per-step loss
sequence and final weights must equal an uninterrupted run's bit for bit.

CI runs 3 kill points per stage group and 1 training kill; ``-m slow`` (or ``bench/reliability.py
--full``) runs 20 per individual stage and 20 for training.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from shardflow.dataprep.stage import plan, run_stage
from shardflow.dataprep.stages import STAGE_GROUPS, build_stages
from shardflow.storage import Storage

from . import (KillHook, report, check_root_sound, copy_root, diff_snapshots, run_stage_child, small_prep_config, snapshot,
               temp_litter, write_small_corpus)

GROUPS = list(STAGE_GROUPS)
ALL_STAGES = [s for g in STAGE_GROUPS.values() for s in g]
CI_POINTS = 3
FULL_POINTS = 20


class Reference:
    """The uninterrupted run: per stage, the event count and the roots before and after it."""

    def __init__(self, base: Path):
        self.base = base
        write_small_corpus(base / "in")
        self.prep, _ = small_prep_config(str(base / "ref"), str(base / "in" / "*.jsonl"))
        self.stages = build_stages(self.prep)
        self.events: dict[str, int] = {}
        storage = Storage(str(base / "ref"))
        for st in self.stages:
            copy_root(base / "ref", base / f"before-{st.name}") if (base / "ref").exists() else (base / f"before-{st.name}").mkdir()
            with KillHook(0) as hook:
                result = run_stage(st, storage)
            assert not result["failed"] and result["ran"], result
            self.events[st.name] = hook.events
            copy_root(base / "ref", base / f"after-{st.name}")
        self.final = snapshot(base / "ref")

    def before(self, stage: str) -> Path:
        return self.base / f"before-{stage}"

    def after(self, stage: str) -> Path:
        return self.base / f"after-{stage}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("crash"))


def kill_points(events: int, n: int, seed: int) -> list[int]:
    """``n`` distinct seeded event numbers in 1..events (all of them if there are fewer)."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, events + 1), min(n, events)))


def crash_and_resume(ref: Reference, stage_names: list[str], kill_at: int, work: Path) -> dict:
    """One kill point: kill the stage(s) at write event ``kill_at``, check, resume, compare."""
    first = ref.before(stage_names[0])
    last = ref.after(stage_names[-1])
    copy_root(first, work)
    proc = run_stage_child(ref.prep, str(work), stage_names, kill_at)
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, proc.stdout.decode()[-2000:] + proc.stderr.decode()[-4000:]
    checked = check_root_sound(work)  # no partial file under a final name, at the kill point
    storage = Storage(str(work))
    stages = [st for st in ref.stages if st.name in stage_names]  # exact stage names: "tokenize" is also a group
    redone = 0
    for st in stages:
        result = run_stage(st, storage)
        assert not result["failed"], result
        redone += len(result["ran"])
    problems = diff_snapshots(snapshot(last), snapshot(work))
    assert not problems, f"kill at event {kill_at} of {stage_names}: resumed root differs: {problems[:10]}"
    for st in stages:  # and the resumed root is one a further run has nothing to do on
        assert not [p for p in plan(st, storage) if p.needs_work]
    return {"killed": killed, "redone": redone, "litter": len(temp_litter(work)), **checked}


def _run_points(ref: Reference, stage_names: list[str], n: int, seed: int, work: Path) -> list[dict]:
    events = sum(ref.events[s] for s in stage_names)
    out = []
    for k in kill_points(events, n, seed):
        info = crash_and_resume(ref, stage_names, k, work)
        out.append({"kill_at": k, "events": events, **info})
    assert any(o["killed"] for o in out)
    return out


@pytest.mark.parametrize("group", GROUPS)
def test_kill_stage_group_at_random_points_then_resume(reference, group, tmp_path):
    stage_names = list(STAGE_GROUPS[group])
    results = _run_points(reference, stage_names, CI_POINTS, seed=sum(map(ord, group)), work=tmp_path / "work")
    report("crash", stage=f"{group} (CI group)", points=len(results), killed=sum(r["killed"] for r in results), identical=True,
           kill_at=[r["kill_at"] for r in results], events=results[0]["events"], files_checked=sum(r["zst"] + r["tar"] + r["parquet"] + r["json"] for r in results))
    assert all(r["killed"] for r in results), results


@pytest.mark.slow
@pytest.mark.parametrize("stage", ALL_STAGES)
def test_kill_each_stage_at_20_points_then_resume(reference, stage, tmp_path):
    results = _run_points(reference, [stage], FULL_POINTS, seed=1000 + sum(map(ord, stage)), work=tmp_path / "work")
    assert len(results) == FULL_POINTS and all(r["killed"] for r in results), results
    report("crash", stage=stage, points=len(results), killed=sum(r["killed"] for r in results), identical=True,
           kill_at=[r["kill_at"] for r in results], events=results[0]["events"], files_checked=sum(r["zst"] + r["tar"] + r["parquet"] + r["json"] for r in results))


def test_kill_points_are_spread_over_the_events(reference):
    """The hook counts real work: every stage writes, and the points cover the whole range."""
    assert all(reference.events[s] >= FULL_POINTS for s in ALL_STAGES), reference.events
    pts = kill_points(1000, 20, 7)
    assert len(set(pts)) == 20 and min(pts) < 300 and max(pts) > 700


# -- training -------------------------------------------------------------------------------------

def _train_helpers():
    from tests.train import test_trainer as tt

    return tt


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Storage:
    tt = _train_helpers()
    storage = Storage(str(tmp_path_factory.mktemp("train") / "root"))
    tt.build_dataset(storage)
    return storage


def _metrics_steps(storage: Storage, run: str) -> list[int]:
    path = Path(storage.resolve(f"runs/{run}/metrics.jsonl")[1])
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for ln in lines:
        if ln.strip().endswith(b"}"):
            try:
                out.append(json.loads(ln)["step"])
            except ValueError:
                pass
    return out


def kill_training(storage: Storage, run: str, tmp: Path, seed: int, timeout: float = 240) -> dict:
    """SIGKILL a training run at a seeded step + delay (checkpoint saves included), resume, return facts."""
    tt = _train_helpers()
    cfg = tt.tiny_cfg(run)
    rng = random.Random(seed)
    at_step = rng.randint(1, cfg.trainer.steps - 2)
    delay = rng.uniform(0.0, 0.25)
    proc = tt.launch(cfg, storage, 1, tmp)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        steps = _metrics_steps(storage, run)
        if steps and steps[-1] >= at_step:
            time.sleep(delay)
            tt.kill_tree(proc.pid)
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    killed = proc.returncode == -signal.SIGKILL
    from shardflow.train.checkpoint import Checkpointer

    committed = Checkpointer(storage, run).latest_step()  # must read cleanly whatever the kill hit
    summary = tt.finish(tt.launch(cfg, storage, 1, tmp), timeout=timeout)
    assert summary["start_step"] == (committed or 0)
    tt.assert_same_run(storage, "train-ref", run, cfg.trainer.steps)
    return {"at_step": at_step, "delay_s": round(delay, 3), "killed": killed, "resumed_from": committed or 0}


@pytest.fixture(scope="module")
def train_reference(train_root, tmp_path_factory) -> Storage:
    tt = _train_helpers()
    tt.finish(tt.launch(tt.tiny_cfg("train-ref"), train_root, 1, tmp_path_factory.mktemp("launch")))
    return train_root


def test_kill_training_at_a_random_point_then_resume_bitwise(train_reference, tmp_path):
    info = kill_training(train_reference, "crash-ci", tmp_path, seed=5)
    assert info["killed"], info
    report("crash", stage="train", points=1, killed=int(info["killed"]), identical=True, resumed_from=[info["resumed_from"]])


@pytest.mark.slow
def test_kill_training_at_20_points_then_resume_bitwise(train_reference, tmp_path):
    results = [kill_training(train_reference, f"crash-{i}", tmp_path, seed=100 + i) for i in range(FULL_POINTS)]
    report("crash", stage="train", points=len(results), killed=sum(r["killed"] for r in results), identical=True,
           resumed_from=[r["resumed_from"] for r in results])
    assert sum(r["killed"] for r in results) >= FULL_POINTS - 2, results


def test_soundness_check_catches_partial_files(reference, tmp_path):
    """The invariant checker is not vacuous: a cut stage output, tar shard or parquet file is caught."""
    last = reference.after(ALL_STAGES[-1])
    clean = sorted(p.name for p in (last / "stages/clean").glob("*.jsonl.zst"))[1]
    sig = sorted(p.name for p in (last / "dedup/signatures").glob("*.parquet"))[0]
    for rel in (f"stages/clean/{clean}", "shards/train-000000.tar", f"dedup/signatures/{sig}"):
        work = tmp_path / rel.replace("/", "_")
        copy_root(last, work)
        path = work / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(Exception):
            check_root_sound(work)


# -- corruption: `shardflow verify` reports it, the next run redoes exactly what depends on it ----

def _cli_args(root: Path, inputs: Path) -> list[str]:
    from . import SMALL_PREP

    return ["--set", f"storage.root={root}", "--set", f"prep.inputs=['{inputs}/*.jsonl']",
            *[a for ov in SMALL_PREP for a in ("--set", ov)]]


def test_verify_reports_corrupted_shard_and_output_and_rerun_redoes_only_them(reference, tmp_path, capsys):
    from shardflow.flows.cli import main

    work = tmp_path / "root"
    copy_root(reference.after(ALL_STAGES[-1]), work)
    args = _cli_args(work, reference.base / "in")
    # The stages ran in-process (no pipeline.yaml in the root): verify is pointed at its config file.
    import yaml

    from shardflow.flows.config import load_config

    config_file = tmp_path / "pipeline-config.yaml"
    config_file.write_text(yaml.safe_dump(load_config(None, args[1::2]).resolved()))
    verify = ["verify", "--config", str(config_file)]
    assert main(verify) == 0
    shard = sorted(p.name for p in (work / "stages/filter").glob("*.jsonl.zst"))[1].split(".")[0]  # the second input's
    for rel in ("shards/train-000003.tar", f"stages/filter/{shard}.jsonl.zst"):
        path = work / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01  # one bit, same size: only a re-hash can tell
        path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(verify) == 1
    text = capsys.readouterr().out
    assert "train-000003.tar" in text and f"stage filter shard {shard}" in text, text
    assert text.count("PROBLEM") >= 2, text
    report_count = text.count("PROBLEM")
    storage = Storage(str(work))
    ran = {st.name: run_stage(st, storage)["ran"] for st in reference.stages}
    # The filter shard is redone with the same bytes, so nothing downstream of it is stale; the
    # tar is an output of the pack stage, which is redone (and only it).
    assert ran == {**{s: [] for s in ALL_STAGES}, "filter": [shard], "pack": ran["pack"]}, ran
    assert len(ran["pack"]) == 1, ran
    assert not diff_snapshots(reference.final, snapshot(work))
    capsys.readouterr()
    assert main(verify) == 0
    with capsys.disabled():
        report("verify", corrupted=2, reported=report_count, redone={k: v for k, v in ran.items() if v}, identical=True)


# -- concurrency: two runs on one root --------------------------------------------------------------

def _prefect_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    from . import child_env

    env = child_env()
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return env


def cli(args: list[str], env: dict[str, str]):
    import subprocess
    import sys

    from . import REPO_ROOT

    return subprocess.Popen([sys.executable, "-m", "shardflow.flows.cli", *args], env=env, cwd=str(REPO_ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def hold_when_locked(proc, lock_path: Path, timeout: float = 240) -> None:
    """SIGSTOP a run the moment it holds the root lock (its pid is in the lock file), so a second
    run is sure to meet it there however the two interpreters' start-up times fall."""
    deadline = time.monotonic() + timeout
    needle = f'"pid": {proc.pid}'.encode()
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if needle in lock_path.read_bytes():
                proc.send_signal(signal.SIGSTOP)
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"run never took the lock {lock_path} (rc {proc.poll()})")


@pytest.mark.usefixtures("prefect_server")
def test_two_concurrent_cli_runs_on_one_local_root_second_refused_clearly(reference, tmp_path):
    work = tmp_path / "root"
    copy_root(reference.before("clean"), work)
    args = ["prep", "all", "--runner", "sequential", *_cli_args(work, reference.base / "in")]
    env = _prefect_env()
    first = cli(args, env)
    try:
        hold_when_locked(first, work / "_lock.json")
        second = cli(args, env)
        out, err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    text = out.decode() + err.decode()
    assert second.returncode == 1, text[-3000:]
    assert "is locked by a shardflow prep run" in text and f"pid {first.pid}" in text and "_lock.json" in text, text[-3000:]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-3000:]
    assert not diff_snapshots(reference.final, snapshot(work))


def test_lock_of_a_killed_local_run_is_taken_over(reference, tmp_path):
    """A run SIGKILLed while holding the root lock leaves no lock behind (flock dies with it)."""
    import subprocess
    import sys

    from shardflow.storage.lock import RootLock

    from . import REPO_ROOT, child_env

    work = tmp_path / "root"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom shardflow.storage import Storage\nfrom shardflow.storage.lock import RootLock\n"
        f"lock = RootLock(Storage({str(work)!r}), purpose='doomed').acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")],
        env=child_env(), cwd=str(REPO_ROOT), stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    from shardflow.storage.lock import LockHeld

    with pytest.raises(LockHeld, match="doomed"):
        RootLock(Storage(str(work)), purpose="second").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    storage = Storage(str(work))
    with RootLock(storage, purpose="after", wait_s=5):
        pass

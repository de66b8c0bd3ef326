"""Errors a person can read: every user error is one line ``error: …`` with exit status 2, found before
any Prefect server starts; a closed pipe ends quietly; a dataset root describes itself (--root)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shardflow.flows.cli import main
from shardflow.flows.config import ConfigError, check_cron, load_config, load_root_config, write_resolved

from .conftest import toy_config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_prefect_server(monkeypatch):
    """Fail loudly if a command under test would start or reach a Prefect API: errors come first."""
    import shardflow.flows.runners as runners

    def refuse(*a, **k):
        raise AssertionError("a Prefect API was started for a command that should have stopped before")

    monkeypatch.setattr(runners, "prefect_api", refuse)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.mark.parametrize("schedules, words", [
    ({"pipeline": "61 3 * * *"}, ["flows.schedules", "pipeline", "61", "minute"]),
    ({"pipeline": "0 3 * *"}, ["flows.schedules", "expected 5 fields"]),
    ({"nightly": "0 1 * * *"}, ["flows.schedules", "unknown deployment", "nightly"]),
])
def test_config_validate_and_serve_reject_bad_schedules(tmp_path, capsys, schedules, words):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"flows": {"schedules": schedules}}))
    for command in ("config validate", "serve"):
        t0 = time.perf_counter()
        rc, out, err = run_cli(capsys, *command.split(), "--config", str(cfg))
        assert rc == 2 and time.perf_counter() - t0 < 2.0
        line = one_error_line(err)
        assert str(cfg) in line and all(w in line for w in words), line


def test_cron_check_agrees_with_prefect():
    from prefect._internal.schemas.validators import validate_cron_string

    for expr in ["0 3 * * *", "*/30 * * * *", "0 0 * * mon-fri", "5-10/2,30 1 * * *", "@daily", "0 0 L * *",
                 "10-5 * * * *", "61 * * * *", "0 0 0 * *", "* * * *", "*/0 * * * *", "H * * * *", "0 0 * * 8"]:
        try:
            validate_cron_string(expr)
            theirs = True
        except ValueError:
            theirs = False
        try:
            check_cron(expr)
            ours = True
        except ValueError:
            ours = False
        assert ours == theirs, expr


def test_bad_key_bad_argument_and_missing_file_are_one_line(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "config", "validate", "--set", "prep.workerz=2")
    assert rc == 2 and "prep.workerz: unknown key" in one_error_line(err)
    rc, _, err = run_cli(capsys, "status", "--bogus")
    assert rc == 2 and "--bogus" in one_error_line(err)
    rc, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "nope.yaml: config file not found" in one_error_line(err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("prep:\n  workers: 2\n  inputs: [a\n")
    rc, _, err = run_cli(capsys, "config", "validate", "--config", str(bad))
    assert rc == 2 and f"{bad}:" in one_error_line(err) and "not valid YAML" in err


def test_missing_checkpoint_is_a_user_error_before_anything_starts(tmp_path, capsys, corpus):
    cfg = toy_config(tmp_path / "root", corpus)
    write_resolved(cfg)
    root = str(tmp_path / "root")
    rc, _, err = run_cli(capsys, "export-hf", "--root", root, "--out", str(tmp_path / "hf"),
                         "--checkpoint", "runs/demo/checkpoints/step-999")
    assert rc == 2 and "step-999" in one_error_line(err)
    rc, _, err = run_cli(capsys, "eval", "--root", root)
    assert rc == 2 and "no checkpoint yet" in one_error_line(err)
    assert not (tmp_path / "hf").exists()


def test_root_describes_itself(tmp_path, capsys, corpus):
    """status on a root by --root, by --config <root>/pipeline.yaml, after the root moved, and with secrets masked."""
    cfg = load_config(None, [f"storage.root={tmp_path / 'root'}", f"prep.inputs=['{corpus}/*.jsonl']",
                             "prep.clean.min_chars=25", "storage.key=AKIDSECRET", "storage.secret=verysecret"])
    write_resolved(cfg)
    text = (tmp_path / "root" / "pipeline.yaml").read_text()
    assert "verysecret" not in text and "AKIDSECRET" not in text
    again = load_root_config(str(tmp_path / "root"))
    assert again.prep == cfg.prep and again.storage.key is None and again.storage.secret is None
    moved = tmp_path / "moved-root"
    os.rename(tmp_path / "root", moved)
    for args in (["--root", str(moved)], ["--config", str(moved / "pipeline.yaml")]):
        rc, out, err = run_cli(capsys, "status", "--json", *args)
        assert rc == 0, err
        assert yaml.safe_load(out)["root"] == str(moved)
    assert load_config(moved / "pipeline.yaml").prep.clean.min_chars == 25
    rc, _, err = run_cli(capsys, "status", "--root", str(tmp_path / "nothing-here"))
    assert rc == 2 and "not a shardflow dataset root" in one_error_line(err)
    rc, _, err = run_cli(capsys, "status", "--root", str(moved), "--config", str(moved / "pipeline.yaml"))
    assert rc == 2 and "either --root" in one_error_line(err)


def test_default_root_without_a_config_is_refused_not_misreported(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "status")
    assert rc == 2 and "no dataset root here" in one_error_line(err)
    with pytest.raises(ConfigError):
        load_root_config(str(tmp_path))


def test_status_into_a_closed_pipe_ends_quietly(tmp_path, corpus):
    cfg = toy_config(tmp_path / "root", corpus)
    write_resolved(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "shardflow.flows.cli", "status", "--root", str(tmp_path / "root")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "0"})
    proc.stdout.close()  # the reader is gone before the first line (like `| head` that has read enough)
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert err == "" and rc == 141, (rc, err)


def test_demo_hints_work_as_printed(tmp_path, capsys, corpus, monkeypatch):
    from shardflow.flows.demo import next_commands

    cfg = toy_config(tmp_path / "root", corpus)
    write_resolved(cfg)
    monkeypatch.chdir(Path(tmp_path).parent)  # any other folder
    hints = next_commands(str(tmp_path / "root"))
    assert [h.split()[1] for h in hints] == ["status", "verify", "train", "eval"]
    argv = hints[0].split()[1:]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0 and "clean" in out, err

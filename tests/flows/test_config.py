import json
import subprocess
import sys

import pytest
import yaml

from shardflow.flows.config import ConfigError, load_config, write_resolved
from shardflow.storage import Storage


def write(tmp_path, body: str):
    p = tmp_path / "pipeline.yaml"
    p.write_text(body)
    return p


def test_defaults_validate():
    cfg = load_config(None)
    assert cfg.prep.dedup.num_bands == 28 and cfg.prep.dedup.rows_per_band == 4 and cfg.prep.dedup.verify == "exact"
    assert cfg.train.model is not None


def test_unknown_key_is_named_with_file(tmp_path):
    p = write(tmp_path, "prep:\n  dedup:\n    num_bandz: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "prep.dedup.num_bandz" in msg and "unknown key" in msg


def test_wrong_type_is_named(tmp_path):
    p = write(tmp_path, "prep:\n  workers: many\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "prep.workers" in str(ei.value) and "many" in str(ei.value)


def test_missing_required_value_is_named(tmp_path):
    p = write(tmp_path, "storage:\n  root: null\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "storage.root" in str(ei.value)


def test_bad_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "prep: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, "prep:\n  workers: 2\n")
    cfg = load_config(p, ["prep.workers=4", "prep.dedup.jaccard_threshold=0.8", "prep.inputs=[a.jsonl, b.jsonl]"])
    assert cfg.prep.workers == 4 and cfg.prep.dedup.jaccard_threshold == 0.8
    assert [x.rsplit("/", 1)[-1] for x in cfg.prep.inputs] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="prep.tokenize.seq_lenn"):
        load_config(p, ["prep.tokenize.seq_lenn=5"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(p, ["prep.workers"])


def test_relative_paths_anchor_to_the_file(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    p = sub / "p.yaml"
    p.write_text("storage:\n  root: ../data\nprep:\n  inputs: [corpus/*.jsonl.zst]\n")
    cfg = load_config(p)
    assert cfg.storage.root == str(tmp_path / "data")
    assert cfg.prep.inputs == [str(sub / "corpus/*.jsonl.zst")]


def test_resolved_config_written_with_digest_and_no_secret(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path / 'root'}", "storage.secret=planted-secret-123", "storage.key=AKIAPLANTED",
                             "storage.options={token: planted-token-456, config_kwargs: {retries: {max_attempts: 5}}}"])
    digest = write_resolved(cfg)
    text = Storage(str(tmp_path / "root")).read_text("pipeline.yaml")
    body = yaml.safe_load(text)
    assert body["digest"] == digest == cfg.digest()
    for secret in ("planted-secret-123", "AKIAPLANTED", "planted-token-456"):
        assert secret not in text and secret not in json.dumps(cfg.resolved())
    assert body["config"]["storage"]["options"] == {"token": "**********", "config_kwargs": {"retries": {"max_attempts": 5}}}
    assert cfg.storage.fsspec_options("s3")["secret"] == "planted-secret-123"
    assert cfg.storage.fsspec_options("s3")["token"] == "planted-token-456"
    # The digest does not depend on secret values (it is the digest of what is written out).
    other = load_config(None, [f"storage.root={tmp_path / 'root'}", "storage.secret=another", "storage.key=AKIAOTHER",
                               "storage.options={token: other-token, config_kwargs: {retries: {max_attempts: 5}}}"])
    assert other.digest() == digest


def test_cli_config_validate_and_show(tmp_path):
    p = write(tmp_path, "prep:\n  workers: 3\n")
    out = subprocess.run([sys.executable, "-m", "shardflow.flows.cli", "config", "show", "--config", str(p), "--set", "prep.seed_unused=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "prep.seed_unused" in out.stderr and "unknown key" in out.stderr
    out = subprocess.run([sys.executable, "-m", "shardflow.flows.cli", "config", "show", "--config", str(p)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["prep"]["workers"] == 3


@pytest.mark.parametrize("cmd", ["demo", "config", "prep", "status", "verify", "train", "eval", "export-hf", "serve"])
def test_every_subcommand_has_help(cmd):
    out = subprocess.run([sys.executable, "-m", "shardflow.flows.cli", cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: shardflow" in out.stdout


def test_demo_yaml_matches_embedded_demo_settings(tmp_path):
    from pathlib import Path

    from shardflow.flows.demo import DEMO_SETTINGS, demo_config

    repo = Path(__file__).resolve().parents[2]
    from_file = load_config(repo / "configs" / "demo.yaml", [f"storage.root={tmp_path}"])
    embedded = load_config(None, [f"storage.root={tmp_path}"], base=DEMO_SETTINGS)
    assert from_file.resolved() == embedded.resolved()
    # demo_config places root and inputs under the workdir, also when a file is given.
    cfg = demo_config(tmp_path / "wd", config=str(repo / "configs" / "demo.yaml"), overrides=["train.trainer.steps=7"])
    assert cfg.storage.root == str(tmp_path / "wd" / "data") and len(cfg.prep.inputs) == 4
    assert cfg.train.trainer.steps == 7 and cfg.prep.filter.gopher_quality.min_doc_words == 30


def test_file_sections_merge_over_base(tmp_path):
    p = write(tmp_path, "prep:\n  dedup:\n    num_bands: 28\n    rows_per_band: 4\n")
    cfg = load_config(p, base={"prep": {"workers": 5, "dedup": {"seed": 9}}})
    assert (cfg.prep.workers, cfg.prep.dedup.seed, cfg.prep.dedup.num_bands) == (5, 9, 28)


def test_reading_a_pipeline_config_does_not_import_torch():
    """Every CLI call validates the config; torch's import (seconds) must not be part of that."""
    code = "import sys, shardflow.flows.config as c; c.load_config(None); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr

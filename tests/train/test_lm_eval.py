"""lm-evaluation-harness on the exported model, offline, with a local task (docs/evaluation.md).

Runs the documented command line in a subprocess (hub access switched off, caches in a temporary
directory) and checks that lm-eval's per-choice log-likelihoods equal shardflow's own scoring of the
same task file on the same model — the exported model, tokenizer and task YAML agree end to end.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from shardflow.storage import Storage
from shardflow.storage.shards import read_index
from shardflow.storage.tokenizer_files import load_tokenizer
from shardflow.train import tasks as T
from shardflow.train.evaluate import load_model, run_evaluation
from shardflow.train.export import export_checkpoint

from .test_evaluate import RUN, build_eval_root, small_eval, train_config

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval>=0.4,<0.5')")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install accelerate)")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> str:
    return build_eval_root(str(tmp_path_factory.mktemp("eval")))


def test_lm_eval_cli_on_exported_model_matches_shardflow_scoring(eval_root, tmp_path):
    shutil.copytree(eval_root, tmp_path / "root")
    storage = Storage(str(tmp_path / "root"))
    cfg = train_config(read_index(storage)["vocab_size"])
    run_evaluation(cfg, small_eval(mc_examples=10, cloze_examples=0, max_source_batches=0, max_val_batches=1), storage)
    task_dir = storage.uri(f"runs/{RUN}/eval/tasks")
    assert os.path.exists(os.path.join(task_dir, "heldout_continuation.yaml"))
    model_dir = export_checkpoint(cfg, storage, out_dir=str(tmp_path / "hf"))

    out_dir = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", "shardflow_heldout_continuation", "--include_path", task_dir, "--device", "cpu",
           "--batch_size", "4", "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    [results_file] = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    [samples_file] = glob.glob(str(out_dir / "**" / "samples_shardflow_heldout_continuation_*.jsonl"), recursive=True)
    res = json.load(open(results_file))["results"]["shardflow_heldout_continuation"]
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])

    # shardflow's scorer on the same file and weights; lm-eval puts no document-start token before a
    # context, so neither do we here.
    examples = T.load_mc_task(storage, f"runs/{RUN}/eval/tasks/heldout_continuation.jsonl")
    model, _ = load_model(cfg, storage, None, torch.device("cpu"))
    sp, _, _ = load_tokenizer(storage)
    metrics, rows = T.evaluate_mc(examples, lambda x: model(x).logits, lambda s: sp.encode(s, out_type=int), [],
                                  batch_size=4, max_len=cfg.model.max_seq_len)
    assert metrics["skipped"] == 0 and len(samples) == len(rows) == 10
    for sample, row in zip(samples, rows):
        lm_ll = [float(r[0][0]) for r in sample["resps"]]
        assert lm_ll == pytest.approx(row["logprobs"], abs=1e-4)
    assert res["acc,none"] == pytest.approx(metrics["acc"])
    assert res["acc_norm,none"] == pytest.approx(metrics["acc_norm"])

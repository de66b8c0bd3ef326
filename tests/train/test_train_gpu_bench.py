"""bench/train_gpu.py: its tiny CPU variant runs the trainer's real step; MFU bookkeeping."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .test_trainer import one_thread  # noqa: F401 — autouse: one intra-op thread


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "train_gpu.py"
    spec = importlib.util.spec_from_file_location("shardflow_bench_train_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_variant_runs_the_trainer_step(bench, capsys):
    res = bench.main(["--tiny", "--steps", "2", "--grad-accum", "2"])
    assert res["tokens_per_s"] > 0 and res["mfu"] is None and res["dtype"] == "fp32"
    assert res["grad_accum"] == 2 and res["world_size"] == 1 and res["deterministic"] is False
    assert res["dispatch_path"] == "dropless fallback" and "experts: dropless fallback" in capsys.readouterr().out
    cfg = bench.ModelConfig(**bench.TINY)
    assert res["train_flops_per_token"] == cfg.flops_per_token(64, causal=True) < cfg.flops_per_token(64)
    assert res["first_loss"] > 5.5  # random tokens over a 512 vocabulary: ln 512 = 6.2 at the start
    one_b = bench.ModelConfig(**bench.ONE_B)
    assert 0.95e9 < one_b.num_params() < 1.1e9 and one_b.n_experts == 8 and one_b.top_k == 2


def test_causal_attention_flops_are_half_the_score_matrix(bench):
    cfg = bench.ModelConfig(**bench.ONE_B)
    attn_full = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2048
    assert cfg.flops_per_token(2048) - cfg.flops_per_token(2048, causal=True) == attn_full / 2
    assert cfg.flops_per_token(2048, causal=True) == 6 * cfg.num_active_params() + attn_full / 2


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 SXM5 80GB", 989.0), ("NVIDIA H200", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 NVL", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_from_device_name(bench, name, peak):
    assert bench.peak_tflops(name) == peak

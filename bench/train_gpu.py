"""Training throughput, memory and MFU of the real trainer step (one GPU or several under torchrun).

What is timed is ``Trainer.train_step``, the step ``shardflow train`` runs: batches from the
trainer's own streaming loader (shards on disk, read by the loader thread), DDP or FSDP2 wrapping
under torchrun, the ``trainer.deterministic`` kernel setting, bf16 autocast (or FSDP2 mixed
precision), gradient accumulation, clipping, AdamW. The shards hold random token ids (written once
to a temporary root, or pass ``--root`` for real ones), so the figure is the step's compute and
input pipeline without a tokenizer in the loop.

Model: a ~1B-parameter MoE (16 layers, dim 1024, 8 experts of 2304, top-2 → 1.02B total, 0.30B
active, Mixtral layout). MFU = achieved FLOP/s ÷ (peak × ranks), training FLOPs per token =
``6·N_active`` + causal attention as executed (half the score matrix:
``ModelConfig.flops_per_token(seq, causal=True)``). The peak comes from the device name: 989 bf16
TFLOP/s (dense) for H100 SXM and H200, 756 for H100 PCIe, 312 for A100; other parts need
``--peak-tflops``. The dispatch path of the experts (grouped_mm, fallback, compiled loop) is printed.

    python bench/train_gpu.py                                  # the 1B model on cuda:0, bf16, compiled
    torchrun --nproc_per_node 8 bench/train_gpu.py --parallelism fsdp
    python bench/train_gpu.py --deterministic                  # the cost of bitwise-resumable kernels
    python bench/train_gpu.py --dispatch capacity              # static-shape dispatch (compile-friendly)
    python bench/train_gpu.py --tiny                           # a CPU smoke run of the same code path
    python bench/train_gpu.py --tiny --compile                 # the same, through torch.compile (inductor)

Prints one JSON line with the figures at the end (rank 0).
"""
from __future__ import annotations

import os
import sys

# ``python bench/x.py`` puts bench/ first on sys.path; keep sibling scripts from shadowing modules.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shardflow.storage import Storage  # noqa: E402
from shardflow.storage.shards import ShardWriter, make_index, token_dtype, write_index  # noqa: E402
from shardflow.train.config import TrainConfig  # noqa: E402
from shardflow.train.distributed import init_distributed, teardown  # noqa: E402
from shardflow.train.model import ModelConfig  # noqa: E402
from shardflow.train.trainer import Trainer, _Batches, _deterministic  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = (("H200 NVL", None), ("H100 NVL", None), ("H200", 989.0), ("H100 PCIE", 756.0),
                    ("H100", 989.0), ("A100", 312.0))

ONE_B = {"vocab_size": 32768, "dim": 1024, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4, "n_experts": 8,
         "top_k": 2, "expert_hidden": 2304, "max_seq_len": 2048}
TINY = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4, "top_k": 2,
        "expert_hidden": 128, "dense_hidden": 128, "max_seq_len": 128}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a known part from its CUDA name (H100 SXM reports e.g. "NVIDIA H100 80GB HBM3")."""
    name = device_name.upper()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def write_random_shards(root: str, vocab: int, seq_len: int, samples: int, seed: int = 0) -> Storage:
    """A shard root of ``samples`` random rows: the loader reads it like any packed corpus."""
    storage = Storage(root)
    dtype = token_dtype(vocab)
    rows = np.random.default_rng(seed).integers(0, vocab, size=(samples, seq_len + 1)).astype(dtype)
    with ShardWriter(storage, "train", seq_len, dtype, rows_per_member=64, samples_per_shard=4096) as w:
        w.write(rows)
    write_index(storage, make_index(seq_len, dtype, vocab, "sha256:random-tokens", 0, {"train": w.shards}))
    return storage


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of the code path")
    ap.add_argument("--batch", type=int, default=None, help="sequences per rank per micro-batch (default 8; tiny 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20; tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile, autotune; default 5; tiny 1)")
    ap.add_argument("--dispatch", choices=["dropless", "capacity"], default="dropless")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="per-block torch.compile (default on GPU; off with --tiny unless given)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--parallelism", choices=["ddp", "fsdp"], default="ddp", help="under torchrun")
    ap.add_argument("--deterministic", action="store_true", help="trainer.deterministic: true (bitwise-resumable kernels)")
    ap.add_argument("--root", default=None, help="a shard root to read instead of random tokens (its seq_len is used)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak of one device; default: from its name")
    args = ap.parse_args(argv)

    env = init_distributed("cpu" if args.tiny else "auto")
    try:
        if not args.tiny and env.device.type != "cuda":
            ap.error("no CUDA device: this benchmark needs a GPU (use --tiny for a CPU smoke run)")
        return _run(args, env)
    finally:
        teardown(env)


def _run(args: argparse.Namespace, env) -> dict:
    device = env.device
    batch = args.batch or (4 if args.tiny else 8)
    steps = args.steps or (3 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    compile_ = args.compile if args.compile is not None else not args.tiny
    model = dict(TINY if args.tiny else ONE_B, router={"dispatch": args.dispatch})
    tmp = None
    if args.root:
        storage = Storage(args.root)
        seq = storage.read_json("shards/index.json")["seq_len"]
    else:
        seq = args.seq_len or (64 if args.tiny else 2048)
        samples = batch * args.grad_accum * env.world_size * (warmup + steps + 1)
        tmp = tempfile.mkdtemp(prefix="train-gpu-bench-") if env.is_main else None
        tmp = env.broadcast_object(tmp)  # one node: every rank reads the root rank 0 wrote
        if env.is_main:
            write_random_shards(tmp, model["vocab_size"], seq, samples)
        env.barrier()
        storage = Storage(tmp)
    if seq > model["max_seq_len"]:
        raise SystemExit(f"--seq-len {seq} exceeds max_seq_len {model['max_seq_len']}")
    cfg = TrainConfig.model_validate({
        "run": "bench-train-gpu", "model": model,
        "data": {"batch_size": batch, "num_workers": 0, "seed": 0},
        "optim": {"lr": 3e-4, "warmup_steps": 10},
        "trainer": {"steps": warmup + steps, "grad_accum": args.grad_accum, "parallelism": args.parallelism,
                    "dtype": args.dtype, "compile": compile_, "activation_checkpointing": args.activation_checkpointing,
                    "device": device.type, "deterministic": args.deterministic, "progress": False},
        "checkpoint": {"enabled": False},
    })
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        with _deterministic(cfg.trainer.deterministic, device):
            trainer = Trainer(cfg, storage, env)
            times, losses = _timed_steps(trainer, warmup, steps, env)
    finally:
        if tmp and env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    return _report(args, cfg, trainer, env, seq, batch, compile_, times, losses)


def _timed_steps(trainer: Trainer, warmup: int, steps: int, env) -> tuple[list[float], list[float]]:
    device = env.device
    batches = _Batches(trainer.loader)
    times, losses = [], []
    try:
        for i in range(warmup + steps):
            trainer.schedule.apply(trainer.optimizer, i + 1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = trainer.train_step(batches)  # reads the loss: the step has finished on the device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            losses.append(out["loss"])
            if i >= warmup:
                times.append(dt)
            if env.is_main:
                print(f"step {i + 1:3d}{' (warmup)' if i < warmup else ''}: {dt * 1e3:8.1f} ms  loss {out['loss']:.4f}",
                      flush=True)
    finally:
        batches.close()
    return times, losses


def _report(args, cfg: TrainConfig, trainer: Trainer, env, seq: int, batch: int, compile_: bool,
            times: list[float], losses: list[float]) -> dict:
    device, mc = env.device, cfg.model
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    # The slowest rank sets the pace: take each step's maximum over ranks.
    t = torch.tensor(times, dtype=torch.float64, device=device)
    if env.distributed:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    step_s = statistics.median(t.tolist())
    tokens_per_step = batch * seq * trainer.grad_accum * env.world_size
    tps = tokens_per_step / step_s
    flops_tok = mc.flops_per_token(seq, causal=True)
    achieved = flops_tok * tps / 1e12
    mfu = achieved / (peak * env.world_size) if peak and device.type == "cuda" else None
    amp = trainer.compute_dtype
    result = {
        "device": name, "world_size": env.world_size, "parallelism": cfg.trainer.parallelism if env.distributed else "single",
        "params": mc.num_params(), "active_params": mc.num_active_params(),
        "batch": batch, "seq_len": seq, "grad_accum": trainer.grad_accum, "dispatch": mc.router.dispatch,
        "dispatch_path": trainer.dispatch_path, "compile": compile_,
        "dtype": str(amp).replace("torch.", "") if amp else "fp32", "deterministic": cfg.trainer.deterministic,
        "activation_checkpointing": cfg.trainer.activation_checkpointing,
        "median_step_s": step_s, "tokens_per_s": tps, "tokens_per_s_per_device": tps / env.world_size,
        "train_flops_per_token": flops_tok, "attention_flops": "causal, as executed (half the score matrix)",
        "achieved_tflops": achieved, "mfu": mfu, "peak_tflops_per_device": peak,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    if env.is_main:
        if mfu is not None:
            mfu_s = f"MFU {mfu:.1%} of {peak:.0f} TFLOP/s per device"
        elif device.type == "cuda":
            mfu_s = f"MFU n/a: unknown peak for {name!r}, pass --peak-tflops"
        else:
            mfu_s = "MFU n/a on CPU"
        mem = f", peak memory {result['max_memory_gib']:.1f} GiB" if result["max_memory_gib"] is not None else ""
        print(f"{mc.num_params() / 1e6:,.1f}M params ({mc.num_active_params() / 1e6:,.1f}M active), experts: "
              f"{trainer.dispatch_path}; {tps:,.0f} tokens/s on {env.world_size} x {name}, "
              f"{achieved:.1f} TFLOP/s, {mfu_s}{mem}")
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

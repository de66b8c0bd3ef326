"""Training throughput and MFU of the real training step on one GPU, synthetic tokens.

A ~1B-parameter MoE (16 layers, dim 1024, 8 experts of 2304, top-2 → 1.02B total, 0.30B active,
Mixtral layout) trained with the trainer's own ``optimizer_step`` (AdamW, clipping, grad
accumulation, bf16 autocast) and optional per-block ``torch.compile``. Tokens are random ids, so the
figure is pure compute/memory throughput with no data-loading in the loop.

MFU = achieved FLOP/s ÷ peak, with training FLOPs per token = 6·N_active + 12·L·H·d_head·S
(``ModelConfig.flops_per_token``, attention counted without causal halving as usually quoted) and
peak = 989 TFLOP/s (H100 SXM dense bf16; pass ``--peak-tflops`` for another part).

    python bench/train_gpu.py                       # the 1B model on cuda:0, bf16, compiled
    python bench/train_gpu.py --dispatch capacity   # static-shape dispatch (compile-friendly)
    python bench/train_gpu.py --tiny                # a CPU smoke run of the same code path
    python bench/train_gpu.py --tiny --compile      # the same, through torch.compile (inductor on CPU)

Prints one JSON line with the figures at the end.
"""
from __future__ import annotations

import os
import sys

# ``python bench/x.py`` puts bench/ first on sys.path; keep sibling scripts from shadowing modules.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from shardflow.train.config import OptimConfig  # noqa: E402
from shardflow.train.distributed import DistEnv, autocast_dtype, select_device  # noqa: E402
from shardflow.train.model import ModelConfig, MoETransformer  # noqa: E402
from shardflow.train.optim import WarmupCosine, build_optimizer  # noqa: E402
from shardflow.train.trainer import optimizer_step  # noqa: E402

H100_SXM_BF16_TFLOPS = 989.0

ONE_B = {"vocab_size": 32768, "dim": 1024, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4, "n_experts": 8,
         "top_k": 2, "expert_hidden": 2304, "max_seq_len": 2048}
TINY = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_experts": 4, "top_k": 2,
        "expert_hidden": 128, "dense_hidden": 128, "max_seq_len": 128}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of the code path")
    ap.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (default 8; tiny 4)")
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
    ap.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS)
    args = ap.parse_args(argv)

    device = torch.device("cpu") if args.tiny else select_device("auto")
    if not args.tiny and device.type != "cuda":
        ap.error("no CUDA device: this benchmark needs a GPU (use --tiny for a CPU smoke run)")
    batch = args.batch or (4 if args.tiny else 8)
    seq = args.seq_len or (64 if args.tiny else 2048)
    steps = args.steps or (3 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    compile_ = args.compile if args.compile is not None else not args.tiny
    cfg = ModelConfig(**(TINY if args.tiny else ONE_B), router={"dispatch": args.dispatch})
    if seq > cfg.max_seq_len:
        ap.error(f"--seq-len {seq} exceeds max_seq_len {cfg.max_seq_len}")

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = MoETransformer(cfg, activation_checkpointing=args.activation_checkpointing).to(device)
    if compile_:
        for block in model.blocks:
            block.compile()
    optim_cfg = OptimConfig(lr=3e-4, warmup_steps=10)
    opt = build_optimizer(model, optim_cfg, device)
    schedule = WarmupCosine.from_config(optim_cfg, warmup + steps)
    amp = autocast_dtype(args.dtype, device)
    env = DistEnv(device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def micro() -> list[torch.Tensor]:
        return [torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=gen)
                for _ in range(args.grad_accum)]

    times, losses = [], []
    for i in range(warmup + steps):
        data = micro()
        schedule.apply(opt, i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = optimizer_step(model, opt, data, env=env, grad_clip=1.0, autocast=amp)  # syncs (reads the loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(out["loss"])
        if i >= warmup:
            times.append(dt)
        print(f"step {i + 1:3d}{' (warmup)' if i < warmup else ''}: {dt * 1e3:8.1f} ms  loss {out['loss']:.4f}", flush=True)

    tokens_per_step = batch * seq * args.grad_accum
    step_s = statistics.median(times)
    tps = tokens_per_step / step_s
    flops_tok = cfg.flops_per_token(seq)
    achieved_tflops = flops_tok * tps / 1e12
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "batch": batch, "seq_len": seq, "grad_accum": args.grad_accum, "dispatch": args.dispatch,
        "compile": compile_, "dtype": str(amp).replace("torch.", "") if amp else "fp32",
        "activation_checkpointing": args.activation_checkpointing,
        "median_step_s": step_s, "tokens_per_s": tps, "train_flops_per_token": flops_tok,
        "achieved_tflops": achieved_tflops,
        "mfu": achieved_tflops / args.peak_tflops if device.type == "cuda" else None,
        "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    mfu = f"{result['mfu']:.1%} of {args.peak_tflops:.0f} TFLOP/s" if result["mfu"] is not None else "n/a on CPU"
    print(f"{cfg.num_params() / 1e6:,.1f}M params ({cfg.num_active_params() / 1e6:,.1f}M active), "
          f"{tps:,.0f} tokens/s, {achieved_tflops:.1f} TFLOP/s, MFU {mfu}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

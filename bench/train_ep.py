"""Expert parallelism: expert memory per rank, step time at EP=1/2/4, all-to-all volume per step.

Runs ``nproc`` processes (gloo on CPU; NCCL with one GPU each where enough GPUs exist) and, in the
same processes, one model per EP degree — EP=1 is plain DDP at the same global batch — timing the
trainer's real optimizer step (``train.trainer.optimizer_step``: forward, backward, gradient
reduction, clipping, AdamW) round-robin over the degrees, so load from other processes hits every
degree alike. A step's time is the slowest rank's.

Reported per degree:

* expert parameter bytes on each rank, against the unsharded stacks (target: exactly 1/EP, ±2 %);
* median step time and its ratio to EP=1 (target on 2 CPU processes, 32-expert config: EP=2 ≤ 1.3×);
* all-to-all bytes each rank sends per step (rows to other ranks; the count exchange included);
* on GPUs only: tokens/s and MFU (``ModelConfig.flops_per_token`` over the device's peak).

    python bench/train_ep.py                 # 2 processes: EP=1 (DDP) vs EP=2, 32 experts top-4
    python bench/train_ep.py --nproc 4       # EP=1, 2, 4 (on 2 CPU cores: oversubscribed, compare ratios only)
    python bench/train_ep.py --experts 8 --top-k 2 --layers 2 --dim 256 --hidden 512 --repeats 5
"""
from __future__ import annotations

import os
import sys

# Running as ``python bench/x.py`` puts bench/ first on sys.path, where a sibling module could
# shadow the stdlib; drop it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from shardflow.train.config import OptimConfig  # noqa: E402
from shardflow.train.distributed import DistEnv, wrap_model  # noqa: E402
from shardflow.train.expert_parallel import state_of  # noqa: E402
from shardflow.train.model import ModelConfig, MoETransformer  # noqa: E402
from shardflow.train.optim import build_optimizer  # noqa: E402
from shardflow.train.trainer import optimizer_step  # noqa: E402

# Peak dense bf16 FLOP/s by device-name substring, for MFU on GPUs.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _AllToAllMeter:
    """Counts the bytes this rank sends to other ranks through ``all_to_all_single``."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._orig = dist.all_to_all_single

    def __enter__(self) -> _AllToAllMeter:
        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            n = dist.get_world_size(group)
            me = dist.get_rank(group)
            rows = input_split_sizes if input_split_sizes else [input.shape[0] // n] * n
            row_bytes = input[0].numel() * input.element_size() if input.shape[0] else 0
            self.bytes += sum(r for i, r in enumerate(rows) if i != me) * row_bytes
            self.calls += 1
            return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self._orig


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    env = DistEnv(rank, world, rank if cuda else 0, device)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=max(1, args.dim // 128),
                      n_experts=args.experts, top_k=args.top_k, expert_hidden=args.hidden, max_seq_len=args.seq)
    degrees = [ep for ep in (1, 2, 4, 8) if ep <= world and world % ep == 0 and args.experts % ep == 0]
    autocast = torch.bfloat16 if cuda else None
    runs = {}
    for ep in degrees:
        torch.manual_seed(0)
        model = wrap_model(MoETransformer(cfg).to(device), env, "ddp", expert_parallel=ep)
        st, inner = state_of(model), getattr(model, "module", model)
        names = set(st.expert_fqns) if st else {n for n, _ in inner.named_parameters() if ".experts." in n}
        expert_bytes = sum(p.numel() * p.element_size() for n, p in inner.named_parameters() if n in names)
        runs[ep] = {"model": model, "opt": build_optimizer(model, OptimConfig(), device), "times": [], "a2a": [],
                    "expert_bytes": expert_bytes}
    full_expert_bytes = runs[1]["expert_bytes"]
    gen = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    for i in range(args.warmup + args.repeats):
        for ep, r in runs.items():
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            with _AllToAllMeter() as meter:
                t0 = time.perf_counter()
                optimizer_step(r["model"], r["opt"], [batch], env=env, grad_clip=1.0, autocast=autocast)
                if cuda:
                    torch.cuda.synchronize()
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                r["times"].append(float(dt))
                r["a2a"].append(meter.bytes)
    if rank == 0:
        res = {ep: {"times": r["times"], "a2a_bytes": statistics.median(r["a2a"]), "expert_bytes": r["expert_bytes"]}
               for ep, r in runs.items()}
        meta = {"full_expert_bytes": full_expert_bytes, "tokens_step": world * args.batch * args.seq,
                "flops_per_token": cfg.flops_per_token(args.seq), "cuda": cuda,
                "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()}
        with open(out, "w") as f:
            json.dump({"runs": res, "meta": meta}, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024, help="expert_hidden")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank (the global batch is nproc x this at every EP)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per CPU process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args.nproc, _free_port(), args, out), nprocs=args.nproc, join=True)
        with open(out) as f:
            data = json.load(f)
    runs, meta = {int(k): v for k, v in data["runs"].items()}, data["meta"]
    base = statistics.median(runs[1]["times"])
    print(f"{args.nproc} processes on {meta['device']} ({'CUDA bf16' if meta['cuda'] else f'CPU fp32, {args.threads} thread(s) each, {os.cpu_count()} cores'}); "
          f"{args.experts} experts top-{args.top_k}, dim {args.dim}, expert_hidden {args.hidden}, {args.layers} layers; "
          f"global batch {args.nproc} x {args.batch} x {args.seq} = {meta['tokens_step']} tokens at every degree; "
          f"median of {args.repeats} after {args.warmup} warm-up, round-robin")
    head = "| EP | dp | expert bytes / rank | vs unsharded (target 1/EP ±2 %) | step (median, min–max) | vs EP=1 | all-to-all sent / rank / step |"
    if meta["cuda"]:
        head += " tokens/s | MFU |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for ep, r in sorted(runs.items()):
        frac = r["expert_bytes"] / meta["full_expert_bytes"]
        ok = abs(frac * ep - 1) <= 0.02
        med = statistics.median(r["times"])
        line = (f"| {ep} | {args.nproc // ep} | {r['expert_bytes'] / 2**20:.2f} MiB | {frac:.4f} = 1/{1 / frac:.2f} — {'met' if ok else 'MISSED'} | "
                f"{med * 1e3:.0f} ms ({min(r['times']) * 1e3:.0f}–{max(r['times']) * 1e3:.0f}) | {med / base:.2f}× | "
                f"{r['a2a_bytes'] / 2**20:.2f} MiB |")
        if meta["cuda"]:
            tps = meta["tokens_step"] / med
            peak = next((v for k, v in PEAK_BF16.items() if k in meta["device"]), None)
            mfu = f"{tps * meta['flops_per_token'] / (peak * args.nproc):.1%}" if peak else "n/a (unknown peak)"
            line += f" {tps:,.0f} | {mfu} |"
        print(line)
    if 2 in runs:
        ratio = statistics.median(runs[2]["times"]) / base
        print(f"EP=2 step / DDP step = {ratio:.2f}× (target ≤ 1.3×): {'met' if ratio <= 1.3 else 'MISSED'}")


if __name__ == "__main__":
    main()

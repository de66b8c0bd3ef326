"""Which dropless expert paths earn their lines (issue 18): the same ``MoEBlock`` forward + backward
through each eager CPU path, on the same weights and input, timed round-robin in one run.

* ``hand-written``: ``_DroplessExperts``, one autograd node (what eager CPU runs);
* ``grouped_mm``: autograd over ``torch._grouped_mm`` (``SwiGLUExperts._grouped``; what GPUs run,
  and the CPU path the hand-written one replaced);
* ``loop``: autograd over the per-expert loop (``SwiGLUExperts._looped``; what torch.compile traces
  when grouped_mm cannot be used).

Capacity dispatch (one ``bmm`` per projection) is a different semantics, not an alternative, and is
not timed here. Prints each path's median and its ratio to the hand-written path.

    python bench/moe_paths.py                 # the four configurations of bench/train_model.py
    python bench/moe_paths.py --repeats 15
"""
from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from shardflow.train.moe import MoEBlock, _grouped_mm_works  # noqa: E402

CONFIGS = [(2048, 512, 1024, 8, 2), (512, 256, 512, 8, 2), (1024, 512, 1024, 32, 4), (1024, 512, 256, 64, 8)]
PATHS = ("hand-written", "grouped_mm", "loop")


def _forced(block: MoEBlock, path: str):
    """``block._dropless`` through ``path`` (the routing, permutation and combine of MoEBlock)."""
    own = MoEBlock._dropless

    def dropless(x, r, counts):
        if path == "hand-written":
            return own(block, x, r, counts)
        n_tokens, k = r.experts.shape
        order = torch.argsort(r.experts.reshape(-1), stable=True)
        token = order // k
        xs, ex = x.index_select(0, token), block.experts
        ys = ex._grouped(xs, counts) if path == "grouped_mm" else ex._looped(xs, counts.tolist())
        w = r.weights.reshape(-1).index_select(0, order).to(ys.dtype)
        return ys.new_zeros(n_tokens, block.dim).index_add(0, token, ys * w.unsqueeze(-1))

    return dropless


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU fp32, {args.threads} threads; median of {args.repeats} after {args.warmup} warm-up, round-robin; "
          f"torch {torch.__version__}, CPU grouped_mm usable: {_grouped_mm_works('cpu', torch.float32, 64, 128)}")
    print("| tokens, dim, hidden, experts, top-k | " + " | ".join(PATHS) + " | grouped_mm / hand-written | loop / hand-written |")
    print("|---|" + "---|" * (len(PATHS) + 2))
    for tokens, dim, hidden, n_exp, k in CONFIGS:
        torch.manual_seed(0)
        blocks = {}
        for path in PATHS:
            torch.manual_seed(0)
            b = MoEBlock(dim, n_exp, k, hidden)
            for p in b.parameters():
                torch.nn.init.normal_(p, std=0.02)
            b._dropless = _forced(b, path)
            blocks[path] = b
        x, g = torch.randn(tokens, dim), torch.randn(tokens, dim)
        ref = None
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        for i in range(args.warmup + args.repeats):
            for path, b in blocks.items():
                b.zero_grad(set_to_none=True)
                xi = x.detach().requires_grad_()
                t0 = time.perf_counter()
                y = b(xi)[0]
                y.backward(g)
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[path].append(dt)
                if i == 0:  # same numbers on every path (same weights and input)
                    out = torch.cat([y.detach().flatten(), xi.grad.flatten(), b.experts.w1.grad.flatten()])
                    if ref is None:
                        ref = out
                    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        med = {p: statistics.median(v) for p, v in times.items()}
        hw = med["hand-written"]
        print(f"| {tokens}, {dim}, {hidden}, {n_exp}, {k} | " + " | ".join(f"{med[p] * 1e3:.0f} ms" for p in PATHS)
              + f" | {med['grouped_mm'] / hw:.2f}× | {med['loop'] / hw:.2f}× |", flush=True)


if __name__ == "__main__":
    main()

"""CPU benchmark of the MoE block, forward + backward, tokens/s.

Compares shardflow's ``MoEBlock`` (dropless and capacity dispatch) with transformers' Mixtral sparse
MoE block loaded with the same weights (its classic ``eager`` expert loop and, on transformers 5,
the ``grouped_mm`` path ``MixtralForCausalLM`` picks by default), and with a dense SwiGLU FFN of the
same *active* parameter count (hidden = top_k × expert_hidden).

It also times the GEMM floor: only the per-expert matmuls of forward and backward (3 + 6 per
expert) on the row counts our router produced for the same input, into preallocated buffers, with
no routing, permutation, activation or allocation. No implementation that runs those fp32 matmuls
can beat it, so ``HF / floor`` bounds the speed-up any block can reach over transformers. It is
timed twice: with ``w1``/``w3`` as two matmuls (ours) and fused into one ``gate_up`` matmul (HF's).

All figures come from one run on the same inputs, timed round-robin so load from other processes
hits every candidate alike.

    python bench/train_model.py                      # the configurations below
    python bench/train_model.py --tokens 4096 --dim 256 --hidden 512 --experts 8 --top-k 2
    python bench/train_model.py --profile            # where our dropless block spends its time
"""
from __future__ import annotations

import os
import sys

# Running as ``python bench/x.py`` puts bench/ first on sys.path, where a sibling module could
# shadow the stdlib (e.g. bench/tokenize.py vs ``tokenize``, which torch imports); drop it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from shardflow.train.hf_export import _LAYOUTS  # noqa: E402
from shardflow.train.moe import MoEBlock, SwiGLU  # noqa: E402

# (tokens, dim, expert_hidden, experts, top_k): compute-bound, small/overhead-bound, many experts,
# fine-grained (OLMoE's 64 experts top-8 with expert_hidden = dim / 2, scaled down)
CONFIGS = [(2048, 512, 1024, 8, 2), (512, 256, 512, 8, 2), (1024, 512, 1024, 32, 4), (1024, 512, 256, 64, 8)]

OURS, CAP, HF_EAGER, HF_GROUPED, DENSE, FLOOR, FLOOR_FUSED = (
    "shardflow MoEBlock dropless", "shardflow MoEBlock capacity 1.25", "transformers Mixtral block (eager)",
    "transformers Mixtral block (grouped_mm)", "dense SwiGLU, same active params",
    "GEMM floor (w1, w3 apart: ours)", "GEMM floor (gate_up fused: HF's)",
)


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One timed training step of ``module``: fresh gradients, as the trainer's ``set_to_none``."""

    def step() -> float:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        out = module(xi)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
        return time.perf_counter() - t0

    return step


def gemm_floor(counts: list[int], dim: int, hidden: int, fused: bool):
    """The per-expert matmuls of one forward + backward and nothing else (see the module docstring).

    Forward ``a = x w1ᵀ``, ``b = x w3ᵀ`` (or ``[a b] = x [w1; w3]ᵀ``), ``y = h w2ᵀ``; backward
    ``dw2 = gyᵀ h``, ``dh = gy w2``, ``dw1 = daᵀ x``, ``dw3 = dbᵀ x`` (or ``d[w1; w3]``) and
    ``dx = da w1 + db w3``. Values are irrelevant to the timing, so buffers are reused.
    """
    n, e_count = sum(counts), len(counts)
    up = 2 * hidden if fused else hidden
    x, gy, y = torch.randn(n, dim), torch.randn(n, dim), torch.empty(n, dim)
    w_up = [torch.randn(e_count, up, dim) for _ in range(1 if fused else 2)]
    w2 = torch.randn(e_count, dim, hidden)
    act = [torch.randn(n, up) for _ in w_up]  # stands for a, b (or [a b]); also their gradients
    g_up, g2, gx = [torch.empty_like(w) for w in w_up], torch.empty_like(w2), torch.empty(n, dim)
    h, gh = torch.randn(n, hidden), torch.empty(n, hidden)

    def rows(*ts):
        return zip(*(t.split(counts) for t in ts))

    def step() -> float:
        t0 = time.perf_counter()
        for w, a in zip(w_up, act):
            for e, (xe, ae) in enumerate(rows(x, a)):
                torch.mm(xe, w[e].t(), out=ae)
        for e, (he, ye) in enumerate(rows(h, y)):
            torch.mm(he, w2[e].t(), out=ye)
        for e, (ge, he, ghe) in enumerate(rows(gy, h, gh)):
            torch.mm(ge.t(), he, out=g2[e])
            torch.mm(ge, w2[e], out=ghe)
        for i, (w, a, g) in enumerate(zip(w_up, act, g_up)):
            for e, (xe, ae, gxe) in enumerate(rows(x, a, gx)):
                torch.mm(ae.t(), xe, out=g[e])
                if i == 0:
                    torch.mm(ae, w[e], out=gxe)
                else:
                    gxe.addmm_(ae, w[e])
        return time.perf_counter() - t0

    return step


def round_robin_times(steps: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Round-robin over the candidates so drifting load on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            t = step()
            if i >= warmup:
                times[name].append(t)
    return times


_CATEGORIES = [  # (label, aten op names), first match wins; the rest is framework + Python
    ("GEMMs (experts; the tiny router gate too)", {"mm", "addmm", "addmm_", "_grouped_mm"}),
    ("combine bmm (k-weighted sum)", {"bmm"}),
    ("router: softmax, top-k, renorm, aux + z losses", {
        "linear", "_softmax", "_softmax_backward_data", "topk", "logsumexp", "exp", "exp_", "log", "log_",
        "div", "sum", "mean", "square", "pow", "sub", "neg", "value_selecting_reduction_backward",
    }),
    ("sort / argsort", {"sort", "argsort", "arange"}),
    ("gather / scatter (permute, unpermute, counts)", {
        "index_select", "index_add", "index_add_", "scatter", "scatter_", "scatter_add_", "cat", "stack",
        "gather", "index", "bincount", "floor_divide", "cumsum",
    }),
    ("SwiGLU elementwise (silu, mul)", {"silu", "silu_backward", "mul", "mul_", "sigmoid"}),
    ("allocation, fill, copy", {"empty", "empty_strided", "empty_like", "zeros", "zeros_like", "zero_",
                                "fill_", "copy_", "clone", "to", "_to_copy", "new_zeros", "new_empty"}),
]


def profile_breakdown(module: torch.nn.Module, x: torch.Tensor, steps: int = 5) -> None:
    """Self CPU time of our dropless block by category (torch.profiler), share of the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    step, wall = fwd_bwd(module, x, torch.randn_like(x)), 0.0
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            wall += step()
    by_cat = dict.fromkeys([c for c, _ in _CATEGORIES], 0.0)
    for ev in prof.key_averages():
        name = ev.key.removeprefix("aten::")
        cat = next((c for c, ops in _CATEGORIES if ev.key.startswith("aten::") and name in ops), None)
        if cat is not None:
            by_cat[cat] += ev.self_cpu_time_total / 1e6
    by_cat["autograd, views, Python (the rest)"] = wall - sum(by_cat.values())
    print(f"  profile of {OURS}: {wall / steps * 1e3:.1f} ms/step under the profiler")
    for cat, s in by_cat.items():
        print(f"    {cat:<52} {s / steps * 1e3:8.2f} ms  {100 * s / wall:5.1f} %")


def hf_block(ours: MoEBlock, dim: int, hidden: int, experts: int, top_k: int, impl: str) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral import modeling_mixtral as mm

    conf = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=experts,
                         num_experts_per_tok=top_k)
    conf._experts_implementation = impl
    block = (getattr(mm, "MixtralSparseMoeBlock", None) or getattr(mm, "MixtralSparseMoEBlock"))(conf)
    ex = ours.experts
    for layout in _LAYOUTS.values():
        sd = layout(0, ex.w1.data, ex.w3.data, ex.w2.data, ours.router.weight.data)
        sd = {k.split(".", 4)[-1]: v.clone() for k, v in sd.items()}  # drop "model.layers.0.<mlp>."
        if set(sd) == set(block.state_dict()):
            block.load_state_dict(sd)
            return block
    raise RuntimeError("unknown transformers Mixtral layout")


def run(tokens: int, dim: int, hidden: int, experts: int, top_k: int, warmup: int, repeats: int,
        profile: bool) -> None:
    import transformers

    torch.manual_seed(0)
    x = torch.randn(1, tokens, dim)  # transformers' block wants [batch, seq, dim]
    dropless = MoEBlock(dim, experts, top_k, hidden, dispatch="dropless")
    for p in dropless.parameters():
        torch.nn.init.normal_(p, std=0.02)
    capacity = MoEBlock(dim, experts, top_k, hidden, dispatch="capacity", capacity_factor=1.25)
    capacity.load_state_dict(dropless.state_dict())
    dense = SwiGLU(dim, top_k * hidden)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    candidates = {OURS: dropless, CAP: capacity, HF_EAGER: hf_block(dropless, dim, hidden, experts, top_k, "eager")}
    if int(transformers.__version__.split(".")[0]) >= 5:
        candidates[HF_GROUPED] = hf_block(dropless, dim, hidden, experts, top_k, "grouped_mm")
    candidates[DENSE] = dense
    with torch.no_grad():  # same function before timing anything
        torch.testing.assert_close(dropless(x)[0], candidates[HF_EAGER](x), atol=1e-5, rtol=1e-4)
        counts = dropless(x)[3].tolist()

    grad = torch.randn_like(x)
    steps = {name: fwd_bwd(m, x, grad) for name, m in candidates.items()}
    steps[FLOOR] = gemm_floor(counts, dim, hidden, fused=False)
    steps[FLOOR_FUSED] = gemm_floor(counts, dim, hidden, fused=True)
    times = round_robin_times(steps, warmup, repeats)
    secs = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"tokens={tokens} dim={dim} expert_hidden={hidden} experts={experts} top_k={top_k} "
          f"(rows per expert {min(counts)}-{max(counts)})")
    width = max(map(len, secs))
    for name, s in secs.items():
        print(f"  {name:<{width}}  {s * 1e3:8.1f} ms  {tokens / s:9.0f} tok/s")
    speedup, slowdown = secs[HF_EAGER] / secs[OURS], secs[OURS] / secs[DENSE]
    floor = min(secs[FLOOR], secs[FLOOR_FUSED])
    goal = "met" if speedup >= 2 else "MISSED"
    print(f"  dropless vs transformers eager       {speedup:5.2f}x faster  (goal >= 2x: {goal})")
    if HF_GROUPED in secs:
        print(f"  dropless vs transformers grouped_mm  {secs[HF_GROUPED] / secs[OURS]:5.2f}x faster")
    goal = "met" if slowdown <= 1.5 else "MISSED"
    print(f"  dropless vs dense same-active FFN    {slowdown:5.2f}x slower  (goal <= 1.5x: {goal})")
    print(f"  capacity vs dense same-active FFN    {secs[CAP] / secs[DENSE]:5.2f}x slower")
    print(f"  dropless / its GEMM floor            {secs[OURS] / secs[FLOOR]:5.2f}x")
    print(f"  transformers eager / its GEMM floor  {secs[HF_EAGER] / secs[FLOOR_FUSED]:5.2f}x"
          f"  (best possible speed-up over it, any fp32 block: {secs[HF_EAGER] / floor:.2f}x)")
    print(f"  GEMM floor / dense same-active FFN   {floor / secs[DENSE]:5.2f}x"
          f"  (the least slowdown vs dense any block can reach)")
    if profile:
        profile_breakdown(dropless, x)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--profile", action="store_true", help="also print where our dropless block spends its time")
    args = ap.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    print(f"MoE block forward+backward, fp32, CPU, torch.set_num_threads({args.threads}), "
          f"median of {args.repeats} after {args.warmup} warmup")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} logical CPUs")
    print()
    configs = CONFIGS if args.tokens is None else [(args.tokens, args.dim, args.hidden, args.experts, args.top_k)]
    for c in configs:
        run(*c, args.warmup, args.repeats, args.profile)


if __name__ == "__main__":
    main()

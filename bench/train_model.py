"""CPU benchmark of the MoE block, forward + backward, tokens/s.

Compares shardflow's ``MoEBlock`` (dropless and capacity dispatch) with transformers' Mixtral sparse
MoE block loaded with the same weights (its classic ``eager`` expert loop and, on transformers 5,
the ``grouped_mm`` path ``MixtralForCausalLM`` picks by default), and with a dense SwiGLU FFN of the
same *active* parameter count (hidden = top_k × expert_hidden). All figures come from one run on
the same inputs, timed round-robin so load from other processes hits every candidate alike.

    python bench/train_model.py                      # the three configurations below
    python bench/train_model.py --tokens 4096 --dim 256 --hidden 512 --experts 8 --top-k 2
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

# (tokens, dim, expert_hidden, experts, top_k): compute-bound, small/overhead-bound, many experts
CONFIGS = [(2048, 512, 1024, 8, 2), (512, 256, 512, 8, 2), (1024, 512, 1024, 32, 4)]

OURS, CAP, HF_EAGER, HF_GROUPED, DENSE = (
    "shardflow MoEBlock dropless", "shardflow MoEBlock capacity 1.25", "transformers Mixtral block (eager)",
    "transformers Mixtral block (grouped_mm)", "dense SwiGLU, same active params",
)


def fwd_bwd_once(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = module(xi)
    (out[0] if isinstance(out, tuple) else out).backward(grad)
    return time.perf_counter() - t0


def median_seconds(
    modules: dict[str, torch.nn.Module], x: torch.Tensor, warmup: int, repeats: int
) -> dict[str, float]:
    """Round-robin over the candidates so drifting load on a shared machine hits all of them alike."""
    grad = torch.randn_like(x)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for i in range(warmup + repeats):
        for name, m in modules.items():
            t = fwd_bwd_once(m, x, grad)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def run(tokens: int, dim: int, hidden: int, experts: int, top_k: int, warmup: int, repeats: int) -> None:
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

    secs = median_seconds(candidates, x, warmup, repeats)
    print(f"tokens={tokens} dim={dim} expert_hidden={hidden} experts={experts} top_k={top_k}")
    width = max(map(len, secs))
    for name, s in secs.items():
        print(f"  {name:<{width}}  {s * 1e3:8.1f} ms  {tokens / s:9.0f} tok/s")
    speedup, slowdown = secs[HF_EAGER] / secs[OURS], secs[OURS] / secs[DENSE]
    goal = "met" if speedup >= 2 else "MISSED"
    print(f"  dropless vs transformers eager       {speedup:5.2f}x faster  (goal >= 2x: {goal})")
    if HF_GROUPED in secs:
        print(f"  dropless vs transformers grouped_mm  {secs[HF_GROUPED] / secs[OURS]:5.2f}x faster")
    goal = "met" if slowdown <= 1.5 else "MISSED"
    print(f"  dropless vs dense same-active FFN    {slowdown:5.2f}x slower  (goal <= 1.5x: {goal})")
    print(f"  capacity vs dense same-active FFN    {secs[CAP] / secs[DENSE]:5.2f}x slower")
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
        run(*c, args.warmup, args.repeats)


if __name__ == "__main__":
    main()

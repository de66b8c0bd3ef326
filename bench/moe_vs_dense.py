"""Does the MoE beat a dense model with the same active parameters, on the same tokens?

Trains, with the real trainer (``shardflow.train.trainer.train``: streaming loader, AdamW, warmup +
cosine, clipping), a MoE (4 layers, dim 128, 32 SwiGLU experts of 128, top-4: 1.525 M active of
7.55 M parameters) and a dense model whose FFN has the MoE's *active* width (hidden 512 = top_k ×
expert_hidden; attention, embeddings and head identical: 1.508 M; the MoE's routers are the 1.1 %
more), for several seeds. A seed fixes the initial weights and the sample order, and both models
of a seed see exactly the same batches.
Each final checkpoint is scored with the evaluation's own code (``train.baseline``, what
``eval.compare_with`` adds to the evaluation report) on the whole fixed validation set, and the
"vs baseline" table (dense as the baseline) is printed per seed. Reports per model the validation
loss of every seed, mean, std and range (max − min), the paired differences, and the target:
mean(dense) − mean(MoE) > max(range_dense, range_MoE).

Why 32 experts of 128, top-4: at equal active parameters, more and finer-grained experts (the
DeepSeekMoE / OLMoE direction) gave the largest gain in single-seed runs of 600 steps (figures in
bench/RESULTS.md); the demo's 8 experts of 256, top-2, were level with dense at this length.

Data (``--corpus``): the bench corpus of bench/make_corpus.py (zstd JSONL shards of Debian
documentation); without it, the shipped demo corpus (``dataprep/data/demo_corpus.jsonl.zst``), so
the script runs on a fresh clone. Malformed lines skipped, exact duplicates and documents under 30
words dropped, about 5 % of documents held out by a hash of their text; validation = the first
2,048 packed sequences of the held-out documents (262 k tokens; all of them when fewer), the same
for every run. A sentencepiece BPE of 4,096 pieces with the project's tokenizer settings, trained
on at most 10 M characters of training documents; sequences of 128 tokens packed into WebDataset
shards with ``storage.shards`` (the pipeline's layout). Built once into ``--work`` and reused. A
run that would read more sequences than the training split holds is refused: no sequence is seen
twice.

    python bench/make_corpus.py --out /tmp/bench_corpus --target-mb 60 --skip-missing
    python bench/moe_vs_dense.py --corpus /tmp/bench_corpus --work /tmp/mvd --jobs 2   # 3 seeds x {moe, dense}, 600 steps
    python bench/moe_vs_dense.py --seeds 0 --steps 100                                  # demo corpus, a quick look
    python bench/moe_vs_dense.py --set moe:model.n_experts=8 --set moe:model.top_k=2 --set moe:model.expert_hidden=256
    python bench/moe_vs_dense.py --lr 6e-3 --set dense:optim.lr=2e-3                    # per-model learning rate

``--jobs N`` runs N trainings at once, each in its own spawned process with ``--threads`` torch
threads; the result does not depend on it (CPU kernels are deterministic for a fixed thread count).
Prints one line per run, the tables and the verdict, and a JSON summary at the end.
"""
from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from shardflow.dataprep.config import TokenizerConfig  # noqa: E402
from shardflow.dataprep.demo_corpus import demo_corpus_path  # noqa: E402
from shardflow.dataprep.tokenizer import train_model  # noqa: E402
from shardflow.storage import Storage, digest_bytes  # noqa: E402
from shardflow.storage.shards import ShardWriter, make_index, token_dtype, write_index  # noqa: E402
from shardflow.train import baseline as BL  # noqa: E402
from shardflow.train.config import TrainConfig  # noqa: E402
from shardflow.train.metrics import read_metrics  # noqa: E402
from shardflow.train.report import md_table  # noqa: E402
from shardflow.train.trainer import train  # noqa: E402

VOCAB, SEQ = 4096, 128
VAL_SEQUENCES = 2048  # 262 k tokens: the fixed validation set (the demo corpus has fewer; then all of them)
SCORE_BATCH = 64  # rows per forward when scoring the final checkpoint (every validation row either way)
TOKENIZER_CHARS = 10_000_000  # tokenizer sample: enough for 4,096 pieces, half the pipeline's default bound

# The demo's attention and sizes (configs/demo.yaml) with 32 experts of 128, top-4 (the demo: 8 of 256, top-2).
# Dense: no MoE layers, FFN hidden = top_k x expert_hidden.
MOE = {"vocab_size": VOCAB, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "n_experts": 32, "top_k": 4,
       "expert_hidden": 128, "max_seq_len": SEQ}
DENSE = {**MOE, "moe_layers": [], "dense_hidden": MOE["top_k"] * MOE["expert_hidden"]}


# ------------------------------------------------------------------------------------------------ data


def read_docs(files: list[Path]) -> list[str]:
    """Texts of zstd JSONL files, in order: well-formed records only, exact duplicates and very short ones dropped."""
    import zstandard

    seen, docs = set(), []
    for path in files:
        with open(path, "rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read()
        for line in raw.split(b"\n"):
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str) or len(text.split()) < 30:
                continue
            key = hashlib.sha1(text.encode()).digest()
            if key not in seen:
                seen.add(key)
                docs.append(text)
    return docs


def corpus_files(corpus: str | None) -> list[Path]:
    """The bench corpus's shards (bench/make_corpus.py output), or the shipped demo corpus when none is given."""
    if corpus is None:
        return [Path(demo_corpus_path())]
    files = sorted(Path(corpus).glob("*.jsonl.zst"))
    if not files:
        raise SystemExit(f"error: {corpus}: no *.jsonl.zst files (build one with bench/make_corpus.py)")
    return files


def _encode(sp, docs: list[str], eos: int, dtype) -> np.ndarray:
    """All documents as one token stream, each followed by EOS (the pipeline's packing)."""
    parts = []
    for i in range(0, len(docs), 512):
        for ids in sp.encode(docs[i:i + 512], num_threads=2):
            parts.append(np.asarray(ids + [eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_data(work: Path, corpus: str | None = None, val_sequences: int = VAL_SEQUENCES,
               tokenizer_chars: int = TOKENIZER_CHARS) -> Storage:
    """Tokenizer + train/val shards of a corpus under ``work/data`` (built once, then reused).

    Documents are split by a hash of their text (about 5 % held out); validation is the first
    ``val_sequences`` packed sequences of the held-out documents (all of them when fewer), so the
    set is fixed and the same for every run. The tokenizer is trained on at most ``tokenizer_chars``
    characters of training documents only.
    """
    storage = Storage(str(work / "data"))
    if storage.exists("shards/index.json"):
        return storage
    t0 = time.perf_counter()
    files = corpus_files(corpus)
    docs = read_docs(files)
    is_val = [hashlib.sha1(d.encode()).digest()[0] < 13 for d in docs]  # 13/256 ~ 5 % of documents
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    lines, chars = [], 0
    for d in train_docs:
        for ln in d.splitlines():
            if ln.strip() and chars < tokenizer_chars:
                lines.append(ln)
                chars += len(ln)
    model = train_model(lines, TokenizerConfig(vocab_size=VOCAB, num_threads=2))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    dtype = token_dtype(VOCAB)
    splits = {}
    for split, split_docs, cap in (("train", train_docs, None), ("val", val_docs, val_sequences)):
        toks = _encode(sp, split_docs, sp.eos_id(), dtype)
        n = len(toks) // (SEQ + 1) if cap is None else min(cap, len(toks) // (SEQ + 1))
        with ShardWriter(storage, split, SEQ, dtype, rows_per_member=64, samples_per_shard=2048) as w:
            w.write(toks[: n * (SEQ + 1)].reshape(n, SEQ + 1))
        splits[split] = w.shards
    storage.write_bytes("tokenizer/spm.model", model)
    write_index(storage, make_index(SEQ, dtype, VOCAB, digest_bytes(model), sp.eos_id(), splits))
    n = {s: sum(e["samples"] for e in v) for s, v in splits.items()}
    storage.write_json("corpus.json", {"corpus": [str(f) for f in files], "documents": len(docs), "val_documents": len(val_docs),
                                       "train_sequences": n["train"], "val_sequences": n["val"], "tokenizer_chars": chars})
    print(f"data: {len(docs)} documents ({len(val_docs)} held out) from {len(files)} file(s), {n['train']} train / "
          f"{n['val']} val sequences of {SEQ} tokens ({n['train'] * SEQ / 1e6:.2f} M train tokens), "
          f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return storage


# ------------------------------------------------------------------------------------------------ runs


def set_path(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


def run_config(kind: str, seed: int, args: argparse.Namespace, val_batches: int) -> TrainConfig:
    raw = {
        "run": f"{kind}-s{seed}-{args.tag}" if args.tag else f"{kind}-s{seed}",
        "model": json.loads(json.dumps(MOE if kind == "moe" else DENSE)),
        "data": {"batch_size": args.batch, "num_workers": 0, "seed": seed},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup},
        "trainer": {"steps": args.steps, "seed": seed, "device": "cpu", "progress": False, "log_every": 50,
                    "eval_every": args.eval_every, "eval_batches": val_batches},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
    }
    for item in args.set:
        target, _, assignment = item.rpartition(":")
        if target in ("", kind):
            key, _, value = assignment.partition("=")
            set_path(raw, key.removeprefix("train."), yaml.safe_load(value))
    return TrainConfig.model_validate(raw)


def one_run(storage: Storage, cfg: TrainConfig) -> dict:
    """Train one run, then score its last checkpoint with the evaluation's code (``train.baseline``) on
    the same validation rows as the trainer's final val loss (all of the fixed validation set)."""
    if storage.exists(f"runs/{cfg.run}"):
        storage.remove(f"runs/{cfg.run}", recursive=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start line; progress is off
        summary = train(cfg, storage)
    log = read_metrics(storage, f"runs/{cfg.run}/metrics.jsonl")
    index = storage.read_json("shards/index.json")
    val_rows = index["splits"]["val"]["samples"]
    score = BL.score_run(storage, index, cfg.run, index["tokenizer_digest"], SCORE_BATCH,
                         -(-val_rows // SCORE_BATCH), torch.device("cpu"))
    storage.remove(f"runs/{cfg.run}/checkpoints", recursive=True)
    warm = cfg.optim.warmup_steps
    return {
        "run": cfg.run, "val_loss": score["val_loss"], "trainer_val_loss": summary.get("val_loss"), "score": score,
        "train_loss_last10": statistics.fmean(r["loss"] for r in log[-10:]),
        "val_curve": [(r["step"], round(r["val_loss"], 4)) for r in log if "val_loss" in r],
        "max_grad_norm": max(r["grad_norm"] for r in log),
        "max_grad_norm_step": max(log, key=lambda r: r["grad_norm"])["step"],
        "max_grad_norm_after_warmup": max((r["grad_norm"] for r in log if r["step"] > warm), default=None),
        "active_params": summary["active_params"], "params": summary["params"], "tokens": summary["tokens"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "expert_load_cv_last": _load_cv(log[-1].get("expert_tokens")),
    }


def _task(root: str, cfg: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    return one_run(Storage(root), TrainConfig.model_validate(cfg))


def _load_cv(counts) -> float | None:
    """Coefficient of variation of tokens per expert in the last step, mean over layers (0 = balanced)."""
    if not counts:
        return None
    cvs = [float(np.std(c) / np.mean(c)) for c in counts if np.mean(c) > 0]
    return round(statistics.fmean(cvs), 3) if cvs else None


def summarize(results: dict[str, list[dict]]) -> dict:
    out = {}
    for kind, runs in results.items():
        v = [r["val_loss"] for r in runs]
        out[kind] = {"val_loss": v, "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "spread": max(v) - min(v), "max_grad_norm": max(r["max_grad_norm"] for r in runs),
                     "active_params": runs[0]["active_params"], "params": runs[0]["params"]}
    if {"moe", "dense"} <= out.keys():
        gap = out["dense"]["mean"] - out["moe"]["mean"]
        spread = max(out["moe"]["spread"], out["dense"]["spread"])
        paired = [d["val_loss"] - m["val_loss"] for m, d in zip(results["moe"], results["dense"])]
        p_std = statistics.stdev(paired) if len(paired) > 1 else 0.0
        out["verdict"] = {
            "dense_minus_moe": gap, "seed_spread": spread, "moe_wins_beyond_spread": gap > spread,
            # The weaker readings: the gap against one standard deviation across seeds, and the paired
            # differences (the two models of a seed see the same batches) as mean, std and t statistic.
            "seed_std": max(out["moe"]["std"], out["dense"]["std"]),
            "moe_wins_beyond_std": gap > max(out["moe"]["std"], out["dense"]["std"]),
            "paired_dense_minus_moe": paired, "paired_mean": statistics.fmean(paired), "paired_std": p_std,
            "paired_t": statistics.fmean(paired) / (p_std / len(paired) ** 0.5) if p_std > 0 else None,
            "moe_lower_on_every_seed": all(x > 0 for x in paired)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "_data" / "moe_vs_dense"))
    ap.add_argument("--corpus", default=None, help="folder of *.jsonl.zst shards (bench/make_corpus.py); default: the demo corpus")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["moe", "dense"], choices=["moe", "dense"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="trainer validation every N steps, for the curve (0 = none; the final checkpoint is always scored)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--set", action="append", default=[], metavar="[moe|dense:]train.KEY=VALUE",
                    help="override a train config key, for one model or both")
    ap.add_argument("--tag", default="", help="suffix of the run names")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    storage = build_data(Path(args.work), args.corpus)
    index = storage.read_json("shards/index.json")
    if args.steps * args.batch > index["splits"]["train"]["samples"]:
        raise SystemExit(f"error: {args.steps} steps x batch {args.batch} read more than the "
                         f"{index['splits']['train']['samples']} training sequences: some would be seen twice; "
                         "use a larger --corpus or fewer steps")
    val_batches = max(1, index["splits"]["val"]["samples"] // args.batch)
    results: dict[str, list[dict]] = {k: [] for k in args.models}
    t0 = time.perf_counter()
    tasks = [(kind, seed) for seed in args.seeds for kind in args.models]
    configs = [run_config(kind, seed, args, val_batches).model_dump(mode="json") for kind, seed in tasks]
    if args.jobs > 1:  # runs in separate processes (spawned: no inherited threads), results in task order
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_task, str(storage.config.root), c, args.threads) for c in configs]
            done = [f.result() for f in futures]
    else:
        done = (_task(str(storage.config.root), c, args.threads) for c in configs)
    for (kind, seed), r in zip(tasks, done):
        results[kind].append(r)
        print(f"{kind:5s} seed {seed}: val {r['val_loss']:.4f} (curve {r['val_curve']}), "
              f"max grad norm {r['max_grad_norm']:.2f} at step {r['max_grad_norm_step']}, "
              f"load CV {r['expert_load_cv_last']}, {r['wall_s']:.0f} s", flush=True)
    summary = summarize(results)
    summary["settings"] = {"steps": args.steps, "batch": args.batch, "seq_len": SEQ, "lr": args.lr,
                           "warmup": args.warmup, "seeds": args.seeds, "set": args.set, "jobs": args.jobs,
                           "tokens_per_run": args.steps * args.batch * SEQ, "val_sequences": index["splits"]["val"]["samples"],
                           "wall_s": round(time.perf_counter() - t0, 1)}
    for kind in args.models:
        s = summary[kind]
        print(f"{kind:5s}: val loss mean {s['mean']:.4f}, std {s['std']:.4f}, range (max-min) {s['spread']:.4f} over "
              f"{len(args.seeds)} seeds; {s['active_params'] / 1e6:.3f} M active of {s['params'] / 1e6:.3f} M params")
    if "verdict" in summary:
        for seed, m, d in zip(args.seeds, results["moe"], results["dense"]):
            # The evaluation report's "vs baseline" table (eval.compare_with), dense as the baseline.
            cmp = BL.compare(m["score"], d["score"])
            print(f"\nseed {seed}: {BL.comparison_note(cmp)}\n{md_table(BL.comparison_rows(cmp))}", end="")
        v = summary["verdict"]
        print(f"\npaired dense - moe per seed: {', '.join(f'{x:+.4f}' for x in v['paired_dense_minus_moe'])}; "
              f"mean {v['paired_mean']:+.4f}, std {v['paired_std']:.4f}, t {v['paired_t'] or float('nan'):.1f}")
        print(f"target mean(dense) - mean(moe) > max(range_dense, range_moe): {v['dense_minus_moe']:+.4f} vs "
              f"{v['seed_spread']:.4f}: {'MET' if v['moe_wins_beyond_spread'] else 'NOT met'}; std reading: "
              f"{v['dense_minus_moe']:+.4f} vs max std {v['seed_std']:.4f}: {'met' if v['moe_wins_beyond_std'] else 'not met'}")
    print(json.dumps({"results": results, "summary": summary}))
    return summary


if __name__ == "__main__":
    main()

"""Near-duplicate removal quality on a real corpus with templated families (issue 13).

What it does, all in one run on the same documents:

1. Reads a corpus (``bench/dedup_corpus.py`` builds one from this machine's man pages — thousands
   of generated ``gcloud`` CLI pages among them — their translations, HTML beside its Markdown
   source, reStructuredText docs, and one 20 MB document).
2. Plants near duplicates: ``--pairs`` documents per edit rate (1, 3, 5, 10 % of words
   substituted with corpus words, inserted or deleted, in equal parts), each copy added to the
   corpus; the documents are dealt into ``--shards`` filter shards.
3. Runs the four dedup phases for each configuration in a fresh subprocess (so wall time and peak
   RSS are its own): ``previous`` is the algorithm before issue 13 (union-find over unverified
   14 × 8 LSH candidates), loaded from git (``--previous-rev``); the others are today's code
   with ``--set``-style overrides; ``default`` is the shipped config. Variants that differ from
   the default only in verification reuse its signature and bucket phases (their time is the
   cluster and filter phases only).
4. Measures from the drop lists:
   - *recall*: share of planted (original, copy) pairs that end in the same cluster (same
     survivor), per edit rate;
   - *precision*: share of near-duplicate removals whose true word-5-gram Jaccard (the
     project's normalized words) to their survivor is below 0.5 — over all of them, or a sample
     of ``--precision-sample`` when there are more — and the same among removals of documents
     that were not planted;
   - the largest cluster (documents removed in favour of one survivor, plus it);
   - wall time of the phases and peak RSS, with ratios to ``previous``.

Usage::

    python bench/dedup_corpus.py
    python bench/minhash_quality.py --corpus bench/_data/dedup_corpus.jsonl.zst --pairs 300 \\
        --configs "previous;default;verify=exact,jaccard_threshold=0.5;jaccard_threshold=0.5"

``--throughput-docs N`` adds the signature throughput comparison against per-document baselines.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import unicodedata
import re

import numpy as np
import xxhash
import zstandard

from shardflow.dataprep.minhash import MinHasher, jaccard

RATES = (0.01, 0.03, 0.05, 0.10)
NON_DUP_J = 0.5
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# -- corpus and planting --------------------------------------------------------------------------------

def read_corpus(path: str) -> list[dict]:
    docs = []
    with open(path, "rb") as raw:
        stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8") \
            if path.endswith(".zst") else open(path, encoding="utf-8")
        for line in stream:
            obj = json.loads(line)
            docs.append({"id": str(obj["id"]), "text": obj["text"], "source": obj.get("source", ""), "meta": {}})
    return docs


def plant(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """A copy with ``rate`` of its words edited (substituted, inserted or deleted)."""
    words = text.split()
    for _ in range(max(1, round(rate * len(words)))):
        op = rng.randrange(3)
        i = rng.randrange(len(words))
        if op == 0:
            words[i] = rng.choice(vocab)
        elif op == 1:
            words.insert(i, rng.choice(vocab))
        elif len(words) > 1:
            del words[i]
    return " ".join(words)


def planted_corpus(docs: list[dict], pairs: int, seed: int) -> tuple[list[dict], list[tuple[str, str, float]]]:
    rng = random.Random(seed)
    pool = [d for d in docs if 50 <= len(d["text"].split()) <= 20000]
    vocab = sorted({w for d in rng.sample(pool, min(500, len(pool))) for w in d["text"].split()})
    chosen = rng.sample(pool, min(len(pool), pairs * len(RATES)))
    added, truth = [], []
    for k, d in enumerate(chosen):
        rate = RATES[k % len(RATES)]
        copy_id = f"planted:{rate:.2f}:{k}"
        added.append({"id": copy_id, "text": plant(d["text"], rate, vocab, rng), "source": "planted", "meta": {}})
        truth.append((d["id"], copy_id, rate))
    return docs + added, truth


def write_shards(root: str, docs: list[dict], n_shards: int) -> None:
    from shardflow.storage import Storage
    from shardflow.storage.jsonl import write_jsonl
    from shardflow.storage.manifest import ShardRecord, output_ref, write_record

    storage = Storage(root)
    shards: list[list[dict]] = [[] for _ in range(n_shards)]
    for d in docs:   # a fixed pseudo-random deal, independent of corpus order
        shards[xxhash.xxh3_64_intdigest(d["id"].encode()) % n_shards].append(d)
    for i, part in enumerate(shards):
        ref = f"stages/filter/{i:06d}.jsonl.zst"
        write_jsonl(storage, ref, part)
        write_record(storage, ShardRecord(stage="filter", shard_id=f"{i:06d}", status="done",
                                          outputs={"docs": output_ref(storage, ref)}))


# -- one configuration, in its own process ----------------------------------------------------------------

def load_previous(rev: str):
    """The dedup module as it was at ``rev`` (before issue 13), importable beside today's."""
    src = subprocess.check_output(["git", "-C", REPO, "show", f"{rev}:dataprep/dedup.py"])
    spec = importlib.util.spec_from_loader("shardflow.dataprep._dedup_previous", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "shardflow.dataprep"
    sys.modules[spec.name] = mod
    exec(compile(src, f"{rev}:dataprep/dedup.py", "exec"), mod.__dict__)
    return mod


def parse_overrides(spec: str) -> dict:
    out = {}
    for part in filter(None, spec.split(",")):
        k, v = part.split("=", 1)
        out[k.strip()] = json.loads(v) if v.strip()[:1] in "0123456789-tfn[{\"" else v.strip()
    return out


def run_one(root: str, name: str, overrides: dict, previous_rev: str) -> dict:
    from shardflow.dataprep.config import PrepConfig
    from shardflow.dataprep.stage import run_stage
    from shardflow.storage import Storage

    cfg = PrepConfig()
    if name == "previous":
        module = load_previous(previous_rev)
        cfg.dedup.num_bands, cfg.dedup.rows_per_band = 14, 8
        cfg.dedup.jaccard_threshold = None          # the previous default: no verification
        cfg.dedup.verify_all_pairs_up_to = 64
    else:
        from shardflow.dataprep import dedup as module
        for k, v in overrides.items():
            setattr(cfg.dedup, k, v)
        PrepConfig.model_validate(cfg.model_dump())
    storage = Storage(root)
    phases = {}
    t0 = time.perf_counter()
    for stage in module.dedup_stages(cfg):
        t1 = time.perf_counter()
        r = run_stage(stage, storage)
        if r["failed"]:
            raise SystemExit(f"{name}: {stage.name} failed: {r['failed']}")
        phases[stage.name] = {"s": round(time.perf_counter() - t1, 2), "ran": len(r["ran"])}
    return {"wall_s": round(time.perf_counter() - t0, 2), "phases": phases,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# -- evaluation -------------------------------------------------------------------------------------------

def drops_of(root: str) -> dict[str, tuple[str, str]]:
    """doc id -> (kind, survivor id), from today's Parquet drop lists or the previous JSON ones."""
    import pyarrow.parquet as pq

    out = {}
    d = os.path.join(root, "dedup", "drops")
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        if name.endswith(".parquet"):
            t = pq.read_table(path, columns=["id", "kind", "survivor"]).to_pydict()
        elif name.endswith(".json"):
            t = json.load(open(path))
        else:
            continue
        out.update((i, (k, s)) for i, k, s in zip(t["id"], t["kind"], t["survivor"]))
    return out


def evaluate(drops: dict[str, tuple[str, str]], texts: dict[str, str], truth: list[tuple[str, str, float]],
             sample: int, seed: int) -> dict:
    survivor = lambda x: drops[x][1] if x in drops else x  # noqa: E731
    recall = {}
    for rate in RATES:
        hits = [survivor(a) == survivor(b) for a, b, r in truth if r == rate]
        recall[f"{rate:.0%}"] = round(float(np.mean(hits)), 4) if hits else None
    sizes: dict[str, int] = {}
    for _, s in drops.values():
        sizes[s] = sizes.get(s, 1) + 1
    near = sorted(i for i, (k, _) in drops.items() if k == "near")
    rng = random.Random(seed)
    picked = near if len(near) <= sample else sorted(rng.sample(near, sample))
    shingler = MinHasher(num_bands=0)
    js = []
    for i in picked:
        a, b = shingler.shingle_sets([texts[i], texts[drops[i][1]]])
        js.append(jaccard(a, b))
    js = np.array(js)
    unplanted = np.array([not i.startswith("planted:") for i in picked], dtype=bool)
    below = lambda m: (int((js[m] < NON_DUP_J).sum()), int(m.sum()))  # noqa: E731
    b_all, n_all = below(np.ones(len(js), dtype=bool))
    b_un, n_un = below(unplanted)
    return {
        "recall": recall, "dropped": len(drops), "dropped_near": len(near),
        "precision_sample": n_all, "below_0.5": b_all, "share_below_0.5": round(b_all / max(1, n_all), 4),
        "unplanted_sample": n_un, "unplanted_below_0.5": b_un, "unplanted_share_below_0.5": round(b_un / max(1, n_un), 4),
        "median_jaccard_of_near_removals": round(float(np.median(js)), 3) if len(js) else None,
        "largest_cluster": max(sizes.values()) if sizes else 0,
        "clusters_over_100": sum(v > 100 for v in sizes.values()),
    }


# -- throughput (unchanged from issue 3) ---------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]|_")


def baseline_numpy(texts: list[str], ngram: int, a: np.ndarray, b: np.ndarray, bands: int, rows: int) -> None:
    """Per document: normalize, build shingle strings, xxhash each, permute with numpy (the
    per-document shape of datatrove's / datasketch's MinHash)."""
    for t in texts:
        if not t.isascii():
            t = unicodedata.normalize("NFKC", t)
        words = _PUNCT.sub(" ", t.lower()).split()
        grams = [" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))]
        x = np.fromiter((xxhash.xxh64_intdigest(g.encode("utf-8", "surrogatepass")) >> 32 for g in grams),
                        dtype=np.uint64, count=len(grams))
        sig = ((x[:, None] * a[None, :] + b[None, :]).min(axis=0) >> np.uint64(32)).astype(np.uint32)
        [xxhash.xxh64_intdigest(sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)]


def throughput(texts: list[str], bands: int, rows: int) -> dict:
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    h = MinHasher(num_bands=bands, rows_per_band=rows)
    h.sketch(texts[:50])
    t0 = time.perf_counter()
    h.sketch(texts, signature=True)
    ours = time.perf_counter() - t0
    a, b = h.permutations
    t0 = time.perf_counter()
    baseline_numpy(texts, 5, a, b, bands, rows)
    base = time.perf_counter() - t0
    return {"docs": len(texts), "mb": round(mb, 2), "shardflow_mb_s": round(mb / ours, 2),
            "per_doc_numpy_mb_s": round(mb / base, 2), "speedup": round(base / ours, 2)}


# -- main -------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(HERE, "_data", "dedup_corpus.jsonl.zst"))
    ap.add_argument("--work", default=os.path.join(HERE, "_data", "minhash_quality"))
    ap.add_argument("--pairs", type=int, default=300, help="planted pairs per edit rate")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--configs", default="previous;default",
                    help="';'-separated: 'previous', 'default', or comma-separated prep.dedup overrides")
    ap.add_argument("--previous-rev", default="444a39d", help="git revision holding the pre-issue-13 dedup.py")
    ap.add_argument("--precision-sample", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="run full configs this many times, alternating; min wall reported")
    ap.add_argument("--throughput-docs", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--run-one", nargs=2, metavar=("ROOT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.run_one:
        root, name = args.run_one
        print(json.dumps(run_one(root, name, parse_overrides("" if name in ("previous", "default") else name),
                                 args.previous_rev)))
        return

    t0 = time.perf_counter()
    docs, truth = planted_corpus(read_corpus(args.corpus), args.pairs, args.seed)
    texts = {d["id"]: d["text"] for d in docs}
    print(f"corpus: {len(docs)} documents ({sum(len(t) for t in texts.values()) / 1e6:.0f} M chars, largest "
          f"{max(len(t) for t in texts.values()) / 1e6:.1f} M), {len(truth)} planted pairs ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    base = os.path.join(args.work, "filter-only")
    write_shards(base, docs, args.shards)

    from shardflow.dataprep.config import DedupConfig
    layout = lambda o: (o.get("num_bands", DedupConfig().num_bands), o.get("rows_per_band", DedupConfig().rows_per_band),  # noqa: E731
                        o.get("ngram", 5), o.get("seed", 1))
    results = {}
    names = [c.strip() for c in args.configs.split(";") if c.strip()]
    for round_ in range(args.repeat):
        for name in names:
            overrides = {} if name in ("previous", "default") else parse_overrides(name)
            reuse = name not in ("previous", "default") and "default" in results and layout(overrides) == layout({})
            if round_ and reuse:
                continue
            root = os.path.join(args.work, re.sub(r"[^a-z0-9.=_-]+", "_", name.lower()))
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(results["default"]["root"] if reuse else base, root)
            out = subprocess.run([sys.executable, __file__, "--run-one", root, name, "--previous-rev", args.previous_rev],
                                 check=True, capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res.update(evaluate(drops_of(root), texts, truth, args.precision_sample, args.seed), root=root,
                       reused_signatures=reuse)
            if name in results:
                res["walls"] = results[name]["walls"] + [res["wall_s"]]
                res["wall_s"] = min(res["walls"])
                res["peak_rss_mb"] = max(res["peak_rss_mb"], results[name]["peak_rss_mb"])
            else:
                res["walls"] = [res["wall_s"]]
            results[name] = res
            print(f"[{name}] {json.dumps({k: v for k, v in res.items() if k != 'root'})}", flush=True)

    prev = results.get("previous")
    print("\n| config | recall 1 % | 3 % | 5 % | 10 % | near removals | J<0.5 (all) | J<0.5 (unplanted) | "
          "largest cluster | dedup s | vs previous | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['wall_s'] / prev['wall_s']:.2f}×" if prev and not r["reused_signatures"] else "-"
        rec = " | ".join(f"{r['recall'][f'{x:.0%}']:.3f}" for x in RATES)
        print(f"| {name} | {rec} | {r['dropped_near']} | {r['below_0.5']}/{r['precision_sample']} "
              f"({r['share_below_0.5']:.2%}) | {r['unplanted_below_0.5']}/{r['unplanted_sample']} "
              f"({r['unplanted_share_below_0.5']:.2%}) | {r['largest_cluster']} | {r['wall_s']:.1f}"
              f"{' (clusters+filter)' if r['reused_signatures'] else ''} | {ratio} | {r['peak_rss_mb']:.0f} |")
    if "default" in results:
        r = results["default"]
        goals = {"recall >= 0.95 at <= 5 %": all(r["recall"][f"{x:.0%}"] >= 0.95 for x in RATES if x <= 0.05),
                 "<= 1 % of removals below 0.5": r["share_below_0.5"] <= 0.01,
                 "peak RSS <= 2 GB": r["peak_rss_mb"] <= 2048}
        if prev:
            goals["dedup time <= 1.5x previous"] = r["wall_s"] <= 1.5 * prev["wall_s"]
        print("\ndefault config: " + "; ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in goals.items()))
    if args.throughput_docs:
        sample = [d["text"] for d in docs[:args.throughput_docs]]
        print(f"\nsignature throughput: {json.dumps(throughput(sample, DedupConfig().num_bands, DedupConfig().rows_per_band))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())

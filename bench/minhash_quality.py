"""MinHash LSH quality and signature throughput on a real corpus.

Quality: near duplicates are planted into real documents at word edit rates of 1, 3, 5 and 10 %
(substitutions with corpus words, insertions and deletions, in equal parts); recall is the share of
(original, copy) pairs that become LSH candidates (share at least one band hash), next to what
theory predicts from each pair's true shingle Jaccard (``1 - (1 - J^r)^b``). False positives are
measured on at least 10,000 sampled pairs of *different* corpus documents whose true Jaccard is
below 0.5: at random, and — harder — within the same source package (shared boilerplate).
Each LSH layout given by ``--layouts`` is measured on the same pairs.

Throughput: :class:`shardflow.dataprep.minhash.MinHasher` (batch-vectorized) against two per-doc
baselines timed in the same run on the same documents: a per-document Python pipeline that
hashes each shingle string with xxhash and permutes with numpy per document (the shape of
datatrove's and datasketch's MinHash), and a pure-Python one (no numpy) on a subset.

Usage::

    python bench/minhash_quality.py --corpus bench/_data/corpus --pairs 2000
    python bench/minhash_quality.py --corpus a.jsonl.zst b.jsonl --pairs 500 --layouts 14x8,28x4,20x5

The corpus: JSONL files (plain/.gz/.zst) with a ``text`` field, or a directory of them (for the
benchmark corpus, ``bench/make_corpus.py``; its ``planted.jsonl`` is read so that pre-planted
copies and their originals are left out of sampling).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import random
import re
import sys
import time
import unicodedata

import numpy as np
import xxhash
import zstandard

from shardflow.dataprep.config import DedupConfig
from shardflow.dataprep.minhash import MinHasher, candidate_probability, jaccard

RATES = (0.01, 0.03, 0.05, 0.10)
NON_DUP_J = 0.5


# -- corpus ---------------------------------------------------------------------------------------------

def corpus_files(spec: list[str]) -> list[str]:
    files: list[str] = []
    for s in spec:
        if os.path.isdir(s):
            files += sorted(glob.glob(os.path.join(s, "*.jsonl*")))
        else:
            files.append(s)
    files = [f for f in files if not f.endswith("planted.jsonl")]
    if not files:
        raise SystemExit(f"no JSONL files in {spec}: build the corpus with bench/make_corpus.py or pass files")
    return files


def excluded_ids(spec: list[str]) -> set[str]:
    out: set[str] = set()
    for s in spec:
        p = os.path.join(s, "planted.jsonl") if os.path.isdir(s) else None
        if p and os.path.exists(p):
            for line in open(p, encoding="utf-8"):
                rec = json.loads(line)
                out.update((rec["original_id"], rec["dup_id"]))
    return out


def read_docs(files: list[str], limit: int, exclude: set[str], min_words: int) -> list[dict]:
    docs = []
    for path in files:
        with open(path, "rb") as raw:
            if path.endswith(".zst"):
                stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
            elif path.endswith(".gz"):
                stream = io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8")
            else:
                stream = io.TextIOWrapper(raw, encoding="utf-8")
            for line in stream:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                text = obj.get("text") if isinstance(obj, dict) else None
                doc_id = str(obj.get("id", f"{path}:{len(docs)}")) if isinstance(obj, dict) else ""
                if not isinstance(text, str) or doc_id in exclude or "~near" in doc_id or "~dup" in doc_id:
                    continue
                if len(text.split()) < min_words:
                    continue
                docs.append({"id": doc_id, "text": text, "source": str(obj.get("source", ""))})
                if len(docs) >= limit:
                    return docs
    return docs


def plant(text: str, rate: float, vocab: list[str], rng: random.Random) -> tuple[str, float]:
    """A copy with ``rate`` of its words edited (substituted, inserted or deleted)."""
    words = text.split()
    n = max(1, round(rate * len(words)))
    for _ in range(n):
        op = rng.randrange(3)
        i = rng.randrange(len(words))
        if op == 0:
            words[i] = rng.choice(vocab)
        elif op == 1:
            words.insert(i, rng.choice(vocab))
        elif len(words) > 1:
            del words[i]
    return " ".join(words), n / max(1, len(text.split()))


# -- quality --------------------------------------------------------------------------------------------

def candidates(bands_a: np.ndarray, bands_b: np.ndarray) -> np.ndarray:
    return (bands_a == bands_b).any(axis=1)


def layout_list(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        b, r = part.lower().split("x")
        out.append((int(b), int(r)))
    return out


def quality(docs: list[dict], pairs: int, layouts: list[tuple[int, int]], ngram: int, seed: int,
            fp_pairs: int) -> dict:
    rng = random.Random(seed)
    base = rng.sample(docs, min(pairs, len(docs)))
    vocab = sorted({w for d in rng.sample(docs, min(500, len(docs))) for w in d["text"].split()})
    planted = {rate: [plant(d["text"], rate, vocab, rng) for d in base] for rate in RATES}
    shingler = MinHasher(ngram=ngram, num_bands=0)
    base_sets = shingler.shingle_sets([d["text"] for d in base])
    true_j = {rate: np.array([jaccard(a, b) for a, b in zip(base_sets, shingler.shingle_sets([t for t, _ in planted[rate]]))])
              for rate in RATES}

    # non-duplicate pairs: random, and within the same source package
    n = len(docs)
    all_sets = shingler.shingle_sets([d["text"] for d in docs])
    rand_pairs = set()
    while len(rand_pairs) < min(fp_pairs, n * (n - 1) // 2):
        i, j = rng.randrange(n), rng.randrange(n)
        if i != j:
            rand_pairs.add((min(i, j), max(i, j)))
    by_pkg: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_pkg.setdefault(d["source"].split("/", 1)[0], []).append(i)
    groups = [g for g in by_pkg.values() if len(g) > 1]
    hard_pairs = set()
    tries = 0
    while groups and len(hard_pairs) < fp_pairs and tries < 50 * fp_pairs:
        tries += 1
        g = rng.choice(groups)
        i, j = rng.sample(g, 2)
        hard_pairs.add((min(i, j), max(i, j)))
    pair_sets = {}
    for name, ps in (("random", sorted(rand_pairs)), ("same_package", sorted(hard_pairs))):
        arr = np.array(ps, dtype=np.int64).reshape(-1, 2)
        js = np.array([jaccard(all_sets[i], all_sets[j]) for i, j in arr.tolist()])
        pair_sets[name] = (arr, js)

    results = {"docs": len(docs), "pairs_per_rate": len(base), "ngram": ngram, "layouts": {}}
    for rate in RATES:
        results.setdefault("true_jaccard", {})[f"{rate:.0%}"] = {
            "mean": round(float(true_j[rate].mean()), 4), "p10": round(float(np.percentile(true_j[rate], 10)), 4)}
    for b, r in layouts:
        h = MinHasher(ngram=ngram, num_bands=b, rows_per_band=r, seed=seed)
        sk_base = h.sketch([d["text"] for d in base]).bands
        sk_all = h.sketch([d["text"] for d in docs]).bands
        out: dict = {"recall": {}, "expected_recall": {}, "false_positive": {}}
        for rate in RATES:
            sk_dup = h.sketch([t for t, _ in planted[rate]]).bands
            out["recall"][f"{rate:.0%}"] = round(float(candidates(sk_base, sk_dup).mean()), 4)
            expected = np.mean([candidate_probability(j, b, r) for j in true_j[rate]])
            out["expected_recall"][f"{rate:.0%}"] = round(float(expected), 4)
        for name, (arr, js) in pair_sets.items():
            non_dup = js < NON_DUP_J
            flagged = candidates(sk_all[arr[:, 0]], sk_all[arr[:, 1]])
            out["false_positive"][name] = {
                "pairs": int(non_dup.sum()), "flagged": int((flagged & non_dup).sum()),
                "rate": round(float((flagged & non_dup).sum() / max(1, non_dup.sum())), 6),
                "excluded_true_dups": int((~non_dup).sum())}
        results["layouts"][f"{b}x{r}"] = out
    return results


# -- throughput -----------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s]|_")
_M61 = (1 << 61) - 1


def baseline_numpy(texts: list[str], ngram: int, a: np.ndarray, b: np.ndarray, bands: int, rows: int) -> list[list[int]]:
    """Per document: normalize, build shingle strings, xxhash each, permute with numpy (the
    per-document shape of datatrove's / datasketch's MinHash)."""
    out = []
    for t in texts:
        if not t.isascii():
            t = unicodedata.normalize("NFKC", t)
        words = _PUNCT.sub(" ", t.lower()).split()
        grams = [" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))]
        x = np.fromiter((xxhash.xxh64_intdigest(g.encode("utf-8", "surrogatepass")) >> 32 for g in grams),
                        dtype=np.uint64, count=len(grams))
        sig = ((x[:, None] * a[None, :] + b[None, :]).min(axis=0) >> np.uint64(32)).astype(np.uint32)
        out.append([xxhash.xxh64_intdigest(sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)])
    return out


def baseline_pure_python(texts: list[str], ngram: int, a: list[int], b: list[int], bands: int, rows: int) -> list[list[int]]:
    """The same with Python integers only."""
    out = []
    mask = (1 << 64) - 1
    for t in texts:
        words = _PUNCT.sub(" ", t.lower()).split()
        xs = {xxhash.xxh64_intdigest(" ".join(words[i:i + ngram]).encode("utf-8", "surrogatepass")) >> 32
              for i in range(max(1, len(words) - ngram + 1))}
        sig = [min(((ak * x + bk) & mask) >> 32 for x in xs) for ak, bk in zip(a, b)]
        out.append([hash(tuple(sig[i * rows:(i + 1) * rows])) for i in range(bands)])
    return out


def throughput(docs: list[dict], ngram: int, bands: int, rows: int, seed: int, n: int, n_pure: int) -> dict:
    texts = [d["text"] for d in docs[:n]]
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    h = MinHasher(ngram=ngram, num_bands=bands, rows_per_band=rows, seed=seed)
    h.sketch(texts[:50])  # warm the lazily built tables
    t0 = time.perf_counter()
    h.sketch(texts)
    ours = time.perf_counter() - t0
    a, b = h.permutations
    t0 = time.perf_counter()
    baseline_numpy(texts, ngram, a, b, bands, rows)
    base = time.perf_counter() - t0
    sub = texts[:n_pure]
    sub_mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in sub) / 1e6
    t0 = time.perf_counter()
    baseline_pure_python(sub, ngram, a.tolist(), b.tolist(), bands, rows)
    pure = time.perf_counter() - t0
    return {
        "docs": len(texts), "mb": round(mb, 2),
        "shardflow": {"docs_per_s": round(len(texts) / ours), "mb_per_s": round(mb / ours, 2)},
        "per_doc_numpy": {"docs_per_s": round(len(texts) / base), "mb_per_s": round(mb / base, 2)},
        "pure_python": {"docs": len(sub), "docs_per_s": round(len(sub) / pure, 1), "mb_per_s": round(sub_mb / pure, 3)},
        "speedup_vs_per_doc_numpy": round(base / ours, 2),
        "speedup_vs_pure_python": round((pure / len(sub)) / (ours / len(texts)), 1),
    }


# -- main -----------------------------------------------------------------------------------------------

def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", default=[os.path.join(here, "_data", "corpus")])
    ap.add_argument("--pairs", type=int, default=1000, help="planted pairs per edit rate")
    ap.add_argument("--pool", type=int, default=4000, help="corpus documents read (non-duplicate pairs come from them)")
    ap.add_argument("--fp-pairs", type=int, default=10000, help="sampled non-duplicate pairs per kind (>= 10000)")
    ap.add_argument("--layouts", default=None, help="bands x rows list, default: the config's, then 28x4")
    ap.add_argument("--ngram", type=int, default=None)
    ap.add_argument("--min-words", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--throughput-docs", type=int, default=3000)
    ap.add_argument("--pure-python-docs", type=int, default=100)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    cfg = DedupConfig()
    ngram = args.ngram or cfg.ngram
    layouts = layout_list(args.layouts) if args.layouts else [(cfg.num_bands, cfg.rows_per_band), (28, 4)]
    files = corpus_files(args.corpus)
    t0 = time.perf_counter()
    docs = read_docs(files, args.pool, excluded_ids(args.corpus), args.min_words)
    if len(docs) < 100:
        raise SystemExit(f"only {len(docs)} documents of >= {args.min_words} words in {files[:3]}...")
    print(f"corpus: {len(docs)} documents from {len(files)} file(s) ({time.perf_counter() - t0:.1f} s)", flush=True)

    q = quality(docs, args.pairs, layouts, ngram, args.seed, args.fp_pairs)
    tp = throughput(docs, ngram, layouts[0][0], layouts[0][1], args.seed, args.throughput_docs, args.pure_python_docs)

    print("\n=== MinHash LSH quality ===")
    print(f"{len(docs)} docs, {q['pairs_per_rate']} planted pairs per edit rate, {ngram}-word shingles")
    print("true Jaccard of planted pairs: "
          + ", ".join(f"{k}: mean {v['mean']:.3f} (p10 {v['p10']:.3f})" for k, v in q["true_jaccard"].items()))
    for name, res in q["layouts"].items():
        b, r = layout_list(name)[0]
        thr = (1 / b) ** (1 / r)
        ok_recall = all(res["recall"][f"{x:.0%}"] >= 0.95 for x in RATES if x <= 0.05)
        ok_fp = all(v["rate"] <= 0.01 for v in res["false_positive"].values())
        print(f"\n[{name}: {b} bands x {r} rows = {b * r} permutations, threshold ~{thr:.2f}]")
        print("  edit rate   recall   expected")
        for rate in RATES:
            k = f"{rate:.0%}"
            print(f"  {k:>9}   {res['recall'][k]:.4f}   {res['expected_recall'][k]:.4f}")
        for kind, v in res["false_positive"].items():
            print(f"  false positives ({kind}): {v['flagged']}/{v['pairs']} = {v['rate']:.4%} "
                  f"(pairs with J >= {NON_DUP_J} excluded: {v['excluded_true_dups']})")
        print(f"  goals: recall >= 0.95 at <= 5 %: {'PASS' if ok_recall else 'FAIL'}; "
              f"false-positive rate <= 1 %: {'PASS' if ok_fp else 'FAIL'}")
    print("\n=== signature throughput (one process) ===")
    print(f"{tp['docs']} docs, {tp['mb']} MB, layout {layouts[0][0]}x{layouts[0][1]}")
    print(f"  shardflow MinHasher      {tp['shardflow']['docs_per_s']:>8} docs/s  {tp['shardflow']['mb_per_s']:>7} MB/s")
    print(f"  per-doc python + numpy   {tp['per_doc_numpy']['docs_per_s']:>8} docs/s  {tp['per_doc_numpy']['mb_per_s']:>7} MB/s"
          f"   -> shardflow {tp['speedup_vs_per_doc_numpy']}x")
    print(f"  pure python ({tp['pure_python']['docs']} docs)   {tp['pure_python']['docs_per_s']:>8} docs/s  "
          f"{tp['pure_python']['mb_per_s']:>7} MB/s   -> shardflow {tp['speedup_vs_pure_python']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quality": q, "throughput": tp, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())

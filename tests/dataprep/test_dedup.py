"""The four dedup phases on real text (the bundled demo corpus): planted exact and near duplicates
are found, distinct documents are kept, survivors do not depend on shard order, phases resume per
shard and outputs are byte-identical across runs — on local disk and on S3."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import zstandard

from shardflow.dataprep import dedup as dd
from shardflow.dataprep import minhash as mh
from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.demo_corpus import read_demo_corpus
from shardflow.dataprep.stage import plan, run_shard, run_stage
from shardflow.storage import Storage
from shardflow.storage.jsonl import iter_jsonl, read_parquet_table, write_jsonl
from shardflow.storage.manifest import ShardRecord, list_records, output_ref, write_record

PHASES = ["dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup"]


# -- fixtures and helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Valid records of the demo corpus (real documentation, with labelled planted copies)."""
    raw = read_demo_corpus()
    out = []
    for line in raw.split(b"\n"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip() \
                and isinstance(obj.get("id"), str) and (obj.get("meta") or {}).get("planted") != "low_quality":
            out.append({"id": obj["id"], "text": obj["text"], "source": obj.get("source", ""), "meta": obj.get("meta") or {}})
    return out


@pytest.fixture(scope="module")
def distinct(records) -> list[dict]:
    """About 150 unplanted documents of 40+ words whose pairwise shingle Jaccard is below 0.2."""
    pool = [r for r in records if not r["meta"].get("planted") and len(r["text"].split()) >= 40]
    pool = random.Random(0).sample(pool, 400)
    sets = mh.MinHasher(num_bands=0).shingle_sets([r["text"] for r in pool])
    chosen, chosen_sets = [], []
    for r, s in zip(pool, sets):
        if all(mh.jaccard(s, t) < 0.2 for t in chosen_sets):
            chosen.append(r)
            chosen_sets.append(s)
        if len(chosen) == 150:
            break
    assert len(chosen) == 150
    return chosen


def shard_ref(i: int) -> str:
    return f"stages/filter/{i:06d}.jsonl.zst"


def write_filter_shards(storage: Storage, shards: list[list[dict]]) -> None:
    """Stand in for the filter stage: its documents files plus done manifest records."""
    for i, docs in enumerate(shards):
        write_jsonl(storage, shard_ref(i), docs)
        write_record(storage, ShardRecord(stage="filter", shard_id=f"{i:06d}", status="done",
                                          outputs={"docs": output_ref(storage, shard_ref(i))}))


def run_dedup(storage: Storage, cfg: PrepConfig) -> dict[str, dict]:
    results = {}
    for stage in dd.dedup_stages(cfg):
        r = run_stage(stage, storage)
        assert not r["failed"], r["failed"]
        results[stage.name] = r
    return results


def kept_ids(storage: Storage) -> list[str]:
    return [d["id"] for rec in sorted(list_records(storage, "dedup").values(), key=lambda r: r.shard_id)
            for d in iter_jsonl(storage, rec.outputs["docs"].ref)]


def dropped(storage: Storage) -> dict[str, tuple[str, str]]:
    """doc id -> (kind, survivor id) from all drop lists."""
    out = {}
    for name in storage.list(dd.DROP_DIR, suffix=".parquet"):
        dl = read_parquet_table(storage, f"{dd.DROP_DIR}/{name}").to_pydict()
        assert dl["idx"] == sorted(dl["idx"])
        for i, kind, sid in zip(dl["id"], dl["kind"], dl["survivor"]):
            out[i] = (kind, sid)
    return out


def drop_idx(storage: Storage, shard: str) -> list[int]:
    return read_parquet_table(storage, dd.drop_ref(shard), ["idx"]).column("idx").to_pylist()


def edit_words(text: str, rate: float, rng: random.Random) -> str:
    """Substitute, delete or insert about ``rate`` of the words (substitutes from the same text)."""
    words = text.split()
    vocab = sorted(set(words))
    for _ in range(max(1, round(rate * len(words)))):
        op, i = rng.choice("sdi"), rng.randrange(len(words))
        if op == "s":
            words[i] = rng.choice([w for w in vocab[:50] if w.lower() != words[i].lower()])
        elif op == "d" and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    return " ".join(words)


def cfg_with(**dedup) -> PrepConfig:
    cfg = PrepConfig()
    for k, v in dedup.items():
        setattr(cfg.dedup, k, v)
    return cfg


def true_jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = mh.MinHasher(ngram=ngram, num_bands=0).shingle_sets([a, b])
    return mh.jaccard(sa, sb)


# -- end to end ----------------------------------------------------------------------------------------

def test_end_to_end_planted_duplicates(storage, records):
    """Planted exact and near copies of the demo corpus, spread over three shards (within and
    across), are found; documents without a planted relation survive unless they truly are
    near-identical; every count adds up."""
    by_id = {r["id"]: r for r in records}
    planted = [r for r in records if r["meta"].get("planted") in ("exact_dup", "near_dup")]
    originals = {r["meta"]["dup_of"] for r in planted}
    others = [r for r in records if not r["meta"].get("planted") and r["id"] not in originals][:250]
    docs = planted + [by_id[i] for i in sorted(originals)] + others
    random.Random(1).shuffle(docs)
    write_filter_shards(storage, [docs[0::3], docs[1::3], docs[2::3]])

    results = run_dedup(storage, PrepConfig())
    assert [len(results[p]["ran"]) for p in PHASES] == [3, 8, 1, 3]
    kept = kept_ids(storage)
    assert len(kept) == len(set(kept))
    drops = dropped(storage)
    assert set(kept) | set(drops) == {d["id"] for d in docs} and not set(kept) & set(drops)

    exact_pairs = [(r["meta"]["dup_of"], r["id"]) for r in planted if r["meta"]["planted"] == "exact_dup"]
    assert len(exact_pairs) > 40
    survivor_of = lambda x: drops[x][1] if x in drops else x  # noqa: E731
    for a, b in exact_pairs:
        assert a in drops or b in drops, (a, b)
        assert "exact" in (drops.get(a, ("",))[0], drops.get(b, ("",))[0]), (a, b)
        assert survivor_of(a) == survivor_of(b), (a, b)   # same cluster

    near = [(r["meta"]["dup_of"], r["id"]) for r in planted if r["meta"]["planted"] == "near_dup"]
    found = 0
    for a, b in near:
        j = true_jaccard(by_id[a]["text"], by_id[b]["text"])
        hit = survivor_of(a) == survivor_of(b)
        found += hit
        if j >= 0.9:  # candidate probability > 0.9999 with 28 bands x 4 rows, verified
            assert hit, (a, b, j)
    assert found >= 0.7 * len(near)

    # No false merge: whatever was dropped is near-identical to its survivor, and an exact drop
    # has a member of its cluster with the same normalized text.
    members: dict[str, set[str]] = {}
    for doc_id, (_, survivor) in drops.items():
        members.setdefault(survivor, {survivor}).add(doc_id)
    for doc_id, (kind, survivor) in drops.items():
        j = true_jaccard(by_id[doc_id]["text"], by_id[survivor]["text"])
        assert j >= 0.5, (doc_id, survivor, kind, j)
        if kind == "exact":
            norm = mh.normalize_text(by_id[doc_id]["text"])
            assert any(mh.normalize_text(by_id[m]["text"]) == norm for m in members[survivor] - {doc_id})

    # Kept documents are copied byte for byte; counters and the report agree.
    out_docs = {d["id"]: d for rec in list_records(storage, "dedup").values()
                for d in iter_jsonl(storage, rec.outputs["docs"].ref)}
    assert all(out_docs[i] == by_id[i] for i in kept)
    dedup_counts = Counter()
    for rec in list_records(storage, "dedup").values():
        dedup_counts.update(rec.counts)
    clusters = list_records(storage, "dedup_clusters")["_all"].counts
    report = storage.read_json(dd.REPORT_REF)
    assert dedup_counts["docs_in"] == len(docs) and dedup_counts["docs_out"] == len(kept)
    assert dedup_counts["dropped.exact"] == clusters["dropped.exact"] == report["dropped"]["exact"]
    assert dedup_counts["dropped.near"] == clusters["dropped.near"] == report["dropped"]["near"]
    assert report["kept"] == len(kept) and report["docs"] == len(docs)
    assert sum(int(k) * v for k, v in report["cluster_sizes"].items()) == report["docs_in_clusters"]
    assert report["docs_in_clusters"] - report["clusters"] == report["dropped"]["total"]


def test_exact_duplicates_within_and_across_shards(local_storage, distinct):
    """Copies that differ only in case, punctuation, whitespace or Unicode form are exact
    duplicates, wherever they are; the survivor is the smallest (key, raw-text hash, id)."""
    base = distinct[:30]
    variants = [
        dict(base[0], id="copy-same-shard"),
        dict(base[1], id="copy-other-shard"),
        dict(base[2], id="copy-upper", text=base[2]["text"].upper()),
        dict(base[3], id="copy-punct", text=base[3]["text"].replace(".", " ;; ").replace(",", "")),
        dict(base[4], id="copy-spaces", text="  \n".join(base[4]["text"].split())),
        dict(base[5], id="copy-fullwidth", text=base[5]["text"].replace("a", "ａ")),
    ]
    shards = [base[:15] + [variants[0]], base[15:] + variants[1:]]
    write_filter_shards(local_storage, shards)
    run_dedup(local_storage, cfg_with(near=False))
    drops = dropped(local_storage)
    assert len(drops) == len(variants)
    key = mh.MinHasher(num_bands=0).sketch
    for v, orig in zip(variants, base):
        loser = v["id"] if v["id"] in drops else orig["id"]
        kind, survivor = drops[loser]
        assert kind == "exact" and {loser, survivor} == {v["id"], orig["id"]}
        s = key([orig["text"], v["text"]])
        expected_survivor = min((int(s.exact[0]), int(s.text_hash[0]), orig["id"]),
                                (int(s.exact[1]), int(s.text_hash[1]), v["id"]))[2]
        assert survivor == expected_survivor
    report = local_storage.read_json(dd.REPORT_REF)
    assert report["cluster_sizes"] == {"2": 6} and report["dropped"] == {"total": 6, "exact": 6, "near": 0}


def test_near_duplicates_with_three_percent_edits_are_found(local_storage, records):
    """Real paragraphs (150-1500 words) with ~3 % of their words substituted, deleted or inserted."""
    pool = [r for r in records if not r["meta"].get("planted") and 150 <= len(r["text"].split()) <= 1500]
    originals = random.Random(5).sample(pool, 12)
    rng = random.Random(6)
    copies = [dict(r, id=r["id"] + "~edited", text=edit_words(r["text"], 0.03, rng)) for r in originals]
    js = [true_jaccard(a["text"], b["text"]) for a, b in zip(originals, copies)]
    assert 0.6 < float(np.mean(js)) < 0.9  # what "3 % of words" means for 5-word shingles
    write_filter_shards(local_storage, [originals[:6] + copies[6:], originals[6:] + copies[:6]])

    # The default (14 x 8, datatrove's) targets Jaccard >= ~0.75: most but not all are candidates.
    run_dedup(local_storage, PrepConfig())
    hits = sum(r["id"] in dropped(local_storage) or r["id"] + "~edited" in dropped(local_storage) for r in originals)
    assert hits >= len(originals) // 2

    # A recall-oriented split of the same 112 permutations (28 x 4) finds every pair, as near.
    run_dedup(local_storage, cfg_with(num_bands=28, rows_per_band=4))
    drops = dropped(local_storage)
    for a, b in zip(originals, copies):
        loser = a["id"] if a["id"] in drops else b["id"]
        assert drops.get(loser, (None, None))[1] in (a["id"], b["id"]), a["id"]
        assert drops[loser][0] == "near"
    assert len(drops) == len(originals)


def test_distinct_documents_are_all_kept(local_storage, distinct):
    write_filter_shards(local_storage, [distinct[:50], distinct[50:100], distinct[100:]])
    run_dedup(local_storage, PrepConfig())
    assert sorted(kept_ids(local_storage)) == sorted(d["id"] for d in distinct)
    assert local_storage.read_json(dd.REPORT_REF)["clusters"] == 0


def test_jaccard_verification_rejects_false_candidates(local_storage, distinct):
    """With one row per band, documents sharing a little text become LSH candidates; the
    Jaccard check (re-reading only those documents) keeps them apart and still merges true
    near-duplicates."""
    a, b, c = distinct[0]["text"], distinct[1]["text"], distinct[2]["text"]
    half = lambda t: " ".join(t.split()[: len(t.split()) // 2])  # noqa: E731
    docs = [
        {"id": "mix-1", "text": half(a) + " " + half(b), "source": "t", "meta": {}},
        {"id": "mix-2", "text": half(a) + " " + half(c), "source": "t", "meta": {}},
        {"id": "near-0", "text": a, "source": "t", "meta": {}},
        {"id": "near-1", "text": edit_words(a, 0.01, random.Random(2)), "source": "t", "meta": {}},
    ] + distinct[3:40]
    write_filter_shards(local_storage, [docs[:20], docs[20:]])
    loose = cfg_with(num_bands=24, rows_per_band=1, exact=False, verify="off")
    run_dedup(local_storage, loose)
    assert 0.2 < true_jaccard(docs[0]["text"], a) < 0.5   # candidate with probability ~1 - 0.63^24
    assert "mix-1" in dropped(local_storage)              # a false merge without verification

    for mode in ("exact", "signature"):
        verified = cfg_with(num_bands=24, rows_per_band=1, exact=False, jaccard_threshold=0.7, verify=mode)
        run_dedup(local_storage, verified)
        drops = dropped(local_storage)
        assert set(drops) in ({"near-0"}, {"near-1"}), mode
        counts = list_records(local_storage, "dedup_clusters")["_all"].counts
        assert counts["pairs.rejected"] >= 1 and counts["pairs.verified"] >= 1


# -- determinism and order independence -------------------------------------------------------------------

def _corpus_with_dups(records, n_other=120) -> list[dict]:
    planted = [r for r in records if r["meta"].get("planted") in ("exact_dup", "near_dup")][:40]
    by_id = {r["id"]: r for r in records}
    return planted + [by_id[r["meta"]["dup_of"]] for r in planted] + \
        [r for r in records if not r["meta"].get("planted")][:n_other]


def _outputs(storage: Storage) -> dict[str, bytes]:
    """Every published dedup output (not the manifests: they hold wall times)."""
    out = {}
    for d in (dd.SIG_DIR, dd.BUCKET_DIR, dd.DROP_DIR, "stages/dedup"):
        for name in storage.list(d):
            out[f"{d}/{name}"] = storage.read_bytes(f"{d}/{name}")
    out[dd.REPORT_REF] = storage.read_bytes(dd.REPORT_REF)
    return out


def test_survivors_do_not_depend_on_shard_order(tmp_path, records):
    docs = _corpus_with_dups(records)
    kept_sets, survivor_maps = [], []
    for seed, n_shards in [(0, 3), (1, 3), (2, 5), (3, 1)]:
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        storage = Storage(str(tmp_path / f"root{seed}"))
        write_filter_shards(storage, [shuffled[i::n_shards] for i in range(n_shards)])
        run_dedup(storage, PrepConfig())
        kept_sets.append(sorted(kept_ids(storage)))
        survivor_maps.append({k: v for k, v in dropped(storage).items()})
    assert len(kept_sets[0]) < len(docs)
    assert all(k == kept_sets[0] for k in kept_sets)
    assert all(s == survivor_maps[0] for s in survivor_maps)


def test_outputs_byte_identical_across_runs_and_shard_processing_order(tmp_path, records):
    docs = _corpus_with_dups(records)
    shards = [docs[0::4], docs[1::4], docs[2::4], docs[3::4]]
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    write_filter_shards(a, shards)
    write_filter_shards(b, shards)
    run_dedup(a, PrepConfig())
    for stage in dd.dedup_stages(PrepConfig()):   # b: every phase's shards in reverse order
        for p in reversed(plan(stage, b)):
            run_shard(stage, b, p.spec)
    assert _outputs(a) == _outputs(b)
    assert len(_outputs(a)) == 4 + 8 + 4 + 4 + 1


# -- resumability ----------------------------------------------------------------------------------------

def test_deleted_signature_file_redoes_only_that_shard(local_storage, records):
    docs = _corpus_with_dups(records)
    write_filter_shards(local_storage, [docs[0::3], docs[1::3], docs[2::3]])
    cfg = PrepConfig()
    run_dedup(local_storage, cfg)
    before = _outputs(local_storage)
    local_storage.remove(dd.sig_ref("000001"))
    stages = dd.dedup_stages(cfg)
    pending = [p.spec.shard_id for p in plan(stages[0], local_storage) if p.needs_work]
    assert pending == ["000001"]
    results = run_dedup(local_storage, cfg)
    assert results["dedup_signatures"]["ran"] == ["000001"]
    # the signature bytes came back identical, so nothing downstream is stale
    assert [results[p]["ran"] for p in PHASES[1:]] == [[], [], []]
    assert _outputs(local_storage) == before


def test_changed_shard_redoes_only_what_depends_on_it(local_storage, records):
    docs = _corpus_with_dups(records)
    shards = [docs[0::3], docs[1::3], docs[2::3]]
    write_filter_shards(local_storage, shards)
    cfg = PrepConfig()
    run_dedup(local_storage, cfg)
    # shard 2 gains an exact copy (same id too) of a unique document of shard 0: the last
    # tie-break keeps shard 0's, so only shard 2's drop list changes
    before = dropped(local_storage)
    unique = next(d for d in shards[0] if d["id"] not in before and not d["meta"].get("planted")
                  and all(d["id"] != s for _, s in before.values()))
    shards[2] = shards[2] + [dict(unique)]
    write_filter_shards(local_storage, shards)
    results = run_dedup(local_storage, cfg)
    assert results["dedup_signatures"]["ran"] == ["000002"]
    assert len(results["dedup_buckets"]["ran"]) == 8 and results["dedup_clusters"]["ran"] == ["_all"]
    assert results["dedup"]["ran"] == ["000002"]
    assert dropped(local_storage) == {**before, unique["id"]: ("exact", unique["id"])}
    assert drop_idx(local_storage, "000002")[-1] == len(shards[2]) - 1


def test_stale_drop_list_is_refused(local_storage, records):
    docs = _corpus_with_dups(records, n_other=30)
    write_filter_shards(local_storage, [docs[0::2], docs[1::2]])
    cfg = PrepConfig()
    run_dedup(local_storage, cfg)
    write_filter_shards(local_storage, [docs[0::2][1:], docs[1::2]])   # shard 0 changed underneath
    r = run_stage(dd.DedupFilterStage(cfg), local_storage)
    assert list(r["failed"]) == ["000000"]
    assert "re-run dedup_signatures" in r["failed"]["000000"] and "000000.parquet" in r["failed"]["000000"]


def test_clusters_before_buckets_is_a_clear_error(local_storage, distinct):
    write_filter_shards(local_storage, [distinct[:10]])
    cfg = PrepConfig()
    run_stage(dd.DedupSignaturesStage(cfg), local_storage)
    r = run_stage(dd.DedupClustersStage(cfg), local_storage)
    assert "run dedup_buckets first" in r["failed"]["_all"]
    r = run_stage(dd.DedupFilterStage(cfg), local_storage)
    assert "dedup_clusters first" in r["failed"]["000000"] and "no drop list for shard 000000" in r["failed"]["000000"]


# -- switches and config ------------------------------------------------------------------------------------

def test_exact_only_near_only_and_off(tmp_path, distinct):
    a = max(distinct, key=lambda d: len(d["text"]))
    words = a["text"].split()
    near_text = " ".join(words[: len(words) // 2] + ["zebra"] + words[len(words) // 2 + 1:])
    docs = [a, dict(a, id="exact-copy"), dict(a, id="near-copy", text=near_text)] + [d for d in distinct[:30] if d is not a]
    results = {}
    switches = {"both": {}, "exact": {"near": False}, "near": {"exact": False}, "off": {"exact": False, "near": False}}
    for name, kw in switches.items():
        storage = Storage(str(tmp_path / name))
        write_filter_shards(storage, [docs[:15], docs[15:]])
        ran = run_dedup(storage, cfg_with(**kw))
        results[name] = (sorted(ran), dropped(storage), len(kept_ids(storage)))
    assert results["both"][0] == sorted(PHASES) and len(results["both"][1]) == 2
    assert true_jaccard(a["text"], near_text) > 0.9
    assert sorted(k for k, _ in results["both"][1].values()) == ["exact", "near"]
    exact_only = results["exact"][1]
    assert len(exact_only) == 1 and set(exact_only) < {a["id"], "exact-copy"}
    assert list(exact_only.values())[0][0] == "exact"
    assert len(results["near"][1]) == 2            # LSH also catches the identical copy
    assert results["off"][0] == ["dedup"] and results["off"][1] == {} and results["off"][2] == len(docs)


def test_config_digests_cover_exactly_what_changes_each_phase():
    base = PrepConfig()
    digests = lambda cfg: [s.config_digest() for s in dd.dedup_stages(cfg)]  # noqa: E731
    d0 = digests(base)
    assert digests(cfg_with(num_buckets=4))[0] == d0[0] and digests(cfg_with(num_buckets=4))[1] != d0[1]
    assert digests(cfg_with(jaccard_threshold=0.8))[:2] == d0[:2] and digests(cfg_with(jaccard_threshold=0.8))[2] != d0[2]
    assert digests(cfg_with(verify="signature"))[:2] == d0[:2] and digests(cfg_with(verify="signature"))[2] != d0[2]
    changed = digests(cfg_with(rows_per_band=8))
    assert changed[0] != d0[0] and changed[3] == d0[3]
    assert digests(cfg_with(exact=False))[0] == d0[0]            # signatures always hold the exact key
    assert [s.name for s in dd.dedup_stages(base)] == PHASES


# -- building blocks -----------------------------------------------------------------------------------------

def test_buckets_partition_every_key_exactly_once():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 2000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    for n_columns in (1, 2, 15):
        for num_buckets in (1, 3, 8, 15, 16, 40):
            seen = np.zeros((n_columns, len(keys)), dtype=int)
            for b in range(num_buckets):
                cols = dd.columns_of_bucket(b, n_columns, num_buckets)
                assert cols, (n_columns, num_buckets, b)
                for c in range(n_columns):
                    mine = dd.bucket_of(c, keys, n_columns, num_buckets) == b
                    assert c in cols or not mine.any()
                    seen[c] += mine
            assert (seen == 1).all()


def test_connected_components_match_union_find():
    rng = random.Random(0)
    for n, m in [(1, 0), (10, 5), (200, 150), (500, 700), (1000, 2000)]:
        u = [rng.randrange(n) for _ in range(m)]
        v = [rng.randrange(n) for _ in range(m)]
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in zip(u, v):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
        expected = [min(i for i in range(n) if find(i) == find(x)) for x in range(n)] if n <= 200 else None
        label = dd.connected_components(n, np.array(u, dtype=np.int64), np.array(v, dtype=np.int64))
        same = lambda a, b: find(a) == find(b)  # noqa: E731
        for _ in range(2000):
            a, b = rng.randrange(n), rng.randrange(n)
            assert (label[a] == label[b]) == same(a, b)
        if expected is not None:
            assert label.tolist() == expected
    # a long chain needs many hooking rounds
    chain = np.arange(999, dtype=np.int64)
    assert (dd.connected_components(1000, chain, chain + 1) == 0).all()


def test_empty_shard_and_broken_upstream_line(local_storage, distinct):
    docs = distinct[:12] + [dict(distinct[0], id="copy")]
    write_filter_shards(local_storage, [docs[:6], [], docs[6:]])
    run_dedup(local_storage, PrepConfig())
    assert dropped(local_storage) in ({"copy": ("exact", distinct[0]["id"])}, {distinct[0]["id"]: ("exact", "copy")})
    assert drop_idx(local_storage, "000001") == []
    assert [d["id"] for d in iter_jsonl(local_storage, "stages/dedup/000001.jsonl.zst")] == []

    # upstream output is trusted, but a broken line still gets a clear error with file and line
    with zstandard.ZstdCompressor().stream_writer(open(local_storage.uri(shard_ref(1)), "wb")) as w:
        w.write(json.dumps(distinct[20]).encode() + b"\n" + b'{"id": "x", "text": 12}\n')
    write_record(local_storage, ShardRecord(stage="filter", shard_id="000001", status="done",
                                            outputs={"docs": output_ref(local_storage, shard_ref(1))}))
    r = run_stage(dd.DedupSignaturesStage(PrepConfig()), local_storage)
    assert list(r["failed"]) == ["000001"]
    assert "000001.jsonl.zst: line 2: not a document" in r["failed"]["000001"]
    assert list_records(local_storage, "dedup_signatures")["000001"].status == "failed"

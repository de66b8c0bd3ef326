"""The dedup stage's Prefect artifact: a histogram of cluster sizes and the largest clusters with
sample ids, built from a real cluster report (no Prefect server needed for the content)."""
from __future__ import annotations

import random

from shardflow.dataprep import dedup as dd
from shardflow.dataprep.config import PrepConfig
from shardflow.flows.artifacts import dedup_report_markdown
from shardflow.storage.jsonl import write_jsonl
from shardflow.storage.manifest import ShardRecord, output_ref, write_record

from ..dataprep.test_dedup import run_dedup


def test_dedup_artifact_shows_histogram_and_largest_clusters(local_storage):
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(3000)]
    docs = []
    for family, size in enumerate((5, 3, 2)):    # families of near-identical documents
        base = [rng.choice(vocab) for _ in range(300)]
        for k in range(size):
            words = list(base)
            words[rng.randrange(300)] = f"edit{k}"
            docs.append({"id": f"fam{family}-{k}", "text": " ".join(words), "source": "t", "meta": {}})
    docs += [{"id": f"solo{i}", "text": " ".join(rng.choice(vocab) for _ in range(200)), "source": "t", "meta": {}}
             for i in range(5)]
    write_jsonl(local_storage, "stages/filter/000000.jsonl.zst", docs)
    write_record(local_storage, ShardRecord(stage="filter", shard_id="000000", status="done",
                                            outputs={"docs": output_ref(local_storage, "stages/filter/000000.jsonl.zst")}))
    run_dedup(local_storage, PrepConfig())
    report = local_storage.read_json(dd.REPORT_REF)
    assert report["cluster_sizes"] == {"2": 1, "3": 1, "5": 1}
    md = dedup_report_markdown(report)
    assert "| 5 | 1 |" in md and "| 3 | 1 |" in md and "| 2 | 1 |" in md          # the histogram
    largest = md.split("## Largest clusters")[1].splitlines()[4]
    assert largest.startswith("| 5 |") and "`fam0-" in largest                      # sample ids
    assert "removed 7 (0 exact, 7 near) in 3 clusters" in md

"""What a run shows in the Prefect UI: stage tables, a markdown summary, progress bars, eval reports.

The numbers come from the manifest records (the source of truth), not from task return values, so
a table lists skipped shards with the counts of the run that produced them. Building the rows is
pure (tested without a server); publishing never fails a run: an unreachable API only logs.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from shardflow.storage.manifest import ShardRecord

log = logging.getLogger(__name__)

MAX_TABLE_ROWS = 500
"""Per-shard rows beyond this are folded into the totals row (the UI renders tables client-side)."""


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from its parts.

    Callers start with the pipeline's name (``cfg.name``): keys are global in a Prefect workspace,
    so ``demo-prep-filter`` and ``web-prep-filter`` stay two artifacts with two histories.
    """
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return key or "shardflow"


def _sum_prefix(counts: Mapping[str, int], prefix: str) -> int:
    return sum(v for k, v in counts.items() if k.startswith(prefix))


def tokens_of(counts: Mapping[str, int]) -> int:
    """Tokens a shard produced: ``tokens`` or the sum of ``tokens.<split>`` counters."""
    if "tokens" in counts:
        return int(counts["tokens"])
    return _sum_prefix(counts, "tokens.")


def docs_of(counts: Mapping[str, int]) -> tuple[int, int]:
    """(documents in, documents kept) of a shard; a stage that keeps everything has no docs_out."""
    docs_in = int(counts.get("docs_in", 0))
    return docs_in, int(counts.get("docs_out", docs_in))


def drops_by_filter(counts: Mapping[str, int]) -> dict[str, int]:
    """``dropped.<filter>.<reason>`` counters summed per filter."""
    out: dict[str, int] = {}
    for k, v in counts.items():
        if k.startswith("dropped."):
            name = k.split(".")[1] if k.count(".") >= 1 else k
            out[name] = out.get(name, 0) + int(v)
    return dict(sorted(out.items()))


def shard_row(shard_id: str, state: str, record: ShardRecord | None) -> dict[str, Any]:
    counts = record.counts if record is not None and record.status == "done" else {}
    docs_in, docs_out = docs_of(counts)
    row: dict[str, Any] = {"shard": shard_id, "state": state, "docs_in": docs_in, "docs_out": docs_out,
                           "quarantined": _sum_prefix(counts, "quarantined.")}
    for name, n in drops_by_filter(counts).items():
        row[f"dropped.{name}"] = n
    row["tokens"] = tokens_of(counts)
    row["wall_time_s"] = round(record.wall_time_s, 3) if record is not None else 0.0
    return row


STAGE_COLUMNS = ("shard", "state", "docs_in", "docs_out", "tokens", "wall_time_s", "quarantined")
"""What a stage table shows first, in this order; one ``dropped.<filter>`` column per filter follows
(there may be many, so they come last: the UI's table scrolls sideways, the first columns stay readable)."""


def stage_table(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a common set of columns (missing drop columns = 0), sorted, plus a TOTAL row."""
    rows = sorted(rows, key=lambda r: r["shard"])
    drop_cols = sorted({k for r in rows for k in r if k.startswith("dropped.")})
    cols = [*STAGE_COLUMNS, *drop_cols]
    table = [{c: r.get(c, 0) for c in cols} for r in rows]
    total: dict[str, Any] = {c: 0 for c in cols}
    states: dict[str, int] = {}
    for r in table:
        states[r["state"]] = states.get(r["state"], 0) + 1
        for c in cols[2:]:
            total[c] += r[c]
    total["shard"] = f"TOTAL ({len(table)} shards)"
    total["state"] = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    total["wall_time_s"] = round(total["wall_time_s"], 3)
    return table[:MAX_TABLE_ROWS] + [total]


def stage_summary(name: str, table: list[dict[str, Any]], ran: int, skipped: int, failed: list[str],
                  wall_s: float) -> dict[str, Any]:
    total = table[-1] if table else {}
    return {"stage": name, "shards": max(len(table) - 1, 0) if len(table) <= MAX_TABLE_ROWS else None,
            "ran": ran, "skipped": skipped, "failed": list(failed),
            "docs_in": total.get("docs_in", 0), "docs_out": total.get("docs_out", 0),
            "quarantined": total.get("quarantined", 0), "tokens": total.get("tokens", 0),
            "drops": {k[len("dropped."):]: v for k, v in total.items() if k.startswith("dropped.") and v},
            "wall_s": round(wall_s, 2)}


def summary_markdown(title: str, summaries: list[dict[str, Any]], error: str | None = None) -> str:
    lines = [f"# {title}", ""]
    if error:
        lines += [f"**Failed:** {error}", ""]
    lines += ["| stage | ran | skipped | failed | docs in | docs kept | quarantined | tokens | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['stage']} | {s['ran']} | {s['skipped']} | {len(s['failed'])} | {s['docs_in']:,} | "
                     f"{s['docs_out']:,} | {s['quarantined']:,} | {s['tokens']:,} | {s['wall_s']:.1f} |")
    drops = [(s["stage"], k, v) for s in summaries for k, v in s["drops"].items()]
    if drops:
        lines += ["", "## Documents dropped", "", "| stage | by | documents |", "|---|---|---:|"]
        lines += [f"| {st} | {k} | {v:,} |" for st, k, v in drops]
    failed = [(s["stage"], f) for s in summaries for f in s["failed"]]
    if failed:
        lines += ["", "## Failed shards", ""] + [f"- `{st}` shard `{f}`" for st, f in failed]
    return "\n".join(lines) + "\n"


def dedup_report_markdown(report: Mapping[str, Any], bar_width: int = 40) -> str:
    """The dedup cluster report (``dedup/clusters_report.json``) as markdown: totals, a histogram
    of cluster sizes, verification counts and the largest clusters with sample ids — so that a
    surprising removal can be traced to its cluster from the UI (the per-document audit is the
    Parquet drop lists under ``dedup/drops/``)."""
    dropped = report.get("dropped", {})
    lines = ["# Dedup clusters", "",
             f"{report.get('docs', 0):,} documents, {report.get('kept', 0):,} kept; removed {dropped.get('total', 0):,} "
             f"({dropped.get('exact', 0):,} exact, {dropped.get('near', 0):,} near) in {report.get('clusters', 0):,} clusters. "
             f"Verification: `{report.get('verify')}`, threshold {report.get('jaccard_threshold')}; largest candidate "
             f"component {report.get('largest_candidate_component', 0):,} (what union-find would have merged).", ""]
    sizes = {int(k): int(v) for k, v in (report.get("cluster_sizes") or {}).items()}
    if sizes:
        top = max(sizes.values())
        lines += ["## Cluster sizes", "", "| size | clusters | |", "|---:|---:|---|"]
        lines += [f"| {k} | {v:,} | {'█' * max(1, round(bar_width * v / top))} |" for k, v in sorted(sizes.items())]
        lines.append("")
    sims = report.get("near_similarity") or {}
    pairs = report.get("pairs") or {}
    if pairs or sims:
        lines += ["## Verification", "", "| | |", "|---|---:|"]
        lines += [f"| pairs {k} | {v:,} |" for k, v in sorted(pairs.items())]
        lines += [f"| near-removal similarity {k} | {v} |" for k, v in sims.items()]
        lines.append("")
    largest = report.get("largest_clusters") or []
    if largest:
        lines += ["## Largest clusters", "", "| size | survivor | cluster | sample members |", "|---:|---|---|---|"]
        for c in largest:
            sample = ", ".join(f"`{m}`" for m in c.get("members", [])[:5])
            lines.append(f"| {c['size']:,} | `{c['survivor']}` | `{c.get('cluster', '')}` | {sample} |")
    return "\n".join(lines) + "\n"


def publish_dedup_report(storage: Any, flow_label: str, pipeline: str = "shardflow") -> None:
    """Publish the dedup cluster report of ``storage`` if the cluster phase has written one.

    Its key is ``<pipeline>-<flow>-dedup-report``: not the stage table's (``…-dedup-clusters``),
    whose history it would otherwise interleave with."""
    from shardflow.dataprep.dedup import REPORT_REF

    def run() -> None:
        if storage.exists(REPORT_REF):
            publish_markdown(artifact_key(pipeline, flow_label, "dedup-report"), dedup_report_markdown(storage.read_json(REPORT_REF)),
                             "Dedup: cluster sizes and the largest clusters")

    _safe(run)


# -- publishing (needs a Prefect run context or API) ---------------------------------------------

def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the UI is a view; never fail a run over it
        log.warning("could not publish Prefect artifact: %s", exc)
        return None


def publish_table(key: str, table: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    _safe(create_table_artifact, table=table, key=artifact_key(key), description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    _safe(create_markdown_artifact, markdown=markdown, key=artifact_key(key), description=description)


class Progress:
    """A progress artifact for a stage with many shards, updated at most every ``min_interval_s``."""

    def __init__(self, key: str, total: int, description: str, min_interval_s: float = 2.0):
        from prefect.artifacts import create_progress_artifact

        self.total, self.done, self.min_interval_s = max(total, 1), 0, min_interval_s
        self._last = time.monotonic()
        self._id = _safe(create_progress_artifact, progress=0.0, key=artifact_key(key), description=description)

    def advance(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """``done`` of ``total`` finished; published if the last update is ``min_interval_s`` old, or at the end."""
        self.done = min(max(done, 0), self.total)
        now = time.monotonic()
        if self._id is not None and (self.done >= self.total or now - self._last >= self.min_interval_s):
            from prefect.artifacts import update_progress_artifact

            self._last = now
            _safe(update_progress_artifact, artifact_id=self._id, progress=round(100.0 * self.done / self.total, 1))


_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")

MAX_INLINE_IMAGE_BYTES = 2_000_000
"""Images larger than this stay links: an artifact is a database row, not a file store."""


def inline_images(markdown: str, read: Any) -> str:
    """Replace each relative ``![title](name.png)`` by a ``data:image/png;base64,…`` URI.

    Why: the report on disk refers to its PNGs by relative path, which the Prefect UI cannot
    resolve (the artifact page has no such file: the images show broken). The UI's markdown
    renderer keeps ``data:`` URIs in ``<img src>`` (checked in headless Chromium by
    tests/flows/test_ui_report_images.py), so the images travel inside the artifact.
    ``read(name)`` returns the bytes or raises; an image that cannot be read stays as it was.
    """
    import base64

    def repl(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        if "://" in src or src.startswith(("data:", "/")) or not src.lower().endswith((".png", ".jpg", ".jpeg", ".svg")):
            return m.group(0)
        try:
            data = read(src)
        except Exception as exc:  # noqa: BLE001 - keep the link, say why
            log.warning("report image %s not embedded: %s", src, exc)
            return m.group(0)
        if len(data) > MAX_INLINE_IMAGE_BYTES:
            return m.group(0)
        mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml"}[src.rsplit(".", 1)[1].lower()]
        return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"

    return _MD_IMAGE.sub(repl, markdown)


def report_image_reader(storage: Any, files: Iterable[str]) -> Any:
    """``read(name)`` for :func:`inline_images`: the report's own files (by base name) from the dataset root."""
    by_name = {str(f).rsplit("/", 1)[-1]: str(f) for f in files}

    def read(name: str) -> bytes:
        if name not in by_name:
            raise FileNotFoundError(f"{name}: not among the report's files")
        return storage.read_bytes(by_name[name])

    return read


def publish_eval(result: Mapping[str, Any], run: str, pipeline: str = "shardflow", storage: Any = None) -> None:
    """Evaluation report (its images inlined, see :func:`inline_images`), and each of its tables."""
    if result.get("report_md"):
        md = str(result["report_md"])
        if storage is not None:
            md = inline_images(md, report_image_reader(storage, result.get("files") or []))
        publish_markdown(artifact_key(pipeline, "eval-report", run), md, f"Evaluation report of run {run}")
    for name, rows in sorted((result.get("tables") or {}).items()):
        if rows:
            publish_table(artifact_key(pipeline, "eval", run, name), list(rows), f"Evaluation of run {run}: {name}")

"""The evaluation report: markdown tables, PNG plots and the flat metric set that runs compare on.

Why plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas rather than pyplot:
pyplot keeps global state (current figure, backend selection), which is not thread-safe and leaks
figures in a long-lived Prefect worker; a Figure rendered to bytes is self-contained. PNG metadata
(the "Software" tag with matplotlib's version) is dropped so the same numbers give the same file.

Why results are flattened to ``{"val.ppl": ..., "task.<name>.acc": ...}``: deltas against a previous
``results.json`` then need no knowledge of its structure, and a metric added later simply has no
previous value.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from .baseline import comparison_note, comparison_rows
from .metrics import read_metrics  # noqa: F401 - the one metrics.jsonl reader; evaluation reads it from here

PLOT_FILES = {"loss": "loss.png", "lr": "lr.png", "expert_load": "expert_load.png"}
_LOWER_IS_BETTER = ("loss", "ppl", "cv", "dropped")


# -- training metrics -------------------------------------------------------------------------------

def _num(x: Any) -> float | int | None:
    """A finite number (ints stay ints), else None: records may hold NaN/"nan"/missing values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return x if isinstance(x, int) else (x if math.isfinite(x) else None)


def loss_curves(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"train": [(tokens, step, loss)], "val": [...]}`` from metrics records.

    Accepts the trainer's layouts: a training record (``loss``) optionally carrying ``val_loss``,
    or a separate validation record (``split == "val"`` / ``kind == "val"`` with ``loss``). The x
    axis is cumulative tokens when recorded, else the step.
    """
    train, val = [], []
    use_tokens = bool(records) and all(_num(r.get("tokens")) is not None for r in records if _num(r.get("step")) is not None)
    for r in records:
        step = _num(r.get("step"))
        x = _num(r.get("tokens")) if use_tokens else step
        if x is None:
            continue
        is_val = r.get("split") == "val" or r.get("kind") in ("val", "eval")
        loss = _num(r.get("loss"))
        if loss is not None:
            (val if is_val else train).append((x, step if step is not None else x, loss))
        vloss = _num(r.get("val_loss"))
        if vloss is not None:
            val.append((x, step if step is not None else x, vloss))
    return {"train": train, "val": val, "x_label": "tokens" if use_tokens else "step"}


def lr_curve(records: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(s, lr) for r in records if (s := _num(r.get("step"))) is not None and (lr := _num(r.get("lr"))) is not None
            and r.get("split") != "val"]


# -- plots ------------------------------------------------------------------------------------------

def _figure(w: float = 6.4, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_loss(curves: dict[str, Any]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    if curves["train"]:
        xs, _, ys = zip(*curves["train"])
        ax.plot(xs, ys, label="train", linewidth=1.2)
    if curves["val"]:
        xs, _, ys = zip(*curves["val"])
        ax.plot(xs, ys, "o-", label="validation", markersize=4)
    if not curves["train"] and not curves["val"]:
        ax.text(0.5, 0.5, "no training metrics recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(curves.get("x_label", "step"))
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    if curves["train"] or curves["val"]:
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def plot_lr(points: Sequence[tuple[float, float]]) -> bytes:
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, linewidth=1.2)
    else:
        ax.text(0.5, 0.5, "no learning-rate records", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_expert_load(tokens_per_expert: Sequence[Sequence[float]], layers: Sequence[int]) -> bytes:
    """Heatmap of each layer's share of token-slots per expert (1/E everywhere = balanced)."""
    import numpy as np

    counts = np.asarray(tokens_per_expert, dtype=np.float64)
    fig = _figure(max(4.0, 1.0 + 0.45 * (counts.shape[1] if counts.ndim == 2 else 1)), max(2.5, 1.2 + 0.4 * len(layers)))
    ax = fig.add_subplot()
    if counts.size:
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0)
        fig.colorbar(im, ax=ax, label="share of token-slots")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_xticks(range(counts.shape[1]))
        if counts.shape[1] <= 16 and len(layers) <= 16:
            for (i, j), v in np.ndenumerate(share):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < share.max() * 0.6 else "black")
    else:
        ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("Expert load on validation data")
    fig.tight_layout()
    return _png(fig)


# -- flat metrics and deltas ------------------------------------------------------------------------

def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}

    def put(name: str, v: Any) -> None:
        x = _num(v)
        if x is not None:
            flat[name] = x

    for k in ("loss", "ppl", "tokens"):
        put(f"val.{k}", results.get("val", {}).get(k))
    for src, m in sorted(results.get("per_source", {}).items()):
        put(f"source.{src}.loss", m.get("loss"))
        put(f"source.{src}.ppl", m.get("ppl"))
    for k in ("acc", "mean_logprob", "mean_token_logprob"):
        put(f"cloze.{k}", results.get("cloze", {}).get(k))
    for name, m in sorted(results.get("tasks", {}).items()):
        for k in ("acc", "acc_norm", "acc_token_norm"):
            put(f"task.{name}.{k}", m.get(k))
    ex = results.get("experts", {})
    for layer, cv, ent in zip(ex.get("layers", []), ex.get("cv", []), ex.get("router_entropy", [])):
        put(f"experts.layer{layer}.cv", cv)
        put(f"experts.layer{layer}.router_entropy", ent)
    put("experts.dropped_fraction", ex.get("dropped_fraction"))
    vb = results.get("vs_baseline") or {}
    put("baseline.val.loss", (vb.get("baseline") or {}).get("val_loss"))
    put("baseline.val.loss_diff", (vb.get("difference") or {}).get("val_loss"))
    return flat


def deltas(current: dict[str, float], previous: dict[str, float] | None) -> dict[str, float]:
    if not previous:
        return {}
    return {k: v - previous[k] for k, v in current.items() if isinstance(previous.get(k), (int, float))}


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


# -- tables and markdown ----------------------------------------------------------------------------

def build_tables(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Row lists for the markdown report and for Prefect table artifacts (JSON-able, flat)."""
    prev = (results.get("previous") or {}).get("metrics") or {}
    d = results.get("deltas") or {}
    summary = [{"metric": k, "value": v, "previous": prev.get(k), "delta": d.get(k)}
               for k, v in results.get("metrics", {}).items() if not k.startswith(("source.", "experts.layer"))]
    val = results.get("val", {})
    per_source = [{"source": "(all validation shards)", "tokens": val.get("tokens"), "loss": val.get("loss"),
                   "ppl": val.get("ppl"), "docs": None}]
    per_source += [{"source": s, "tokens": m.get("tokens"), "loss": m.get("loss"), "ppl": m.get("ppl"), "docs": m.get("docs")}
                   for s, m in sorted(results.get("per_source", {}).items())]
    tasks = []
    cz = results.get("cloze")
    if cz and cz.get("n"):
        tasks.append({"task": "cloze (next word)", "n": cz.get("n"), "acc": cz.get("acc"), "acc_norm": None,
                      "chance": None, "mean_logprob": cz.get("mean_logprob")})
    for name, m in sorted(results.get("tasks", {}).items()):
        tasks.append({"task": name, "n": m.get("n"), "acc": m.get("acc"), "acc_norm": m.get("acc_norm"),
                      "chance": m.get("chance"), "mean_logprob": None})
    ex = results.get("experts", {})
    experts = []
    for i, layer in enumerate(ex.get("layers", [])):
        counts = ex["tokens_per_expert"][i]
        total = sum(counts) or 1
        experts.append({"layer": layer, "cv": ex["cv"][i], "router_entropy": ex["router_entropy"][i],
                        "entropy/log(E)": ex["router_entropy_norm"][i], "min_share": min(counts) / total,
                        "max_share": max(counts) / total, "tokens_per_expert": " ".join(str(c) for c in counts)})
    tables = {"summary": summary, "per_source": per_source, "tasks": tasks, "experts": experts}
    if results.get("vs_baseline"):
        tables["vs_baseline"] = comparison_rows(results["vs_baseline"])
    return tables


def render_markdown(results: dict[str, Any], tables: dict[str, list[dict[str, Any]]], plots: dict[str, str]) -> str:
    ck = results.get("checkpoint", {})
    prev = results.get("previous")
    lines = [f"# Evaluation of run `{results.get('run')}` at step {ck.get('step')}", ""]
    lines.append(f"- checkpoint: `{ck.get('uri')}`")
    lines.append(f"- model config digest: `{results.get('model_config_digest')}`; eval config digest: `{results.get('eval_config_digest')}`")
    lines.append(f"- tokenizer: `{results.get('tokenizer_digest')}`")
    if prev:
        lines.append(f"- deltas are against the previous evaluation (checkpoint step {prev.get('checkpoint_step')}, "
                     f"`{prev.get('checkpoint_uri')}`); for loss, ppl, cv and dropped a negative delta is better")
    else:
        lines.append("- no previous evaluation of this run: no deltas")
    val = results.get("val", {})
    lines += ["", "## Held-out perplexity", "",
              f"Token-weighted over {val.get('tokens', 0):,} target tokens in {val.get('batches', 0)} batches of the "
              f"validation shards: loss {_fmt(val.get('loss'))}, perplexity {_fmt(val.get('ppl'), 3)}.", ""]
    note = results.get("per_source_note")
    if note:
        lines += [note, ""]
    lines.append(md_table(tables["per_source"]))
    lines += ["## Downstream tasks", "", "Log-likelihood scoring; `acc_norm` normalizes by the choice's length in bytes "
              "(as lm-evaluation-harness does).", "", md_table(tables["tasks"])]
    ex = results.get("experts", {})
    lines += ["## Expert statistics", "",
              f"On the validation batches; dropped token-slot fraction {_fmt(ex.get('dropped_fraction'))}; "
              "cv = coefficient of variation of tokens per expert (0 = perfectly balanced); router entropy is the "
              "mean per-token entropy of the router's softmax (nats; log(E) = uniform).", "", md_table(tables["experts"])]
    if tables.get("vs_baseline"):
        lines += ["## vs baseline", "", comparison_note(results["vs_baseline"]), "", md_table(tables["vs_baseline"])]
    lines += ["## Summary", "", md_table(tables["summary"])]
    lines += ["## Plots", ""]
    for title, key in (("Loss", "loss"), ("Learning rate", "lr"), ("Expert load", "expert_load")):
        if key in plots:
            lines.append(f"![{title}]({plots[key]})")
            lines.append("")
    return "\n".join(lines)

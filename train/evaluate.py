"""Evaluate a checkpoint: held-out perplexity, downstream tasks, expert statistics, a report.

``run_evaluation`` is what the evaluation flow calls; it imports no Prefect and returns the tables
and markdown the flow publishes as artifacts. Everything it writes goes under
``runs/<run>/eval/`` through :class:`Storage` (atomic), ``results.json`` last, so a report on disk
always belongs to a complete evaluation.

Why the validation shards are read in index order rather than through the training loader: the
loader shuffles and cuts epoch tails to world-size multiples; perplexity wants every val row once,
in a fixed order, so that two evaluations of two checkpoints score the very same tokens.

Why per-source perplexity re-tokenizes documents: the shards are packed token rows with no record
of which document (or source) a token came from. The held-out documents are found again in the
documents the tokenize stage read (its manifest inputs, else ``stages/dedup/``) with the stage's
own split rule (:func:`shardflow.dataprep.tokenize.doc_split`), encoded with the run's tokenizer
and packed per source exactly as the pack stage packs them.
"""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shardflow.storage import Storage, digest_json
from shardflow.storage.shards import read_index, read_member_rows

from . import report as rep
from . import tasks as T
from .config import EvalConfig, TrainConfig
from .model import IGNORE_INDEX, MoETransformer
from .moe import MoEBlock, Routing

RESULTS_VERSION = 1
DEFAULT_TASK_NAME = "heldout_continuation"


class EvaluationError(RuntimeError):
    """Evaluation cannot run as configured; the message names the file or setting at fault."""


# -- locations ----------------------------------------------------------------------------------------

def run_dir(run: str) -> str:
    return f"runs/{run}"


def eval_dir(run: str) -> str:
    return f"{run_dir(run)}/eval"


def results_ref(run: str) -> str:
    return f"{eval_dir(run)}/results.json"


def model_config_digest(train_cfg: TrainConfig) -> str:
    return digest_json(train_cfg.model.model_dump(mode="json"))


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EvaluationError("eval.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


# -- the model from a checkpoint ------------------------------------------------------------------------

def load_model(train_cfg: TrainConfig, storage: Storage, checkpoint: str | None, device: torch.device) -> tuple[MoETransformer, dict[str, Any]]:
    """The run's model with a checkpoint's weights, in eval mode; and {ref, uri, step, tokens}.

    A checkpoint URI that does not exist, or whose recorded model config differs from
    ``train_cfg.model``, is a :class:`~shardflow.train.checkpoint.CheckpointError` naming the
    checkpoint (and every differing config field).
    """
    from .checkpoint import load_model_weights

    model = MoETransformer(train_cfg.model)
    info = load_model_weights(model, storage, train_cfg, checkpoint)  # CheckpointError names the checkpoint
    meta = info.pop("meta", {})
    info["tokens"] = meta.get("tokens")
    info["tokenizer_digest"] = (meta.get("data") or {}).get("tokenizer_digest")
    return model.to(device).eval(), info


def check_checkpoint_tokenizer(info: dict[str, Any], tokenizer_digest: str, error: type[Exception] = RuntimeError) -> None:
    """A model is only meaningful with the tokenizer it was trained with: refuse any other."""
    trained = info.get("tokenizer_digest")
    if trained and trained != tokenizer_digest:
        raise error(f"{info['uri']} was trained on shards of tokenizer {trained}, but the dataset root's "
                    f"tokenizer is {tokenizer_digest}; evaluate or export it against its own dataset root")


# -- split settings --------------------------------------------------------------------------------------

def split_settings(storage: Storage, eval_cfg: EvalConfig) -> dict[str, Any]:
    """val_fraction / split_seed / add_bos the shards were made with: EvalConfig, else the root's
    pipeline.yaml (``prep.tokenize``), else the TokenizeConfig defaults."""
    import yaml

    from shardflow.dataprep.config import TokenizeConfig

    tok: dict[str, Any] = {}
    source = "defaults"
    try:
        body = yaml.safe_load(storage.read_text("pipeline.yaml")) or {}
        tok = ((body.get("config") or body).get("prep") or {}).get("tokenize") or {}
        source = storage.uri("pipeline.yaml")
    except FileNotFoundError:
        pass
    base = TokenizeConfig(**{k: tok[k] for k in ("val_fraction", "split_seed", "add_bos") if k in tok})
    return {
        "val_fraction": eval_cfg.val_fraction if eval_cfg.val_fraction is not None else base.val_fraction,
        "split_seed": eval_cfg.split_seed if eval_cfg.split_seed is not None else base.split_seed,
        "add_bos": base.add_bos,
        "from": source,
    }


# -- expert statistics ----------------------------------------------------------------------------------

class ExpertStats:
    """Accumulates, over the batches it is enabled for, per-layer router entropy and expert load.

    The router's probabilities are not part of the model's output, so a forward hook on each MoE
    block's router reads the :class:`Routing` it returns; nothing in the model changes.
    """

    def __init__(self, model: MoETransformer):
        self.blocks = [(i, b.ffn) for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoEBlock)]
        n_exp = model.cfg.n_experts
        self.layers = [i for i, _ in self.blocks]
        self.entropy_sum = [0.0] * len(self.blocks)
        self.prob_sum = torch.zeros(len(self.blocks), n_exp, dtype=torch.float64)
        self.tokens = [0] * len(self.blocks)
        self.counts = torch.zeros(len(self.blocks), n_exp, dtype=torch.long)
        self.dropped = 0
        self.top_k = model.cfg.top_k
        self.n_experts = n_exp
        self.enabled = False
        self._handles = [blk.router.register_forward_hook(self._hook(j)) for j, (_, blk) in enumerate(self.blocks)]

    def _hook(self, j: int):
        def hook(_module, _inputs, out: Routing) -> None:
            if not self.enabled:
                return
            p = out.probs.detach().double()
            self.entropy_sum[j] += float(-(p * p.clamp_min(1e-30).log()).sum())
            self.prob_sum[j] += p.sum(0).cpu()
            self.tokens[j] += p.shape[0]
        return hook

    def add_output(self, expert_counts: torch.Tensor, dropped: torch.Tensor) -> None:
        if self.enabled and expert_counts.numel():
            self.counts += expert_counts.detach().cpu()
            self.dropped += int(dropped)

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def summary(self) -> dict[str, Any]:
        counts = self.counts.double()
        mean = counts.mean(dim=1)
        cv = (counts.std(dim=1, unbiased=False) / mean.clamp_min(1e-12)).tolist() if counts.numel() else []
        ent = [s / t if t else math.nan for s, t in zip(self.entropy_sum, self.tokens)]
        slots = sum(self.tokens) * self.top_k
        return {
            "layers": self.layers,
            "tokens_per_expert": self.counts.tolist(),
            "cv": cv,
            "router_entropy": ent,
            "router_entropy_norm": [e / math.log(self.n_experts) if self.n_experts > 1 else math.nan for e in ent],
            "mean_router_prob": [(self.prob_sum[j] / max(1, t)).tolist() for j, t in enumerate(self.tokens)],
            "dropped_slots": self.dropped,
            "dropped_fraction": self.dropped / slots if slots else 0.0,
        }


@contextmanager
def _collecting(stats: ExpertStats) -> Iterator[None]:
    stats.enabled = True
    try:
        yield
    finally:
        stats.enabled = False


# -- perplexity -----------------------------------------------------------------------------------------

def iter_val_batches(storage: Storage, index: dict[str, Any], batch_size: int, max_batches: int) -> Iterator[np.ndarray]:
    """Batches of validation rows in index order (shard, member, row), at most ``max_batches``."""
    seq_len, dtype = index["seq_len"], index["dtype"]
    buf: list[np.ndarray] = []
    have = done = 0
    for shard in index["splits"].get("val", {}).get("shards", []):
        for member in shard["members"]:
            start = 0
            while start < member["rows"]:
                take = min(member["rows"] - start, batch_size - have)
                buf.append(read_member_rows(storage, shard, member, start, start + take, seq_len, dtype))
                have += take
                start += take
                if have == batch_size:
                    yield np.concatenate(buf)
                    buf, have = [], 0
                    done += 1
                    if done >= max_batches:
                        return
    if have:
        yield np.concatenate(buf)


@torch.no_grad()
def batch_nll(model: MoETransformer, rows: torch.Tensor, stats: ExpertStats | None = None) -> tuple[float, int]:
    """(sum of token NLL in nats, number of target tokens) for rows ``[B, S+1]``; -100 targets ignored."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    out = model(inputs)
    if stats is not None:
        stats.add_output(out.expert_counts, out.dropped_tokens)
    nll = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(nll), int((targets != IGNORE_INDEX).sum())


def _ppl(nll: float, tokens: int) -> dict[str, Any]:
    loss = nll / tokens if tokens else math.nan
    return {"loss": loss, "ppl": math.exp(loss) if tokens and loss < 700 else math.nan, "tokens": tokens}


def val_perplexity(model, storage, index, batch_size, max_batches, device, stats: ExpertStats | None = None) -> dict[str, Any]:
    nll = 0.0
    tokens = batches = rows = 0
    ctx = _collecting(stats) if stats is not None else _nullcontext()
    with ctx:
        for arr in iter_val_batches(storage, index, batch_size, max_batches):
            t = torch.from_numpy(arr.astype(np.int64)).to(device)
            n, k = batch_nll(model, t, stats)
            nll += n
            tokens += k
            batches += 1
            rows += arr.shape[0]
    return {**_ppl(nll, tokens), "batches": batches, "sequences": rows}


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def pack_rows(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Rows of ``seq_len + 1`` tokens as the pack stage cuts them; a short tail row is kept (padded
    with -100 targets by the caller) so a small source still counts all its tokens."""
    row = seq_len + 1
    out = [stream[i:i + row] for i in range(0, len(stream) - 1, row)]
    return [r for r in out if len(r) > 1]


def source_perplexity(model, sp, docs: list[tuple[str, str, str]], seq_len: int, doc_prefix: list[int], eos_id: int,
                      batch_size: int, max_batches: int, device) -> dict[str, dict[str, Any]]:
    """Token-weighted perplexity per source over held-out documents packed like the pack stage."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for _, text, source in docs:  # docs are sorted by id: the order is fixed
        by_source[source].append(text)
    out = {}
    for source in sorted(by_source):
        texts = by_source[source]
        ids = sp.encode(texts, out_type=int)
        # A leading EOS puts the first document in the same position as every other: after one.
        stream_parts = [[eos_id]] + [doc_prefix[1:] + x + [eos_id] for x in ids]
        stream = np.fromiter((t for p in stream_parts for t in p), dtype=np.int64)
        rows = pack_rows(stream, seq_len)[: max_batches * batch_size]
        nll, tokens = 0.0, 0
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            width = max(len(r) for r in chunk)
            t = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(chunk):
                t[i, : len(r)] = torch.from_numpy(r)
            inputs = t[:, :-1].clone()
            inputs[inputs == IGNORE_INDEX] = eos_id  # any valid id: padding comes after, never a target
            with torch.no_grad():
                logits = model(inputs.to(device)).logits.float()
            targets = t[:, 1:].to(device)
            nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((targets != IGNORE_INDEX).sum())
        out[source] = {**_ppl(nll, tokens), "docs": len(texts)}
    return out


# -- held-out documents -----------------------------------------------------------------------------------

def held_out_refs(storage: Storage) -> list[str]:
    """The document files the tokenize stage read (its manifest), else the dedup stage's outputs."""
    from shardflow.dataprep.tokenizer import MODEL_REF
    from shardflow.storage.manifest import list_records

    refs = sorted({ref for rec in list_records(storage, "tokenize").values() if rec.status == "done"
                   for ref in rec.inputs if ref != MODEL_REF})
    if refs:
        return refs
    return [f"stages/dedup/{name}" for name in storage.list("stages/dedup", suffix=".jsonl.zst")]


def held_out_documents(storage: Storage, settings: dict[str, Any], limit: int, seed: int) -> list[tuple[str, str, str]]:
    """Up to ``limit`` val-split documents as (id, text, source), sorted by id.

    Files are visited in a seeded order and reading stops at ``limit`` val documents, so the cost
    is bounded on a large corpus while still sampling across files (sources often live in
    different files).
    """
    from shardflow.dataprep.tokenize import doc_split
    from shardflow.storage.jsonl import iter_lines

    try:
        from orjson import loads
    except ImportError:  # pragma: no cover
        from json import loads
    if limit <= 0:
        return []
    refs = held_out_refs(storage)
    random.Random(seed).shuffle(refs)
    vf, ss = settings["val_fraction"], settings["split_seed"]
    docs: dict[str, tuple[str, str, str]] = {}
    for ref in refs:
        for lineno, raw in iter_lines(storage, ref):
            try:
                d = loads(raw)
                doc_id, text, source = d["id"], d["text"], d.get("source")
            except Exception as exc:  # noqa: BLE001 - stage outputs are ours: a bad line is corruption
                raise EvaluationError(f"{storage.uri(ref)}: line {lineno}: not a document record ({type(exc).__name__}: {exc})") from None
            doc_id = doc_id if isinstance(doc_id, str) else str(doc_id)
            if isinstance(text, str) and text.strip() and doc_split(doc_id, vf, ss) == "val":
                docs.setdefault(doc_id, (doc_id, text, str(source or "unknown")))
                if len(docs) >= limit:
                    break
        if len(docs) >= limit:
            break
    return sorted(docs.values())


# -- the whole evaluation ----------------------------------------------------------------------------------

def _check_data(train_cfg: TrainConfig, storage: Storage, index: dict[str, Any], tok_meta: dict, tok_digest: str) -> None:
    mcfg = train_cfg.model
    if index["tokenizer_digest"] and index["tokenizer_digest"] != tok_digest:
        raise EvaluationError(f"{storage.uri('shards/index.json')} was made with tokenizer {index['tokenizer_digest']}, "
                              f"but {storage.uri('tokenizer/spm.model')} is {tok_digest}: re-run the tokenize stage")
    if index["vocab_size"] > mcfg.vocab_size or tok_meta.get("vocab_size", 0) > mcfg.vocab_size:
        raise EvaluationError(f"tokenizer vocabulary ({index['vocab_size']}) exceeds train.model.vocab_size={mcfg.vocab_size}")
    if index["seq_len"] > mcfg.max_seq_len:
        raise EvaluationError(f"shards have seq_len {index['seq_len']} > train.model.max_seq_len {mcfg.max_seq_len}")
    if not index["splits"].get("val", {}).get("samples"):
        raise EvaluationError(f"{storage.uri('shards/index.json')} has no validation rows (prep.tokenize.val_fraction is 0 "
                              "or the corpus is too small); nothing to evaluate on")


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON (any parser, jq, JavaScript) and not Python's."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _read_previous(storage: Storage, run: str) -> dict[str, Any] | None:
    try:
        prev = storage.read_json(results_ref(run))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # an unreadable previous result is replaced, not fatal
    return prev if isinstance(prev, dict) and prev.get("version") == RESULTS_VERSION else None


def run_evaluation(train_cfg: TrainConfig, eval_cfg: EvalConfig, storage: Storage, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default: ``eval_cfg.checkpoint``, else the run's latest).

    Returns ``{"results": dict, "report_md": str, "tables": {name: [row, ...]}, "files": [refs]}``
    and writes ``runs/<run>/eval/{results.json, report.md, *.png, tasks/*.jsonl}``.
    """
    from shardflow.dataprep.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    device = pick_device(eval_cfg.device)
    run = train_cfg.run
    out_dir = eval_dir(run)
    index = read_index(storage)
    sp, tok_meta, tok_digest = load_tokenizer(storage)
    _check_data(train_cfg, storage, index, tok_meta, tok_digest)
    model, ck = load_model(train_cfg, storage, checkpoint or eval_cfg.checkpoint, device)
    check_checkpoint_tokenizer(ck, tok_digest, EvaluationError)
    settings = split_settings(storage, eval_cfg)
    eos_id = int(index["eos_id"])
    bos_id = int(tok_meta.get("bos_id", -1))
    doc_prefix = [eos_id] + ([bos_id] if settings["add_bos"] and bos_id >= 0 else [])
    max_len = train_cfg.model.max_seq_len
    bs = eval_cfg.batch_size

    stats = ExpertStats(model)
    try:
        val = val_perplexity(model, storage, index, bs, eval_cfg.max_val_batches, device, stats)
    finally:
        stats.close()
    experts = stats.summary()

    docs = held_out_documents(storage, settings, eval_cfg.held_out_docs, eval_cfg.seed)
    per_source = {}
    if docs and eval_cfg.max_source_batches:
        per_source = source_perplexity(model, sp, docs, index["seq_len"], doc_prefix, eos_id, bs, eval_cfg.max_source_batches, device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x).logits

    def encode(text: str) -> list[int]:
        return sp.encode(text, out_type=int)

    files: list[str] = []
    cloze: dict[str, Any] = {}
    if eval_cfg.cloze_examples and docs:
        examples = T.build_cloze(docs, eval_cfg.cloze_examples, eval_cfg.seed, eval_cfg.cloze_min_context_words)
        if examples:
            cloze, _ = T.evaluate_cloze(examples, forward, encode, doc_prefix, bs, max_len, device)

    task_refs: list[tuple[str, str]] = []
    if eval_cfg.mc_examples and docs:
        gen = T.build_continuation_task(docs, eval_cfg.mc_examples, eval_cfg.seed, eval_cfg.mc_choices,
                                        context_words=max(8, eval_cfg.cloze_min_context_words * 2),
                                        continuation_words=eval_cfg.mc_continuation_words)
        if gen:
            ref = f"{out_dir}/tasks/{DEFAULT_TASK_NAME}.jsonl"
            T.write_mc_task(storage, ref, gen)
            files.append(ref)
            task_refs.append((DEFAULT_TASK_NAME, ref))
            if storage.protocol_of(ref) == "file":  # lm-eval's json loader reads local files
                yref = f"{out_dir}/tasks/{DEFAULT_TASK_NAME}.yaml"
                storage.write_text(yref, T.lm_eval_task_yaml(f"shardflow_{DEFAULT_TASK_NAME}", storage.uri(ref)))
                files.append(yref)
    for ref in eval_cfg.tasks:
        name = T.task_name(ref)
        if any(name == n for n, _ in task_refs):
            raise EvaluationError(f"eval.tasks: two task files are named {name!r} ({ref})")
        task_refs.append((name, ref))
    task_results = {}
    for name, ref in task_refs:
        examples = T.load_mc_task(storage, ref)
        metrics, _ = T.evaluate_mc(examples, forward, encode, doc_prefix, bs, max_len, device)
        task_results[name] = {"file": storage.uri(ref), **metrics}

    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "run": run,
        "checkpoint": ck,
        "model_config_digest": model_config_digest(train_cfg),
        "eval_config_digest": digest_json(eval_cfg.model_dump(mode="json")),
        "tokenizer_digest": tok_digest,
        "index": {"seq_len": index["seq_len"], "val_samples": index["splits"]["val"]["samples"],
                  "val_tokens": index["splits"]["val"]["tokens"]},
        "split": settings,
        "val": val,
        "per_source": per_source,
        "per_source_note": (f"Per source: {len(docs)} held-out documents (val split by document-id hash, "
                            f"val_fraction={settings['val_fraction']}, split_seed={settings['split_seed']}) re-tokenized "
                            f"and packed like the shards, at most {eval_cfg.max_source_batches} batches per source."
                            if per_source else "No held-out documents found for per-source perplexity (no tokenize "
                            "manifest or stages/dedup outputs under the root)."),
        "cloze": cloze,
        "tasks": task_results,
        "experts": experts,
    }
    results["metrics"] = rep.flatten_metrics(results)
    previous = _read_previous(storage, run)
    if previous:
        results["previous"] = {"checkpoint_step": previous.get("checkpoint", {}).get("step"),
                               "checkpoint_uri": previous.get("checkpoint", {}).get("uri"),
                               "metrics": previous.get("metrics", {})}
    results["deltas"] = rep.deltas(results["metrics"], (previous or {}).get("metrics"))

    records = rep.read_metrics(storage, f"{run_dir(run)}/metrics.jsonl")
    plots = {
        "loss": rep.plot_loss(rep.loss_curves(records)),
        "lr": rep.plot_lr(rep.lr_curve(records)),
        "expert_load": rep.plot_expert_load(experts["tokens_per_expert"], experts["layers"]),
    }
    plot_names = {}
    for key, png in plots.items():
        ref = f"{out_dir}/{rep.PLOT_FILES[key]}"
        storage.write_bytes(ref, png)
        files.append(ref)
        plot_names[key] = rep.PLOT_FILES[key]
    tables = rep.build_tables(results)
    report_md = rep.render_markdown(results, tables, plot_names)
    storage.write_text(f"{out_dir}/report.md", report_md)
    files.append(f"{out_dir}/report.md")
    results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    results = _finite(results)
    storage.write_json(results_ref(run), results)  # last: it marks a complete evaluation
    files.append(results_ref(run))
    return {"results": results, "report_md": report_md, "tables": tables, "files": files}

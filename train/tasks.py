"""Downstream task formats scored by log-likelihood: next-word cloze and multiple choice.

Both reduce to one primitive, the log-probability of a continuation's tokens given a context (the
``loglikelihood`` request of lm-evaluation-harness), so one batched scorer serves every task and a
user adds a task by writing a JSONL file, not code.

Why continuations are tokenized as ``encode(context + continuation)`` minus ``encode(context)``
(lm-eval's rule): sentencepiece merges across the join (a leading space belongs to the next word's
piece), so encoding the continuation alone would score token sequences the model never sees.

Why the scorer takes a plain ``forward(tokens) -> logits`` callable and an ``encode(str) -> ids``
callable: the same code scores the shardflow model, an exported transformers model, or a toy model
in a test, without this module knowing about checkpoints or tokenizers.

The multiple-choice file format (one JSON object per line)::

    {"context": "...", "choices": ["...", "..."], "label": 0, "id": "optional"}

Each choice is scored as the continuation ``" " + choice`` (lm-eval's default ``target_delimiter``),
or ``choice`` as is when the context already ends with whitespace.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardflow.storage import Storage

Encode = Callable[[str], list[int]]
Forward = Callable[[torch.Tensor], torch.Tensor]  # [B, S] int64 -> [B, S, V] logits

TARGET_DELIMITER = " "
_WORD = re.compile(r"\S+")
_HAS_ALNUM = re.compile(r"\w")


class TaskFormatError(ValueError):
    """A task file line is not a valid example; the message names the file, line and reason."""


@dataclass(frozen=True)
class MCExample:
    id: str
    context: str
    choices: tuple[str, ...]
    label: int

    def to_json(self) -> dict:
        return {"id": self.id, "context": self.context, "choices": list(self.choices), "label": self.label}


@dataclass(frozen=True)
class ClozeExample:
    id: str
    context: str
    target: str  # the whitespace before the word + the word, exactly as in the document
    source: str = ""


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # sum of log p(continuation token | prefix), natural log
    n_tokens: int
    greedy: bool  # every continuation token is the argmax at its position


# -- task files -----------------------------------------------------------------------------------

def parse_mc_line(obj: object, where: str) -> MCExample:
    if not isinstance(obj, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "context", "choices", "label"}
    if unknown:
        raise TaskFormatError(f"{where}: unknown keys {sorted(unknown)} (allowed: id, context, choices, label)")
    context, choices, label = obj.get("context"), obj.get("choices"), obj.get("label")
    if not isinstance(context, str):
        raise TaskFormatError(f"{where}: 'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskFormatError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise TaskFormatError(f"{where}: 'label' must be an integer index into choices (0..{len(choices) - 1}), got {label!r}")
    ex_id = obj.get("id", "")
    if not isinstance(ex_id, (str, int)):
        raise TaskFormatError(f"{where}: 'id' must be a string or an integer")
    return MCExample(str(ex_id), context, tuple(choices), label)


def load_mc_task(storage: Storage, ref: str) -> list[MCExample]:
    """Every example of a multiple-choice JSONL file; the first bad line is an error naming it."""
    from shardflow.storage.jsonl import TooLong, iter_lines

    uri = storage.uri(ref)
    examples = []
    try:
        for lineno, raw in iter_lines(storage, ref, max_line_bytes=16 << 20):
            where = f"{uri}: line {lineno}"
            if isinstance(raw, TooLong):
                raise TaskFormatError(f"{where}: line longer than 16 MiB")
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise TaskFormatError(f"{where}: invalid JSON ({exc})") from None
            ex = parse_mc_line(obj, where)
            examples.append(ex if ex.id else MCExample(str(lineno), ex.context, ex.choices, ex.label))
    except FileNotFoundError:
        raise TaskFormatError(f"{uri}: task file not found") from None
    if not examples:
        raise TaskFormatError(f"{uri}: task file holds no examples")
    return examples


def write_mc_task(storage: Storage, ref: str, examples: Iterable[MCExample]) -> None:
    """Plain JSONL (readable by lm-eval's ``json`` loader too), published atomically."""
    body = "".join(json.dumps(ex.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for ex in examples)
    storage.write_text(ref, body)


def lm_eval_task_yaml(name: str, data_file: str) -> str:
    """An lm-evaluation-harness task config over a multiple-choice JSONL file, scored as we score it.

    ``dataset_path: json`` is the ``datasets`` library's packaged JSON loader: nothing is fetched
    from a hub. ``data_file`` must be a local path (or a URL ``datasets`` can open).
    """
    import yaml

    return yaml.safe_dump({
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }, sort_keys=False)


def task_name(ref: str) -> str:
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".zst", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


# -- building tasks from held-out documents ---------------------------------------------------------

def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def build_cloze(
    docs: Sequence[tuple[str, str, str]],
    n: int,
    seed: int,
    min_context_words: int = 16,
) -> list[ClozeExample]:
    """``n`` next-word examples from ``(id, text, source)`` documents, a pure function of (docs, n, seed).

    The context is a document's prefix ending after a word chosen at random; the target is the
    following whitespace-delimited word with the whitespace before it. Targets without a letter or
    digit (bare punctuation) are skipped. Documents are used round-robin in a seeded order, so a
    handful of long documents cannot fill the task alone.
    """
    if n <= 0:
        return []
    rng = random.Random(seed)
    pool = sorted((d for d in docs if len(_WORD.findall(d[1])) > min_context_words), key=lambda d: d[0])
    if not pool:
        return []
    rng.shuffle(pool)
    out: list[ClozeExample] = []
    seen: set[tuple[str, int]] = set()
    attempts = 0
    while len(out) < n and attempts < 20 * n:
        doc_id, text, source = pool[attempts % len(pool)]
        attempts += 1
        words = _words(text)
        k = rng.randrange(min_context_words, len(words))
        if (doc_id, k) in seen or not _HAS_ALNUM.search(words[k].group()):
            continue
        seen.add((doc_id, k))
        cut = words[k - 1].end()
        out.append(ClozeExample(f"{doc_id}#{k}", text[:cut], text[cut:words[k].end()], source))
    return out


def build_continuation_task(
    docs: Sequence[tuple[str, str, str]],
    n: int,
    seed: int,
    n_choices: int = 4,
    context_words: int = 32,
    continuation_words: int = 12,
) -> list[MCExample]:
    """A multiple-choice task from held-out text: the true next words vs spans of other documents.

    Each example takes ``context_words`` words of a document as context; the right answer is the
    ``continuation_words`` words that follow, the distractors are spans of the same length from
    other documents. The answer's position is drawn at random (seeded), so a model that prefers a
    position scores chance.
    """
    need = context_words + continuation_words
    pool = sorted((d for d in docs if len(_WORD.findall(d[1])) >= need), key=lambda d: d[0])
    spans = sorted((d for d in docs if len(_WORD.findall(d[1])) >= continuation_words), key=lambda d: d[0])
    if n <= 0 or not pool or len(spans) < n_choices:
        return []
    rng = random.Random(seed)
    rng.shuffle(pool)
    out = []
    for i in range(min(n, len(pool))):
        doc_id, text, _ = pool[i]
        words = _words(text)
        start = rng.randrange(0, len(words) - need + 1)
        context = " ".join(w.group() for w in words[start:start + context_words])
        true = " ".join(w.group() for w in words[start + context_words:start + need])
        choices = [true]
        tries = 0
        while len(choices) < n_choices and tries < 50 * n_choices:
            tries += 1
            other_id, other, _ = spans[rng.randrange(len(spans))]
            if other_id == doc_id:
                continue
            ow = _words(other)
            s = rng.randrange(0, len(ow) - continuation_words + 1)
            cand = " ".join(w.group() for w in ow[s:s + continuation_words])
            if cand not in choices:
                choices.append(cand)
        if len(choices) < n_choices:
            continue
        distractors = choices[1:]
        label = rng.randrange(n_choices)
        ordered = distractors[:label] + [true] + distractors[label:]
        out.append(MCExample(f"{doc_id}@{start}", context, tuple(ordered), label))
    return out


# -- scoring ----------------------------------------------------------------------------------------

def split_continuation(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: trailing context spaces move over."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    if whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, encode(continuation)  # the join re-tokenized the context's tail: score the parts


def mc_continuation(context: str, choice: str) -> str:
    return choice if (not context or context[-1].isspace() or choice[:1].isspace()) else TARGET_DELIMITER + choice


@torch.no_grad()
def score_requests(
    forward: Forward,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    max_len: int,
    device: torch.device | str = "cpu",
    pad_id: int = 0,
) -> list[LogLikelihood]:
    """Log-likelihood of each ``(context ids, continuation ids)``; contexts are cut on the left to fit.

    Requests are batched longest first and right-padded: with causal attention the padding after a
    sequence cannot change its logits. Log-softmax runs in fp32 whatever the model's dtype.
    """
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if not ctx:
            raise ValueError(f"request {i}: empty context; prefix it with a document-start token")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's {max_len}")
    inputs = []
    for ctx, cont in requests:
        whole = list(ctx) + list(cont)
        inputs.append(whole[-(max_len + 1):][:-1] if len(whole) > 1 else whole)
    order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), i))
    results: list[LogLikelihood | None] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = len(inputs[idx[0]])
        batch = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        logits = forward(batch.to(device)).float()
        for row, i in enumerate(idx):
            cont = torch.tensor(list(requests[i][1]), dtype=torch.long, device=logits.device)
            n, end = len(cont), len(inputs[i])
            lp = F.log_softmax(logits[row, end - n:end], dim=-1)
            token_lp = lp.gather(1, cont.unsqueeze(1)).squeeze(1)
            greedy = bool((lp.argmax(dim=-1) == cont).all())
            results[i] = LogLikelihood(float(token_lp.sum()), n, greedy)
    return results  # type: ignore[return-value]


def evaluate_cloze(
    examples: Sequence[ClozeExample],
    forward: Forward,
    encode: Encode,
    prefix: Sequence[int],
    batch_size: int,
    max_len: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], list[dict]]:
    """Accuracy (greedy decoding reproduces every target token) and mean log-likelihood per example."""
    reqs, kept = [], []
    for ex in examples:
        ctx, cont = split_continuation(encode, ex.context, ex.target)
        if 0 < len(cont) < max_len:  # a target longer than the model's window cannot be scored
            reqs.append((list(prefix) + ctx, cont))
            kept.append(ex)
    scores = score_requests(forward, reqs, batch_size, max_len, device)
    rows = [{"id": ex.id, "source": ex.source, "target": ex.target, "logprob": s.logprob, "tokens": s.n_tokens,
             "correct": s.greedy} for ex, s in zip(kept, scores)]
    n = len(scores)
    tokens = sum(s.n_tokens for s in scores)
    metrics = {
        "n": n,
        "skipped": len(examples) - n,
        "acc": sum(s.greedy for s in scores) / n if n else math.nan,
        "mean_logprob": sum(s.logprob for s in scores) / n if n else math.nan,
        "mean_token_logprob": sum(s.logprob for s in scores) / tokens if tokens else math.nan,
    }
    return metrics, rows


def evaluate_mc(
    examples: Sequence[MCExample],
    forward: Forward,
    encode: Encode,
    prefix: Sequence[int],
    batch_size: int,
    max_len: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], list[dict]]:
    """``acc``: argmax of summed log-prob; ``acc_norm``: argmax of log-prob per byte of the choice
    (lm-eval's normalization, so the figures compare); ``acc_token_norm``: per token."""
    reqs, spans, kept = [], [], []
    for ex in examples:
        pairs = [split_continuation(encode, ex.context, mc_continuation(ex.context, c)) for c in ex.choices]
        if not all(0 < len(cont) < max_len for _, cont in pairs):
            continue  # a choice longer than the model's window cannot be scored: skip the example
        spans.append((len(reqs), len(reqs) + len(pairs)))
        reqs += [(list(prefix) + ctx, cont) for ctx, cont in pairs]
        kept.append(ex)
    scores = score_requests(forward, reqs, batch_size, max_len, device)
    rows, hits = [], {"acc": 0, "acc_norm": 0, "acc_token_norm": 0}
    for ex, (a, b) in zip(kept, spans):
        s = scores[a:b]
        lp = [x.logprob for x in s]
        per_byte = [x.logprob / max(1, len(mc_continuation(ex.context, c).encode("utf-8"))) for x, c in zip(s, ex.choices)]
        per_tok = [x.logprob / x.n_tokens for x in s]
        picks = {"acc": _argmax(lp), "acc_norm": _argmax(per_byte), "acc_token_norm": _argmax(per_tok)}
        for k, p in picks.items():
            hits[k] += p == ex.label
        rows.append({"id": ex.id, "label": ex.label, "pred": picks["acc"], "pred_norm": picks["acc_norm"], "logprobs": lp})
    n = len(kept)
    metrics = {"n": n, "skipped": len(examples) - n, **{k: (v / n if n else math.nan) for k, v in hits.items()},
               "chance": (sum(1 / len(ex.choices) for ex in kept) / n) if n else math.nan}
    return metrics, rows


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first of equal maxima

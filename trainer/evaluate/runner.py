"""Run tasks and perplexity sets on one model; model and data fingerprints; the results JSON.

Results file (`gemma-ewc/eval-v1`):

    {"format", "created", "label", "lambda",
     "run": {...the model directory's gemma-ewc.json ("label", "ewc_lambda", "checkpoint", "seq_len",
             "data_stores", "data_weights", "step"), or {} without one},
     "model": {"path", "fingerprint", "fingerprint_method", "tokenizer_sha256", "parameters", "config"},
     "settings": {"device", "dtype", "attention", "max_length", "context_source", "stride", "row_tokens",
                  "batch_rows", ...},
     "perplexity": {NAME: {"file", "sha256", "documents", "empty_documents", "tokens", "bytes", "nll",
                           "perplexity", "bits_per_byte", "nll_per_token", "seconds"}},
     "tasks": {NAME: {"type", "path", "sha256", "files", "num_fewshot", "fewshot_sha256", "n", "primary",
                      "scores": {metric: value}, "stderr": {metric: value},
                      "skipped": {"count", "reasons": {reason: count}, "examples": [[item, reason]]},
                      "truncated", "subtasks": {subject: {"n", "scores"}}, "notes", "seconds", ...}},
     "versions": {...}}

Model fingerprint ("sampled-v1", the default): sha256 over config.json and, for every safetensors file in name
order, its name, size, full header (names, dtypes, shapes, offsets) and 64 KiB of content at 33 evenly spaced
offsets. It is the same for every copy of a checkpoint, costs milliseconds at any size, and differs between any
two trained checkpoints in practice (training changes every tensor). `--full-hash` hashes every byte instead
("sha256-v1"). Data files are hashed whole (sha256; a folder of files: sha256 over the sorted (name, sha256)).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from trainer import __version__
from trainer.errors import UserError
from trainer.evaluate.generate import greedy_generate
from trainer.evaluate.scoring import ScoringOptions, Tokenizer, loglikelihood, mean_stderr
from trainer.evaluate.tasks import GSM8K_STOP, ItemError, Task, fewshot_prefix
from trainer.fileio import atomic_path, files_sha256, sha256_file

RESULTS_FORMAT = "gemma-ewc/eval-v1"
METADATA_FILE = "gemma-ewc.json"  # optional, in a model directory (trainer/export.py writes it)
_SAMPLE_BLOCK = 1 << 16
_SAMPLE_COUNT = 33


def model_fingerprint(model_dir: Path, *, full: bool = False) -> tuple[str, str]:
    """(hex digest, method) of a Hugging Face model directory (see the module doc)."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for file in sorted(model_dir.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"{file.name}\0{size}\0".encode())
        if full:
            h.update(bytes.fromhex(sha256_file(file)))
            continue
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(header_len))
            data_start, data_len = 8 + header_len, max(size - 8 - header_len, 0)
            for k in range(_SAMPLE_COUNT):
                offset = data_start + (data_len - _SAMPLE_BLOCK) * k // (_SAMPLE_COUNT - 1) if data_len > \
                    _SAMPLE_BLOCK else data_start
                fh.seek(offset)
                h.update(fh.read(_SAMPLE_BLOCK))
    return h.hexdigest(), "sha256-v1" if full else "sampled-v1"


def read_model_metadata(model_dir: Path) -> dict:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    return meta if isinstance(meta, dict) else {}


CONTEXT_SOURCES = ("max-length option", "trained seq_len", "max_position_embeddings")


@dataclass
class EvaluationContext:
    """The context window `eval` scores with, where it came from, and a warning when it exceeds the training's."""

    max_length: int
    source: str                 # one of CONTEXT_SOURCES (results["settings"]["context_source"])
    description: str            # for the line `eval` prints: "context 128 tokens (trained seq_len, gemma-ewc.json)"
    warning: str | None = None


def evaluation_context(*, requested: int | None, metadata: dict, model_context: int,
                       metadata_path: Path) -> EvaluationContext:
    """--max-length when given, else the sequence length the model was trained at (gemma-ewc.json "seq_len"), else
    its max_position_embeddings: a model is never scored at a longer context than it saw unless the user asks."""
    trained = metadata.get("seq_len")
    if trained is not None and (isinstance(trained, bool) or not isinstance(trained, int) or trained < 1):
        raise UserError(f"{metadata_path}: \"seq_len\" must be a positive integer, got {trained!r}")
    if requested is not None:
        warning = None
        if trained is not None and requested > trained:
            warning = (f"--max-length {requested} is longer than the {trained} tokens the model was trained at "
                       f"({metadata_path.name} seq_len): scores beyond {trained} tokens measure length extrapolation")
        return EvaluationContext(requested, "max-length option", f"context {requested} tokens (--max-length)",
                                 warning)
    if trained is not None:
        return EvaluationContext(trained, "trained seq_len",
                                 f"context {trained} tokens (trained seq_len, {metadata_path.name})")
    return EvaluationContext(model_context, "max_position_embeddings",
                             f"context {model_context} tokens (max_position_embeddings, config.json; no seq_len in "
                             f"{metadata_path.name})")


def _skipped_summary(skipped: Sequence[tuple[str, str]]) -> dict:
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    top = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:20])
    return {"count": len(skipped), "reasons": top, "examples": [list(s) for s in skipped[:5]]}


def _aggregate(task: Task, per_doc: list[tuple[str | None, dict[str, float]]]) -> dict:
    metrics = task.type.metrics
    scores = {m: math.fsum(s[m] for _, s in per_doc) / len(per_doc) for m in metrics} if per_doc else {}
    stderr = {m: mean_stderr([s[m] for _, s in per_doc]) for m in metrics} if per_doc else {}
    subjects = sorted({subj for subj, _ in per_doc if subj is not None})
    subtasks = {}
    if len(subjects) > 1:
        for subj in subjects:
            rows = [s for sj, s in per_doc if sj == subj]
            subtasks[subj] = {"n": len(rows), "scores": {m: math.fsum(r[m] for r in rows) / len(rows)
                                                         for m in metrics}}
    return {"n": len(per_doc), "primary": task.type.primary, "scores": scores, "stderr": stderr,
            "subtasks": subtasks}


def evaluate_multiple_choice(model, tokenizer: Tokenizer, task: Task, *, max_length: int,
                             options: ScoringOptions | None = None) -> dict:
    start = time.perf_counter()
    skipped = list(task.skipped)
    requests: list[tuple[str, str]] = []
    placed = []  # (doc, first request, number of requests)
    for doc in task.docs:
        try:
            reqs = task.type.requests(doc, fewshot_prefix(task, doc))
        except ItemError as exc:
            skipped.append((doc.id, str(exc)))
            continue
        placed.append((doc, len(requests), len(reqs)))
        requests.extend(reqs)
    results = loglikelihood(model, tokenizer, requests, max_length=max_length, options=options)
    per_doc, truncated = [], 0
    for doc, first, n in placed:
        rs = results[first:first + n]
        error = next((r.error for r in rs if r.error), None)
        if error is not None:
            skipped.append((doc.id, error))
            continue
        truncated += any(r.truncated for r in rs)
        per_doc.append((doc.subject, task.type.score(doc, [r.logprob for r in rs])))
    seconds = time.perf_counter() - start
    out = _aggregate(task, per_doc)
    out.update(skipped=_skipped_summary(skipped), truncated=truncated, seconds=seconds, requests=len(requests),
               tokens_scored=sum(r.tokens for r in results), choices_per_s=len(requests) / max(seconds, 1e-9))
    return out


def evaluate_generation(model, tokenizer: Tokenizer, task: Task, *, max_length: int, max_new_tokens: int,
                        batch_size: int, progress: bool = False) -> dict:
    start = time.perf_counter()
    skipped = list(task.skipped)
    docs, prompts = [], []
    bos = model.config.bos_token_id
    for doc in task.docs:
        try:
            prompts.append([bos] + tokenizer.encode(fewshot_prefix(task, doc) + doc.query))
            docs.append(doc)
        except ItemError as exc:
            skipped.append((doc.id, str(exc)))
    gens = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, max_length=max_length,
                           stop=GSM8K_STOP, batch_size=batch_size, progress=progress)
    per_doc = [(doc.subject, task.type.score_generation(doc, g.text)) for doc, g in zip(docs, gens)]
    seconds = time.perf_counter() - start
    out = _aggregate(task, per_doc)
    generated = sum(len(g.tokens) for g in gens)
    out.update(skipped=_skipped_summary(skipped), truncated=sum(g.prompt_truncated for g in gens), seconds=seconds,
               generated_tokens=generated, generated_tokens_per_s=generated / max(seconds, 1e-9),
               max_new_tokens=max_new_tokens,
               examples=[{"item": d.id, "generation": g.text} for d, g in list(zip(docs, gens))[:3]])
    return out


def evaluate_task(model, tokenizer: Tokenizer, task: Task, *, max_length: int, options: ScoringOptions,
                  max_new_tokens: int = 256, gen_batch_size: int = 8) -> dict:
    if task.type.generation:
        body = evaluate_generation(model, tokenizer, task, max_length=max_length, max_new_tokens=max_new_tokens,
                                   batch_size=gen_batch_size, progress=options.progress)
    else:
        body = evaluate_multiple_choice(model, tokenizer, task, max_length=max_length, options=options)
    if body["n"] == 0:
        s = body["skipped"]
        example = f"; e.g. {s['examples'][0][0]}: {s['examples'][0][1]}" if s["examples"] else ""
        raise UserError(f"task {task.name} ({task.path}): no item could be scored ({s['count']} skipped{example})")
    head = {"type": task.type.name, "path": str(task.path), "sha256": files_sha256(task.files),
            "files": len(task.files), "num_fewshot": task.num_fewshot,
            "fewshot_sha256": files_sha256(task.fewshot_files) if task.fewshot_files else None,
            "notes": task.notes}
    return {**head, **body}


def write_results(path: str | os.PathLike, results: dict) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    return path


def new_results(*, model_dir: Path, fingerprint: tuple[str, str], tokenizer: Tokenizer, config, label: str | None,
                ewc_lambda: float | None, settings: dict, run: dict | None = None) -> dict:
    return {
        "format": RESULTS_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "lambda": ewc_lambda,
        "run": dict(run or {}),
        "model": {"path": str(model_dir.resolve()), "fingerprint": fingerprint[0],
                  "fingerprint_method": fingerprint[1], "tokenizer_sha256": tokenizer.sha256,
                  "parameters": config.num_parameters(),
                  "config": {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                             "num_layers": config.num_layers}},
        "settings": settings,
        "perplexity": {},
        "tasks": {},
        "versions": {"gemma-ewc": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
    }

"""Log-likelihood scoring on packed rows: the engine under perplexity, multiple choice and the lm-eval adapter.

A scoring job is a list of `Span`s. A span is one short sequence the model reads (its own "document": positions
restart at 0, attention never leaves it) plus the positions whose next-token log-probabilities count, each credited
to an owner (a request, a document). Spans are packed first-fit-decreasing into rows of `row_tokens` tokens,
several rows make a batch, and one forward pass scores them all: many short (context + continuation) sequences
share a row instead of being padded to the longest.

Only the scored positions go through the LM head, in chunks of `head_chunk` tokens, with the logits upcast to
float32 before the soft-cap and the log-softmax (a 256k vocabulary in bfloat16 loses ~3 significant digits of
log-probability). Per-owner sums are accumulated in float64.

Tokenization follows lm-evaluation-harness (`HFLM._encode_pair` with Gemma's BOS): trailing whitespace of the
context moves to the continuation; context+continuation is encoded as one string and split at the length of the
encoded context, so the continuation's first token is the one the model would see in running text; BOS is
prepended. A request longer than the context window loses tokens on the left, as lm-eval does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from trainer.data.tokenize import Tokenizer
from trainer.errors import UserError


def check_tokenizer(tokenizer: Tokenizer, config) -> None:
    """The tokenizer must fit the model: ids inside the vocabulary, the same BOS/EOS as config.json."""
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                        f"{config.vocab_size}: the tokenizer does not belong to this model")
    if tokenizer.bos_id < 0:
        raise UserError(f"{tokenizer.path} has no BOS piece; Gemma's tokenizer has BOS id {config.bos_token_id}")
    if (tokenizer.bos_id, tokenizer.eos_id) != (config.bos_token_id, config.eos_token_id):
        raise UserError(f"{tokenizer.path} has BOS/EOS ids {tokenizer.bos_id}/{tokenizer.eos_id} but config.json "
                        f"says {config.bos_token_id}/{config.eos_token_id}: the tokenizer does not belong to the model")


@dataclass
class Span:
    """One sequence the model reads, and the predictions that count.

    `input_ids` is fed as its own document. Position `positions[k]` predicts `targets[k]`, credited to
    `owners[k]`. Several targets may share a position (single-token continuations of one context).
    """

    input_ids: list[int]
    positions: list[int]
    targets: list[int]
    owners: list[int]


@dataclass
class OwnerScores:
    """Per owner: sum of log-probabilities (nats), number of scored tokens, whether every target was the argmax."""

    logprob: list[float]
    tokens: list[int]
    greedy: list[bool]


@dataclass
class ScoringOptions:
    row_tokens: int = 2048      # tokens per packed row (a longer span gets a row of its own length); with
                                # eager attention (CPU) a row costs its length squared, so keep rows short there
    batch_rows: int = 4         # rows per forward pass
    head_chunk: int = 0         # scored positions per LM-head chunk; 0 = about 32M logits per chunk
    fixed_shape: bool = False   # every batch [batch_rows, row capacity]: one shape, so torch.compile (flex
                                # attention on CUDA) compiles once instead of once per batch
    progress: bool = False      # tqdm bar on stderr


def _head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, *, chunk: int):
    """log p(target) and argmax == target for hidden [N, H], targets [N], in float32, `chunk` rows at a time."""
    logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = model.lm_head(hidden[start:start + chunk], logits_dtype=torch.float32)
        tgt = targets[start:start + chunk]
        logprobs[start:start + chunk] = (logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
        greedy[start:start + chunk] = logits.argmax(dim=-1) == tgt
    return logprobs, greedy


def pack_spans(lengths: Sequence[int], *, row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: span indices grouped into rows of at most `row_tokens` tokens; a longer span opens a
    row of its own length (which shorter spans may still join)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # rows that can still take the shortest span
    shortest = min(lengths) if lengths else 0
    for i in order:
        n = lengths[i]
        for r in open_rows:
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max(row_tokens, n) - n)
            open_rows.append(len(rows) - 1)
        # Spans come longest first, so a row with less room than the shortest span is full for good.
        open_rows = [r for r in open_rows if free[r] >= shortest]
    return rows


@torch.inference_mode()
def score_spans(model, spans: Sequence[Span], num_owners: int, *, options: ScoringOptions | None = None,
                pad_id: int = 0) -> OwnerScores:
    """Run every span through `model` packed into rows; sum log-probabilities per owner (see the module doc)."""
    options = options or ScoringOptions()
    device = model.embed_tokens.weight.device
    vocab = model.config.vocab_size
    chunk = options.head_chunk or max(1, (32 << 20) // vocab)
    logprob = torch.zeros(num_owners, dtype=torch.float64, device=device)
    count = torch.zeros(num_owners, dtype=torch.long, device=device)
    missed = torch.zeros(num_owners, dtype=torch.long, device=device)  # targets that were not the argmax
    for s in spans:
        if not s.input_ids:
            raise ValueError("a span needs at least one input token")
    lengths = [len(s.input_ids) for s in spans]
    capacity = max([options.row_tokens, *lengths])
    rows = pack_spans(lengths, row_tokens=options.row_tokens)
    batches = [rows[i:i + options.batch_rows] for i in range(0, len(rows), options.batch_rows)]
    bar = None
    if options.progress:
        bar = tqdm(total=len(spans), desc="scoring", unit="seq", file=sys.stderr, leave=False)
    for batch in batches:
        if options.fixed_shape:
            width = capacity
            batch = batch + [[] for _ in range(options.batch_rows - len(batch))]
        else:
            width = max(sum(len(spans[i].input_ids) for i in row) for row in batch)
        ids, pos = [], []
        flat_index, targets, owners = [], [], []
        for r, row in enumerate(batch):
            row_ids, row_pos = [], []
            for i in row:
                s = spans[i]
                base = r * width + len(row_ids)
                flat_index.extend(base + p for p in s.positions)
                targets.extend(s.targets)
                owners.extend(s.owners)
                row_ids.extend(s.input_ids)
                row_pos.extend(range(len(s.input_ids)))
            pad = width - len(row_ids)
            ids.append(row_ids + [pad_id] * pad)
            pos.append(row_pos + list(range(pad)))  # the padding is a document of its own, never scored
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        position_ids = torch.tensor(pos, dtype=torch.long, device=device)
        hidden = model.hidden_states(input_ids, position_ids)  # [B, S, H]
        if not flat_index:
            continue
        index = torch.tensor(flat_index, dtype=torch.long, device=device)
        tgt = torch.tensor(targets, dtype=torch.long, device=device)
        lp, greedy = _head_logprobs(model, hidden.reshape(-1, hidden.shape[-1])[index], tgt, chunk=chunk)
        own = torch.tensor(owners, dtype=torch.long, device=device)
        logprob.index_add_(0, own, lp.double())
        count.index_add_(0, own, torch.ones_like(own))
        missed.index_add_(0, own, (~greedy).long())
        if bar is not None:
            bar.update(sum(len(row) for row in batch))
    if bar is not None:
        bar.close()
    return OwnerScores(logprob=logprob.tolist(), tokens=count.tolist(), greedy=(missed == 0).tolist())


# ------------------------------------------------------------------------------------------- (context, continuation)

@dataclass
class EncodedRequest:
    context: list[int]        # BOS + context tokens (left-truncated when the request exceeds the window)
    continuation: list[int]
    truncated: bool = False
    error: str | None = None  # why it cannot be scored (then it is not)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, *, bos_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's split: move the context's trailing whitespace to the continuation, encode the whole, split."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [bos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx):]
    if not cont:
        # The continuation merged into the context's last piece; score it encoded on its own rather than nothing.
        cont = tokenizer.encode(continuation)
    return [bos_id] + ctx, cont


def encode_requests(tokenizer: Tokenizer, requests: Sequence[tuple[str, str]], *, bos_id: int,
                    max_length: int) -> list[EncodedRequest]:
    """Tokenize (context, continuation) pairs; keep the last `max_length` input tokens of each (lm-eval's rule)."""
    out = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation, bos_id=bos_id)
        if not cont:
            out.append(EncodedRequest(ctx, cont, error="the continuation is empty: nothing to score"))
            continue
        excess = len(ctx) + len(cont) - 1 - max_length  # the model reads all tokens but the last
        if excess >= len(ctx):
            out.append(EncodedRequest(ctx, cont, error=f"a continuation of {len(cont)} tokens does not fit the "
                                                       f"{max_length}-token window (raise --max-length)"))
            continue
        if excess > 0:
            ctx = ctx[excess:]
        out.append(EncodedRequest(ctx, cont, truncated=excess > 0))
    return out


def request_spans(encoded: Sequence[EncodedRequest]) -> list[Span]:
    """One span per distinct context for single-token continuations (scored from one position), one per request
    otherwise. MMLU's four " A".." D" answers to one prompt then cost one sequence instead of four."""
    spans: list[Span] = []
    shared: dict[tuple[int, ...], Span] = {}
    for owner, req in enumerate(encoded):
        if req.error is not None:
            continue
        if len(req.continuation) == 1:
            key = tuple(req.context)
            span = shared.get(key)
            if span is None:
                span = shared[key] = Span(list(req.context), [], [], [])
                spans.append(span)
            span.positions.append(len(req.context) - 1)
            span.targets.append(req.continuation[0])
            span.owners.append(owner)
        else:
            tokens = req.context + req.continuation
            first = len(req.context)
            spans.append(Span(tokens[:-1], list(range(first - 1, len(tokens) - 1)), tokens[first:],
                              [owner] * len(req.continuation)))
    return spans


@dataclass
class LoglikelihoodResult:
    logprob: float            # nats; NaN when `error`
    greedy: bool
    tokens: int
    truncated: bool = False
    error: str | None = None


def loglikelihood(model, tokenizer: Tokenizer, requests: Sequence[tuple[str, str]], *, max_length: int,
                  options: ScoringOptions | None = None) -> list[LoglikelihoodResult]:
    """log p(continuation | context) for each (context, continuation), as lm-eval's `loglikelihood` defines it."""
    bos = model.config.bos_token_id
    unique: dict[tuple[str, str], int] = {}
    for r in requests:
        unique.setdefault((r[0], r[1]), len(unique))
    keys = list(unique)
    encoded = encode_requests(tokenizer, keys, bos_id=bos, max_length=max_length)
    scores = score_spans(model, request_spans(encoded), len(keys), options=options, pad_id=tokenizer.pad_id)
    results = [LoglikelihoodResult(scores.logprob[i], scores.greedy[i], scores.tokens[i], encoded[i].truncated)
               if encoded[i].error is None else
               LoglikelihoodResult(math.nan, False, 0, encoded[i].truncated, encoded[i].error)
               for i in range(len(keys))]
    return [results[unique[(r[0], r[1])]] for r in requests]


# ------------------------------------------------------------------------------------------------ rolling windows

def rolling_windows(tokens: Sequence[int], *, bos_id: int, max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Strided windows over BOS + tokens: [(window tokens, index of its first scored token)].

    Every token of `tokens` is scored exactly once. The first window reads up to `max_length` tokens from BOS;
    each next one advances its end by `stride` tokens and starts `max_length` tokens before it, so each token is
    predicted from at least max_length - stride tokens of left context (the last window from a full window).
    A document that fits is one window: the same as scoring it whole.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    full = [bos_id, *tokens]
    windows = []
    end = min(len(full), max_length + 1)
    windows.append((full[:end], 1))
    while end < len(full):
        new_end = min(end + stride, len(full))
        begin = new_end - (max_length + 1)
        windows.append((full[begin:new_end], end - begin))
        end = new_end
    return windows


def rolling_spans(documents: Iterable[Sequence[int]], *, bos_id: int, max_length: int, stride: int) -> list[Span]:
    spans = []
    for owner, tokens in enumerate(documents):
        for window, first in rolling_windows(tokens, bos_id=bos_id, max_length=max_length, stride=stride):
            n = len(window)
            spans.append(Span(window[:-1], list(range(first - 1, n - 1)), window[first:], [owner] * (n - first)))
    return spans


def loglikelihood_rolling(model, documents: Sequence[Sequence[int]], *, max_length: int, stride: int,
                          options: ScoringOptions | None = None, pad_id: int = 0) -> OwnerScores:
    """Sum of log p(token | BOS + preceding tokens) over each whole document (sliding windows when long)."""
    spans = rolling_spans(documents, bos_id=model.config.bos_token_id, max_length=max_length, stride=stride)
    return score_spans(model, spans, len(documents), options=options, pad_id=pad_id)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's stderr of a mean: sample standard deviation / sqrt(n) (sqrt(p(1-p)/(n-1)) for 0/1 values)."""
    n = len(values)
    if n < 2:
        return None
    mu = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mu) ** 2 for v in values) / (n - 1) / n)



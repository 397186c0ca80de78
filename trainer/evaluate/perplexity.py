"""Perplexity and bits per byte of whole documents.

Each document is scored as one sequence from BOS: the sum of log p(token | BOS + preceding tokens) over all its
tokens (EOS is not scored: it is not part of the text, and lm-eval's loglikelihood_rolling does not score it
either). A document longer than the context is scored with strided sliding windows (`scoring.rolling_windows`):
every token once, each with at least max_length - stride tokens of left context; one that fits is one window, so
the result equals full-context scoring. Windows of all documents are packed into rows and batched.

    perplexity    = exp(total NLL / scored tokens)             (depends on the tokenizer)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the text  (does not: comparable across tokenizers)

Inputs: corpus files read by trainer.data's readers (JSON Lines, Parquet, plain text with documents separated by
blank lines; invalid UTF-8 is replaced and counted), or a token store (its documents as stored; the text's bytes
are those of the decoded tokens). A store must have been made with the model's tokenizer.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from trainer.data.readers import ReadStats, expand_inputs, read_documents
from trainer.data.store import MANIFEST, TokenStore
from trainer.errors import UserError
from trainer.evaluate.scoring import ScoringOptions, Tokenizer, loglikelihood_rolling
from trainer.fileio import files_sha256


@dataclass
class PerplexityResult:
    documents: int          # scored
    empty_documents: int    # skipped: no tokens
    tokens: int
    bytes: int
    nll: float              # total, nats
    perplexity: float
    bits_per_byte: float
    nll_per_token: float
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_of_tokens(model, documents: Sequence[Sequence[int]], *, num_bytes: int, max_length: int,
                         stride: int, options: ScoringOptions | None = None, pad_id: int = 0) -> PerplexityResult:
    """Perplexity of tokenized documents (no BOS: it is prepended) whose text is `num_bytes` UTF-8 bytes long."""
    start = time.perf_counter()
    kept = [d for d in documents if len(d)]
    if not kept:
        raise UserError("no document with any token to score")
    scores = loglikelihood_rolling(model, kept, max_length=max_length, stride=stride, options=options, pad_id=pad_id)
    nll = -math.fsum(scores.logprob)
    tokens = sum(scores.tokens)
    assert tokens == sum(len(d) for d in kept), "every token is scored exactly once"
    return PerplexityResult(documents=len(kept), empty_documents=len(documents) - len(kept), tokens=tokens,
                            bytes=num_bytes, nll=nll, perplexity=math.exp(nll / tokens),
                            bits_per_byte=nll / math.log(2) / num_bytes if num_bytes else math.nan,
                            nll_per_token=nll / tokens, seconds=time.perf_counter() - start)


def perplexity_of_texts(model, tokenizer: Tokenizer, texts: Sequence[str], *, max_length: int, stride: int,
                        options: ScoringOptions | None = None) -> PerplexityResult:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("no non-empty document to score")
    tokens = tokenizer.encode_batch(texts)
    num_bytes = sum(len(t.encode("utf-8")) for t, ids in zip(texts, tokens) if ids)
    return perplexity_of_tokens(model, tokens, num_bytes=num_bytes, max_length=max_length, stride=stride,
                                options=options, pad_id=tokenizer.pad_id)


@dataclass
class PerplexityInput:
    """Documents to score, read from corpus files (trainer.data's readers) or a token store."""

    kind: str                       # "text" (corpus files) or "token-store"
    tokens: list[Sequence[int]]     # per document, no BOS/EOS
    num_bytes: int                  # UTF-8 bytes of the documents' text (decoded from the tokens for a store)
    sha256: str                     # the files' sha256 (corpus) or the manifest's (store; it holds shard hashes)
    replaced_characters: int = 0    # invalid UTF-8 replaced by U+FFFD while reading


def read_perplexity_input(path: str | os.PathLike, tokenizer: Tokenizer, *, text_field: str = "text",
                          limit: int | None = None) -> PerplexityInput:
    """A corpus file or folder (.jsonl/.json/.parquet/.txt, .gz), or a token store made with this tokenizer."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        store = TokenStore(path, expected_tokenizer_hash=tokenizer.sha256)
        n = store.num_documents if limit is None else min(limit, store.num_documents)
        docs = [store.document(i).tolist() for i in range(n)]
        if docs and max((max(d) for d in docs if d), default=0) >= tokenizer.vocab_size:
            raise UserError(f"{path}: holds token ids beyond the tokenizer's {tokenizer.vocab_size} pieces")
        num_bytes = sum(len(tokenizer.decode(d).encode("utf-8")) for d in docs if d)
        return PerplexityInput("token-store", docs, num_bytes, store.fingerprint)
    files = expand_inputs([path])
    stats, texts = ReadStats(), []
    for f in files:
        for text in read_documents(f, text_field=text_field, stats=stats):
            if limit is not None and len(texts) >= limit:
                break
            texts.append(text)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{path} holds no text to score (an empty perplexity file?)")
    tokens = tokenizer.encode_batch(texts)
    num_bytes = sum(len(t.encode("utf-8")) for t, ids in zip(texts, tokens) if ids)
    return PerplexityInput("text", tokens, num_bytes, files_sha256(files), stats.replaced)


def perplexity_of_input(model, data: PerplexityInput, *, max_length: int, stride: int,
                        options: ScoringOptions | None = None, pad_id: int = 0) -> PerplexityResult:
    if not any(len(d) for d in data.tokens):
        raise UserError("no document with any token to score (an empty token store?)")
    return perplexity_of_tokens(model, data.tokens, num_bytes=data.num_bytes, max_length=max_length, stride=stride,
                                options=options, pad_id=pad_id)

"""Perplexity and bits per byte of whole documents.

Each document is scored as one sequence from BOS: the sum of log p(token | BOS + preceding tokens) over all its
tokens (EOS is not scored: it is not part of the text, and lm-eval's loglikelihood_rolling does not score it
either). A document longer than the context is scored with strided sliding windows (`scoring.rolling_windows`):
every token once, each with at least max_length - stride tokens of left context; one that fits is one window, so
the result equals full-context scoring. Windows of all documents are packed into rows and batched.

    perplexity    = exp(total NLL / scored tokens)             (depends on the tokenizer)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the text  (does not: comparable across tokenizers)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from trainer.errors import UserError
from trainer.evaluate.scoring import ScoringOptions, Tokenizer, loglikelihood_rolling


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


def read_text_documents(path: Path) -> list[str]:
    """Plain text, documents separated by blank lines (the stop-gap reader until trainer.data's readers land)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; --ppl takes plain-text files (documents separated by blank "
                        f"lines)") from None
    except FileNotFoundError:
        raise UserError(f"perplexity file {path} not found") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


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


def perplexity_of_file(model, tokenizer: Tokenizer, path: Path, *, max_length: int, stride: int,
                       limit: int | None = None, options: ScoringOptions | None = None) -> PerplexityResult:
    texts = read_text_documents(path)
    if limit is not None:
        texts = texts[:limit]
    if not any(t.strip() for t in texts):
        raise UserError(f"{path} holds no text to score (an empty perplexity file?)")
    return perplexity_of_texts(model, tokenizer, texts, max_length=max_length, stride=stride, options=options)

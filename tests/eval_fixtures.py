"""Shared builders for the evaluation tests: a tokenizer trained at test time on the shared text, a random tiny Gemma2
saved as a Hugging Face directory with it, and lm-eval's log-likelihood rule written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.helpers import random_model_dir, train_tiny_tokenizer


def train_tokenizer(out: Path, *, vocab_size: int = 512) -> Path:
    """A byte-fallback BPE SentencePiece model with Gemma's special ids (pad 0, EOS 1, BOS 2), English + Lithuanian."""
    text = "".join((SHARED_DATA / "text" / name).read_text()[:60_000] for name in ("en_ewt.txt", "lt_news.txt"))
    return train_tiny_tokenizer(out, text, vocab_size=vocab_size, model_type="bpe", add_dummy_prefix=False,
                                character_coverage=0.995, split_digits=True, remove_extra_whitespaces=False,
                                normalization_rule_name="identity", allow_whitespace_only_pieces=True)


def make_model_dir(root: Path, *, seed: int = 0, **config) -> Path:
    """A random tiny Gemma2 directory with `train_tokenizer`'s tokenizer (skips without the shared data)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return random_model_dir(root / "model", tokenizer=train_tokenizer(root / "tokenizer.model"), seed=seed, **config)


def hand_loglikelihood(model, sp, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's HFLM rule, by hand: trailing context whitespace joins the continuation, context+continuation is
    encoded whole and split at the encoded context's length, BOS first; one unpacked forward of the full model."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = [model.config.bos_token_id] + (sp.encode(context) if context else [])
    cont = sp.encode(context + continuation)[len(ctx) - 1:] if context else sp.encode(continuation)
    ids = torch.tensor(ctx + cont)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)
    picked = [logprobs[len(ctx) - 1 + k] for k in range(len(cont))]
    total = sum(float(row[t]) for row, t in zip(picked, cont))
    greedy = all(int(row.argmax()) == t for row, t in zip(picked, cont))
    return total, greedy

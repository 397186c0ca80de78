"""Shared builders for tests: random Gemma2 models (and model directories), their transformers twins, tiny
SentencePiece tokenizers, token stores."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Iterable

import torch

from trainer.hf import config_to_hf, save_pretrained, to_hf_name
from trainer.model import Gemma2, Gemma2Config

GEMMA_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}


def random_model(config: Gemma2Config, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                 attention_backend: str = "eager", norm_std: float = 0.3) -> Gemma2:
    """A Gemma2 with random weights, norms included (zero norm weights would hide a wrong (1 + w))."""
    g = torch.Generator().manual_seed(seed)
    model = Gemma2(config, attention_backend=attention_backend)
    model.init_weights(std=0.05, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, norm_std, generator=g)
    return model.to(dtype).eval()


def random_model_dir(path: str | os.PathLike, *, tokenizer: str | os.PathLike, seed: int = 0,
                     **config) -> Path:
    """A random tiny Gemma2 (`small_config(**config)`) saved in float32 as a Hugging Face directory with
    `tokenizer` as its tokenizer.model."""
    model = random_model(small_config(**config), seed=seed)
    return save_pretrained(model, path, dtype=torch.float32, tokenizer=tokenizer)


def train_tiny_tokenizer(path: str | os.PathLike, text: str | Iterable[str], *, vocab_size: int,
                         model_type: str = "unigram", byte_fallback: bool = True, **options) -> Path:
    """Train a small SentencePiece model on `text` (a string, split into lines, or the lines) and write it to `path`.

    Gemma's special ids (pad 0, EOS 1, BOS 2, unk 3) unless `options` names others; `options` are further
    SentencePieceTrainer options (add_dummy_prefix=False, user_defined_symbols=[...], ...).
    """
    import sentencepiece as spm

    lines = text.splitlines() if isinstance(text, str) else text
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size,
                                   model_type=model_type, byte_fallback=byte_fallback, minloglevel=2,
                                   **{**GEMMA_SPECIAL_IDS, **options})
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path


def hf_twin(model: Gemma2):
    """transformers' Gemma2ForCausalLM (eager attention) holding exactly `model`'s weights, same dtype."""
    from transformers import Gemma2Config as HFConfig, Gemma2ForCausalLM

    raw = config_to_hf(model.config)
    raw.pop("architectures"), raw.pop("model_type"), raw.pop("torch_dtype")
    hf = Gemma2ForCausalLM(HFConfig(**raw, attn_implementation="eager"))
    dtype = next(model.parameters()).dtype
    hf = hf.to(dtype)
    missing, unexpected = hf.load_state_dict({to_hf_name(n): p.detach().clone() for n, p in model.named_parameters()},
                                             strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    return hf.eval()


def small_config(**overrides) -> Gemma2Config:
    return dataclasses.replace(Gemma2Config.preset("tiny"), **overrides)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def write_token_store(path, documents, *, vocab_size: int, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0,
                      tokenizer_sha256: str = "synthetic-test-tokenizer", shard_tokens: int | None = None):
    """A token store holding `documents` (lists/arrays of token ids), as `gemma-ewc tokenize` would write it."""
    import numpy as np

    from trainer.data.store import DEFAULT_SHARD_TOKENS, StoreWriter
    from trainer.fileio import atomic_path

    docs = [np.asarray(d, dtype=np.uint32) for d in documents]
    with atomic_path(path, is_dir=True) as tmp:
        writer = StoreWriter(tmp, shard_tokens=shard_tokens or DEFAULT_SHARD_TOKENS)
        writer.add(np.concatenate(docs) if docs else np.zeros(0, np.uint32), np.array([len(d) for d in docs]))
        writer.finish(tokenizer={"file": "synthetic.model", "sha256": tokenizer_sha256, "vocab_size": vocab_size,
                                 "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id})
    return path


def random_documents(n: int, *, vocab_size: int, seed: int = 0, mean_length: int = 40):
    """Documents of random lengths with a learnable structure (each token mostly follows from the previous)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(1, 2 * mean_length))
        start = int(rng.integers(3, vocab_size))
        steps = rng.choice([1, 2, 3], size=length, p=[0.7, 0.2, 0.1])
        docs.append(3 + (start + np.cumsum(steps)) % (vocab_size - 3))
    return docs

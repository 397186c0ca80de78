"""Shared builders for tests: random Gemma2 models and their transformers twins."""

from __future__ import annotations

import dataclasses

import torch

from trainer.hf import config_to_hf, to_hf_name
from trainer.model import Gemma2, Gemma2Config


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
                      tokenizer_sha256: str = "synthetic-test-tokenizer"):
    """A token store holding `documents` (lists/arrays of token ids), as `gemma-ewc tokenize` would write it."""
    import numpy as np

    from trainer.data.store import StoreWriter
    from trainer.fileio import atomic_path

    docs = [np.asarray(d, dtype=np.uint32) for d in documents]
    with atomic_path(path, is_dir=True) as tmp:
        writer = StoreWriter(tmp)
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

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

"""The attention backends behind one call: selection, errors, and the flash-attn varlen mapping."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tests.helpers import random_model, rel_err, small_config
from trainer import attention as attn


def test_auto_picks_eager_on_cpu_and_unknown_names_list_choices():
    assert attn.resolve_backend("auto", "cpu") == "eager"
    with pytest.raises(ValueError, match="choose 'auto' or one of"):
        attn.resolve_backend("sdpa", "cpu")


def test_document_ids_restart_at_every_zero_position():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0, 0, 1]])
    assert attn.document_ids(pos).tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]


def test_eager_mask_is_causal_same_document_and_windowed():
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    masks = attn.build_masks(pos, backend="eager", sliding_window=2)
    full, sliding = ~masks.full[0, 0, 0], ~masks.sliding[0, 0, 0]  # stored as "masked out"
    for q in range(8):
        for k in range(8):
            same = (q < 5) == (k < 5)
            assert full[q, k] == (k <= q and same)
            assert sliding[q, k] == (k <= q and same and q - k < 2)


def test_flex_has_no_cpu_backward_and_says_what_to_use():
    model = random_model(small_config(num_layers=1), attention_backend="flex").train()
    with pytest.raises(RuntimeError, match="attention backend 'eager'"):
        model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()


def test_flash_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    model = random_model(small_config(num_layers=1), attention_backend="flash")
    with pytest.raises(ImportError, match=r"gemma-ewc\[flash\]"):
        model(torch.zeros(1, 8, dtype=torch.long))


def _fake_flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, causal, window_size, softcap):
    """flash-attn's documented semantics, written plainly: per sequence, keys j with i - left <= j <= i + right."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    left, right = window_size
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = q[s:e], k[s:e].repeat_interleave(group, 1), v[s:e].repeat_interleave(group, 1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * softmax_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(e - s)[:, None]
        j = torch.arange(e - s)[None, :]
        allowed = j <= i
        if left >= 0:
            allowed &= j >= i - left
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs)
    return out


def test_flash_varlen_arguments_reproduce_eager(monkeypatch, seed):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_varlen_func=_fake_flash_attn_varlen))
    config = small_config(sliding_window=4)
    model = random_model(config, seed=seed)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    pos = torch.stack([torch.cat([torch.arange(3, 10), torch.arange(13)]), torch.arange(20)])
    with torch.no_grad():
        eager = model(ids, position_ids=pos)
        model.attention_backend = "flash"
        flash = model(ids, position_ids=pos)
    assert rel_err(flash, eager) <= 1e-5

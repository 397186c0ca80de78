"""Attention over packed rows: one call, three backends.

A row holds several documents; `position_ids` restart at 0 at each document start. A query attends to a key when
the key is not in the future, lies in the same document, and (on sliding-window layers) is fewer than
`sliding_window` tokens back (transformers' rule: kv > q - window).

- "eager": the reference. An explicit boolean mask, soft-capped scores, grouped KV heads without copying K/V.
  Forward and backward anywhere; memory O(S^2) per head, so for tests, CPU and evaluation.
- "flex": FlexAttention (compiled on CUDA) with the soft-cap as a score modification and block masks built once per
  batch from `position_ids`, one for the sliding and one for the global layers.
- "flash": flash-attn's varlen kernel (softcap, window) with cu_seqlens derived from `position_ids`; the package is
  imported only when chosen.

Masks are built once per batch by `build_masks` and shared by every layer of the same kind.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

BACKENDS = ("eager", "flex", "flash")


@dataclass
class AttentionMasks:
    backend: str
    full: Any = None  # eager: bool [B, 1, 1, Sq, T], True = masked out; flex: BlockMask
    sliding: Any = None
    sliding_window: int = 0
    cu_seqlens: torch.Tensor | None = None  # flash: int32 [num_docs + 1] over the flattened rows
    max_seqlen: int = 0


def resolve_backend(name: str, device: torch.device | str) -> str:
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "eager"
        return "flash" if importlib.util.find_spec("flash_attn") is not None else "flex"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of {BACKENDS}")
    return name


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> bool [B, S], True where an attention segment begins: at every position 0 (a document starts)
    and at every row start (a row that begins mid-document still begins a segment: it sees nothing before it).

    The one reading of the packed-row layout: masks, RoPE offsets and FLOP counts all derive from it.
    """
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] segment index within each row, from 0 (see `segment_starts`)."""
    return segment_starts(position_ids).cumsum(dim=1) - 1


def segment_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] -> int64 [num_segments + 1]: where each segment starts in the flattened rows, then B * S
    (flash-attn's cu_seqlens)."""
    starts = segment_starts(position_ids).reshape(-1).nonzero().squeeze(1)
    return torch.cat([starts, starts.new_tensor([position_ids.numel()])])


def build_masks(position_ids: torch.Tensor, *, backend: str, sliding_window: int) -> AttentionMasks:
    backend = resolve_backend(backend, position_ids.device)
    if backend == "eager":
        doc = document_ids(position_ids)
        index = torch.arange(position_ids.shape[1], device=position_ids.device)
        return eager_masks(doc, doc, index, index, sliding_window=sliding_window)
    if backend == "flex":
        return _flex_masks(position_ids, sliding_window)
    return _flash_masks(position_ids, sliding_window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: AttentionMasks, *, sliding: bool,
           scale: float, softcap: float | None) -> torch.Tensor:
    """q [B, Sq, H, D], k and v [B, T, Hkv, D] -> [B, Sq, H, D]."""
    if masks.backend == "eager":
        return eager_attention(q, k, v, masks.sliding if sliding else masks.full, scale=scale, softcap=softcap)
    if masks.backend == "flex":
        return _flex_attention(q, k, v, masks.sliding if sliding else masks.full, scale=scale, softcap=softcap)
    return _flash_attention(q, k, v, masks, sliding=sliding, scale=scale, softcap=softcap)


# ---------------------------------------------------------------------------------------------------------- eager

def eager_masks(query_doc: torch.Tensor, key_doc: torch.Tensor, query_index: torch.Tensor,
                key_index: torch.Tensor, *, sliding_window: int) -> AttentionMasks:
    """Boolean masks from document ids ([B, Sq], [B, T]) and token indices within the row ([Sq], [T])."""
    causal = key_index[None, :] <= query_index[:, None]  # [Sq, T]
    full = (query_doc[:, :, None] == key_doc[:, None, :]) & causal  # [B, Sq, T]
    sliding = full & ((query_index[:, None] - key_index[None, :]) < sliding_window)
    # Stored inverted (True = masked out): every layer fills those scores in place, without negating again.
    return AttentionMasks("eager", full=~full[:, None, None], sliding=~sliding[:, None, None],
                          sliding_window=sliding_window)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked_out: torch.Tensor, *, scale: float,
                    softcap: float | None) -> torch.Tensor:
    """`masked_out` [B, 1, 1, Sq, T]: True where a query must not see a key."""
    B, S, H, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv  # query heads per KV head; query head h uses KV head h // G (transformers' repeat_kv order)
    # The G query heads of a KV head are folded into the query length, so K and V are used as they are (no copy
    # per query head) and every product is a plain batched matmul.
    qg = q.view(B, S, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, D)
    scores = (qg @ k.permute(0, 2, 3, 1)).view(B, Hkv, G, S, T) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    # In place: neither the product nor the soft-cap saves its output for backward.
    scores = scores.masked_fill_(masked_out, float("-inf"))
    # float32 softmax under low-precision compute (as transformers); float64 stays float64.
    probs = torch.softmax(scores, dim=-1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    out = probs.to(q.dtype).view(B, Hkv, G * S, T) @ v.permute(0, 2, 1, 3)  # [B, Hkv, G * S, D]
    return out.view(B, Hkv, G, S, D).permute(0, 3, 1, 2, 4).reshape(B, S, H, D)


# ----------------------------------------------------------------------------------------------------------- flex

def _flex_masks(position_ids: torch.Tensor, sliding_window: int) -> AttentionMasks:
    B, S = position_ids.shape
    doc = document_ids(position_ids)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return same_document_causal(b, h, q_idx, kv_idx) & (q_idx - kv_idx < sliding_window)

    device = position_ids.device
    full = create_block_mask(same_document_causal, B, None, S, S, device=device)
    sliding = full if sliding_window >= S else create_block_mask(sliding_window_mask, B, None, S, S, device=device)
    return AttentionMasks("flex", full=full, sliding=sliding, sliding_window=sliding_window)


def _make_softcap_score_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


# One function object per cap value, so that the compiled flex_attention of an eager block is not re-traced for every
# call (inside a compiled block a fresh one is traced inline: no cache, which dynamo would only warn about).
_softcap_score_mod = functools.lru_cache(maxsize=None)(_make_softcap_score_mod)


def raise_recompile_limit(limit: int = 64) -> None:
    """Let one compiled function hold `limit` graphs: every decoder block shares one code object (and the eager
    flex_attention one compiled function), so each batch shape x block kind (sliding, global) x checkpointing class
    x grad mode is an entry of ONE cache, and past dynamo's default of 8 the rest would silently run uncompiled."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, block_mask, *, scale: float, softcap: float | None) -> torch.Tensor:
    score_mod = None
    if torch.compiler.is_compiling():  # a compiled decoder block: inductor generates the kernel within its graph
        flex = flex_attention
        if softcap:
            score_mod = _make_softcap_score_mod(float(softcap))
    else:
        if q.device.type == "cuda":
            flex = _compiled_flex_attention()
        else:
            if torch.is_grad_enabled() and q.requires_grad:
                raise RuntimeError("the 'flex' attention backend has no backward pass on CPU; train on CPU with "
                                   "attention backend 'eager'")
            flex = flex_attention
        if softcap:
            score_mod = _softcap_score_mod(float(softcap))
    out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
               block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------- flash

def _flash_masks(position_ids: torch.Tensor, sliding_window: int) -> AttentionMasks:
    cu_seqlens = segment_offsets(position_ids).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync per batch, shared by all layers
    return AttentionMasks("flash", sliding_window=sliding_window, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _flash_attention(q, k, v, masks: AttentionMasks, *, sliding: bool, scale: float,
                     softcap: float | None) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise ImportError("attention backend 'flash' needs the flash-attn package (CUDA only): "
                          "pip install 'gemma-ewc[flash]', or choose attention backend 'flex'") from exc
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    # flash-attn's window (left, right) admits keys in [i - left, i + right]; ours admits i - j < window.
    window = (masks.sliding_window - 1, 0) if sliding else (-1, -1)
    out = flash_attn_varlen_func(q.reshape(B * S, H, D), k.reshape(B * S, Hkv, D), v.reshape(B * S, Hkv, D),
                                 masks.cu_seqlens, masks.cu_seqlens, masks.max_seqlen, masks.max_seqlen,
                                 softmax_scale=scale, causal=True, window_size=window, softcap=softcap or 0.0)
    return out.view(B, S, H, D)

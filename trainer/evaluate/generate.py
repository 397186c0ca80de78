"""Greedy generation with the KV cache: batched, left-padded prompts, stop strings, EOS.

Prompts are sorted by length and decoded `batch_size` at a time. A batch is left-padded to its longest prompt
(`KVCache(pad_lengths=...)` keeps the padding out of attention and starts every row's positions at its first real
token), prefilled in one forward pass, then extended one token per step. Only the last position goes through
the LM head (float32 logits, as in scoring). A row stops at EOS, at any stop string in its decoded text, or after
`max_new_tokens`; the batch stops when every row has.

A prompt longer than `max_length - max_new_tokens` keeps its last tokens (lm-eval's rule).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from trainer.model import KVCache


@dataclass
class Generation:
    tokens: list[int]      # generated tokens, EOS excluded
    text: str              # decoded, cut before the first stop string
    prompt_truncated: bool


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, max_length: int,
                    stop: Sequence[str] = (), batch_size: int = 8, progress: bool = False) -> list[Generation]:
    """Greedy continuations of tokenized prompts (each starting with BOS), in input order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the context length ({max_length})")
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    eos, pad = model.config.eos_token_id, tokenizer.pad_id
    keep = max_length - max_new_tokens
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", file=sys.stderr, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [list(prompts[i])[-keep:] for i in chunk]
        if any(len(r) == 0 for r in rows):
            raise ValueError("an empty prompt cannot be continued (it needs at least BOS)")
        width = max(len(r) for r in rows)
        pads = torch.tensor([width - len(r) for r in rows])
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        cache = KVCache(model.config, batch_size=len(rows), max_length=width + max_new_tokens, dtype=dtype,
                        device=device, pad_lengths=pads)
        hidden = model.hidden_states(ids, kv_cache=cache)[:, -1]
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in range(max_new_tokens):
            nxt = model.lm_head(hidden, logits_dtype=torch.float32).argmax(dim=-1)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t == eos:
                    done[b] = True
                    continue
                out[b].append(t)
                if stop:
                    text = tokenizer.decode(out[b])
                    done[b] = any(s in text for s in stop if s)
            if all(done) or step == max_new_tokens - 1:
                break
            hidden = model.hidden_states(nxt[:, None], kv_cache=cache)[:, -1]
        for b, i in enumerate(chunk):
            text = cut_at_stop(tokenizer.decode(out[b]), stop)
            results[i] = Generation(out[b], text, len(prompts[i]) > keep)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]

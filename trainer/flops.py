"""Model FLOPs per token and the device peak they are compared against (MFU).

Training FLOPs per token = 3 x forward (backward is twice the forward): 6·N for the matrix multiplications of the N
parameters that multiply activations (the tied embedding counts once, as the LM head; norms are elementwise) plus
the attention scores and the weighted sum of values, counted exactly: query i of a document attends to
min(i + 1, window) keys on sliding-window layers and to i + 1 keys on global layers, never across documents.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import torch

from trainer.attention import segment_offsets

# Dense peak FLOP/s by device-name fragment, from the vendors' datasheets (SXM parts; bfloat16 / float16).
_GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12, "4090": 165e12,
}


def matmul_params(config) -> int:
    """Parameters that multiply activations per token: every projection plus the tied LM head."""
    return config.num_parameters() - (4 * config.num_layers + 1) * config.hidden_size


def keys_attended(doc_length: int, window: int | None) -> int:
    """Sum over the queries of one document of the keys each attends to."""
    n = doc_length
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def training_flops_per_token(config, seq_len: int, *, doc_lengths: Sequence[int] | None = None) -> float:
    """FLOPs of forward + backward per trained token for rows of `seq_len` tokens.

    `doc_lengths`: lengths of the documents in a row (sum = seq_len); default one document per row.
    """
    docs = list(doc_lengths) if doc_lengths is not None else [seq_len]
    if sum(docs) != seq_len:
        raise ValueError(f"document lengths sum to {sum(docs)}, not seq_len {seq_len}")
    keys = 0
    for layer in range(config.num_layers):
        window = config.sliding_window if config.is_sliding(layer) else None
        keys += sum(keys_attended(n, window) for n in docs)
    # Per key and head: q·k (2·head_dim) and p·v (2·head_dim) in the forward pass.
    attention_forward = 4 * config.num_heads * config.head_dim * keys / seq_len
    return 6 * matmul_params(config) + 3 * attention_forward


@functools.lru_cache(maxsize=None)
def device_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from). GPUs: datasheet dense peak; otherwise a measured matmul rate."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_properties(dev).name
        for fragment, peak in _GPU_PEAK_BF16.items():
            if fragment in name:
                scale = 1.0 if dtype in (torch.bfloat16, torch.float16) else 0.5  # TF32 is half the bf16 rate
                return peak * scale, f"datasheet dense peak of {name}"
    return _measured_matmul_flops(dev, dtype), f"measured {dtype} matmul rate on {dev.type}"


def _measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 10
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def segment_lengths(position_ids: torch.Tensor) -> "list[int]":
    """Lengths of the attention segments of packed rows (trainer.attention.segment_starts)."""
    return segment_offsets(position_ids).diff().tolist()


def batch_flops_per_token(config, position_ids: torch.Tensor) -> float:
    """training_flops_per_token for a packed batch [B, S], vectorised over its segments."""
    lengths = torch.tensor(segment_lengths(position_ids.cpu()), dtype=torch.float64)
    tokens = float(lengths.sum())
    full = lengths * (lengths + 1) / 2
    keys = 0.0
    for layer in range(config.num_layers):
        if config.is_sliding(layer):
            w = float(config.sliding_window)
            keys += float(torch.where(lengths <= w, full, w * (w + 1) / 2 + (lengths - w) * w).sum())
        else:
            keys += float(full.sum())
    return 6 * matmul_params(config) + 3 * 4 * config.num_heads * config.head_dim * keys / tokens

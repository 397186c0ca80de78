"""Torch dtypes by the names that configs, command lines, results and files use ("float32", "bfloat16", ...)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def compute_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """The dtype called `name`; None or "auto": bfloat16 on CUDA, float32 elsewhere."""
    if name is None or name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]

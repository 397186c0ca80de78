"""pytest-benchmark view of `gemma-ewc bench optimizer` (same parameter sets and variants, from bench/optimizer.py).

    python -m pytest bench/test_bench_optimizer.py --benchmark-group-by=group
    GEMMA_EWC_BENCH_ELEMENTS=64M GEMMA_EWC_BENCH_DEVICE=cuda python -m pytest bench/test_bench_optimizer.py

Each group (one size and F/anchor dtype) holds the variants (a) to (d0) side by side; compare the means within a
group. Not part of the test suite (tests/ holds the correctness tests).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.common import synchronize
from bench.optimizer import VARIANTS, ParamSet, make_variants, needed_bytes, parse_size, transformer_shapes

ELEMENTS = parse_size(os.environ.get("GEMMA_EWC_BENCH_ELEMENTS", "8M"))
DEVICE = os.environ.get("GEMMA_EWC_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def param_set(request):
    return ParamSet(transformer_shapes(ELEMENTS), device=DEVICE, ewc_dtype=getattr(torch, request.param))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_optimizer_step(benchmark, param_set, variant):
    step = make_variants(param_set, [variant])[variant]

    def run():
        step()
        synchronize(DEVICE)

    ewc_dtype = param_set.fisher[0].dtype
    benchmark.group = f"optimizer step, {param_set.numel / 2**20:.1f}M elements, F/anchor {ewc_dtype}, {DEVICE}"
    benchmark.extra_info["bytes_needed"] = needed_bytes(param_set.numel, None if variant in ("a", "d0") else ewc_dtype)
    benchmark.pedantic(run, warmup_rounds=2, rounds=10, iterations=1)

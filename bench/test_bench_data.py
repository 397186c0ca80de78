"""pytest-benchmark view of the data path (not part of the test run: `python -m pytest bench/test_bench_data.py`).

Packing a batch next to copying the same bytes, on a synthetic store of log-normal documents (median ~370
tokens). The full comparison, with tokenization, is `gemma-ewc bench data`.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.packing import TokenSource, epoch_layout, pack_range

SEQ_LEN, BATCH = 2048, 8


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, rng.lognormal(np.log(600) - 0.5, 1.0, size=100_000).astype(np.int64))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(3, 256_000, size=int(offsets[-1]), dtype=np.uint32)
    layout = epoch_layout(lengths, SEQ_LEN, rng.permutation(len(lengths)))
    return TokenSource([tokens], np.array([0, len(tokens)]), offsets), layout


def test_pack_batch(benchmark, source):
    src, layout = source
    rows = layout.num_rows - BATCH - 1
    state = {"i": 0}

    def pack():
        state["i"] = (state["i"] + BATCH) % rows
        return pack_range(src, layout, state["i"], BATCH, bos_id=2, eos_id=1, pad_id=0)

    out = benchmark(pack)
    assert out["input_ids"].shape == (BATCH, SEQ_LEN)


def test_copy_same_bytes(benchmark):
    n = BATCH * SEQ_LEN
    big = np.ones(64 << 20, dtype=np.int64)
    state = {"o": 0}

    def copy():
        state["o"] = (state["o"] + 3 * n) % (len(big) - 3 * n)
        o = state["o"]
        outs = [np.empty((BATCH, SEQ_LEN), dtype=np.int64) for _ in range(3)]
        for j, dst in enumerate(outs):
            np.copyto(dst.reshape(-1), big[o + j * n:o + (j + 1) * n])
        return outs

    benchmark(copy)

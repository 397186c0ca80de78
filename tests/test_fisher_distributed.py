"""Two gloo ranks with FSDP2: the sharded Fisher equals the single-process one; the file is written from shards
and read back into shards (each rank only its rows, uneven shards included)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import random_model, rel_err, small_config
from trainer.distributed import local_index
from trainer.errors import UserError
from trainer.ewc import estimate_fisher, fisher_divisor, load_ewc, write_ewc
from trainer.ewc.batches import row_batches
from trainer.hf import named_hf_parameters, to_hf_name

# Odd sizes: the embedding (515 rows) and the MLP (99) split unevenly over 2 ranks.
CONFIG = dict(num_layers=2, vocab_size=515, hidden_size=40, intermediate_size=99)
ROWS_PER_BATCH = (3, 1, 2)  # rank 1 gets no row of the second mini-batch: it runs a dummy


def global_rows(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    n, seq = sum(ROWS_PER_BATCH), 12
    labels = g.integers(0, CONFIG["vocab_size"], (n, seq))
    labels[g.random((n, seq)) < 0.3] = -100
    pos = np.concatenate([np.arange(5), np.arange(seq - 5)])[None].repeat(n, 0)
    return {"input_ids": g.integers(0, CONFIG["vocab_size"], (n, seq)), "labels": labels, "position_ids": pos}


def batches(rows, rank=0, world=1):
    start = 0
    for size in ROWS_PER_BATCH:  # uneven mini-batches: row_batches is per fixed size, so one call each
        part = {k: v[start:start + size] for k, v in rows.items()}
        yield from row_batches(part, batch_size=size, pad_id=0, rank=rank, world_size=world)
        start += size


def sharded_fisher(rank, world, out_dir):
    model = random_model(small_config(**CONFIG), dtype=torch.float64, seed=7)
    # The layout of trainer.parallelize (each block, then the root), in float64 end to end (parallelize's policy
    # knows bfloat16/float32 only; the CLI test runs it in float32).
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    fisher = estimate_fisher(model, batches(global_rows(), rank, world))
    names = [to_hf_name(n) for n, _ in model.named_parameters()]
    local = {n: (fisher[n].to_local().clone(), local_index(p)) for n, (_, p) in zip(names, model.named_parameters())}
    assert all(fisher[n].placements == p.placements for n, (_, p) in zip(names, model.named_parameters()))
    divisor = fisher_divisor(fisher, "mean")
    path = Path(out_dir) / "sharded.safetensors"
    write_ewc(path, fisher=fisher, anchor={n: p for n, (_, p) in zip(names, model.named_parameters())},
              metadata={"estimator": "empirical"}, anchor_dtype=torch.float64, fisher_dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_ewc(path, model, strict=True)
    loaded = {n: state[p][0] for n, p in named_hf_parameters(model)}  # keyed by the model's parameters
    reloaded = all(torch.equal(loaded[n].to_local(), local[n][0]) and loaded[n].placements
                   == fisher[n].placements and loaded[n].shape == fisher[n].shape for n in names)
    with torch.no_grad():  # rank 1 changes one weight of its own shard: both ranks must refuse in strict mode
        if rank == 1:
            model.layers[1].mlp.gate_proj.weight.to_local()[0, 0] += 0.25
    try:
        load_ewc(path, model, strict=True)
        strict_error = None
    except UserError as exc:
        strict_error = str(exc)
    # torch.chunk semantics where rows run out: 1 row over 2 ranks leaves rank 1 an empty shard.
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = fisher[names[0]].device_mesh
    chunks = [local_index(distribute_tensor(torch.zeros(rows, 3), mesh, [Shard(0)]))[0] for rows in (1, 5)]
    return {"local": local, "divisor": divisor, "reloaded": reloaded, "strict_error": strict_error,
            "chunks": [(c.start, c.stop) for c in chunks]}


def tolerance(name: str) -> float:
    return 1e-6 if name.endswith("norm.weight") else 1e-10


@pytest.mark.slow
def test_two_rank_fsdp2_fisher_equals_single_process(tmp_path):
    results = run_distributed(sharded_fisher, world_size=2, args=(str(tmp_path),))
    model = random_model(small_config(**CONFIG), dtype=torch.float64, seed=7)
    single = estimate_fisher(model, batches(global_rows()))
    for n, full in single.items():
        parts = [r["local"][n] for r in results]
        assert parts[0][1][0].stop == parts[1][1][0].start and parts[1][1][0].stop == full.shape[0]
        # RMSNorm computes in float32 even in a float64 model (model.py), and its weight gradient sums over the
        # tokens: split over ranks, that float32 sum rounds differently. Everything else agrees to float64.
        for shard, index in parts:
            assert rel_err(shard, full[index]) < tolerance(n), n
    uneven = [r["local"]["model.embed_tokens.weight"][0].shape[0] for r in results]
    assert uneven == [258, 257]
    assert results[0]["divisor"] == pytest.approx(fisher_divisor(single, "mean"), rel=1e-10)
    on_disk = load_ewc(tmp_path / "sharded.safetensors", model, strict=True)  # gathered file == single process
    params = dict(named_hf_parameters(model))
    for n, full in single.items():
        assert rel_err(on_disk[params[n]][0], full) < tolerance(n), n
    assert all(r["reloaded"] for r in results)
    assert [r["chunks"] for r in results] == [[(0, 1), (0, 3)], [(1, 1), (3, 5)]]
    for r in results:  # both ranks saw rank 1's change (max over ranks) and refused
        assert r["strict_error"] and "largest difference 0.25 in model.layers.1.mlp.gate_proj.weight" in r[
            "strict_error"]

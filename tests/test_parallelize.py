"""FSDP2 (and HSDP) sharding on gloo CPU ranks equals the unsharded model: loss, gradients, loaded weights."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import random_model, small_config
from trainer.config import ParallelConfig
from trainer.model import Gemma2, save_pretrained
from trainer.parallelize import build_mesh, materialize, parallelize


def _batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (4, 24), generator=g)
    labels = torch.randint(0, config.vocab_size, (4, 24), generator=g)
    labels[:, :3] = -100
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(4, 24)
    return ids, labels, pos


def _loss_and_grads(model, ids, labels, pos, scale):
    loss = model(ids, position_ids=pos, labels=labels) * scale
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return loss.detach(), grads


def _sharded(rank, world_size, config_dict, parallel_dict, pretrained):
    config = small_config(**config_dict)
    parallel = ParallelConfig(**parallel_dict)
    mesh = build_mesh(parallel, device_type="cpu")
    with torch.device("meta"):
        model = Gemma2(config, attention_backend="eager")
    parallelize(model, parallel, mesh=mesh)
    materialize(model, device="cpu", pretrained=pretrained, seed=3)
    ids, labels, pos = _batch(config)
    count = (labels != -100).sum()
    part = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    # FSDP averages gradients over ranks; each rank's loss carries world_size / global count.
    loss, grads = _loss_and_grads(model, ids[part], labels[part], pos[part], world_size / count)
    total = loss.clone()
    dist.all_reduce(total)
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    return total / world_size, grads, weights


def _unsharded(config, pretrained=None):
    with torch.device("meta"):
        model = Gemma2(config, attention_backend="eager")
    materialize(model, device="cpu", pretrained=pretrained, seed=3)
    ids, labels, pos = _batch(config)
    loss, grads = _loss_and_grads(model, ids, labels, pos, 1 / (labels != -100).sum())
    return loss, grads, dict(model.named_parameters())


def _compare(sharded_results, reference):
    ref_loss, ref_grads, ref_weights = reference
    for loss, grads, weights in sharded_results:
        assert torch.allclose(loss, ref_loss, rtol=1e-5)
        for name in ref_grads:
            assert torch.equal(weights[name], ref_weights[name].detach()), name
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_fsdp_two_ranks_equal_one_process_with_seeded_init():
    config = small_config(num_layers=2, vocab_size=97)  # 97 rows: an uneven shard
    results = run_distributed(_sharded, world_size=2,
                              args=(dataclasses.asdict(config), {"param_dtype": "float32"}, None))
    _compare(results, _unsharded(config))


def test_hsdp_and_pretrained_shard_by_shard_loading(tmp_path):
    config = small_config(num_layers=2)
    source = random_model(config, seed=11)
    save_pretrained(source, tmp_path / "hf", dtype=torch.float32, max_shard_bytes=50_000)
    parallel = {"param_dtype": "float32", "dp_replicate": 2, "dp_shard": 1}
    results = run_distributed(_sharded, world_size=2,
                              args=(dataclasses.asdict(config), parallel, str(tmp_path / "hf")))
    reference = _unsharded(config, pretrained=str(tmp_path / "hf"))
    for name, p in source.named_parameters():
        assert torch.equal(reference[2][name], p)
    _compare(results, reference)

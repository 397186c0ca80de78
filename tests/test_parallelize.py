"""FSDP2 (and HSDP) sharding on gloo CPU ranks equals the unsharded model: loss, gradients, loaded weights."""

from __future__ import annotations

import collections
import math
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from tests.distributed import run_distributed
from tests.helpers import random_model, small_config
from trainer import parallelize as parallelize_module
from trainer.config import ParallelConfig
from trainer.model import Gemma2, KVCache, save_pretrained
from trainer.parallelize import (CheckpointedDecoderLayer, apply_activation_checkpointing, build_mesh,
                                 build_sharded_model, materialize)


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
    model = build_sharded_model(config, parallel, mesh=build_mesh(parallel, device_type="cpu"), device="cpu",
                                pretrained=pretrained, seed=3, attention_backend="eager")
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


def test_fsdp_with_activation_checkpointing_equals_one_process():
    config = small_config(num_layers=3)
    results = run_distributed(_sharded, world_size=2, args=(dataclasses.asdict(config), {
        "param_dtype": "float32", "activation_checkpointing": "selective"}, None))
    _compare(results, _unsharded(config))


@pytest.mark.parametrize("mode", ["full", "selective", "op"])
def test_activation_checkpointing_keeps_loss_gradients_and_names(mode, seed, monkeypatch):
    config = small_config(num_layers=3)
    model = random_model(config, seed=seed).train()
    ids, labels, pos = _batch(config, seed)
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, position_ids=pos, labels=labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = loss_and_grads()
    recomputed = []
    monkeypatch.setattr(parallelize_module, "checkpoint",
                        lambda fn, *args, **kwargs: recomputed.append(fn) or checkpoint(fn, *args, **kwargs))
    apply_activation_checkpointing(model, mode)
    chosen = [0, 2] if mode == "selective" else [0, 1, 2]
    assert [i for i, layer in enumerate(model.layers) if isinstance(layer, CheckpointedDecoderLayer)] == chosen
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(recomputed) == len(chosen)
    assert torch.equal(loss_plain, loss_ckpt)
    for a, b in zip(grads_plain, grads_ckpt):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # Nothing to recompute without grad, and decoding with a KV cache must not write the cache twice.
    with torch.no_grad():
        model(ids)
    cache = KVCache(config, batch_size=ids.shape[0], max_length=ids.shape[1], dtype=torch.float32, device="cpu")
    model(ids, kv_cache=cache)
    assert len(recomputed) == len(chosen)
    with pytest.raises(ValueError, match="choose one of"):
        apply_activation_checkpointing(random_model(config), "some")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def test_op_level_checkpointing_recomputes_every_other_projection_and_no_attention_product(seed):
    """Op-level selective checkpointing keeps the outputs of the attention products and of every other projection:
    backward re-runs exactly the other projections (3 of a block's 7: k, o, up) and the elementwise work."""
    config = small_config(num_layers=3)
    ids, labels, pos = _batch(config, seed)
    counts = {}
    for mode in ("none", "op"):
        model = apply_activation_checkpointing(random_model(config, seed=seed).train(), mode)
        loss = model(ids, position_ids=pos, labels=labels)
        with _CountOps() as ops:
            loss.backward()
        counts[mode] = ops.counts
    aten = torch.ops.aten
    assert counts["op"][aten.mm.default] - counts["none"][aten.mm.default] == 3 * config.num_layers
    assert counts["op"][aten.bmm.default] == counts["none"][aten.bmm.default]
    assert counts["op"][aten.rsqrt.default] > counts["none"][aten.rsqrt.default]  # the norms are recomputed


def test_checkpointed_blocks_compile_whole(seed):
    """torch.compile traces a checkpointed block in one graph (no break at the checkpoint) and changes nothing;
    aot_eager stands in for inductor, which needs a C++ toolchain on CPU."""
    config = small_config(num_layers=2)
    plain = random_model(config, seed=seed).train()
    compiled = apply_activation_checkpointing(copy.deepcopy(plain), "full")
    for layer in compiled.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    ids, labels, pos = _batch(config, seed)
    results = []
    for model in (plain, compiled):
        loss = model(ids, position_ids=pos, labels=labels)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_plain, grads_plain), (loss_compiled, grads_compiled) = results
    assert torch.allclose(loss_plain, loss_compiled, rtol=1e-6)
    for a, b in zip(grads_plain, grads_compiled):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


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


MICRO_BATCHES, ACCUM_STEPS, GLOBAL_ROWS = 3, 2, 4


def _accumulate(rank, world_size, param_dtype, whole_allowed, seed, replicate=False):
    """ACCUM_STEPS train_steps of MICRO_BATCHES micro-batches each (GLOBAL_ROWS rows split over the ranks), on
    plain FSDP or (`replicate`) HSDP with every rank a replica (dp_shard = 1). Per step: how many block forwards
    found the block's parameters sharded (each such forward gathers them), how many forwards found a sharded
    gradient already there (a reduce after an earlier micro-batch) and how many all-reduces crossed the replicas;
    then the losses and the full weights."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from trainer.optim import EWCAdamW
    from trainer.train import param_groups, train_step

    if not whole_allowed:  # FSDP2's own default: reshard and reduce after every backward
        FSDPModule.set_reshard_after_backward = lambda self, *args, **kwargs: None
        FSDPModule.set_requires_gradient_sync = lambda self, *args, **kwargs: None
    config = small_config(num_layers=2)
    parallel = ParallelConfig(param_dtype=param_dtype, reduce_dtype="float32",
                              **(dict(dp_replicate=world_size, dp_shard=1) if replicate else {}))
    model = build_sharded_model(config, parallel, mesh=build_mesh(parallel, device_type="cpu"), device="cpu",
                                seed=3, attention_backend="eager")
    optimizer = EWCAdamW(param_groups(model, 0.01), lr=1e-3)
    sharded_entries, reduced_entries, replica_all_reduces = [], [], []
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, group=None, **kwargs):
        if group is not None:  # FSDP2's, across the replicas (train_step's own use the default group)
            replica_all_reduces.append(1)
        return original_all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counting_all_reduce
    for layer in model.layers:
        # prepend: runs before FSDP2's own pre-forward hook, which gathers whatever is sharded
        layer.register_forward_pre_hook(
            lambda module, args: sharded_entries.append(isinstance(next(module.parameters()), DTensor)),
            prepend=True)
    shards = [p for group in optimizer.param_groups for p in group["params"]]  # the sharded parameters
    model.register_forward_pre_hook(
        lambda module, args: reduced_entries.append(any(p.grad is not None for p in shards)), prepend=True)
    g = torch.Generator().manual_seed(seed)
    part = slice(rank * GLOBAL_ROWS // world_size, (rank + 1) * GLOBAL_ROWS // world_size)
    losses, gathers, reduces, all_reduces = [], [], [], []
    for _ in range(ACCUM_STEPS):
        micro = []
        for _ in range(MICRO_BATCHES):
            ids = torch.randint(0, config.vocab_size, (GLOBAL_ROWS, 16), generator=g)
            labels = torch.randint(0, config.vocab_size, (GLOBAL_ROWS, 16), generator=g)
            micro.append({"input_ids": ids[part], "labels": labels[part],
                          "position_ids": torch.arange(16).expand(GLOBAL_ROWS // world_size, 16).contiguous()})
        sharded_entries.clear()
        reduced_entries.clear()
        replica_all_reduces.clear()
        result = train_step(model, optimizer, micro, device=torch.device("cpu"), world_size=world_size, clip=1.0,
                            clip_mode="task", defer_replica_all_reduce=replicate and world_size > 1)
        assert result.finite
        losses.append(result.loss)
        gathers.append(sum(sharded_entries))
        reduces.append(sum(reduced_entries))
        all_reduces.append(len(replica_all_reduces))
    dist.all_reduce = original_all_reduce
    # Between steps every parameter is sharded again (the optimizer stepped the shards; nothing stale is kept).
    assert all(isinstance(p, DTensor) for p in model.parameters())
    weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return losses, gathers, reduces, weights, all_reduces


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_one_rank_gathers_and_reduces_once_per_step_and_trains_the_same(param_dtype, seed):
    """With every parameter whole on its rank, train_step keeps the gathered compute-dtype parameters and the
    unreduced float32 gradient sum from one micro-batch to the next: each block gathers once per step instead of
    once per micro-batch and the gradients are reduced after the last only, bit for bit the same training as
    FSDP2's default (the same casts of the same shards, the same float32 sums in the same order)."""
    layers = small_config(num_layers=2).num_layers
    (whole,) = run_distributed(_accumulate, world_size=1, args=(param_dtype, True, seed))
    (plain,) = run_distributed(_accumulate, world_size=1, args=(param_dtype, False, seed))
    assert whole[1] == [layers] * ACCUM_STEPS
    assert plain[1] == [layers * MICRO_BATCHES] * ACCUM_STEPS
    assert whole[2] == [0] * ACCUM_STEPS
    assert plain[2] == [MICRO_BATCHES - 1] * ACCUM_STEPS
    assert whole[0] == plain[0]
    for name, value in plain[3].items():
        assert torch.equal(whole[3][name], value), name


def test_sharded_ranks_gather_and_reduce_for_every_micro_batch(seed):
    """Split over two ranks, keeping gathered parameters or unreduced gradients would hold a whole model per rank:
    not done."""
    layers = small_config(num_layers=2).num_layers
    for losses, gathers, reduces, _, _ in run_distributed(_accumulate, world_size=2, args=("float32", True, seed)):
        assert gathers == [layers * MICRO_BATCHES] * ACCUM_STEPS
        assert reduces == [MICRO_BATCHES - 1] * ACCUM_STEPS
        assert all(math.isfinite(loss) for loss in losses)


def _step_after_a_failed_one(rank, world_size, param_dtype, fail, seed):
    """One train_step of MICRO_BATCHES micro-batches on one rank, after (with `fail`) a step whose last
    micro-batch raised in its forward, after the others had left their gradients unreduced."""
    from trainer.optim import EWCAdamW
    from trainer.train import param_groups, train_step

    config = small_config(num_layers=2)
    parallel = ParallelConfig(param_dtype=param_dtype, reduce_dtype="float32")
    model = build_sharded_model(config, parallel, mesh=build_mesh(parallel, device_type="cpu"), device="cpu",
                                seed=3, attention_backend="eager")
    optimizer = EWCAdamW(param_groups(model, 0.01), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    micro = [{"input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=g),
              "labels": torch.randint(0, config.vocab_size, (2, 16), generator=g),
              "position_ids": torch.arange(16).expand(2, 16).contiguous()} for _ in range(MICRO_BATCHES)]
    if fail:
        bad = dict(micro[-1], labels=micro[-1]["labels"][:, :15])  # labels one position short: the loss raises
        with pytest.raises(ValueError, match="labels shape"):
            train_step(model, optimizer, micro[:-1] + [bad], device=torch.device("cpu"), world_size=1, clip=1.0,
                       clip_mode="task")
    result = train_step(model, optimizer, micro, device=torch.device("cpu"), world_size=1, clip=1.0,
                        clip_mode="task")
    return result.loss, result.grad_norm, {n: p.full_tensor().detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_a_failed_accumulating_step_leaves_nothing_behind(param_dtype, seed):
    """A step that raises part-way (bench goes on after an out-of-memory error) must not leave the gradients its
    first micro-batches kept unreduced: the next step is exactly the step a fresh model takes."""
    (after_failure,) = run_distributed(_step_after_a_failed_one, world_size=1, args=(param_dtype, True, seed))
    (fresh,) = run_distributed(_step_after_a_failed_one, world_size=1, args=(param_dtype, False, seed))
    assert after_failure[:2] == fresh[:2]  # loss and gradient norm
    for name, value in fresh[2].items():
        assert torch.equal(after_failure[2][name], value), name


def test_replicas_keep_gathered_parameters_and_all_reduce_once_per_step(seed):
    """HSDP with dp_shard = 1 (every rank a whole replica, as DDP): the gathered parameters stay between
    micro-batches and the gradients cross the replicas once per step and FSDP group, never per micro-batch; the
    replicas stay identical and train as one process on the whole batch (to float32 rounding of the sums' order)."""
    groups = 1 + small_config(num_layers=2).num_layers
    (single,) = run_distributed(_accumulate, world_size=1, args=("float32", True, seed))
    replicas = run_distributed(_accumulate, world_size=2, args=("float32", True, seed, True))
    for losses, gathers, reduces, weights, all_reduces in replicas:
        assert gathers == [groups - 1] * ACCUM_STEPS  # each block once per step
        assert reduces == [0] * ACCUM_STEPS
        assert all_reduces == [groups] * ACCUM_STEPS
        assert losses == pytest.approx(single[0], rel=1e-5)
        for name, value in single[3].items():
            assert torch.equal(weights[name], replicas[0][3][name]), f"the replicas differ in {name}"
            # Adam moves an element whose gradient is at rounding level by up to lr either way (tests/test_hsdp.py)
            assert (weights[name] - value).abs().max().item() <= 0.1 * 1e-3, name

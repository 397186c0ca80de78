"""HSDP on a 2 x 2 mesh (4 CPU processes, gloo) equals one process: train_step with EWCAdamW and a real EWC file.

The parameters are (Replicate(), Shard(0)) on the mesh ("dp_replicate", "dp_shard"): each is split over dp_shard
and held twice, once per replica. Partial sums over the local shards (EWC penalty, gradient norms, drift, the
Fisher's mean) must then reduce over dp_shard only; reducing them over dp_replicate as well counts every shard
twice. Each such quantity is compared to the single-process run by its ratio, which names that mistake.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import rel_err

REPLICATE, SHARD = 2, 2
WORLD = REPLICATE * SHARD
STEPS, ROWS, SEQ = 3, 8, 40  # global batch: 8 rows, each rank a distinct quarter (2 rows)
MODEL_SEED = 5  # the seeded initialisation (trainer.parallelize.initial_value); F, anchor and data follow `seed`
EWC_LAMBDA = 0.2  # Fisher normalised to mean 1, anchor ~0.02 away: EWC gradient norm ~ the data gradient's (~2)
CLIP = 0.5  # below the data gradient's norm (~1.5) and the data + EWC one (~3): the clip is active in both modes
# (EWC mode, clip mode): the coupled step clipped on data + EWC gradient (the "total" norm pass reads p, g, F and
# the anchor), and the decoupled step clipped on the data gradient alone (the "task" pass reads g only)
MODES = (("coupled", "total"), ("decoupled", "task"))
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)

# float32 throughout. The sharded run reduces the gradient in another order (reduce-scatter over dp_shard, then
# all-reduce over dp_replicate, of per-quarter sums) and sums the penalty and norms per shard, so the two runs agree
# to float32 rounding, amplified by three Adam steps, never bitwise. A reduction over the wrong mesh dimensions is
# off by 2x (sums) or 1.41x (norms). Observed over 7 seeds, both modes: loss <= 1.6e-7, norms, penalty and drift
# <= 1.6e-6 (relative); weight matrices <= 2.1e-5 by norm; single elements up to 0.023 lr (see PARAM_MAX_LR).
LOSS_RTOL = 1e-5  # relative, the global mean token loss per step
NORM_RTOL = 3e-5  # relative, per step: task/total gradient norms, penalty, EWC gradient norm, drift sums per block
PARAM_RTOL = 1e-4  # final weight matrices: ||a - b|| / ||b|| per tensor
# Every final parameter elementwise, as a fraction of lr (as tests/test_train.py): Adam divides each element's
# gradient by its own running RMS, so an element whose gradient is at rounding level moves by up to lr in a direction
# the summation order decides. A few dozen of the 230k elements differ by more than 0.001 lr, about one by more than
# 0.01 lr; a norm weight (zero at the start, a few lr after three steps) has too small a norm for a by-norm bound.
PARAM_MAX_LR = 0.1


def _parallel():
    from trainer.config import ParallelConfig

    return ParallelConfig(dp_replicate=REPLICATE, dp_shard=SHARD, param_dtype="float32", reduce_dtype="float32",
                          device="cpu")


def _config():
    from trainer.model import Gemma2Config

    return Gemma2Config.preset("tiny")


def _global_batches(seed: int, vocab_size: int) -> list[dict]:
    """STEPS global batches of packed rows: documents restart positions inside a row, and a varying number of
    leading labels is ignored per row, so the ranks' quarters score different numbers of tokens."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab_size, (ROWS, SEQ), generator=g)
        labels = torch.randint(0, vocab_size, (ROWS, SEQ), generator=g)
        pos = torch.empty(ROWS, SEQ, dtype=torch.int64)
        for r in range(ROWS):
            cut = int(torch.randint(4, SEQ - 4, (), generator=g))
            pos[r] = torch.cat([torch.arange(cut), torch.arange(SEQ - cut)])
            labels[r, :int(torch.randint(0, 12, (), generator=g))] = -100
        batches.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return batches


def _write_ewc_file(path, seed: int) -> None:
    """A real EWC file: positive random Fisher (spread over two orders of magnitude), anchor = the run's seeded
    initial weights moved by noise of the weights' own scale (norm weights start at 0: moved too)."""
    from trainer.ewc import write_ewc
    from trainer.hf import to_hf_name
    from trainer.model import Gemma2
    from trainer.parallelize import initial_value

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Gemma2(_config()).named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    fisher, anchor = {}, {}
    for n, s in shapes.items():
        fisher[to_hf_name(n)] = torch.rand(s, generator=g).mul_(4.6).exp_()  # 1 .. 100
        anchor[to_hf_name(n)] = initial_value(n, s, seed=MODEL_SEED) + 0.02 * torch.randn(s, generator=g)
    write_ewc(path, fisher=fisher, anchor=anchor, metadata={"estimator": "test"}, anchor_dtype=torch.float32)


def _train(rank: int, world_size: int, ewc_path: str, seed: int) -> dict:
    """One process (world_size 1: a plain, unsharded model) or one HSDP rank: a fresh model per EWC mode."""
    return {mode: _train_mode(rank, world_size, ewc_path, seed, mode, clip_mode) for mode, clip_mode in MODES}


def _train_mode(rank: int, world_size: int, ewc_path: str, seed: int, mode: str, clip_mode: str) -> dict:
    """Build the model, load the EWC file, train STEPS steps with train_step, and report what each step measured
    plus the final full parameters."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from trainer.config import load_config
    from trainer.model import Gemma2
    from trainer.optim import EWCAdamW
    from trainer.parallelize import build_mesh, build_sharded_model, materialize
    from trainer.train import attach_ewc, drift_buckets, param_groups, train_step

    config = _config()
    device = torch.device("cpu")
    if world_size == 1:
        with torch.device("meta"):
            model = Gemma2(config, attention_backend="eager")
        materialize(model, device=device, seed=MODEL_SEED)
    else:
        model = build_sharded_model(config, _parallel(), mesh=build_mesh(_parallel(), device_type="cpu"),
                                    device=device, seed=MODEL_SEED, attention_backend="eager")
    model.train()
    optimizer = EWCAdamW(param_groups(model, HYPER["weight_decay"]), **HYPER)
    # The trainer's own path: attach_ewc reads this rank's rows of the file as DTensors placed like the parameters
    # (set_ewc_state refuses any other placement), with the Fisher normalised to its global mean.
    train_config = load_config(None, [f"ewc.file='{ewc_path}'", f"ewc.lambda={EWC_LAMBDA}", f"ewc.mode='{mode}'",
                                      f"ewc.clip='{clip_mode}'", "ewc.fisher_normalize='mean'",
                                      "ewc.fisher_dtype='float32'", "ewc.anchor_dtype='float32'"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = attach_ewc(train_config, model, optimizer)
    anchor_warned = any("anchor differs" in str(w.message) for w in caught)
    optimizer.set_drift_buckets(*drift_buckets(model))

    placements = set()
    if world_size > 1:
        mesh = next(model.parameters()).device_mesh
        assert all(isinstance(p, DTensor) and p.device_mesh is mesh for p in model.parameters())
        placements = {tuple(p.placements) for p in model.parameters()}
        mesh_info = (tuple(mesh.mesh_dim_names), tuple(mesh.shape), mesh.get_coordinate())
    else:
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        mesh_info = None

    batches = _global_batches(seed, config.vocab_size)
    quarter = ROWS // world_size  # one process: the whole global batch
    # Decoupled mode on HSDP: two micro-batches per step, reduce-scattered after each but all-reduced across the
    # replicas only after the last (train_step's defer_replica_all_reduce); counted below.
    accumulate = world_size > 1 and mode == "decoupled"
    replica_all_reduces = []
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, group=None, **kwargs):
        if group is not None and dist.get_world_size(group) == REPLICATE and world_size > 1:
            replica_all_reduces[-1] += 1
        return original_all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counting_all_reduce
    steps = []
    try:
        for batch in batches:
            part = {k: v[rank * quarter:(rank + 1) * quarter] for k, v in batch.items()}
            micro = ([{k: v[i:i + 1] for k, v in part.items()} for i in range(quarter)] if accumulate else [part])
            replica_all_reduces.append(0)
            result = train_step(model, optimizer, micro, device=device, world_size=world_size, clip=CLIP,
                                clip_mode=clip_mode, defer_replica_all_reduce=world_size > 1)
            steps.append(_measured(result, optimizer))
    finally:
        dist.all_reduce = original_all_reduce

    params = {}
    local = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local[name] = p.to_local().detach().clone()
            params[name] = p.full_tensor().detach().clone()
        else:
            params[name] = p.detach().clone()
    state_placements = set()
    if world_size > 1:
        state_placements = {tuple(s["exp_avg"].placements) for s in optimizer.state.values()}
    dist.barrier()
    assert all(optimizer.ewc_mode == mode for _ in steps)
    return {
        "steps": steps, "params": params, "local": local, "replica_all_reduces": replica_all_reduces,
        "micro_batches": len(micro), "fsdp_groups": 1 + config.num_layers,
        "placements": placements, "state_placements": state_placements, "mesh": mesh_info,
        "divisor": info["fisher_normalize_divisor"], "anchor_diff": info["anchor_max_diff"],
        "anchor_warned": anchor_warned, "drift_names": optimizer.drift_bucket_names,
        "backend": optimizer.backend,
    }


def _measured(result, optimizer) -> dict:
    assert result.finite
    # every rank reads (collectives)
    return {"loss": result.loss, "task_norm": result.task_norm.item(),
            "total_norm": None if result.total_norm is None else result.total_norm.item(),
            "penalty": optimizer.last_penalty.item(), "ewc_norm": optimizer.last_ewc_grad_norm.item(),
            "drift": optimizer.last_drift.clone()}


def _ratio_check(name: str, sharded: float, single: float, rtol: float, *, norm: bool) -> None:
    """sharded == single within rtol; when not, say which counting mistake the ratio points to (a sum counted
    twice is 2x, the norm of such a sum of squares sqrt(2)x)."""
    ratio = sharded / single
    if abs(ratio - 1) <= rtol:
        return
    factor = math.sqrt(REPLICATE) if norm else float(REPLICATE)
    if abs(ratio / factor - 1) < 0.05:
        why = f"double counted over dp_replicate (ratio {ratio:.4f} ~ {factor:.4g})"
    elif abs(ratio * factor - 1) < 0.05:
        why = f"divided by dp_replicate once too often (ratio {ratio:.4f} ~ 1/{factor:.4g})"
    else:
        why = f"ratio {ratio:.6f}, not within {rtol:g} of 1"
    raise AssertionError(f"{name}: HSDP {sharded!r} vs one process {single!r}: {why}")


@pytest.mark.slow
def test_hsdp_two_by_two_equals_one_process(tmp_path, seed):
    ewc_path = tmp_path / "ewc.safetensors"
    _write_ewc_file(ewc_path, seed)
    (single,) = run_distributed(_train, world_size=1, args=(str(ewc_path), seed))
    ranks = run_distributed(_train, world_size=WORLD, args=(str(ewc_path), seed))
    for mode, clip_mode in MODES:
        _compare(f"{mode}, clip {clip_mode}", single[mode], [r[mode] for r in ranks])
    # The gradient crossed the replicas once per step and FSDP group, however many micro-batches there were.
    for r in ranks:
        assert r["decoupled"]["micro_batches"] == 2 and r["coupled"]["micro_batches"] == 1
        for mode, _ in MODES:
            assert r[mode]["replica_all_reduces"] == [r[mode]["fsdp_groups"]] * STEPS, (mode, r[mode])


def _compare(label: str, single: dict, ranks: list[dict]) -> None:
    from torch.distributed.tensor import Replicate, Shard

    # It really is HSDP: every parameter and its Adam state replicated over dp_replicate, sharded over dp_shard.
    coords = set()
    for rank, r in enumerate(ranks):
        names, shape, coord = r["mesh"]
        assert names == ("dp_replicate", "dp_shard") and shape == (REPLICATE, SHARD), r["mesh"]
        assert tuple(coord) == (rank // SHARD, rank % SHARD), (rank, coord)
        coords.add(tuple(coord))
        assert r["placements"] == {(Replicate(), Shard(0))}, r["placements"]
        assert r["state_placements"] == {(Replicate(), Shard(0))}, r["state_placements"]
        assert r["backend"] == single["backend"]
    assert len(coords) == WORLD
    # Replicas hold the same rows and stay identical (one all-reduce result); the two shards split each parameter;
    # full_tensor() gathers the same tensor on every rank.
    full = ranks[0]["params"]
    for name, value in full.items():
        for rank, r in enumerate(ranks):
            twin = ranks[(rank + SHARD) % WORLD]
            assert torch.equal(r["local"][name], twin["local"][name]), f"{label}: {name}: rank {rank}'s replica differs"
            assert torch.equal(r["params"][name], value), f"{label}: {name}: rank {rank} gathered another tensor"
        chunk = -(-value.shape[0] // SHARD)
        assert torch.equal(ranks[0]["local"][name], value[:chunk]), name
        assert torch.equal(ranks[1]["local"][name], value[chunk:]), name

    # The EWC file: the Fisher's global mean (normalisation) counts each replicated shard once; same anchor check.
    assert single["anchor_warned"] and all(r["anchor_warned"] for r in ranks)
    for r in ranks:
        _ratio_check(f"{label}: Fisher mean (fisher_normalize divisor)", r["divisor"], single["divisor"], 1e-6,
                     norm=False)
        assert r["anchor_diff"] == single["anchor_diff"] > 0

    # Training: per step the loss, the norms (clip active), the penalty, the EWC gradient norm, the drift per block.
    assert single["drift_names"] == ranks[0]["drift_names"] == ["embedding", *(f"block {i}" for i in range(4)),
                                                                 "final_norm"]
    for rank, r in enumerate(ranks):
        for step, (a, b) in enumerate(zip(r["steps"], single["steps"])):
            where = f"{label}, rank {rank}, step {step + 1}"
            assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"loss, {where}"
            clipped = b["task_norm"] if b["total_norm"] is None else b["total_norm"]
            assert clipped > CLIP, f"the clip is not active ({where}): {clipped} <= {CLIP}"
            # the EWC term matters: its gradient is comparable to the data's
            assert b["ewc_norm"] > 0.3 * b["task_norm"], (where, b["ewc_norm"], b["task_norm"])
            assert (a["total_norm"] is None) == (b["total_norm"] is None), where
            keys = ("penalty", "ewc_norm", "task_norm") + (("total_norm",) if b["total_norm"] is not None else ())
            for key in keys:
                _ratio_check(f"{key}, {where}", a[key], b[key], NORM_RTOL, norm=key != "penalty")
            assert (b["drift"] > 0).all(), where
            for i, name in enumerate(r["drift_names"]):
                for j, kind in enumerate(("F-weighted", "plain")):
                    _ratio_check(f"drift {kind} of {name}, {where}", a["drift"][i, j].item(),
                                 b["drift"][i, j].item(), NORM_RTOL, norm=False)

    # Final parameters, gathered with full_tensor().
    for name, b in single["params"].items():
        a = full[name]
        if b.dim() >= 2:
            by_norm = ((a - b).norm() / b.norm()).item()
            assert by_norm <= PARAM_RTOL, f"{label}: {name}: ||HSDP - one process|| / ||one process|| = {by_norm:.3g}"
        max_abs = (a - b).abs().max().item()
        assert max_abs <= PARAM_MAX_LR * HYPER["lr"], (f"{label}: {name}: max |HSDP - one process| = {max_abs:.3g} "
                                                       f"({max_abs / HYPER['lr']:.3g} lr, rel_err {rel_err(a, b):.3g})")
        assert not torch.equal(a, _initial(name, b.shape)), f"{label}: {name} did not train"


def _initial(name, shape):
    from trainer.parallelize import initial_value

    return initial_value(name, shape, seed=MODEL_SEED)

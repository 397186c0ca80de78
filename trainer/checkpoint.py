"""Training checkpoints: torch.distributed.checkpoint (sharded, reshardable), written atomically, newest kept.

    RUN_DIR/checkpoints/step-00000100/   model + optimizer (DCP shards), rank*.pt (loader position, RNG),
                                         state.json (step, world size, EWC file hash, ...), config.toml,
                                         config.json (the model's Hugging Face config)
    RUN_DIR/checkpoints/latest           the name of the newest complete step directory

Every rank writes into `.step-N.tmp`; after a barrier rank 0 writes state.json last and renames the directory to
`step-N`, then rewrites `latest` atomically. A crash at any point leaves the previous checkpoints intact; a
leftover `.tmp` directory or a step directory without state.json is ignored with a warning. A complete checkpoint
that does not load (a truncated shard, a missing .metadata, an unreadable state.json: disk damage after the save)
is skipped with a warning naming the damage, and the next older one is tried. A checkpoint saved by N ranks loads on
M ranks: DCP reshards the model and optimizer, and the loader position is global.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.errors import UserError
from trainer.fileio import atomic_path

STATE_FILE = "state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def find_latest(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a warning."""
    complete = complete_checkpoints(checkpoint_dir)
    return complete[0] if complete else None


def complete_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints, newest first; incomplete ones are skipped with a warning."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    complete, broken = [], []
    for entry in root.iterdir():
        if entry.name.startswith(".step-") and entry.is_dir():
            broken.append(entry.name)
        elif _STEP_DIR.match(entry.name):
            (complete if is_complete(entry) else broken).append(entry.name)
    if broken:
        warnings.warn(f"ignoring incomplete checkpoint(s) in {root}: {', '.join(sorted(broken))} "
                      f"(a save was interrupted); using the newest complete one", stacklevel=2)
    return [root / name for name in sorted(complete, reverse=True)]


def save_checkpoint(checkpoint_dir: str | os.PathLike, step: int, *, model, optimizer, rank_state: dict,
                    state: dict, config_toml: str, model_config_json: dict, keep: int) -> Path:
    """Collective: every rank calls it. `rank_state` is this rank's (loader, RNG); `state` is rank 0's summary."""
    root = Path(checkpoint_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "config.toml").write_text(config_toml)
        (tmp / "config.json").write_text(json.dumps(model_config_json, indent=2) + "\n")
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "world_size": world}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_path(root / LATEST) as latest_tmp:
            latest_tmp.write_text(final.name + "\n")
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(e.name for e in root.iterdir() if _STEP_DIR.match(e.name) and is_complete(e))
    for name in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(root / name, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, *, model, optimizer) -> tuple[dict, dict]:
    """Collective: load model and optimizer (resharded as needed); return (state, this rank's rank_state)."""
    path = Path(path)
    if not is_complete(path):
        raise UserError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("world_size"), int) or state["world_size"] < 1:
        raise ValueError(f"{path / STATE_FILE} lacks a valid step and world_size")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bundle = {"model": model_sd, "optim": optim_sd}
    dcp.load(bundle, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"])
    rank = _rank()
    saved_world = state["world_size"]
    rank_file = path / f"rank{rank if rank < saved_world else rank % saved_world}.pt"
    rank_state = torch.load(rank_file, weights_only=True)
    return state, rank_state


def _agree_on_failure(failure: str | None) -> str | None:
    """The first failure of any rank, on every rank (so that all ranks move on to the same older checkpoint)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((f"rank {r}: {f}" for r, f in enumerate(failures) if f), None)


def load_newest_checkpoint(checkpoint_dir: str | os.PathLike, *, model, optimizer) -> tuple[Path, dict, dict] | None:
    """Collective: load the newest complete checkpoint that loads; (path, state, this rank's rank_state), or None
    when there is no complete checkpoint.

    A damaged checkpoint (unreadable state.json or rank file, a missing or truncated DCP file) is skipped with a
    warning naming the damage. The model and optimizer may be partly overwritten by a failed load; the next
    checkpoint's load overwrites all of them again. UserError when checkpoints exist and none loads.
    """
    candidates = complete_checkpoints(checkpoint_dir)
    damaged = []
    for path in candidates:
        failure = None
        try:
            state, rank_state = load_checkpoint(path, model=model, optimizer=optimizer)
        except (Exception, CheckpointException) as exc:  # whatever the damage, this checkpoint cannot be used
            failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        failure = _agree_on_failure(failure)
        if failure is None:
            return path, state, rank_state
        damaged.append(f"{path.name} ({failure})")
        older = candidates[len(damaged)] if len(damaged) < len(candidates) else None
        warnings.warn(f"checkpoint {path} does not load, skipping it: {failure}"
                      + (f"; trying the older {older.name}" if older is not None else ""), stacklevel=2)
    if damaged:
        raise UserError(f"no checkpoint in {checkpoint_dir} loads: {'; '.join(damaged)}. Restore them from a "
                        f"backup, or move them away to train from the start")
    return None


def read_model_tensor(path: str | os.PathLike, name: str, like: torch.Tensor) -> torch.Tensor:
    """One full model parameter from a checkpoint, read on its own (for export without a process group)."""
    out = {"model": {name: torch.empty_like(like)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out["model"][name]

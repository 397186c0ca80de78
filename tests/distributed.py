"""Run a test function in N CPU processes with the gloo backend and collect what each rank returns.

    results = run_distributed(my_fn, world_size=2, args=(tmp_path,))   # my_fn(rank, world_size, *args)

`my_fn` must be importable (a module-level function in a test module). Each rank's return value is pickled back;
an exception on any rank fails the call with that rank's traceback. Processes are spawned (not forked) so each
starts with a clean torch state, exactly as torchrun would start them.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

from trainer.distributed import free_port, init_distributed


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, env: dict) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    # Two ranks on a 2-core machine: one thread each avoids oversubscription (and keeps results deterministic).
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        init_distributed("cpu")  # gloo, from the environment above (as under torchrun)
        value = fn(rank, world_size, *args)
        result_path.write_bytes(pickle.dumps(("ok", value)))
    except BaseException:
        result_path.write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, *, world_size: int = 2, args: tuple = (), env: dict | None = None) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        try:
            mp.start_processes(_entry, args=(world_size, port, out_dir, fn, args, dict(env or {})),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessRaisedException as exc:
            raise AssertionError(f"a rank failed:\n{exc}") from None
        except mp.ProcessExitedException as exc:
            raise AssertionError(f"a rank exited abnormally: {exc}") from None
        results = []
        for rank in range(world_size):
            status, value = pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results

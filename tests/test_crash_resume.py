"""kill -9 at random moments (during steps, checkpoint writes, metrics appends), resume each time: the per-step
losses of the finished run equal an uninterrupted run's, exactly."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train import _overrides, store  # noqa: F401  (store is a fixture)

REPO = Path(__file__).resolve().parent.parent


def _command(store_path, run_dir) -> list[str]:
    overrides = _overrides(store_path, **{"optim.max_steps": 12, "checkpoint.every": 1, "checkpoint.keep": 2})
    config = run_dir.parent / "defaults.toml"  # every value from the defaults and the overrides
    config.touch()
    return [sys.executable, "-m", "trainer.cli", "train", str(config), "--out", str(run_dir),
            *(arg for o in overrides for arg in ("--set", o))]


def _finish(command: list[str], env: dict) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_with_kills(store, run_dir: Path, env: dict, rng: random.Random, wall: float) -> int:
    """Start the run, kill -9 it at a random moment, resume, up to 8 times, then let it finish; returns the kills."""
    kills = 0
    for _ in range(8):
        process = subprocess.Popen(_command(store, run_dir), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        # Start-up (imports, building the model) takes most of a short run: aim at its second half mostly.
        try:
            _, err = process.communicate(timeout=rng.uniform(0.4, 1.0) * wall)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            kills += 1
            continue
        assert process.returncode == 0, err.decode()[-2000:]
        return kills
    _finish(_command(store, run_dir), env)
    return kills


@pytest.mark.slow
def test_killed_at_random_moments_the_run_ends_as_an_uninterrupted_one(tmp_path, store, seed):
    # A fresh single-process group in each run: none of the rendezvous this test process may have set up.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    start = time.perf_counter()
    _finish(_command(store, tmp_path / "straight"), env)
    wall = time.perf_counter() - start
    expected = _losses(tmp_path / "straight")
    assert len(expected) == 12

    rng = random.Random(seed)
    run_dir = tmp_path / "killed"
    kills = 0
    for _ in range(5):
        kills = _run_with_kills(store, run_dir, env, rng, wall)
        if kills:
            break
        # The straight run's time was an overestimate (a cold start, a busy machine): the killed runs finished
        # before any kill. Start over, aiming earlier.
        shutil.rmtree(run_dir)
        wall *= 0.6
    assert kills >= 1
    assert _losses(run_dir) == expected  # every step once, each loss bit-identical

"""`ewc.mode = "decoupled"` through the trainer: the mode reaches the optimizer, pulls towards θ*, and is recorded."""

from __future__ import annotations

import json

import pytest

from tests import test_train
from tests.test_train import _ewc_file, _overrides, final_parameters, metrics, run
from trainer.checkpoint import find_latest
from trainer.config import tomllib
from trainer.errors import UserError
from trainer.parallelize import initial_value


store = test_train.store  # the module-scoped token store fixture, shared


def _distance_to_anchor(run_dir) -> float:
    final = final_parameters(run_dir)
    return sum(float((t - initial_value(n, t.shape, seed=0)).square().sum()) for n, t in final.items()) ** 0.5


def test_decoupled_run_pulls_towards_the_anchor_and_records_its_mode(tmp_path, store):
    ewc_file = _ewc_file(tmp_path / "ewc.safetensors")
    base = {"optim.max_steps": 6, "ewc.file": f"'{ewc_file}'", "optim.weight_decay": 0.0}
    run(_overrides(store, **base, **{"ewc.lambda": 0.0}), tmp_path / "free")
    # lr * lambda * F up to 3e-3 * 3000 = 9 per step: past 2, where the explicit step lr * lambda * F (θ - θ*) would
    # overshoot the anchor by more than it started from and diverge; the proximal step contracts
    run(_overrides(store, **base, **{"ewc.lambda": 3000.0, "ewc.mode": "decoupled"}), tmp_path / "decoupled")
    free, pulled = _distance_to_anchor(tmp_path / "free"), _distance_to_anchor(tmp_path / "decoupled")
    assert pulled < 0.5 * free, (pulled, free)
    records = metrics(tmp_path / "decoupled")
    # the penalty and the EWC-gradient norm are still reported (at the pre-step parameters)
    assert all(r["ewc_penalty"] > 0 and r["ewc_grad_norm"] > 0 for r in records[1:])
    checkpoint = find_latest(tmp_path / "decoupled" / "checkpoints")
    assert json.loads((checkpoint / "state.json").read_text())["ewc_mode"] == "decoupled"
    assert tomllib.loads((checkpoint / "config.toml").read_text())["ewc"]["mode"] == "decoupled"


def test_a_resume_with_another_mode_is_refused(tmp_path, store):
    ewc_file = _ewc_file(tmp_path / "ewc.safetensors")
    settings = {"optim.max_steps": 4, "ewc.file": f"'{ewc_file}'", "ewc.lambda": 10.0}
    run(_overrides(store, **settings, **{"ewc.mode": "decoupled"}), tmp_path / "run", stop_after=2)
    with pytest.raises(UserError, match="trained with ewc.mode = decoupled, this run has coupled"):
        run(_overrides(store, **settings), tmp_path / "run")

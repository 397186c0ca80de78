"""Resume past damage: a complete checkpoint that no longer loads is skipped with a warning, and training goes on
from the newest one that loads, giving exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_train import _overrides, metrics, run, store  # noqa: F401  (store is a fixture)
from trainer.errors import UserError


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncated shard":
        shard = next(step_dir.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "missing metadata":
        (step_dir / ".metadata").unlink()
    elif how == "bad state.json":
        (step_dir / "state.json").write_text('{"step": 6, "world')
    elif how == "state.json without step":
        (step_dir / "state.json").write_text(json.dumps({"loss": 1.0}))
    elif how == "missing rank file":
        (step_dir / "rank0.pt").unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated shard", "missing metadata", "bad state.json", "state.json without step",
                                 "missing rank file"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, store, how):
    overrides = _overrides(store, **{"optim.max_steps": 8, "checkpoint.every": 2, "checkpoint.keep": 3})
    straight = run(overrides, tmp_path / "straight")
    first = run(overrides, tmp_path / "run", stop_after=6)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000006"]
    _damage(root / "step-00000006", how)
    with pytest.warns(UserWarning, match=r"step-00000006 does not load.*trying the older step-00000004"):
        second = run(overrides, tmp_path / "run")
    assert first[:4] + second == straight  # steps 5..8 again from step 4's checkpoint, exactly
    assert [m["step"] for m in metrics(tmp_path / "run")] == list(range(1, 9))


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path, store):
    overrides = _overrides(store, **{"optim.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 2})
    run(overrides, tmp_path / "run", stop_after=4)
    root = tmp_path / "run" / "checkpoints"
    for step_dir in root.glob("step-*"):
        _damage(step_dir, "missing metadata")
    with pytest.warns(UserWarning, match="does not load"), \
            pytest.raises(UserError, match=r"no checkpoint in .* loads: step-00000004 .*step-00000002"):
        run(overrides, tmp_path / "run")


@pytest.mark.slow
def test_ranks_agree_on_a_checkpoint_damaged_for_one_rank_only(tmp_path, store):
    """Only rank 1 fails to read its file: both ranks must move on to the older checkpoint (no hang)."""
    overrides = _overrides(store, **{"optim.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep": 2,
                                     "data.batch_size": 2})
    straight = run(overrides, tmp_path / "straight", world_size=2)
    first = run(overrides, tmp_path / "run", world_size=2, stop_after=4)
    (tmp_path / "run" / "checkpoints" / "step-00000004" / "rank1.pt").write_bytes(b"not a torch file")
    second = run(overrides, tmp_path / "run", world_size=2)
    assert first[:2] + second == straight


def test_a_torn_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, store):
    overrides = _overrides(store, **{"optim.max_steps": 6, "checkpoint.every": 2})
    straight = run(overrides, tmp_path / "straight")
    first = run(overrides, tmp_path / "run", stop_after=4)
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 3.1')  # the process died during an append
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 5 is not a complete JSON record"):
        second = run(overrides, tmp_path / "run")
    assert first + second == straight
    assert [m["step"] for m in metrics(tmp_path / "run")] == list(range(1, 7))

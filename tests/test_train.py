"""The FSDP2 trainer on CPU (gloo): 2 ranks equal 1, exact resume, EWC pulls towards θ*, export, bad input, golden."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed
from tests.helpers import random_documents, write_token_store
from trainer.config import load_config
from trainer.errors import UserError
from trainer.hf import to_hf_name
from trainer.model import Gemma2Config
from trainer.parallelize import initial_value

VOCAB = 128
GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "store"
    return write_token_store(path, random_documents(200, vocab_size=VOCAB, mean_length=30), vocab_size=VOCAB)


def _overrides(store, **extra):
    settings = {"data.stores": f"['{store}']", "data.seq_len": 32, "data.batch_size": 4, "model.vocab_size": VOCAB,
                "model.attention": "eager", "optim.max_steps": 10, "optim.lr": 3e-3, "optim.warmup": 2,
                "parallel.deterministic": "true", "logging.progress": "false"}
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def _run(overrides, run_dir, stop_after=None):
    from trainer.train import train

    summary = train(load_config(None, overrides), run_dir, stop_after=stop_after)
    return summary.losses


def _run_in_rank(rank, world_size, overrides, run_dir, stop_after=None):
    return _run(overrides, run_dir, stop_after)


def run(overrides, run_dir, *, world_size=1, stop_after=None):
    """Train as `gemma-ewc train` would: one rank in this process, N ranks in fresh processes (as torchrun)."""
    if world_size == 1:
        try:
            return _run(overrides, run_dir, stop_after)
        finally:
            dist.destroy_process_group()
    return run_distributed(_run_in_rank, world_size=world_size, args=(overrides, str(run_dir), stop_after))[0]


def final_parameters(run_dir) -> dict[str, torch.Tensor]:
    from trainer.checkpoint import find_latest, read_model_tensor
    from trainer.hf import config_from_hf, expected_shapes, from_hf_name

    step = find_latest(Path(run_dir) / "checkpoints")
    config = config_from_hf(json.loads((step / "config.json").read_text()))
    return {from_hf_name(n): read_model_tensor(step, from_hf_name(n), torch.empty(s))
            for n, s in expected_shapes(config).items()}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _ewc_file(path, *, seed=0, perturb=0.0):
    """Random Fisher; anchor = the seeded initial weights of the run (optionally moved away from them)."""
    from trainer.ewc import write_ewc
    from trainer.model import Gemma2

    config = Gemma2Config.preset("tiny", vocab_size=VOCAB)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Gemma2(config).named_parameters()}
    g = torch.Generator().manual_seed(seed)
    fisher = {to_hf_name(n): torch.rand(s, generator=g) for n, s in shapes.items()}
    anchor = {to_hf_name(n): initial_value(n, s, seed=0) + perturb for n, s in shapes.items()}
    write_ewc(path, fisher=fisher, anchor=anchor, metadata={"estimator": "test"}, anchor_dtype=torch.float32)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("ewc", [False, True], ids=["plain", "ewc"])
def test_two_ranks_equal_one_rank(tmp_path, store, ewc):
    extra = {"optim.max_steps": 20}
    if ewc:
        extra.update({"ewc.file": f"'{_ewc_file(tmp_path / 'ewc.safetensors')}'", "ewc.lambda": 50.0})
    one = run(_overrides(store, **extra), tmp_path / "one")
    two = run(_overrides(store, **extra, **{"data.batch_size": 2}), tmp_path / "two", world_size=2)
    assert len(one) == len(two) == 20
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    if ewc:
        assert all(m["ewc_penalty"] > 0 for m in metrics(tmp_path / "one")[1:])
        # per-block drift: each rank reduced its shards, combined over the ranks. The runs' parameters agree to
        # ~1e-5 (above); a drift is a squared difference from the anchor, small ones (the final norm) amplify that
        for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
            assert a["drift"]["blocks"] == b["drift"]["blocks"]
            for kind in ("fisher", "plain"):
                assert b["drift"][kind] == pytest.approx(a["drift"][kind], rel=1e-3)
    else:
        assert all("drift" not in m for m in metrics(tmp_path / "two"))
        penalties = [m["ewc_penalty"] for m in metrics(tmp_path / "two")]
        assert torch.allclose(torch.tensor(penalties), torch.tensor([m["ewc_penalty"] for m in
                                                                     metrics(tmp_path / "one")]), rtol=1e-4)
    # Adam divides each gradient by its running RMS, so an element whose gradient is at rounding level still moves
    # by up to lr per step, in a direction the summation order decides: compare against a fraction of lr.
    a, b = final_parameters(tmp_path / "one"), final_parameters(tmp_path / "two")
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 0.05 * 3e-3, name


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_is_bit_identical(tmp_path, store, world_size):
    overrides = _overrides(store, **{"data.batch_size": 4 // world_size, "checkpoint.every": 5})
    straight = run(overrides, tmp_path / "straight", world_size=world_size)
    first = run(overrides, tmp_path / "resumed", world_size=world_size, stop_after=5)
    second = run(overrides, tmp_path / "resumed", world_size=world_size)
    assert first + second == straight  # exact float equality, step by step
    a, b = final_parameters(tmp_path / "straight"), final_parameters(tmp_path / "resumed")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == list(range(1, 11))


@pytest.mark.slow
def test_resume_on_another_world_size(tmp_path, store):
    two = _overrides(store, **{"data.batch_size": 2})
    one = _overrides(store)
    straight = run(one, tmp_path / "straight")
    first = run(two, tmp_path / "switched", world_size=2, stop_after=4)
    second = run(one, tmp_path / "switched")
    assert len(first + second) == 10
    assert torch.allclose(torch.tensor(first + second), torch.tensor(straight), rtol=1e-4)


def test_ewc_strength_keeps_parameters_near_the_anchor(tmp_path, store):
    distances = []
    for lam in (0.0, 30.0, 1000.0):
        extra = {"optim.max_steps": 8, "ewc.file": f"'{_ewc_file(tmp_path / 'ewc.safetensors')}'",
                 "ewc.lambda": lam, "optim.weight_decay": 0.0}
        run(_overrides(store, **extra), tmp_path / f"lam{lam}")
        final = final_parameters(tmp_path / f"lam{lam}")
        anchor = {n: initial_value(n, t.shape, seed=0) for n, t in final.items()}
        distances.append(sum(float((final[n] - anchor[n]).square().sum()) for n in final) ** 0.5)
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.5 * distances[0], distances


@pytest.mark.filterwarnings("ignore:.*the EWC anchor differs from the model's weights")
def test_drift_per_block_is_written_at_logging_steps(tmp_path, store):
    ewc = _ewc_file(tmp_path / "ewc.safetensors", perturb=0.01)
    run(_overrides(store, **{"ewc.file": f"'{ewc}'", "ewc.lambda": 10.0, "optim.max_steps": 6,
                             "logging.every": 2}), tmp_path / "run")
    records = metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4, 6]
    blocks = ["embedding", "block 0", "block 1", "block 2", "block 3", "final_norm"]  # the tiny preset: 4 layers
    for r in records:
        drift = r["drift"]
        assert drift["blocks"] == blocks
        assert len(drift["fisher"]) == len(drift["plain"]) == len(blocks)
        # every anchor is 0.01 off the initial weights: every block has drifted, F in [0, 1) weighs it down
        assert all(0 < f < p for f, p in zip(drift["fisher"], drift["plain"]))
        # the blocks' F-weighted drifts add up to the penalty's sum F d^2 (lambda 10: penalty = 5 * sum)
        assert 5 * sum(drift["fisher"]) == pytest.approx(r["ewc_penalty"], rel=1e-6)
    plain = run(_overrides(store, **{"optim.max_steps": 2}), tmp_path / "plain")
    assert len(plain) == 2 and all("drift" not in r for r in metrics(tmp_path / "plain"))


def test_lambda_zero_equals_no_ewc(tmp_path, store):
    plain = run(_overrides(store, **{"optim.max_steps": 5}), tmp_path / "plain")
    zero = run(_overrides(store, **{"optim.max_steps": 5, "ewc.lambda": 0.0,
                                    "ewc.file": f"'{_ewc_file(tmp_path / 'e.safetensors')}'"}), tmp_path / "zero")
    assert plain == zero
    a, b = final_parameters(tmp_path / "plain"), final_parameters(tmp_path / "zero")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_export_round_trip_through_transformers(tmp_path, store):
    transformers = pytest.importorskip("transformers")
    from trainer.model import Gemma2
    from trainer.export import export_checkpoint

    run(_overrides(store, **{"optim.max_steps": 3}), tmp_path / "run")
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ours = Gemma2(Gemma2Config.preset("tiny", vocab_size=VOCAB), attention_backend="eager")
    ours.load_state_dict(final_parameters(tmp_path / "run"))
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        expected = ours(ids)
        assert ((theirs(ids).logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_a_half_written_checkpoint_is_ignored_with_a_warning(tmp_path, store):
    from trainer.checkpoint import find_latest

    run(_overrides(store, **{"checkpoint.every": 2, "optim.max_steps": 4}), tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    (root / ".step-00000006.tmp").mkdir()
    (root / "step-00000008").mkdir()  # a step directory without its state file
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoint"):
        assert find_latest(root).name == "step-00000004"


def test_bad_inputs_are_clear_errors(tmp_path, store):
    with pytest.raises(UserError, match="token store .*missing.* not found"):
        _run(_overrides(tmp_path / "missing"), tmp_path / "a")
    with pytest.raises(UserError, match="unknown config key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=1"])
    # An EWC file made for another model (another vocabulary).
    from trainer.ewc import write_ewc
    from trainer.model import Gemma2

    with torch.device("meta"):
        other = Gemma2(Gemma2Config.preset("tiny", vocab_size=VOCAB + 1))
    tensors = {to_hf_name(n): torch.ones(p.shape) for n, p in other.named_parameters()}
    write_ewc(tmp_path / "other.safetensors", fisher=tensors, anchor=tensors, metadata={})
    with pytest.raises(UserError, match="another model"):
        _run(_overrides(store, **{"ewc.file": f"'{tmp_path / 'other.safetensors'}'", "ewc.lambda": 1.0}),
             tmp_path / "b")


def test_golden_losses_of_the_tiny_config(tmp_path, store):
    """Guards the numerics: a refactor that should not change the numbers must reproduce these losses.

    Regenerate (only after an intended numerical change) with GEMMA_EWC_UPDATE_GOLDEN=1.
    """
    import os

    losses = run(_overrides(store), tmp_path / "run")
    if os.environ.get("GEMMA_EWC_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    # Across CPUs the matmul summation order differs; the tolerance is far below any real numerical change.
    assert torch.allclose(torch.tensor(losses), torch.tensor(golden), rtol=2e-4), (losses, golden)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    warnings.resetwarnings()


def test_a_zero_mixture_weight_leaves_its_store_out(tmp_path, store):
    """A replay grid's `data.weights = [1, 0]` trains exactly as the first store alone."""
    other = write_token_store(tmp_path / "other", random_documents(50, vocab_size=VOCAB, seed=7), vocab_size=VOCAB)
    alone = run(_overrides(store, **{"optim.max_steps": 3}), tmp_path / "alone")
    mixed = run(_overrides(store, **{"optim.max_steps": 3, "data.stores": f"['{store}', '{other}']",
                                     "data.weights": "[1, 0]"}), tmp_path / "mixed")
    assert mixed == alone

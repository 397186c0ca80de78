"""`export` records what the model was trained on in gemma-ewc.json: seq_len, data stores and weights, step."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from tests.helpers import random_documents, write_token_store
from trainer.config import load_config
from trainer.export import export_checkpoint, training_context

VOCAB = 96


def test_export_records_the_training_context(tmp_path, seed):
    from trainer.train import train

    stores = [write_token_store(tmp_path / name, random_documents(30, vocab_size=VOCAB, mean_length=20, seed=seed + i),
                                vocab_size=VOCAB) for i, name in enumerate(("new", "old"))]
    config = load_config(None, [f"data.stores=['{stores[0]}', '{stores[1]}']", "data.weights=[3, 1]",
                                "data.seq_len=24", "data.batch_size=2", f"model.vocab_size={VOCAB}",
                                "model.attention=eager", "model.num_layers=1", "optim.max_steps=2",
                                "optim.warmup=0", "logging.progress=false"])
    try:
        train(config, tmp_path / "run-a")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = export_checkpoint(tmp_path / "run-a", tmp_path / "hf", dtype=torch.float32)
    meta = json.loads((out / "gemma-ewc.json").read_text())
    assert meta["label"] == "run-a" and meta["ewc_lambda"] is None and meta["checkpoint"].endswith("step-00000002")
    assert (meta["seq_len"], meta["step"]) == (24, 2)
    assert meta["data_stores"] == [str(s) for s in stores] and meta["data_weights"] == [0.75, 0.25]


def test_equal_weights_and_a_single_store(tmp_path):
    step_dir = tmp_path / "step-00000007"
    step_dir.mkdir()
    (step_dir / "state.json").write_text(json.dumps({"step": 7, "world_size": 1}))
    two = training_context(step_dir, {"data": {"stores": ["a", "b"], "weights": [], "seq_len": 128}})
    assert two == {"seq_len": 128, "data_stores": ["a", "b"], "data_weights": [0.5, 0.5], "step": 7}
    one = training_context(step_dir, {"data": {"stores": ["a"], "weights": [2.0], "seq_len": 64}})
    assert one == {"seq_len": 64, "data_stores": ["a"], "data_weights": None, "step": 7}

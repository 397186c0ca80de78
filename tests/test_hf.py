"""Hugging Face checkpoints: both directions through transformers, single file and shards, and bad directories."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import hf_twin, random_model, rel_err, small_config
from trainer.errors import UserError
from trainer.hf import INDEX_FILE, SINGLE_FILE, HFCheckpoint
from trainer.model import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

# max_shard_bytes small enough to split the tiny model into several shards.
SHARDINGS = {"single": 10 * 2**30, "sharded": 60_000}


def _ids(config, seed):
    return torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_loads_in_transformers(tmp_path, sharding, dtype, seed):
    config = small_config()
    model = random_model(config, seed=seed)
    save_pretrained(model, tmp_path / "out", dtype=dtype, max_shard_bytes=SHARDINGS[sharding])
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert (INDEX_FILE in files) == (sharding == "sharded")
    assert (SINGLE_FILE in files) == (sharding == "single")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert type(theirs).__name__ == "Gemma2ForCausalLM"
    ours = model.to(dtype).to(torch.float32)  # the same rounding the file applied
    ids = _ids(config, seed)
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, ours(ids)) <= 1e-5


@pytest.mark.parametrize("sharding", sorted(SHARDINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_checkpoint_loads_in_load_pretrained(tmp_path, sharding, dtype, seed):
    config = small_config()
    reference = hf_twin(random_model(config, seed=seed)).to(dtype)
    reference.save_pretrained(tmp_path / "hf", max_shard_size=SHARDINGS[sharding])
    assert ((tmp_path / "hf" / INDEX_FILE).exists()) == (sharding == "sharded")
    ours = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = _ids(config, seed)
    # transformers re-reads its own files in float32 (converting the bfloat16 model in memory would also round
    # its RoPE buffer, which a fresh load does not).
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(ours(ids), theirs(ids).logits) <= 1e-5
    assert load_pretrained(tmp_path / "hf", dtype=dtype).embed_tokens.weight.dtype == dtype


def test_partial_row_reads_match_whole_tensor(tmp_path, seed):
    model = random_model(small_config(), seed=seed)
    save_pretrained(model, tmp_path / "m", dtype=torch.float32, max_shard_bytes=60_000)
    ckpt = HFCheckpoint(tmp_path / "m")
    name = "model.layers.1.mlp.gate_proj.weight"
    whole = ckpt.read(name)
    assert torch.equal(ckpt.read(name, index=(slice(5, 17),)), whole[5:17])
    assert torch.equal(ckpt.read(name, index=(slice(3, 4), slice(2, 9))), whole[3:4, 2:9])
    assert torch.equal(whole, model.layers[1].mlp.gate_proj.weight)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model"
    save_pretrained(random_model(small_config()), path, dtype=torch.float32, max_shard_bytes=60_000)
    return path


def test_another_architecture_is_refused(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="'llama' model .* not Gemma2"):
        load_pretrained(saved)


def test_missing_shard_is_named(saved):
    index = json.loads((saved / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (saved / shard).unlink()
    with pytest.raises(UserError, match=f"shard\\(s\\) {shard} .* missing"):
        load_pretrained(saved)


def test_tensor_of_wrong_shape_is_named(saved):
    raw = json.loads((saved / "config.json").read_text())
    raw["intermediate_size"] += 1
    (saved / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="mlp.* has shape .* config.json implies"):
        load_pretrained(saved)


def test_directory_without_weights_is_refused(tmp_path, saved):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(UserError, match="neither model.safetensors nor"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(UserError, match="config.json not found"):
        load_pretrained(tmp_path)


def test_failed_save_leaves_previous_export_intact(tmp_path, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = random_model(small_config(), seed=1)
    import trainer.hf

    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = trainer.hf.save_file
    monkeypatch.setattr(trainer.hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, saved, dtype=torch.float32, max_shard_bytes=60_000)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []

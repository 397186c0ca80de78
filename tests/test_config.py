"""The run configuration: TOML + --set overrides, unknown keys and wrong types rejected, round trip through TOML."""

import json

import pytest

from trainer.config import TrainConfig, load_config, to_toml
from trainer.errors import UserError


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_toml_and_overrides(tmp_path):
    path = _write(tmp_path, '[optim]\nlr = 1e-3\nbetas = [0.9, 0.95]\n[ewc]\nfile = "f.safetensors"\nlambda = 10\n')
    config = load_config(path, ["optim.max_steps=7", "model.attention=eager", "ewc.clip=total",
                                "data.stores=['a', 'b']", "data.weights=[0.95, 0.05]"])
    assert config.optim.lr == 1e-3 and config.optim.betas == [0.9, 0.95] and config.optim.max_steps == 7
    assert config.ewc.ewc_lambda == 10.0 and isinstance(config.ewc.ewc_lambda, float) and config.ewc.clip == "total"
    assert config.model.attention == "eager" and config.data.stores == ["a", "b"]
    assert config.data.batch_size == TrainConfig().data.batch_size
    assert config.ewc.mode == "coupled"  # the default: today's behaviour


def test_toml_round_trip(tmp_path):
    config = load_config(None, ["ewc.file=x", "ewc.lambda=3.5", "data.stores=['s']", "parallel.compile=true",
                                "ewc.mode=decoupled"])
    again = load_config(_write(tmp_path, to_toml(config)))
    assert again == config and again.ewc.mode == "decoupled"
    assert 'mode = "decoupled"' in to_toml(config)  # recorded in every checkpoint's config.toml


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; valid keys here: optim.lr, optim.betas"),
    ("optimizer.lr=1", r"unknown config key 'optimizer'; valid keys here: model, data, optim"),
    ("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
    ("data.seq_len=2.5", r"data.seq_len must be an integer"),
    ("parallel.compile=1", r"parallel.compile must be true or false"),
    ("ewc.clip=both", r"ewc.clip must be one of task, total"),
    ("ewc.mode=proximal", r"ewc.mode must be one of coupled, decoupled"),
    ("ewc.lambda=5", r"ewc.lambda > 0 needs ewc.file"),
    ("data.weights=[1.0]", r"data.weights has 1 entries for 0 data.stores"),
    ("optim.lr", r"--set expects key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_decoupled_mode_refuses_clip_total(tmp_path):
    path = _write(tmp_path, '[ewc]\nfile = "f.safetensors"\nlambda = 10\nmode = "decoupled"\n')
    assert load_config(path).ewc.clip == "task"
    with pytest.raises(UserError, match="ewc.clip = total .* ewc.mode = decoupled .* use ewc.clip = task"):
        load_config(path, ["ewc.clip=total"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(_write(tmp_path, "[optim\nlr = 1"))


@pytest.mark.parametrize("name", ["tiny", "gemma2-2b", "gemma2-9b", "gemma2-27b"])
def test_shipped_configs_load(name):
    from tests.conftest import REPO_ROOT

    config = load_config(REPO_ROOT / "configs" / f"{name}.toml")
    assert config.ewc.file and config.ewc.ewc_lambda > 0 and config.data.stores
    if name != "tiny":
        assert (config.optim.lr, config.optim.schedule, config.optim.warmup, config.optim.weight_decay) == \
            (2e-4, "cosine", 0.05, 0.01)


# --------------------------------------------------------------------------------------------- custom model shapes

def test_custom_shape_overrides_the_preset():
    from trainer.model import Gemma2Config
    from trainer.train import model_config_of

    config = load_config(None, ["model.preset=small", "model.hidden_size=96", "model.num_layers=3",
                                "model.num_heads=6", "model.num_kv_heads=3", "model.head_dim=32",
                                "model.intermediate_size=200", "model.sliding_window=48", "model.context=512",
                                "model.vocab_size=300"])
    shape = model_config_of(config)
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim,
            shape.intermediate_size, shape.sliding_window, shape.max_position_embeddings, shape.vocab_size) == \
        (96, 3, 6, 3, 32, 200, 48, 512, 300)
    # small has query_pre_attn_scalar == head_dim, so the scalar follows the new head_dim ...
    assert shape.query_pre_attn_scalar == 32
    # ... and keys left unset keep the preset's values.
    assert (shape.rms_norm_eps, shape.final_softcap) == (Gemma2Config.preset("small").rms_norm_eps, 30.0)
    # tiny's scalar (24) differs from its head_dim (16) on purpose: it is kept.
    assert model_config_of(load_config(None, ["model.head_dim=32"])).query_pre_attn_scalar == 24
    assert model_config_of(load_config(None, [])) == Gemma2Config.preset("tiny")


def test_set_num_layers_from_the_command_line_and_toml_round_trip(tmp_path):
    from trainer.train import model_config_of

    config = load_config(None, ["model.num_layers=3"])
    assert config.model.num_layers == 3 and model_config_of(config).num_layers == 3
    assert load_config(_write(tmp_path, to_toml(config))) == config


@pytest.mark.parametrize("overrides,message", [
    (["model.num_layers=0"], r"model.num_layers must be at least 1, got 0"),
    (["model.hidden_size=-8"], r"model.hidden_size must be at least 1"),
    (["model.intermediate_size=0"], r"model.intermediate_size must be at least 1"),
    (["model.sliding_window=0"], r"model.sliding_window must be at least 1"),
    (["model.context=0"], r"model.context must be at least 1"),
    (["model.num_kv_heads=0"], r"model.num_kv_heads must be at least 1"),
    (["model.num_heads=3"], r"model.num_heads \(3\) must be a multiple of model.num_kv_heads \(2, from preset tiny\)"),
    (["model.num_heads=4", "model.num_kv_heads=3"], r"model.num_heads \(4\) must be a multiple of model.num_kv_heads"),
    (["model.head_dim=15"], r"model.head_dim \(15\) must be even"),
    (["model.head_dim=16.0"], r"model.head_dim must be an integer"),
    (["model.num_layer=2"], r"unknown config key 'model.num_layer'; valid keys here: .*model.num_layers"),
    (["model.context=64", "data.seq_len=128"], r"model.context \(64\) is shorter than data.seq_len \(128\)"),
    (["model.pretrained=some/dir", "model.num_layers=2", "model.head_dim=8"],
     r"model.num_layers, model.head_dim cannot be combined with model.pretrained"),
])
def test_bad_shapes_are_user_errors_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_a_tiny_custom_shape_trains(tmp_path):
    import torch.distributed as dist

    from tests.helpers import random_documents, write_token_store
    from trainer.train import train

    vocab = 96
    store = write_token_store(tmp_path / "store", random_documents(40, vocab_size=vocab, mean_length=20),
                              vocab_size=vocab)
    config = load_config(None, [f"data.stores=['{store}']", "data.seq_len=16", "data.batch_size=2",
                                f"model.vocab_size={vocab}", "model.attention=eager", "model.hidden_size=24",
                                "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
                                "model.head_dim=8", "model.intermediate_size=40", "model.sliding_window=8",
                                "model.context=64", "optim.max_steps=2", "optim.warmup=0",
                                "logging.progress=false"])
    try:
        summary = train(config, tmp_path / "run")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(summary.losses) == 2 and all(0 < loss < 10 for loss in summary.losses)
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/config.json")).read_text())
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["num_key_value_heads"], saved["head_dim"],
            saved["max_position_embeddings"]) == (24, 1, 1, 8, 64)

"""The run configuration: TOML + --set overrides, unknown keys and wrong types rejected, round trip through TOML."""

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


def test_toml_round_trip(tmp_path):
    config = load_config(None, ["ewc.file=x", "ewc.lambda=3.5", "data.stores=['s']", "parallel.compile=true"])
    again = load_config(_write(tmp_path, to_toml(config)))
    assert again == config


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; valid keys here: optim.lr, optim.betas"),
    ("optimizer.lr=1", r"unknown config key 'optimizer'; valid keys here: model, data, optim"),
    ("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
    ("data.seq_len=2.5", r"data.seq_len must be an integer"),
    ("parallel.compile=1", r"parallel.compile must be true or false"),
    ("ewc.clip=both", r"ewc.clip must be one of task, total"),
    ("ewc.lambda=5", r"ewc.lambda > 0 needs ewc.file"),
    ("data.weights=[1.0]", r"data.weights has 1 entries for 0 data.stores"),
    ("optim.lr", r"--set expects key=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


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

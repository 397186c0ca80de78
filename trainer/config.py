"""The run configuration: a tree of small typed dataclasses, loaded from TOML, overridden with `--set a.b=c`.

Every field has a default and a one-line description (its `doc` metadata, shown in errors). Unknown keys and
values of the wrong type are errors that list what is valid. A component receives only its own section.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernels.ewc_adamw import BACKENDS as OPTIMIZER_BACKENDS
from kernels.ewc_adamw import EWC_MODES
from trainer.attention import BACKENDS as ATTENTION_BACKENDS
from trainer.data.loader import mixture_period
from trainer.errors import UserError
from trainer.model import Gemma2Config
from trainer.optim import warmup_steps_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _f(default: Any, doc: str, *, choices: tuple | None = None, key: str | None = None, factory=None):
    meta = {"doc": doc, "choices": choices, "key": key}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    preset: str = _f("tiny", "model shape preset (gemma2-2b, gemma2-9b, gemma2-27b, tiny, small)")
    pretrained: str | None = _f(None, "Hugging Face Gemma2 directory to start from (overrides the preset's shape)")
    vocab_size: int | None = _f(None, "override the preset's vocabulary size (random-init runs with a small tokenizer)")
    # Shape overrides for runs from random initialisation (None = the preset's value); see SHAPE_KEYS.
    hidden_size: int | None = _f(None, "override the preset's hidden size (model width)")
    num_layers: int | None = _f(None, "override the preset's number of decoder layers")
    num_heads: int | None = _f(None, "override the preset's query heads (a multiple of num_kv_heads)")
    num_kv_heads: int | None = _f(None, "override the preset's key/value heads (grouped-query attention)")
    head_dim: int | None = _f(None, "override the preset's size of one attention head (even, for RoPE)")
    intermediate_size: int | None = _f(None, "override the preset's feed-forward (GeGLU) width")
    sliding_window: int | None = _f(None, "override the preset's attention window of the even (local) layers")
    context: int | None = _f(None, "override the preset's context length in tokens (max_position_embeddings)")
    attention: str = _f("auto", "attention backend", choices=("auto", *ATTENTION_BACKENDS))


# [model] keys that change the model's shape -> the Gemma2Config field each one sets.
SHAPE_KEYS: dict[str, str] = {
    "hidden_size": "hidden_size", "num_layers": "num_layers", "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
    "sliding_window": "sliding_window", "context": "max_position_embeddings",
}


@dataclass
class DataConfig:
    stores: list[str] = _f(None, "token store directories (gemma-ewc tokenize output)", factory=list)
    weights: list[float] = _f(None, "mixture weight per store (default: equal); e.g. [0.95, 0.05] for 5% replay",
                              factory=list)
    tokenizer: str | None = _f(None, "tokenizer.model the stores must have been made with (hash checked)")
    seq_len: int = _f(256, "tokens per packed row")
    batch_size: int = _f(8, "rows per micro-batch on each rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    num_workers: int = _f(0, "loader worker processes per rank")
    seed: int = _f(0, "shuffle seed")


@dataclass
class OptimConfig:
    lr: float = _f(2e-4, "peak learning rate")
    betas: list[float] = _f(None, "Adam betas", factory=lambda: [0.9, 0.999])
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.01, "decoupled weight decay")
    schedule: str = _f("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    warmup: float = _f(0.05, "warm-up: a fraction of max_steps if < 1, else a number of steps")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr")
    max_steps: int = _f(100, "optimizer steps to train")
    clip: float = _f(1.0, "gradient-norm clipping threshold (0 = off)")
    backend: str = _f("auto", "fused step backend", choices=("auto", *OPTIMIZER_BACKENDS))


@dataclass
class EWCConfig:
    file: str | None = _f(None, "EWC file (gemma-ewc fisher output); none = plain AdamW")
    ewc_lambda: float = _f(0.0, "EWC strength λ", key="lambda")
    clip: str = _f("task", "what clipping sees: the data gradient only, or data + EWC gradient (coupled mode only)",
                   choices=("task", "total"))
    mode: str = _f("coupled", "EWC gradient through Adam's moments (coupled), or Adam on the data gradient and then "
                   "a pull towards the anchor by lr·λ·F (decoupled)", choices=EWC_MODES)
    fisher_normalize: str = _f("none", "divide the Fisher by its mean or max when loading",
                               choices=("none", "mean", "max"))
    fisher_dtype: str = _f("float32", "Fisher storage dtype in memory", choices=("float32", "bfloat16"))
    anchor_dtype: str = _f("bfloat16", "anchor storage dtype in memory", choices=("float32", "bfloat16"))
    strict_anchor: bool = _f(False, "error (instead of warn) when the anchor differs from the starting weights")


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, "HSDP: replicas (typically the number of nodes); 1 = plain FSDP")
    dp_shard: int = _f(-1, "ranks each parameter is sharded over (-1 = world size / dp_replicate)")
    activation_checkpointing: str = _f(
        "auto", "recompute activations in backward: auto (on CUDA the least recomputation that fits the device's "
        "memory, measured at start; none on CPU), none, op (op-level selective: matmul and attention outputs kept), "
        "selective (every other block), full (every block)", choices=("auto", "none", "op", "selective", "full"))
    compile: bool | None = _f(None, "torch.compile each decoder block (unset: on CUDA yes, on CPU no)")
    param_dtype: str = _f("bfloat16", "compute dtype of the sharded model (CPU runs use float32)",
                          choices=("bfloat16", "float32"))
    reduce_dtype: str = _f("float32", "gradient reduction dtype", choices=("bfloat16", "float32"))
    device: str = _f("auto", "cuda or cpu (auto: cuda when available)", choices=("auto", "cuda", "cpu"))
    deterministic: bool = _f(False, "deterministic algorithms (bit-identical resume on CPU)")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "save every N steps (0 = only at the end)")
    keep: int = _f(2, "complete checkpoints to keep")
    resume: bool = _f(True, "resume from the newest complete checkpoint in the run directory")


@dataclass
class LoggingConfig:
    every: int = _f(1, "log every N steps")
    tensorboard: bool = _f(False, "also write TensorBoard events (needs tensorboard installed)")
    progress: bool = _f(True, "one-line progress display on rank 0")


@dataclass
class TrainConfig:
    model: ModelConfig = _f(None, "model", factory=ModelConfig)
    data: DataConfig = _f(None, "data", factory=DataConfig)
    optim: OptimConfig = _f(None, "optimizer", factory=OptimConfig)
    ewc: EWCConfig = _f(None, "EWC", factory=EWCConfig)
    parallel: ParallelConfig = _f(None, "parallelism", factory=ParallelConfig)
    checkpoint: CheckpointConfig = _f(None, "checkpoints", factory=CheckpointConfig)
    logging: LoggingConfig = _f(None, "logging", factory=LoggingConfig)
    seed: int = _f(0, "seed of the model initialisation and of sampling")
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite steps")


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {_key(f): f for f in dataclasses.fields(cls)}


def _describe(cls, prefix: str) -> str:
    return ", ".join(f"{prefix}{k}" for k in _fields(cls))


def _coerce(value: Any, annotation: Any, where: str, choices: tuple | None) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where, choices)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]", None) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is bool and not isinstance(value, bool):
        raise UserError(f"{where} must be true or false, got {value!r}")
    if annotation in (int, float) and (isinstance(value, bool) or not isinstance(value, annotation)):
        raise UserError(f"{where} must be {'an integer' if annotation is int else 'a number'}, got {value!r}")
    if annotation is str and not isinstance(value, str):
        raise UserError(f"{where} must be a string, got {value!r}")
    if choices and value not in choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"unknown config key '{prefix}{key}'; valid keys here: {_describe(cls, prefix)}")
        f = known[key]
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise UserError(f"{prefix}{key} must be a section (a TOML table), got {value!r}")
            kwargs[f.name] = _build(annotation, value, f"{prefix}{key}.")
        else:
            kwargs[f.name] = _coerce(value, annotation, f"{prefix}{key}", f.metadata.get("choices"))
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: --set model.attention=flex


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value (e.g. optim.lr=1e-4), got {item!r}")
        dotted, text = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {dotted}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path} is not valid TOML: {exc}") from None
    config = _build(TrainConfig, apply_overrides(raw, list(overrides)), "")
    validate(config)
    return config


def model_shape(model: ModelConfig) -> Gemma2Config:
    """The preset's shape with [model]'s overrides applied (vocab_size and SHAPE_KEYS); errors name the keys.

    query_pre_attn_scalar follows head_dim when the preset has them equal (gemma2-2b, gemma2-9b, small), and keeps
    the preset's value otherwise (gemma2-27b: hidden_size / num_heads = 144, tiny: 24 on purpose, so that tests
    see scalar != head_dim).
    """
    try:
        base = Gemma2Config.preset(model.preset)
    except ValueError as exc:
        raise UserError(f"model.preset: {exc}") from None
    overrides = {field: getattr(model, key) for key, field in SHAPE_KEYS.items() if getattr(model, key) is not None}
    for key, field_name in SHAPE_KEYS.items():
        if field_name in overrides and overrides[field_name] < 1:
            raise UserError(f"model.{key} must be at least 1, got {overrides[field_name]}")
    if model.vocab_size:
        overrides["vocab_size"] = model.vocab_size

    def described(key: str) -> str:
        value = overrides.get(SHAPE_KEYS[key], getattr(base, SHAPE_KEYS[key]))
        return f"model.{key} ({value}{'' if SHAPE_KEYS[key] in overrides else ', from preset ' + model.preset})"

    heads = overrides.get("num_heads", base.num_heads)
    kv_heads = overrides.get("num_kv_heads", base.num_kv_heads)
    if heads % kv_heads:
        raise UserError(f"{described('num_heads')} must be a multiple of {described('num_kv_heads')}: each key/value "
                        f"head serves the same number of query heads")
    if overrides.get("head_dim", base.head_dim) % 2:
        raise UserError(f"{described('head_dim')} must be even: RoPE rotates pairs of dimensions")
    if "head_dim" in overrides and base.query_pre_attn_scalar == base.head_dim:
        overrides["query_pre_attn_scalar"] = overrides["head_dim"]
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:  # a rule of Gemma2Config not checked above
        raise UserError(f"model: {exc}") from None


def validate(config: TrainConfig) -> None:
    d, o = config.data, config.optim
    shaped = [f"model.{key}" for key in SHAPE_KEYS if getattr(config.model, key) is not None]
    if config.model.pretrained and shaped:
        raise UserError(f"{', '.join(shaped)} cannot be combined with model.pretrained: the checkpoint fixes the "
                        f"model's shape (remove them, or start from random initialisation without model.pretrained)")
    if not config.model.pretrained:
        model_shape(config.model)
    if config.model.context is not None and config.model.context < d.seq_len:
        raise UserError(f"model.context ({config.model.context}) is shorter than data.seq_len ({d.seq_len}): the "
                        f"model would train on rows longer than its context")
    for where, value in (("data.seq_len", d.seq_len), ("data.batch_size", d.batch_size),
                         ("data.grad_accum", d.grad_accum), ("optim.max_steps", o.max_steps)):
        if value < 1:
            raise UserError(f"{where} must be at least 1, got {value}")
    if d.weights and len(d.weights) != len(d.stores):
        raise UserError(f"data.weights has {len(d.weights)} entries for {len(d.stores)} data.stores")
    if any(w < 0 for w in d.weights) or (d.weights and sum(d.weights) <= 0):
        raise UserError(f"data.weights must be non-negative with a positive sum, got {d.weights}")
    if d.weights:  # the mixture the loader will make of the stores with a positive weight (a 0 leaves one out)
        try:
            mixture_period([w for w in d.weights if w > 0])
        except UserError as exc:
            raise UserError(f"data.weights: {exc}") from None
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise UserError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    for where, value in (("optim.lr", o.lr), ("optim.eps", o.eps), ("optim.weight_decay", o.weight_decay),
                         ("optim.clip", o.clip)):
        if not (math.isfinite(value) and value >= 0):  # NaN fails every comparison: test for what is allowed
            raise UserError(f"{where} must be a finite number >= 0, got {value}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    try:
        warmup_steps_of(o.warmup, o.max_steps)
    except UserError as exc:
        raise UserError(f"optim.{exc}") from None
    if not math.isfinite(config.ewc.ewc_lambda):
        raise UserError(f"ewc.lambda must be a finite number >= 0, got {config.ewc.ewc_lambda}")
    if config.ewc.ewc_lambda < 0:
        raise UserError(f"ewc.lambda must be >= 0, got {config.ewc.ewc_lambda}")
    if config.ewc.ewc_lambda > 0 and not config.ewc.file:
        raise UserError("ewc.lambda > 0 needs ewc.file (an EWC file made by `gemma-ewc fisher`)")
    if config.ewc.mode == "decoupled" and config.ewc.clip == "total":
        raise UserError("ewc.clip = total clips the sum of the data and EWC gradients, which ewc.mode = decoupled "
                        "does not form (the EWC term is a pull after the Adam update): use ewc.clip = task")


def to_dict(config) -> dict:
    """Nested plain dict with TOML key names (λ appears as `lambda`)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: TrainConfig) -> str:
    """The resolved configuration as TOML (None values omitted: TOML has no null); loads back to the same config."""
    lines: list[str] = []
    tables = []
    for key, value in to_dict(config).items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"

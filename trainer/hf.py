"""Hugging Face Gemma2 directories <-> our model: names, config.json, single or sharded safetensors.

Our parameter names are Hugging Face's without the leading "model." (`layers.0.mlp.gate_proj.weight` is
`model.layers.0.mlp.gate_proj.weight` on disk). The LM head is tied to the embedding: `lm_head.weight`, when a
checkpoint carries it, is checked against the embedding and not loaded twice.

Loading streams one tensor at a time from memory-mapped shards into parameters that already have their final
dtype and device, so a checkpoint never sits in memory twice. `HFCheckpoint.read(name, index=...)` reads one
part only (safetensors slicing): a sharded model loads just its own slice (trainer.distributed.local_index).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.dtypes import DTYPES, dtype_name
from trainer.errors import UserError
from trainer.fileio import atomic_path
from trainer.model import Gemma2, Gemma2Config

HF_PREFIX = "model."
TIED_HEAD = "lm_head.weight"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ACTIVATION = "gelu_pytorch_tanh"


def to_hf_name(name: str) -> str:
    return HF_PREFIX + name


def from_hf_name(hf_name: str) -> str:
    if not hf_name.startswith(HF_PREFIX):
        raise KeyError(hf_name)
    return hf_name[len(HF_PREFIX):]


# Wrapper prefixes that torch.compile / activation-checkpoint wrappers insert into parameter names.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def hf_param_name(name: str) -> str:
    """Our parameter name (maybe wrapped) -> Hugging Face name (`model.layers.0...`)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return to_hf_name(name)


def named_hf_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(Hugging Face name, parameter) for every parameter of `model` (plain, compiled, checkpointed or sharded)."""
    return [(hf_param_name(n), p) for n, p in model.named_parameters()]


def config_from_hf(raw: Mapping, *, source: str = "config.json"):
    """Gemma2Config from a Hugging Face config dict; anything that is not Gemma2 as we implement it is an error."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type != "gemma2" and "Gemma2ForCausalLM" not in architectures:
        raise UserError(f"{source} describes a {model_type or 'unknown'!r} model (architectures {architectures}), "
                        f"not Gemma2: gemma-ewc trains Gemma2 checkpoints (model_type 'gemma2')")
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or ACTIVATION
    if activation != ACTIVATION:
        raise UserError(f"{source}: hidden activation {activation!r} is not Gemma2's {ACTIVATION!r}")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{source}: RoPE scaling {rope!r} is not supported (Gemma2 uses plain RoPE)")
    theta = raw.get("rope_theta", rope.get("rope_theta", 10_000.0))
    num_layers = raw["num_hidden_layers"]
    layer_types = raw.get("layer_types")
    expected = ["sliding_attention" if Gemma2Config.is_sliding(i) else "full_attention" for i in range(num_layers)]
    if layer_types is not None and list(layer_types) != expected:
        raise UserError(f"{source}: layer_types {layer_types} differ from Gemma2's alternation "
                        f"(sliding on even layers, global on odd ones)")
    try:
        return Gemma2Config(
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_layers=num_layers,
            num_heads=raw["num_attention_heads"], num_kv_heads=raw.get("num_key_value_heads",
                                                                       raw["num_attention_heads"]),
            head_dim=raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"]),
            query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256),
            sliding_window=raw.get("sliding_window") or 4096,
            attn_softcap=raw.get("attn_logit_softcapping"), final_softcap=raw.get("final_logit_softcapping"),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", 8192),
            bos_token_id=raw.get("bos_token_id", 2), eos_token_id=_first(raw.get("eos_token_id", 1)),
            pad_token_id=raw.get("pad_token_id", 0) if raw.get("pad_token_id") is not None else 0)
    except KeyError as exc:
        raise UserError(f"{source} lacks the field {exc.args[0]!r} that a Gemma2 config must have") from None
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def config_to_hf(config, *, dtype: torch.dtype = torch.bfloat16) -> dict:
    c = config
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "sliding_window": c.sliding_window,
        "layer_types": ["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.num_layers)],
        "attn_logit_softcapping": c.attn_softcap,
        "final_logit_softcapping": c.final_softcap,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "hidden_activation": ACTIVATION,
        "hidden_act": ACTIVATION,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "torch_dtype": dtype_name(dtype) if dtype in DTYPES.values() else "float32",
    }


class HFCheckpoint:
    """A Hugging Face Gemma2 directory opened for reading: config, tensor names and shapes, (partial) reads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory; give a Hugging Face Gemma2 directory "
                            f"(config.json + {SINGLE_FILE} or {INDEX_FILE} with its shards)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{config_path} not found: a Hugging Face model directory needs its config.json")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_path} is not valid JSON ({exc})") from None
        self.config = config_from_hf(raw, source=str(config_path))
        index_path, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{index_path} is not a safetensors index (needs a 'weight_map'): {exc}") from None
            self.file_of = {name: self.path / shard for name, shard in weight_map.items()}
            missing = sorted({str(f.name) for f in self.file_of.values() if not f.is_file()})
            if missing:
                raise UserError(f"{self.path}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing; "
                                f"re-download or re-export the checkpoint")
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.file_of = {name: single for name in f.keys()}
        else:
            raise UserError(f"{self.path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.file_of.values())):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    self._shapes[name] = tuple(f.get_slice(name).get_shape())
        absent = sorted(n for n in self.file_of if n not in self._shapes)
        if absent:
            raise UserError(f"{self.path}: {INDEX_FILE} lists {absent[:3]} but the shards do not contain them")

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, *, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """One tensor, or only its part `index` (a slice per dimension), read without loading the rest."""
        with safe_open(self.file_of[name], framework="pt") as f:
            if index is None:
                return f.get_tensor(name)
            return f.get_slice(name)[index]

    def by_file(self) -> Iterator[tuple[Path, list[str]]]:
        files: dict[Path, list[str]] = {}
        for name, file in self.file_of.items():
            files.setdefault(file, []).append(name)
        yield from sorted(files.items())


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every parameter of a Gemma2 of this config (no allocation)."""
    with torch.device("meta"):
        model = Gemma2(config)
    return {to_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}


def load_state_into(model, checkpoint: HFCheckpoint) -> None:
    """Copy every parameter of `model` (not sharded) from `checkpoint`, one tensor at a time."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file, names in checkpoint.by_file():
        with safe_open(file, framework="pt") as f:
            for hf_name in names:
                if hf_name == TIED_HEAD:
                    continue
                try:
                    name = from_hf_name(hf_name)
                    param = params[name]
                except KeyError:
                    raise UserError(f"{file.name} holds tensor {hf_name!r}, which Gemma2 does not have: "
                                    f"is {checkpoint.path} a Gemma2 checkpoint?") from None
                shape = checkpoint.shape(hf_name)
                if shape != tuple(param.shape):
                    raise UserError(f"{file.name}: tensor {hf_name!r} has shape {shape}, but config.json implies "
                                    f"{tuple(param.shape)}; the weights and config.json do not belong together")
                with torch.no_grad():
                    param.copy_(f.get_tensor(hf_name))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise UserError(f"{checkpoint.path}: {len(missing)} parameter(s) missing from the checkpoint, e.g. "
                        f"{[to_hf_name(n) for n in missing[:3]]}")
    if TIED_HEAD in checkpoint.file_of:
        head = checkpoint.read(TIED_HEAD)
        embed = params["embed_tokens.weight"]
        if head.shape != embed.shape or not torch.equal(head.to(embed.device, embed.dtype), embed.detach()):
            raise UserError(f"{checkpoint.path}: {TIED_HEAD} differs from the embedding, but Gemma2 ties them")


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", attention_backend: str = "auto"):
    """A Hugging Face Gemma2 directory -> `Gemma2` in `dtype` on `device` (built on meta, filled tensor by tensor)."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    checkpoint = HFCheckpoint(path)
    with torch.device("meta"):
        model = Gemma2(checkpoint.config, attention_backend=attention_backend)
    model = model.to(dtype).to_empty(device=device)
    load_state_into(model, checkpoint)
    return model


def write_hf_checkpoint(path: str | os.PathLike, config, *, shapes: Mapping[str, tuple[int, ...]],
                        fetch: Callable[[str], torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                        max_shard_bytes: int = 5 * 2**30, tokenizer: str | os.PathLike | None = None,
                        extra_files: Mapping[str, str] | None = None) -> Path:
    """Write a Hugging Face Gemma2 directory atomically, one shard in memory at a time.

    `shapes` maps Hugging Face names to shapes (they plan the shards before any tensor is fetched); `fetch(name)`
    returns that full tensor (for a sharded model: gathered on demand).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    total = sum(itemsize * int(torch.Size(s).numel()) for s in shapes.values())
    path = Path(path)
    with atomic_path(path, is_dir=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, dtype=dtype), indent=2) + "\n")
        weight_map = {}
        for i, names in enumerate(plan):
            file = SINGLE_FILE if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for name in names:
                t = fetch(name).detach().to(device="cpu", dtype=dtype).contiguous()
                if tuple(t.shape) != tuple(shapes[name]):
                    raise ValueError(f"{name}: fetched shape {tuple(t.shape)}, planned {tuple(shapes[name])}")
                tensors[name] = t
                weight_map[name] = file
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        if len(plan) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def save_pretrained(model, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                    max_shard_bytes: int = 5 * 2**30, tokenizer: str | os.PathLike | None = None) -> Path:
    """Our (unsharded) model -> a Hugging Face Gemma2 directory that transformers.AutoModelForCausalLM loads."""
    params = dict(model.named_parameters())
    shapes = {to_hf_name(n): tuple(p.shape) for n, p in params.items()}
    return write_hf_checkpoint(path, model.config, shapes=shapes, fetch=lambda n: params[from_hf_name(n)],
                               dtype=dtype, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)

"""Export: a training checkpoint -> a Hugging Face Gemma2 directory (`gemma-ewc export`, trainer/commands/export.py).

    step_dir = resolve_checkpoint("runs/x")                     # a run, checkpoints or step directory -> step dir
    out = export_checkpoint("runs/x", "models/x", dtype=torch.bfloat16)

The weights are read one tensor at a time from the torch.distributed.checkpoint files, without a process group or
the whole model in memory. Beside the weights, gemma-ewc.json records the run's label and EWC λ (read by
`gemma-ewc eval`), the checkpoint it came from and what it was trained on (`training_context`: the sequence
length `eval` scores at by default, the data stores and their mixture weights, the step); the run's
tokenizer.model is copied when it still exists.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from trainer.checkpoint import STATE_FILE, find_latest, is_complete, read_model_tensor
from trainer.config import DataConfig, tomllib
from trainer.errors import UserError
from trainer.hf import config_from_hf, expected_shapes, from_hf_name, write_hf_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, a checkpoints directory or a run directory -> the step directory (newest complete)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} not found")
    if is_complete(path):
        return path
    for candidate in (path, path / "checkpoints"):
        found = find_latest(candidate)
        if found is not None:
            return found
    raise UserError(f"{path} holds no complete training checkpoint")


def run_tokenizer(step_dir: Path) -> str | None:
    """The tokenizer the run trained with (its data.tokenizer), or None."""
    return tomllib.loads((step_dir / "config.toml").read_text()).get("data", {}).get("tokenizer") or None


def training_context(step_dir: Path, run_config: dict) -> dict:
    """What the model was trained on, for gemma-ewc.json: "seq_len" (the context `gemma-ewc eval` scores at by
    default), "data_stores", "data_weights" (normalised to sum 1; null for a single store) and "step"."""
    data = run_config.get("data", {})
    stores = [str(s) for s in data.get("stores", [])]
    weights = [float(w) for w in data.get("weights") or [1.0] * len(stores)]
    total = sum(weights)
    return {"seq_len": int(data.get("seq_len", DataConfig().seq_len)), "data_stores": stores,
            "data_weights": [w / total for w in weights] if len(stores) > 1 else None,
            "step": int(json.loads((step_dir / STATE_FILE).read_text())["step"])}


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                      tokenizer: str | None = None) -> Path:
    """A training checkpoint -> a Hugging Face Gemma2 directory, reading one tensor at a time (no process group)."""
    step_dir = resolve_checkpoint(checkpoint)
    model_config = config_from_hf(json.loads((step_dir / "config.json").read_text()),
                                  source=str(step_dir / "config.json"))
    if tokenizer is None:
        tokenizer = run_tokenizer(step_dir)
        if tokenizer and not Path(tokenizer).is_file():
            warnings.warn(f"the run's tokenizer {tokenizer} is gone; exporting without tokenizer.model")
            tokenizer = None
    shapes = expected_shapes(model_config)
    run_config = tomllib.loads((step_dir / "config.toml").read_text())
    # Read by `gemma-ewc eval` (label, λ) so results and reports name the run without extra flags. λ is only
    # meaningful for a continued model (model.pretrained set), not for a from-scratch run.
    continued = bool(run_config.get("model", {}).get("pretrained"))
    lam = run_config.get("ewc", {}).get("lambda", 0.0) if run_config.get("ewc", {}).get("file") else 0.0
    ewc_mode = run_config.get("ewc", {}).get("mode", "coupled") if lam else None
    metadata = {"label": step_dir.parent.parent.name, "ewc_lambda": lam if continued else None,
                "ewc_mode": ewc_mode if continued else None, "checkpoint": str(step_dir.resolve()),
                **training_context(step_dir, run_config)}

    def fetch(hf_name: str) -> torch.Tensor:
        return read_model_tensor(step_dir, from_hf_name(hf_name), torch.empty(shapes[hf_name]))

    path = write_hf_checkpoint(out, model_config, shapes=shapes, fetch=fetch, dtype=dtype, tokenizer=tokenizer,
                               extra_files={"gemma-ewc.json": json.dumps(metadata, indent=2) + "\n"})
    return path

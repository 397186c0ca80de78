"""Import the reference study's EWC pickle: `(anchors, fisher)` with anchors a list of (name, tensor) pairs (the
model's `named_parameters()`, float16) and fisher a dict name -> float16 tensor whose infinities were replaced by
100 ("inf cap").

A pickle can run any code when loaded, so it is read with a restricted unpickler that admits only what rebuilds
tensors (torch's own tensor/parameter rebuild functions, storages, OrderedDict for the empty hook dicts) besides
the builtin lists, tuples, dicts, strings and numbers. A `torch.save` file (zip) goes through
`torch.load(weights_only=True)`, torch's restricted unpickler for the same purpose. Anything else is refused.

Entries equal to the cap are counted and reported ("capped infinities") and kept as they are: they were +inf in
the float16 Fisher, and changing them would be a silent fix of somebody else's data.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

from trainer.dtypes import dtype_name
from trainer.errors import UserError
from trainer.ewc.file import write_ewc
from trainer.fileio import sha256_file

DEFAULT_INF_CAP = 100.0
TIED_HEAD = "lm_head.weight"


def _load_storage_from_bytes(b: bytes):
    # torch pickles a storage as torch.save(storage) bytes: load those with torch's restricted unpickler too.
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    return data.detach()


class Refused(pickle.UnpicklingError):
    """The pickle references something outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): lambda: _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): lambda: _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): lambda: _load_storage_from_bytes,
        ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    }

    def find_class(self, module: str, name: str):
        make = self.ALLOWED.get((module, name))
        if make is None:
            raise Refused(f"{module}.{name}")
        return make()

    def persistent_load(self, pid):
        raise Refused(f"persistent id {pid!r}")


def load_legacy_pickle(path: str | os.PathLike):
    """The object in a reference-study pickle, loaded without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    refuse = (f"{path}: refused to load: the pickle references {{}}, which is not a tensor, list, tuple or dict. "
              f"Loading it could run arbitrary code; only the reference study's (anchors, fisher) pickle is read")
    if zipfile.is_zipfile(path):
        return _torch_load(path, refuse)
    with open(path, "rb") as fh:
        try:
            obj = RestrictedUnpickler(fh).load()
        except Refused as exc:
            raise UserError(refuse.format(exc)) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise UserError(f"{path}: not a readable pickle (truncated or damaged: {exc!r})") from None
    if isinstance(obj, int):  # legacy (pre-zip) torch.save files begin with a magic number pickle
        return _torch_load(path, refuse)
    return obj


def _torch_load(path: Path, refuse: str):
    """A torch.save file through torch's weights_only loader (tensors and containers only)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch's message goes on to advise weights_only=False, which would run the file's code: keep only what
        # it rejected.
        raise UserError(refuse.format(f"something torch's weights_only loader rejects ({_rejected(exc)})")
                        ) from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable torch.save file ({_first_line(exc)})") from None


def _rejected(exc: BaseException) -> str:
    """What torch's weights_only unpickler refused (its 'WeightsUnpickler error: ...' line), without its advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("WeightsUnpickler error:")
                   and line.split(":", 1)[1].strip()), None)
    detail = detail or next((line.rstrip(".") for line in lines if "GLOBAL" in line or "unsupported" in line), None)
    return detail or "a global or a construct outside tensors and plain containers"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hf_name(name: str) -> str:
    return name if name.startswith("model.") or name == TIED_HEAD else "model." + name


def _split(obj, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    layout = "a pair (list of (name, tensor) anchors, dict name -> Fisher tensor)"
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise UserError(f"{path}: expected {layout}, got {type(obj).__name__}")
    anchors_raw, fisher_raw = obj
    if isinstance(anchors_raw, dict):
        anchors_raw = list(anchors_raw.items())
    if not isinstance(anchors_raw, (list, tuple)) or not isinstance(fisher_raw, dict):
        raise UserError(f"{path}: expected {layout}, got ({type(anchors_raw).__name__}, {type(fisher_raw).__name__})")
    anchors, fisher = {}, {}
    for item in anchors_raw:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise UserError(f"{path}: an anchor entry is not a (name, tensor) pair: {type(item).__name__}")
        anchors[_hf_name(item[0])] = item[1]
    for name, t in fisher_raw.items():
        if not (isinstance(name, str) and isinstance(t, torch.Tensor)):
            raise UserError(f"{path}: a Fisher entry is not name -> tensor: {type(name).__name__} -> "
                            f"{type(t).__name__}")
        fisher[_hf_name(name)] = t
    return anchors, fisher


def import_legacy(path: str | os.PathLike, out: str | os.PathLike, *, inf_cap: float = DEFAULT_INF_CAP,
                  fisher_dtype: torch.dtype = torch.float32, anchor_dtype: torch.dtype = torch.float32) -> dict:
    """Convert the reference study's pickle to an EWC file; returns a report (counts, capped infinities)."""
    path = Path(path)
    anchors, fisher = _split(load_legacy_pickle(path), path)
    notes = []
    if TIED_HEAD in anchors or TIED_HEAD in fisher:
        # Gemma2 ties the head to the embedding; a separate head entry is the same parameter seen twice.
        anchors.pop(TIED_HEAD, None)
        fisher.pop(TIED_HEAD, None)
        notes.append(f"dropped {TIED_HEAD} (tied to model.embed_tokens.weight in Gemma2)")
    if set(anchors) != set(fisher):
        only_a, only_f = sorted(set(anchors) - set(fisher)), sorted(set(fisher) - set(anchors))
        raise UserError(f"{path}: anchors and Fisher name different parameters (anchors only: {only_a[:3]}, "
                        f"Fisher only: {only_f[:3]})")
    if not anchors:
        raise UserError(f"{path}: the pickle holds no parameters")
    capped_total, entries, per_param = 0, 0, []
    for name in sorted(fisher):
        f, a = fisher[name], anchors[name]
        if tuple(f.shape) != tuple(a.shape):
            raise UserError(f"{path}: {name} has Fisher shape {tuple(f.shape)} but anchor shape {tuple(a.shape)}")
        if not (f.is_floating_point() and a.is_floating_point()):
            raise UserError(f"{path}: {name} is not a floating-point tensor ({f.dtype}, {a.dtype})")
        bad = ~torch.isfinite(f)
        if bool(bad.any()):
            nan, inf = int(torch.isnan(f).sum()), int(torch.isinf(f).sum())
            found = ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "")
                              if part)
            raise UserError(f"{path}: fisher {name} holds {found} value(s), which the reference study's inf cap "
                            f"({inf_cap:g}) should have replaced: this Fisher cannot be used; re-estimate it with "
                            f"`gemma-ewc fisher`")
        if bool((f < 0).any()):
            raise UserError(f"{path}: fisher {name} has negative values: not a Fisher")
        if not bool(torch.isfinite(a).all()):
            raise UserError(f"{path}: anchor {name} has non-finite values (float16 overflow of the weights?)")
        capped = int((f == inf_cap).sum())
        capped_total += capped
        entries += f.numel()
        if capped:
            per_param.append((capped, name))
    per_param.sort(reverse=True)
    report = {
        "source": str(path), "parameters": len(fisher), "entries": entries, "inf_cap": inf_cap,
        "capped_infinities": capped_total, "capped_fraction": capped_total / entries if entries else 0.0,
        "capped_by_parameter": [{"name": n, "count": c} for c, n in per_param[:10]],
        "fisher_source_dtype": dtype_name(next(iter(fisher.values())).dtype),
        "notes": notes,
    }
    metadata = {
        "estimator": "empirical", "samples": "unknown", "batch_size": "unknown",
        "data": f"imported from the reference study's pickle {path.name} (float16 Fisher, infinities capped at "
                f"{inf_cap:g})",
        "data_sha256": sha256_file(path), "source": "import-legacy",
        "inf_cap": repr(inf_cap), "capped_infinities": str(capped_total),
        "fisher_normalize": "none", "fisher_divisor": "1.0",
    }
    written = write_ewc(out, fisher=fisher, anchor=anchors, metadata=metadata, fisher_dtype=fisher_dtype,
                        anchor_dtype=anchor_dtype)
    report["anchor_sha256"] = written["anchor_sha256"]
    report["out"] = str(out)
    return report


def format_report(report: dict) -> str:
    lines = [f"imported {report['parameters']} parameters ({report['entries']:,} entries) from {report['source']} "
             f"into {report['out']}",
             f"capped infinities: {report['capped_infinities']:,} Fisher entries equal the cap "
             f"{report['inf_cap']:g} ({100 * report['capped_fraction']:.4g}% of all); they were +inf in the "
             f"{report['fisher_source_dtype']} Fisher and are kept as {report['inf_cap']:g}"]
    for item in report["capped_by_parameter"][:5]:
        lines.append(f"  {item['name']}: {item['count']:,}")
    lines += report["notes"]
    if report["capped_infinities"]:
        lines.append("re-estimating with `gemma-ewc fisher` (float32 accumulation) gives the uncapped values")
    return "\n".join(lines)

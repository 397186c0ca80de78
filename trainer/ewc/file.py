"""The EWC file: safetensors with `fisher.<name>` and `anchor.<name>` for every parameter (Hugging Face names,
`model.layers.0.mlp.gate_proj.weight`), metadata `format` = gemma-ewc/ewc-v1 plus how the Fisher was made.

Writing streams one tensor at a time (a 27B Fisher plus anchor never sits in memory whole, and a sharded model
gathers one parameter at a time): the header is written first with room to spare, the tensors follow in sorted
name order, then the header is rewritten in place with the anchor's hash, which is only known at the end. The
file appears atomically under its final name (fileio.atomic_path) or not at all.

Reading for a model gives the mapping parameter -> (fisher, anchor) that EWCAdamW(ewc=...) takes (the names are
matched by trainer.hf.named_hf_parameters, the one place that maps names); into a sharded model it reads only this
rank's slice of each tensor (safetensors slicing, the rows FSDP2's Shard(0) gives this rank:
trainer.distributed.local_index) and the tensors are DTensors placed like the parameters. Reading without a model
(inspection, tools) keys the same mapping by Hugging Face name.
Validation on load: every parameter present, shapes equal, Fisher finite and non-negative, anchor finite, and the
anchor equal to the weights being trained (a warning naming the largest difference, or an error with strict=True:
training from a model other than the one the Fisher was computed for is the most common silent mistake).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from safetensors import safe_open

from trainer.distributed import is_dtensor, like_param, local_index, local_tensor
from trainer.dtypes import dtype_name
from trainer.errors import UserError
from trainer.fileio import atomic_path, sha256_file
from trainer.hf import named_hf_parameters

FORMAT = "gemma-ewc/ewc-v1"
FISHER = "fisher."
ANCHOR = "anchor."
NORMALIZE_MODES = ("none", "mean", "max")

_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}
_HEADER_SLACK = 1024  # bytes reserved for metadata that is only known after the tensors are written


# ----------------------------------------------------------------------------------------------- streaming write

class _HeaderHash:
    """sha256 over (name, dtype, shape, bytes) of the anchor tensors in sorted name order (see anchor_sha256)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def update(self, name: str, t: torch.Tensor) -> None:
        self.h.update(f"{name}\0{_ST_DTYPE[t.dtype]}\0{list(t.shape)}\0".encode())
        self.h.update(_as_bytes(t))

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def anchor_sha256(anchors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The hash recorded as `anchor_sha256`: give (Hugging Face name, full anchor tensor in its file dtype)."""
    h = _HeaderHash()
    for name, t in sorted(anchors, key=lambda item: item[0]):
        h.update(name, t)
    return h.hexdigest()


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...], int, int]], metadata: dict[str, str],
                  size: int | None) -> bytes:
    header = {"__metadata__": metadata}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if size is None:
        size = len(raw) + _HEADER_SLACK
        size += (-(8 + size)) % 8  # tensor data starts 8-byte aligned, as safetensors writes it
    if len(raw) > size:
        raise ValueError(f"EWC metadata grew past the reserved header ({len(raw)} > {size} bytes)")
    return raw + b" " * (size - len(raw))


def write_safetensors_streaming(path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                                fetch: Callable[[str], torch.Tensor], metadata: Callable[[], dict[str, str]], *,
                                write: bool = True) -> None:
    """Write `specs` (name, dtype, shape) in that order, calling `fetch(name)` once per tensor.

    `metadata()` is called before the first tensor (to size the header) and after the last one (so it may report
    what fetching learned, e.g. a hash; it may grow by up to _HEADER_SLACK bytes in between). With
    `write=False` (the non-writing ranks of a sharded model) every fetch still happens, since fetches may be
    collectives, but nothing touches the disk.
    """
    entries, offset = [], 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        entries.append((name, dtype, tuple(shape), offset, offset + n))
        offset += n
    if not write:
        for name, _, _ in specs:
            fetch(name)
        metadata()
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            # Sized from the metadata as it stands now (hashes have their final length already), plus slack.
            header = _header_bytes(entries, {k: str(v) for k, v in metadata().items()}, None)
            fh.write(struct.pack("<Q", len(header)) + header)
            for (name, dtype, shape, begin, end) in entries:
                t = fetch(name)
                if t.dtype != dtype or tuple(t.shape) != shape:
                    raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
                fh.write(_as_bytes(t))
            final = _header_bytes(entries, {k: str(v) for k, v in metadata().items()}, len(header))
            fh.seek(8)
            fh.write(final)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def write_ewc(path: str | os.PathLike, *, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
              metadata: Mapping[str, object], fisher_dtype: torch.dtype = torch.float32,
              anchor_dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Write an EWC file atomically; returns the metadata written (anchor_sha256 added).

    `fisher` and `anchor` map Hugging Face names to tensors (plain, or DTensors of a sharded model: then every
    rank must call this; rank 0 writes, each tensor is gathered in turn). `metadata` should hold estimator,
    samples, batch_size, data, data_sha256 and the like; values become strings.
    """
    if set(fisher) != set(anchor):
        raise ValueError(f"fisher and anchor name different parameters: "
                         f"{sorted(set(fisher) ^ set(anchor))[:3]}")
    names = sorted(fisher)
    for n in names:
        if tuple(fisher[n].shape) != tuple(anchor[n].shape):
            raise ValueError(f"{n}: fisher shape {tuple(fisher[n].shape)} != anchor shape {tuple(anchor[n].shape)}")
    specs = ([(FISHER + n, fisher_dtype, tuple(fisher[n].shape)) for n in names]
             + [(ANCHOR + n, anchor_dtype, tuple(anchor[n].shape)) for n in names])
    anchor_hash = _HeaderHash()
    writer = _is_writer()

    def fetch(key: str) -> torch.Tensor:
        if key.startswith(FISHER):
            name = key[len(FISHER):]
            t = _full(fisher[name].detach()).to("cpu", fisher_dtype)
            problem = _check_fisher_values(name, t) if writer else None
            if problem:
                raise ValueError(f"refusing to write an invalid Fisher: {problem}")
            return t
        name = key[len(ANCHOR):]
        t = _full(anchor[name].detach()).to("cpu", anchor_dtype)
        if writer:
            anchor_hash.update(name, t)
        return t

    final: dict[str, str] = {}

    def meta() -> dict[str, str]:
        final.update({"format": FORMAT, "fisher_dtype": dtype_name(fisher_dtype),
                      "anchor_dtype": dtype_name(anchor_dtype), "anchor_sha256": anchor_hash.hexdigest(),
                      "parameters": str(len(names))})
        final.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        for k, v in metadata.items():
            final.setdefault(k, v if isinstance(v, str) else json.dumps(v))
        return final

    write_safetensors_streaming(path, specs, fetch, meta, write=writer)
    if dist.is_initialized() and any(is_dtensor(t) for t in fisher.values()):
        dist.barrier()  # the file exists for every rank once any rank returns
    return final


# --------------------------------------------------------------------------------------------------- reading

@dataclass
class EWCHeader:
    path: Path
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]  # parameter name -> shape (fisher and anchor agree)
    fisher_dtype: torch.dtype
    anchor_dtype: torch.dtype

    @property
    def names(self) -> list[str]:
        return sorted(self.shapes)

    @property
    def divisor(self) -> float:
        return float(self.metadata.get("fisher_divisor", "1"))


def _open_ewc_file(path: Path):
    """The EWC file opened for reading (safetensors' lazy reader), or one clear UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no such EWC file")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises SafetensorError or OSError for a bad file
        raise UserError(f"{path} is not a readable EWC file: it is truncated or not a safetensors file ({exc}); "
                        f"write it again with `gemma-ewc fisher` (or `gemma-ewc ewc import-legacy` for a .pkl)"
                        ) from None


def read_header(path: str | os.PathLike) -> EWCHeader:
    """Open an EWC file and check its structure (format, fisher/anchor pairs, shapes, dtypes): no tensor is read."""
    path = Path(path)
    with _open_ewc_file(path) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise UserError(f"{path}: metadata format is {metadata.get('format')!r}, not {FORMAT!r}: not an EWC "
                            f"file of gemma-ewc (the reference study's pickle converts with `gemma-ewc ewc "
                            f"import-legacy`)")
        shapes: dict[str, dict[str, tuple[int, ...]]] = {FISHER: {}, ANCHOR: {}}
        dtypes: dict[str, set[str]] = {FISHER: set(), ANCHOR: set()}
        for key in f.keys():
            prefix = next((p for p in (FISHER, ANCHOR) if key.startswith(p)), None)
            if prefix is None:
                raise UserError(f"{path}: unexpected tensor {key!r} (an EWC file holds only fisher.* and anchor.*)")
            sl = f.get_slice(key)
            shapes[prefix][key[len(prefix):]] = tuple(sl.get_shape())
            dtypes[prefix].add(sl.get_dtype())
    fisher, anchor = shapes[FISHER], shapes[ANCHOR]
    if set(fisher) != set(anchor):
        odd = sorted(set(fisher) ^ set(anchor))
        raise UserError(f"{path}: fisher and anchor tensors do not pair up (e.g. {odd[:3]}); the file is damaged")
    for n, shape in fisher.items():
        if anchor[n] != shape:
            raise UserError(f"{path}: {n} has fisher shape {shape} but anchor shape {anchor[n]}")
    for prefix in (FISHER, ANCHOR):
        if len(dtypes[prefix]) > 1 or not dtypes[prefix] <= set(_TORCH_DTYPE):
            raise UserError(f"{path}: {prefix}* tensors have dtype(s) {sorted(dtypes[prefix])}; expected one of "
                            f"{sorted(_TORCH_DTYPE)}")
    if not fisher:
        raise UserError(f"{path}: the EWC file holds no tensors")
    return EWCHeader(path, metadata, fisher, _TORCH_DTYPE[dtypes[FISHER].pop()], _TORCH_DTYPE[dtypes[ANCHOR].pop()])


def _check_fisher_values(name: str, t: torch.Tensor) -> str | None:
    """A problem description, or None. (Fisher must be finite and >= 0.)"""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        return f"fisher.{name} has {int(bad.sum())} non-finite value(s) (e.g. {t[bad].reshape(-1)[0].item()})"
    neg = t < 0
    if bool(neg.any()):
        return f"fisher.{name} has {int(neg.sum())} negative value(s) (min {t.min().item():.3g})"
    return None


def _agree(problems: list[str], sharded: bool) -> list[str]:
    """Every rank's problems on every rank (so all ranks raise together instead of some hanging)."""
    if not sharded:
        return problems
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    return [p for part in gathered for p in part]


@dataclass
class EWCState(Mapping):
    """The mapping parameter -> (fisher, anchor) of an EWC file, in the model's placement, plus the file's metadata.

    Loaded for a model the keys are the model's own parameters: what EWCAdamW(ewc=state) takes. Loaded without a
    model (inspection, tools) they are the Hugging Face names. `fisher` and `anchor` are the two sides, same keys.
    """

    pairs: dict[Any, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict[str, str]
    max_anchor_diff: float = 0.0
    max_anchor_diff_param: str | None = None  # its Hugging Face name
    normalize_divisor: float = 1.0

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[key]

    def __iter__(self) -> Iterator:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def fisher(self) -> dict[Any, torch.Tensor]:
        return {key: f for key, (f, _) in self.pairs.items()}

    @property
    def anchor(self) -> dict[Any, torch.Tensor]:
        return {key: a for key, (_, a) in self.pairs.items()}


def load_ewc(path: str | os.PathLike, model=None, *, strict: bool = False, normalize: str = "none",
             fisher_dtype: torch.dtype | None = None, anchor_dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> EWCState:
    """Read and validate an EWC file, for `model` (plain or FSDP2-sharded) or on its own.

    For a model: the mapping parameter -> (fisher, anchor); with a sharded model each rank reads only its slices
    and gets DTensors placed like the parameters. Without one: keyed by Hugging Face name. Dtypes
    default to the file's; `normalize` ("mean"/"max") divides the Fisher by its global mean/max after loading.
    Raises UserError for a missing/extra parameter, a shape mismatch, a non-finite or negative Fisher entry, a
    non-finite anchor; warns (strict: raises) when the anchor differs from the model's weights.
    """
    header = read_header(path)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if model is None:
        targets = {n: None for n in header.names}
        sharded = False
    else:
        named = named_hf_parameters(model)
        targets = dict(named)
        missing = sorted(set(targets) - set(header.shapes))
        extra = sorted(set(header.shapes) - set(targets))
        if missing or extra:
            raise UserError(f"{header.path} does not match the model: "
                            + (f"{len(missing)} parameter(s) missing from the file (e.g. {missing[:3]})" if missing
                               else "")
                            + ("; " if missing and extra else "")
                            + (f"{len(extra)} unknown to the model (e.g. {extra[:3]})" if extra else "")
                            + "; was the Fisher computed for another model?")
        wrong = [(n, header.shapes[n], tuple(p.shape)) for n, p in named if header.shapes[n] != tuple(p.shape)]
        if wrong:
            n, fs, ms = wrong[0]
            raise UserError(f"{header.path}: {n} has shape {fs} in the EWC file but {ms} in the model"
                            + (f" ({len(wrong) - 1} more mismatch(es))" if len(wrong) > 1 else "")
                            + "; was the Fisher computed for another model?")
        sharded = any(is_dtensor(p) for _, p in named)
    fisher_dtype = fisher_dtype or header.fisher_dtype
    anchor_dtype = anchor_dtype or header.anchor_dtype
    pairs, problems = {}, []
    diffs: dict[str, float] = {}
    with _open_ewc_file(header.path) as f:
        for name, param in targets.items():
            index = local_index(param) if param is not None else None
            dev = device if device is not None else (local_tensor(param).device if param is not None else "cpu")
            fs, an = f.get_slice(FISHER + name), f.get_slice(ANCHOR + name)
            # Read this rank's slice only, then check on the device (a GPU checks 10 GB in milliseconds).
            fl = (fs[index] if index is not None else fs[:]).to(dev)
            al = (an[index] if index is not None else an[:]).to(dev)
            problem = _check_fisher_values(name, fl)
            if problem:
                problems.append(problem)
            if not bool(torch.isfinite(al).all()):
                problems.append(f"anchor.{name} has {int((~torch.isfinite(al)).sum())} non-finite value(s)")
            if param is not None and al.numel():
                # Compare in the file's anchor dtype: a float32 model loaded from a bfloat16 checkpoint is equal.
                w = local_tensor(param).detach().to(header.anchor_dtype)
                wide = torch.promote_types(header.anchor_dtype, torch.float32)
                diffs[name] = (w.to(wide) - al.to(wide)).abs().max().item()
            elif param is not None:
                diffs[name] = 0.0
            if param is None:
                pairs[name] = (fl.to(fisher_dtype), al.to(anchor_dtype))
            else:
                pairs[param] = (like_param(fl.to(fisher_dtype), param), like_param(al.to(anchor_dtype), param))
    problems = _agree(problems, sharded)
    if problems:
        raise UserError(f"{header.path}: invalid Fisher/anchor: {problems[0]}"
                        + (f" ({len(problems) - 1} more problem(s))" if len(problems) > 1 else "")
                        + "; the Fisher must be finite and non-negative: re-estimate it")
    state = EWCState(pairs, dict(header.metadata))
    if model is not None and diffs:
        names = list(diffs)
        # On the parameters' device: NCCL reduces only CUDA tensors.
        device = local_tensor(next(iter(targets.values()))).device
        values = torch.tensor([diffs[n] for n in names], dtype=torch.float64, device=device)
        if sharded:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        values = values.cpu()
        i = int(values.argmax())
        state.max_anchor_diff, state.max_anchor_diff_param = float(values[i]), names[i]
        if state.max_anchor_diff > 0:
            message = (f"{header.path}: the EWC anchor differs from the model's weights: largest difference "
                       f"{state.max_anchor_diff:.4g} in {names[i]} ({int((values > 0).sum())} of {len(names)} "
                       f"parameters differ). The Fisher was computed for another model (anchor_sha256 "
                       f"{header.metadata.get('anchor_sha256', '?')[:12]}...); EWC will pull towards that "
                       f"model's weights")
            if strict:
                raise UserError(message)
            warnings.warn(message, stacklevel=2)
    if normalize != "none":
        state.normalize_divisor = normalize_fisher_(state.fisher, normalize)
    return state


# ------------------------------------------------------------------------------------------------ normalisation

def _replication(t) -> int:
    if not is_dtensor(t):
        return 1
    from torch.distributed.tensor import Replicate  # loaded already when a DTensor exists; plain runs skip 0.6 s

    return math.prod(t.device_mesh.size(i) for i, p in enumerate(t.placements) if isinstance(p, Replicate))


def fisher_divisor(fisher: Mapping[Any, torch.Tensor], mode: str) -> float:
    """The global mean or max of all Fisher entries of all parameters (1.0 for "none")."""
    return _global_divisor(fisher.values(), mode)


def _global_divisor(tensors: Iterable[torch.Tensor], mode: str, *, what: str = "the Fisher") -> float:
    """fisher_divisor over tensors that may be made one at a time (merge_ewc streams them): each is reduced to a
    0-dim partial and dropped. Sharded tensors (DTensors) are reduced across ranks (a collective)."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode == "none":
        return 1.0
    parts: list[torch.Tensor] = []
    count, sharded, device = 0, False, torch.device("cpu")
    for t in tensors:
        local = local_tensor(t)
        sharded |= is_dtensor(t)
        device = local.device
        count += t.numel()
        if mode == "mean":
            # A replicated shard is held by several ranks: count it once.
            parts.append(local.sum(dtype=torch.float64) / _replication(t))
        elif local.numel():
            parts.append(local.max().double())
    if mode == "mean":
        total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=device)
        if sharded:
            dist.all_reduce(total)
        value = total.item() / count if count else 0.0
    else:
        value_t = torch.stack(parts).max() if parts else torch.zeros((), dtype=torch.float64, device=device)
        if sharded:
            dist.all_reduce(value_t, op=dist.ReduceOp.MAX)
        value = value_t.item()
    if not value > 0 or not math.isfinite(value):
        raise UserError(f"cannot normalise {what} by its {mode}: it is {value} (an all-zero Fisher carries "
                        f"no information; check the data gave scored tokens)")
    return value


def normalize_fisher_(fisher: Mapping[str, torch.Tensor], mode: str) -> float:
    """Divide every Fisher tensor in place by its global mean or max ("none": leave it); returns the divisor.

    λ then has a scale one can reason about (mean: an average weight costs λ/2·Δ²), instead of the 10²..10¹² the
    reference study had to sweep because its Fisher was tiny. The divisor goes into the metadata so the raw
    Fisher is F_file · fisher_divisor.
    """
    divisor = fisher_divisor(fisher, mode)
    if divisor != 1.0:
        torch._foreach_div_([local_tensor(t) for t in fisher.values()], divisor)
    return divisor


# ------------------------------------------------------------------------------------------------------- merge

def merge_ewc(a_path: str | os.PathLike, b_path: str | os.PathLike, out: str | os.PathLike, *, gamma: float,
              fisher_dtype: torch.dtype = torch.float32, normalize: str = "none") -> dict[str, str]:
    """Online EWC: F = gamma·F_A + F_B on the raw Fishers (each file's fisher_divisor undone), anchor from B.

    Streams one parameter at a time (a second pass first, for "mean"/"max" normalisation of the result).
    """
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise UserError(f"--gamma must be a finite number >= 0, got {gamma}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    a, b = read_header(a_path), read_header(b_path)
    if set(a.shapes) != set(b.shapes):
        only_a, only_b = sorted(set(a.shapes) - set(b.shapes)), sorted(set(b.shapes) - set(a.shapes))
        raise UserError(f"cannot merge: the files name different parameters (only in A: {only_a[:3]}, only in B: "
                        f"{only_b[:3]}); they belong to different models")
    for n in a.names:
        if a.shapes[n] != b.shapes[n]:
            raise UserError(f"cannot merge: {n} has shape {a.shapes[n]} in A but {b.shapes[n]} in B")
    names = a.names
    with _open_ewc_file(a.path) as fa, _open_ewc_file(b.path) as fb:
        def merged(name: str) -> torch.Tensor:
            ta = fa.get_tensor(FISHER + name).float() * a.divisor
            tb = fb.get_tensor(FISHER + name).float() * b.divisor
            for label, t, h in (("A", ta, a), ("B", tb, b)):
                problem = _check_fisher_values(name, t)
                if problem:
                    raise UserError(f"{h.path} (file {label}): {problem}")
            return ta.mul_(gamma).add_(tb)

        divisor = _global_divisor((merged(n) for n in names), normalize, what="the merged Fisher")

        specs = ([(FISHER + n, fisher_dtype, a.shapes[n]) for n in names]
                 + [(ANCHOR + n, b.anchor_dtype, b.shapes[n]) for n in names])
        anchor_hash = _HeaderHash()

        def fetch(key: str) -> torch.Tensor:
            if key.startswith(FISHER):
                t = merged(key[len(FISHER):])
                return (t / divisor if divisor != 1.0 else t).to(fisher_dtype)
            t = fb.get_tensor(key)
            anchor_hash.update(key[len(ANCHOR):], t)
            return t

        def summary(h: EWCHeader) -> dict:
            keep = ("estimator", "samples", "batch_size", "data", "data_sha256", "anchor_sha256", "fisher_divisor")
            return {"file": h.path.name, "sha256": sha256_file(h.path),
                    **{k: h.metadata[k] for k in keep if k in h.metadata}}

        def samples() -> str:
            try:
                return str(int(a.metadata["samples"]) + int(b.metadata["samples"]))
            except (KeyError, ValueError):
                return "unknown"

        est_a, est_b = a.metadata.get("estimator", "?"), b.metadata.get("estimator", "?")
        meta = {
            "format": FORMAT, "fisher_dtype": dtype_name(fisher_dtype), "anchor_dtype": dtype_name(b.anchor_dtype),
            "estimator": est_b if est_a == est_b else f"{est_a}+{est_b}", "samples": samples(),
            "batch_size": b.metadata.get("batch_size", "unknown"),
            "data": f"online EWC: {gamma:g} x [{a.metadata.get('data', '?')}] + [{b.metadata.get('data', '?')}]",
            "data_sha256": b.metadata.get("data_sha256", ""),
            "fisher_normalize": normalize, "fisher_divisor": repr(divisor),
            "merge": json.dumps({"gamma": gamma, "a": summary(a), "b": summary(b)}),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parameters": str(len(names)),
        }

        def final_meta() -> dict[str, str]:
            meta["anchor_sha256"] = anchor_hash.hexdigest()
            return meta

        write_safetensors_streaming(out, specs, fetch, final_meta)
    return meta

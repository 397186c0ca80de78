"""EWCAdamW (AdamW with the EWC gradient fused into the step), gradient clipping, and learning-rate schedules.

    opt = EWCAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, ewc_lambda=0.0,
                   ewc=load_ewc(path, model), backend="auto", ewc_mode="coupled")  # or fisher=[...], anchor=[...]
    opt.set_ewc_state(ewc=state, ewc_lambda=ewc_lambda, ewc_mode=mode)  # later, e.g. after a sharded load
    task_norm, total_norm = opt.clip_grad_norm_(1.0, mode="task")
    opt.step()
    opt.last_penalty, opt.last_ewc_grad_norm            # 0-dim tensors
    opt.set_drift_buckets({param: bucket}, names)      # per-block drift telemetry (the trainer: by parameter name)
    opt.last_drift                                     # float64 [buckets, 2]: sum F (p - anchor)^2, sum (p - anchor)^2

step(), in one pass over memory per dtype group (kernels/ewc_adamw.py; "triton" on CUDA, "cpp" on CPU, "torch"
anywhere), by `ewc_mode`:
    "coupled" (default): g' = g + ewc_lambda * F * (p - anchor), then exactly torch.optim.AdamW's update on g'.
    "decoupled": torch.optim.AdamW's update on g alone, then p = (p + c * anchor) / (1 + c) with c = lr *
        ewc_lambda * F, the proximal (implicit) step of the penalty over a time lr: the pull of the explicit step
        lr * ewc_lambda * F * (anchor - p) to first order, and never past the anchor. Clip mode "total" is refused
        in this mode (there is no sum of data and EWC gradients to clip).
The penalty and the EWC-gradient norm are reduced at the pre-step parameters in both modes, and so is the drift
per bucket when buckets are set (the kernels' per-block partial sums, segment-summed per tensor and then per bucket
on the device: no second pass, no host sync; all-reduced across shards on first read like the penalty). Nothing
EWC-related runs in the forward or backward pass. On CUDA neither clip_grad_norm_() nor step() makes the host wait
for the device: the norms, the clip scale and the sums stay on the device, and the kernels' small index and pointer
tables go up through pinned memory without blocking (kernels.ewc_adamw.upload; tests/test_gpu_sync.py). A parameter
whose .grad is None is skipped entirely (no EWC pull, no decay, no step count), as torch.optim.AdamW skips it.

EWC state is the mapping parameter -> (fisher, anchor) that trainer.ewc.load_ewc(path, model) returns; positional
lists `fisher[i]`, `anchor[i]` (the i-th parameter in param-group order) are turned into that mapping on entry.
It is validated once, on entry (placement, shape, dtype, device, contiguity), and becomes the kernel's
TensorGroups (kernels/ewc_adamw.py), which cache their pointer tables. Sharded parameters (FSDP2 DTensors) are
updated through their local shards; F and anchor are DTensors of the same placement, or plain tensors of the
local shard's shape. The optimizer state (step, exp_avg, exp_avg_sq) is stored like torch.optim.AdamW's (exp_avg
a DTensor for a DTensor parameter), so state_dict/load_state_dict and
torch.distributed.checkpoint.state_dict.get_optimizer_state_dict work unchanged. F and anchor are not optimizer
state: they come from the EWC file on every run and are never saved in state_dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from kernels.ewc_adamw import (BACKENDS, CLIP_MODES, EWC_DTYPES, EWC_MODES, TensorGroup, grad_sq_norms_groups,
                               group_tensors, resolve_backend, step_groups, upload)
from trainer.distributed import is_dtensor, local_tensor
from trainer.dtypes import dtype_name
from trainer.errors import UserError

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # a torch build without distributed support
    DTensor = Partial = Replicate = Shard = None

SCHEDULES = ("constant", "linear", "cosine")


# ------------------------------------------------------------------------------------------- learning-rate schedule


def warmup_steps_of(warmup: int | float, total_steps: int) -> int:
    """Warm-up length in steps: a float in [0, 1) is a fraction of `total_steps`, an int (or a whole float >= 1)
    a number of steps."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0 or math.isnan(warmup):
        raise UserError(f"warmup must be a fraction in [0, 1) or a number of steps >= 0, got {warmup!r}")
    if isinstance(warmup, float) and warmup < 1:
        return int(round(warmup * total_steps))
    if isinstance(warmup, float) and not warmup.is_integer():
        raise UserError(f"warmup {warmup} is neither a fraction in [0, 1) nor a whole number of steps")
    return int(warmup)


def lr_at(step: int, *, base_lr: float, total_steps: int, schedule: str = "cosine", warmup: int | float = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0 for the first step).

    Linear warm-up from base_lr / W to base_lr over the first W steps (W from `warmup`, see `warmup_steps_of`),
    then "constant" (base_lr), "linear" or "cosine" decay to min_lr_ratio * base_lr at step total_steps - 1 and
    held there after it.
    """
    if schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise UserError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w = warmup_steps_of(warmup, total_steps)
    if step < w:
        return base_lr * (step + 1) / w
    if schedule == "constant":
        return base_lr
    decay_steps = total_steps - w - 1
    if decay_steps > 0:
        progress = min(1.0, (step - w) / decay_steps)
    else:  # at most one step after warm-up: it runs at base_lr
        progress = 0.0 if step == w else 1.0
    if schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (a float: a new value never recompiles a kernel)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)


# ---------------------------------------------------------------------------------------------------- helpers


def _reduce_key(p: Tensor):
    """How partial sums over p's local shard combine across ranks: None (a plain tensor: the local value is the
    whole), or (mesh, mesh dims over which p is sharded)."""
    if not is_dtensor(p):
        return None
    dims = tuple(i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate))
    return (p.device_mesh, dims) if dims else None


def _all_reduce(local: Tensor, key) -> Tensor:
    """Sum a 0-dim partial over the ranks that hold different shards (a collective: every rank must call it)."""
    if key is None:
        return local
    mesh, dims = key
    placements = [Partial() if i in dims else Replicate() for i in range(mesh.ndim)]
    return DTensor.from_local(local, mesh, placements, run_check=False).full_tensor()


def _sum_reduced(parts: Iterable[tuple[object, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(sum of a, sum of b) over (reduce key, a, b), each all-reduced over its key's ranks (collectives, in order);
    float64 zeros when there are none."""
    first = second = None
    for key, a, b in parts:
        a, b = _all_reduce(a, key), _all_reduce(b, key)
        first = a if first is None else first + a
        second = b if second is None else second + b
    if first is None:
        first = second = torch.zeros((), dtype=torch.float64)
    return first, second


def _tensor_summary(t: Tensor) -> str:
    kind = f"DTensor {tuple(t.placements)}" if is_dtensor(t) else "tensor"
    return f"{kind} of shape {tuple(t.shape)}, {dtype_name(t.dtype)} on {t.device}"


# ---------------------------------------------------------------------------------------------------- optimizer


@dataclass
class _Plan:
    """The kernel groups of one param group's parameters that have gradients; group.indices index `params`."""

    key: tuple
    params: list[Tensor]  # the group's parameters that have gradients, in group order
    steps: Tensor  # float32 [len(params)], CPU: state[p]["step"] are views of it
    # (reduce key, parameter dtype) -> groups: one call each (the dtype picks the backend), summed per reduce key
    groups: dict[tuple, list[TensorGroup]]  # for the step and the "total" norm pass
    grad_groups: dict[tuple, list[TensorGroup]]  # the same without F and anchor: the "task" norm pass reads g
    dtensor: bool  # some parameter is a DTensor (gradients need .to_local())
    # drift telemetry: positions in `params` of the bucketed parameters with EWC, and their bucket ids (device)
    drift_positions: Tensor | None = None
    drift_buckets: Tensor | None = None


def _by_key_and_dtype(groups: list[TensorGroup]) -> dict[tuple, list[TensorGroup]]:
    """Groups by (tag, parameter dtype); EWCAdamW tags each group with its reduce key."""
    by: dict[tuple, list[TensorGroup]] = {}
    for group in groups:
        by.setdefault((group.tag, group.dtype), []).append(group)
    return by


class EWCAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW plus the EWC gradient ewc_lambda * F * (p - anchor), fused into one pass per dtype group.

    `ewc`: the mapping parameter -> (fisher, anchor) (trainer.ewc.load_ewc(path, model) returns one; a parameter
    not in it has no EWC). Or, as a convenience, `fisher[i]`, `anchor[i]` for the i-th parameter in param-group
    order (None: no EWC for it). `backend`:
    "auto" ("triton" on CUDA, "cpp" on CPU), "triton", "cpp" or "torch"; a C++ build failure falls back to "torch"
    with one warning. `ewc_mode`: "coupled" (the EWC gradient through Adam's moments) or "decoupled" (Adam on the
    data gradient, then the proximal pull towards the anchor; see the module docstring). lr, betas, eps and
    weight_decay are per param group; ewc_lambda and ewc_mode are global. The mode is not optimizer state (the
    moments have the same shape in both): the trainer records it with the checkpoint.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, ewc_lambda: float = 0.0, fisher: Sequence[Tensor | None] | None = None,
                 anchor: Sequence[Tensor | None] | None = None, backend: str = "auto", *,
                 ewc: Mapping[Tensor, tuple[Tensor, Tensor]] | None = None, ewc_mode: str = "coupled"):
        if not lr >= 0.0:
            raise UserError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise UserError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise UserError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise UserError(f"weight_decay must be >= 0, got {weight_decay}")
        if backend not in ("auto", *BACKENDS):
            raise UserError(f"unknown optimizer backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend_request = backend
        self._backend: str | None = None
        self._ewc: dict[Tensor, tuple[Tensor, Tensor]] = {}  # parameter -> local (fisher, anchor), validated
        self._ewc_lambda = 0.0
        self._ewc_mode = "coupled"
        self._version = 0  # bumped by anything that invalidates the cached plans
        self._plans: dict[int, _Plan] = {}
        self._clip: tuple[Tensor, str] | None = None  # (scale, mode) for the next step
        self._last_local: list[tuple[object, Tensor, Tensor]] = []  # (reduce key, penalty, sum e^2) per key
        self._last_reduced: tuple[Tensor, Tensor] | None = None
        self._drift_buckets: dict[Tensor, int] = {}  # parameter -> bucket index (set_drift_buckets)
        self._drift_names: list[str] = []
        self._last_drift_local: list[tuple[object, Tensor]] = []  # (reduce key, [buckets, 2]) per key
        self._last_drift: Tensor | None = None
        self.set_ewc_state(fisher, anchor, ewc_lambda, ewc=ewc, ewc_mode=ewc_mode)

    # --- EWC state -------------------------------------------------------------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def ewc_lambda(self) -> float:
        return self._ewc_lambda

    @ewc_lambda.setter
    def ewc_lambda(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0 or math.isinf(value):
            raise UserError(f"ewc_lambda must be a finite number >= 0, got {value}")
        self._ewc_lambda = value

    @property
    def ewc_mode(self) -> str:
        return self._ewc_mode

    @ewc_mode.setter
    def ewc_mode(self, value: str) -> None:
        if value not in EWC_MODES:
            raise UserError(f"ewc_mode must be one of {', '.join(EWC_MODES)}, got {value!r}")
        self._ewc_mode = value

    def set_ewc_state(self, fisher: Sequence[Tensor | None] | None = None,
                      anchor: Sequence[Tensor | None] | None = None, ewc_lambda: float | None = None, *,
                      ewc: Mapping[Tensor, tuple[Tensor, Tensor]] | None = None, ewc_mode: str | None = None) -> None:
        """Set (or with nothing given clear) the EWC state: `ewc`, the mapping parameter -> (fisher, anchor), or
        the lists `fisher`, `anchor` with one entry per parameter in param-group order.

        Each tensor: a DTensor with the parameter's mesh and placements, or a plain tensor of the parameter's
        local-shard shape; float32 or bfloat16 (float64 for float64 parameters), contiguous, on the parameter's
        device. A parameter without an entry (or with None in the lists) has no EWC. The tensors are referenced,
        not copied.
        """
        if ewc_lambda is not None:
            self.ewc_lambda = ewc_lambda
        if ewc_mode is not None:
            self.ewc_mode = ewc_mode
        self._invalidate()
        self._ewc = {}
        if ewc is not None and (fisher is not None or anchor is not None):
            raise UserError("give the EWC state either as ewc=mapping or as fisher= and anchor= lists, not both")
        if ewc is None:
            ewc = self._mapping_of_lists(fisher, anchor)
        position = {p: i for i, p in enumerate(self._all_params())}
        for p, (f, a) in ewc.items():
            i = position.get(p)
            if i is None:
                raise UserError(f"EWC state for a {_tensor_summary(p)} that is not a parameter of this optimizer; "
                                f"load the EWC file for the model whose parameters the optimizer holds")
            if f is None and a is None:
                continue
            if f is None or a is None:
                raise UserError(f"parameter {i}: EWC state needs both fisher and anchor (or neither)")
            self._ewc[p] = (self._ewc_local(i, "fisher", p, f), self._ewc_local(i, "anchor", p, a))

    def set_drift_buckets(self, buckets: Mapping[Tensor, int], names: Sequence[str]) -> None:
        """Report the drift per bucket: `buckets` maps parameters to indices into `names` (the trainer: one per
        decoder block, the embedding, the final norm). A parameter not in it is left out of every bucket. Each
        step with EWC on then sums, per bucket and at the pre-step parameters, sum F (p - anchor)^2 and
        sum (p - anchor)^2 (`last_drift`); an empty mapping turns the telemetry off."""
        names = [str(n) for n in names]
        position = {p: i for i, p in enumerate(self._all_params())}
        checked = {}
        for p, b in buckets.items():
            if p not in position:
                raise UserError(f"drift bucket for a {_tensor_summary(p)} that is not a parameter of this optimizer")
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(names):
                raise UserError(f"drift bucket {b!r} of parameter {position[p]} is not an index into the "
                                f"{len(names)} bucket names")
            checked[p] = b
        self._drift_buckets = checked
        self._drift_names = names if checked else []
        self._invalidate()

    @property
    def drift_bucket_names(self) -> list[str]:
        """The names of the drift buckets, in the order of last_drift's rows."""
        return list(self._drift_names)

    def _mapping_of_lists(self, fisher: Sequence[Tensor | None] | None,
                          anchor: Sequence[Tensor | None] | None) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """The positional convenience form, as the mapping parameter -> (fisher, anchor)."""
        if fisher is None and anchor is None:
            return {}
        if fisher is None or anchor is None:
            raise UserError("EWC state needs both fisher and anchor (or neither)")
        params = self._all_params()
        fisher, anchor = list(fisher), list(anchor)
        if len(fisher) != len(params) or len(anchor) != len(params):
            raise UserError(f"EWC state has {len(fisher)} fisher and {len(anchor)} anchor tensors for "
                            f"{len(params)} parameters; give one per parameter (None for none), in param-group order")
        return dict(zip(params, zip(fisher, anchor)))

    @staticmethod
    def _ewc_local(i: int, name: str, p: Tensor, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            raise UserError(f"parameter {i}: {name} must be a tensor, got {type(t).__name__}")
        if is_dtensor(t):
            if not is_dtensor(p) or t.device_mesh != p.device_mesh or t.placements != p.placements \
                    or t.shape != p.shape:
                raise UserError(f"parameter {i}: {name} is a {_tensor_summary(t)} but the parameter is a "
                                f"{_tensor_summary(p)}; shard it like the parameter (same mesh and placements)")
            t = t.to_local()
        p_local = local_tensor(p)
        if t.shape != p_local.shape:
            raise UserError(f"parameter {i}: {name} has shape {tuple(t.shape)}, the parameter's local shard "
                            f"{tuple(p_local.shape)} ({_tensor_summary(p)})")
        allowed = (torch.float64,) if p_local.dtype == torch.float64 else EWC_DTYPES
        if t.dtype not in allowed:
            raise UserError(f"parameter {i}: {name} is {dtype_name(t.dtype)}; use float32 or "
                            f"bfloat16 (float64 for float64 parameters), e.g. .to(torch.bfloat16)")
        if t.device != p_local.device:
            raise UserError(f"parameter {i}: {name} is on {t.device}, the parameter on {p_local.device}")
        if not t.is_contiguous():
            raise UserError(f"parameter {i}: {name} is not contiguous; pass .contiguous() tensors")
        return t

    # --- backend ---------------------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend in use ("triton", "cpp" or "torch"), resolved from the parameters' device on first use."""
        if self._backend is None:
            params = self._all_params()
            device = local_tensor(params[0]).device if params else torch.device("cpu")
            self._backend = resolve_backend(self.backend_request, device)
        return self._backend

    def _backend_for(self, dtype: torch.dtype) -> str:
        backend = self.backend
        return "torch" if backend == "triton" and dtype == torch.float64 else backend

    # --- state and plans ---------------------------------------------------------------------------------------

    def _state_of(self, p: Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            # zeros_like of a DTensor is a DTensor of the same placement: what DCP expects for sharded state.
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def _invalidate(self) -> None:
        self._version += 1

    def _plan(self, group_index: int, params: list[Tensor]) -> _Plan:
        """The prepared kernel groups for the parameters of a group that have gradients (rebuilt when that set,
        the EWC state, lambda's zeroness or the optimizer state changes; validation happens here, once)."""
        key = (self._version, self._ewc_lambda != 0, tuple(map(id, params)))
        plan = self._plans.get(group_index)
        if plan is not None and plan.key == key:
            return plan
        states = [self._state_of(p) for p in params]
        for j, (p, state) in enumerate(zip(params, states)):
            self._check_param(j, p, state)
        # Steps as views of one buffer: one add_ per step instead of one op per parameter. state_dict() hands out
        # copies; load_state_dict() bumps the version, and the next plan adopts the loaded values.
        steps = torch.tensor([float(s["step"]) for s in states], dtype=torch.float32)
        for i, state in enumerate(states):
            state["step"] = steps[i]
        local_params = [local_tensor(p) for p in params]
        ewc = [self._ewc.get(p, (None, None)) for p in params]
        # Tagged by how their sums combine across ranks: one all-reduce per tag, after all groups ran.
        tags = [_reduce_key(p) for p in params]
        groups = group_tensors(local_params, [local_tensor(s["exp_avg"]) for s in states],
                               [local_tensor(s["exp_avg_sq"]) for s in states], [f for f, _ in ewc],
                               [a for _, a in ewc], ewc_lambda=self._ewc_lambda, tags=tags, check=False)
        grad_groups = group_tensors(local_params, None, None, None, None, ewc_lambda=0.0, tags=tags, check=False)
        plan = _Plan(key, list(params), steps, _by_key_and_dtype(groups), _by_key_and_dtype(grad_groups),
                     any(is_dtensor(p) for p in params))
        picked = [(j, self._drift_buckets[p]) for j, p in enumerate(params)
                  if p in self._drift_buckets and p in self._ewc and self._ewc_lambda != 0]
        if picked:
            device = local_params[0].device
            # non-blocking uploads (pinned memory on CUDA): building a plan does not wait for the device either
            plan.drift_positions = upload(torch.tensor([j for j, _ in picked], dtype=torch.int64), device)
            plan.drift_buckets = upload(torch.tensor([b for _, b in picked], dtype=torch.int64), device)
        self._plans[group_index] = plan
        return plan

    def _check_param(self, i: int, p: Tensor, state: dict) -> None:
        local = local_tensor(p)
        if local.dtype not in (torch.float32, torch.float64):
            raise UserError(f"parameter {i} is {dtype_name(local.dtype)}; EWCAdamW keeps float32 "
                            f"(or float64) master parameters: build the model in float32")
        if not local.is_contiguous():
            raise UserError(f"parameter {i} ({_tensor_summary(p)}) is not contiguous")
        for name in ("exp_avg", "exp_avg_sq"):
            s = local_tensor(state[name])
            if s.shape != local.shape or s.dtype != local.dtype or s.device != local.device \
                    or not s.is_contiguous():
                raise UserError(f"parameter {i}: optimizer state {name} ({_tensor_summary(state[name])}) does "
                                f"not match the parameter ({_tensor_summary(p)})")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # The live step tensors are views of a shared buffer: hand out independent copies.
        sd["state"] = {k: {**v, "step": v["step"].detach().clone()} if "step" in v else dict(v)
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if "step" in state:  # torch.optim keeps the caller's tensor; ours is incremented in place
                state["step"] = state["step"].detach().clone()
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state and not local_tensor(state[name]).is_contiguous():
                    state[name] = state[name].contiguous()
        self._invalidate()
        self._clip = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        # A clip scale measured for gradients that are now dropped (a skipped step) must not reach the next step.
        self._clip = None
        super().zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_version"):
            self._invalidate()

    def _plans_with_grads(self):
        """(group, plan, local grads of plan.params) for every param group with gradients.

        Per step this touches each parameter a few times only (its grad, the grad's local shard, contiguity):
        shapes, dtypes and devices of gradients are guaranteed by torch's .grad setter, the rest was validated
        when the plan was built.
        """
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                with_grads = [p for p, g in zip(params, grads) if g is not None]
                grads = [g for g in grads if g is not None]
                if not with_grads:
                    continue
            else:
                with_grads = params
            plan = self._plan(gi, with_grads)
            if plan.dtensor:
                grads = [local_tensor(g) for g in grads]
            if not all(g.is_contiguous() for g in grads):
                j = next(j for j, g in enumerate(grads) if not g.is_contiguous())
                raise UserError(f"the gradient of parameter {j} of param group {gi} "
                                f"({_tensor_summary(with_grads[j])}) is not contiguous; the fused step reads raw memory")
            yield group, plan, grads

    # --- clipping --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None, *, mode: str = "task") -> tuple[Tensor, Tensor | None]:
        """Measure the gradient norms and set the clip scale that the next step() applies (nothing is written now).

        mode "task" (default): the norm of the data gradient g; step() uses g * s + e (the EWC gradient e added
        after clipping; ewc_mode "decoupled": g * s, the pull after the update). mode "total": also the norm of
        g + e in one fused read pass over p, g, F, anchor, and step() uses (g + e) * s, as clipping the loss-based
        penalty's gradient did (ewc_mode "coupled" only: a UserError in "decoupled"). s = min(1, max_norm / (norm +
        1e-6)) like torch.nn.utils.clip_grad_norm_, kept on the device (no host sync). max_norm None or 0: no
        clipping (mode "task" then reads only g).
        Sharded gradients: the sums of squares are all-reduced across the mesh here (a collective: every rank
        calls it). Returns 0-dim float64 tensors (task_norm, total_norm), total_norm None unless mode is "total".
        """
        if mode not in CLIP_MODES:
            raise UserError(f"clip mode must be 'task' or 'total', got {mode!r}")
        if mode == "total" and self._ewc_mode == "decoupled":
            raise UserError("clip mode 'total' clips the sum of the data and EWC gradients; ewc_mode 'decoupled' "
                            "applies the EWC term as a pull after the Adam update, so there is no such sum: use "
                            "clip mode 'task'")
        if max_norm is not None and not max_norm >= 0:
            raise UserError(f"max_norm must be >= 0 or None, got {max_norm}")
        use_ewc = mode == "total" and self._ewc_lambda != 0
        by_key: dict[object, list[Tensor]] = {}
        for _, plan, grads in self._plans_with_grads():
            for (reduce_key, dtype), groups in (plan.groups if use_ewc else plan.grad_groups).items():
                gsq, tsq = grad_sq_norms_groups(groups, grads, ewc_lambda=self._ewc_lambda,
                                                backend=self._backend_for(dtype), check_grads=False)
                by_key.setdefault(reduce_key, []).extend((gsq, tsq))
        grad_sq, total_sq = _sum_reduced((key, torch.stack(sums[0::2]).sum(), torch.stack(sums[1::2]).sum())
                                         for key, sums in by_key.items())
        task_norm = grad_sq.sqrt()
        total_norm = total_sq.sqrt() if mode == "total" else None
        self._clip = None
        if max_norm:
            norm = total_norm if mode == "total" else task_norm
            self._clip = (torch.clamp(max_norm / (norm + 1e-6), max=1.0), mode)
        return task_norm, total_norm

    # --- step ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, mode = self._clip if self._clip is not None else (None, "task")
        self._clip = None
        # A named span so `gemma-ewc profile` can time the fused step (the C++ kernel is no torch operator).
        with torch.profiler.record_function("ewc_adamw_step"):
            sums: dict[object, list[Tensor]] = {}
            drift: dict[object, Tensor] = {}  # reduce key -> float64 [buckets, 2]
            for group, plan, grads in self._plans_with_grads():
                plan.steps.add_(1.0)
                step_values = plan.steps.tolist()
                with_drift = plan.drift_positions is not None
                hyper = dict(ewc_lambda=self._ewc_lambda, lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                             weight_decay=group["weight_decay"], grad_scale=scale, clip_mode=mode,
                             ewc_mode=self._ewc_mode, check_grads=False, drift=with_drift)
                # Parameters that missed steps (no grad at times) have their own step count: one call per count.
                counts = sorted(set(step_values))
                for (reduce_key, dtype), groups in plan.groups.items():
                    backend = self._backend_for(dtype)
                    acc = sums.setdefault(reduce_key, [])
                    if len(counts) == 1:
                        calls = [groups]
                    else:
                        chosen_sets = [{i for i, v in enumerate(step_values) if v == count} for count in counts]
                        calls = [[sub for sub in (group.subset(chosen) for group in groups) if sub is not None]
                                 for chosen in chosen_sets]
                    for count, call_groups in zip(counts, calls):
                        if not call_groups:
                            continue
                        out = step_groups(call_groups, grads, step=int(count), backend=backend, **hyper)
                        acc.extend(out[:2])
                        if with_drift:
                            self._add_drift(drift, reduce_key, plan, out[2])
        self._last_local = [(key, torch.stack(v[0::2]).sum(), torch.stack(v[1::2]).sum()) for key, v in sums.items()]
        self._last_reduced = None
        self._last_drift_local = list(drift.items())
        self._last_drift = None
        return loss

    def _add_drift(self, drift: dict[object, Tensor], reduce_key, plan: _Plan, per_param: Tensor) -> None:
        """Add a step call's per-parameter drift sums [len(plan.params), 2] into the key's per-bucket sums (zeros
        for the parameters the call did not cover, so calls of one key simply add up)."""
        acc = drift.get(reduce_key)
        if acc is None:
            acc = drift[reduce_key] = per_param.new_zeros((len(self._drift_names), 2))
        acc.index_add_(0, plan.drift_buckets, per_param.index_select(0, plan.drift_positions))

    # --- metrics ---------------------------------------------------------------------------------------------

    def _reduced_last(self) -> tuple[Tensor, Tensor]:
        if self._last_reduced is None:
            self._last_reduced = _sum_reduced(self._last_local)
        return self._last_reduced

    @property
    def last_penalty(self) -> Tensor:
        """(ewc_lambda / 2) * sum(F * (p - anchor)^2) at the pre-step parameters of the last step (0-dim, float64).

        For sharded parameters the per-rank sums are all-reduced on the first read after a step (a collective:
        every rank must read it, or none); reading does not synchronise the host with the device.
        """
        return self._reduced_last()[0]

    @property
    def last_drift(self) -> Tensor | None:
        """float64 [buckets, 2] of the last step: per drift bucket (rows in drift_bucket_names' order) the
        F-weighted drift sum F (p - anchor)^2 and the plain drift sum (p - anchor)^2 at the pre-step parameters.
        None when no drift was reduced (no buckets set, no EWC state, or ewc_lambda 0). All-reduced over the
        ranks holding different shards on the first read after a step, like last_penalty (every rank reads it,
        or none); reading does not synchronise the host with the device."""
        if not self._last_drift_local:
            return None
        if self._last_drift is None:
            total = None
            for key, local in self._last_drift_local:
                reduced = _all_reduce(local, key)
                total = reduced if total is None else total + reduced.to(total.device)
            self._last_drift = total
        return self._last_drift

    @property
    def last_ewc_grad_norm(self) -> Tensor:
        """The L2 norm of the last step's EWC gradient ewc_lambda * F * (p - anchor) (0-dim, float64; all-reduced
        on first read like last_penalty)."""
        return self._reduced_last()[1].sqrt()

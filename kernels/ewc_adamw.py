"""Fused EWC-AdamW step: the Fisher-weighted pull towards the anchor, AdamW, and the penalty, in one pass.

What it computes, per element of every parameter (the definition is `ewc_adamw_ref`), in one of two modes
(`ewc_mode`; s is the clip scale of `grad_scale`, 1 without clipping):

    d  = p - anchor                        (at the pre-step p)
    e  = ewc_lambda * (F * d)              the gradient of (lambda/2) * sum(F * (p - anchor)^2)

  "coupled" (default): the EWC gradient goes through Adam's moments, like L2 regularisation inside Adam
    g' = g * s + e      clip "task"
    g' = (g + e) * s    clip "total"
    then exactly torch.optim.AdamW on g' (decoupled weight decay, bias correction, torch's lerp for m):
    p  = p * (1 - lr * wd);  m = lerp(m, g', 1 - beta1);  v = v * beta2 + (1 - beta2) * g' * g'
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

  "decoupled": Adam sees the data gradient only, then the parameter moves towards its anchor (as AdamW decouples
  weight decay from the moments), by the implicit (proximal) step of the penalty over a time lr:
    g' = g * s          (clip "task" only: "total" would clip the data gradient by a norm the EWC term no longer
                         enters, so the two are refused together)
    the AdamW update above on g', giving p;  then with c = (lr * lambda) * F (capped at the dtype's largest finite
    value) and w = c / (1 + c) in [0, 1]:
    p  = lerp(p, anchor, w)  =  (p + c * anchor) / (1 + c)
    See `ewc_adamw_ref` for the derivation and why this form. lambda there means "a parameter with Fisher F
    relaxes towards its anchor at rate lambda * F per unit of learning rate", independent of the data gradient's
    size; in coupled mode lambda * F * d is a gradient that Adam divides by the running RMS of g + e.

and in the same pass, in both modes, the reductions (lambda/2) * sum(F * d^2) (the penalty) and sum(e^2) (the
squared norm of the EWC gradient), at the pre-step p: the metrics mean the same in both modes. Asked for (`drift`),
the step also returns the drift per tensor, sum(F * d^2) and sum(d^2) of each parameter at the pre-step p (the
definition is `ewc_drift_ref`), from the same pass: the kernels reduce per block (Triton program, C++ chunk), a
block never spans two tensors, and the per-tensor sums are segment sums of those partials on the device.
`ewc_grad_sq_norms` is the extra read pass that clip mode "total" needs before the step: sum(g^2) and
sum((g + e)^2), nothing written.

Bytes each variant must move per element (p, g, m, v float32; the floor a memory-bound kernel approaches); the
decoupled pull reads the F and anchor elements the pass has already loaded, so both modes move the same bytes:

    AdamW, no EWC (lambda = 0 or no EWC state)    read p g m v, write p m v       28 B   (1.00x)
    EWC, F and anchor float32                     + read F, anchor                36 B   (1.29x)
    EWC, F and anchor bfloat16                    + read F, anchor                32 B   (1.14x)
    norm pass, clip "total" (float32 / bfloat16)  read p g F anchor               16 B / 12 B
    norm pass, clip "task"                        read g                          4 B

Backends (each a module with `step(group, grads, scalars)` and `grad_sq_norms(group, grads, ewc_lambda)`, one
call per TensorGroup; this module validates, groups and dispatches. Each runs both EWC modes: the Triton and C++
kernels in their one pass, by a DECOUPLED constexpr and a template flag; the torch backend by a foreach lerp):
    "triton"  CUDA: kernels/ewc_adamw_triton.py. One launch over every full block of a group's tensors and one over
              their last partial blocks, from pointer tables cached on the group (see that file); runs in Triton's
              CPU interpreter under TRITON_INTERPRET=1 (tests). triton is imported only when this backend is used.
    "cpp"     CPU: csrc/ewc_adamw.cpp, built on first use by kernels/ewc_adamw_cpp.py: OpenMP threads over chunks of
              the concatenated index space, a SIMD inner loop. Also float64. Falls back to "torch" (one warning)
              where it cannot be built.
    "torch"   Any device: kernels/ewc_adamw_torch.py, torch._foreach_* ops (several passes over memory); the
              fallback and the float64 path.

Limits: tensors contiguous (a non-contiguous one is an error, never silently copied), all on one device; p, g, m, v
one dtype: float32 (all backends) or float64 ("cpp", "torch"); F and anchor float32 or bfloat16 each (float64 for
float64 parameters), the shape of their parameter. A parameter without EWC state has F = anchor = None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from kernels import ewc_adamw_cpp, ewc_adamw_torch

BACKENDS = ("triton", "cpp", "torch")
CLIP_MODES = ("task", "total")
EWC_MODES = ("coupled", "decoupled")
DEFAULT_BLOCK = 2048
EWC_DTYPES = (torch.float32, torch.bfloat16)


# --------------------------------------------------------------------------------------------------- reference


def _ref_inputs(params, fishers, anchors) -> tuple[list, list, tuple[Tensor, Tensor]]:
    """F and anchor as lists (None where a parameter has none) and two float64 zero sums on the parameters' device."""
    n = len(params)
    fishers = list(fishers) if fishers is not None else [None] * n
    anchors = list(anchors) if anchors is not None else [None] * n
    device = params[0].device if n else torch.device("cpu")
    return fishers, anchors, (torch.zeros((), dtype=torch.float64, device=device),
                              torch.zeros((), dtype=torch.float64, device=device))


def ewc_adamw_ref(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                  exp_avg_sqs: Sequence[Tensor], *, fishers: Sequence[Tensor | None] | None = None,
                  anchors: Sequence[Tensor | None] | None = None, ewc_lambda: float = 0.0, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                  grad_scale: float | Tensor | None = None, clip_mode: str = "task",
                  ewc_mode: str = "coupled") -> tuple[Tensor, Tensor]:
    """The definition, one tensor at a time in plain torch, in place on params, exp_avgs, exp_avg_sqs.

    `step` is the step number being taken (1 for the first). F and anchor are upcast to the parameter's dtype
    (bfloat16 -> float32 is exact), so every backend does identical math on the upcast values.
    Returns 0-dim float64 tensors (penalty, sum of squares of the EWC gradient) at the pre-step parameters, in
    both modes.

    Decoupled mode, the form of the pull. The penalty's gradient flow dθ/dt = -λF(θ - θ*), taken over a time lr
    from the post-Adam θ, has the explicit Euler step θ - c(θ - θ*) with c = lr·λ·F: it overshoots the anchor once
    c > 1 and diverges once c > 2, and c spans many decades in practice (λ from 1e2 to 1e12 in the reference study,
    F over orders of magnitude). The implicit (backward Euler) step solves θ' = θ - c(θ' - θ*):

        θ' = (θ + c·θ*) / (1 + c) = θ* + (θ - θ*) / (1 + c) = lerp(θ, θ*, w),   w = c / (1 + c) in [0, 1]

    which is the proximal operator of the penalty: θ' = argmin_x (λ/2)F(x - θ*)² + (x - θ)²/(2 lr). It equals the
    explicit step to first order (w = c - c² + ...), contracts the distance to the anchor by 1/(1 + c) for any
    c >= 0, and never crosses the anchor: c -> inf lands on θ* exactly, c = 0 leaves θ unchanged bit for bit. The
    exact flow θ* + (θ - θ*)·exp(-c) has the same properties but needs exp, whose result differs in the last bit
    between torch, libm and the GPU; a division is correctly rounded everywhere, so all backends compute the same
    w. Written as torch's lerp (θ + w(θ* - θ) for w < 0.5, θ* - (θ* - θ)(1 - w) otherwise), the rounded result
    also stays between θ and θ*: each branch adds to one end at most half (times 1 + 2^-23) of the distance to the
    other end, and rounding cannot leave an interval whose ends are floats. c is capped at the dtype's largest
    finite value so that w = 1, not inf/inf, when lr·λ·F overflows.

    The pull starts from the post-Adam θ (after weight decay and the Adam update): the step is then the Adam step
    on the data loss followed by the exact proximal step on the penalty (forward-backward splitting, as AdamW
    applies its decay outside the moments), and the written parameter lies between what Adam alone would have
    written and the anchor. A pull from the pre-step θ would be added to a θ that Adam has already moved, and could
    carry it past the anchor.
    """
    if ewc_mode not in EWC_MODES:
        raise ValueError(f"ewc_adamw: ewc_mode must be 'coupled' or 'decoupled', got {ewc_mode!r}")
    decoupled = ewc_mode == "decoupled"
    if decoupled and clip_mode == "total":
        raise ValueError("ewc_adamw: clip mode 'total' clips the sum of the data and EWC gradients, which decoupled "
                         "mode does not form; use clip mode 'task'")
    beta1, beta2 = betas
    fishers, anchors, (penalty, ewc_sq) = _ref_inputs(params, fishers, anchors)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    for p, g, m, v, f, a in zip(params, grads, exp_avgs, exp_avg_sqs, fishers, anchors):
        if ewc_lambda != 0 and f is not None:
            d = p - a.to(p.dtype)
            fd = f.to(p.dtype) * d
            e = ewc_lambda * fd
            penalty += (ewc_lambda / 2) * (fd * d).sum(dtype=torch.float64)
            ewc_sq += (e * e).sum(dtype=torch.float64)
        else:
            e = None
        if clip_mode == "total":
            if e is not None:
                g = g + e
            if grad_scale is not None:
                g = g * grad_scale
        else:
            if grad_scale is not None:
                g = g * grad_scale
            if e is not None and not decoupled:
                g = g + e
        # torch.optim.AdamW, single-tensor path.
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / bias_correction1
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        if e is not None and decoupled:
            # lr * lambda formed in float64 and rounded once, as every scalar of the step
            c = (f.to(p.dtype) * (lr * ewc_lambda)).clamp_(max=torch.finfo(p.dtype).max)
            p.lerp_(a.to(p.dtype), c / (c + 1))
    return penalty, ewc_sq


def ewc_drift_ref(params: Sequence[Tensor], *, fishers: Sequence[Tensor | None] | None = None,
                  anchors: Sequence[Tensor | None] | None = None) -> Tensor:
    """float64 [len(params), 2]: (sum F (p - anchor)^2, sum (p - anchor)^2) of each parameter (zeros without EWC
    state), F and anchor upcast to the parameter's dtype as in ewc_adamw_ref. Call it on the pre-step parameters."""
    fishers, anchors, _ = _ref_inputs(params, fishers, anchors)
    device = params[0].device if params else torch.device("cpu")
    out = torch.zeros((len(params), 2), dtype=torch.float64, device=device)
    for i, (p, f, a) in enumerate(zip(params, fishers, anchors)):
        if f is not None:
            d = p - a.to(p.dtype)
            out[i, 0] = (f.to(p.dtype) * d * d).sum(dtype=torch.float64)
            out[i, 1] = (d * d).sum(dtype=torch.float64)
    return out


def ewc_grad_sq_norms_ref(params: Sequence[Tensor], grads: Sequence[Tensor], *,
                          fishers: Sequence[Tensor | None] | None = None,
                          anchors: Sequence[Tensor | None] | None = None,
                          ewc_lambda: float = 0.0) -> tuple[Tensor, Tensor]:
    """(sum(g^2), sum((g + e)^2)) as 0-dim float64 tensors; the second is sum(g^2) too where there is no EWC."""
    fishers, anchors, (grad_sq, total_sq) = _ref_inputs(params, fishers, anchors)
    for p, g, f, a in zip(params, grads, fishers, anchors):
        grad_sq += (g * g).sum(dtype=torch.float64)
        t = g + ewc_lambda * (f.to(p.dtype) * (p - a.to(p.dtype))) if (ewc_lambda != 0 and f is not None) else g
        total_sq += (t * t).sum(dtype=torch.float64)
    return grad_sq, total_sq


# ----------------------------------------------------------------------------------------- checks and grouping


def _check(name: str, i: int, t: Tensor, *, like: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"ewc_adamw: {name}[{i}] must be a tensor, got {type(t).__name__}")
    if t.device != like.device:
        raise ValueError(f"ewc_adamw: {name}[{i}] is on {t.device}, its parameter on {like.device}")
    if t.shape != like.shape:
        raise ValueError(f"ewc_adamw: {name}[{i}] has shape {tuple(t.shape)}, its parameter {tuple(like.shape)}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"ewc_adamw: {name}[{i}] is {str(t.dtype).removeprefix('torch.')}, expected {allowed}")
    if not t.is_contiguous():
        raise ValueError(f"ewc_adamw: {name}[{i}] (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; "
                         f"the fused step reads raw memory: pass .contiguous() tensors")




@dataclass
class TensorGroup:
    """Tensors that share one kernel specialisation: parameter dtype, F/anchor dtypes (none: no EWC), the Triton
    block size, and the caller's `tag` (EWCAdamW: how the group's sums combine across ranks).

    `indices` are the positions of these tensors in the caller's lists (the gradients of a step are picked by
    them). A group caches the data pointers of its tensors and the Triton launch tables built from them: the
    parameters' pointers are read again on every call, since `p.data = ...` can move a parameter; the moments, F
    and anchor must keep their storage while the group lives (EWCAdamW builds new groups whenever it replaces
    them: load_state_dict, set_ewc_state).
    """

    indices: list[int]
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    fishers: list[Tensor]
    anchors: list[Tensor]
    block: int = DEFAULT_BLOCK
    tag: object = None
    sizes: list[int] = field(default_factory=list)
    pointer_rows: list[list[int]] | None = None  # p, m, v, F, anchor (p's pointers where a stream is absent)
    triton_tables: object = None  # kernels.ewc_adamw_triton.LaunchTables, built from pointer_rows
    index_tensor: Tensor | None = None  # `indices` on the device (the drift's scatter into the caller's order)

    def __post_init__(self) -> None:
        self.sizes = [p.numel() for p in self.params]

    def add(self, i: int, p: Tensor, m: Tensor | None, v: Tensor | None, f: Tensor | None, a: Tensor | None) -> None:
        self.indices.append(i)
        self.params.append(p)
        self.sizes.append(p.numel())
        if m is not None:
            self.exp_avgs.append(m)
            self.exp_avg_sqs.append(v)
        if f is not None:
            self.fishers.append(f)
            self.anchors.append(a)

    def subset(self, indices: set[int]) -> TensorGroup | None:
        """A new group of the members whose caller index is in `indices` (None if there are none)."""
        keep = [k for k, i in enumerate(self.indices) if i in indices]
        if not keep:
            return None
        picked = [[stream[k] for k in keep] if stream else [] for stream in
                  (self.params, self.exp_avgs, self.exp_avg_sqs, self.fishers, self.anchors)]
        return TensorGroup([self.indices[k] for k in keep], *picked, block=self.block, tag=self.tag)

    def pointers(self) -> list[list[int]]:
        p_ptrs = _ptrs(self.params)
        if self.pointer_rows is None or self.pointer_rows[0] != p_ptrs:
            self.pointer_rows = [p_ptrs] + [_ptrs(s) for s in (self.exp_avgs or self.params,
                                                                self.exp_avg_sqs or self.params,
                                                                self.fishers or self.params,
                                                                self.anchors or self.params)]
            self.triton_tables = None
        return self.pointer_rows

    def indices_on_device(self) -> Tensor:
        if self.index_tensor is None:
            self.index_tensor = upload(torch.tensor(self.indices, dtype=torch.int64), self.device)
        return self.index_tensor

    @property
    def has_ewc(self) -> bool:
        return bool(self.fishers)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device


def _ptrs(ts: list[Tensor]) -> list[int]:
    return [t.data_ptr() for t in ts]


def upload(host: Tensor, device: torch.device | str) -> Tensor:
    """A CPU tensor copied to `device` without making the host wait for the device.

    On CUDA the values are staged in pinned memory from torch's caching host allocator (`pin_memory()`) and copied
    with `non_blocking=True`: a cudaMemcpyAsync queued on the current stream. A blocking copy (a plain `.to("cuda")`,
    or `torch.tensor(..., device="cuda")`) is a copy followed by a stream synchronisation (at::cuda::memcpy_and_sync):
    the host waits for everything queued on the stream. The staging buffer may be dropped at once: the copy records
    its stream on the pinned block, and the allocator hands the block out again only after an event recorded on
    that stream at release has completed (aten/src/ATen/core/CachingHostAllocator.h), so a later upload never
    overwrites values an earlier copy has yet to read. Elsewhere (CPU, Triton's interpreter) a plain `.to(device)`,
    which returns `host` itself on the CPU. The copy is ordered on the current stream only: the result is for
    kernels on that stream (EWCAdamW runs on one stream), never to be read on the host before the stream gets there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def group_tensors(params: Sequence[Tensor], exp_avgs: Sequence[Tensor] | None,
                  exp_avg_sqs: Sequence[Tensor] | None, fishers: Sequence[Tensor | None] | None,
                  anchors: Sequence[Tensor | None] | None, *, ewc_lambda: float, tags: Sequence[object] | None = None,
                  block: int = DEFAULT_BLOCK, check: bool = True) -> list[TensorGroup]:
    """Validate (with `check`) and split the lists into TensorGroups; empty tensors are left out.

    With ewc_lambda = 0 nothing is put in an EWC group: plain AdamW, which never reads F or anchor. `tags` (one
    per tensor) keeps tensors with different tags in different groups.
    """
    n = len(params)
    for name, lst in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("fishers", fishers),
                      ("anchors", anchors)):
        if lst is not None and len(lst) != n:
            raise ValueError(f"ewc_adamw: {len(lst)} {name} for {n} parameters")
    groups: dict[tuple, TensorGroup] = {}
    for i in range(n):
        p = params[i]
        f = fishers[i] if fishers is not None else None
        a = anchors[i] if anchors is not None else None
        if (f is None) != (a is None):
            raise ValueError(f"ewc_adamw: parameter {i} has a {'fisher' if f is not None else 'anchor'} but no "
                             f"{'anchor' if f is not None else 'fisher'}; give both or neither")
        if check:
            if not isinstance(p, Tensor) or p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"ewc_adamw: params[{i}] must be a float32 or float64 tensor")
            _check("params", i, p, like=p, dtypes=(p.dtype,))
            if exp_avgs is not None:
                _check("exp_avgs", i, exp_avgs[i], like=p, dtypes=(p.dtype,))
                _check("exp_avg_sqs", i, exp_avg_sqs[i], like=p, dtypes=(p.dtype,))
            if f is not None:
                ewc_dtypes = (torch.float64,) if p.dtype == torch.float64 else EWC_DTYPES
                _check("fishers", i, f, like=p, dtypes=ewc_dtypes)
                _check("anchors", i, a, like=p, dtypes=ewc_dtypes)
        if p.numel() == 0:
            continue
        use_ewc = f is not None and ewc_lambda != 0
        tag = tags[i] if tags is not None else None
        key = (tag, p.dtype, f.dtype if use_ewc else None, a.dtype if use_ewc else None)
        group = groups.setdefault(key, TensorGroup([], [], [], [], [], [], block=block, tag=tag))
        group.add(i, p, exp_avgs[i] if exp_avgs is not None else None,
                  exp_avg_sqs[i] if exp_avg_sqs is not None else None, f if use_ewc else None,
                  a if use_ewc else None)
    if len({group.device for group in groups.values()}) > 1:
        raise ValueError("ewc_adamw: all parameters must be on one device (build one optimizer per device)")
    return list(groups.values())


def group_grads(group: TensorGroup, grads: Sequence[Tensor], *, check: bool = True) -> list[Tensor]:
    """The gradients of `group`'s tensors, picked from the caller's list (checked: shape, dtype, contiguity)."""
    out = [grads[i] for i in group.indices]
    if check:
        for i, grad, p in zip(group.indices, out, group.params):
            if not (isinstance(grad, Tensor) and grad.shape == p.shape and grad.dtype == p.dtype
                    and grad.device == p.device and grad.is_contiguous()):
                _check("grads", i, grad, like=p, dtypes=(p.dtype,))
    return out


@dataclass(frozen=True)
class StepScalars:
    """A step's scalars, formed in float64 on the host (as torch's foreach AdamW does) and rounded once by the
    kernel, with the clip scale s (`grad_scale`; None: no clipping) and where it applies (`clip_total`), and the
    EWC mode: `decoupled` (the pull after the Adam update) with its rate `pull_rate` = lr * lambda, and `drift`:
    whether the backends return the per-tensor drift sums."""

    ewc_lambda: float
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float
    bias_correction2: float
    grad_scale: float | Tensor | None
    clip_total: bool
    decoupled: bool
    pull_rate: float
    drift: bool = False

    @classmethod
    def make(cls, *, ewc_lambda, lr, betas, eps, weight_decay, step, grad_scale, clip_mode,
             ewc_mode, drift=False) -> StepScalars:
        if step < 1:
            raise ValueError(f"ewc_adamw: step counts from 1 (the step being taken), got {step}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"ewc_adamw: clip_mode must be 'task' or 'total', got {clip_mode!r}")
        if ewc_mode not in EWC_MODES:
            raise ValueError(f"ewc_adamw: ewc_mode must be 'coupled' or 'decoupled', got {ewc_mode!r}")
        if ewc_mode == "decoupled" and clip_mode == "total":
            raise ValueError("ewc_adamw: clip mode 'total' clips the sum of the data and EWC gradients, which "
                             "decoupled mode does not form; use clip mode 'task'")
        beta1, beta2 = (float(b) for b in betas)
        return cls(float(ewc_lambda), float(lr), beta1, beta2, float(eps), float(weight_decay),
                   1 - beta1**step, 1 - beta2**step, grad_scale, clip_mode == "total", ewc_mode == "decoupled",
                   float(lr) * float(ewc_lambda), bool(drift))

    def scale_tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """s as a 0-dim tensor on the device (read by the kernel: no host sync; a float or a CPU tensor is uploaded
        through pinned memory, see `upload`), None without clipping."""
        if self.grad_scale is None:
            return None
        if isinstance(self.grad_scale, Tensor):
            if self.grad_scale.numel() != 1:
                raise ValueError(f"ewc_adamw: grad_scale must hold one value, got shape "
                                 f"{tuple(self.grad_scale.shape)}")
            scale = self.grad_scale.reshape(())
            if scale.device.type == "cpu" and device.type != "cpu":
                return upload(scale.to(dtype), device)
            return scale.to(device=device, dtype=dtype)  # the clip scale on the device: a cast at most
        return upload(torch.tensor(float(self.grad_scale), dtype=dtype), device)

    def scale_value(self) -> float:
        """s as a host float (1 without clipping), for the CPU kernel."""
        if self.grad_scale is None:
            return 1.0
        return float(self.grad_scale.item()) if isinstance(self.grad_scale, Tensor) else float(self.grad_scale)


# ------------------------------------------------------------------------------------------------------ backends


def _triton_backend():
    """kernels.ewc_adamw_triton, imported on first use: triton is optional and slow to import, and its CPU
    interpreter (TRITON_INTERPRET=1) is chosen when it is first imported."""
    from kernels import ewc_adamw_triton

    return ewc_adamw_triton


def _check_device(backend: str, device: torch.device) -> None:
    if backend == "triton":
        _triton_backend().check_device(device)
    elif backend == "cpp" and device.type != "cpu":
        raise ValueError(f"ewc_adamw: the 'cpp' backend runs on CPU tensors, these are on {device}")


def _backend_module(backend: str, device: torch.device):
    """The module that runs `backend` on `device` ("cpp" runs as "torch" where the extension cannot be built)."""
    if backend not in BACKENDS:
        raise ValueError(f"ewc_adamw: unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    _check_device(backend, device)
    if backend == "triton":
        return _triton_backend()
    if backend == "cpp" and ewc_adamw_cpp.extension() is not None:
        return ewc_adamw_cpp
    return ewc_adamw_torch


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """"auto" -> "triton" on CUDA (when triton imports), "cpp" on CPU (when it builds), else "torch"."""
    device = torch.device(device)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"ewc_adamw: unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and _triton_backend().triton is not None:
            return "triton"
        if device.type == "cpu" and ewc_adamw_cpp.extension() is not None:
            return "cpp"
        return "torch"
    _check_device(backend, device)
    return backend


def _sum_pairs(pairs: list[tuple[Tensor, Tensor]], grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Sum (a, b) over the groups' results, on the groups' device (float64 zeros if there are none)."""
    first = second = None
    for a, b in pairs:
        first = a if first is None else first + a
        second = b if second is None else second + b
    if first is None:
        first = second = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    return first, second


# ---------------------------------------------------------------------------------------------- public functions


def step_groups(groups: Sequence[TensorGroup], grads: Sequence[Tensor], *, ewc_lambda: float, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                grad_scale: float | Tensor | None = None, clip_mode: str = "task", ewc_mode: str = "coupled",
                backend: str, check_grads: bool = True, drift: bool = False) -> tuple[Tensor, ...]:
    """The step on prepared groups (see ewc_adamw_); `grads` is the caller's full list, picked by group.indices.
    With `drift`, a third result: float64 [len(grads), 2], the drift sums in the caller's order."""
    scalars = StepScalars.make(ewc_lambda=ewc_lambda, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                               step=step, grad_scale=grad_scale, clip_mode=clip_mode, ewc_mode=ewc_mode, drift=drift)
    results = []
    per_param = None
    if drift:
        device = groups[0].device if groups else (grads[0].device if grads else torch.device("cpu"))
        per_param = torch.zeros((len(grads), 2), dtype=torch.float64, device=device)
    for group in groups:
        module = _backend_module(backend, group.device)
        penalty, ewc_sq, per_tensor = module.step(group, group_grads(group, grads, check=check_grads), scalars)
        results.append((penalty.to(group.device), ewc_sq.to(group.device)))
        if per_tensor is not None:
            per_param.index_copy_(0, group.indices_on_device(), per_tensor.to(group.device))
    penalty, ewc_sq = _sum_pairs(results, grads)
    return (penalty, ewc_sq) if per_param is None else (penalty, ewc_sq, per_param)


def grad_sq_norms_groups(groups: Sequence[TensorGroup], grads: Sequence[Tensor], *, ewc_lambda: float,
                         backend: str, check_grads: bool = True) -> tuple[Tensor, Tensor]:
    """ewc_grad_sq_norms on prepared groups."""
    results = []
    for group in groups:
        module = _backend_module(backend, group.device)
        grad_sq, total_sq = module.grad_sq_norms(group, group_grads(group, grads, check=check_grads),
                                                 float(ewc_lambda))
        results.append((grad_sq.to(group.device), total_sq.to(group.device)))
    return _sum_pairs(results, grads)


def ewc_adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], *, fishers: Sequence[Tensor | None] | None = None,
               anchors: Sequence[Tensor | None] | None = None, ewc_lambda: float = 0.0, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, step: int,
               grad_scale: float | Tensor | None = None, clip_mode: str = "task", ewc_mode: str = "coupled",
               backend: str = "torch", block: int = DEFAULT_BLOCK, drift: bool = False) -> tuple[Tensor, ...]:
    """One fused EWC-AdamW step, in place on params, exp_avgs and exp_avg_sqs (see the module docstring).

    `step` is the step being taken (1 first); `grad_scale` the clip scale s (a float or a 1-element tensor on the
    device, read by the kernel: no host sync); `clip_mode` where s applies ("task": to g; "total": to g + e);
    `ewc_mode` "coupled" (e enters Adam's moments) or "decoupled" (the proximal pull after the Adam update; clip
    mode "task" only).
    Returns 0-dim float64 tensors on the device: the penalty (lambda/2) sum F (p - anchor)^2 at the pre-step p,
    and sum(e^2), the squared norm of the EWC gradient. With `drift`, also float64 [len(params), 2]: each
    parameter's (sum F (p - anchor)^2, sum (p - anchor)^2) at the pre-step p (`ewc_drift_ref`; zeros where it has
    no EWC state or ewc_lambda is 0). Empty tensors are skipped. Every call validates every tensor; EWCAdamW
    prepares the groups once (group_tensors) and calls step_groups.
    """
    if len(grads) != len(params):
        raise ValueError(f"ewc_adamw: {len(grads)} grads for {len(params)} parameters")
    groups = group_tensors(params, exp_avgs, exp_avg_sqs, fishers, anchors, ewc_lambda=float(ewc_lambda),
                           block=block)
    return step_groups(groups, grads, ewc_lambda=ewc_lambda, lr=lr, betas=betas, eps=eps,
                       weight_decay=weight_decay, step=step, grad_scale=grad_scale, clip_mode=clip_mode,
                       ewc_mode=ewc_mode, backend=backend, drift=drift)


def ewc_grad_sq_norms(params: Sequence[Tensor], grads: Sequence[Tensor], *,
                      fishers: Sequence[Tensor | None] | None = None,
                      anchors: Sequence[Tensor | None] | None = None, ewc_lambda: float = 0.0,
                      backend: str = "torch", block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """(sum(g^2), sum((g + e)^2)) over all tensors as 0-dim float64 device tensors, in one read pass.

    With ewc_lambda = 0 or no EWC state only g is read (and both values are sum(g^2)). Nothing is written.
    """
    if len(grads) != len(params):
        raise ValueError(f"ewc_adamw: {len(grads)} grads for {len(params)} parameters")
    groups = group_tensors(params, None, None, fishers, anchors, ewc_lambda=float(ewc_lambda), block=block)
    return grad_sq_norms_groups(groups, grads, ewc_lambda=ewc_lambda, backend=backend)

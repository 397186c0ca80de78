"""Fused EWC-AdamW step: the Fisher-weighted pull towards the anchor, AdamW, and the penalty, in one pass.

What it computes, per element of every parameter (the definition is `ewc_adamw_ref`):

    d  = p - anchor                        (at the pre-step p)
    e  = ewc_lambda * (F * d)              the gradient of (lambda/2) * sum(F * (p - anchor)^2)
    g' = g * s + e      clip "task"        (s: the clip scale of `grad_scale`, 1 without clipping)
    g' = (g + e) * s    clip "total"
    then exactly torch.optim.AdamW on g' (decoupled weight decay, bias correction, torch's lerp for m):
    p  = p * (1 - lr * wd);  m = lerp(m, g', 1 - beta1);  v = v * beta2 + (1 - beta2) * g' * g'
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and in the same pass the reductions (lambda/2) * sum(F * d^2) (the penalty) and sum(e^2) (the squared norm of
the EWC gradient). `ewc_grad_sq_norms` is the extra read pass that clip mode "total" needs before the step:
sum(g^2) and sum((g + e)^2), nothing written.

Bytes each variant must move per element (p, g, m, v float32; the floor a memory-bound kernel approaches):

    AdamW, no EWC (lambda = 0 or no EWC state)    read p g m v, write p m v       28 B   (1.00x)
    EWC, F and anchor float32                     + read F, anchor                36 B   (1.29x)
    EWC, F and anchor bfloat16                    + read F, anchor                32 B   (1.14x)
    norm pass, clip "total" (float32 / bfloat16)  read p g F anchor               16 B / 12 B
    norm pass, clip "task"                        read g                          4 B

Backends (all take lists of tensors and do one call, or a small fixed number, per dtype group):
    "triton"  CUDA. One launch over every full block of all tensors of a dtype group and one over the tensors'
              last partial blocks, from a table of data pointers (int64) and a block -> (tensor, offset) map,
              both cached while the pointers stay (FSDP2 keeps local shards at stable addresses); the gradients'
              pointers go in a separate small table uploaded every step (FSDP2 makes new gradients). Unmasked
              full blocks keep 128-bit vector accesses: the tensor sizes are not known to the compiler, so one
              masked path for everything would fall back to scalar accesses. The penalty and the norm are
              reduced per program into a small buffer, summed afterwards (deterministic, no atomics, no host
              synchronisation). Step count, lr, betas, eps, weight decay and lambda are runtime arguments:
              a new step never recompiles. Runs on CPU tensors in Triton's interpreter when the process was
              started with TRITON_INTERPRET=1 (tests): the same kernel source and pointer tables, but nothing is
              compiled and the `tl.multiple_of` alignment hints are no-ops; the GPU build (128-bit accesses) is
              checked by compiling for sm_90 without a GPU (tests/test_ewc_adamw.py).
    "cpp"     CPU. csrc/ewc_adamw.cpp, built on first use with torch.utils.cpp_extension and cached: OpenMP
              threads over chunks of the concatenated index space, a SIMD inner loop. Also float64.
    "torch"   Any device: torch._foreach_* ops (several passes over memory); the fallback and the float64 path.

Limits: tensors contiguous (a non-contiguous one is an error, never silently copied), all on one device; p, g, m, v
one dtype: float32 (all backends) or float64 ("cpp", "torch"); F and anchor float32 or bfloat16 each (float64 for
float64 parameters), the shape of their parameter. A parameter without EWC state has F = anchor = None.
"""

from __future__ import annotations

import math
import platform
import threading
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows CPU installs: the "cpp" and "torch" backends remain
    triton = None
    tl = None

BACKENDS = ("triton", "cpp", "torch")
CLIP_MODES = ("task", "total")
DEFAULT_BLOCK = 2048
EWC_DTYPES = (torch.float32, torch.bfloat16)


# --------------------------------------------------------------------------------------------------- reference


def ewc_adamw_ref(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                  exp_avg_sqs: Sequence[Tensor], *, fishers: Sequence[Tensor | None] | None = None,
                  anchors: Sequence[Tensor | None] | None = None, ewc_lambda: float = 0.0, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                  grad_scale: float | Tensor | None = None, clip_mode: str = "task") -> tuple[Tensor, Tensor]:
    """The definition, one tensor at a time in plain torch, in place on params, exp_avgs, exp_avg_sqs.

    `step` is the step number being taken (1 for the first). F and anchor are upcast to the parameter's dtype
    (bfloat16 -> float32 is exact), so every backend does identical math on the upcast values.
    Returns 0-dim float64 tensors (penalty, sum of squares of the EWC gradient) at the pre-step parameters.
    """
    beta1, beta2 = betas
    n = len(params)
    fishers = list(fishers) if fishers is not None else [None] * n
    anchors = list(anchors) if anchors is not None else [None] * n
    device = params[0].device if n else torch.device("cpu")
    penalty = torch.zeros((), dtype=torch.float64, device=device)
    ewc_sq = torch.zeros((), dtype=torch.float64, device=device)
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
            if e is not None:
                g = g + e
        # torch.optim.AdamW, single-tensor path.
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / bias_correction1
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
    return penalty, ewc_sq


def ewc_grad_sq_norms_ref(params: Sequence[Tensor], grads: Sequence[Tensor], *,
                          fishers: Sequence[Tensor | None] | None = None,
                          anchors: Sequence[Tensor | None] | None = None,
                          ewc_lambda: float = 0.0) -> tuple[Tensor, Tensor]:
    """(sum(g^2), sum((g + e)^2)) as 0-dim float64 tensors; the second is sum(g^2) too where there is no EWC."""
    n = len(params)
    fishers = list(fishers) if fishers is not None else [None] * n
    anchors = list(anchors) if anchors is not None else [None] * n
    device = params[0].device if n else torch.device("cpu")
    grad_sq = torch.zeros((), dtype=torch.float64, device=device)
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
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
    """Tensors that share one kernel specialisation: parameter dtype, and F/anchor dtypes (none: no EWC).

    `indices` are the positions of these tensors in the caller's lists (the gradients of a step are picked by
    them). A group caches the data pointers of its tensors (and the Triton launch tables built from them): the
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
    sizes: list[int] = field(default_factory=list)
    pointer_rows: list[list[int]] | None = None  # p, m, v, F, anchor (p's pointers where a stream is absent)
    triton_tables: object = None

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

    def pointers(self) -> list[list[int]]:
        p_ptrs = _ptrs(self.params)
        if self.pointer_rows is None or self.pointer_rows[0] != p_ptrs:
            self.pointer_rows = [p_ptrs] + [_ptrs(s) for s in (self.exp_avgs or self.params,
                                                                self.exp_avg_sqs or self.params,
                                                                self.fishers or self.params,
                                                                self.anchors or self.params)]
            self.triton_tables = None
        return self.pointer_rows

    @property
    def has_ewc(self) -> bool:
        return bool(self.fishers)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


def group_tensors(params: Sequence[Tensor], exp_avgs: Sequence[Tensor] | None,
                  exp_avg_sqs: Sequence[Tensor] | None, fishers: Sequence[Tensor | None] | None,
                  anchors: Sequence[Tensor | None] | None, *, ewc_lambda: float,
                  check: bool = True) -> list[TensorGroup]:
    """Validate (with `check`) and split the lists into TensorGroups; empty tensors are left out.

    With ewc_lambda = 0 nothing is put in an EWC group: plain AdamW, which never reads F or anchor.
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
        key = (p.dtype, f.dtype if use_ewc else None, a.dtype if use_ewc else None)
        g = groups.setdefault(key, TensorGroup([], [], [], [], [], []))
        g.add(i, p, exp_avgs[i] if exp_avgs is not None else None,
              exp_avg_sqs[i] if exp_avg_sqs is not None else None, f if use_ewc else None, a if use_ewc else None)
    if len({grp.params[0].device for grp in groups.values()}) > 1:
        raise ValueError("ewc_adamw: all parameters must be on one device (build one optimizer per device)")
    return list(groups.values())


def group_grads(group: TensorGroup, grads: Sequence[Tensor], *, check: bool = True) -> list[Tensor]:
    """The gradients of `group`'s tensors, picked from the caller's list (checked: shape, dtype, contiguity)."""
    out = [grads[i] for i in group.indices]
    if check:
        for i, g, p in zip(group.indices, out, group.params):
            if not (isinstance(g, Tensor) and g.shape == p.shape and g.dtype == p.dtype and g.device == p.device
                    and g.is_contiguous()):
                _check("grads", i, g, like=p, dtypes=(p.dtype,))
    return out


@dataclass(frozen=True)
class _Coeffs:
    """Step scalars, formed in float64 on the host (as torch's foreach AdamW does) and rounded once by the kernel."""

    ewc_lambda: float
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float
    bias_correction2: float

    @classmethod
    def make(cls, *, ewc_lambda, lr, betas, eps, weight_decay, step) -> "_Coeffs":
        if step < 1:
            raise ValueError(f"ewc_adamw: step counts from 1 (the step being taken), got {step}")
        beta1, beta2 = (float(b) for b in betas)
        return cls(float(ewc_lambda), float(lr), beta1, beta2, float(eps), float(weight_decay),
                   1 - beta1**step, 1 - beta2**step)


# ------------------------------------------------------------------------------------------------ torch backend


def _upcast(ts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in ts]


def _dot_sum(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    return torch.stack([torch.dot(x.view(-1), y.view(-1)).to(torch.float64) for x, y in zip(xs, ys)]).sum()


def _scale_tensor(grad_scale, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(grad_scale, Tensor):
        if grad_scale.numel() != 1:
            raise ValueError(f"ewc_adamw: grad_scale must hold one value, got shape {tuple(grad_scale.shape)}")
        return grad_scale.to(device=device, dtype=dtype).reshape(())
    return torch.tensor(float(grad_scale), dtype=dtype, device=device)


def _step_torch(g: TensorGroup, grads: list[Tensor], c: _Coeffs, grad_scale,
                clip_total: bool) -> tuple[Tensor, Tensor]:
    device = g.params[0].device
    if grad_scale is not None:
        grad_scale = _scale_tensor(grad_scale, device, g.params[0].dtype)
    penalty = torch.zeros((), dtype=torch.float64, device=device)
    ewc_sq = torch.zeros((), dtype=torch.float64, device=device)
    if g.has_ewc:
        dtype = g.params[0].dtype
        d = torch._foreach_sub(g.params, _upcast(g.anchors, dtype))
        fd = torch._foreach_mul(d, _upcast(g.fishers, dtype))
        penalty = (c.ewc_lambda / 2) * _dot_sum(fd, d)
        del d
        e = torch._foreach_mul(fd, c.ewc_lambda)
        del fd
        ewc_sq = _dot_sum(e, e)
        if clip_total:
            grads = torch._foreach_add(grads, e)
            if grad_scale is not None:
                torch._foreach_mul_(grads, grad_scale)
        else:
            grads = torch._foreach_mul(grads, grad_scale) if grad_scale is not None else grads
            grads = torch._foreach_add(grads, e)
        del e
    elif grad_scale is not None:
        grads = torch._foreach_mul(grads, grad_scale)
    # torch.optim.AdamW's foreach path (decoupled weight decay, float step sizes).
    if c.weight_decay != 0:
        torch._foreach_mul_(g.params, 1 - c.lr * c.weight_decay)
    torch._foreach_lerp_(g.exp_avgs, grads, 1 - c.beta1)
    torch._foreach_mul_(g.exp_avg_sqs, c.beta2)
    torch._foreach_addcmul_(g.exp_avg_sqs, grads, grads, 1 - c.beta2)
    del grads
    denom = torch._foreach_sqrt(g.exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(c.bias_correction2))
    torch._foreach_add_(denom, c.eps)
    torch._foreach_addcdiv_(g.params, g.exp_avgs, denom, -(c.lr / c.bias_correction1))
    return penalty, ewc_sq


def _norms_torch(g: TensorGroup, grads: list[Tensor], ewc_lambda: float) -> tuple[Tensor, Tensor]:
    grad_sq = _dot_sum(grads, grads)
    if not g.has_ewc:
        return grad_sq, grad_sq
    dtype = g.params[0].dtype
    t = torch._foreach_sub(g.params, _upcast(g.anchors, dtype))
    torch._foreach_mul_(t, _upcast(g.fishers, dtype))
    torch._foreach_mul_(t, ewc_lambda)
    torch._foreach_add_(t, grads)
    return grad_sq, _dot_sum(t, t)


# -------------------------------------------------------------------------------------------------- cpp backend

_CPP_LOCK = threading.Lock()
_CPP_MODULE = None
_CPP_FAILED: str | None = None  # why the build failed (warned once), or None


def _cpu_build_flags() -> tuple[str, list[str]]:
    """A tag for the build name and the SIMD flags for this machine's vector unit.

    torch_extensions caches builds by name: the tag keeps an AVX-512 build from being loaded on an AVX2-only machine
    sharing the cache directory. The flags name instruction sets explicitly instead of -march=native.
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        capability = torch.backends.cpu.get_cpu_capability()
        avx2 = ["-mavx2", "-mfma", "-mf16c"]
        if capability == "AVX512":
            return "avx512", avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                     "-mprefer-vector-width=512"]
        if capability == "AVX2":
            return "avx2", avx2
    return "generic", []


def cpp_extension():
    """The compiled CPU module (built on first use, then cached by torch_extensions), or None if it cannot be built.

    A missing compiler or a failed build warns once and returns None; callers fall back to the "torch" backend.
    """
    global _CPP_MODULE, _CPP_FAILED
    if _CPP_MODULE is not None or _CPP_FAILED is not None:
        return _CPP_MODULE
    with _CPP_LOCK:
        if _CPP_MODULE is not None or _CPP_FAILED is not None:
            return _CPP_MODULE
        from csrc import SOURCE_DIR

        tag, simd = _cpu_build_flags()
        try:
            from torch.utils import cpp_extension as ext

            _CPP_MODULE = ext.load(
                name=f"gemma_ewc_cpu_{tag}",
                sources=[str(SOURCE_DIR / "ewc_adamw.cpp")],
                # -ffp-contract=off: no fused multiply-adds, every product rounded as torch rounds it (see
                # _FP_FUSION below); -fno-math-errno lets sqrt vectorize.
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *simd],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - any build failure (no compiler, no OpenMP, ...) degrades the same way
            _CPP_FAILED = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warnings.warn(f"gemma-ewc: the C++ CPU optimizer kernel could not be built ({_CPP_FAILED}); using the "
                          f"slower 'torch' backend. Install a C++ compiler with OpenMP (g++) to get the fast path.",
                          RuntimeWarning, stacklevel=2)
        return _CPP_MODULE


def _dtype_name(t: Tensor | None) -> str:
    return "" if t is None else str(t.dtype).removeprefix("torch.")


def _ptrs(ts: list[Tensor]) -> list[int]:
    return [t.data_ptr() for t in ts]


def _scale_value(grad_scale) -> float:
    if grad_scale is None:
        return 1.0
    return float(grad_scale.item()) if isinstance(grad_scale, Tensor) else float(grad_scale)


def _step_cpp(mod, g: TensorGroup, grads: list[Tensor], c: _Coeffs, grad_scale,
              clip_total: bool) -> tuple[Tensor, Tensor]:
    s = _scale_value(grad_scale)
    p, m, v, f, a = g.pointers()
    pen, sq = mod.ewc_adamw_step(
        g.sizes, p, _ptrs(grads), m, v, f if g.has_ewc else [], a if g.has_ewc else [], _dtype_name(g.params[0]),
        _dtype_name(g.fishers[0] if g.has_ewc else None), _dtype_name(g.anchors[0] if g.has_ewc else None),
        c.ewc_lambda, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.bias_correction1, c.bias_correction2,
        1.0 if clip_total else s, s if clip_total else 1.0)
    return (torch.tensor(c.ewc_lambda / 2 * pen, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64))


def _norms_cpp(mod, g: TensorGroup, grads: list[Tensor], ewc_lambda: float) -> tuple[Tensor, Tensor]:
    p, _, _, f, a = g.pointers()
    grad_sq, total_sq = mod.ewc_grad_sq_norms(
        g.sizes, p, _ptrs(grads), f if g.has_ewc else [], a if g.has_ewc else [], _dtype_name(g.params[0]),
        _dtype_name(g.fishers[0] if g.has_ewc else None), _dtype_name(g.anchors[0] if g.has_ewc else None),
        ewc_lambda)
    if not g.has_ewc:
        total_sq = grad_sq
    return torch.tensor(grad_sq, dtype=torch.float64), torch.tensor(total_sq, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- triton backend

if triton is not None:

    @triton.jit
    def _ewc_adamw_kernel(
        ptrs,  # int64 [5, T]: data pointers of p, m, v, F, anchor of each tensor
        grad_ptrs,  # int64 [T]: data pointers of the gradients (new tensors every step, so a separate table)
        num_tensors,  # T, the row stride of ptrs
        blocks,  # int64 [2, B]: tensor index and first element of each program's block
        num_blocks,  # B, the row stride of blocks
        sizes,  # int64 [T]: elements per tensor (read by the masked launch only)
        partials,  # float32 [B, 2]: per-program sum(F d^2), sum(e^2)
        grad_scale,  # float32 [1]: the clip scale (HAS_SCALE)
        ewc_lambda, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, decay, neg_step_size,
        HAS_EWC: tl.constexpr, F_BF16: tl.constexpr, A_BF16: tl.constexpr, HAS_SCALE: tl.constexpr,
        CLIP_TOTAL: tl.constexpr, LERP_SMALL: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(blocks + pid)
        start = tl.load(blocks + num_blocks + pid)
        p_ptr = tl.load(ptrs + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(ptrs + num_tensors + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(ptrs + 2 * num_tensors + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:  # every pointer 16-byte aligned (checked by the launcher): 128-bit accesses
            start = tl.multiple_of(start, BLOCK)
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        offs = start + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < tl.load(sizes + t)
        else:
            mask = None
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask)
        if HAS_SCALE:
            s = tl.load(grad_scale)
        if HAS_EWC:
            f_ptr = tl.load(ptrs + 3 * num_tensors + t).to(tl.pointer_type(tl.bfloat16 if F_BF16 else tl.float32))
            a_ptr = tl.load(ptrs + 4 * num_tensors + t).to(tl.pointer_type(tl.bfloat16 if A_BF16 else tl.float32))
            if ALIGNED:
                f_ptr = tl.multiple_of(f_ptr, 16)
                a_ptr = tl.multiple_of(a_ptr, 16)
            # bfloat16 loads limited to 4 elements per thread, as the float32 stores are (128 bits): left at 8, the
            # compiler lays the whole block out 8 per thread and converts m, v, p through shared memory before
            # each store (3 conversions and 6 more barriers per block; test_triton_step_keeps_one_layout...).
            f = tl.load(f_ptr + (tl.max_contiguous(offs, 4) if F_BF16 else offs), mask=mask).to(tl.float32)
            a = tl.load(a_ptr + (tl.max_contiguous(offs, 4) if A_BF16 else offs), mask=mask).to(tl.float32)
            d = p - a
            fd = f * d
            e = ewc_lambda * fd
            pen = fd * d
            sq = e * e
            if MASKED:  # masked-off lanes hold undefined values
                pen = tl.where(mask, pen, 0.0)
                sq = tl.where(mask, sq, 0.0)
            tl.store(partials + 2 * pid, tl.sum(pen, axis=0))
            tl.store(partials + 2 * pid + 1, tl.sum(sq, axis=0))
            if HAS_SCALE:
                if CLIP_TOTAL:
                    g = (g + e) * s
                else:
                    g = g * s + e
            else:
                g = g + e
        elif HAS_SCALE:
            g = g * s
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if LERP_SMALL:  # torch's lerp: formula chosen by |weight| < 0.5
            m = m + lerp_weight * (g - m)
        else:
            m = g - (g - m) * (1.0 - lerp_weight)
        v = v * beta2 + one_minus_beta2 * g * g
        # IEEE sqrt and division (the defaults are approximate on the GPU): the kernel is memory-bound anyway.
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p * decay + neg_step_size * tl.div_rn(m, denom)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)

    @triton.jit
    def _ewc_grad_norms_kernel(
        ptrs, grad_ptrs, num_tensors, blocks, num_blocks, sizes,  # as in _ewc_adamw_kernel
        partials,  # float32 [B, 2]: per-program sum(g^2), sum((g + e)^2)
        ewc_lambda,
        HAS_EWC: tl.constexpr, F_BF16: tl.constexpr, A_BF16: tl.constexpr, MASKED: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(blocks + pid)
        start = tl.load(blocks + num_blocks + pid)
        g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            start = tl.multiple_of(start, BLOCK)
            g_ptr = tl.multiple_of(g_ptr, 16)
        offs = start + tl.arange(0, BLOCK)
        if MASKED:
            mask = offs < tl.load(sizes + t)
        else:
            mask = None
        g = tl.load(g_ptr + offs, mask=mask)
        gsq = g * g
        if MASKED:
            gsq = tl.where(mask, gsq, 0.0)
        tl.store(partials + 2 * pid, tl.sum(gsq, axis=0))
        if HAS_EWC:
            p_ptr = tl.load(ptrs + t).to(tl.pointer_type(tl.float32))
            f_ptr = tl.load(ptrs + 3 * num_tensors + t).to(tl.pointer_type(tl.bfloat16 if F_BF16 else tl.float32))
            a_ptr = tl.load(ptrs + 4 * num_tensors + t).to(tl.pointer_type(tl.bfloat16 if A_BF16 else tl.float32))
            if ALIGNED:
                p_ptr = tl.multiple_of(p_ptr, 16)
                f_ptr = tl.multiple_of(f_ptr, 16)
                a_ptr = tl.multiple_of(a_ptr, 16)
            p = tl.load(p_ptr + offs, mask=mask)
            f = tl.load(f_ptr + offs, mask=mask).to(tl.float32)
            a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
            tot = g + ewc_lambda * (f * (p - a))
            tsq = tot * tot
            if MASKED:
                tsq = tl.where(mask, tsq, 0.0)
            tl.store(partials + 2 * pid + 1, tl.sum(tsq, axis=0))


@dataclass
class _TritonTables:
    """Launch tables of one TensorGroup (on the device), valid while its tensors keep their data pointers."""

    block: int
    ptrs: Tensor  # int64 [5, T]: p, m, v, F, anchor (placeholders: p's pointers where a stream is absent)
    sizes: Tensor  # int64 [T]
    full_blocks: Tensor  # int64 [2, Bf]
    tail_blocks: Tensor  # int64 [2, Bt]
    aligned: bool  # every static pointer 16-byte aligned


def _block_maps(sizes: list[int], block: int) -> tuple[list[list[int]], list[list[int]]]:
    full_t, full_s, tail_t, tail_s = [], [], [], []
    for i, n in enumerate(sizes):
        nfull = n // block
        full_t += [i] * nfull
        full_s += range(0, nfull * block, block)
        if n % block:
            tail_t.append(i)
            tail_s.append(nfull * block)
    return [full_t, full_s], [tail_t, tail_s]


def _triton_tables(g: TensorGroup, block: int) -> _TritonTables:
    """g's launch tables, rebuilt when a parameter moved or the block size changed."""
    rows = g.pointers()  # resets g.triton_tables when a pointer changed
    tables = g.triton_tables
    if tables is None or tables.block != block:
        device = g.params[0].device
        full, tail = _block_maps(g.sizes, block)
        to_dev = lambda rows: torch.tensor(rows, dtype=torch.int64).to(device)  # noqa: E731
        tables = _TritonTables(block=block, ptrs=to_dev(rows), sizes=to_dev(g.sizes), full_blocks=to_dev(full),
                               tail_blocks=to_dev(tail), aligned=all(x % 16 == 0 for r in rows for x in r))
        g.triton_tables = tables
    return tables


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the process was started with TRITON_INTERPRET=1)."""
    return triton is not None and type(_ewc_adamw_kernel).__name__ == "InterpretedFunction"


def _check_triton(device: torch.device) -> None:
    if triton is None:
        raise ValueError("ewc_adamw: the 'triton' backend needs the triton package (pip install triton)")
    if device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"ewc_adamw: the 'triton' backend runs on CUDA tensors, these are on {device}; start the "
                         f"process with TRITON_INTERPRET=1 to run it in Triton's CPU interpreter (tests only)")


# Fused multiply-adds are off in both compiled kernels. AdamW divides each gradient element by its own running
# magnitude, so where g * s and the EWC term e nearly cancel, g' = g * s + e is ill-conditioned: an FMA (one rounding
# instead of two) changes g' by an ulp of e, and the step of that element by up to lr once |g'| approaches eps.
# Rounded like the reference, g' is bit-identical and the kernels stay within the 1e-6 tolerance for any input.
_FP_FUSION = False


def _check_device(backend: str, device: torch.device) -> None:
    if backend == "triton":
        _check_triton(device)
    elif backend == "cpp" and device.type != "cpu":
        raise ValueError(f"ewc_adamw: the 'cpp' backend runs on CPU tensors, these are on {device}")


def _launch_both(kernel, tables: _TritonTables, grads: list[Tensor], partials: Tensor, args: tuple, block: int,
                 **constexprs) -> None:
    """One launch over all full blocks (unmasked), one over the tensors' partial last blocks (masked)."""
    grad_rows = _ptrs(grads)
    grad_ptrs = torch.tensor(grad_rows, dtype=torch.int64).to(partials.device)
    aligned = tables.aligned and all(x % 16 == 0 for x in grad_rows)
    nfull = tables.full_blocks.shape[1]
    ntail = tables.tail_blocks.shape[1]
    T = tables.ptrs.shape[1]
    options = dict(num_warps=8 if block >= 2048 else 4, enable_fp_fusion=_FP_FUSION)
    if nfull:
        kernel[(nfull,)](tables.ptrs, grad_ptrs, T, tables.full_blocks, nfull, tables.sizes, partials, *args,
                         MASKED=False, ALIGNED=aligned, BLOCK=block, **options, **constexprs)
    if ntail:
        tail_partials = partials[nfull:] if partials.shape[0] > 1 else partials  # [1, 2]: unused placeholder
        kernel[(ntail,)](tables.ptrs, grad_ptrs, T, tables.tail_blocks, ntail, tables.sizes, tail_partials, *args,
                         MASKED=True, ALIGNED=aligned, BLOCK=block, **options, **constexprs)


def _step_triton(g: TensorGroup, grads: list[Tensor], c: _Coeffs, grad_scale, clip_total: bool,
                 block: int) -> tuple[Tensor, Tensor]:
    device = g.params[0].device
    if g.dtype != torch.float32:
        raise ValueError("ewc_adamw: the 'triton' backend takes float32 parameters (use 'torch' for float64)")
    tables = _triton_tables(g, block)
    nblocks = tables.full_blocks.shape[1] + tables.tail_blocks.shape[1]
    partials = torch.empty((nblocks if g.has_ewc else 1, 2), dtype=torch.float32, device=device)
    if grad_scale is not None:
        grad_scale = _scale_tensor(grad_scale, device, torch.float32)
    lerp_weight = 1 - c.beta1
    args = (grad_scale if grad_scale is not None else partials,
            c.ewc_lambda, lerp_weight, c.beta2, 1 - c.beta2, math.sqrt(c.bias_correction2), c.eps,
            1 - c.lr * c.weight_decay, -(c.lr / c.bias_correction1))
    _launch_both(_ewc_adamw_kernel, tables, grads, partials, args, block, HAS_EWC=g.has_ewc,
                 F_BF16=g.has_ewc and g.fishers[0].dtype == torch.bfloat16,
                 A_BF16=g.has_ewc and g.anchors[0].dtype == torch.bfloat16, HAS_SCALE=grad_scale is not None,
                 CLIP_TOTAL=clip_total, LERP_SMALL=abs(lerp_weight) < 0.5)
    if not g.has_ewc:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return zero, zero
    sums = partials.sum(dim=0, dtype=torch.float64)
    return (c.ewc_lambda / 2) * sums[0], sums[1]


def _norms_triton(g: TensorGroup, grads: list[Tensor], ewc_lambda: float, block: int) -> tuple[Tensor, Tensor]:
    if g.dtype != torch.float32:
        raise ValueError("ewc_adamw: the 'triton' backend takes float32 parameters (use 'torch' for float64)")
    tables = _triton_tables(g, block)
    nblocks = tables.full_blocks.shape[1] + tables.tail_blocks.shape[1]
    partials = torch.zeros((nblocks, 2), dtype=torch.float32, device=g.params[0].device)
    _launch_both(_ewc_grad_norms_kernel, tables, grads, partials, (ewc_lambda,), block, HAS_EWC=g.has_ewc,
                 F_BF16=g.has_ewc and g.fishers[0].dtype == torch.bfloat16,
                 A_BF16=g.has_ewc and g.anchors[0].dtype == torch.bfloat16)
    sums = partials.sum(dim=0, dtype=torch.float64)
    return sums[0], (sums[1] if g.has_ewc else sums[0])


# ---------------------------------------------------------------------------------------------- public functions


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """"auto" -> "triton" on CUDA (when triton imports), "cpp" on CPU (when it builds), else "torch"."""
    device = torch.device(device)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"ewc_adamw: unknown backend {backend!r}; choose auto, triton, cpp or torch")
    if backend == "auto":
        if device.type == "cuda" and triton is not None:
            return "triton"
        if device.type == "cpu" and cpp_extension() is not None:
            return "cpp"
        return "torch"
    if backend == "triton":
        _check_triton(device)
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"ewc_adamw: the 'cpp' backend runs on CPU tensors, these are on {device}")
    return backend


def _sum_over_groups(groups: Sequence[TensorGroup], grads: Sequence[Tensor], *, backend: str, check_grads: bool,
                     on_triton, on_cpp, on_torch) -> tuple[Tensor, Tensor]:
    """Run the backend's function on each group (`on_cpp` also gets the compiled module; "cpp" falls back to
    `on_torch` where it cannot be built) and sum the two 0-dim results over the groups (float64 zeros if none)."""
    first = second = None
    mod = None
    for g in groups:
        device = g.params[0].device
        _check_device(backend, device)
        gg = group_grads(g, grads, check=check_grads)
        if backend == "cpp" and mod is None:
            mod = cpp_extension()
        if backend == "triton":
            a, b = on_triton(g, gg)
        elif backend == "cpp" and mod is not None:
            a, b = on_cpp(mod, g, gg)
        elif backend in ("cpp", "torch"):
            a, b = on_torch(g, gg)
        else:
            raise ValueError(f"ewc_adamw: unknown backend {backend!r}; choose triton, cpp or torch")
        a, b = a.to(device), b.to(device)
        first = a if first is None else first + a
        second = b if second is None else second + b
    if first is None:
        first = second = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu")
    return first, second


def step_groups(groups: Sequence[TensorGroup], grads: Sequence[Tensor], *, ewc_lambda: float, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                grad_scale: float | Tensor | None = None, clip_mode: str = "task", backend: str,
                block: int = DEFAULT_BLOCK, check_grads: bool = True) -> tuple[Tensor, Tensor]:
    """The step on prepared groups (see ewc_adamw_); `grads` is the caller's full list, picked by group.indices."""
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"ewc_adamw: clip_mode must be 'task' or 'total', got {clip_mode!r}")
    c = _Coeffs.make(ewc_lambda=ewc_lambda, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=step)
    clip_total = clip_mode == "total"
    return _sum_over_groups(
        groups, grads, backend=backend, check_grads=check_grads,
        on_triton=lambda g, gg: _step_triton(g, gg, c, grad_scale, clip_total, block),
        on_cpp=lambda mod, g, gg: _step_cpp(mod, g, gg, c, grad_scale, clip_total),
        on_torch=lambda g, gg: _step_torch(g, gg, c, grad_scale, clip_total))


def grad_sq_norms_groups(groups: Sequence[TensorGroup], grads: Sequence[Tensor], *, ewc_lambda: float,
                         backend: str, block: int = DEFAULT_BLOCK,
                         check_grads: bool = True) -> tuple[Tensor, Tensor]:
    """ewc_grad_sq_norms on prepared groups."""
    lam = float(ewc_lambda)
    return _sum_over_groups(groups, grads, backend=backend, check_grads=check_grads,
                            on_triton=lambda g, gg: _norms_triton(g, gg, lam, block),
                            on_cpp=lambda mod, g, gg: _norms_cpp(mod, g, gg, lam),
                            on_torch=lambda g, gg: _norms_torch(g, gg, lam))


def ewc_adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], *, fishers: Sequence[Tensor | None] | None = None,
               anchors: Sequence[Tensor | None] | None = None, ewc_lambda: float = 0.0, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, step: int,
               grad_scale: float | Tensor | None = None, clip_mode: str = "task", backend: str = "torch",
               block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """One fused EWC-AdamW step, in place on params, exp_avgs and exp_avg_sqs (see the module docstring).

    `step` is the step being taken (1 first); `grad_scale` the clip scale s (a float or a 1-element tensor on the
    device, read by the kernel: no host sync); `clip_mode` where s applies ("task": to g; "total": to g + e).
    Returns 0-dim float64 tensors on the device: the penalty (lambda/2) sum F (p - anchor)^2 at the pre-step p,
    and sum(e^2), the squared norm of the EWC gradient. Empty tensors are skipped. Every call validates every
    tensor; EWCAdamW prepares the groups once (group_tensors) and calls step_groups.
    """
    if len(grads) != len(params):
        raise ValueError(f"ewc_adamw: {len(grads)} grads for {len(params)} parameters")
    groups = group_tensors(params, exp_avgs, exp_avg_sqs, fishers, anchors, ewc_lambda=float(ewc_lambda))
    return step_groups(groups, grads, ewc_lambda=ewc_lambda, lr=lr, betas=betas, eps=eps,
                       weight_decay=weight_decay, step=step, grad_scale=grad_scale, clip_mode=clip_mode,
                       backend=backend, block=block)


def ewc_grad_sq_norms(params: Sequence[Tensor], grads: Sequence[Tensor], *,
                      fishers: Sequence[Tensor | None] | None = None,
                      anchors: Sequence[Tensor | None] | None = None, ewc_lambda: float = 0.0,
                      backend: str = "torch", block: int = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """(sum(g^2), sum((g + e)^2)) over all tensors as 0-dim float64 device tensors, in one read pass.

    With ewc_lambda = 0 or no EWC state only g is read (and both values are sum(g^2)). Nothing is written.
    """
    if len(grads) != len(params):
        raise ValueError(f"ewc_adamw: {len(grads)} grads for {len(params)} parameters")
    groups = group_tensors(params, None, None, fishers, anchors, ewc_lambda=float(ewc_lambda))
    return grad_sq_norms_groups(groups, grads, ewc_lambda=ewc_lambda, backend=backend, block=block)

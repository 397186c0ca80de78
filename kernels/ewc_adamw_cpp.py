"""The C++ backend of kernels/ewc_adamw.py: builds csrc/ewc_adamw.cpp on first use and calls it.

The kernel (OpenMP threads over chunks of the concatenated index space, a SIMD inner loop, float32 and float64)
is C++ in csrc/; this file is its launcher, beside the other backends' launchers: the build with
torch.utils.cpp_extension (cached by torch_extensions; no compiler is needed at install time) and the calls,
one per TensorGroup. csrc/ stays a directory of sources. A missing compiler or a failed build warns once and
`extension()` returns None: kernels/ewc_adamw.py then runs the "torch" backend instead.
"""

from __future__ import annotations

import platform
import threading
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from csrc import SOURCE_DIR

if TYPE_CHECKING:
    from kernels.ewc_adamw import StepScalars, TensorGroup

_lock = threading.Lock()
_module = None
_build_failure: str | None = None  # why the build failed (warned once), or None


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


def extension():
    """The compiled CPU module (built on first use, then cached by torch_extensions), or None if it cannot be built."""
    global _module, _build_failure
    if _module is not None or _build_failure is not None:
        return _module
    with _lock:
        if _module is not None or _build_failure is not None:
            return _module
        # Imported here: torch.utils.cpp_extension costs a quarter of a second (setuptools), which a CUDA run or
        # a "torch"-backend run never needs.
        from torch.utils import cpp_extension

        tag, simd = _cpu_build_flags()
        try:
            _module = cpp_extension.load(
                name=f"gemma_ewc_cpu_{tag}",
                sources=[str(SOURCE_DIR / "ewc_adamw.cpp")],
                # -ffp-contract=off: no fused multiply-adds, every product rounded as torch rounds it (see
                # FP_FUSION in kernels/ewc_adamw_triton.py); -fno-math-errno lets sqrt vectorize.
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *simd],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - any build failure (no compiler, no OpenMP, ...) degrades the same way
            _build_failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warnings.warn(f"gemma-ewc: the C++ CPU optimizer kernel could not be built ({_build_failure}); using the "
                          f"slower 'torch' backend. Install a C++ compiler with OpenMP (g++) to get the fast path.",
                          RuntimeWarning, stacklevel=2)
        return _module


def _dtype_name(t: Tensor | None) -> str:
    return "" if t is None else str(t.dtype).removeprefix("torch.")


def _ewc_dtype_names(group: TensorGroup) -> tuple[str, str]:
    if not group.has_ewc:
        return "", ""
    return _dtype_name(group.fishers[0]), _dtype_name(group.anchors[0])


def step(group: TensorGroup, grads: list[Tensor], scalars: StepScalars) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused step on one group (CPU); returns 0-dim float64 (penalty, sum e^2), and with scalars.drift float64
    [T, 2] (sum F d^2, sum d^2) per tensor (None otherwise or without EWC)."""
    s = scalars.scale_value()
    p, m, v, f, a = group.pointers()
    pen, sq, drift = extension().ewc_adamw_step(
        group.sizes, p, [grad.data_ptr() for grad in grads], m, v, f if group.has_ewc else [],
        a if group.has_ewc else [], _dtype_name(group.params[0]), *_ewc_dtype_names(group),
        scalars.ewc_lambda, scalars.lr, scalars.beta1, scalars.beta2, scalars.eps, scalars.weight_decay,
        scalars.bias_correction1, scalars.bias_correction2,
        1.0 if scalars.clip_total else s, s if scalars.clip_total else 1.0, scalars.decoupled, scalars.pull_rate,
        scalars.drift)
    per_tensor = torch.tensor(drift, dtype=torch.float64).view(-1, 2) if drift else None
    return (torch.tensor(scalars.ewc_lambda / 2 * pen, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64),
            per_tensor)


def grad_sq_norms(group: TensorGroup, grads: list[Tensor], ewc_lambda: float) -> tuple[Tensor, Tensor]:
    """(sum g^2, sum (g + e)^2) of one group (CPU), 0-dim float64."""
    p, _, _, f, a = group.pointers()
    grad_sq, total_sq = extension().ewc_grad_sq_norms(
        group.sizes, p, [grad.data_ptr() for grad in grads], f if group.has_ewc else [], a if group.has_ewc else [],
        _dtype_name(group.params[0]), *_ewc_dtype_names(group), ewc_lambda)
    if not group.has_ewc:
        total_sq = grad_sq
    return torch.tensor(grad_sq, dtype=torch.float64), torch.tensor(total_sq, dtype=torch.float64)

"""Soft-capped cross entropy of one chunk of float32 logits and its gradient, in two passes: the Triton kernel that
kernels/linear_cross_entropy.py runs on CUDA between its two GEMMs, and its reference.

    in   z [n, V] float32 logits (h @ W^T), labels [n] (-100: not scored), cap (None: no soft-cap)
         l = cap · tanh(z / cap)   (l = z without a cap),   t = tanh(z / cap)
    out  loss [n] float32         logsumexp(l_i) - l_i[y_i];  0 where not scored; NaN for a label outside [0, V)
         grad [n, V] (any float)  (softmax(l_i) - onehot(y_i)) · (1 - t²);  a zero row where not scored

One program per row. Pass 1 reads the row once and keeps, per lane, the sum of exp(l - shift): shift = cap when
cap <= SHIFT_BY_CAP_MAX (l <= cap, and exp(l - cap) >= exp(-2 cap) does not underflow, so no maximum is needed),
else a running maximum with rescaling. Pass 2 reads the row again and writes the gradient in the output's dtype.
Per element of the chunk: 4 B (the GEMM's float32 write) + 4 B + 4 B read + the gradient's write (2 B in bf16),
14 B where the torch composition in linear_cross_entropy.py moves 66 B (its module doc counts them); the chunk
needs one [n, V] float32 buffer and the gradient, not a second float32 one.

tanh is computed from exp (Triton's interpreter has no libdevice): (1 - e) / (1 + e) with e = exp(-2|x|), and
x - x³/3 + 2x⁵/15 below |x| < 1/16, where 1 - e would cancel (there the series' error is under 1e-9 relative);
within a few float32 ulps of torch.tanh elsewhere.

CUDA tensors, or CPU tensors in Triton's interpreter when the process was started with TRITON_INTERPRET=1 (tests:
tests/test_softcap_cross_entropy_triton.py); the sm_90 build is checked by compiling it without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from kernels.linear_cross_entropy import IGNORE_INDEX, SHIFT_BY_CAP_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: linear_cross_entropy keeps its torch composition
    triton = None

MAX_BLOCK = 4096  # elements of a row per loop iteration (the GPU default; the interpreter's tests use smaller)
NUM_WARPS = 8


def softcap_cross_entropy_ref(logits: Tensor, labels: Tensor, softcap: float | None,
                              grad_dtype: torch.dtype | None = torch.float32) -> tuple[Tensor, Tensor | None]:
    """The definition, in float64: (loss per row [n] float32, gradient [n, V] in grad_dtype, or None)."""
    z = logits.double()
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=1)
    scored = labels != IGNORE_INDEX
    in_range = (labels >= 0) & (labels < z.shape[1])
    target = torch.where(in_range, labels, 0)
    target_logit = z.gather(1, target[:, None])[:, 0]
    loss = torch.where(scored, torch.where(in_range, lse - target_logit, float("nan")), 0.0).float()
    if grad_dtype is None:
        return loss, None
    grad = torch.softmax(z, dim=1)
    grad[torch.arange(len(labels))[in_range], target[in_range]] -= 1.0
    if softcap:
        grad *= 1.0 - t * t
    grad *= scored[:, None]
    return loss, grad.to(grad_dtype)


if triton is not None:
    _IGNORE: tl.constexpr = tl.constexpr(IGNORE_INDEX)

    @triton.jit
    def _tanh(x):
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        x2 = a * a
        series = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0)))
        t = tl.where(a < 0.0625, series, (1.0 - e) / (1.0 + e))
        return tl.where(x < 0.0, -t, t)

    @triton.jit
    def softcap_cross_entropy_kernel(z_ptr, labels_ptr, loss_ptr, grad_ptr, cap, VOCAB: tl.constexpr,
                                     HAS_CAP: tl.constexpr, SHIFT_BY_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * VOCAB
        label = tl.load(labels_ptr + row)
        scored = label != _IGNORE
        in_range = (label >= 0) & (label < VOCAB)
        target = tl.where(in_range, label, -1)  # -1: no column is the target
        lanes = tl.arange(0, BLOCK)
        inv_cap = 1.0 / cap  # one division per row, not one per element (unused without a cap)

        # Pass 1: per lane, the sum of exp(l - shift) (and with a running shift, its maximum).
        if SHIFT_BY_CAP:
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, VOCAB, BLOCK):
                cols = start + lanes
                x = tl.load(z_row + cols, mask=cols < VOCAB, other=0.0)
                l = cap * _tanh(x * inv_cap)
                total += tl.where(cols < VOCAB, tl.exp(l - cap), 0.0)
            lse = cap + tl.log(tl.sum(total, axis=0))
        else:
            run_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, VOCAB, BLOCK):
                cols = start + lanes
                x = tl.load(z_row + cols, mask=cols < VOCAB, other=float("-inf"))
                if HAS_CAP:
                    l = tl.where(cols < VOCAB, cap * _tanh(x * inv_cap), float("-inf"))
                else:
                    l = x
                new_max = tl.maximum(run_max, l)
                # lanes that have seen nothing yet keep max -inf: rescale by 0 rather than exp(nan)
                safe = tl.where(new_max == float("-inf"), 0.0, new_max)
                total = total * tl.exp(run_max - safe) + tl.exp(l - safe)
                run_max = new_max
            row_max = tl.max(run_max, axis=0)
            total = total * tl.exp(run_max - row_max)
            lse = row_max + tl.log(tl.sum(total, axis=0))

        x_target = tl.load(z_row + tl.maximum(target, 0))
        if HAS_CAP:
            l_target = cap * _tanh(x_target * inv_cap)
        else:
            l_target = x_target
        # a scored label outside the vocabulary: NaN, which the trainer's non-finite guard reports and skips
        tl.store(loss_ptr + row, tl.where(scored, tl.where(in_range, lse - l_target, float("nan")), 0.0))

        # Pass 2: (softmax - onehot) · (1 - t²), zero where the row is not scored.
        if WRITE_GRAD:
            weight = tl.where(scored, 1.0, 0.0)
            g_row = grad_ptr + row * VOCAB
            for start in range(0, VOCAB, BLOCK):
                cols = start + lanes
                # -inf past the row's end: those lanes' (unstored) values stay finite-or-zero, no overflow
                x = tl.load(z_row + cols, mask=cols < VOCAB, other=float("-inf"))
                if HAS_CAP:
                    t = _tanh(x * inv_cap)
                    g = tl.exp(cap * t - lse)
                    g = tl.where(cols == target, g - 1.0, g) * (1.0 - t * t)
                else:
                    g = tl.exp(x - lse)
                    g = tl.where(cols == target, g - 1.0, g)
                tl.store(g_row + cols, (g * weight).to(grad_ptr.dtype.element_ty), mask=cols < VOCAB)


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the process was started with TRITON_INTERPRET=1)."""
    return triton is not None and type(softcap_cross_entropy_kernel).__name__ == "InterpretedFunction"


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device`: CUDA with triton, or any device in the interpreter."""
    return triton is not None and (device.type == "cuda" or interpreted())


def softcap_cross_entropy(logits: Tensor, labels: Tensor, softcap: float | None, grad: Tensor | None = None, *,
                          block: int | None = None) -> Tensor:
    """Loss per row [n] (float32) of contiguous float32 `logits` [n, V]; writes the gradient into `grad` [n, V]
    (contiguous, any float dtype) when given. `logits` is only read."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"softcap_cross_entropy takes contiguous float32 [n, V] logits, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    n, vocab = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} must be ({n},)")
    labels = labels.contiguous()
    if grad is not None and (grad.shape != logits.shape or not grad.is_contiguous()):
        raise ValueError(f"grad must be a contiguous {tuple(logits.shape)} tensor")
    cap = abs(float(softcap)) if softcap else 1.0  # without a cap the kernel never reads it
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    if block is None:
        block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    # Triton launches on the current CUDA device: make it the tensors' one
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        softcap_cross_entropy_kernel[(n,)](
            logits, labels, loss, logits if grad is None else grad, cap, VOCAB=vocab,
            HAS_CAP=bool(softcap), SHIFT_BY_CAP=bool(softcap) and cap <= SHIFT_BY_CAP_MAX,
            WRITE_GRAD=grad is not None, BLOCK=block, num_warps=NUM_WARPS)
    return loss

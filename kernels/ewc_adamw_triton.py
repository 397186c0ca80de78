"""The Triton backend of kernels/ewc_adamw.py: the two kernels and their launcher.

`step(group, grads, scalars)` and `grad_sq_norms(group, grads, ewc_lambda)` run one TensorGroup: one launch over
every full block of its tensors and one over the tensors' last partial blocks, from a table of data pointers
(int64) and a block -> (tensor, offset) map, both cached on the group while the pointers stay (FSDP2 keeps local
shards at stable addresses); the gradients' pointers go in a separate small table, uploaded again only when they
changed since the last launch (FSDP2 makes new gradients every step, at new addresses or at the same ones). Every
table goes up through pinned memory with a non-blocking copy (`kernels.ewc_adamw.upload`): a launch never makes the
host wait for the device. Unmasked full blocks keep 128-bit vector accesses: the tensor sizes are not known to the
compiler, so one masked path for everything would fall back to scalar accesses. The penalty, the norm and the
plain drift sum(d^2) are reduced per program into a small buffer, summed afterwards (deterministic, no atomics, no
host synchronisation); a program covers one block of one tensor, so the per-tensor drift is a segment sum of the
same buffer (`_per_tensor`), on the device.
Step count, lr, betas, eps, weight decay and lambda are runtime arguments: a new step never recompiles. The EWC
mode is a constexpr (DECOUPLED): the same single pass, the pull towards the anchor applied to p in registers
before its store, from the F and anchor values already loaded for the penalty.

CUDA tensors, or CPU tensors in Triton's interpreter when the process was started with TRITON_INTERPRET=1 (tests):
the same kernel source and pointer tables, but nothing is compiled and the `tl.multiple_of` alignment hints are
no-ops; the GPU build (128-bit accesses) is checked by compiling for sm_90 without a GPU (tests/test_ewc_adamw.py).
triton is imported by this module only, and this module only when the "triton" backend is asked for (or "auto"
on CUDA), so the CPU paths and `import kernels.ewc_adamw` never pay for it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kernels.ewc_adamw import upload

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows CPU installs: the "cpp" and "torch" backends remain
    triton = None
    tl = None

if TYPE_CHECKING:
    from kernels.ewc_adamw import StepScalars, TensorGroup

# Fused multiply-adds are off in both compiled kernels. AdamW divides each gradient element by its own running
# magnitude, so where g * s and the EWC term e nearly cancel, g' = g * s + e is ill-conditioned: an FMA (one rounding
# instead of two) changes g' by an ulp of e, and the step of that element by up to lr once |g'| approaches eps.
# Rounded like the reference, g' is bit-identical and the kernels stay within the 1e-6 tolerance for any input.
FP_FUSION = False


# ------------------------------------------------------------------------------------------------------ kernels

if triton is not None:

    @triton.jit
    def ewc_adamw_kernel(
        ptrs,  # int64 [5, T]: data pointers of p, m, v, F, anchor of each tensor
        grad_ptrs,  # int64 [T]: data pointers of the gradients (new tensors every step, so a separate table)
        num_tensors,  # T, the row stride of ptrs
        blocks,  # int64 [2, B]: tensor index and first element of each program's block
        num_blocks,  # B, the row stride of blocks
        sizes,  # int64 [T]: elements per tensor (read by the masked launch only)
        partials,  # float32 [B, 3]: per-program sum(F d^2), sum(e^2), sum(d^2)
        grad_scale,  # float32 [1]: the clip scale (HAS_SCALE)
        ewc_lambda, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps, decay, neg_step_size,
        pull_rate,  # lr * lambda (DECOUPLED)
        HAS_EWC: tl.constexpr, F_BF16: tl.constexpr, A_BF16: tl.constexpr, HAS_SCALE: tl.constexpr,
        CLIP_TOTAL: tl.constexpr, DECOUPLED: tl.constexpr, LERP_SMALL: tl.constexpr, MASKED: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
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
            dsq = d * d
            if MASKED:  # masked-off lanes hold undefined values
                pen = tl.where(mask, pen, 0.0)
                sq = tl.where(mask, sq, 0.0)
                dsq = tl.where(mask, dsq, 0.0)
            tl.store(partials + 3 * pid, tl.sum(pen, axis=0))
            tl.store(partials + 3 * pid + 1, tl.sum(sq, axis=0))
            tl.store(partials + 3 * pid + 2, tl.sum(dsq, axis=0))
            if DECOUPLED:  # Adam sees g * s only; F and anchor stay in registers for the pull below
                if HAS_SCALE:
                    g = g * s
            elif HAS_SCALE:
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
        if HAS_EWC:
            if DECOUPLED:
                # the proximal pull lerp(p, anchor, c / (1 + c)) in torch's lerp form (see ewc_adamw_ref): between
                # p and the anchor for any c >= 0; c capped at float32's largest finite value (no inf / inf)
                c = tl.minimum(f * pull_rate, 3.4028234663852886e38)
                w = tl.div_rn(c, c + 1.0)
                toward = a - p
                p = tl.where(w < 0.5, p + w * toward, a - toward * (1.0 - w))
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, p, mask=mask)

    @triton.jit
    def ewc_grad_norms_kernel(
        ptrs, grad_ptrs, num_tensors, blocks, num_blocks, sizes,  # as in ewc_adamw_kernel
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


# ----------------------------------------------------------------------------------------------------- launcher


@dataclass
class LaunchTables:
    """Launch tables of one TensorGroup (on the device), valid while its tensors keep their data pointers."""

    ptrs: Tensor  # int64 [5, T]: p, m, v, F, anchor (placeholders: p's pointers where a stream is absent)
    sizes: Tensor  # int64 [T]
    full_blocks: Tensor  # int64 [2, Bf]
    tail_blocks: Tensor  # int64 [2, Bt]
    aligned: bool  # every static pointer 16-byte aligned
    full_ends: Tensor  # int64 [T]: one past each tensor's last full block (full blocks are in tensor order)
    # the gradients' pointers of the last launch (host list, device table, all 16-byte aligned): reused while the
    # gradients stay at the same addresses. The device table is never written after its upload, so a launch still
    # queued with it reads the same values.
    grad_rows: list[int] | None = None
    grad_ptrs: Tensor | None = None
    grad_aligned: bool = False

    @property
    def num_blocks(self) -> int:
        return self.full_blocks.shape[1] + self.tail_blocks.shape[1]


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


def _int64_on(rows, device: torch.device) -> Tensor:
    return upload(torch.tensor(rows, dtype=torch.int64), device)


def _grad_table(tables: LaunchTables, grads: list[Tensor], device: torch.device) -> tuple[Tensor, bool]:
    """The gradients' pointer table on the device and whether all are 16-byte aligned; uploaded (without a host
    sync) only when a gradient moved since the last launch with these tables."""
    rows = [grad.data_ptr() for grad in grads]
    if rows != tables.grad_rows:
        tables.grad_ptrs = _int64_on(rows, device)
        tables.grad_rows = rows
        tables.grad_aligned = all(x % 16 == 0 for x in rows)
    return tables.grad_ptrs, tables.grad_aligned


def launch_tables(group: TensorGroup) -> LaunchTables:
    """The group's launch tables, cached on it and rebuilt when a parameter moved."""
    rows = group.pointers()  # resets group.triton_tables when a pointer changed
    if group.triton_tables is None:
        device = group.device
        full, tail = _block_maps(group.sizes, group.block)
        group.triton_tables = LaunchTables(
            ptrs=_int64_on(rows, device), sizes=_int64_on(group.sizes, device), full_blocks=_int64_on(full, device),
            tail_blocks=_int64_on(tail, device), aligned=all(x % 16 == 0 for r in rows for x in r),
            full_ends=_int64_on(list(itertools.accumulate(n // group.block for n in group.sizes)), device))
    return group.triton_tables


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the process was started with TRITON_INTERPRET=1)."""
    return triton is not None and type(ewc_adamw_kernel).__name__ == "InterpretedFunction"


def check_device(device: torch.device) -> None:
    """Raise where this backend cannot run: no triton, or not CUDA (and not the interpreter)."""
    if triton is None:
        raise ValueError("ewc_adamw: the 'triton' backend needs the triton package (pip install triton)")
    if device.type != "cuda" and not interpreted():
        raise ValueError(f"ewc_adamw: the 'triton' backend runs on CUDA tensors, these are on {device}; start the "
                         f"process with TRITON_INTERPRET=1 to run it in Triton's CPU interpreter (tests only)")


def _check_float32(group: TensorGroup) -> None:
    if group.dtype != torch.float32:
        raise ValueError("ewc_adamw: the 'triton' backend takes float32 parameters (use 'torch' for float64)")


def _ewc_constexprs(group: TensorGroup) -> dict:
    return dict(HAS_EWC=group.has_ewc, F_BF16=group.has_ewc and group.fishers[0].dtype == torch.bfloat16,
                A_BF16=group.has_ewc and group.anchors[0].dtype == torch.bfloat16)


def _launch_both(kernel, tables: LaunchTables, block: int, grads: list[Tensor], partials: Tensor, args: tuple,
                 **constexprs) -> None:
    """One launch over all full blocks (unmasked), one over the tensors' partial last blocks (masked)."""
    grad_ptrs, grads_aligned = _grad_table(tables, grads, partials.device)
    aligned = tables.aligned and grads_aligned
    nfull = tables.full_blocks.shape[1]
    ntail = tables.tail_blocks.shape[1]
    T = tables.ptrs.shape[1]
    options = dict(num_warps=8 if block >= 2048 else 4, enable_fp_fusion=FP_FUSION)
    if nfull:
        kernel[(nfull,)](tables.ptrs, grad_ptrs, T, tables.full_blocks, nfull, tables.sizes, partials, *args,
                         MASKED=False, ALIGNED=aligned, BLOCK=block, **options, **constexprs)
    if ntail:
        tail_partials = partials[nfull:] if partials.shape[0] > 1 else partials  # [1, k]: unused placeholder
        kernel[(ntail,)](tables.ptrs, grad_ptrs, T, tables.tail_blocks, ntail, tables.sizes, tail_partials, *args,
                         MASKED=True, ALIGNED=aligned, BLOCK=block, **options, **constexprs)


def _per_tensor(tables: LaunchTables, partials: Tensor) -> Tensor:
    """float64 [T, k]: the per-program partials [B, k] summed per tensor, on the device without a host sync.

    Full blocks come in tensor order, so a tensor's full blocks are a contiguous run: differences of a cumulative
    sum at the runs' ends (no atomics, the same result on every run). Each tensor has at most one partial block.
    """
    nfull = tables.full_blocks.shape[1]
    wide = partials.to(torch.float64)
    cum = torch.cat([wide.new_zeros((1, wide.shape[1])), wide[:nfull].cumsum(dim=0)])
    ends = cum[tables.full_ends]
    out = torch.cat([ends[:1], ends[1:] - ends[:-1]])
    return out.index_add_(0, tables.tail_blocks[0], wide[nfull:])


def step(group: TensorGroup, grads: list[Tensor],
         scalars: StepScalars) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused step on one group; returns 0-dim float64 (penalty, sum e^2) on the device, and with
    scalars.drift float64 [T, 2] (sum F d^2, sum d^2) per tensor (None otherwise or without EWC)."""
    _check_float32(group)
    device = group.device
    tables = launch_tables(group)
    partials = torch.empty((tables.num_blocks if group.has_ewc else 1, 3), dtype=torch.float32, device=device)
    grad_scale = scalars.scale_tensor(device, torch.float32)
    lerp_weight = 1 - scalars.beta1
    args = (grad_scale if grad_scale is not None else partials, scalars.ewc_lambda, lerp_weight, scalars.beta2,
            1 - scalars.beta2, math.sqrt(scalars.bias_correction2), scalars.eps,
            1 - scalars.lr * scalars.weight_decay, -(scalars.lr / scalars.bias_correction1), scalars.pull_rate)
    _launch_both(ewc_adamw_kernel, tables, group.block, grads, partials, args, **_ewc_constexprs(group),
                 HAS_SCALE=grad_scale is not None, CLIP_TOTAL=scalars.clip_total,
                 DECOUPLED=group.has_ewc and scalars.decoupled, LERP_SMALL=abs(lerp_weight) < 0.5)
    if not group.has_ewc:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return zero, zero, None
    sums = partials[:, :2].sum(dim=0, dtype=torch.float64)
    drift = _per_tensor(tables, partials)[:, [0, 2]] if scalars.drift else None
    return (scalars.ewc_lambda / 2) * sums[0], sums[1], drift


def grad_sq_norms(group: TensorGroup, grads: list[Tensor], ewc_lambda: float) -> tuple[Tensor, Tensor]:
    """(sum g^2, sum (g + e)^2) of one group, 0-dim float64 on the device."""
    _check_float32(group)
    tables = launch_tables(group)
    partials = torch.zeros((tables.num_blocks, 2), dtype=torch.float32, device=group.device)
    _launch_both(ewc_grad_norms_kernel, tables, group.block, grads, partials, (ewc_lambda,), **_ewc_constexprs(group))
    sums = partials.sum(dim=0, dtype=torch.float64)
    return sums[0], (sums[1] if group.has_ewc else sums[0])

"""The torch backend of kernels/ewc_adamw.py: torch._foreach_* ops, any device and float64.

Several passes over memory (each foreach op reads and writes its operands; decoupled mode adds a few for the pull
towards the anchor): the fallback where neither the Triton kernel nor the C++ extension runs, and the float64 path
on CUDA. The same math as `ewc_adamw_ref` and torch.optim.AdamW's foreach path, one TensorGroup per call.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kernels.ewc_adamw import StepScalars, TensorGroup


def _upcast(ts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in ts]


def _dots(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """float64 [len(xs)]: x . y per tensor."""
    return torch.stack([torch.dot(x.view(-1), y.view(-1)).to(torch.float64) for x, y in zip(xs, ys)])


def _dot_sum(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    return _dots(xs, ys).sum()


def step(group: TensorGroup, grads: list[Tensor], scalars: StepScalars) -> tuple[Tensor, Tensor, Tensor | None]:
    """The step on one group; returns 0-dim float64 (penalty, sum e^2) on the device, and with scalars.drift
    float64 [T, 2] (sum F d^2, sum d^2) per tensor (None otherwise or without EWC)."""
    device = group.device
    grad_scale = scalars.scale_tensor(device, group.dtype)
    penalty = torch.zeros((), dtype=torch.float64, device=device)
    ewc_sq = torch.zeros((), dtype=torch.float64, device=device)
    drift = None
    if group.has_ewc:
        d = torch._foreach_sub(group.params, _upcast(group.anchors, group.dtype))
        fd = torch._foreach_mul(d, _upcast(group.fishers, group.dtype))
        fisher_drift = _dots(fd, d)
        penalty = (scalars.ewc_lambda / 2) * fisher_drift.sum()
        if scalars.drift:
            drift = torch.stack([fisher_drift, _dots(d, d)], dim=1)
        del d
        e = torch._foreach_mul(fd, scalars.ewc_lambda)
        del fd
        ewc_sq = _dot_sum(e, e)
        if scalars.decoupled:  # Adam sees g * s only; e acts after the update (below)
            grads = torch._foreach_mul(grads, grad_scale) if grad_scale is not None else grads
        elif scalars.clip_total:
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
    if scalars.weight_decay != 0:
        torch._foreach_mul_(group.params, 1 - scalars.lr * scalars.weight_decay)
    torch._foreach_lerp_(group.exp_avgs, grads, 1 - scalars.beta1)
    torch._foreach_mul_(group.exp_avg_sqs, scalars.beta2)
    torch._foreach_addcmul_(group.exp_avg_sqs, grads, grads, 1 - scalars.beta2)
    del grads
    denom = torch._foreach_sqrt(group.exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(scalars.bias_correction2))
    torch._foreach_add_(denom, scalars.eps)
    torch._foreach_addcdiv_(group.params, group.exp_avgs, denom, -(scalars.lr / scalars.bias_correction1))
    del denom
    if group.has_ewc and scalars.decoupled:
        # p = lerp(p, anchor, w), w = c / (1 + c), c = lr * lambda * F capped (see ewc_adamw_ref)
        c = torch._foreach_mul(_upcast(group.fishers, group.dtype), scalars.pull_rate)
        torch._foreach_clamp_max_(c, torch.finfo(group.dtype).max)
        w = torch._foreach_div(c, torch._foreach_add(c, 1.0))
        del c
        torch._foreach_lerp_(group.params, _upcast(group.anchors, group.dtype), w)
    return penalty, ewc_sq, drift


def grad_sq_norms(group: TensorGroup, grads: list[Tensor], ewc_lambda: float) -> tuple[Tensor, Tensor]:
    """(sum g^2, sum (g + e)^2) of one group, 0-dim float64 on the device."""
    grad_sq = _dot_sum(grads, grads)
    if not group.has_ewc:
        return grad_sq, grad_sq
    total = torch._foreach_sub(group.params, _upcast(group.anchors, group.dtype))
    torch._foreach_mul_(total, _upcast(group.fishers, group.dtype))
    torch._foreach_mul_(total, ewc_lambda)
    torch._foreach_add_(total, grads)
    return grad_sq, _dot_sum(total, total)

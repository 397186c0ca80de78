"""LM head + final logit soft-cap + cross entropy, in row chunks, without materialising the logits.

    loss_sum = sum over scored rows i of  logsumexp(z_i) - z_i[y_i],   z = cap · tanh((h @ W^T) / cap)

Gemma2's vocabulary has 256k entries: for one 4096-token row the float32 logits alone are 4 GiB, and autograd would
keep them (and the soft-cap's tanh) for backward. Here the rows are processed in chunks; for each chunk the
gradient with respect to the logits is formed right away,

    dL/dz = softmax(z) - onehot(y)            (zero on rows with label -100)
    dL/d(hW^T) = dL/dz · (1 - tanh²)          (the soft-cap's derivative)

and turned into dL/dh (chunk rows) and dL/dW (accumulated in float32) before the next chunk. Peak extra memory is
two float32 [chunk, V] buffers plus a float32 copy of dL/dW; nothing of size [N, V] survives the forward pass. The
backward pass only scales the stored gradients by the incoming gradient of the (scalar) loss.

Memory traffic per chunk of n rows: read n·H + V·H (compute dtype), write and re-read 2·n·V float32, write n·H and
accumulate V·H float32. The matrix products run in the compute dtype (bfloat16 on GPU) with float32 accumulation;
the soft-cap, log-sum-exp and gradient are float32.

Returns the SUM of token losses over rows whose label is not -100 (a float32 scalar; float64 for float64 inputs): the caller divides by the
number of scored tokens of the global batch, which a per-micro-batch mean cannot know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The label of a position that is not scored (torch's cross_entropy default): the one definition, which the
# packer, the trainer, the Fisher and the benchmarks import from here.
IGNORE_INDEX = -100


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             softcap: float | None) -> torch.Tensor:
    """The definition: materialised float32 logits, soft-cap, summed cross entropy."""
    logits = F.linear(hidden, weight).to(torch.promote_types(hidden.dtype, torch.float32))
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def default_chunk_rows(vocab_size: int, *, budget_bytes: int = 1 << 29) -> int:
    """Rows per chunk so that one float32 [rows, V] buffer takes about `budget_bytes` (512 MiB)."""
    return max(1, budget_bytes // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk_rows):
        n_rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, n_rows, chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = labels[start:start + chunk_rows]
            z = (h @ weight.t()).to(acc)  # [n, V]
            if softcap:
                z.div_(softcap).tanh_()
                tanh = z.clone() if (need_h or need_w) else None
                z.mul_(softcap)
            lse = torch.logsumexp(z, dim=-1)
            scored = y != IGNORE_INDEX
            target = y.clamp(min=0)
            target_logit = z.gather(1, target[:, None]).squeeze(1)
            loss += torch.where(scored, lse - target_logit, 0.0).sum()
            if not (need_h or need_w):
                continue
            grad = z.sub_(lse[:, None]).exp_()  # softmax, in place of z
            grad.scatter_add_(1, target[:, None], -scored[:, None].to(grad.dtype))
            grad.mul_(scored[:, None])
            if softcap:
                grad.mul_(1.0 - tanh * tanh)
                del tanh
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_hidden[start:start + chunk_rows] = grad @ weight
            if need_w:
                grad_weight.add_((grad.t() @ h).to(acc))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross entropy of softcap(hidden @ weight^T) against `labels` (-100 = not scored).

    hidden [..., H] and labels [...] of the same leading shape; weight [V, H]. Float32 scalar.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                     softcap, rows)

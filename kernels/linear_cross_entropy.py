"""LM head + final logit soft-cap + cross entropy, in row chunks, without materialising the logits.

    loss_sum = sum over scored rows i of  logsumexp(z_i) - z_i[y_i],   z = cap · tanh((h @ W^T) / cap)

Gemma2's vocabulary has 256k entries: for one 4096-token row the float32 logits alone are 4 GiB, and autograd would
keep them (and the soft-cap's tanh) for backward. Here the rows are processed in chunks; for each chunk the
gradient with respect to the logits is formed right away,

    dL/dz = softmax(z) - onehot(y)            (zero on rows with label -100)
    dL/d(hW^T) = dL/dz · (1 - t²)             (the soft-cap's derivative, t = tanh((h @ W^T) / cap))

and turned into dL/dh (chunk rows) and dL/dW (accumulated in float32) before the next chunk; nothing of size
[N, V] survives the forward pass. The backward pass only scales the stored gradients by the incoming gradient of
the (scalar) loss. Returns the SUM of token losses over rows whose label is not -100 (a float32 scalar; float64
for float64 inputs): the caller divides by the number of scored tokens of the global batch, which a
per-micro-batch mean cannot know.

One chunk of n rows, in place wherever possible (A = the float32 accumulation dtype, C = the compute dtype):

    z = h @ W^T                       [n, V] in A, straight from the GEMM where it can write A (see GEMMs)
    z = tanh(z / cap)                 z now holds t (with a soft-cap)
    e = exp(cap·t - shift)            [n, V] in A; shift = cap when cap <= 40 (then e >= e^-80, no under-
                                      flow, no row max needed), else the row max; without a cap e = exp(z - max)
                                      is formed in place of z
    s = Σ_v e,  lse = shift + log s   loss += Σ_scored (lse - z_y)
    e[y] -= s (scored rows); e *= r   r = 1/s on scored rows, 0 on the others (so no separate mask pass)
    g = e - e·t²                      written straight into the compute dtype (one rounding); without a cap the
                                      scaling by r writes g
    dL/dh[chunk] = g @ W              written into the output rows (no temporary)
    dL/dW += g^T @ h                  accumulated in A in place (see GEMMs)

which differs from the definition only by float rounding (exp(x - shift)/s vs exp(x - lse); the target entry's
e - s before the scaling). The soft-cap's derivative needs t after the softmax has overwritten the logits, which
is why e is a second buffer rather than a clone of t: t stays in z, and 1 - t² is never materialised.

On CUDA the steps between the two GEMMs (the soft-cap, the loss and the gradient of the logits) run instead as one
Triton kernel in two passes over z (kernels/softcap_cross_entropy_triton.py: 14 B per element of the chunk where
the composition above moves 66 B, and no second [n, V] float32 buffer), each compiled variant once it has passed
its check against the reference on the device (`fused_chunk_kernel`); the composition remains for CPU, float64,
and any variant that fails its check.

GEMMs. The compute dtype C is autocast's where autocast is on (the casts are then done once per call, and autocast
is off inside), else the inputs'. C = bf16/fp16 with a float32 accumulator A: on CUDA
`torch.mm(h, W^T, out_dtype=float32)` writes the logits in float32 (no bf16 logits, no cast pass), and
`torch.addmm(dW, g^T, h, out_dtype=float32, out=dW)` has cuBLAS accumulate the bf16 x bf16 products in float32
straight into dW (beta = 1, no [V, H] temporary). Torch builds whose addmm out_dtype check still wants `self` in
the operands' dtype reject that; `torch.baddbmm(dW[None], g^T[None], h[None], out_dtype=float32, out=dW[None])`
is the same cuBLAS call without the check. Which of these works is probed once per (device, dtype) on a tiny case
that only a float32 output with float32 accumulation gets exactly right (`gemm_plan`, `probe_gemm_plan`). Where
none works (CPU: the out_dtype overloads are CUDA-only) the logits are a C GEMM cast to A, the gradient stays in
A (cast to C for dL/dh only) and dW += g^T @ h(cast to A) is an in-place float32 `addmm_`: a true float32
accumulation, at float32 GEMM speed, of a gradient that was never rounded to C. Float32 and float64 inputs use
in-place `addmm_` directly.

Chunk rows. CPU: one A [rows, V] buffer of 512 MiB (`default_chunk_rows`, as before). CUDA: from the memory free
at the moment (after dW and dL/dh are allocated): driver-free bytes plus the caching allocator's reserved-but-
unused bytes, half of that, capped at 8 GiB, divided by the bytes one row of the chunk needs
(`chunk_bytes_per_row`: 10·V + 4·H for bf16 with a soft-cap), clamped to [1, 8192] rows, rounded down to a
multiple of 128 and evened out over the chunks the rows need (`chunk_rows_for_memory`). Bigger chunks cut the
per-chunk dW and W traffic; at a few thousand rows it is already under a tenth of the per-row traffic, hence the
caps.

Bytes moved, worked out from the code for bfloat16 inputs with the soft-cap on CUDA, gemma2-2b (V = 256000,
H = 2304). Elementwise passes count DRAM reads + writes, one read per distinct tensor; GEMM operand reads are
listed apart (unchanged: W read twice per chunk, 4 B x V·H = 2.4 GB; the bf16 gradient read twice per row).

                             before                                  after
    per row, [n, V] passes   122 B x V = 31.2 MB                     66 B x V = 16.9 MB
    per chunk, dW            20 B x V·H = 11.8 GB (product written   8 B x V·H = 4.7 GB (cuBLAS reads and writes
                             in bf16 2, read 2 + float32 copy 4,     the float32 dW in place: 4 + 4)
                             add reads 4 + 4, writes 4)
    [V, H] temporaries       bf16 product + float32 copy: 3.5 GB     none
    peak [n, V] buffers      16 B x V per row (z, tanh clone, t²,    10 B x V per row (z, e, bf16 g)
                             1 - t², all float32)
    default chunk rows       524 (512 MiB / 4V)                      3328 with >= 16 GiB free (8 GiB cap)
    per chunk at the default 16.4 + 11.8 = 28.2 GB for 524 rows      56.2 + 4.7 = 60.9 GB for 3328 rows
    per row at the default   53.7 MB (58.2 MB with the W reads)      18.3 MB (19.0 MB with the W reads)

[n, V] passes, bytes per element. Before: bf16 logits write 2, cast 2+4, /cap 4+4, tanh 4+4, clone 4+4, ·cap 4+4,
logsumexp 16+8 (max 4, x - max into a temporary 4+4, exp 4+4, sum 4), -lse 4+4, exp 4+4, ·mask 4+4, t·t 4+4,
1 - t² 4+4, ·(1 - t²) 8+4, cast to bf16 4+2. After: float32 logits write 4, /cap 4+4, tanh 4+4, cap·t - cap 4+4,
exp 4+4, sum 4, ·r 4+4, t² 4+4, e - e·t² into bf16 8+2. Without a soft-cap: 62 B x V before, 34 B x V after
(logits 4, max 4, -max 4+4, exp 4+4, sum 4, ·r into bf16 4+2).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The label of a position that is not scored (torch's cross_entropy default): the one definition, which the
# packer, the trainer, the Fisher and the benchmarks import from here.
IGNORE_INDEX = -100

# exp(cap·t - cap) >= exp(-2·cap): no float32 underflow (below ~1e-38) for |cap| up to ~43; the shift by cap then
# replaces the row max (one pass less).
SHIFT_BY_CAP_MAX = 40.0

# Chunk rows from free memory (CUDA): the share of the free bytes the chunk may take, and the caps.
FREE_MEMORY_FRACTION = 0.5
MAX_CHUNK_BYTES = 8 << 30
MAX_CHUNK_ROWS = 8192
ROW_MULTIPLE = 128


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


def chunk_bytes_per_row(vocab_size: int, hidden_size: int, *, compute_dtype: torch.dtype,
                        softcap: bool, fused_grad_dtype: torch.dtype | None = None) -> int:
    """Peak bytes that one row of a chunk needs in `_LinearCrossEntropy.forward`, counted from the code.

    [n, V]: z (accumulation dtype A), e (A, soft-cap only; without it e is z), the gradient in the compute dtype C
    when C is not A (else it is written into e), or the C logits before their cast to A (GEMMs without an A
    output), whichever phase is larger. With the Triton chunk kernel writing its gradient in `fused_grad_dtype`
    G: z and the gradient, no e, then (G not C) the gradient and its C copy for dL/dh. [n, H]: h cast to A (the
    float32-operand dW path). Exact for the CUDA out_dtype path; an upper bound for the float32-operand path,
    whose gradient is written into e.
    """
    acc = torch.promote_types(compute_dtype, torch.float32).itemsize
    c = compute_dtype.itemsize
    grad = c if c != acc else 0
    logits_phase = acc + (c if c != acc else 0)  # C logits + their A copy (no A-output GEMM)
    if fused_grad_dtype is not None:
        g = fused_grad_dtype.itemsize
        grad_phase = max(acc + g, g + (c if fused_grad_dtype != compute_dtype else 0))
    else:
        grad_phase = (2 * acc if softcap else acc) + grad
    return vocab_size * max(logits_phase, grad_phase) + acc * hidden_size


def chunk_rows_for_memory(free_bytes: int, vocab_size: int, hidden_size: int, *, compute_dtype: torch.dtype,
                          softcap: bool, fused_grad_dtype: torch.dtype | None = None, n_rows: int | None = None,
                          fraction: float = FREE_MEMORY_FRACTION,
                          max_chunk_bytes: int = MAX_CHUNK_BYTES, max_rows: int = MAX_CHUNK_ROWS,
                          multiple: int = ROW_MULTIPLE) -> int:
    """Rows per chunk for `free_bytes` of free device memory (a pure function: the CUDA default, testable anywhere).

        rows = clamp(min(fraction · free, max_chunk_bytes) // chunk_bytes_per_row, 1, max_rows)

    rounded down to a multiple of `multiple` when at least that large; with `n_rows`, evened out: as many chunks
    as `rows` needs, each ceil(n_rows / chunks) rows (rounded up to the multiple, never above `rows`), so that the
    last chunk is not a sliver that costs a full dW pass on its own.
    """
    per_row = chunk_bytes_per_row(vocab_size, hidden_size, compute_dtype=compute_dtype, softcap=softcap,
                                  fused_grad_dtype=fused_grad_dtype)
    budget = min(int(max(free_bytes, 0) * fraction), max_chunk_bytes)
    rows = max(1, min(max_rows, budget // per_row))
    if rows >= multiple:
        rows -= rows % multiple
    if n_rows:
        chunks = -(-n_rows // rows)
        even = -(-n_rows // chunks)
        if rows >= multiple:
            even = -(-even // multiple) * multiple
        rows = min(rows, even)
    return rows


def _auto_chunk_rows(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, *,
                     fused_grad_dtype: torch.dtype | None = None) -> int:
    """The default rows per chunk: a fixed budget on CPU, from the free memory on CUDA (see the module doc)."""
    if hidden.device.type != "cuda":
        return default_chunk_rows(weight.shape[0])
    free, _ = torch.cuda.mem_get_info(hidden.device)
    cached = torch.cuda.memory_reserved(hidden.device) - torch.cuda.memory_allocated(hidden.device)
    return chunk_rows_for_memory(free + cached, weight.shape[0], weight.shape[1], compute_dtype=hidden.dtype,
                                 softcap=bool(softcap), fused_grad_dtype=fused_grad_dtype, n_rows=hidden.shape[0])


# --- the fused chunk kernel (Triton) -----------------------------------------------------------------------------

_FUSED: dict[tuple, bool] = {}
_COMPOSITION_ONLY = False


@contextlib.contextmanager
def torch_composition():
    """Within: every chunk runs the torch composition, also where the Triton kernel would (`bench loss` compares
    the two)."""
    global _COMPOSITION_ONLY
    saved, _COMPOSITION_ONLY = _COMPOSITION_ONLY, True
    try:
        yield
    finally:
        _COMPOSITION_ONLY = saved


def fused_chunk_kernel(device: torch.device | str, *, vocab_size: int, softcap: float | None,
                       grad_dtype: torch.dtype | None) -> bool:
    """Whether a chunk's softmax and gradient run in the Triton kernel of kernels/softcap_cross_entropy_triton.py
    on `device` (CUDA with triton, or Triton's interpreter in tests) for this vocabulary size, cap and gradient
    dtype (None: the loss only). Each such combination is its own compiled variant of the kernel, so each is
    built and checked once against the reference, on three rows of the real width, before first use. A variant
    that fails to build or disagrees is not used, with a warning that says why: the torch composition stays
    correct, only slower. Elsewhere (CPU) nothing is tried, and triton is not imported."""
    device = torch.device(device)
    if _COMPOSITION_ONLY or (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), vocab_size, abs(softcap) if softcap else None, grad_dtype)
    if key not in _FUSED:
        _FUSED[key] = _probe_fused(device, *key[1:])
    return _FUSED[key]


def fused_softcap_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                                grad: torch.Tensor | None) -> torch.Tensor:
    """The Triton chunk kernel (imported here, on first use: CPU paths never import triton)."""
    from kernels.softcap_cross_entropy_triton import softcap_cross_entropy

    return softcap_cross_entropy(logits, labels, softcap, grad)


def _probe_fused(device: torch.device, vocab_size: int, softcap: float | None,
                 grad_dtype: torch.dtype | None) -> bool:
    try:
        from kernels import softcap_cross_entropy_triton as fused

        if not fused.runs_on(device):
            return False
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(3, vocab_size, generator=g) * 40).to(device)
        labels = torch.tensor([0, IGNORE_INDEX, vocab_size - 1], device=device)
        grad = None if grad_dtype is None else torch.empty(logits.shape, dtype=grad_dtype, device=device)
        loss = fused_softcap_cross_entropy(logits, labels, softcap, grad)
        want_loss, want_grad = fused.softcap_cross_entropy_ref(logits, labels, softcap, grad_dtype and torch.float64)
        problems = []
        if not torch.allclose(loss.cpu().double(), want_loss.cpu().double(), rtol=1e-4, atol=1e-4):
            problems.append(f"loss {loss.tolist()} where the reference gives {want_loss.tolist()}")
        if grad is not None:  # a kernel that works is within ~1e-4 (float32) or a rounding; a broken one is not
            rtol = max(1e-3, 2 * torch.finfo(grad_dtype).eps)
            if not torch.allclose(grad.cpu().double(), want_grad.cpu(), rtol=rtol, atol=1e-4):
                err = (grad.cpu().double() - want_grad.cpu()).abs().max().item()
                problems.append(f"gradient off by up to {err:.3g}")
        if problems:
            raise RuntimeError("; ".join(problems))
    except Exception as exc:  # noqa: BLE001 -- any failure to build or run means: keep the torch composition
        warnings.warn(f"linear_cross_entropy: the Triton chunk kernel failed its check on {device} (vocabulary "
                      f"{vocab_size}, cap {softcap}, gradient {grad_dtype}): {exc!r}; using the torch "
                      f"composition (correct, about 4x the memory traffic per chunk)")
        return False
    return True


# --- GEMMs with a float32 output from bf16/fp16 operands -------------------------------------------------------

def _accumulate_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def _accumulate_baddbmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    view = acc.unsqueeze(0)
    torch.baddbmm(view, a.unsqueeze(0), b.unsqueeze(0), out_dtype=acc.dtype, out=view)


ACCUMULATE_CANDIDATES = (("addmm-out-dtype", _accumulate_addmm), ("baddbmm-out-dtype", _accumulate_baddbmm))
SAME_DTYPE = "addmm_"                  # A operands, in-place addmm_ (float32 / float64 inputs)
FLOAT32_OPERANDS = "float32-operands"  # no mixed-dtype GEMM: A gradient times h cast to A, in-place addmm_


@dataclass(frozen=True)
class GemmPlan:
    """How a chunk's GEMMs run: `logits_out_dtype` (h @ W^T written in A by the GEMM) and `accumulate` (the dW
    path: SAME_DTYPE, FLOAT32_OPERANDS or the name of a working ACCUMULATE_CANDIDATES entry)."""
    logits_out_dtype: bool
    accumulate: str


_PLANS: dict[tuple[str, torch.dtype], GemmPlan] = {}


def probe_gemm_plan(device: torch.device | str, dtype: torch.dtype,
                    candidates=ACCUMULATE_CANDIDATES) -> GemmPlan:
    """Try the out_dtype GEMMs on `device` with `dtype` operands on a case only a float32 output gets right.

    With u = 1 + 2^-7 (exact in bf16 and fp16), u² = 1 + 2^-6 + 2^-14 needs 15 significant bits: float32 holds it,
    bf16 and fp16 round it. Logits: u · u summed over 4 must come out as 4u² exactly. Accumulation: 1 + Σ over 8
    rows of (u/16)·(u/16) = 1 + 2^-5 · u² (20 bits) into a float32 accumulator, which must change in place, with
    the operands laid out as in the chunk loop (a transposed [rows, V] gradient times contiguous rows): a product
    rounded to 16 bits before the add (the old cast-and-add) fails it. A candidate that raises or gets either wrong
    is not used.
    """
    acc_dtype = torch.promote_types(dtype, torch.float32)
    if acc_dtype == dtype:
        return GemmPlan(False, SAME_DTYPE)
    device = torch.device(device)
    with torch.autocast(device.type, enabled=False):
        return _probe(device, dtype, acc_dtype, candidates)


def _probe(device: torch.device, dtype: torch.dtype, acc_dtype: torch.dtype, candidates) -> GemmPlan:
    logits_ok = False
    try:
        a = torch.full((4, 4), 1 + 2 ** -7, dtype=dtype, device=device)
        out = torch.mm(a, a.t(), out_dtype=acc_dtype)
        logits_ok = out.dtype == acc_dtype and bool((out.double().cpu() == 4 * (1 + 2 ** -7) ** 2).all())
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    accumulate = FLOAT32_OPERANDS
    for name, fn in candidates:
        try:
            acc = torch.ones(4, 4, dtype=acc_dtype, device=device)
            ptr = acc.data_ptr()
            grad = torch.full((8, 4), (1 + 2 ** -7) / 16, dtype=dtype, device=device)
            fn(acc, grad.t(), torch.full((8, 4), (1 + 2 ** -7) / 16, dtype=dtype, device=device))
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        want = 1 + 2 ** -5 * (1 + 2 ** -7) ** 2
        if acc.data_ptr() == ptr and acc.dtype == acc_dtype and bool((acc.double().cpu() == want).all()):
            accumulate = name
            break
    return GemmPlan(logits_ok, accumulate)


def gemm_plan(device: torch.device | str, dtype: torch.dtype) -> GemmPlan:
    """The GEMM plan for `dtype` operands on `device`, probed once per (device, dtype) and cached."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _PLANS:
        _PLANS[key] = probe_gemm_plan(device, dtype)
    return _PLANS[key]


def accumulate_weight_grad(plan: GemmPlan, grad_weight: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (A) += grad^T @ h in place, without a [V, H] temporary: grad [n, V], h [n, H].

    With an out_dtype candidate, grad and h in the compute dtype: cuBLAS accumulates in float32 into grad_weight.
    Otherwise both are brought to A (no-ops for SAME_DTYPE and for the A gradient of FLOAT32_OPERANDS).
    """
    fn = dict(ACCUMULATE_CANDIDATES).get(plan.accumulate)
    if fn is not None:
        fn(grad_weight, grad.t(), h)
    else:
        grad_weight.addmm_(grad.t().to(grad_weight.dtype), h.to(grad_weight.dtype))


def chunk_grad_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a chunk's gradient dL/d(hW^T) for `dtype` GEMMs on `device`: the compute dtype where a
    mixed-dtype GEMM accumulates it into the float32 dW; else the accumulation dtype A (SAME_DTYPE: that is the
    compute dtype; FLOAT32_OPERANDS: dW uses it, dL/dh gets a cast)."""
    plan = gemm_plan(device, dtype)
    if plan.accumulate in (SAME_DTYPE, FLOAT32_OPERANDS):
        return torch.promote_types(dtype, torch.float32)
    return dtype


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: autocast's where it is on (as autocast would cast a matmul: float64 is left alone), else
    the promotion of the two input dtypes."""
    device_type = hidden.device.type
    if (torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype, weight.dtype)
            and hidden.is_floating_point() and weight.is_floating_point()):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_loss_and_grad(z: torch.Tensor, y: torch.Tensor, cap: float | None,
                         grad_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch composition for one chunk (the module doc's steps; `z` is overwritten): the summed loss of its
    scored rows and, unless `grad_dtype` is None, dL/d(hW^T) in `grad_dtype`."""
    scored = (y != IGNORE_INDEX)[:, None]
    target = y.clamp(min=0)[:, None]
    if cap:
        z.div_(cap).tanh_()  # t, kept in z for the derivative
        target_logit = z.gather(1, target).mul_(cap)
        if cap <= SHIFT_BY_CAP_MAX:
            shift = torch.full((1, 1), cap, dtype=z.dtype, device=z.device)
        else:
            shift = z.amax(1, keepdim=True).mul_(cap)
        e = torch.add(shift.neg(), z, alpha=cap).exp_()  # exp(cap·t - shift), a second buffer
    else:
        target_logit = z.gather(1, target)
        shift = z.amax(1, keepdim=True)
        e = z.sub_(shift).exp_()  # in place of the logits: z is not needed again
    s = e.sum(1, keepdim=True)
    lse = shift + s.log()
    loss = torch.where(scored, lse - target_logit, 0.0).sum()
    if grad_dtype is None:
        return loss, None
    # dL/dlogits = (e - s·onehot(y)) · r, r = 1/s on scored rows, 0 elsewhere: (softmax - onehot) · mask.
    e.scatter_add_(1, target, -(s * scored))
    r = scored / s
    if cap:
        e.mul_(r)
        z.square_()  # t²
        grad = e if grad_dtype == e.dtype else torch.empty_like(e, dtype=grad_dtype)
        torch.addcmul(e, e, z, value=-1.0, out=grad)  # e · (1 - t²), in grad_dtype
    elif grad_dtype != e.dtype:
        grad = torch.mul(e, r, out=torch.empty_like(e, dtype=grad_dtype))
    else:
        grad = e.mul_(r)
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk_rows):
        ctx.weight_dtype = weight.dtype
        compute = compute_dtype(hidden, weight)
        # Autocast off inside: the casts are explicit (once per call) and the out= / out_dtype GEMMs need them.
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight, loss = _LinearCrossEntropy._chunks(
                ctx, hidden.to(compute), weight.to(compute), labels, softcap, chunk_rows)
        if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
            grad_hidden = grad_hidden.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def _chunks(ctx, hidden, weight, labels, softcap, chunk_rows):
        n_rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        plan = gemm_plan(hidden.device, hidden.dtype)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_dtype = chunk_grad_dtype(hidden.device, hidden.dtype) if need_grad else None
        fused = acc == torch.float32 and fused_chunk_kernel(hidden.device, vocab_size=weight.shape[0],
                                                            softcap=softcap, grad_dtype=grad_dtype)
        if chunk_rows is None:
            chunk_rows = _auto_chunk_rows(hidden, weight, softcap, fused_grad_dtype=grad_dtype if fused else None)
        cap = abs(softcap) if softcap else None  # cap·tanh(x/cap) is even in cap: sign flips are exact
        for start in range(0, n_rows, chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = labels[start:start + chunk_rows]
            if plan.logits_out_dtype:
                z = torch.mm(h, weight.t(), out_dtype=acc)  # [n, V]
            else:
                z = (h @ weight.t()).to(acc)
            if fused:
                grad = torch.empty_like(z, dtype=grad_dtype) if need_grad else None
                loss += fused_softcap_cross_entropy(z, y, cap, grad).sum()
            else:
                chunk_loss, grad = _chunk_loss_and_grad(z, y, cap, grad_dtype)
                loss += chunk_loss
            del z
            if need_h:
                torch.mm(grad.to(hidden.dtype), weight, out=grad_hidden[start:start + chunk_rows])
            if need_w:
                accumulate_weight_grad(plan, grad_weight, grad, h)
        return grad_hidden, grad_weight, loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = None
        if grad_weight is not None:  # scaled in A and rounded once into the weight's dtype: one pass over [V, H]
            gw = torch.mul(grad_weight, grad_loss, out=torch.empty_like(grad_weight, dtype=ctx.weight_dtype))
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross entropy of softcap(hidden @ weight^T) against `labels` (-100 = not scored).

    hidden [..., H] and labels [...] of the same leading shape; weight [V, H]. Float32 scalar. `chunk_rows`
    default: see `_auto_chunk_rows` (fixed budget on CPU, from free memory on CUDA).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                     softcap, chunk_rows)

"""Chunked LM head + soft-cap + cross entropy against the materialised reference: loss and both gradients; the
GEMM plan (which torch call accumulates dW, and that it is a true float32 accumulation) and the chunk rows."""

import pytest
import torch

from kernels import linear_cross_entropy as lce
from kernels.linear_cross_entropy import (FLOAT32_OPERANDS, SAME_DTYPE, GemmPlan, accumulate_weight_grad,
                                          chunk_bytes_per_row, chunk_rows_for_memory, default_chunk_rows, gemm_plan,
                                          linear_cross_entropy, linear_cross_entropy_ref, probe_gemm_plan)


def _inputs(n, h, v, dtype, seed, ignore_frac=0.25, scale=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, labels.to(device)


def _rel_max(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-12)).item()


# softcap 3.0: the shift by the cap (no row max); 50.0: above SHIFT_BY_CAP_MAX, the row max; -3.0: the same
# function as 3.0. chunk None: the default (one chunk at these sizes on CPU).
@pytest.mark.parametrize("n,h,v,chunk", [(1, 3, 5, 1), (37, 16, 101, 8), (64, 24, 333, 64), (9, 41, 341, 4),
                                         (50, 7, 97, None)])
@pytest.mark.parametrize("softcap", [None, 3.0, 50.0, -3.0])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matches_reference_loss_and_gradients(n, h, v, chunk, softcap, dtype, tol, seed):
    hidden, weight, labels = _inputs(n, h, v, dtype, seed)
    loss = linear_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_rows=chunk)
    gh, gw = torch.autograd.grad(2.5 * loss, (hidden, weight))
    ref = linear_cross_entropy_ref(hidden, weight, labels, softcap)
    rh, rw = torch.autograd.grad(2.5 * ref, (hidden, weight))
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.allclose(loss.double(), ref.double(), rtol=max(tol, 1e-6), atol=1e-5)
    for ours, theirs in ((gh, rh), (gw, rw)):
        assert ours.dtype == dtype
        assert _rel_max(ours, theirs) <= tol


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_saturated_soft_cap_and_large_logits_match_reference(softcap, seed):
    """Logits of hundreds: tanh at ±1 (1 - t² ~ 0, e down to e^-60 with the shift by the cap), a peaked softmax."""
    hidden, weight, labels = _inputs(40, 16, 211, torch.float64, seed, scale=30.0)
    loss = linear_cross_entropy(hidden, weight, labels, softcap=softcap, chunk_rows=7)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    ref = linear_cross_entropy_ref(hidden, weight, labels, softcap)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-8)
    assert _rel_max(gh, rh) <= 1e-9 and _rel_max(gw, rw) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_within_twice_the_error_of_plain_autograd(dtype, seed):
    hidden, weight, labels = _inputs(48, 32, 257, dtype, seed)
    exact_h, exact_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = linear_cross_entropy_ref(exact_h, exact_w, labels, 30.0)
    eh, ew = torch.autograd.grad(exact, (exact_h, exact_w))
    ours = linear_cross_entropy(hidden, weight, labels, softcap=30.0, chunk_rows=16)
    oh, ow = torch.autograd.grad(ours, (hidden, weight))
    plain = linear_cross_entropy_ref(hidden, weight, labels, 30.0)
    ph, pw = torch.autograd.grad(plain, (hidden, weight))
    assert ours.dtype == torch.float32 and oh.dtype == ow.dtype == dtype
    assert abs(ours.double() - exact) <= 2 * abs(plain.double() - exact) + 1e-3 * abs(exact)
    for o, p, e in ((oh, ph, eh), (ow, pw, ew)):
        assert (o.double() - e).abs().max() <= 2 * (p.double() - e).abs().max() + 1e-3 * e.abs().max()


def test_autocast_computes_in_its_dtype_and_returns_the_inputs_dtypes(seed):
    """Under autocast (the Fisher's plain-model bf16 mode) float32 inputs run bf16 GEMMs, like autocast's matmul."""
    hidden, weight, labels = _inputs(30, 16, 67, torch.float32, seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, softcap=30.0, chunk_rows=8)
        low_h = hidden.to(torch.bfloat16)  # bf16 hidden with a float32 weight: the mixed case autocast makes
        mixed = linear_cross_entropy(low_h, weight, labels, softcap=30.0, chunk_rows=8)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    mh, mw = torch.autograd.grad(mixed, (hidden, weight))
    ref = linear_cross_entropy_ref(hidden.bfloat16(), weight.bfloat16(), labels, 30.0)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    assert gh.dtype == gw.dtype == mh.dtype == mw.dtype == torch.float32
    for ours in (loss, mixed):
        assert torch.allclose(ours, ref, rtol=1e-2)
    for ours, theirs in ((gh, rh), (gw, rw), (mh, rh), (mw, rw)):
        assert _rel_max(ours, theirs) <= 3e-2


def test_all_ignored_rows_give_zero_loss_and_zero_gradients():
    hidden, weight, labels = _inputs(6, 4, 7, torch.float32, 0)
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels, softcap=2.0, chunk_rows=4)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_loss_only_and_one_sided_gradients_match(seed):
    hidden, weight, labels = _inputs(21, 8, 31, torch.float64, seed)
    ref = linear_cross_entropy_ref(hidden, weight, labels, 3.0)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, labels, softcap=3.0, chunk_rows=5), ref)
    only_h = linear_cross_entropy(hidden, weight.detach(), labels, softcap=3.0, chunk_rows=5)
    only_w = linear_cross_entropy(hidden.detach(), weight, labels, softcap=3.0, chunk_rows=5)
    assert torch.allclose(torch.autograd.grad(only_h, hidden)[0], rh)
    assert torch.allclose(torch.autograd.grad(only_w, weight)[0], rw)


def test_batched_leading_shape_and_shape_errors():
    hidden, weight, labels = _inputs(12, 8, 11, torch.float64, 1)
    flat = linear_cross_entropy(hidden, weight, labels)
    batched = linear_cross_entropy(hidden.view(3, 4, 8), weight, labels.view(3, 4))
    assert torch.allclose(flat, batched)
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, labels, chunk_rows=0)


# --- the GEMM plan ----------------------------------------------------------------------------------------------

def test_cpu_plan_same_dtype_in_place_and_float32_operands_for_half_precision():
    """CPU has no out_dtype GEMM (CUDA-only overloads): half precision takes the float32-operand fallback."""
    assert gemm_plan("cpu", torch.float32) == GemmPlan(False, SAME_DTYPE)
    assert gemm_plan("cpu", torch.float64) == GemmPlan(False, SAME_DTYPE)
    for dtype in (torch.bfloat16, torch.float16):
        assert gemm_plan("cpu", dtype) == GemmPlan(False, FLOAT32_OPERANDS)
        a = torch.ones(2, 2, dtype=dtype)
        with pytest.raises((NotImplementedError, RuntimeError)):
            torch.mm(a, a, out_dtype=torch.float32)


def test_probe_takes_only_a_true_float32_accumulation_in_place():
    def in_place_float32(acc, a, b):
        acc.addmm_(a.float(), b.float())

    def product_rounded_then_added(acc, a, b):  # the old path: (g^T @ h) in bf16, cast, added
        acc.add_((a @ b).float())

    def out_of_place(acc, a, b):
        return acc + a.float() @ b.float()

    def raises(acc, a, b):
        raise NotImplementedError

    for dtype in (torch.bfloat16, torch.float16):
        for bad in (product_rounded_then_added, out_of_place, raises):
            assert probe_gemm_plan("cpu", dtype, candidates=(("bad", bad),)).accumulate == FLOAT32_OPERANDS
        candidates = (("raises", raises), ("bad", product_rounded_then_added), ("good", in_place_float32),
                      ("later", in_place_float32))
        assert probe_gemm_plan("cpu", dtype, candidates=candidates).accumulate == "good"


def _chunks(k, n, v, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(n, v, generator=g) * torch.rand(n, 1, generator=g)).to(dtype) for _ in range(k)]
    rows = [torch.randn(n, h, generator=g).to(dtype) for _ in range(k)]
    return grads, rows


def test_weight_gradient_accumulates_in_float32_without_per_chunk_rounding(seed):
    """64 chunks of bf16 gradients and rows: the plan's accumulation against the float64 sum of the same products.

    The old path rounded each chunk's product to bf16 (2^-9 relative) before adding it; a float32 accumulation of
    bf16 x bf16 products (exact in float32) is off by float32 rounding only.
    """
    grads, rows = _chunks(64, 16, 40, 24, torch.bfloat16, seed)
    exact = sum(g.double().t() @ r.double() for g, r in zip(grads, rows))
    plan = gemm_plan("cpu", torch.bfloat16)
    new = torch.zeros(40, 24)
    ptr = new.data_ptr()
    old = torch.zeros(40, 24)
    for g, r in zip(grads, rows):
        accumulate_weight_grad(plan, new, g, r)
        old.add_((g.t() @ r).to(torch.float32))
    assert new.data_ptr() == ptr and new.dtype == torch.float32
    err_new, err_old = _rel_max(new, exact), _rel_max(old, exact)
    assert err_old > 1e-4  # the old path visibly loses precision here
    assert err_new <= 1e-6 and err_new * 100 <= err_old


def test_float32_accumulation_is_in_place_addmm():
    grads, rows = _chunks(3, 5, 7, 4, torch.float32, 0)
    acc = torch.zeros(7, 4)
    ptr = acc.data_ptr()
    for g, r in zip(grads, rows):
        accumulate_weight_grad(gemm_plan("cpu", torch.float32), acc, g, r)
    assert acc.data_ptr() == ptr
    assert torch.allclose(acc, sum(g.t() @ r for g, r in zip(grads, rows)), atol=1e-5)


def test_bfloat16_weight_gradient_over_many_chunks_beats_per_chunk_rounding(seed):
    """End to end, 256 chunks of 2 rows, small logits (their bf16 rounding is not the dominant error): the float32
    dW against the float64 definition, and the old path's per-chunk bf16 products of the same (exact) per-row
    gradients rounded to bf16, which is a lower bound on the old path's error. The new error is several times
    smaller (over 100x at these sizes on CPU, where dW also uses the float32 gradient)."""
    hidden, weight, labels = _inputs(512, 64, 300, torch.bfloat16, seed, ignore_frac=0.2, scale=0.02)
    exact_h, exact_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = linear_cross_entropy_ref(exact_h, exact_w, labels, 30.0)
    ew, = torch.autograd.grad(exact, exact_w)
    loss = linear_cross_entropy(hidden, weight, labels, softcap=30.0, chunk_rows=2)
    dw_float32 = loss.grad_fn.saved_tensors[1]  # the float32 accumulator, before backward's cast to bf16
    assert dw_float32.dtype == torch.float32
    with torch.no_grad():  # the exact gradient w.r.t. the logits, per row
        t = torch.tanh(exact_h @ exact_w.t() / 30.0)
        dz = torch.softmax(30.0 * t, dim=1)
        scored = labels != -100
        dz[scored, labels[scored]] -= 1.0
        dz[~scored] = 0.0
        dz = (dz * (1 - t * t)).bfloat16()
        old = torch.zeros_like(dw_float32)
        for start in range(0, 512, 2):
            old.add_((dz[start:start + 2].t() @ hidden.detach()[start:start + 2]).float())
    err_new, err_old = _rel_max(dw_float32, ew), _rel_max(old, ew)
    assert err_new * 5 <= err_old, (err_new, err_old)


# --- chunk rows -----------------------------------------------------------------------------------------------

def test_chunk_bytes_per_row_counts_the_buffers_of_the_code():
    v, h = 256000, 2304
    # bf16 with soft-cap: z and e float32 + the bf16 gradient; float32 h rows for the float32-operand path
    assert chunk_bytes_per_row(v, h, compute_dtype=torch.bfloat16, softcap=True) == 10 * v + 4 * h
    # bf16 without: z float32 (e in place) + the bf16 gradient, or the bf16 logits + their float32 copy
    assert chunk_bytes_per_row(v, h, compute_dtype=torch.bfloat16, softcap=False) == 6 * v + 4 * h
    assert chunk_bytes_per_row(v, h, compute_dtype=torch.float32, softcap=True) == 8 * v + 4 * h
    assert chunk_bytes_per_row(v, h, compute_dtype=torch.float32, softcap=False) == 4 * v + 4 * h
    assert chunk_bytes_per_row(v, h, compute_dtype=torch.float64, softcap=True) == 16 * v + 8 * h
    # the Triton chunk kernel: z float32 and the gradient (bf16, or float32 for float32 inputs), no e
    bf16, f32 = torch.bfloat16, torch.float32
    for softcap in (True, False):
        assert chunk_bytes_per_row(v, h, compute_dtype=bf16, softcap=softcap, fused_grad_dtype=bf16) == 6 * v + 4 * h
        assert chunk_bytes_per_row(v, h, compute_dtype=f32, softcap=softcap, fused_grad_dtype=f32) == 8 * v + 4 * h
        # bf16 GEMMs without a float32-output path: a float32 gradient, then its bf16 copy for dL/dh
        assert chunk_bytes_per_row(v, h, compute_dtype=bf16, softcap=softcap, fused_grad_dtype=f32) == 8 * v + 4 * h
    # so 2B's 4096-token rows fit one chunk under the 8 GiB cap with the kernel (two without)
    assert chunk_rows_for_memory(80 << 30, v, h, compute_dtype=bf16, softcap=True, fused_grad_dtype=bf16,
                                 n_rows=4096) == 4096
    assert chunk_rows_for_memory(80 << 30, v, h, compute_dtype=bf16, softcap=True, n_rows=4096) == 2048


def test_chunk_rows_for_memory():
    v, h, bf16 = 256000, 2304, torch.bfloat16
    per_row = 10 * v + 4 * h

    def rows(free, **kw):
        return chunk_rows_for_memory(free, v, h, compute_dtype=bf16, softcap=True, **kw)

    # half the free memory, rounded down to a multiple of 128
    assert rows(4 << 30) == (2 << 30) // per_row // 128 * 128 == 768
    # the 8 GiB cap on the chunk's buffers: 16 GiB free and 100 GiB free give the same rows
    assert rows(16 << 30) == rows(100 << 30) == (8 << 30) // per_row // 128 * 128 == 3328
    assert rows(100 << 30, max_chunk_bytes=1 << 40) == 8192  # the row cap
    assert rows(100 << 30, max_chunk_bytes=1 << 40, max_rows=1000) == 896
    # at least one row, whatever is free; below 128 rows no rounding
    assert rows(0) == rows(-5) == rows(per_row) == 1
    assert rows(2 * 100 * per_row) == 100
    # evened out: 5000 rows in two chunks of 2560 (not 3328 + 1672), 100 rows in one chunk of 128
    assert rows(16 << 30, n_rows=5000) == 2560
    assert rows(16 << 30, n_rows=100) == 128
    assert rows(16 << 30, n_rows=3328) == 3328
    for n in (1, 127, 3329, 6657, 40000):
        capped = rows(16 << 30)
        assert -(-n // rows(16 << 30, n_rows=n)) == -(-n // capped)  # never more chunks than the cap needs
    # a small vocabulary is limited by the row cap
    assert chunk_rows_for_memory(80 << 30, 1000, 64, compute_dtype=torch.float32, softcap=False) == 8192


def test_cpu_default_is_the_fixed_budget():
    hidden, weight, _ = _inputs(4, 8, 300, torch.float32, 0)
    assert lce._auto_chunk_rows(hidden, weight, 30.0) == default_chunk_rows(300) == (1 << 29) // (4 * 300)


# --- CUDA -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_plan_uses_float32_output_gemms():
    plan = gemm_plan("cuda", torch.bfloat16)
    assert plan.logits_out_dtype and plan.accumulate in dict(lce.ACCUMULATE_CANDIDATES), plan
    grads, rows = _chunks(64, 16, 40, 24, torch.bfloat16, 0)
    exact = sum(g.double().t() @ r.double() for g, r in zip(grads, rows))
    acc = torch.zeros(40, 24, device="cuda")
    for g, r in zip(grads, rows):
        accumulate_weight_grad(plan, acc, g.cuda(), r.cuda())
    assert _rel_max(acc.cpu(), exact) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_chunks_match_reference(softcap, dtype, seed):
    """The default chunk rows (from free memory) and the out_dtype GEMMs; bf16 within twice plain autograd's error."""
    hidden, weight, labels = _inputs(1000, 64, 3001, dtype, seed, scale=0.1, device="cuda")
    loss = linear_cross_entropy(hidden, weight, labels, softcap=softcap)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    exact_h, exact_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = linear_cross_entropy_ref(exact_h, exact_w, labels, softcap)
    eh, ew = torch.autograd.grad(exact, (exact_h, exact_w))
    if dtype == torch.float32:
        assert torch.allclose(loss.double(), exact, rtol=1e-5)
        assert _rel_max(gh, eh) <= 1e-4 and _rel_max(gw, ew) <= 1e-4
        return
    plain = linear_cross_entropy_ref(hidden, weight, labels, softcap)
    ph, pw = torch.autograd.grad(plain, (hidden, weight))
    assert abs(loss.double() - exact) <= 2 * abs(plain.double() - exact) + 1e-3 * abs(exact)
    for o, p, e in ((gh, ph, eh), (gw, pw, ew)):
        assert (o.double() - e).abs().max() <= 2 * (p.double() - e).abs().max() + 1e-3 * e.abs().max()

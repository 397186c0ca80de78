"""The Triton kernels of kernels/ewc_adamw_triton.py against ewc_adamw_ref.

On CUDA they run compiled (GPU tests below are marked `gpu`). Without CUDA they run in Triton's CPU interpreter,
which has to be chosen before triton is first imported: test_ewc_adamw.py runs this file in a subprocess with
TRITON_INTERPRET=1, and without either the file skips itself. The interpreter runs the same kernel source with
small blocks (64 elements) so the full-block and tail-block launches both see several tensors.
"""

from __future__ import annotations

import pytest
import torch

from kernels import ewc_adamw as K
from kernels import ewc_adamw_triton
from tests.test_ewc_adamw import (BIG, EWC_DTYPE_PAIRS, HYPER, MODES, SIZES, assert_rel_close,
                                  check_backend_matches_reference, check_decoupled_pull, check_drift_matches_reference,
                                  check_norms_match_reference, make_case, run_steps)

INTERPRETED = ewc_adamw_triton.interpreted()
pytestmark = pytest.mark.skipif(
    ewc_adamw_triton.triton is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs CUDA, or TRITON_INTERPRET=1 from process start (test_ewc_adamw.py runs this file so)")
# Every test takes `device`: "cuda" marked gpu (selected by -m gpu on a GPU machine), or the interpreter's "cpu".
DEVICES = [pytest.param("cpu", id="interpreter")] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu,
                                                                                     id="cuda")]
BLOCK = 64 if INTERPRETED else K.DEFAULT_BLOCK
# The interpreter runs each program in numpy: keep it small. On the GPU add tensors spanning many blocks.
CASE_SIZES = SIZES if INTERPRETED else SIZES + BIG + [(1000, 4099)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fisher_dtype,anchor_dtype", EWC_DTYPE_PAIRS)
@pytest.mark.parametrize("clip_mode,ewc_mode", MODES)
def test_triton_matches_reference(seed, device, fisher_dtype, anchor_dtype, clip_mode, ewc_mode):
    check_backend_matches_reference("triton", CASE_SIZES, fisher_dtype, anchor_dtype, clip_mode, device=device,
                                    block=BLOCK, ewc_mode=ewc_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fisher_dtype,anchor_dtype", EWC_DTYPE_PAIRS[:2])
@pytest.mark.parametrize("ewc_mode", K.EWC_MODES)
def test_triton_drift_matches_reference(seed, device, fisher_dtype, anchor_dtype, ewc_mode):
    check_drift_matches_reference("triton", CASE_SIZES, fisher_dtype, anchor_dtype, ewc_mode, device=device,
                                  block=BLOCK)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_decoupled_pull_stays_between_adam_value_and_anchor(seed, device):
    check_decoupled_pull("triton", device=device, block=BLOCK, sizes=CASE_SIZES)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_without_scale_and_without_ewc(seed, device):
    for ewc_mode in ("coupled", "decoupled"):
        check_backend_matches_reference("triton", CASE_SIZES, torch.float32, torch.bfloat16, "task", device=device,
                                        block=BLOCK, with_scale=False, ewc_mode=ewc_mode)
    check_backend_matches_reference("triton", CASE_SIZES, torch.float32, torch.float32, "task", device=device,
                                    block=BLOCK, ewc_lambda=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fisher_dtype,anchor_dtype", EWC_DTYPE_PAIRS[:2])
def test_triton_norms_match_reference(seed, device, fisher_dtype, anchor_dtype):
    check_norms_match_reference("triton", CASE_SIZES, fisher_dtype, anchor_dtype, device=device, block=BLOCK)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_misaligned_views(seed, device):
    """Pointers not 16-byte aligned (views at odd offsets) take the unhinted path and stay correct."""
    base = [torch.randn(s + 1, device=device) for s in (70, 130)]
    params = [b[1:] for b in base]  # offset 4 bytes: contiguous, not 16-byte aligned
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
    fishers = [torch.rand_like(p) for p in params]
    anchors = [p + 0.1 for p in params]
    ref = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=0.5)
    out = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.5, backend="triton", block=BLOCK)
    for a, b in zip(out[0] + out[1] + out[2], ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip_mode", K.CLIP_MODES)
def test_triton_optimizer_gradient_table_follows_the_gradients(seed, device, clip_mode):
    """EWCAdamW keeps its kernel groups across steps, and with them the gradients' pointer table on the device while
    the gradients stay at their addresses: a gradient written in place is read anew through the same table, and
    new gradients get a new table. The replaced gradients are kept alive, so the new ones lie elsewhere and a
    stale table would read the previous step's values. Against backend "torch" over three steps."""
    from trainer.optim import EWCAdamW

    sizes = [(3000,), (50, 7), (130,)]  # full and partial blocks at the optimizer's block size (2048)
    start = [torch.randn(s, device=device) for s in sizes]
    fisher = [torch.rand_like(p) * 2 for p in start]
    anchor = [p + 0.3 * torch.randn_like(p) for p in start]
    grads = [[torch.randn(s, device=device) for s in sizes] for _ in range(3)]
    runs = {}
    for backend in ("triton", "torch"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        runs[backend] = (params, EWCAdamW(params, **HYPER, ewc_lambda=0.7, fisher=fisher, anchor=anchor,
                                          backend=backend))
    kept = []
    tables = []  # the triton optimizer's gradient tables after each step

    def grad_tables(opt):
        plan = opt._plans[0]
        return [(t.grad_ptrs, list(t.grad_rows)) for by in (plan.groups, plan.grad_groups)
                for groups in by.values() for t in (g.triton_tables for g in groups) if t is not None]

    for step in range(3):
        for backend, (params, opt) in runs.items():
            if step == 1:  # in place: the same addresses, new values
                for p, g in zip(params, grads[step]):
                    p.grad.copy_(g)
            else:
                kept.append([p.grad for p in params])
                for p, g in zip(params, grads[step]):
                    p.grad = g.clone()
            opt.clip_grad_norm_(0.5, mode=clip_mode)
            opt.step()
        tables.append(grad_tables(runs["triton"][1]))
        assert_rel_close([p.detach() for p in runs["triton"][0]], [p.detach() for p in runs["torch"][0]], rtol=1e-6,
                         what=f"p after step {step + 1}")
    # "task": the norm pass reads g only, through groups of its own; "total" reads p, g, F, anchor through the
    # step's groups (their table then serves both launches of a step)
    assert len(tables[0]) == (2 if clip_mode == "task" else 1)
    assert all(a[0] is b[0] for a, b in zip(tables[0], tables[1]))  # reused: nothing uploaded
    assert all(a[0] is not b[0] and a[1] != b[1] for a, b in zip(tables[1], tables[2]))  # uploaded anew
    for ptrs, rows in tables[2]:
        assert ptrs.tolist() == rows == [g.data_ptr() for g in (p.grad for p in runs["triton"][0])]


@pytest.mark.gpu
def test_triton_new_step_lr_and_betas_do_not_recompile(seed):
    params, grads, fishers, anchors = make_case(SIZES + BIG, device="cuda", steps=1)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]

    def compiled_variants():
        return sum(len(c) for c in ewc_adamw_triton.ewc_adamw_kernel.device_caches[torch.cuda.current_device()][:1])

    K.ewc_adamw_(params, grads[0], m, v, fishers=fishers, anchors=anchors, ewc_lambda=0.5, lr=1e-3, step=1,
                 grad_scale=torch.tensor(0.5, device="cuda"), backend="triton")
    before = compiled_variants()
    for step, (lr, betas, lam) in enumerate([(2e-3, (0.8, 0.99), 0.7), (1e-4, (0.95, 0.9999), 2.0)], start=2):
        K.ewc_adamw_(params, grads[0], m, v, fishers=fishers, anchors=anchors, ewc_lambda=lam, lr=lr, betas=betas,
                     weight_decay=0.01 * step, step=step, grad_scale=torch.tensor(0.3, device="cuda"),
                     backend="triton")
    torch.cuda.synchronize()
    assert compiled_variants() == before

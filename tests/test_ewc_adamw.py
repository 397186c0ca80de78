"""kernels/ewc_adamw.py: every backend against ewc_adamw_ref on random inputs (the Triton kernel: see
test_ewc_adamw_triton.py, run here in Triton's CPU interpreter in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kernels import ewc_adamw as K
from kernels import ewc_adamw_cpp, ewc_adamw_triton

REPO_ROOT = Path(__file__).resolve().parent.parent

# Odd sizes, one element, an empty tensor, and (BIG) one spanning several 16384-element C++ chunks.
SIZES = [(1,), (0,), (63,), (64,), (65,), (3, 41), (5, 7, 3), (129,)]
BIG = [(40_000,)]
EWC_DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                   (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
HYPER = dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
# (clip mode, EWC mode): every pair the step accepts ("total" with "decoupled" is refused: see its test)
MODES = [("task", "coupled"), ("total", "coupled"), ("task", "decoupled")]


def make_case(sizes, *, fisher_dtype=torch.float32, anchor_dtype=torch.float32, dtype=torch.float32,
              device="cpu", steps=5, no_ewc_every=3):
    """Parameters, per-step gradients, and F/anchor (None for every `no_ewc_every`-th parameter)."""
    params = [torch.randn(s, dtype=dtype, device=device) for s in sizes]
    grads = [[torch.randn(s, dtype=dtype, device=device) for s in sizes] for _ in range(steps)]
    fishers, anchors = [], []
    for i, p in enumerate(params):
        if no_ewc_every and i % no_ewc_every == 1:
            fishers.append(None)
            anchors.append(None)
        else:
            fishers.append((torch.rand_like(p) * 2).to(fisher_dtype))
            anchors.append((p + 0.3 * torch.randn_like(p)).to(anchor_dtype))
    return params, grads, fishers, anchors


def run_steps(step_fn, params, grads, fishers, anchors, *, ewc_lambda, grad_scales=None, clip_mode="task", **kw):
    """Five (len(grads)) steps from zero moments; returns p, m, v and each step's (penalty, sum e^2)."""
    p = [x.clone() for x in params]
    m = [torch.zeros_like(x) for x in params]
    v = [torch.zeros_like(x) for x in params]
    sums = []
    for step, g in enumerate(grads, start=1):
        scale = None if grad_scales is None else grad_scales[step - 1]
        sums.append(step_fn(p, g, m, v, fishers=fishers, anchors=anchors, ewc_lambda=ewc_lambda, step=step,
                            grad_scale=scale, clip_mode=clip_mode, **HYPER, **kw))
    return p, m, v, sums


def assert_rel_close(actual, expected, *, rtol, what, elementwise_slack=100):
    """Relative error of a list of tensors: ||a - b|| <= rtol * ||b|| over the whole list (the issue's bound), and
    every element within elementwise_slack * rtol * max |b| (so one wrong element or block cannot hide in a norm).

    Both scales are the whole list's, not each element's: m is a sum of terms of both signs, so an element can be
    far smaller than the terms it was summed from, and a different but equally exact rounding order (an FMA)
    then shows as a large elementwise relative error. The slack is for Adam itself: where v is tiny, m / sqrt(v)
    turns a one-ulp difference in p (a compiled GPU kernel contracts p * decay + step * u into an FMA where the
    reference rounds twice) into a larger one after a few steps. Perturbing p by one ulp after every step of the
    reference on 4.1M elements (the GPU test sizes) gives, over 40 seeds, a median of 6e-7 and a worst of 5.8e-6
    of max |b| elementwise (a heavy tail), and 2.4e-7 by norm; a wrong sign, scale or bias correction on an element
    is off by 1e-3 or more.
    """
    err_sq = ref_sq = err_max = ref_max = 0.0
    worst = None
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if b.numel() == 0:
            continue
        diff = a.double() - b.double()
        err_sq += diff.square().sum().item()
        ref_sq += b.double().square().sum().item()
        e = diff.abs().max().item()
        if e > err_max:
            err_max, worst = e, i
        ref_max = max(ref_max, b.double().abs().max().item())
    norm_err, norm_ref = err_sq**0.5, ref_sq**0.5
    assert norm_err <= rtol * norm_ref, f"{what}: ||error|| {norm_err:.3g} > {rtol} * ||expected|| {norm_ref:.3g}"
    assert err_max <= elementwise_slack * rtol * ref_max, (
        f"{what}: max error {err_max:.3g} (tensor {worst}) > {elementwise_slack} * {rtol} * max {ref_max:.3g}")


def assert_sums_close(actual, expected, *, rtol=2e-5):
    for step, ((ap, asq), (ep, esq)) in enumerate(zip(actual, expected), start=1):
        assert ap.dtype == torch.float64 and ap.dim() == 0
        torch.testing.assert_close(ap.cpu(), ep.cpu(), rtol=rtol, atol=0, msg=f"penalty, step {step}")
        torch.testing.assert_close(asq.cpu(), esq.cpu(), rtol=rtol, atol=0, msg=f"sum e^2, step {step}")


def check_backend_matches_reference(backend, sizes, fisher_dtype, anchor_dtype, clip_mode, *, device="cpu",
                                    with_scale=True, ewc_lambda=0.7, block=K.DEFAULT_BLOCK, ewc_mode="coupled"):
    params, grads, fishers, anchors = make_case(sizes, fisher_dtype=fisher_dtype, anchor_dtype=anchor_dtype,
                                                device=device)
    scales = [torch.tensor(s, device=device) for s in (0.5, 1.0, 0.25, 0.8, 0.9)] if with_scale else None
    ref = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=ewc_lambda, grad_scales=scales,
                    clip_mode=clip_mode, ewc_mode=ewc_mode)
    out = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=ewc_lambda, grad_scales=scales,
                    clip_mode=clip_mode, ewc_mode=ewc_mode, backend=backend, block=block)
    for name, a, b in zip("pmv", out[:3], ref[:3]):
        assert_rel_close(a, b, rtol=1e-6, what=name)
    assert_sums_close(out[3], ref[3])
    assert ref[3][0][0] > 0 if ewc_lambda else ref[3][0][0] == 0


def check_decoupled_pull(backend, *, dtype=torch.float32, device="cpu", block=K.DEFAULT_BLOCK, sizes=SIZES + BIG):
    """Decoupled mode against the properties of its definition, on the backend's own results, after three earlier
    decoupled steps: the moments are plain AdamW's on g * s bit for bit (the EWC term never enters them); every
    parameter ends between its Adam-updated value (the same backend with lambda = 0) and its anchor, on the
    anchor's side; F = 0 leaves the Adam value exactly; lr·λ·F huge (beyond float32's range: the cap) lands on the
    anchor exactly; lr·λ·F tiny (float64, where the pull is visible) is the explicit step lr·λ·F (θ* - θ)."""
    ewc_dtypes = (torch.float64, torch.float64) if dtype == torch.float64 else (torch.float32, torch.bfloat16)
    params, grads, fishers, anchors = make_case(sizes, fisher_dtype=ewc_dtypes[0], anchor_dtype=ewc_dtypes[1],
                                                dtype=dtype, device=device, steps=4)
    for f in fishers:
        if f is not None:
            f.view(-1)[::5] = 0  # no Fisher information: no pull
    kw = dict(fishers=fishers, anchors=anchors, **HYPER, backend=backend, block=block)
    p, m, v, _ = run_steps(K.ewc_adamw_, params, grads[:3], fishers, anchors, ewc_lambda=0.7,
                           grad_scales=[0.5, 1.0, 0.25], ewc_mode="decoupled", backend=backend, block=block)
    scale = torch.tensor(0.5, dtype=dtype, device=device)
    plain = [[x.clone() for x in t] for t in (p, m, v)]
    K.ewc_adamw_(*plain[:1], grads[3], *plain[1:], ewc_lambda=0.0, step=4, grad_scale=scale, **kw)
    cases = [("huge", 1e40), ("moderate", 0.7)] + ([("tiny", 1e-6)] if dtype == torch.float64 else [])
    for name, lam in cases:
        out = [[x.clone() for x in t] for t in (p, m, v)]
        K.ewc_adamw_(*out[:1], grads[3], *out[1:], ewc_lambda=lam, step=4, grad_scale=scale, ewc_mode="decoupled",
                     **kw)
        moved = 0
        for i, (po, pa, mo, ma, vo, va) in enumerate(zip(out[0], plain[0], out[1], plain[1], out[2], plain[2])):
            assert torch.equal(mo, ma) and torch.equal(vo, va), f"{name}: moments of tensor {i} saw the EWC term"
            if fishers[i] is None:
                assert torch.equal(po, pa), f"{name}: tensor {i} has no EWC state but moved"
                continue
            anchor, f = anchors[i].to(dtype), fishers[i].to(dtype)
            lo, hi = torch.minimum(pa, anchor), torch.maximum(pa, anchor)
            assert bool(((po >= lo) & (po <= hi)).all()), f"{name}: tensor {i} left [adam value, anchor]"
            assert torch.equal(po[f == 0], pa[f == 0]), f"{name}: tensor {i} moved where F = 0"
            if name == "huge":
                assert torch.equal(po[f > 0], anchor[f > 0]), f"{name}: tensor {i} did not land on its anchor"
            if name == "tiny":
                explicit = (HYPER["lr"] * lam) * f * (anchor - pa)
                assert_rel_close([po - pa], [explicit], rtol=1e-6, what=f"{name} pull of tensor {i}",
                                 elementwise_slack=1e3)
            moved += int((po != pa).sum())
        assert moved > 0, f"{name}: nothing was pulled"


def check_drift_matches_reference(backend, sizes, fisher_dtype, anchor_dtype, ewc_mode, *, device="cpu",
                                  block=K.DEFAULT_BLOCK, steps=3):
    """Each step's per-parameter drift (sum F d^2, sum d^2) equals ewc_drift_ref at that step's pre-step p, and the
    drift=True step writes what the plain step writes (the telemetry changes no number of the update)."""
    params, grads, fishers, anchors = make_case(sizes, fisher_dtype=fisher_dtype, anchor_dtype=anchor_dtype,
                                                device=device, steps=steps)
    p = [x.clone() for x in params]
    m = [torch.zeros_like(x) for x in params]
    v = [torch.zeros_like(x) for x in params]
    plain = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.7, backend=backend, block=block,
                      ewc_mode=ewc_mode)
    for step, g in enumerate(grads, start=1):
        expected = K.ewc_drift_ref(p, fishers=fishers, anchors=anchors)
        penalty, _, drift = K.ewc_adamw_(p, g, m, v, fishers=fishers, anchors=anchors, ewc_lambda=0.7, step=step,
                                         backend=backend, block=block, ewc_mode=ewc_mode, drift=True, **HYPER)
        assert drift.shape == (len(params), 2) and drift.dtype == torch.float64
        torch.testing.assert_close(drift.cpu(), expected.cpu(), rtol=1e-4, atol=1e-12,
                                   msg=f"{backend} {ewc_mode}: drift at step {step}")
        assert (expected[1::3] == 0).all() and (expected[0::3, 1] > 0).all()  # no-EWC parameters and the rest
        assert penalty.item() == pytest.approx(0.35 * expected[:, 0].sum().item(), rel=1e-5)
    for a, b in zip(p, plain[0]):
        assert torch.equal(a, b), f"{backend}: the drift=True step wrote other parameters"


def check_norms_match_reference(backend, sizes, fisher_dtype, anchor_dtype, *, device="cpu",
                                block=K.DEFAULT_BLOCK):
    params, grads, fishers, anchors = make_case(sizes, fisher_dtype=fisher_dtype, anchor_dtype=anchor_dtype,
                                                device=device, steps=1)
    for lam in (0.0, 1.3):
        ref = K.ewc_grad_sq_norms_ref(params, grads[0], fishers=fishers, anchors=anchors, ewc_lambda=lam)
        out = K.ewc_grad_sq_norms(params, grads[0], fishers=fishers, anchors=anchors, ewc_lambda=lam,
                                  backend=backend, block=block)
        for a, b, what in zip(out, ref, ("sum g^2", "sum (g + e)^2")):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=2e-5, atol=0, msg=f"{what}, lambda {lam}")
        if lam == 0:
            torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
        else:
            assert out[1].item() != out[0].item()


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("fisher_dtype,anchor_dtype", EWC_DTYPE_PAIRS)
@pytest.mark.parametrize("clip_mode,ewc_mode", MODES)
def test_backend_matches_reference(seed, backend, fisher_dtype, anchor_dtype, clip_mode, ewc_mode):
    check_backend_matches_reference(backend, SIZES + BIG, fisher_dtype, anchor_dtype, clip_mode, ewc_mode=ewc_mode)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoupled_pull_stays_between_adam_value_and_anchor(seed, backend, dtype):
    check_decoupled_pull(backend, dtype=dtype)


def test_decoupled_reference_is_the_proximal_step(seed):
    """The reference's pull, written as a lerp, is the implicit step (θ + c θ*) / (1 + c) of the definition (in
    float64, for rates from tiny to huge), and its Adam part is the coupled reference with lambda = 0."""
    params, grads, fishers, anchors = make_case(SIZES, dtype=torch.float64, fisher_dtype=torch.float64,
                                                anchor_dtype=torch.float64, steps=1)
    for lam in (1e-9, 0.7, 30.0, 1e12):
        plain = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=0.0)
        out = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=lam, ewc_mode="decoupled")
        for i, (po, pa) in enumerate(zip(out[0], plain[0])):
            if fishers[i] is None:
                assert torch.equal(po, pa)
                continue
            c = HYPER["lr"] * lam * fishers[i]
            torch.testing.assert_close(po, (pa + c * anchors[i]) / (1 + c), rtol=1e-14, atol=1e-15)
        assert all(torch.equal(a, b) for a, b in zip(out[1] + out[2], plain[1] + plain[2]))
        coupled = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=lam)
        assert out[3][0][0].item() == coupled[3][0][0].item() > 0  # the penalty at the pre-step p, in both modes
        assert out[3][0][1].item() == coupled[3][0][1].item()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_decoupled_with_clip_total_and_unknown_modes_are_refused(backend):
    p, g, m, v = torch.randn(4), torch.randn(4), torch.zeros(4), torch.zeros(4)
    ewc = dict(fishers=[torch.rand(4)], anchors=[p.clone()], ewc_lambda=1.0, **HYPER, step=1)
    for fn in (K.ewc_adamw_, K.ewc_adamw_ref):
        kw = dict(backend=backend) if fn is K.ewc_adamw_ else {}
        with pytest.raises(ValueError, match="clip mode 'total'.*decoupled"):
            fn([p], [g], [m], [v], **ewc, grad_scale=0.5, clip_mode="total", ewc_mode="decoupled", **kw)
        with pytest.raises(ValueError, match="ewc_mode must be"):
            fn([p], [g], [m], [v], **ewc, ewc_mode="proximal", **kw)
    assert torch.equal(m, torch.zeros(4))  # refused before anything was written


def test_rel_close_sees_one_wrong_element_among_millions():
    expected = [torch.randn(1000, 4099), torch.randn(7)]
    actual = [t.clone() for t in expected]
    assert_rel_close(actual, expected, rtol=1e-6, what="p")
    actual[0][123, 456] += 2e-4 * expected[0].abs().max()  # far under the norm bound, caught elementwise
    with pytest.raises(AssertionError, match=r"max error .* \(tensor 0\)"):
        assert_rel_close(actual, expected, rtol=1e-6, what="p")
    actual = [t.clone() for t in expected]
    actual[0] *= 1 + 3e-6  # every element slightly off (within the elementwise slack): the norm sees it
    with pytest.raises(AssertionError, match=r"\|\|error\|\|"):
        assert_rel_close(actual, expected, rtol=1e-6, what="p")


def test_rel_close_passes_one_ulp_of_rounding_noise(seed):
    """The bound leaves room for what a correct compiled kernel may differ by: the reference with p moved by one
    ulp on a random half of its elements after every step (a different FMA contraction) still passes."""
    params, grads, fishers, anchors = make_case(SIZES + [(1000, 4099)], fisher_dtype=torch.bfloat16)

    def nudge(p):
        for x in p:
            up = torch.nextafter(x, torch.full_like(x, float("inf")))
            x.copy_(torch.where(torch.rand_like(x) < 0.5, up, x))

    def perturbed(p, g, m, v, **kw):
        out = K.ewc_adamw_ref(p, g, m, v, **kw)
        nudge(p)
        return out

    scales = [torch.tensor(s) for s in (0.5, 1.0, 0.25, 0.8, 0.9)]
    ref = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=0.7, grad_scales=scales)
    out = run_steps(perturbed, params, grads, fishers, anchors, ewc_lambda=0.7, grad_scales=scales)
    for name, a, b in zip("pmv", out[:3], ref[:3]):
        assert not all(torch.equal(x, y) for x, y in zip(a, b))
        assert_rel_close(a, b, rtol=1e-6, what=name)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_plain_adamw_without_ewc_matches_torch_adamw(seed, backend):
    """lambda = 0: exactly torch.optim.AdamW (its own implementation, not our reference)."""
    params, grads, fishers, anchors = make_case(SIZES + BIG, steps=5)
    ours = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.0, backend=backend)
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, **HYPER)
    for g in grads:
        for t, gi in zip(theirs, g):
            t.grad = gi.clone()
        opt.step()
    assert_rel_close(ours[0], [t.detach() for t in theirs], rtol=1e-6, what="p")
    assert_rel_close(ours[1], [opt.state[t]["exp_avg"] for t in theirs], rtol=1e-6, what="m")
    assert all(pen.item() == 0 and sq.item() == 0 for pen, sq in ours[3])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("ewc_mode", ["coupled", "decoupled"])
def test_float64(seed, backend, ewc_mode):
    params, grads, fishers, anchors = make_case(SIZES, dtype=torch.float64, fisher_dtype=torch.float64,
                                                anchor_dtype=torch.float64)
    ref = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=0.7, ewc_mode=ewc_mode)
    out = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.7, backend=backend,
                    ewc_mode=ewc_mode)
    for name, a, b in zip("pmv", out[:3], ref[:3]):
        assert_rel_close(a, b, rtol=1e-13, what=name)
    assert_sums_close(out[3], ref[3], rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("fisher_dtype,anchor_dtype", EWC_DTYPE_PAIRS)
@pytest.mark.parametrize("ewc_mode", K.EWC_MODES)
def test_drift_matches_reference(seed, backend, fisher_dtype, anchor_dtype, ewc_mode):
    check_drift_matches_reference(backend, SIZES + BIG, fisher_dtype, anchor_dtype, ewc_mode)


def test_drift_is_zero_with_lambda_zero(seed):
    params, grads, fishers, anchors = make_case(SIZES)
    p = [x.clone() for x in params]
    _, _, drift = K.ewc_adamw_(p, grads[0], [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p],
                               fishers=fishers, anchors=anchors, ewc_lambda=0.0, step=1, backend="cpp", drift=True,
                               **HYPER)
    assert drift.shape == (len(p), 2) and not drift.any()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("fisher_dtype,anchor_dtype", EWC_DTYPE_PAIRS[:2])
def test_norms_match_reference(seed, backend, fisher_dtype, anchor_dtype):
    check_norms_match_reference(backend, SIZES + BIG, fisher_dtype, anchor_dtype)


def test_bfloat16_state_is_exactly_the_upcast_float32_state(seed):
    """bfloat16 F/anchor: the same result as float32 tensors holding the same (upcast) values, bit for bit."""
    params, grads, fishers, anchors = make_case(SIZES + BIG, fisher_dtype=torch.bfloat16,
                                                anchor_dtype=torch.bfloat16)
    up_f = [None if f is None else f.float() for f in fishers]
    up_a = [None if a is None else a.float() for a in anchors]
    a = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.7, backend="cpp")
    b = run_steps(K.ewc_adamw_, params, grads, up_f, up_a, ewc_lambda=0.7, backend="cpp")
    for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_non_contiguous_rejected(backend):
    p = torch.randn(6, 5).t()  # a transposed view
    g, m, v = torch.randn(5, 6), torch.zeros(5, 6), torch.zeros(5, 6)
    with pytest.raises(ValueError, match=r"params\[0\].*not contiguous"):
        K.ewc_adamw_([p], [g], [m], [v], lr=1e-3, step=1, backend=backend)
    p = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"fishers\[0\].*not contiguous"):
        K.ewc_adamw_([p], [g], [m], [v], fishers=[torch.rand(6, 5).t()], anchors=[p.clone()], ewc_lambda=1.0,
                     lr=1e-3, step=1, backend=backend)


def test_bad_inputs_rejected():
    p, g, m, v = torch.randn(4), torch.randn(4), torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        K.ewc_adamw_([p], [torch.randn(5)], [m], [v], lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"fishers\[0\] is float16"):
        K.ewc_adamw_([p], [g], [m], [v], fishers=[torch.rand(4).half()], anchors=[p.clone()], ewc_lambda=1.0,
                     lr=1e-3, step=1)
    with pytest.raises(ValueError, match="fisher but no anchor"):
        K.ewc_adamw_([p], [g], [m], [v], fishers=[torch.rand(4)], anchors=[None], ewc_lambda=1.0, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="step counts from 1"):
        K.ewc_adamw_([p], [g], [m], [v], lr=1e-3, step=0)
    with pytest.raises(ValueError, match="clip_mode"):
        K.ewc_adamw_([p], [g], [m], [v], lr=1e-3, step=1, clip_mode="global")
    with pytest.raises(ValueError, match="triton"):
        if not ewc_adamw_triton.interpreted():
            K.ewc_adamw_([p], [g], [m], [v], lr=1e-3, step=1, backend="triton")
        else:
            raise ValueError("triton runs here (interpreter): nothing to reject")


def test_empty_lists_and_empty_tensors():
    pen, sq = K.ewc_adamw_([], [], [], [], lr=1e-3, step=1, backend="cpp")
    assert pen.item() == 0 and sq.item() == 0
    e = torch.empty(0)
    pen, sq = K.ewc_adamw_([e], [e.clone()], [e.clone()], [e.clone()], fishers=[e.clone()], anchors=[e.clone()],
                           ewc_lambda=1.0, lr=1e-3, step=1, backend="cpp")
    assert pen.item() == 0 and sq.item() == 0


def test_missing_compiler_falls_back_to_torch_with_one_warning(seed, monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(ewc_adamw_cpp, "_module", None)
    monkeypatch.setattr(ewc_adamw_cpp, "_build_failure", None)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    params, grads, fishers, anchors = make_case(SIZES, steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.5, backend="cpp")
        assert K.resolve_backend("auto", "cpu") == "torch"
    ref = run_steps(K.ewc_adamw_ref, params, grads, fishers, anchors, ewc_lambda=0.5)
    relevant = [w for w in caught if "could not be built" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert "command not found" in str(relevant[0].message)
    for name, a, b in zip("pmv", out[:3], ref[:3]):
        assert_rel_close(a, b, rtol=1e-6, what=name)


def test_cpp_result_does_not_depend_on_thread_count(seed):
    params, grads, fishers, anchors = make_case(BIG + SIZES + BIG, steps=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.5, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    many = run_steps(K.ewc_adamw_, params, grads, fishers, anchors, ewc_lambda=0.5, backend="cpp")
    for x, y in zip(one[0] + one[1] + one[2], many[0] + many[1] + many[2]):
        assert torch.equal(x, y)
    for (p1, s1), (p2, s2) in zip(one[3], many[3]):
        assert p1.item() == p2.item() and s1.item() == s2.item()


@pytest.mark.skipif(ewc_adamw_triton.triton is None, reason="triton is not installed")
def test_triton_kernel_in_cpu_interpreter():
    """Runs test_ewc_adamw_triton.py with TRITON_INTERPRET=1: the interpreter must be chosen before triton is
    first imported, so it needs its own process."""
    if ewc_adamw_triton.interpreted():
        pytest.skip("this process already runs the Triton tests in the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(REPO_ROOT / "tests" / "test_ewc_adamw_triton.py")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail


def _compile_for_hopper(kernel, constexprs: dict) -> dict:
    """Compile a kernel for sm_90 without a GPU (Triton's own LLVM and ptxas): its "ttgir" and "ptx" texts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = {"ptrs": "*i64", "grad_ptrs": "*i64", "blocks": "*i64", "sizes": "*i64", "partials": "*fp32",
                "grad_scale": "*fp32"}
    ints = {"num_tensors", "num_blocks"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i64" if name in ints else "fp32")
                 for name in kernel.arg_names}
    compiled = ewc_adamw_triton.triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 8, "enable_fp_fusion": ewc_adamw_triton.FP_FUSION})
    return compiled.asm


def _needs_triton_compiler():
    if ewc_adamw_triton.triton is None:
        pytest.skip("triton is not installed")
    if ewc_adamw_triton.interpreted():
        pytest.skip("kernels are interpreted in this process")
    pytest.importorskip("triton.backends.nvidia")


def test_triton_kernels_compile_for_hopper_with_128_bit_accesses():
    """The GPU build of the kernels, checked on any machine: full aligned blocks use 128-bit float32 loads and
    stores, 64-bit bfloat16 loads (4 elements per thread, the float32 stores' width: see the next test)."""
    _needs_triton_compiler()
    full = dict(HAS_EWC=True, F_BF16=True, A_BF16=False, HAS_SCALE=True, CLIP_TOTAL=True, DECOUPLED=False,
                LERP_SMALL=True, MASKED=False, ALIGNED=True, BLOCK=K.DEFAULT_BLOCK)
    # decoupled mode: the same accesses (the pull uses the F and anchor already loaded), one division more
    for consts in (full, full | dict(CLIP_TOTAL=False, DECOUPLED=True)):
        ptx = _compile_for_hopper(ewc_adamw_triton.ewc_adamw_kernel, consts)["ptx"]
        # 8 elements per thread in two runs of 4: 2 x v4 for each of p, g, m, v, anchor; 2 x v2 for the bfloat16 F
        assert ptx.count("ld.global.v4.b32") == 10, ptx.count("ld.global.v4.b32")
        assert ptx.count("ld.global.v2.b32") == 2, ptx.count("ld.global.v2.b32")
        assert ptx.count("st.global.v4.b32") == 6  # p, m, v
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
        # two divisions per element (sqrt(v) / sqrt(bc2), m / denom), and w = c / (1 + c) for the pull
        assert ptx.count("div.rn.f32") == (24 if consts["DECOUPLED"] else 16)
    ptx = _compile_for_hopper(ewc_adamw_triton.ewc_adamw_kernel, full | dict(MASKED=True, HAS_EWC=False, HAS_SCALE=False))["ptx"]
    assert "ld.global" in ptx
    ptx = _compile_for_hopper(ewc_adamw_triton.ewc_grad_norms_kernel, dict(HAS_EWC=True, F_BF16=False, A_BF16=True,
                                                            MASKED=False, ALIGNED=True, BLOCK=K.DEFAULT_BLOCK))["ptx"]
    assert ptx.count("ld.global.v4.b32") == 7  # 2 x p, g, F (float32), 1 x anchor (bfloat16)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("f_bf16,a_bf16,masked", [(f, a, m) for f in (False, True) for a in (False, True)
                                                  for m in (False, True) if f or a or not m])
def test_triton_step_keeps_one_layout_for_every_dtype(f_bf16, a_bf16, masked, decoupled):
    """What the first GPU benchmark showed as slow: with bfloat16 F or θ* the fused step ran below the float32 one
    although it moves fewer bytes. The compiler had laid the block out 8 elements per thread (the bfloat16 loads'
    128 bits) and converted m, v and p through shared memory to 4 per thread before each store: 3 conversions
    and 6 more barriers per block. Every dtype pair must compile to one layout, synchronising only for the two
    block reductions, as the all-float32 coupled kernel does, in either EWC mode (decoupled keeps F and the anchor
    in registers until the store of p)."""
    _needs_triton_compiler()
    consts = dict(HAS_EWC=True, F_BF16=f_bf16, A_BF16=a_bf16, HAS_SCALE=True, CLIP_TOTAL=False, DECOUPLED=decoupled,
                  LERP_SMALL=True, MASKED=masked, ALIGNED=True, BLOCK=K.DEFAULT_BLOCK)
    code = _compile_for_hopper(ewc_adamw_triton.ewc_adamw_kernel, consts)
    float32 = _compile_for_hopper(ewc_adamw_triton.ewc_adamw_kernel,
                                  consts | dict(F_BF16=False, A_BF16=False, MASKED=False, DECOUPLED=False))
    assert "convert_layout" not in code["ttgir"]
    assert code["ptx"].count("bar.sync") == float32["ptx"].count("bar.sync")
    norms = _compile_for_hopper(ewc_adamw_triton.ewc_grad_norms_kernel, dict(HAS_EWC=True, F_BF16=f_bf16, A_BF16=a_bf16,
                                                              MASKED=masked, ALIGNED=True, BLOCK=K.DEFAULT_BLOCK))
    assert "convert_layout" not in norms["ttgir"]

"""The Triton chunk kernel of kernels/softcap_cross_entropy_triton.py against its float64 reference, and
linear_cross_entropy running on it.

On CUDA the kernel runs compiled (those tests are marked `gpu`). Without CUDA it runs in Triton's CPU interpreter,
which has to be chosen before triton is first imported: test_kernel_in_cpu_interpreter runs this file again in a
subprocess with TRITON_INTERPRET=1; in a plain CPU process the kernel tests skip, and the sm_90 build is checked
by compiling it without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kernels import linear_cross_entropy as lce
from kernels import softcap_cross_entropy_triton as K

REPO_ROOT = Path(__file__).resolve().parent.parent
INTERPRETED = K.interpreted()
RUNS = K.triton is not None and (INTERPRETED or torch.cuda.is_available())
needs_kernel = pytest.mark.skipif(not RUNS, reason="needs CUDA, or TRITON_INTERPRET=1 from process start "
                                                   "(test_kernel_in_cpu_interpreter runs this file so)")
DEVICES = [pytest.param("cpu", id="interpreter")] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu,
                                                                                     id="cuda")]
# The interpreter runs each program in numpy: small rows, and a small block so that rows span several blocks
# with a partial last one. On the GPU the default block, and a row of Gemma2's vocabulary.
BLOCK = 64 if INTERPRETED else None
SIZES = [(1, 1), (3, 7), (5, 97), (4, 300)] + ([] if INTERPRETED else [(6, 256000), (33, 4099)])
CAPS = [None, 30.0, 50.0]  # none; Gemma2's final cap (shift by cap); above SHIFT_BY_CAP_MAX (running max)
# Relative error of a float32 softmax entry. The interpreter evaluates exp and division exactly rounded (numpy):
# the logsumexp's rounding dominates, within an ulp of 2·cap (~4e-6). Compiled, Triton uses the GPU's approximate
# ex2 and division (2 ulps each): tanh, and so each soft-capped logit cap·t, is a few ulps of cap off (~3e-5).
SOFTMAX_RTOL = 1e-5 if INTERPRETED else 1e-4


def _case(n: int, vocab: int, seed: int, device: str):
    """Logits of a trained LM head's scale (|z| up to ~100, so the cap saturates), one row of tiny logits (the
    tanh series), the first row not scored and the last scored (n >= 2)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 40
    if n >= 3:
        logits[1] *= 1e-3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    if n >= 2:
        labels[0], labels[-1] = -100, int(torch.randint(0, vocab, (), generator=g))
    return logits.to(device), labels.to(device)


def _check(loss, grad, logits, labels, cap, grad_dtype):
    want_loss, want_grad = K.softcap_cross_entropy_ref(logits, labels, cap, None if grad is None else torch.float64)
    scored = (labels != -100).cpu()
    loss = loss.cpu()
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
    assert torch.equal(loss[~scored], torch.zeros(int((~scored).sum())))
    # float32 logsumexp over up to 256k entries of a float32 row: within a few ulps of the row's scale
    torch.testing.assert_close(loss, want_loss.cpu(), rtol=1e-5, atol=2 * SOFTMAX_RTOL)
    if grad is None:
        return
    grad, want = grad.cpu().double(), want_grad.cpu()
    assert not grad[~scored].any()
    err = (grad - want).abs()
    # float32: each softmax entry p within SOFTMAX_RTOL; so the gradient too off the target, and within
    # SOFTMAX_RTOL absolute at the target, where (p - 1)(1 - t²) can be far smaller than p. Another dtype: one more
    # rounding (an ulp either way) on top.
    rel = SOFTMAX_RTOL + (0.0 if grad_dtype == torch.float32 else torch.finfo(grad_dtype).eps)
    bound = rel * want.abs() + 1e-6
    rows = torch.arange(len(labels))
    bound[rows, labels.cpu().clamp(min=0)] += SOFTMAX_RTOL
    assert bool((err <= bound).all()), f"max gradient error {err.max().item():.3g} over the bound"
    # each scored row's float32 gradient sums to ~0 (softmax and one-hot each sum to 1); a cap scales it by 1 - t²
    if cap is None and grad_dtype == torch.float32 and scored.any():
        assert grad[scored].sum(1).abs().max().item() < 1e-4


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16, None])
def test_kernel_matches_reference(seed, device, cap, grad_dtype):
    for i, (n, vocab) in enumerate(SIZES):
        logits, labels = _case(n, vocab, seed + i, device)
        grad = None if grad_dtype is None else torch.full(logits.shape, float("nan"), dtype=grad_dtype,
                                                           device=device)
        before = logits.clone()
        loss = K.softcap_cross_entropy(logits, labels, cap, grad, block=BLOCK)
        assert torch.equal(logits, before)  # only read
        _check(loss, grad, logits, labels, cap, grad_dtype)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_without_rows_and_bad_inputs(device):
    logits = torch.zeros(0, 10, device=device)
    assert K.softcap_cross_entropy(logits, torch.zeros(0, dtype=torch.int64, device=device), 30.0).shape == (0,)
    with pytest.raises(ValueError, match="contiguous float32"):
        K.softcap_cross_entropy(torch.zeros(2, 10, dtype=torch.bfloat16, device=device),
                                torch.zeros(2, dtype=torch.int64, device=device), 30.0)
    with pytest.raises(ValueError, match="contiguous float32"):
        K.softcap_cross_entropy(torch.zeros(10, 2, device=device).t(), torch.zeros(2, dtype=torch.int64,
                                                                                   device=device), 30.0)
    with pytest.raises(ValueError, match="labels shape"):
        K.softcap_cross_entropy(torch.zeros(2, 10, device=device), torch.zeros(3, dtype=torch.int64,
                                                                               device=device), 30.0)
    with pytest.raises(ValueError, match="grad must be"):
        K.softcap_cross_entropy(torch.zeros(2, 10, device=device), torch.zeros(2, dtype=torch.int64, device=device),
                                30.0, torch.zeros(2, 11, device=device))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", [None, 30.0])
def test_linear_cross_entropy_runs_the_kernel_per_chunk(seed, device, cap, monkeypatch):
    """linear_cross_entropy on a device where the kernel passes its check: one launch per chunk, loss and both
    gradients as the definition (float32: the same tolerances as tests/test_linear_cross_entropy.py)."""
    assert lce.fused_chunk_kernel(device, vocab_size=101, softcap=cap,
                                  grad_dtype=lce.chunk_grad_dtype(device, torch.float32))
    calls = []
    original = K.softcap_cross_entropy
    monkeypatch.setattr(K, "softcap_cross_entropy", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    g = torch.Generator().manual_seed(seed)
    n, hidden_size, vocab = 37, 16, 101
    hidden = torch.randn(n, hidden_size, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 3).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    labels[0], labels[1] = -100, 5
    labels = labels.to(device)
    loss = lce.linear_cross_entropy(hidden, weight, labels, softcap=cap, chunk_rows=8)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert [shape[0] for shape in calls] == [8, 8, 8, 8, 5]
    want = lce.linear_cross_entropy_ref(hidden, weight, labels, cap)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    for got, ref in zip(grads, want_grads):
        assert ((got - ref).norm() / ref.norm()).item() < SOFTMAX_RTOL
    # forward only (no gradient wanted): the kernel's loss-only variant
    with torch.no_grad():
        torch.testing.assert_close(lce.linear_cross_entropy(hidden, weight, labels, softcap=cap, chunk_rows=8),
                                   want, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_labels_outside_the_vocabulary_give_nan(device):
    """The torch composition would index out of bounds (a device-side assert on CUDA); the kernel returns NaN for
    such a row, which the trainer's non-finite guard reports, and writes no one-hot anywhere."""
    vocab = 50
    logits = torch.randn(5, vocab).to(device)
    labels = torch.tensor([vocab, -1, -100, 0, vocab - 1], device=device)
    grad = torch.empty(logits.shape, device=device)
    loss = K.softcap_cross_entropy(logits, labels, 30.0, grad, block=BLOCK)
    want_loss, want_grad = K.softcap_cross_entropy_ref(logits, labels, 30.0, torch.float64)
    assert loss[:2].isnan().all() and want_loss[:2].isnan().all()
    assert loss[2] == 0 and torch.isfinite(loss[3:]).all()
    torch.testing.assert_close(loss[2:].cpu(), want_loss[2:].cpu().float(), rtol=1e-5, atol=2 * SOFTMAX_RTOL)
    torch.testing.assert_close(grad.cpu().double(), want_grad.cpu(), rtol=SOFTMAX_RTOL, atol=SOFTMAX_RTOL)
    assert (grad[:2] > 0).all()  # softmax · (1 - t²) only: no target column


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_strided_labels(seed, device):
    """Labels that are a strided view (a column of a [n, 2] tensor) are read as their values, not their storage."""
    logits, labels = _case(7, 97, seed, device)
    pairs = torch.stack([labels, labels.flip(0)], dim=1)
    grad = torch.empty(logits.shape, device=device)
    loss = K.softcap_cross_entropy(logits, pairs[:, 0], 30.0, grad, block=BLOCK)
    _check(loss, grad, logits, labels, 30.0, torch.float32)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_each_variant_is_checked_once_and_a_failing_one_is_not_used(device, monkeypatch):
    """Every (vocabulary, cap, gradient dtype) is its own compiled variant: each is checked before first use,
    once; one that disagrees with the reference or fails to build falls back to the composition, with a warning
    that names it."""
    monkeypatch.setattr(lce, "_FUSED", {})
    calls = []
    original = K.softcap_cross_entropy
    monkeypatch.setattr(K, "softcap_cross_entropy", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    for _ in range(2):
        assert lce.fused_chunk_kernel(device, vocab_size=77, softcap=30.0, grad_dtype=torch.bfloat16)
        assert lce.fused_chunk_kernel(device, vocab_size=77, softcap=30.0, grad_dtype=None)
    assert calls == [(3, 77), (3, 77)]  # one check per variant, on rows of the real width
    with lce.torch_composition():
        assert not lce.fused_chunk_kernel(device, vocab_size=77, softcap=30.0, grad_dtype=torch.bfloat16)

    monkeypatch.setattr(K, "softcap_cross_entropy", lambda logits, labels, cap, grad=None, **kw:
                        torch.zeros(logits.shape[0], device=logits.device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not lce.fused_chunk_kernel(device, vocab_size=77, softcap=None, grad_dtype=torch.float32)
    assert any("failed its check" in str(w.message) and "vocabulary 77" in str(w.message) for w in caught)
    monkeypatch.setattr(K, "softcap_cross_entropy", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no PTX")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not lce.fused_chunk_kernel(device, vocab_size=78, softcap=None, grad_dtype=torch.float32)
    assert any("no PTX" in str(w.message) for w in caught)


def test_plain_cpu_keeps_the_torch_composition_without_importing_triton():
    if INTERPRETED:
        pytest.skip("this process runs Triton kernels on CPU tensors")
    code = ("import sys, torch\n"
            "from kernels.linear_cross_entropy import linear_cross_entropy as f, fused_chunk_kernel\n"
            "h = torch.randn(6, 8, requires_grad=True)\n"
            "f(h, torch.randn(11, 8), torch.arange(6), softcap=30.0).backward()\n"
            "assert not fused_chunk_kernel('cpu', vocab_size=11, softcap=30.0, grad_dtype=torch.float32)\n"
            "print('triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(K.triton is None, reason="triton is not installed")
def test_kernel_in_cpu_interpreter():
    """Runs this file with TRITON_INTERPRET=1: the interpreter must be chosen before triton is first imported."""
    if INTERPRETED or torch.cuda.is_available():
        pytest.skip("this process runs the kernel tests itself")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and " failed" not in result.stdout, tail


def _compile_for_hopper(constexprs: dict, grad_type: str) -> str:
    """The kernel's PTX for sm_90, built without a GPU (Triton's own LLVM and ptxas), with the 16-byte pointer
    alignment that a launch on CUDA tensors gets by specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = K.softcap_cross_entropy_kernel
    types = {"z_ptr": "*fp32", "labels_ptr": "*i64", "loss_ptr": "*fp32", "grad_ptr": grad_type, "cap": "fp32"}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in types if name.endswith("_ptr")}
    compiled = K.triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": K.NUM_WARPS})
    return compiled.asm["ptx"]


@pytest.mark.parametrize("cap,grad_type", [(30.0, "*bf16"), (50.0, "*bf16"), (None, "*bf16"), (30.0, "*fp32"),
                                           (30.0, None)])
def test_kernel_compiles_for_hopper_with_vector_accesses(cap, grad_type):
    """The GPU build, checked on any machine: Gemma2's vocabulary (a multiple of 16) gives 128-bit loads of the
    logits in both passes and vector stores of the gradient, and nothing spills to local memory."""
    if K.triton is None or INTERPRETED:
        pytest.skip("needs triton's compiler (not the interpreter)")
    pytest.importorskip("triton.backends.nvidia")
    consts = dict(VOCAB=256000, HAS_CAP=cap is not None, SHIFT_BY_CAP=cap is not None and cap <= K.SHIFT_BY_CAP_MAX,
                  WRITE_GRAD=grad_type is not None, BLOCK=K.MAX_BLOCK)
    ptx = _compile_for_hopper(consts, grad_type or "*fp32")
    assert "ld.global.v4.b32" in ptx
    assert ".local" not in ptx
    if grad_type == "*bf16":
        assert "st.global.v2.b32" in ptx or "st.global.v4.b32" in ptx  # 4 or 8 bf16 per store
    elif grad_type is None:
        assert "st.global.v" not in ptx  # only the row's loss

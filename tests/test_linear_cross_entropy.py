"""Chunked LM head + soft-cap + cross entropy against the materialised reference: loss and both gradients."""

import pytest
import torch

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref


def _inputs(n, h, v, dtype, seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("n,h,v,chunk", [(1, 3, 5, 1), (37, 16, 101, 8), (64, 24, 333, 64), (9, 41, 341, 4)])
@pytest.mark.parametrize("softcap", [None, 3.0])
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
        assert ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item() <= tol


def test_bfloat16_is_within_twice_the_error_of_plain_bfloat16_autograd(seed):
    hidden, weight, labels = _inputs(48, 32, 257, torch.bfloat16, seed)
    exact_h, exact_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = linear_cross_entropy_ref(exact_h, exact_w, labels, 30.0)
    eh, ew = torch.autograd.grad(exact, (exact_h, exact_w))
    ours = linear_cross_entropy(hidden, weight, labels, softcap=30.0, chunk_rows=16)
    oh, ow = torch.autograd.grad(ours, (hidden, weight))
    plain = linear_cross_entropy_ref(hidden, weight, labels, 30.0)
    ph, pw = torch.autograd.grad(plain, (hidden, weight))
    assert abs(ours.double() - exact) <= 2 * abs(plain.double() - exact) + 1e-3 * abs(exact)
    for o, p, e in ((oh, ph, eh), (ow, pw, ew)):
        assert (o.double() - e).abs().max() <= 2 * (p.double() - e).abs().max() + 1e-3 * e.abs().max()


def test_all_ignored_rows_give_zero_loss_and_zero_gradients():
    hidden, weight, labels = _inputs(6, 4, 7, torch.float32, 0)
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels, softcap=2.0, chunk_rows=4)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_batched_leading_shape_and_shape_errors():
    hidden, weight, labels = _inputs(12, 8, 11, torch.float64, 1)
    flat = linear_cross_entropy(hidden, weight, labels)
    batched = linear_cross_entropy(hidden.view(3, 4, 8), weight, labels.view(3, 4))
    assert torch.allclose(flat, batched)
    with pytest.raises(ValueError, match="labels shape"):
        linear_cross_entropy(hidden, weight, labels[:5])

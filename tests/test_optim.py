"""trainer/optim.py: EWCAdamW against the reference study's loss-based EWC, clipping, checkpoints, LR schedules."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from kernels import ewc_adamw_cpp, ewc_adamw_triton
from trainer.errors import UserError
from trainer.optim import EWCAdamW, lr_at, set_lr, warmup_steps_of

BACKENDS = ["torch", "cpp"]


def make_model(dtype=torch.float64):
    # Odd sizes; the last layer has a single output row.
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).to(dtype)


def make_ewc(model, dtype=None):
    fisher = [torch.rand_like(p, dtype=dtype or p.dtype) * 3 for p in model.parameters()]
    anchor = [(p.detach() + 0.5 * torch.randn_like(p)).to(dtype or p.dtype) for p in model.parameters()]
    return fisher, anchor


def make_data(dtype=torch.float64, n=16):
    return torch.randn(n, 7, dtype=dtype), torch.randn(n, 1, dtype=dtype)


def task_loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def reference_study_step(model, opt, x, y, fisher, anchor, lam, max_norm):
    """The reference study's way: the penalty as a Python loop inside the loss, backward, clip the total, AdamW."""
    opt.zero_grad()
    loss = task_loss(model, x, y)
    penalty = 0.0
    for p, f, a in zip(model.parameters(), fisher, anchor):
        penalty = penalty + (lam / 2) * (f * (p - a) ** 2).sum()
    (loss + penalty).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return penalty.detach(), norm


def assert_params_close(a, b, *, rtol, atol=0.0):
    for i, (x, y) in enumerate(zip(a.parameters(), b.parameters())):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol, msg=f"parameter {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping active / inactive
def test_step_equals_reference_study_loss_penalty(seed, backend, max_norm):
    """One (and then two more) steps of EWCAdamW with clip "total" equal torch.optim.AdamW after autograd of
    L_task + (lambda/2) sum F (theta - theta*)^2 and clip_grad_norm_ at the same threshold, in float64."""
    model = make_model()
    ref = copy.deepcopy(model)
    fisher, anchor = make_ewc(model)
    lam = 2.5
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opt = EWCAdamW(model.parameters(), **hyper, ewc_lambda=lam, fisher=fisher, anchor=anchor, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), **hyper)
    x, y = make_data()
    for step in range(3):
        opt.zero_grad()
        task_loss(model, x, y).backward()
        task_norm, total_norm = opt.clip_grad_norm_(max_norm, mode="total")
        opt.step()
        penalty, ref_norm = reference_study_step(ref, ref_opt, x, y, fisher, anchor, lam, max_norm)
        torch.testing.assert_close(total_norm, ref_norm, rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.last_penalty, penalty, rtol=1e-13, atol=0)
        assert_params_close(model, ref, rtol=1e-12, atol=1e-15)
        assert (total_norm > max_norm) == (max_norm == 0.05)
    assert opt.state[next(iter(model.parameters()))]["step"].item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_task_adds_the_ewc_gradient_after_clipping(seed, backend):
    model = make_model()
    fisher, anchor = make_ewc(model)
    lam, max_norm = 1.5, 0.1
    x, y = make_data()
    opt = EWCAdamW(model.parameters(), lr=1e-2, ewc_lambda=lam, fisher=fisher, anchor=anchor, backend=backend)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    task_loss(model, x, y).backward()
    task_norm, total_norm = opt.clip_grad_norm_(max_norm, mode="task")
    assert total_norm is None
    opt.step()

    task_loss(ref, x, y).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    with torch.no_grad():
        ewc_grads = [lam * f * (p - a) for p, f, a in zip(ref.parameters(), fisher, anchor)]
        expected_penalty = sum((lam / 2) * (f * (p - a) ** 2).sum() for p, f, a in zip(ref.parameters(), fisher,
                                                                                          anchor))
        for p, e in zip(ref.parameters(), ewc_grads):
            p.grad += e
    ref_opt.step()
    torch.testing.assert_close(task_norm, ref_norm, rtol=1e-13, atol=0)
    assert task_norm > max_norm  # the clip was active
    assert_params_close(model, ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(opt.last_penalty, expected_penalty, rtol=1e-13, atol=0)
    expected_norm = torch.cat([e.flatten() for e in ewc_grads]).norm()
    torch.testing.assert_close(opt.last_ewc_grad_norm, expected_norm, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoupled_is_adamw_on_the_clipped_task_gradient_then_the_proximal_pull(seed, backend):
    """ewc_mode "decoupled": torch.optim.AdamW on the clipped data gradient, then p = (p + c anchor) / (1 + c) with
    c = lr lambda F (three steps, float64, a different lr each step); the penalty and the EWC-gradient norm are
    those at the pre-step parameters, as in coupled mode."""
    model = make_model()
    fisher, anchor = make_ewc(model)
    lam, max_norm = 40.0, 0.1  # lr * lambda * F up to 1.2: both branches of the pull
    hyper = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    opt = EWCAdamW(model.parameters(), lr=1e-2, **hyper, ewc_lambda=lam, fisher=fisher, anchor=anchor,
                   backend=backend, ewc_mode="decoupled")
    assert opt.ewc_mode == "decoupled"
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, **hyper)
    x, y = make_data()
    for lr in (1e-2, 3e-2, 5e-3):
        set_lr(opt, lr)
        set_lr(ref_opt, lr)
        opt.zero_grad()
        task_loss(model, x, y).backward()
        task_norm, total_norm = opt.clip_grad_norm_(max_norm, mode="task")
        assert total_norm is None
        opt.step()

        ref_opt.zero_grad()
        task_loss(ref, x, y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        with torch.no_grad():
            pre = [p.detach().clone() for p in ref.parameters()]
            ref_opt.step()
            for p, f, a in zip(ref.parameters(), fisher, anchor):
                c = lr * lam * f
                p.copy_((p + c * a) / (1 + c))
        torch.testing.assert_close(task_norm, ref_norm, rtol=1e-13, atol=0)
        assert task_norm > max_norm  # the clip was active
        assert_params_close(model, ref, rtol=1e-12, atol=1e-15)
        penalty = sum((lam / 2) * (f * (p - a) ** 2).sum() for p, f, a in zip(pre, fisher, anchor))
        ewc_norm = torch.cat([(lam * f * (p - a)).flatten() for p, f, a in zip(pre, fisher, anchor)]).norm()
        torch.testing.assert_close(opt.last_penalty, penalty, rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.last_ewc_grad_norm, ewc_norm, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ewc_mode_is_validated_switchable_and_refuses_clip_total(seed, backend):
    model = make_model()
    fisher, anchor = make_ewc(model)
    with pytest.raises(UserError, match="ewc_mode must be one of coupled, decoupled"):
        EWCAdamW(model.parameters(), ewc_mode="proximal")
    opt = EWCAdamW(model.parameters(), lr=1e-2, ewc_lambda=2.0, fisher=fisher, anchor=anchor, backend=backend,
                   ewc_mode="decoupled")
    x, y = make_data()
    task_loss(model, x, y).backward()
    with pytest.raises(UserError, match="clip mode 'total'.*use clip mode 'task'"):
        opt.clip_grad_norm_(1.0, mode="total")
    # set_ewc_state(ewc_mode=) switches the next step (the trainer passes the configured mode there)
    twins = []
    for mode in ("coupled", "decoupled"):
        twin = copy.deepcopy(model)
        for p, q in zip(twin.parameters(), model.parameters()):
            p.grad = q.grad.clone()  # deepcopy leaves .grad behind
        twin_opt = EWCAdamW(twin.parameters(), lr=1e-2, backend=backend)
        twin_opt.set_ewc_state(fisher, anchor, 2.0, ewc_mode=mode)
        twin_opt.step()
        twins.append(twin)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twins[1].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), twins[0].parameters()))
    opt.set_ewc_state(fisher, anchor, ewc_mode="coupled")
    assert opt.ewc_mode == "coupled" and opt.ewc_lambda == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_clipping_and_skipped_step_leave_no_scale(seed, backend):
    """max_norm None/0 measures without clipping; zero_grad drops a scale measured for discarded gradients."""
    model, x, y = make_model(), *make_data()
    ref = copy.deepcopy(model)
    opt = EWCAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    task_loss(model, x, y).backward()
    opt.clip_grad_norm_(1e-3)  # would clip hard, but the step is skipped (say, a NaN guard)
    opt.zero_grad()
    task_loss(model, x, y).backward()
    task_norm, total_norm = opt.clip_grad_norm_(None, mode="total")
    assert total_norm is not None and task_norm > 1e-3
    opt.step()
    task_loss(ref, x, y).backward()
    ref_opt.step()
    assert_params_close(model, ref, rtol=1e-12, atol=1e-15)
    assert opt.last_penalty.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_without_ewc_is_torch_adamw(seed, backend):
    model, x, y = make_model(torch.float32), *make_data(torch.float32)
    ref = copy.deepcopy(model)
    opt = EWCAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            task_loss(m, x, y).backward()
            o.step()
    assert_params_close(model, ref, rtol=1e-6, atol=1e-7)


def run_training(model, opt, data, steps, max_norm=0.5, mode="total"):
    for x, y in data[:steps]:
        opt.zero_grad()
        task_loss(model, x, y).backward()
        opt.clip_grad_norm_(max_norm, mode=mode)
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ewc_mode", ["coupled", "decoupled"])
def test_checkpoint_roundtrip_continues_like_an_uninterrupted_run(seed, backend, ewc_mode):
    torch.manual_seed(seed)
    model = make_model(torch.float32)
    fisher, anchor = make_ewc(model, torch.bfloat16)
    data = [make_data(torch.float32) for _ in range(5)]
    make_opt = lambda m: EWCAdamW(m.parameters(), lr=1e-2, weight_decay=0.01, ewc_lambda=0.8,  # noqa: E731
                                  fisher=fisher, anchor=anchor, backend=backend, ewc_mode=ewc_mode)
    clip = "total" if ewc_mode == "coupled" else "task"
    straight = copy.deepcopy(model)
    straight_opt = make_opt(straight)
    run_training(straight, straight_opt, data, 5, mode=clip)

    first = copy.deepcopy(model)
    first_opt = make_opt(first)
    run_training(first, first_opt, data, 2, mode=clip)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, buf)
    saved = first_opt.state_dict()
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # F and anchor are not optimizer state
    assert saved["state"][0]["step"].item() == 2

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_model(torch.float32)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = EWCAdamW(resumed.parameters(), lr=1e-2, weight_decay=0.01, backend=backend)
    resumed_opt.load_state_dict(ckpt["optim"])
    # the trainer loads the EWC file (and sets lambda and the mode) after building the optimizer
    resumed_opt.set_ewc_state(fisher, anchor, 0.8, ewc_mode=ewc_mode)
    run_training(resumed, resumed_opt, data[2:], 3, mode=clip)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    assert resumed_opt.state[next(iter(resumed.parameters()))]["step"].item() == 5


def test_param_groups_and_parameters_without_grad(seed):
    a, b, c = (torch.nn.Parameter(torch.randn(s)) for s in ((3, 4), (5,), (2,)))
    fisher = [torch.rand(3, 4), None, torch.rand(2)]
    anchor = [torch.randn(3, 4), None, torch.randn(2)]
    opt = EWCAdamW([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=1e-2, ewc_lambda=1.0, fisher=fisher,
                   anchor=anchor, backend="cpp")
    c_before = c.detach().clone()
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a_before = a.detach().clone()
    opt.step()
    assert torch.equal(c, c_before) and c not in opt.state  # no grad: skipped, like torch.optim.AdamW
    assert not torch.equal(a, a_before)
    expected = 0.5 * (fisher[0] * (a_before - anchor[0]) ** 2).sum()
    torch.testing.assert_close(opt.last_penalty, expected.double(), rtol=1e-6, atol=0)


def test_set_ewc_state_rejects_bad_tensors():
    model = make_model(torch.float32)
    params = list(model.parameters())
    opt = EWCAdamW(model.parameters(), lr=1e-3)
    good_f = [torch.rand_like(p) for p in params]
    good_a = [p.detach().clone() for p in params]
    with pytest.raises(UserError, match="fisher and 6 anchor tensors for 6 parameters"):
        opt.set_ewc_state(good_f[:-1], good_a)
    with pytest.raises(UserError, match=r"parameter 2: fisher has shape \(13, 5\), the parameter's local shard "
                                        r"\(5, 13\)"):
        opt.set_ewc_state(good_f[:2] + [good_f[2].t().contiguous()] + good_f[3:], good_a)
    with pytest.raises(UserError, match="parameter 0: anchor is float16"):
        opt.set_ewc_state(good_f, [good_a[0].half()] + good_a[1:])
    with pytest.raises(UserError, match="parameter 0: fisher is not contiguous"):
        opt.set_ewc_state([torch.rand(7, 13).t()] + good_f[1:], good_a)
    with pytest.raises(UserError, match="parameter 1: EWC state needs both"):
        opt.set_ewc_state(good_f[:1] + [None] + good_f[2:], good_a)
    with pytest.raises(UserError, match="ewc_lambda"):
        opt.set_ewc_state(good_f, good_a, -1.0)
    with pytest.raises(UserError, match="backend"):
        EWCAdamW(model.parameters(), backend="cuda")
    opt.set_ewc_state(good_f, good_a, 1.0)
    opt.set_ewc_state(None, None)
    assert opt.ewc_lambda == 1.0 and not opt._ewc


def test_ewc_mapping_is_the_same_state_as_positional_lists(seed):
    """ewc={parameter: (fisher, anchor)} (what load_ewc(path, model) returns) steps exactly like the lists, in any
    key order; a parameter left out has no EWC, and a key that is not a parameter of the optimizer is refused."""
    model = make_model(torch.float32)
    fisher, anchor = make_ewc(model)
    x, y = make_data(torch.float32)
    twin = copy.deepcopy(model)
    by_list = EWCAdamW(model.parameters(), lr=1e-2, ewc_lambda=0.5, fisher=fisher, anchor=anchor)
    mapping = dict(reversed(list(zip(twin.parameters(), zip(fisher, anchor)))))
    by_map = EWCAdamW(twin.parameters(), lr=1e-2, ewc_lambda=0.5, ewc=mapping)
    for _ in range(3):
        for m, opt in ((model, by_list), (twin, by_map)):
            opt.zero_grad()
            task_loss(m, x, y).backward()
            opt.step()
        assert by_list.last_penalty.item() == by_map.last_penalty.item()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    first = next(twin.parameters())
    by_map.set_ewc_state(ewc={first: mapping[first]})
    assert list(by_map._ewc) == [first]
    with pytest.raises(UserError, match="not a parameter of this optimizer"):
        by_map.set_ewc_state(ewc={torch.zeros(3): (torch.zeros(3), torch.zeros(3))})
    with pytest.raises(UserError, match="not both"):
        by_map.set_ewc_state(fisher, anchor, ewc=mapping)


def test_non_contiguous_parameter_rejected():
    p = torch.nn.Parameter(torch.randn(4, 6).t())
    p.grad = torch.randn(6, 4)
    with pytest.raises(UserError, match="not contiguous"):
        EWCAdamW([p], lr=1e-3, backend="torch").step()


def test_backend_resolution():
    opt = EWCAdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    assert opt.backend == ("cpp" if ewc_adamw_cpp.extension() is not None else "torch")
    assert EWCAdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3, backend="torch").backend == "torch"
    if not ewc_adamw_triton.interpreted() and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            EWCAdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3, backend="triton").backend


# ----------------------------------------------------------------------------------------------- LR schedules


def test_lr_schedules():
    kw = dict(base_lr=1.0, total_steps=101)
    assert [lr_at(s, schedule="constant", warmup=4, **kw) for s in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # warm-up as a fraction of the steps (0.1 * 101 -> 10 steps) or a count
    assert warmup_steps_of(0.1, 101) == 10 and warmup_steps_of(10, 101) == 10 and warmup_steps_of(10.0, 7) == 10
    assert lr_at(9, schedule="cosine", warmup=0.1, **kw) == 1.0
    assert lr_at(10, schedule="cosine", warmup=10, **kw) == 1.0
    # decay reaches min_lr_ratio at the last step and stays there
    for schedule in ("linear", "cosine"):
        assert lr_at(100, schedule=schedule, warmup=10, min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
        assert lr_at(500, schedule=schedule, warmup=10, min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    # midpoint of the decay: linear 0.5 and cosine 0.5 of the range above the floor
    assert lr_at(55, schedule="linear", warmup=10, **kw) == pytest.approx(0.5)
    assert lr_at(55, schedule="cosine", warmup=10, min_lr_ratio=0.2, **kw) == pytest.approx(0.6)
    assert lr_at(30, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    lrs = [lr_at(s, schedule="cosine", warmup=5, **kw) for s in range(101)]
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6])) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lr_at(0, base_lr=3e-4, total_steps=1, schedule="cosine") == 3e-4
    assert lr_at(3, base_lr=1.0, total_steps=4, warmup=3, schedule="linear", min_lr_ratio=0.5) == 1.0
    for bad in (dict(schedule="step"), dict(warmup=-1), dict(warmup=1.5), dict(min_lr_ratio=2.0)):
        with pytest.raises(UserError):
            lr_at(0, **{**kw, **bad})
    opt = EWCAdamW([torch.nn.Parameter(torch.randn(2))], lr=1.0)
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] == 0.25


def bucket_drift_ref(params, fisher, anchor, buckets, n):
    """float64 [n, 2]: per bucket, sum F (p - a)^2 and sum (p - a)^2 over its parameters with EWC state."""
    out = torch.zeros((n, 2), dtype=torch.float64)
    for p, f, a in zip(params, fisher, anchor):
        if p in buckets and f is not None:
            d = p.detach().double() - a.double()
            out[buckets[p], 0] += (f.double() * d * d).sum()
            out[buckets[p], 1] += (d * d).sum()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ewc_mode", ["coupled", "decoupled"])
@pytest.mark.parametrize("dtype,ewc_dtype", [(torch.float64, None), (torch.float32, torch.bfloat16)])
def test_drift_per_bucket_equals_the_reference_at_the_pre_step_parameters(seed, backend, ewc_mode, dtype, ewc_dtype):
    model = make_model(dtype)
    params = list(model.parameters())
    fisher, anchor = make_ewc(model, ewc_dtype)
    fisher[3] = anchor[3] = None  # a bucketed parameter without EWC state adds nothing
    # the last bias is in no bucket; bucket "b" holds two layers
    buckets = {params[0]: 0, params[1]: 0, params[2]: 1, params[3]: 1, params[4]: 1}
    opt = EWCAdamW(model.parameters(), lr=1e-2, ewc_lambda=1.3, fisher=fisher, anchor=anchor, backend=backend,
                   ewc_mode=ewc_mode)
    assert opt.last_drift is None
    opt.set_drift_buckets(buckets, ["a", "b"])
    assert opt.drift_bucket_names == ["a", "b"]
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for step in range(4):
        x, y = make_data(dtype)
        opt.zero_grad()
        task_loss(model, x, y).backward()
        if step == 1:  # a parameter without a gradient: its step count falls behind (one kernel call per count)
            params[2].grad = None
        expected = bucket_drift_ref([p if p.grad is not None else None for p in params], fisher, anchor, buckets, 2)
        penalty = sum((1.3 / 2) * (f.to(dtype) * (p.detach() - a.to(dtype)) ** 2).sum().item()
                      for p, f, a in zip(params, fisher, anchor) if f is not None and p.grad is not None)
        opt.step()
        drift = opt.last_drift
        assert drift.dtype == torch.float64 and drift.shape == (2, 2)
        torch.testing.assert_close(drift, expected, rtol=rtol, atol=0.0, msg=f"step {step}")
        assert opt.last_penalty.item() == pytest.approx(penalty, rel=rtol * 10)
    opt.set_drift_buckets({}, [])
    opt.zero_grad()
    task_loss(model, *make_data(dtype)).backward()
    opt.step()
    assert opt.last_drift is None


def test_drift_is_none_without_ewc_and_bad_buckets_are_refused(seed):
    model = make_model()
    params = list(model.parameters())
    fisher, anchor = make_ewc(model)
    opt = EWCAdamW(model.parameters(), lr=1e-2, ewc_lambda=0.0, fisher=fisher, anchor=anchor, backend="torch")
    opt.set_drift_buckets({p: 0 for p in params}, ["all"])
    task_loss(model, *make_data()).backward()
    opt.step()
    assert opt.last_drift is None  # lambda 0: no EWC group runs, no drift to report
    with pytest.raises(UserError, match="not an index"):
        opt.set_drift_buckets({params[0]: 1}, ["all"])
    with pytest.raises(UserError, match="not a parameter"):
        opt.set_drift_buckets({torch.zeros(3): 0}, ["all"])

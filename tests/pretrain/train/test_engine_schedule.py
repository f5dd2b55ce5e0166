"""The learning-rate schedule against its closed form: linear warm-up from step 1 (lr > 0),
cosine decay to lr * min_lr_ratio at the horizon; fitted to a time budget, never past max_steps."""
import math

import numpy as np
import pytest
import torch

from pretrain.train.engine import WarmupCosine


def closed_form(step, lr, total, warmup, min_ratio):
    if step <= warmup:
        return lr * step / warmup
    t = min(step, total)
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2)


def lrs_of(schedule, lr, n_steps):
    """The learning rate each optimizer step k = 1..n_steps runs at, through torch's LambdaLR."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    out = []
    for _ in range(n_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        lambda_lr.step()
    return out, lambda_lr


def test_schedule_matches_the_closed_form_and_starts_above_zero():
    rng = np.random.default_rng()
    for _ in range(20):
        total = int(rng.integers(10, 400))
        warmup = int(rng.integers(1, total))
        min_ratio, lr = float(rng.uniform(0, 0.5)), float(rng.uniform(1e-4, 1e-2))
        got, _ = lrs_of(WarmupCosine(total, warmup, min_ratio), lr, total + 5)
        expected = [closed_form(k, lr, total, warmup, min_ratio) for k in range(1, total + 6)]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert got[0] > 0
        assert got[total - 1] == pytest.approx(lr * min_ratio) and got[warmup - 1] == pytest.approx(lr)


def test_fitted_to_a_budget_it_ends_at_the_estimate_and_never_past_max_steps():
    rng = np.random.default_rng()
    for _ in range(20):
        max_steps = int(rng.integers(200, 3000))
        warmup = int(rng.integers(10, 100))
        estimate = int(rng.integers(20, max_steps // 2))
        taken = int(rng.integers(1, 8))
        min_ratio, lr = float(rng.uniform(0, 0.5)), 1e-3
        schedule = WarmupCosine(max_steps, warmup, min_ratio)
        before, lambda_lr = lrs_of(schedule, lr, taken)
        schedule.fit(estimate, max_steps, taken)
        fitted_warmup = min(warmup, max(taken, round(warmup * estimate / max_steps)))
        assert (schedule.total, schedule.warmup) == (estimate, fitted_warmup)
        after = []
        for _ in range(estimate - taken):  # steps taken + 1 .. estimate on the fitted schedule
            after.append(lambda_lr.optimizer.param_groups[0]["lr"])
            lambda_lr.optimizer.step()
            lambda_lr.step()
        # LambdaLR set step taken+1's lr when step `taken` ended, before the fit; the fitted
        # schedule runs from the step after.
        expected = ([closed_form(taken + 1, lr, max_steps, warmup, min_ratio)]
                    + [closed_form(k, lr, estimate, fitted_warmup, min_ratio) for k in range(taken + 2, estimate + 1)])
        assert after == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert after[-1] == pytest.approx(lr * min_ratio)  # fully decayed when the budget ends
        # the fitted parameters travel in the LambdaLR state (a resumed run keeps them)
        state = lambda_lr.state_dict()
        again = WarmupCosine(max_steps, warmup, min_ratio)
        other = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), again)
        other.load_state_dict(state)
        assert (again.total, again.warmup) == (estimate, fitted_warmup)
    schedule = WarmupCosine(100, 10, 0.1)
    schedule.fit(500, 100, 5)  # an estimate past max_steps stops at max_steps
    assert schedule.total == 100 and schedule.warmup == 10

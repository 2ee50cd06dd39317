"""Loss modules and ramp-up schedules."""

from __future__ import annotations

import math

import pytest
import torch

from odmt_components import DebiasedInBatchLoss, MutualDistillationLoss, RampUpSchedule, ops, sigmoid_rampup
from odmt_components.kernels.reference import BRANCHES


def test_sigmoid_rampup_end_points():
    assert sigmoid_rampup(0, 20) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 20) == 1.0
    assert sigmoid_rampup(35, 20) == 1.0
    assert sigmoid_rampup(-3, 20) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(10, 20) == pytest.approx(math.exp(-5 * 0.25))
    values = [sigmoid_rampup(e, 20) for e in range(0, 21)]
    assert values == sorted(values)
    assert sigmoid_rampup(3, 0.5) == 1.0  # alpha < 1: constant weight, as in the reference code


def test_per_step_schedule_matches_per_epoch_at_epoch_ends():
    schedule = RampUpSchedule(alpha=4, steps_per_epoch=10, max_weight=2.0)
    for epoch in range(1, 7):
        assert schedule(epoch * 10) == pytest.approx(2.0 * sigmoid_rampup(epoch, 4))
    assert schedule(5) < schedule(6) < schedule(10)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        RampUpSchedule(alpha=4, steps_per_epoch=0)


def _problem():
    g = torch.Generator().manual_seed(3)
    queries = {m: torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for m in BRANCHES}
    candidates = {m: torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True) for m in BRANCHES}
    candidate_ids = torch.tensor([1, 2, 3, 1, 0, 5, 6])
    target = torch.tensor([0, 1, 2, -100, 5, 6])
    exclude_ids = torch.tensor([[1, 2, 0]]).expand(6, 3)
    log_q = torch.rand(7, generator=g, dtype=torch.float64).log()
    return queries, candidates, target, candidate_ids, exclude_ids, log_q


def test_debiased_loss_module_equals_op():
    queries, candidates, target, candidate_ids, exclude_ids, log_q = _problem()
    module = DebiasedInBatchLoss(reduction="sum")
    value = module(queries["id"], candidates["id"], target, candidate_ids, exclude_ids, log_q)
    expected = ops.debiased_inbatch_cross_entropy(
        queries["id"], candidates["id"], target, candidate_ids, exclude_ids=exclude_ids, log_q=log_q, reduction="sum"
    )
    torch.testing.assert_close(value, expected)
    with pytest.raises(ValueError, match="reduction"):
        DebiasedInBatchLoss(reduction="max")


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_distillation_module_combines_ce_and_weighted_kl(weight):
    problem = _problem()
    module = MutualDistillationLoss(temperature=0.4, form="ce", detach_teacher=False)
    loss, parts = module(*problem, weight=weight)
    torch.testing.assert_close(loss, parts.ce + weight * parts.kl)
    expected = ops.mutual_distillation_loss(
        *problem[:4], exclude_ids=problem[4], log_q=problem[5], temperature=0.4, form="ce", detach_teacher=False
    )
    torch.testing.assert_close(parts.kl, expected.kl)
    with pytest.raises(ValueError, match="temperature"):
        MutualDistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        MutualDistillationLoss(temperature=float("inf"))
    with pytest.raises(ValueError, match="backend must be one of"):
        MutualDistillationLoss(backend="Triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        DebiasedInBatchLoss(backend="gpu")

"""Loss modules and ramp-up schedules of ODMT (SPEC sections 3 and 4).

:class:`DebiasedInBatchLoss` and :class:`MutualDistillationLoss` are thin ``nn.Module``
wrappers over :mod:`odmt_components.ops`: they hold the settings, the ops pick the fused
Triton kernel for CUDA tensors and the PyTorch definition elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from . import ops
from .kernels.reference import DistillationLosses

__all__ = [
    "DebiasedInBatchLoss",
    "DistillationLosses",
    "MutualDistillationLoss",
    "RampUpSchedule",
    "sigmoid_rampup",
]


def sigmoid_rampup(epoch: float, alpha: float) -> float:
    """Laine & Aila's ramp-up ``exp(-5 (1 - clip(epoch, 0, alpha) / alpha)^2)``.

    ``epoch`` is 1-based (the weight used while training epoch ``epoch``; fractional values
    give a per-step ramp), ``alpha`` the ramp length in epochs. As in the reference code,
    ``alpha < 1`` means no ramp: the weight is constant 1. The weight reaches 1 at
    ``epoch >= alpha`` and is ``exp(-5)`` at ``epoch = 0``.
    """
    if alpha < 1.0:
        return 1.0
    progress = min(max(float(epoch), 0.0), alpha) / alpha
    return math.exp(-5.0 * (1.0 - progress) ** 2)


class RampUpSchedule:
    """Per-step distillation weight ``max_weight * sigmoid_rampup(step / steps_per_epoch, alpha)``.

    ``step`` counts optimizer steps from 1, so the weight at the last step of epoch ``e``
    equals the per-epoch weight of epoch ``e``, and it rises smoothly in between.
    """

    def __init__(self, alpha: float, steps_per_epoch: int, max_weight: float = 1.0) -> None:
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        if alpha < 0:
            raise ValueError(f"alpha (ramp length in epochs) must be >= 0, got {alpha}")
        self.alpha = alpha
        self.steps_per_epoch = steps_per_epoch
        self.max_weight = max_weight

    def __call__(self, step: int) -> float:
        return self.max_weight * sigmoid_rampup(step / self.steps_per_epoch, self.alpha)

    def __repr__(self) -> str:
        return (
            f"RampUpSchedule(alpha={self.alpha}, steps_per_epoch={self.steps_per_epoch}, max_weight={self.max_weight})"
        )


class DebiasedInBatchLoss(nn.Module):
    """In-batch softmax CE with logQ correction and false-negative exclusion (Eqs. 5-6).

    See :func:`odmt_components.ops.debiased_inbatch_cross_entropy` for the arguments of
    ``forward``; the constructor fixes ``pad_id``, ``ignore_index``, ``reduction`` and the
    ``backend``.
    """

    def __init__(self, *, pad_id: int = 0, ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.pad_id, self.ignore_index, self.reduction = pad_id, ignore_index, reduction
        self.backend = ops.check_backend(backend)

    def forward(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        target: torch.Tensor,
        candidate_ids: torch.Tensor,
        exclude_ids: torch.Tensor | None = None,
        log_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.debiased_inbatch_cross_entropy(
            queries,
            candidates,
            target,
            candidate_ids,
            exclude_ids=exclude_ids,
            log_q=log_q,
            pad_id=self.pad_id,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"pad_id={self.pad_id}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class MutualDistillationLoss(nn.Module):
    """ODMT's objective ``L = L_ce + w * L_kl`` over the ID, text and image branches (Eqs. 7-10).

    Args:
        temperature: distillation temperature ``T`` (paper: 0.3 to 0.5).
        detach_teacher: stop gradients at the teachers (paper). ``False`` with
            ``form="ce"`` reproduces the reference code.
        form: ``"kl"`` (paper) or ``"ce"`` (reference code's cross-entropy form).

    ``forward(..., weight=w)`` returns ``(loss, parts)`` where ``loss = parts.ce + w *
    parts.kl`` and ``parts`` is a :class:`DistillationLosses`. Pass the ramp-up weight of
    :func:`sigmoid_rampup` or :class:`RampUpSchedule` as ``w``; with ``w == 0`` the
    distillation terms are still reported but do not train.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.5,
        detach_teacher: bool = True,
        form: str = "kl",
        pad_id: int = 0,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if form not in ("kl", "ce"):
            raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
        self.temperature, self.detach_teacher, self.form = temperature, detach_teacher, form
        self.pad_id, self.ignore_index, self.backend = pad_id, ignore_index, ops.check_backend(backend)

    def forward(
        self,
        queries: Mapping[str, torch.Tensor],
        candidates: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        candidate_ids: torch.Tensor,
        exclude_ids: torch.Tensor | None = None,
        log_q: torch.Tensor | None = None,
        *,
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, DistillationLosses]:
        parts = ops.mutual_distillation_loss(
            queries,
            candidates,
            target,
            candidate_ids,
            exclude_ids=exclude_ids,
            log_q=log_q,
            temperature=self.temperature,
            detach_teacher=self.detach_teacher,
            form=self.form,
            pad_id=self.pad_id,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )
        return parts.ce + weight * parts.kl, parts

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, detach_teacher={self.detach_teacher}, form={self.form!r}"

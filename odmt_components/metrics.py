"""Full-ranking evaluation metrics: Recall@K and NDCG@K with the history removed.

Protocol (SPEC section 6): each user has one target item and is scored against every item
(column ``i`` of ``scores`` = item ``i``; column 0 is the padding item and is never ranked).
The user's history items are removed from the ranking, except the target itself (a target
that also occurs in the history stays rankable; the reference code removes it, which makes
it an unavoidable miss). The target's rank is::

    rank = 1 + #{ranked items scoring strictly higher} + #{other ranked items scoring equal}

(pessimistic ties: a constant scorer never gets credit). Then ``Recall@K = [rank <= K]``
(one target, so equal to HR@K) and ``NDCG@K = [rank <= K] / log2(rank + 1)``, averaged over
users. Everything is vectorised over users (no Python loop per user).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops

__all__ = ["target_ranks", "full_ranking_metrics", "metrics_from_ranks", "RankingAccumulator"]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def target_ranks(
    scores: torch.Tensor, target_ids: torch.Tensor, history_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each user's target among all items, history removed; ``(U,)`` int64.

    Args:
        scores: ``(U, n_items + 1)`` float scores; column 0 (padding item) is never ranked.
            NaN is rejected.
        target_ids: ``(U,)`` integer item ids in ``1..n_items``.
        history_ids: ``(U, H)`` integer item ids in ``0..n_items`` (0 = padding), removed from
            the ranking except the target itself; ``None`` or ``H = 0``: nothing removed.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(
            "scores must be a floating (U, n_items + 1) tensor, got "
            + (f"{tuple(scores.shape)} {scores.dtype}" if isinstance(scores, torch.Tensor)
               else type(scores).__name__)
        )
    n_users, n_cols = scores.shape
    if n_users == 0:
        raise ValueError("scores is empty: need at least one user (U >= 1)")
    if n_cols < 2:
        raise ValueError(f"scores must have n_items + 1 >= 2 columns, got {n_cols}")
    if (
        not isinstance(target_ids, torch.Tensor)
        or target_ids.shape != (n_users,)
        or target_ids.is_floating_point()
        or target_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"target_ids must be an integer tensor of shape (U,) = ({n_users},), got "
            + (f"{tuple(target_ids.shape)} {target_ids.dtype}"
               if isinstance(target_ids, torch.Tensor) else type(target_ids).__name__)
        )
    if target_ids.device != scores.device:
        raise ValueError(f"target_ids on {target_ids.device} but scores on {scores.device}")
    target_ids = target_ids.long()
    ranked = torch.ones_like(scores, dtype=torch.bool)
    ranked[:, 0] = False
    if history_ids is not None:
        if (
            not isinstance(history_ids, torch.Tensor)
            or history_ids.ndim != 2
            or history_ids.shape[0] != n_users
            or history_ids.is_floating_point()
            or history_ids.dtype == torch.bool
        ):
            raise ValueError(
                f"history_ids must be an integer tensor of shape (U, H) = ({n_users}, H), got "
                + (f"{tuple(history_ids.shape)} {history_ids.dtype}"
                   if isinstance(history_ids, torch.Tensor) else type(history_ids).__name__)
            )
        if history_ids.device != scores.device:
            raise ValueError(f"history_ids on {history_ids.device} but scores on {scores.device}")

    def value_checks() -> list[tuple[torch.Tensor, str]]:  # one transfer for all (ops.set_value_checks)
        outside_targets = ((target_ids < 1) | (target_ids >= n_cols)).any()
        checks = [
            (outside_targets, f"target_ids must be item ids in 1..n_items = 1..{n_cols - 1}"),
            (torch.isnan(scores).any(), "scores hold NaN"),
        ]
        if history_ids is not None and history_ids.numel():
            outside = ((history_ids < 0) | (history_ids >= n_cols)).any()
            checks.append((outside, f"history_ids must be in 0..n_items = 0..{n_cols - 1} (0 = padding)"))
        return checks

    ops._check_values(value_checks)
    if history_ids is not None and history_ids.numel():
        ranked.scatter_(1, history_ids.long(), False)
    rows = torch.arange(n_users, device=scores.device)
    ranked[rows, target_ids] = True
    target_score = scores[rows, target_ids][:, None]
    # Ranked items scoring >= the target, the target itself included: that count is
    # 1 + #higher + #other equal, the pessimistic rank.
    return ((scores >= target_score) & ranked).sum(1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """``{"recall@K": ..., "ndcg@K": ...}`` averaged over the 1-based ``ranks``."""
    ks = _check_ks(ks)
    sums = _rank_sums(ranks, ks)
    n = ranks.numel()
    return {key: float(value) / n for key, value in sums.items()}


def _rank_sums(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    ranks = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(ranks + 1.0)
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"recall@{k}"] = hit.sum(dtype=torch.float64)
        out[f"ndcg@{k}"] = (gain * hit).sum()
    return out


def full_ranking_metrics(
    scores: torch.Tensor,
    target_ids: torch.Tensor,
    history_ids: torch.Tensor | None,
    ks: Sequence[int] = (10, 20),
) -> dict[str, float]:
    """Recall@K and NDCG@K averaged over users, full ranking with history removed.

    Shapes as in :func:`target_ranks`. Returns keys ``"recall@K"`` and ``"ndcg@K"`` for each
    ``K`` in ``ks`` (in that order), as Python floats.
    """
    ks = _check_ks(ks)
    return metrics_from_ranks(target_ranks(scores, target_ids, history_ids), ks)


class RankingAccumulator:
    """Sums Recall@K / NDCG@K over evaluation batches; ``compute()`` gives the averages.

    The sums stay on the scores' device in float64; the result of ``compute()`` equals
    :func:`full_ranking_metrics` on the concatenated batches. The input value checks of
    :func:`target_ranks` read one verdict back a batch; with them off
    (:func:`~odmt_components.ops.set_value_checks`) nothing waits for the device until
    ``compute()``.
    """

    def __init__(self, ks: Sequence[int] = (10, 20)) -> None:
        self.ks = _check_ks(ks)
        self.reset()

    def reset(self) -> None:
        """Forget every batch added so far."""
        self._sums: dict[str, torch.Tensor] | None = None
        self.count = 0

    def add(
        self,
        scores: torch.Tensor,
        target_ids: torch.Tensor,
        history_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rank one batch (see :func:`target_ranks`) and add it; returns its ``(U,)`` ranks."""
        ranks = target_ranks(scores, target_ids, history_ids)
        sums = _rank_sums(ranks, self.ks)
        if self._sums is None:
            self._sums = sums
        else:
            for key, value in sums.items():
                self._sums[key] = self._sums[key].to(value.device) + value
        self.count += ranks.numel()
        return ranks

    def compute(self) -> dict[str, float]:
        """Averages over all users added since the last :meth:`reset`."""
        if self._sums is None or self.count == 0:
            raise ValueError("RankingAccumulator.compute() called before any add()")
        return {key: float(value) / self.count for key, value in self._sums.items()}

    def __repr__(self) -> str:
        return f"RankingAccumulator(ks={self.ks}, count={self.count})"


"""Tests of odmt_components.metrics on hand-made rankings and against a per-user loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from odmt_components import ops
from odmt_components.metrics import (
    RankingAccumulator,
    full_ranking_metrics,
    metrics_from_ranks,
    target_ranks,
)


def _slow_rank(scores, target, history):
    """Rank by the literal definition, one user at a time."""
    removed = {int(h) for h in history} - {int(target)}
    ts = float(scores[target])
    rank = 1
    for item in range(1, scores.shape[0]):
        if item == target or item in removed:
            continue
        if float(scores[item]) >= ts:
            rank += 1
    return rank


def test_hand_made_rankings():
    # Items 1..5. User 0: target 3, history {1} removed -> only item 2 ahead -> rank 2.
    # User 1: target 5 has the top score but column 0 (padding) scores higher: ignored -> 1.
    # User 2: all scores equal -> pessimistic rank 5.
    scores = torch.tensor(
        [
            [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],
            [99.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    target = torch.tensor([3, 5, 2])
    history = torch.tensor([[1, 0], [0, 0], [0, 0]])
    assert target_ranks(scores, target, history).tolist() == [2, 1, 5]
    out = full_ranking_metrics(scores, target, history, ks=(1, 2, 5))
    assert list(out) == ["recall@1", "ndcg@1", "recall@2", "ndcg@2", "recall@5", "ndcg@5"]
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["ndcg@1"] == pytest.approx(1 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert out["recall@5"] == pytest.approx(1.0)
    assert out["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(6)) / 3)
    # Without history removal user 0's target falls to rank 3.
    assert target_ranks(scores, target, None)[0] == 3


def test_history_removal_and_target_in_history_kept():
    scores = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]])
    # Items 1 and 2 are history; the target 3 is in the history too but stays ranked.
    history = torch.tensor([[1, 2, 3, 0]])
    assert target_ranks(scores, torch.tensor([3]), history).tolist() == [1]
    # Target 4: history items 1, 2, 3 are removed, so it is first.
    assert target_ranks(scores, torch.tensor([4]), history).tolist() == [1]
    # Empty history (H = 0) removes nothing.
    assert target_ranks(scores, torch.tensor([4]), torch.zeros(1, 0, dtype=torch.long)).tolist() == [4]


def test_ties_are_pessimistic_and_default_ks():
    scores = torch.zeros(2, 31)
    scores[1, 7] = 1.0
    out = full_ranking_metrics(scores, torch.tensor([7, 7]), torch.zeros(2, 1, dtype=torch.long))
    assert set(out) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
    assert out["recall@20"] == 0.5 and out["ndcg@10"] == 0.5  # user 0 at rank 30, user 1 at 1


@given(
    n_users=st.integers(1, 6),
    n_items=st.integers(1, 12),
    n_history=st.integers(0, 5),
    levels=st.integers(2, 5),
    seed=st.integers(0, 1000),
)
def test_matches_per_user_loop(n_users, n_items, n_history, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    # Few distinct score levels force many ties.
    scores = torch.randint(0, levels, (n_users, n_items + 1), generator=gen).double()
    target = torch.randint(1, n_items + 1, (n_users,), generator=gen)
    history = torch.randint(0, n_items + 1, (n_users, n_history), generator=gen)
    ranks = target_ranks(scores, target, history)
    expected = [_slow_rank(scores[u], target[u], history[u]) for u in range(n_users)]
    assert ranks.tolist() == expected
    out = full_ranking_metrics(scores, target, history, ks=(1, 3))
    for k in (1, 3):
        assert out[f"recall@{k}"] == pytest.approx(sum(r <= k for r in expected) / n_users)
        assert out[f"ndcg@{k}"] == pytest.approx(
            sum(1 / math.log2(r + 1) for r in expected if r <= k) / n_users
        )


def test_accumulator_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(23, 41, generator=gen)
    target = torch.randint(1, 41, (23,), generator=gen)
    history = torch.randint(0, 41, (23, 6), generator=gen)
    one_shot = full_ranking_metrics(scores, target, history, ks=(5, 10))
    acc = RankingAccumulator(ks=(5, 10))
    for start in range(0, 23, 7):
        acc.add(scores[start : start + 7], target[start : start + 7], history[start : start + 7])
    assert acc.count == 23
    batched = acc.compute()
    assert batched.keys() == one_shot.keys()
    for key in one_shot:
        assert batched[key] == pytest.approx(one_shot[key], abs=1e-12)
    assert metrics_from_ranks(target_ranks(scores, target, history), (5, 10)) == one_shot
    acc.reset()
    with pytest.raises(ValueError, match="before any add"):
        acc.compute()


def test_bad_input():
    scores = torch.zeros(2, 5)
    target = torch.tensor([1, 2])
    history = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"scores must be a floating \(U, n_items \+ 1\)"):
        full_ranking_metrics(scores[0], target, history)
    with pytest.raises(ValueError, match=r"scores must be a floating"):
        full_ranking_metrics(scores.long(), target, history)
    with pytest.raises(ValueError, match=r"scores is empty"):
        full_ranking_metrics(scores[:0], target[:0], history[:0])
    with pytest.raises(ValueError, match=r"target_ids must be an integer tensor of shape \(U,\) = \(2,\)"):
        full_ranking_metrics(scores, target[:1], history)
    with pytest.raises(ValueError, match=r"target_ids must be an integer"):
        full_ranking_metrics(scores, target.float(), history)
    with pytest.raises(ValueError, match=r"target_ids must be item ids in 1..n_items = 1..4"):
        full_ranking_metrics(scores, torch.tensor([0, 2]), history)
    with pytest.raises(ValueError, match=r"target_ids must be item ids"):
        full_ranking_metrics(scores, torch.tensor([5, 2]), history)
    with pytest.raises(ValueError, match=r"history_ids must be an integer tensor of shape \(U, H\) = \(2, H\)"):
        full_ranking_metrics(scores, target, history[:1])
    with pytest.raises(ValueError, match=r"history_ids must be in 0..n_items = 0..4"):
        full_ranking_metrics(scores, target, history + 5)
    with pytest.raises(ValueError, match=r"scores hold NaN"):
        full_ranking_metrics(torch.full((2, 5), float("nan")), target, history)
    with pytest.raises(ValueError, match=r"ks must be a non-empty sequence of positive ints"):
        full_ranking_metrics(scores, target, history, ks=(0,))
    with pytest.raises(ValueError, match=r"ks must be"):
        RankingAccumulator(ks=())


def test_accumulating_a_batch_reads_back_one_verdict_or_nothing(host_reads):
    """The accumulator's sums stay on the device; the input checks read one verdict a batch,
    and nothing with the value checks off."""
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(4, 9, generator=g), torch.tensor([1, 3, 8, 2])
    history = torch.tensor([[0, 2], [1, 4], [5, 6], [0, 0]])
    accumulator = RankingAccumulator(ks=(2, 5))
    assert host_reads(lambda: accumulator.add(scores, targets, history)) == ["Tensor.tolist"]
    ops.set_value_checks(False)
    try:
        assert host_reads(lambda: accumulator.add(scores, targets, history)) == []
    finally:
        ops.set_value_checks(True)
    both = full_ranking_metrics(torch.cat([scores] * 2), torch.cat([targets] * 2), torch.cat([history] * 2), (2, 5))
    assert accumulator.compute() == pytest.approx(both)

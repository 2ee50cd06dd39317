"""A small, reusable training loop for sequential recommenders trained with in-batch losses.

The loop knows nothing about ODMT: it drives any model that implements the
:class:`Recommender` protocol (a training loss for a :class:`~odmt_components.data.TrainBatch`,
and full-ranking scores for an :class:`~odmt_components.data.EvalBatch`). It shuffles users,
collates batches, steps AdamW with gradient clipping (bf16 autocast on CUDA), evaluates on
the validation split after every epoch, keeps the weights of the epoch with the best
validation metric, and finally evaluates them on the test split.

Each piece (:func:`train_one_epoch`, :func:`evaluate`, :func:`fit`) takes explicit
arguments, so a distributed wrapper can reuse them with its own sampler and model wrapper.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import EvalBatch, Split, TrainBatch, collate_eval, collate_train
from .metrics import RankingAccumulator

__all__ = [
    "EpochRecord",
    "FitResult",
    "Recommender",
    "TrainConfig",
    "evaluate",
    "fit",
    "ranking_scores",
    "train_one_epoch",
]


@runtime_checkable
class Recommender(Protocol):
    """What the loop needs from a model (an ``nn.Module``).

    - ``training_loss(batch, log_q, distill_weight) -> (loss, logs)``: scalar loss of one
      :class:`TrainBatch` (tensors already on the model's device), ``log_q`` the
      ``(n_items + 1,)`` log popularity, ``distill_weight`` the current ramp-up weight;
      ``logs`` maps names to floats or scalar tensors for the progress bar (tensors are read
      back with the loss, once a step).
    - ``prepare_scoring() -> Any``: called once per evaluation under ``torch.no_grad`` (e.g.
      encode every item once); its result is passed to ``score``.
    - ``score(batch, prepared) -> dict[str, Tensor]``: ``(B, n_items + 1)`` float32 scores
      over all items for each named head (e.g. ``"id"``, ``"text"``, ``"fused"``); it runs
      under the evaluation's autocast, so compute the final product with
      :func:`ranking_scores` (bf16 scores tie items, and ties count against the target).
    - ``selection_head``: the head whose validation metric selects the epoch.
    """

    selection_head: str

    def training_loss(
        self, batch: TrainBatch, log_q: torch.Tensor, distill_weight: float
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]: ...

    def prepare_scoring(self) -> Any: ...

    def score(self, batch: EvalBatch, prepared: Any) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are the reference training of ODMT (SPEC section 6)."""

    epochs: int = 40
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.1
    grad_clip: float = 5.0
    max_seq_len: int = 12
    rampup_epochs: float = 20.0
    amp: bool = True
    selection_metric: str = "recall@10"
    ks: tuple[int, ...] = (10, 20)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "max_seq_len"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"TrainConfig.ks must be cutoffs >= 1, got {self.ks}")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    distill_weight: float
    valid: dict[str, dict[str, float]]
    seconds: float


@dataclass
class FitResult:
    best_epoch: int
    valid: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    history: list[EpochRecord] = field(default_factory=list)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def ranking_scores(user_states: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
    """``user_states @ item_vectors.T`` in float32, with autocast off: under bf16 autocast the
    product would come out in bf16, whose 8-bit mantissa gives many items the target's score,
    and the ranking counts ties against the target (``metrics.target_ranks``)."""
    with torch.autocast(device_type=user_states.device.type, enabled=False):
        return user_states.float() @ item_vectors.float().t()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sequences: Sequence[np.ndarray],
    log_q: torch.Tensor,
    config: TrainConfig,
    *,
    epoch: int,
    generator: np.random.Generator,
    weight_schedule: Callable[[int], float],
    first_step: int,
    description: str = "",
) -> tuple[float, float]:
    """One pass over ``sequences`` in shuffled batches. Returns (mean loss, last weight)."""
    device = _model_device(model)
    model.train()
    order = generator.permutation(len(sequences))
    n_batches = math.ceil(len(order) / config.batch_size)
    total, weight = 0.0, 0.0
    bar = tqdm(range(n_batches), desc=f"{description}epoch {epoch}", disable=not config.progress, leave=False)
    for i in bar:
        chosen = order[i * config.batch_size : (i + 1) * config.batch_size]
        batch = collate_train([sequences[j] for j in chosen], config.max_seq_len).to(device, non_blocking=True)
        weight = weight_schedule(first_step + i + 1)
        with _autocast(device, config.amp):
            loss, logs = model.training_loss(batch, log_q, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        values = _read_back(loss, logs)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"non-finite training loss {values['loss']} at epoch {epoch}, batch {i}")
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += values["loss"]
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
    return total / max(n_batches, 1), weight


def _read_back(loss: torch.Tensor, logs: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The step's loss and logged numbers as floats, in one device-to-host transfer. Called
    with the backward already queued (a read right after the forward kept the host waiting
    for it, with nothing of the backward launched) and before the update, so a non-finite
    loss stops training with the parameters as they were."""
    if "loss" in logs:
        raise ValueError("training_loss logs must not be named 'loss' (the loop reports the loss itself)")
    names = ["loss", *(k for k, v in logs.items() if isinstance(v, torch.Tensor))]
    tensors = [loss, *(logs[k] for k in names[1:])]
    for name, value in zip(names, tensors, strict=True):
        if value.numel() != 1:
            raise ValueError(f"training_loss must return a scalar {name!r}, got shape {tuple(value.shape)}")
    scalars = [t.detach().to(device=loss.device, dtype=torch.float32).reshape(()) for t in tensors]
    read = dict(zip(names, torch.stack(scalars).tolist(), strict=True))
    return {"loss": read["loss"], **{k: read.get(k, v) for k, v in logs.items()}}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    histories: Sequence[np.ndarray],
    targets: Sequence[int] | np.ndarray,
    config: TrainConfig,
) -> dict[str, dict[str, float]]:
    """Full-ranking Recall/NDCG@K per scoring head, the history of each user removed."""
    device = _model_device(model)
    model.eval()
    with _autocast(device, config.amp):
        prepared = model.prepare_scoring()
    accumulators: dict[str, RankingAccumulator] = {}
    targets = np.asarray(targets)
    for start in range(0, len(histories), config.eval_batch_size):
        stop = start + config.eval_batch_size
        batch = collate_eval(histories[start:stop], targets[start:stop], config.max_seq_len).to(device)
        with _autocast(device, config.amp):
            scores = model.score(batch, prepared)
        for head, head_scores in scores.items():
            if head_scores.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"score() returned {head_scores.dtype} scores for head {head!r}: rank in float32 "
                    "(training.ranking_scores computes them with autocast off)"
                )
            accumulators.setdefault(head, RankingAccumulator(ks=config.ks)).add(
                head_scores, batch.target_ids, batch.history_ids
            )
    return {head: acc.compute() for head, acc in accumulators.items()}


def fit(
    model: nn.Module,
    split: Split,
    log_q: torch.Tensor,
    config: TrainConfig,
    *,
    weight_schedule: Callable[[int], float] | None = None,
    description: str = "",
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``split.train``, select the epoch by validation, test it.

    ``weight_schedule(step)`` gives the distillation weight at optimizer step ``step``
    (1-based); by default a per-step sigmoid ramp over ``config.rampup_epochs``.
    """
    if not isinstance(model, Recommender):
        raise TypeError(f"model must implement the Recommender protocol, got {type(model).__name__}")
    if len(split.train) == 0:
        raise ValueError("split.train holds no training sequence")
    from .losses import RampUpSchedule

    log = log or functools.partial(print, flush=True)

    device = _model_device(model)
    torch.manual_seed(config.seed)
    generator = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    weight_schedule = weight_schedule or RampUpSchedule(config.rampup_epochs, steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log_q = log_q.to(device)
    best: tuple[float, int, dict, dict] | None = None
    history: list[EpochRecord] = []
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_loss, weight = train_one_epoch(
            model,
            optimizer,
            split.train,
            log_q,
            config,
            epoch=epoch,
            generator=generator,
            weight_schedule=weight_schedule,
            first_step=(epoch - 1) * steps_per_epoch,
            description=description,
        )
        valid = evaluate(model, split.valid_history, split.valid_target, config)
        record = EpochRecord(epoch, train_loss, weight, valid, time.perf_counter() - started)
        history.append(record)
        value = valid[model.selection_head][config.selection_metric]
        log(
            f"{description}epoch {epoch:3d}  loss {train_loss:.4f}  w {weight:.3f}  "
            f"valid {config.selection_metric}[{model.selection_head}] {value:.4f}  ({record.seconds:.1f}s)"
        )
        if best is None or value > best[0]:
            best = (value, epoch, copy.deepcopy(model.state_dict()), valid)
    assert best is not None
    model.load_state_dict(best[2])
    test = evaluate(model, split.test_history, split.test_target, config)
    return FitResult(best_epoch=best[1], valid=best[3], test=test, history=history)

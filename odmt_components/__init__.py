"""odmt-components: ODMT building blocks for multi-modal sequential recommendation.

The pieces of "Online Distillation-enhanced Multi-modal Transformer for Sequential
Recommendation" (ACM MM 2023) as standalone modules, with fused Triton kernels for the
ID-masked attention of the IMT and for the debiased in-batch softmax + distillation loss.
"""

from . import ops
from .backbones import GRU4Rec, NextItNet, SASRec, build_backbone
from .data import (
    EvalBatch,
    MultiModalDataset,
    Split,
    TrainBatch,
    collate_eval,
    collate_train,
    leave_one_out,
    load_dataset_folder,
    make_synthetic_dataset,
    popularity_log_q,
    save_dataset_folder,
)
from .imt import IMT, IMTOutput, init_id_embedding
from .losses import (
    DebiasedInBatchLoss,
    DistillationLosses,
    MutualDistillationLoss,
    RampUpSchedule,
    sigmoid_rampup,
)
from .metrics import RankingAccumulator, full_ranking_metrics

__version__ = "0.1.0"

__all__ = [
    "IMT",
    "DebiasedInBatchLoss",
    "DistillationLosses",
    "EvalBatch",
    "GRU4Rec",
    "IMTOutput",
    "MultiModalDataset",
    "MutualDistillationLoss",
    "NextItNet",
    "RampUpSchedule",
    "RankingAccumulator",
    "SASRec",
    "Split",
    "TrainBatch",
    "build_backbone",
    "collate_eval",
    "collate_train",
    "full_ranking_metrics",
    "init_id_embedding",
    "leave_one_out",
    "load_dataset_folder",
    "make_synthetic_dataset",
    "ops",
    "popularity_log_q",
    "save_dataset_folder",
    "sigmoid_rampup",
]

"""Train ODMT (or one of its baselines / ablations) and print test Recall and NDCG @10/@20.

ODMT, composed from the library's pieces:

    item tokens (text, image, ID) --IMT--> three item vectors D^id, D^text, D^image
    each branch's sequence of item vectors --its own backbone (SASRec)--> user states H^m
    in-batch candidates = every item slot of the batch
    loss = sum_m DebiasedInBatchCE(H^m, D^m) + w(step) * distillation KL (teachers id->text,
           id->image, ensemble->id), w ramped up with a sigmoid schedule

Baselines over the same IMT / data / loss: ``sasrec`` (IDs only), ``sasrec_ef`` (early fusion:
the three item vectors averaged, one SASRec), ``sasrec_lf`` (late fusion: three SASRecs,
one CE on the averaged logits). Ablations: ``--no-distill``, ``--no-id-mask``,
``--id-init {mean,text,image,random}``, ``--no-use-id``.

Run ``python examples/train_odmt.py`` for the embedded synthetic dataset (small preset, a
few minutes on 2 CPU cores), or ``--data DIR`` for a dataset folder in the
``odmt-dataset/1`` format (see :mod:`odmt_components.data`; paper defaults apply there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass

import torch
from torch import nn

from odmt_components import (
    IMT,
    DebiasedInBatchLoss,
    MultiModalDataset,
    MutualDistillationLoss,
    build_backbone,
    init_id_embedding,
    leave_one_out,
    load_dataset_folder,
    make_synthetic_dataset,
    popularity_log_q,
)
from odmt_components.data import EvalBatch, TrainBatch
from odmt_components.training import FitResult, TrainConfig, fit, ranking_scores


@dataclass
class ODMTConfig:
    """Model and training settings; the defaults are the paper's / reference code's."""

    model: str = "odmt"  # odmt | sasrec | sasrec_ef | sasrec_lf
    backbone: str = "sasrec"  # sasrec | gru4rec | nextitnet
    dim: int = 768
    imt_layers: int = 2
    imt_heads: int = 2
    seq_layers: int = 2
    seq_heads: int = 2
    dropout: float = 0.1
    token_layout: str = "paper"  # paper [image|ID|text] or reference [text|image|ID]
    id_mask: bool = True
    use_id: bool = True
    id_init: str = "mean"  # mean | text | image | random
    distill: bool = True
    temperature: float = 0.5
    detach_teacher: bool = True
    distill_form: str = "kl"  # kl (paper) | ce (reference code)
    # Encode each distinct item of a batch once (the host waits for their count, one read a
    # step); False encodes every position like the reference code: static shapes, nothing
    # read back with ops.set_value_checks(False), so a step can go into a CUDA graph.
    encode_distinct: bool = True
    # optimisation (TrainConfig)
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.1
    grad_clip: float = 5.0
    max_seq_len: int = 12
    rampup_epochs: float = 20.0
    amp: bool = True
    seed: int = 0
    progress: bool = True
    backend: str = "auto"  # attention / loss kernels: auto | torch | triton


# The embedded synthetic dataset is small: a narrow, faster-learning model fits it in minutes.
SYNTHETIC_PRESET = dict(dim=64, epochs=30, lr=2e-3, weight_decay=0.01, rampup_epochs=5.0, temperature=0.5)
# A long-tail catalogue (about 1,700 items for 1,000 users, most seen a handful of times in
# training), the regime multi-modal recommenders are for; item-to-item successor links that
# only IDs can learn are kept rare.
SYNTHETIC_DATASET = dict(n_items=2000, link_probability=0.1)


class MultiModalRecommender(nn.Module):
    """ODMT and the multi-modal baselines over one IMT, with the item features as buffers."""

    def __init__(self, config: ODMTConfig, data: MultiModalDataset) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("text_tokens", data.text_tokens, persistent=False)
        self.register_buffer("text_padding", data.text_padding, persistent=False)
        self.register_buffer("image_tokens", data.image_tokens, persistent=False)
        self.n_items = data.n_items
        use_id = config.use_id or config.model != "odmt"
        self.branches = ("id", "text", "image") if use_id else ("text", "image")
        self.imt = IMT(
            data.text_tokens.shape[-1],
            data.image_tokens.shape[-1],
            data.n_items,
            dim=config.dim,
            n_layers=config.imt_layers,
            n_heads=config.imt_heads,
            dropout=config.dropout,
            attn_dropout=config.dropout,
            token_layout=config.token_layout,
            id_mask=config.id_mask,
            use_id=use_id,
            backend=config.backend,
        )
        if use_id:
            init_id_embedding(self.imt.id_embedding, data.text_tokens[:, 0], data.image_tokens[:, 0], config.id_init)
        sequence_branches = ("fused",) if config.model == "sasrec_ef" else self.branches
        self.backbones = nn.ModuleDict(
            {
                m: build_backbone(
                    config.backbone,
                    config.dim,
                    config.max_seq_len,
                    **_backbone_kwargs(config),
                )
                for m in sequence_branches
            }
        )
        self.ce = DebiasedInBatchLoss(backend=config.backend)
        self.distillation = MutualDistillationLoss(
            temperature=config.temperature,
            detach_teacher=config.detach_teacher,
            form=config.distill_form,
            backend=config.backend,
        )
        self.selection_head = "id" if config.model == "sasrec" else "fused"

    def item_vectors(self, item_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Branch vectors for item ids of any shape (each distinct item encoded once, or every
        position: ``config.encode_distinct``)."""
        if self.config.encode_distinct:
            ids, where = torch.unique(item_ids, return_inverse=True)
        else:
            ids, where = item_ids.reshape(-1), None
        encoded = self.imt(self.text_tokens[ids], self.text_padding[ids], self.image_tokens[ids], ids)
        if where is None:
            vectors = {m: getattr(encoded, m).unflatten(0, item_ids.shape) for m in self.branches}
        else:
            # index_select, not ``[where]``: the backward of advanced indexing accumulates with
            # index_put_, whose order varies between runs with several CPU threads
            flat = where.flatten()
            vectors = {m: getattr(encoded, m).index_select(0, flat).unflatten(0, where.shape) for m in self.branches}
        if self.config.model == "sasrec_ef":
            vectors = {"fused": sum(vectors.values()) / len(vectors)}
        return vectors

    def user_states(self, vectors: dict[str, torch.Tensor], padding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: self.backbones[m](v, padding) for m, v in vectors.items()}

    def training_loss(self, batch: TrainBatch, log_q: torch.Tensor, distill_weight: float):
        vectors = self.item_vectors(batch.item_ids)  # (B, S+1, d) per branch
        states = self.user_states({m: v[:, :-1] for m, v in vectors.items()}, batch.input_padding)
        queries = {m: h.flatten(0, 1) for m, h in states.items()}  # (R, d)
        candidates = {m: v.flatten(0, 1) for m, v in vectors.items()}  # (N, d)
        common = (batch.target, batch.candidate_ids, batch.exclude_ids, log_q[batch.candidate_ids])
        model = self.config.model
        if model == "sasrec_lf":
            # CE on the averaged logits = one CE on concatenated vectors, queries scaled by 1/3.
            fused_q = torch.cat([queries[m] for m in self.branches], -1) / len(self.branches)
            fused_c = torch.cat([candidates[m] for m in self.branches], -1)
            loss = self.ce(fused_q, fused_c, *common)
            return loss, {}
        if model == "sasrec_ef":
            return self.ce(queries["fused"], candidates["fused"], *common), {}
        if self.branches == ("id", "text", "image") and self.config.distill:
            loss, parts = self.distillation(queries, candidates, *common, weight=distill_weight)
            return loss, {"ce": parts.ce.detach(), "kl": parts.kl.detach()}  # read back once a step by the loop
        losses = {m: self.ce(queries[m], candidates[m], *common) for m in self.branches}
        return sum(losses.values()), {}

    @torch.no_grad()
    def prepare_scoring(self) -> dict[str, torch.Tensor]:
        """Every item's branch vectors, ``(n_items + 1, d)`` each, in chunks."""
        chunks = [
            self.item_vectors(ids) for ids in torch.arange(self.n_items + 1, device=self.text_tokens.device).split(1024)
        ]
        return {m: torch.cat([c[m] for c in chunks]) for m in chunks[0]}

    def score(self, batch: EvalBatch, all_vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sequence_vectors = {m: v[batch.input_ids] for m, v in all_vectors.items()}
        states = self.user_states(sequence_vectors, batch.input_padding)
        scores = {m: ranking_scores(states[m][:, -1], all_vectors[m]) for m in states}
        if len(scores) > 1:
            scores["fused"] = sum(scores.values()) / len(scores)
        return scores


class IDSASRec(nn.Module):
    """The ID-only baseline: an item-ID embedding table and one backbone, same loss."""

    def __init__(self, config: ODMTConfig, data: MultiModalDataset) -> None:
        super().__init__()
        self.n_items = data.n_items
        self.embedding = nn.Embedding(data.n_items + 1, config.dim, padding_idx=0)
        nn.init.xavier_normal_(self.embedding.weight)
        self.backbone = build_backbone(config.backbone, config.dim, config.max_seq_len, **_backbone_kwargs(config))
        self.ce = DebiasedInBatchLoss(backend=config.backend)
        self.selection_head = "id"

    def training_loss(self, batch: TrainBatch, log_q: torch.Tensor, distill_weight: float):
        vectors = self.embedding(batch.item_ids)
        states = self.backbone(vectors[:, :-1], batch.input_padding)
        loss = self.ce(
            states.flatten(0, 1),
            vectors.flatten(0, 1),
            batch.target,
            batch.candidate_ids,
            batch.exclude_ids,
            log_q[batch.candidate_ids],
        )
        return loss, {}

    def prepare_scoring(self) -> torch.Tensor:
        return self.embedding.weight

    def score(self, batch: EvalBatch, table: torch.Tensor) -> dict[str, torch.Tensor]:
        states = self.backbone(table[batch.input_ids], batch.input_padding)
        return {"id": ranking_scores(states[:, -1], table)}


def _backbone_kwargs(config: ODMTConfig) -> dict:
    if config.backbone == "sasrec":
        return dict(n_layers=config.seq_layers, n_heads=config.seq_heads, dropout=config.dropout)
    return dict(dropout=config.dropout)


def build_model(config: ODMTConfig, data: MultiModalDataset) -> nn.Module:
    if config.model == "sasrec":
        return IDSASRec(config, data)
    if config.model in ("odmt", "sasrec_ef", "sasrec_lf"):
        return MultiModalRecommender(config, data)
    raise ValueError(f"model must be odmt, sasrec, sasrec_ef or sasrec_lf, got {config.model!r}")


def train_config(config: ODMTConfig) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in dataclasses.asdict(config).items() if k in names})


def run(config: ODMTConfig, data: MultiModalDataset, device: torch.device, log=None) -> FitResult:
    """Train one model on ``data`` and return its :class:`FitResult` (reused by reproduce.py)."""
    torch.manual_seed(config.seed)
    split = leave_one_out(data)
    log_q = popularity_log_q(split.train, data.n_items)
    model = build_model(config, data).to(device)
    return fit(model, split, log_q, train_config(config), description=f"[{config.model}] ", log=log)


def format_table(result: FitResult, ks=(10, 20)) -> str:
    columns = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    lines = [f"| head | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for head, metrics in result.test.items():
        lines.append(f"| {head} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def parse_args() -> tuple[ODMTConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="dataset folder (odmt-dataset/1); default: the embedded synthetic dataset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the test metrics and history as JSON here")
    for f in dataclasses.fields(ODMTConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None)
    args = parser.parse_args()
    overrides = {} if args.data else dict(SYNTHETIC_PRESET)
    overrides.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(ODMTConfig) if getattr(args, f.name) is not None}
    )
    return ODMTConfig(**overrides), args


def main() -> None:
    config, args = parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    data = load_dataset_folder(args.data) if args.data else make_synthetic_dataset(**SYNTHETIC_DATASET)
    print(
        f"dataset {data.name}: {data.n_users} users, {data.n_items} items; model {config.model}; device {args.device}"
    )
    print("config:", json.dumps(dataclasses.asdict(config)))
    started = time.perf_counter()
    result = run(config, data, torch.device(args.device))
    print(f"\nbest epoch {result.best_epoch} by validation; {time.perf_counter() - started:.0f}s in all")
    print(f"test metrics ({config.model}):")
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"config": dataclasses.asdict(config), **dataclasses.asdict(result)},
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()

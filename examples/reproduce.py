"""Reproduce the paper's experiments on a prepared dataset: Tables 2-3 and Figures 2 and 4.

Runs SASRec (IDs only), SASRec+EF, SASRec+LF, ODMT and the ablations of the paper's Table 3
(without online distillation, without the ID mask, without the ID branch, random ID
initialisation, text-only ID initialisation) for several seeds, each trained with the
library's loop (:func:`odmt_components.training.fit`) on the models of
``examples/train_odmt.py``, and writes to ``--out``:

- ``results.md``: the exact command, the dataset and settings, and test Recall@10/20 and
  NDCG@10/20 (mean and standard deviation over seeds) of each model's selection head (``id``
  for SASRec, the fused score of the branches otherwise), ODMT's per-branch metrics, and
  Recall@10 per popularity group;
- ``figure2_training.png``: training loss and validation Recall@10 per epoch of each model
  (mean over seeds; the paper's Figure 2);
- ``figure4_popularity.png``: test Recall@10 per item-popularity group (the paper's Figure 4):
  group 0 = target items never seen in training, groups 1..G = the seen items split into G
  groups of (nearly) equal size by their training frequency, least popular first;
- ``results.json`` (all aggregated numbers) and ``runs/<model>-seed<k>.json`` (one per run:
  config, per-epoch history, validation/test metrics, popularity groups, wall time).

Runs whose JSON already exists with the same configuration are not re-trained (``--resume``
is the default; ``--no-resume`` re-runs), so a long job can be split over several calls; each
call rewrites the report from all runs of the requested models and seeds. ``--report-only``
only rewrites the report.

Presets: ``paper`` (default) = the reference training of SPEC section 6 (d = 768, 40 epochs,
AdamW 1e-4, weight decay 0.1, ramp-up 20 epochs); ``cpu`` = a narrow model for CPU runs
(d = 64, 30 epochs, lr 1e-3, weight decay 0.01, ramp-up 10 epochs). Any field of
``ODMTConfig`` can be overridden (``--dim``, ``--epochs``, ``--temperature``, ...).

Example (ml100k-mm, see examples/results/ml100k-mm/README.md)::

    python -m odmt_components.prepare --format ml100k-mm --input ../shared/data/ml100k-mm \\
        --out runs/ml100k-mm-prepared --text-model <MiniLM folder> --image-pca-dim 384
    python examples/reproduce.py --data runs/ml100k-mm-prepared \\
        --out examples/results/ml100k-mm --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_odmt  # noqa: E402  (examples/train_odmt.py: the models and their config)

from odmt_components import (  # noqa: E402
    collate_eval,
    leave_one_out,
    load_dataset_folder,
    popularity_log_q,
)
from odmt_components.metrics import target_ranks  # noqa: E402
from odmt_components.training import fit  # noqa: E402

#: name -> (label in the report, overrides of ODMTConfig)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sasrec": ("SASRec (IDs)", {"model": "sasrec"}),
    "sasrec_ef": ("SASRec+EF", {"model": "sasrec_ef"}),
    "sasrec_lf": ("SASRec+LF", {"model": "sasrec_lf"}),
    "odmt": ("ODMT", {"model": "odmt"}),
    "odmt_no_distill": ("ODMT w/o online distillation", {"model": "odmt", "distill": False}),
    "odmt_no_id_mask": ("ODMT w/o ID mask", {"model": "odmt", "id_mask": False}),
    "odmt_no_id": ("ODMT w/o ID", {"model": "odmt", "use_id": False}),
    "odmt_random_id_init": ("ODMT random ID init", {"model": "odmt", "id_init": "random"}),
    "odmt_text_id_init": ("ODMT text-only ID init", {"model": "odmt", "id_init": "text"}),
}
MAIN = ("sasrec", "sasrec_ef", "sasrec_lf", "odmt")
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {"dim": 64, "epochs": 30, "lr": 1e-3, "weight_decay": 0.01, "rampup_epochs": 10.0},
}
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
#: ODMTConfig fields set per variant / run (not overridable from the command line).
VARIANT_FIELDS = ("model", "seed", "distill", "id_mask", "use_id", "id_init")


# ------------------------------------------------------------------------------- runs


def run_config(variant: str, preset: str, overrides: dict[str, Any], seed: int
               ) -> train_odmt.ODMTConfig:
    """The ODMTConfig of one run: preset, then user overrides, then the variant's own."""
    fields = {**PRESETS[preset], **overrides, **VARIANTS[variant][1], "seed": seed}
    fields.setdefault("progress", False)
    return train_odmt.ODMTConfig(**fields)


def popularity_groups(train: list[np.ndarray], n_items: int, n_groups: int
                      ) -> tuple[np.ndarray, list[list[int]]]:
    """Group of each item id (index 0 = padding, group -1): 0 = never in the training
    sequences, 1..n_groups = seen items sorted by training count, split into equal parts.
    Also returns each group's [min, max] training count."""
    counts = np.bincount(np.concatenate(train), minlength=n_items + 1) if train else \
        np.zeros(n_items + 1, dtype=np.int64)
    group = np.zeros(n_items + 1, dtype=np.int64)
    group[0] = -1
    seen = np.flatnonzero(counts[1:] > 0) + 1
    ordered = seen[np.argsort(counts[seen], kind="stable")]
    for g, part in enumerate(np.array_split(ordered, n_groups), start=1):
        group[part] = g
    ranges = [[0, 0]] + [
        [int(counts[p].min()), int(counts[p].max())] if p.size else [0, 0]
        for p in np.array_split(ordered, n_groups)
    ]
    return group, ranges


@torch.no_grad()
def test_ranks(model: torch.nn.Module, split: Any, config: train_odmt.ODMTConfig,
               device: torch.device, batch_size: int = 256) -> np.ndarray:
    """1-based full-ranking rank of every test target under the model's selection head."""
    model.eval()
    amp = config.amp and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        prepared = model.prepare_scoring()
    ranks = []
    targets = np.asarray(split.test_target)
    for start in range(0, len(targets), batch_size):
        stop = start + batch_size
        batch = collate_eval(split.test_history[start:stop], targets[start:stop],
                             config.max_seq_len).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            scores = model.score(batch, prepared)[model.selection_head]
        ranks.append(target_ranks(scores.float(), batch.target_ids, batch.history_ids).cpu())
    return torch.cat(ranks).numpy()


def train_one(variant: str, config: train_odmt.ODMTConfig, data: Any, device: torch.device,
              n_groups: int) -> dict[str, Any]:
    """Train one model (as ``train_odmt.run`` does, keeping the model) and collect its
    history, validation/test metrics and per-popularity-group test recall."""
    torch.manual_seed(config.seed)
    split = leave_one_out(data)
    log_q = popularity_log_q(split.train, data.n_items)
    model = train_odmt.build_model(config, data).to(device)
    started = time.perf_counter()
    result = fit(model, split, log_q, train_odmt.train_config(config),
                 description=f"[{variant} seed {config.seed}] ")
    seconds = time.perf_counter() - started
    ranks = test_ranks(model, split, config, device)
    head = model.selection_head
    recall10 = float((ranks <= 10).mean())
    if not math.isclose(recall10, result.test[head]["recall@10"], abs_tol=1e-6):
        raise RuntimeError(f"per-user ranks give Recall@10 {recall10}, fit() gave "
                           f"{result.test[head]['recall@10']}")
    group, ranges = popularity_groups(split.train, data.n_items, n_groups)
    target_group = group[np.asarray(split.test_target)]
    pop = []
    for g in range(n_groups + 1):
        sel = target_group == g
        pop.append({"group": g, "train_count": ranges[g], "n_users": int(sel.sum()),
                    "recall@10": float((ranks[sel] <= 10).mean()) if sel.any() else None,
                    "recall@20": float((ranks[sel] <= 20).mean()) if sel.any() else None})
    return {
        "variant": variant,
        "config": dataclasses.asdict(config),
        "selection_head": head,
        "best_epoch": result.best_epoch,
        "valid": result.valid,
        "test": result.test,
        "history": [dataclasses.asdict(h) for h in result.history],
        "popularity": pop,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(len(result.history), 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _cell(values: list[float]) -> str:
    m, s = _mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f}"


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean/std over seeds of every metric, per variant."""
    out: dict[str, Any] = {}
    for variant, recs in runs.items():
        head = recs[0]["selection_head"]
        entry: dict[str, Any] = {"label": VARIANTS[variant][0], "seeds": [r["config"]["seed"]
                                                                        for r in recs],
                                 "selection_head": head}
        for metric in METRICS:
            entry[metric] = _mean_std([r["test"][head][metric] for r in recs])
        entry["heads"] = {h: {m: _mean_std([r["test"][h][m] for r in recs]) for m in METRICS}
                          for h in recs[0]["test"]}
        entry["best_epoch"] = _mean_std([r["best_epoch"] for r in recs])
        entry["seconds_per_epoch"] = _mean_std([r["seconds_per_epoch"] for r in recs])
        entry["popularity"] = [
            {"group": g["group"], "train_count": g["train_count"], "n_users": g["n_users"],
             "recall@10": _mean_std([r["popularity"][i]["recall@10"] for r in recs
                                     if r["popularity"][i]["recall@10"] is not None])
             if g["n_users"] else None}
            for i, g in enumerate(recs[0]["popularity"])
        ]
        out[variant] = entry
    return out


def _curves(recs: list[dict[str, Any]], key: str) -> np.ndarray:
    length = min(len(r["history"]) for r in recs)
    vals = []
    for r in recs:
        head = r["selection_head"]
        if key == "loss":
            vals.append([h["train_loss"] for h in r["history"][:length]])
        else:
            vals.append([h["valid"][head]["recall@10"] for h in r["history"][:length]])
    return np.asarray(vals, dtype=np.float64)


def plot_training(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Figure 2: training loss and validation Recall@10 per epoch (mean over seeds, band =
    min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, recs in runs.items():
        for ax, key in zip(axes, ("loss", "valid"), strict=True):
            c = _curves(recs, key)
            epochs = np.arange(1, c.shape[1] + 1)
            line, = ax.plot(epochs, c.mean(0), label=VARIANTS[variant][0],
                            linestyle="-" if variant in MAIN else "--")
            if c.shape[0] > 1:
                ax.fill_between(epochs, c.min(0), c.max(0), alpha=0.15, color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set(title="training loss per epoch", xlabel="epoch", ylabel="loss", yscale="log")
    axes[1].set(title="validation Recall@10 per epoch", xlabel="epoch", ylabel="Recall@10")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_popularity(agg: dict[str, Any], path: Path) -> None:
    """Figure 4: test Recall@10 per popularity group, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(agg)
    groups = agg[variants[0]]["popularity"]
    x = np.arange(len(groups))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    for k, v in enumerate(variants):
        vals = [g["recall@10"][0] if g["recall@10"] else 0.0 for g in agg[v]["popularity"]]
        errs = [g["recall@10"][1] if g["recall@10"] else 0.0 for g in agg[v]["popularity"]]
        ax.bar(x + (k - (len(variants) - 1) / 2) * width, vals, width,
               yerr=errs if len(agg[v]["seeds"]) > 1 else None, label=agg[v]["label"],
               capsize=2)
    labels = [f"group {g['group']}\n(train count {g['train_count'][0]}-{g['train_count'][1]},"
              f"\n{g['n_users']} test users)" for g in groups]
    labels[0] = f"group 0: unseen\n({groups[0]['n_users']} test users)"
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylabel="test Recall@10", title="Recall@10 by popularity of the target item")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, runs: dict[str, list[dict[str, Any]]], data: Any,
                 command: str, preset: str, overrides: dict[str, Any]) -> None:
    """results.md, results.json and the two figures."""
    agg = aggregate(runs)
    n_seeds = max(len(r) for r in runs.values())
    first = next(iter(runs.values()))[0]
    meta = getattr(data, "meta", {}) or {}
    common = {k: v for k, v in first["config"].items() if k not in VARIANT_FIELDS}
    lines = [
        f"# ODMT reproduction on {data.name}",
        "",
        "Generated by `examples/reproduce.py`; do not edit by hand (notes go to README.md).",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"Dataset: {data.n_users} users, {data.n_items} items, {data.n_interactions} "
        f"interactions after the filter; text encoder `{meta.get('text_encoder')}`, image "
        f"encoder `{meta.get('image_encoder')}`; text tokens {tuple(data.text_tokens.shape[1:])}, "
        f"image tokens {tuple(data.image_tokens.shape[1:])}.",
        "",
        f"Settings: preset `{preset}`, overrides `{json.dumps(overrides)}`; common config of the "
        f"runs: `{json.dumps(common)}`. "
        f"Device {first['device']}, {first['torch_threads']} threads.",
        "",
        f"## Test metrics (mean ± std over seeds; {n_seeds} seed(s))",
        "",
        "Selection head: `id` for SASRec, `fused` (mean of the branch scores) otherwise; the "
        "epoch is chosen by validation Recall@10 of that head.",
        "",
        "| model | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 | best epoch | s/epoch | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, recs in runs.items():
        a = agg[variant]
        cells = [_cell([r["test"][a["selection_head"]][m] for r in recs]) for m in METRICS]
        lines.append(
            f"| {a['label']} | " + " | ".join(cells)
            + f" | {a['best_epoch'][0]:.1f} | {a['seconds_per_epoch'][0]:.1f} | "
            + ",".join(str(s) for s in a["seeds"]) + " |"
        )
    if "odmt" in runs:
        lines += ["", "## ODMT per branch (test)", "",
                  "| head | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 |", "|---|---|---|---|---|"]
        for head in runs["odmt"][0]["test"]:
            cells = [_cell([r["test"][head][m] for r in runs["odmt"]]) for m in METRICS]
            lines.append(f"| {head} | " + " | ".join(cells) + " |")
    groups = next(iter(agg.values()))["popularity"]
    lines += ["", "## Test Recall@10 per popularity group of the target item", "",
              "Group 0: targets never seen in training; groups 1..G: seen items in equal-size "
              "groups by training count (least popular first; items with the same count may "
              "fall on both sides of a group boundary).", "",
              "| model | " + " | ".join(
                  f"group {g['group']} ({g['train_count'][0]}-{g['train_count'][1]}; "
                  f"{g['n_users']} users)" for g in groups) + " |",
              "|---" * (len(groups) + 1) + "|"]
    for variant in runs:
        a = agg[variant]
        lines.append(f"| {a['label']} | " + " | ".join(
            f"{g['recall@10'][0]:.4f}" if g["recall@10"] else "-" for g in a["popularity"])
            + " |")
    lines += ["", "## Figures", "",
              "![training loss and validation Recall@10 per epoch](figure2_training.png)", "",
              "![Recall@10 per popularity group](figure4_popularity.png)", ""]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(
        {"command": command, "preset": preset, "overrides": overrides, "dataset": data.name,
         "models": agg}, indent=1), encoding="utf-8")
    plot_training(runs, out / "figure2_training.png")
    plot_popularity(agg, out / "figure4_popularity.png")


# -------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset folder (odmt-dataset/1)")
    p.add_argument("--out", required=True, type=Path, help="results folder")
    p.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="MODEL", help=f"variants to run, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--preset", choices=list(PRESETS), default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--pop-groups", type=int, default=4, help="popularity groups of seen items")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse finished runs with the same config")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the report from finished runs")
    p.add_argument("--min-interactions", type=int, default=5)
    p.add_argument("--keep-last", type=int, default=15)
    cfg = p.add_argument_group("ODMTConfig overrides (applied to every variant)")
    for f in dataclasses.fields(train_odmt.ODMTConfig):
        if f.name in VARIANT_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            cfg.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            cfg.add_argument(flag, type={"int": int, "float": float}.get(f.type, str),
                             default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(train_odmt.ODMTConfig)
                 if f.name not in VARIANT_FIELDS and getattr(args, f.name) is not None}
    if args.threads:
        torch.set_num_threads(args.threads)
    # The command that regenerates everything (a --report-only call records the training one).
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = "python examples/reproduce.py " + shlex.join(given)
    data = load_dataset_folder(args.data, min_interactions=args.min_interactions,
                               keep_last=args.keep_last or None)
    device = torch.device(args.device)
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    print(f"dataset {data.name}: {data.n_users} users, {data.n_items} items; device {device}",
          flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for variant in args.models:
        for seed in args.seeds:
            config = run_config(variant, args.preset, overrides, seed)
            path = out / "runs" / f"{variant}-seed{seed}.json"
            record = None
            if path.is_file() and (args.resume or args.report_only):
                old = json.loads(path.read_text())
                if old["config"] == dataclasses.asdict(config):
                    record = old
                elif args.report_only:
                    print(f"skip {path.name}: recorded with another config", flush=True)
                    continue
            if record is None:
                if args.report_only:
                    continue
                print(f"== {variant} seed {seed}", flush=True)
                record = train_one(variant, config, data, device, args.pop_groups)
                record["dataset"] = {"path": str(args.data), "name": data.name}
                path.write_text(json.dumps(record, indent=1), encoding="utf-8")
                head = record["selection_head"]
                print(f"   test recall@10 {record['test'][head]['recall@10']:.4f} "
                      f"ndcg@10 {record['test'][head]['ndcg@10']:.4f} "
                      f"({record['seconds']:.0f}s)", flush=True)
            runs.setdefault(variant, []).append(record)
    if not runs:
        parser.error("no finished run to report")
    write_report(out, runs, data, command, args.preset, overrides)
    print(f"wrote {out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()

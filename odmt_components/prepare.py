"""Prepare a native dataset as an ``odmt-dataset/1`` folder (one command).

Examples::

    # Amazon Reviews 2018 (images downloaded beforehand to images/<asin>.jpg)
    python -m odmt_components.prepare --format amazon --out data/arts \\
        --reviews Arts_Crafts_and_Sewing.json.gz --metadata meta_Arts_Crafts_and_Sewing.json.gz \\
        --images images/

    # H&M (Kaggle folder with transactions_train.csv, articles.csv, images/), 50,000 users
    python -m odmt_components.prepare --format hm --input h-and-m/ --out data/hm --max-users 50000

    # MicroLens-100k
    python -m odmt_components.prepare --format microlens --out data/stream \\
        --pairs MicroLens-100k_pairs.csv --titles MicroLens-100k_title_en.csv \\
        --images MicroLens-100k_covers/

    # generic TSV folder (interactions.tsv, items.tsv, images/) with precomputed image features
    python -m odmt_components.prepare --format tsv --input my_data/ --out data/mine \\
        --image-features image_tokens.npz

    # ml100k-mm (the project's small real set), text features from a local MiniLM copy
    # (image tokens reduced from 1024 to MiniLM's 384 dims so the mean ID init applies)
    python -m odmt_components.prepare --format ml100k-mm --input ../shared/data/ml100k-mm \\
        --out runs/ml100k-mm-prepared --text-model /path/to/all-MiniLM-L6-v2 --image-pca-dim 384

Features are cached (``--cache-dir``, default ``~/.cache/odmt-components/features``) under a
key of the model and the whole list of kept items' inputs, so re-running the same preparation
does not encode again (other filter settings keep other items: they encode anew). Set ``HF_HUB_OFFLINE=1``
and pass local model folders to run without network access.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .readers import (
    MISSING_IMAGE_POLICIES,
    RawDataset,
    build_dataset_folder,
    read_amazon,
    read_hm,
    read_microlens,
    read_ml100k_mm,
    read_tsv,
)

FORMATS = ("amazon", "hm", "microlens", "tsv", "ml100k-mm")
DEFAULT_CACHE_DIR = Path(os.environ.get("ODMT_FEATURE_CACHE",
                                        Path.home() / ".cache" / "odmt-components" / "features"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m odmt_components.prepare``."""
    p = argparse.ArgumentParser(
        prog="python -m odmt_components.prepare",
        description="Turn a native recommendation dataset into an odmt-dataset/1 folder: "
        "interactions, item texts, and token features of item texts and images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="native layout")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--name", help="dataset name for meta.json (default: from the source)")

    src = p.add_argument_group("inputs (per format)")
    src.add_argument("--input", type=Path,
                     help="hm: folder with transactions_train.csv, articles.csv, images/; "
                     "tsv: folder with interactions.tsv, items.tsv and optionally images/; "
                     "ml100k-mm: the ml100k-mm folder")
    src.add_argument("--reviews", type=Path, help="amazon: reviews JSON lines (.json[.gz]) "
                     "or ratings-only CSV")
    src.add_argument("--metadata", type=Path, help="amazon: metadata JSON lines (.json[.gz])")
    src.add_argument("--transactions", type=Path, help="hm: transactions_train.csv")
    src.add_argument("--articles", type=Path, help="hm: articles.csv")
    src.add_argument("--pairs", type=Path, help="microlens: interaction pairs CSV")
    src.add_argument("--titles", type=Path, help="microlens: titles CSV (item,title)")
    src.add_argument("--tags", type=Path, help="microlens: optional tags CSV (item,tags)")
    src.add_argument("--interactions", type=Path, help="tsv: interactions.tsv")
    src.add_argument("--items", type=Path, help="tsv: items.tsv")
    src.add_argument("--text-columns", default="text",
                     help="tsv: comma-separated items.tsv columns joined into the text")
    src.add_argument("--images", type=Path,
                     help="image folder: amazon <asin>.jpg, hm <0xx>/<id>.jpg, microlens "
                     "covers <item>.jpg, tsv <item_id>.jpg")

    feat = p.add_argument_group("features")
    feat.add_argument("--text-model", default="bert-base-uncased",
                      help="BERT-family hub name or local folder")
    feat.add_argument("--image-model", default="openai/clip-vit-base-patch32",
                      help="CLIP / ViT-style hub name or local folder")
    feat.add_argument("--text-features", type=Path,
                      help="precomputed text token features (.npy/.npz/.safetensors) instead of "
                      "--text-model")
    feat.add_argument("--image-features", type=Path,
                      help="precomputed image token features (.npy/.npz/.safetensors) instead "
                      "of --image-model")
    feat.add_argument("--max-length", type=int, default=30, help="text tokens incl. CLS")
    feat.add_argument("--batch-size", type=int, default=64, help="items per encoder forward")
    feat.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    feat.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                      help="stored feature dtype")
    feat.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                      help="feature cache folder (env ODMT_FEATURE_CACHE)")
    feat.add_argument("--no-cache", action="store_true", help="do not cache features")
    feat.add_argument("--image-pca-dim", type=int,
                      help="reduce the image token width to this many principal components "
                      "(e.g. the text width, for the paper's mean ID initialisation)")
    feat.add_argument("--text-pca-dim", type=int,
                      help="reduce the text token width to this many principal components "
                      "(fitted on non-padding tokens)")
    feat.add_argument("--missing-images", default="drop", choices=MISSING_IMAGE_POLICIES,
                      help="items without an image file: drop them, use a blank white image, "
                      "or stop with an error")

    filt = p.add_argument_group("filter (the paper's protocol; 0 disables keep-last)")
    filt.add_argument("--min-interactions", type=int, default=5)
    filt.add_argument("--keep-last", type=int, default=15)
    filt.add_argument("--max-users", type=int, help="random sample of this many users")
    filt.add_argument("--seed", type=int, default=0, help="seed of the user sample")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _need(args: argparse.Namespace, parser: argparse.ArgumentParser, *names: str) -> None:
    missing = [n for n in names if getattr(args, n.replace("-", "_")) is None]
    if missing:
        parser.error(f"--format {args.format} needs " + ", ".join(f"--{n}" for n in missing))


def read_source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RawDataset:
    """Run the reader selected by ``args.format``."""
    fmt = args.format
    if fmt == "amazon":
        _need(args, parser, "reviews", "metadata")
        return read_amazon(args.reviews, args.metadata, args.images, name=args.name)
    if fmt == "hm":
        base = args.input
        if base is not None:
            args.transactions = args.transactions or base / "transactions_train.csv"
            args.articles = args.articles or base / "articles.csv"
            args.images = args.images or base / "images"
        _need(args, parser, "transactions", "articles")
        return read_hm(args.transactions, args.articles, args.images, name=args.name or "hm")
    if fmt == "microlens":
        _need(args, parser, "pairs", "titles")
        return read_microlens(args.pairs, args.titles, args.images, tags=args.tags,
                              name=args.name or "microlens")
    if fmt == "tsv":
        base = args.input
        if base is not None:
            args.interactions = args.interactions or base / "interactions.tsv"
            args.items = args.items or base / "items.tsv"
            if args.images is None and (base / "images").is_dir():
                args.images = base / "images"
        _need(args, parser, "interactions", "items")
        cols = [c.strip() for c in args.text_columns.split(",") if c.strip()]
        return read_tsv(args.interactions, args.items, args.images, text_columns=cols,
                        name=args.name)
    _need(args, parser, "input")
    raw = read_ml100k_mm(args.input)
    if args.name:
        raw.name = args.name
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_length < 2:
        parser.error("--max-length must be >= 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    t0 = time.perf_counter()
    try:
        raw = read_source(args, parser)
        print(f"read {raw.name}: {raw.n_interactions} interactions, {len(raw.user_keys)} users, "
              f"{len(raw.item_keys)} catalogue items ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
        out = build_dataset_folder(
            raw, args.out,
            text_model=args.text_model, image_model=args.image_model,
            text_features=args.text_features, image_features=args.image_features,
            missing_images=args.missing_images, min_interactions=args.min_interactions,
            keep_last=args.keep_last or None, max_users=args.max_users, seed=args.seed,
            max_length=args.max_length, text_batch_size=args.batch_size,
            image_batch_size=args.batch_size, device=args.device,
            cache_dir=None if args.no_cache else args.cache_dir, out_dtype=args.dtype,
            progress=not args.quiet, image_pca_dim=args.image_pca_dim,
            text_pca_dim=args.text_pca_dim,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Readers for native recommendation datasets, and their conversion to ``odmt-dataset/1``.

Each ``read_*`` function parses one native layout into a :class:`RawDataset` (interactions as
integer arrays, the item catalogue with its texts, the image file of each item, or precomputed
image features); :func:`build_dataset_folder` then filters it, extracts token features with
:mod:`odmt_components.features` and writes the folder with
:func:`odmt_components.data.save_dataset_folder`. ``python -m odmt_components.prepare`` is the
command-line front end.

Native layouts (item texts follow SPEC section 6):

- **Amazon Reviews 2018** (:func:`read_amazon`): reviews as JSON lines with ``reviewerID``,
  ``asin``, ``unixReviewTime`` (or the "ratings only" CSV ``item,user,rating,timestamp``);
  metadata as JSON lines with ``asin``, ``title``, ``brand``, ``category`` (list),
  ``description`` (list or string) (2014-style Python-literal lines are accepted too); ``.gz``
  files are read directly. Text = title, brand, categories, description (HTML tags and
  entities removed). Images: ``<images>/<asin>.jpg`` in a local folder (the metadata's
  ``imageURLHighRes`` URLs can be listed with :func:`amazon_image_urls` for downloading).
- **H&M** (:func:`read_hm`): ``transactions_train.csv`` (``t_dat``, ``customer_id``,
  ``article_id``), ``articles.csv``; text = ``prod_name``, ``product_type_name``,
  ``product_group_name``, ``graphical_appearance_name``, ``colour_group_name``; images
  ``images/<first 3 digits>/<article_id>.jpg`` with the 10-digit zero-padded article id (which is
  also the item id). Timestamps are the ``t_dat`` dates as integers ``YYYYMMDD``.
- **MicroLens** (:func:`read_microlens`): interaction pairs CSV (``user,item,timestamp``; headers
  ``userID``/``videoID`` and ``user_id``/``item_id`` are recognised too), titles CSV
  (``item,title``, header optional), optional tags CSV (``item,tags``; text = tags + title as in
  the paper), cover images ``<covers>/<item>.jpg``.
- **Generic TSV** (:func:`read_tsv`): ``interactions.tsv`` with a header holding ``user_id``,
  ``item_id``, ``timestamp`` (extra columns ignored), ``items.tsv`` with ``item_id`` and ``text``
  (or any ``text_columns`` joined), images ``<images>/<item_id>.jpg`` or a precomputed feature
  file.
- **ml100k-mm** (:func:`read_ml100k_mm`): the small real set of this project (MovieLens-100K
  ratings as implicit feedback; text = title, genres, TMDB overview; image tokens = the
  dequantized MobileNetV1 poster features of ``image_tokens_mobilenet_v1.npz``).

Policies (documented choices, applied by :func:`build_dataset_folder`):

- Interactions whose item is missing from the item table are dropped (no text for them).
- Items without an image file (``missing_images``): ``"drop"`` (default) removes the item and
  its interactions before the user filter, so no item carries a made-up image; ``"blank"``
  gives it a plain white 224x224 RGB image (product photos have white backgrounds);
  ``"error"`` raises. Image files are looked up as ``<id>.jpg``, then ``.jpeg``, ``.png``,
  ``.webp``.
- The paper's filter is applied before feature extraction, so features are computed only for
  items that survive it: users with ``>= min_interactions`` (5) interactions, optionally a
  random sample of ``max_users`` of them (seeded), each keeping its last ``keep_last`` (15)
  interactions (ties in file order), then items that still occur. This equals what
  :func:`odmt_components.data.load_dataset_folder` does with the same settings, so loading the
  folder with the same settings (``keep_last >= min_interactions``, as the defaults) changes
  nothing. ``keep_last=None`` keeps whole histories.
- Texts have tabs and line breaks replaced by spaces and are cut at ``max_text_chars`` (2,000)
  characters (the encoders read only the first ``max_length`` = 30 tokens anyway).
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import io
import json
import os
import re
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import save_dataset_folder
from .features import (
    TokenFeatures,
    extract_image_features,
    extract_text_features,
    load_token_features,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MISSING_IMAGE_POLICIES",
    "RawDataset",
    "amazon_image_urls",
    "build_dataset_folder",
    "clean_text",
    "dequantize_ml100k_image_tokens",
    "hm_image_path",
    "pca_reduce_tokens",
    "read_amazon",
    "read_hm",
    "read_microlens",
    "read_ml100k_mm",
    "read_tsv",
    "select_interactions",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MISSING_IMAGE_POLICIES = ("drop", "blank", "error")
BLANK_IMAGE_SIZE = 224
HM_TEXT_COLUMNS = (
    "prod_name",
    "product_type_name",
    "product_group_name",
    "graphical_appearance_name",
    "colour_group_name",
)
ML100K_TEXT_COLUMNS = ("title", "genres", "overview")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# --------------------------------------------------------------------------------------------
# In-memory raw dataset
# --------------------------------------------------------------------------------------------


@dataclass
class RawDataset:
    """A native dataset parsed into arrays, before filtering and feature extraction.

    Attributes:
        name: dataset name (goes into ``meta.json``).
        item_keys: raw id of every catalogue item, in item-table file order.
        item_texts: text of each catalogue item (same order).
        users: ``(n,)`` int64 index into ``user_keys`` per interaction, in file order.
        items: ``(n,)`` int64 index into ``item_keys`` per interaction.
        timestamps: ``(n,)`` timestamps as written to ``interactions.tsv`` (int64, float64 or
            ISO date strings).
        user_keys: raw user ids.
        item_images: image file of each catalogue item (None = no image found), or None when
            the source has no image files.
        image_features: precomputed image token features, one row per catalogue item, or None.
        text_features: precomputed text token features, one row per catalogue item, or None.
        stats: counts gathered while reading (e.g. interactions of unknown items dropped).
    """

    name: str
    item_keys: list[str]
    item_texts: list[str]
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    user_keys: list[str]
    item_images: list[Path | None] | None = None
    image_features: TokenFeatures | None = None
    text_features: TokenFeatures | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.users.shape[0]
        if self.items.shape != (n,) or self.timestamps.shape != (n,):
            raise ValueError(
                f"users, items and timestamps must all have shape ({n},), got "
                f"{self.items.shape} and {self.timestamps.shape}"
            )
        m = len(self.item_keys)
        if len(self.item_texts) != m:
            raise ValueError(f"item_texts must have {m} entries, got {len(self.item_texts)}")
        if self.item_images is not None and len(self.item_images) != m:
            raise ValueError(f"item_images must have {m} entries, got {len(self.item_images)}")
        for arg, feats in (("image_features", self.image_features),
                           ("text_features", self.text_features)):
            if feats is not None and feats.n != m:
                raise ValueError(f"{arg} must have one row per catalogue item ({m}), got {feats.n}")
        if n and (self.items.min() < 0 or self.items.max() >= m):
            raise ValueError("items holds indices outside the catalogue")

    @property
    def n_interactions(self) -> int:
        """Number of interactions."""
        return int(self.users.shape[0])


class _Interactions:
    """Accumulates interactions as integer codes (memory-light for tens of millions of rows)."""

    def __init__(self, item_index: dict[str, int] | None) -> None:
        self.user_index: dict[str, int] = {}
        self.item_index = item_index  # None = collect item ids as they come
        self.new_items: dict[str, int] = {}
        self.users = array("q")
        self.items = array("q")
        self.stamps: list[Any] = []
        self.unknown = 0

    def add(self, user: str, item: str, stamp: Any) -> None:
        if self.item_index is not None:
            code = self.item_index.get(item)
            if code is None:
                self.unknown += 1
                return
        else:
            code = self.new_items.setdefault(item, len(self.new_items))
        self.users.append(self.user_index.setdefault(user, len(self.user_index)))
        self.items.append(code)
        self.stamps.append(stamp)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stamps = self.stamps
        if all(isinstance(s, (int, np.integer)) for s in stamps):
            ts = np.asarray(stamps, dtype=np.int64)
        elif all(isinstance(s, (int, float, np.integer, np.floating)) for s in stamps):
            ts = np.asarray(stamps, dtype=np.float64)
        else:
            ts = np.asarray([str(s) for s in stamps], dtype=str)
        return (np.frombuffer(self.users, dtype=np.int64).copy(),
                np.frombuffer(self.items, dtype=np.int64).copy(), ts)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_TAG_RE = re.compile(r"<[^>]+>")
_WS_RE = re.compile(r"\s+")


def clean_text(text: str, max_chars: int = 2000) -> str:
    """Remove HTML tags and entities, collapse whitespace (tabs and newlines included) and cut
    at ``max_chars`` characters."""
    text = html.unescape(_TAG_RE.sub(" ", text))
    return _WS_RE.sub(" ", text).strip()[:max_chars]


def _join_parts(parts: Iterable[str], max_chars: int) -> str:
    return clean_text(". ".join(p for p in (clean_text(x, max_chars) for x in parts) if p),
                      max_chars)


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _parse_number(value: str, where: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: timestamp {value!r} is not a number") from None


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/<stem><ext>`` for the first extension of :data:`IMAGE_EXTENSIONS` that exists."""
    for ext in IMAGE_EXTENSIONS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _images_for(folder: str | os.PathLike | None, keys: Sequence[str]) -> list[Path | None] | None:
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return [find_image(folder, k) for k in keys]


def _csv_rows(path: str | os.PathLike, delimiter: str = ",") -> Iterator[list[str]]:
    with _open_text(path) as f:
        yield from csv.reader(f, delimiter=delimiter)


def _column_index(header: Sequence[str], names: Sequence[str], path: Any, what: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for n in names:
        if n.lower() in lowered:
            return lowered.index(n.lower())
    raise ValueError(f"{path}: no {what} column; expected one of {list(names)}, header {header}")


def _finish(name: str, keys: list[str], texts: list[str], inter: _Interactions,
            item_images: list[Path | None] | None, **kw: Any) -> RawDataset:
    users, items, stamps = inter.arrays()
    if users.size == 0:
        raise ValueError(f"{name}: no interaction refers to an item of the item table")
    stats = {"interactions_read": int(users.size) + inter.unknown,
             "interactions_unknown_item": inter.unknown, **kw.pop("stats", {})}
    return RawDataset(name, keys, texts, users, items, stamps, list(inter.user_index),
                      item_images, stats=stats, **kw)


# --------------------------------------------------------------------------------------------
# Amazon Reviews 2018
# --------------------------------------------------------------------------------------------


def _json_lines(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                try:  # 2014-style metadata: Python dict literals
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise ValueError(f"{path} line {lineno}: not a JSON object") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path} line {lineno}: not a JSON object")
            yield rec


def _amazon_text(rec: dict[str, Any], max_chars: int) -> str:
    def flat(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (list, tuple)):
            return ", ".join(flat(x) for x in v if flat(x))
        return str(v)

    category = rec.get("category", rec.get("categories"))
    if isinstance(category, list) and category and isinstance(category[0], list):
        category = category[0]  # 2014 layout: list of category paths
    desc = rec.get("description")
    desc = " ".join(str(x) for x in desc) if isinstance(desc, list) else flat(desc)
    return _join_parts([flat(rec.get("title")), flat(rec.get("brand")), flat(category), desc],
                       max_chars)


def read_amazon(
    reviews: str | os.PathLike,
    metadata: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    max_text_chars: int = 2000,
) -> RawDataset:
    """Read an Amazon Reviews 2018 category (see the module docstring for the layout).

    Args:
        reviews: reviews JSON lines (``reviewerID``, ``asin``, ``unixReviewTime``), optionally
            gzipped, or the ratings-only CSV (``item,user,rating,timestamp``, no header).
        metadata: metadata JSON lines (``asin``, ``title``, ``brand``, ``category``,
            ``description``), optionally gzipped; the first record of a duplicated asin wins.
        images: folder of ``<asin>.jpg`` files, or None (then image features must be given to
            :func:`build_dataset_folder`).
        name: dataset name; default from the reviews file name.
    """
    keys: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    for rec in _json_lines(metadata):
        asin = rec.get("asin")
        if asin is None:
            raise ValueError(f"{metadata}: a metadata record has no 'asin'")
        asin = str(asin)
        if asin in index:
            continue
        index[asin] = len(keys)
        keys.append(asin)
        texts.append(_amazon_text(rec, max_text_chars))
    if not keys:
        raise ValueError(f"{metadata} holds no metadata records")
    inter = _Interactions(index)
    rpath = Path(reviews)
    if rpath.name.endswith((".csv", ".csv.gz")):
        for lineno, row in enumerate(_csv_rows(rpath), start=1):
            if not row:
                continue
            if len(row) < 4:
                raise ValueError(f"{rpath} line {lineno}: expected item,user,rating,timestamp")
            inter.add(row[1], row[0], _parse_number(row[3], f"{rpath} line {lineno}"))
    else:
        for lineno, rec in enumerate(_json_lines(rpath), start=1):
            try:
                user, item, stamp = rec["reviewerID"], rec["asin"], rec["unixReviewTime"]
            except KeyError as err:
                raise ValueError(
                    f"{rpath} record {lineno}: missing field {err.args[0]!r} (need reviewerID, "
                    "asin, unixReviewTime)"
                ) from None
            inter.add(str(user), str(item), int(stamp))
    if name is None:
        name = "amazon-" + re.sub(r"(\.json|\.csv)?(\.gz)?$", "", rpath.name)
    return _finish(name, keys, texts, inter, _images_for(images, keys))


def amazon_image_urls(metadata: str | os.PathLike) -> dict[str, str]:
    """First high-resolution image URL per asin of an Amazon 2018 metadata file
    (``imageURLHighRes``, falling back to ``imageURL`` / 2014's ``imUrl``), for downloading
    the images into a local folder as ``<asin>.jpg``."""
    out: dict[str, str] = {}
    for rec in _json_lines(metadata):
        asin = rec.get("asin")
        if asin is None or str(asin) in out:
            continue
        for k in ("imageURLHighRes", "imageURL", "imUrl"):
            v = rec.get(k)
            if isinstance(v, list):
                v = v[0] if v else None
            if v:
                out[str(asin)] = str(v)
                break
    return out


# --------------------------------------------------------------------------------------------
# H&M
# --------------------------------------------------------------------------------------------


def hm_image_path(images: str | os.PathLike, article_id: str) -> Path:
    """``images/<first 3 digits>/<10-digit id>.jpg`` (the Kaggle H&M layout)."""
    aid = str(article_id).zfill(10)
    return Path(images) / aid[:3] / f"{aid}.jpg"


def read_hm(
    transactions: str | os.PathLike,
    articles: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    name: str = "hm",
    max_text_chars: int = 2000,
) -> RawDataset:
    """Read the H&M Personalized Fashion Recommendations data (see the module docstring).

    Item ids are the 10-digit zero-padded article ids; timestamps the ``t_dat`` dates as
    integers ``YYYYMMDD`` (sortable and compact for the 31 million transactions).
    """
    rows = _csv_rows(articles)
    header = next(rows, None)
    if header is None:
        raise ValueError(f"{articles} is empty")
    aid_col = _column_index(header, ["article_id"], articles, "article_id")
    text_cols = [_column_index(header, [c], articles, c) for c in HM_TEXT_COLUMNS]
    keys: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    for row in rows:
        if not row:
            continue
        aid = row[aid_col].strip().zfill(10)
        if aid in index:
            continue
        index[aid] = len(keys)
        keys.append(aid)
        texts.append(_join_parts([row[j] for j in text_cols], max_text_chars))
    inter = _Interactions(index)
    rows = _csv_rows(transactions)
    header = next(rows, None)
    if header is None:
        raise ValueError(f"{transactions} is empty")
    t_col = _column_index(header, ["t_dat"], transactions, "t_dat")
    u_col = _column_index(header, ["customer_id"], transactions, "customer_id")
    a_col = _column_index(header, ["article_id"], transactions, "article_id")
    day_of: dict[str, int] = {}  # "2018-09-20" -> 20180920 (shared int objects: compact)
    for lineno, row in enumerate(rows, start=2):
        if row:
            date = row[t_col]
            day = day_of.get(date)
            if day is None:
                digits = date.strip().replace("-", "")
                if len(digits) != 8 or not digits.isdigit():
                    raise ValueError(f"{transactions} line {lineno}: t_dat {date!r} is not "
                                     "a YYYY-MM-DD date")
                day = day_of[date] = int(digits)
            inter.add(row[u_col], row[a_col].strip().zfill(10), day)
    item_images = None
    if images is not None:
        if not Path(images).is_dir():
            raise FileNotFoundError(f"image folder not found: {images}")
        item_images = []
        for k in keys:
            p = hm_image_path(images, k)
            item_images.append(p if p.is_file() else None)
    return _finish(name, keys, texts, inter, item_images)


# --------------------------------------------------------------------------------------------
# MicroLens
# --------------------------------------------------------------------------------------------


def _two_column_table(path: str | os.PathLike, value_names: Sequence[str],
                      what: str) -> list[tuple[str, str]]:
    """``(item, value)`` rows of a CSV with an optional header."""
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{path} is empty")
    lowered = [h.strip().lower() for h in first]
    item_names = ("item", "item_id", "itemid", "video_id", "videoid", "id")
    has_header = any(n in lowered for n in item_names)
    if has_header:
        i_col = _column_index(first, item_names, path, "item")
        v_col = _column_index(first, value_names, path, what)
        body: Iterable[list[str]] = rows
    else:
        i_col, v_col = 0, 1
        body = [first, *rows]
    out = []
    for row in body:
        if row:
            if len(row) <= max(i_col, v_col):
                raise ValueError(f"{path}: row {row!r} has too few columns")
            out.append((row[i_col].strip(), row[v_col]))
    return out


def read_microlens(
    pairs: str | os.PathLike,
    titles: str | os.PathLike,
    covers: str | os.PathLike | None = None,
    *,
    tags: str | os.PathLike | None = None,
    name: str = "microlens",
    max_text_chars: int = 2000,
) -> RawDataset:
    """Read MicroLens (e.g. MicroLens-100k): ``pairs`` CSV ``user,item,timestamp`` with a
    header, ``titles`` CSV ``item,title``, optional ``tags`` CSV ``item,tags`` (several rows
    per item are joined), cover images ``<covers>/<item>.jpg``. Text = tags + title."""
    tag_text: dict[str, list[str]] = {}
    if tags is not None:
        for item, value in _two_column_table(tags, ("tags", "tag"), "tags"):
            tag_text.setdefault(item, []).append(value)
    keys: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    for item, title in _two_column_table(titles, ("title", "title_en", "text"), "title"):
        if item in index:
            continue
        index[item] = len(keys)
        keys.append(item)
        texts.append(_join_parts([", ".join(tag_text.get(item, [])), title], max_text_chars))
    inter = _Interactions(index)
    rows = _csv_rows(pairs)
    header = next(rows, None)
    if header is None:
        raise ValueError(f"{pairs} is empty")
    u_col = _column_index(header, ["user", "user_id", "userid"], pairs, "user")
    i_col = _column_index(header, ["item", "item_id", "itemid", "videoid", "video_id"], pairs,
                          "item")
    t_col = _column_index(header, ["timestamp", "time", "ts"], pairs, "timestamp")
    for lineno, row in enumerate(rows, start=2):
        if row:
            inter.add(row[u_col].strip(), row[i_col].strip(),
                      _parse_number(row[t_col], f"{pairs} line {lineno}"))
    return _finish(name, keys, texts, inter, _images_for(covers, keys))


# --------------------------------------------------------------------------------------------
# Generic TSV and ml100k-mm
# --------------------------------------------------------------------------------------------


def _read_tsv_columns(path: str | os.PathLike, required: Sequence[str]) -> dict[str, list[str]]:
    with _open_text(path) as f:
        reader = csv.reader(f, dialect="excel-tab")
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header with {list(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks the columns {missing} (header: {header})")
        idx = [header.index(c) for c in required]
        cols: dict[str, list[str]] = {c: [] for c in required}
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(idx):
                raise ValueError(f"{path} line {lineno}: expected at least {max(idx) + 1} fields")
            for c, j in zip(required, idx, strict=True):
                cols[c].append(row[j])
    return cols


def _align_features(feats: TokenFeatures, keys: Sequence[str], what: str) -> TokenFeatures:
    """Rows of ``feats`` in catalogue order: by ``feats.item_ids`` when present, else as is
    (then the row count must equal the catalogue size)."""
    if feats.item_ids is None:
        if feats.n != len(keys):
            raise ValueError(
                f"{what} has {feats.n} rows but the item table lists {len(keys)} items; without "
                "an item_ids array the rows must follow the item table order"
            )
        return feats
    row_of = {k: i for i, k in enumerate(feats.item_ids)}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise ValueError(f"{what} has no row for {len(missing)} items, e.g. {missing[:5]}")
    rows = [row_of[k] for k in keys]
    if rows == list(range(feats.n)):
        return feats
    return feats.select(rows)


def read_tsv(
    interactions: str | os.PathLike,
    items: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    text_columns: Sequence[str] = ("text",),
    image_features: str | os.PathLike | TokenFeatures | None = None,
    text_features: str | os.PathLike | TokenFeatures | None = None,
    name: str | None = None,
    max_text_chars: int = 2000,
) -> RawDataset:
    """Read the generic TSV layout.

    Args:
        interactions: TSV with a header holding ``user_id``, ``item_id``, ``timestamp`` (numbers
            or ISO dates; extra columns are ignored).
        items: TSV with a header holding ``item_id`` and the ``text_columns``.
        images: folder of ``<item_id>.jpg`` files (or None).
        text_columns: columns joined with ``". "`` to form the text (``|`` inside a column
            becomes ``", "``, e.g. genre lists).
        image_features / text_features: precomputed token features (path for
            :func:`odmt_components.features.load_token_features` or a ``TokenFeatures``), rows
            matched by their ``item_ids`` array or else in ``items`` row order.
        name: dataset name; default the folder name of ``interactions``.
    """
    cols = _read_tsv_columns(items, ["item_id", *text_columns])
    keys: list[str] = []
    texts: list[str] = []
    index: dict[str, int] = {}
    for r, key in enumerate(cols["item_id"]):
        if key in index:
            raise ValueError(f"{items}: item id {key!r} occurs twice")
        index[key] = len(keys)
        keys.append(key)
        texts.append(_join_parts([cols[c][r].replace("|", ", ") for c in text_columns],
                                 max_text_chars))
    inter = _Interactions(index)
    icols = _read_tsv_columns(interactions, ["user_id", "item_id", "timestamp"])
    numeric = True
    stamps: list[Any] = []
    for s in icols["timestamp"]:
        try:
            stamps.append(_parse_number(s, str(interactions)))
        except ValueError:
            numeric = False
            break
    if not numeric:
        stamps = icols["timestamp"]
    for u, i, s in zip(icols["user_id"], icols["item_id"], stamps, strict=True):
        inter.add(u, i, s)
    feats = {}
    for arg, value in (("image_features", image_features), ("text_features", text_features)):
        if value is not None:
            tf = value if isinstance(value, TokenFeatures) else load_token_features(value)
            feats[arg] = _align_features(tf, keys, arg)
    if name is None:
        name = Path(interactions).resolve().parent.name or "tsv"
    return _finish(name, keys, texts, inter, _images_for(images, keys), **feats)


def dequantize_ml100k_image_tokens(path: str | os.PathLike) -> TokenFeatures:
    """Load ``image_tokens_mobilenet_v1.npz`` of ml100k-mm as float32 token features.

    ``tokens_uint8`` ``(n, 50, 1024)`` is dequantized with ``scale * (q - zero_point)``:
    ``cls_scale``/``cls_zero_point`` for token 0 (global average pool, the CLS role),
    ``patch_scale``/``patch_zero_point`` for tokens 1..49 (the 7x7 grid). Rows are named by
    the ``item_id`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        need = ["item_id", "tokens_uint8", "cls_scale", "cls_zero_point", "patch_scale",
                "patch_zero_point"]
        missing = [k for k in need if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}")
        q = z["tokens_uint8"]
        if q.ndim != 3 or q.dtype != np.uint8:
            raise ValueError(f"{path}: tokens_uint8 must be uint8 (n, L, d), got {q.dtype} {q.shape}")
        tokens = np.empty(q.shape, dtype=np.float32)
        tokens[:, :1] = float(z["cls_scale"]) * (q[:, :1].astype(np.float32)
                                                 - float(z["cls_zero_point"]))
        tokens[:, 1:] = float(z["patch_scale"]) * (q[:, 1:].astype(np.float32)
                                                   - float(z["patch_zero_point"]))
        ids = [str(x) for x in z["item_id"].tolist()]
    return TokenFeatures(tokens, np.zeros(q.shape[:2], dtype=bool), ids, path)


def read_ml100k_mm(folder: str | os.PathLike, *, max_text_chars: int = 2000) -> RawDataset:
    """Read the ml100k-mm folder: ``interactions.tsv`` (ratings as implicit interactions),
    ``items.tsv`` (text = title, genres, overview) and the dequantized precomputed image
    tokens of ``image_tokens_mobilenet_v1.npz`` (see :func:`dequantize_ml100k_image_tokens`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ml100k-mm folder not found: {folder}")
    raw = read_tsv(folder / "interactions.tsv", folder / "items.tsv",
                   text_columns=ML100K_TEXT_COLUMNS, name="ml100k-mm",
                   image_features=dequantize_ml100k_image_tokens(
                       folder / "image_tokens_mobilenet_v1.npz"),
                   max_text_chars=max_text_chars)
    raw.stats["image_features"] = "mobilenet_v1 (dequantized, image_tokens_mobilenet_v1.npz)"
    return raw


# --------------------------------------------------------------------------------------------
# Filtering and writing
# --------------------------------------------------------------------------------------------


def _time_key(timestamps: np.ndarray) -> np.ndarray:
    if timestamps.dtype.kind in "iuf":
        return timestamps
    return np.unique(timestamps.astype(str), return_inverse=True)[1]


def select_interactions(
    users: np.ndarray,
    time_key: np.ndarray,
    *,
    min_interactions: int = 5,
    keep_last: int | None = 15,
    max_users: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of the interactions that survive the paper's filter, sorted by
    (user, time, file order): users with ``>= min_interactions`` rows, optionally a seeded
    random sample of ``max_users`` of them, each keeping its last ``keep_last`` rows."""
    if min_interactions < 1:
        raise ValueError(f"min_interactions must be >= 1, got {min_interactions}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if max_users is not None and max_users < 1:
        raise ValueError(f"max_users must be >= 1 or None, got {max_users}")
    n = users.shape[0]
    order = np.lexsort((np.arange(n), time_key, users))
    su = users[order]
    counts = np.bincount(su, minlength=int(su.max()) + 1 if n else 0)
    eligible = counts >= min_interactions
    if max_users is not None and int(eligible.sum()) > max_users:
        chosen = np.random.default_rng(seed).choice(np.flatnonzero(eligible), size=max_users,
                                                    replace=False)
        eligible = np.zeros_like(eligible)
        eligible[chosen] = True
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    from_end = counts[su] - 1 - (np.arange(n) - starts[su])
    keep = eligible[su]
    if keep_last is not None:
        keep &= from_end < keep_last
    return order[keep]


def pca_reduce_tokens(tokens: np.ndarray, dim: int, *, padding: np.ndarray | None = None,
                      chunk: int = 256) -> tuple[np.ndarray, dict[str, Any]]:
    """Project ``(n, L, d)`` token features onto their top ``dim`` principal components.

    The PCA is fitted on every token of every row that is not padding (``padding``: optional
    ``(n, L)`` bool, True = padding; float64 covariance accumulated in chunks of ``chunk``
    rows); all tokens (padding included) are centred with the mean token and projected. Each
    component's sign is fixed so that its largest-magnitude loading is positive (deterministic
    output). Returns the float32 ``(n, L, dim)`` tokens and ``{"pca_dim",
    "explained_variance"}`` (the fraction of the total variance kept).
    """
    n, length, d = tokens.shape
    if not isinstance(dim, int) or not 1 <= dim <= d:
        raise ValueError(f"the PCA width must be an int in 1..{d} (the feature width), got {dim!r}")
    if padding is not None and padding.shape != (n, length):
        raise ValueError(f"padding must have shape {(n, length)}, got {padding.shape}")
    count = 0
    total = np.zeros(d, dtype=np.float64)
    gram = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, chunk):
        x = np.asarray(tokens[start:start + chunk], dtype=np.float64).reshape(-1, d)
        if padding is not None:
            x = x[~np.asarray(padding[start:start + chunk]).reshape(-1)]
        count += x.shape[0]
        total += x.sum(0)
        gram += x.T @ x
    mean = total / count
    cov = gram / count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:dim]
    basis = vectors[:, order]
    signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(dim)])
    basis *= np.where(signs == 0, 1.0, signs)
    out = np.empty((n, length, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        x = np.asarray(tokens[start:start + chunk], dtype=np.float64)
        out[start:start + chunk] = (x - mean) @ basis
    kept = float(np.clip(values[order], 0, None).sum() / max(np.clip(values, 0, None).sum(), 1e-300))
    return out, {"pca_dim": dim, "explained_variance": round(kept, 6)}


def _blank_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE), (255, 255, 255))


def build_dataset_folder(
    raw: RawDataset,
    out: str | os.PathLike,
    *,
    text_model: str | os.PathLike | None = "bert-base-uncased",
    image_model: str | os.PathLike | None = "openai/clip-vit-base-patch32",
    text_features: str | os.PathLike | TokenFeatures | None = None,
    image_features: str | os.PathLike | TokenFeatures | None = None,
    missing_images: str = "drop",
    min_interactions: int = 5,
    keep_last: int | None = 15,
    max_users: int | None = None,
    seed: int = 0,
    max_length: int = 30,
    text_batch_size: int = 64,
    image_batch_size: int = 32,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    out_dtype: str = "float16",
    progress: bool = True,
    image_pca_dim: int | None = None,
    text_pca_dim: int | None = None,
) -> Path:
    """Filter ``raw``, extract (or take precomputed) token features and write an
    ``odmt-dataset/1`` folder at ``out`` with :func:`odmt_components.data.save_dataset_folder`.

    Feature sources, in order of precedence: the ``text_features`` / ``image_features``
    arguments (precomputed file or :class:`TokenFeatures`, rows by ``item_ids`` or in catalogue
    order), then those the reader attached to ``raw``, then the encoders ``text_model`` /
    ``image_model`` (image files from ``raw.item_images``). See the module docstring for the
    missing-image policy and the filter. The settings and the counts of what was dropped go
    into ``meta.json`` under ``"prepare"``.

    ``image_pca_dim`` / ``text_pca_dim`` optionally reduce the token width with a PCA fitted
    on the kept items' tokens (non-padding ones for text; :func:`pca_reduce_tokens`), e.g. to
    give image and text CLS features the same width, which the paper's ID-embedding
    initialisation (mean of both) needs, or to make the folder smaller.

    Returns:
        The folder path.

    Raises:
        ValueError: unknown ``missing_images``, no image source, nothing left after filtering,
            items without an image under ``missing_images="error"``.
    """
    if missing_images not in MISSING_IMAGE_POLICIES:
        raise ValueError(
            f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {missing_images!r}"
        )
    keys = raw.item_keys
    tfeat = raw.text_features
    if text_features is not None:
        tf = text_features if isinstance(text_features, TokenFeatures) \
            else load_token_features(text_features)
        tfeat = _align_features(tf, keys, "text_features")
    ifeat = raw.image_features
    if image_features is not None:
        vf = image_features if isinstance(image_features, TokenFeatures) \
            else load_token_features(image_features)
        ifeat = _align_features(vf, keys, "image_features")
    if tfeat is None and text_model is None:
        raise ValueError("no text features: give text_model or text_features")
    if ifeat is None and (image_model is None or raw.item_images is None):
        raise ValueError(
            "no image features: give an image folder to the reader and an image_model, "
            "or image_features"
        )

    # Items usable as candidates: every catalogue item, minus those without an image ("drop").
    usable = np.ones(len(keys), dtype=bool)
    n_no_image = 0
    if ifeat is None:
        assert raw.item_images is not None
        has_image = np.array([p is not None for p in raw.item_images], dtype=bool)
        in_use = np.zeros(len(keys), dtype=bool)
        in_use[raw.items] = True
        lacking = np.flatnonzero(in_use & ~has_image)
        n_no_image = int(lacking.size)
        if n_no_image and missing_images == "error":
            raise ValueError(
                f"{n_no_image} interacted items have no image file, e.g. "
                f"{[keys[i] for i in lacking[:5]]} (missing_images='error')"
            )
        if missing_images == "drop":
            usable = has_image
    row_ok = usable[raw.items]
    rows = np.flatnonzero(row_ok)
    sel = rows[select_interactions(raw.users[rows], _time_key(raw.timestamps[rows]),
                                   min_interactions=min_interactions, keep_last=keep_last,
                                   max_users=max_users, seed=seed)]
    if sel.size == 0:
        raise ValueError(
            f"{raw.name}: no user has >= min_interactions = {min_interactions} interactions "
            "after dropping items without text or image"
        )
    kept_items = np.flatnonzero(np.bincount(raw.items[sel], minlength=len(keys)) > 0)
    item_keys = [keys[i] for i in kept_items]
    texts = [raw.item_texts[i] for i in kept_items]

    np_dtype = {"float16": np.float16, "float32": np.float32}.get(out_dtype)
    if np_dtype is None:
        raise ValueError(f"out_dtype must be 'float16' or 'float32', got {out_dtype!r}")
    if tfeat is not None:
        text = tfeat.select(kept_items)
        text_name = str(tfeat.path) if tfeat.path is not None else "precomputed"
    else:
        assert text_model is not None
        text = extract_text_features(texts, text_model, max_length=max_length,
                                     batch_size=text_batch_size, device=device,
                                     cache_dir=cache_dir, out_dtype=out_dtype, progress=progress)
        text_name = str(text_model)
    if ifeat is not None:
        image = ifeat.select(kept_items)
        image_name = str(ifeat.path) if ifeat.path is not None else "precomputed"
    else:
        assert raw.item_images is not None and image_model is not None
        blank = _blank_image()
        sources = [raw.item_images[i] if raw.item_images[i] is not None else blank
                   for i in kept_items]
        image = extract_image_features(sources, image_model, batch_size=image_batch_size,
                                       device=device, cache_dir=cache_dir, out_dtype=out_dtype,
                                       progress=progress)
        image_name = str(image_model)
    if image.padding.any():
        raise ValueError("image features must not have padding tokens")
    pca_info: dict[str, Any] = {}
    image_tokens_np: np.ndarray = image.tokens
    text_tokens_np: np.ndarray = text.tokens
    if image_pca_dim is not None:
        image_tokens_np, info = pca_reduce_tokens(image.tokens, image_pca_dim)
        pca_info.update({"image_" + k: v for k, v in info.items()})
    if text_pca_dim is not None:
        text_tokens_np, info = pca_reduce_tokens(text.tokens, text_pca_dim,
                                                 padding=np.asarray(text.padding))
        pca_info.update({"text_" + k: v for k, v in info.items()})

    text_tokens = np.asarray(text_tokens_np, dtype=np_dtype)
    image_tokens = np.asarray(image_tokens_np, dtype=np_dtype)
    users = raw.users[sel]
    n_blank = int(sum(raw.item_images[i] is None for i in kept_items)) \
        if ifeat is None and raw.item_images is not None else 0
    extra = {
        "prepare": {
            "source": raw.name,
            "min_interactions": min_interactions,
            "keep_last": keep_last,
            "max_users": max_users,
            "seed": seed,
            "max_length": max_length if tfeat is None else None,
            "missing_images": missing_images,
            **pca_info,
            "items_without_image": n_no_image,
            "items_with_blank_image": n_blank,
            "n_users": int(np.unique(users).size),
            "n_items": len(item_keys),
            "n_interactions": int(sel.size),
            **raw.stats,
        }
    }
    ts = raw.timestamps[sel]
    return save_dataset_folder(
        out,
        {"user_id": [raw.user_keys[u] for u in users.tolist()],
         "item_id": [keys[i] for i in raw.items[sel].tolist()],
         "timestamp": ts.tolist()},
        list(zip(item_keys, texts, strict=True)),
        text_tokens, np.asarray(text.padding), image_tokens,
        name=raw.name, text_encoder=text_name, image_encoder=image_name, extra_meta=extra,
    )

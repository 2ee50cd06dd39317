"""Token-level item features from frozen pre-trained encoders, as ODMT uses them.

ODMT feeds *all* token features of an item's text and image into its item transformer
(SPEC section 1), so this module keeps every token, CLS first:

- :func:`extract_text_features`: any BERT-family checkpoint loadable with
  ``transformers.AutoModel`` + ``AutoTokenizer`` (hub name or local folder; default
  ``bert-base-uncased``). Texts are tokenized to exactly ``max_length`` tokens (default 30,
  CLS included, as in the reference code), the encoder's ``last_hidden_state`` is returned with a
  padding mask (True = padding; token 0 = CLS is never padding).
- :func:`extract_image_features`: CLIP vision towers (``CLIPVisionModel``; a full CLIP checkpoint
  such as the default ``openai/clip-vit-base-patch32`` is loaded as its vision tower) and
  single-tower ViT-style ``AutoModel`` checkpoints (ViT, DeiT, BEiT, DINOv2, ...). Images are
  preprocessed with the checkpoint's *own* image processor (for CLIP: CLIP's mean/std, not 0.5).
  The output is ``last_hidden_state``: CLS + patches (``(n, 1 + 49, 768)`` for ViT-B/32 at 224
  px). Convolutional ``AutoModel`` backbones whose ``last_hidden_state`` is a ``(C, h, w)`` map
  are accepted too: token 0 is the pooled feature (``pooler_output`` or the spatial mean), then
  the ``h * w`` grid row-major.
- :func:`load_token_features`: precomputed token features from ``.npy``, ``.npz`` or
  ``.safetensors`` files instead of running an encoder.

Encoders run frozen: ``eval()`` mode (no dropout), ``torch.inference_mode()``, in batches with a
tqdm progress bar. With ``cache_dir`` set, the result is written once as ``.npy`` files and
later calls with the same model, settings and inputs load them memory-mapped without loading
the model (see :func:`feature_cache_key`). Everything works offline (``HF_HUB_OFFLINE=1``) when
the model is given as a local folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "TokenFeatures",
    "extract_image_features",
    "extract_text_features",
    "feature_cache_key",
    "load_image_encoder",
    "load_text_encoder",
    "load_token_features",
    "save_token_features",
]

#: Bumped whenever the cached arrays would change for the same inputs.
CACHE_FORMAT_VERSION = 1

#: Array names accepted by :func:`load_token_features` in ``.npz`` / ``.safetensors`` files.
TOKENS_KEYS = ("tokens", "features", "token_features")
PADDING_KEYS = ("padding", "padding_mask")
ITEM_ID_KEYS = ("item_ids", "item_id")

_OUT_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class TokenFeatures:
    """Token features of ``n`` items.

    Attributes:
        tokens: ``(n, L, d)`` float16 or float32 array (possibly a read-only memory map); token
            0 is the CLS (or pooled) token.
        padding: ``(n, L)`` bool array, True = padding; column 0 is always False. Image features
            have no padding (all False).
        item_ids: optional ``n`` raw item ids (strings) naming the rows, when the source
            provides them (precomputed files with an ``item_ids`` array).
        path: the folder or file the arrays were loaded from, if any (a cache entry or a
            precomputed file).
    """

    tokens: np.ndarray
    padding: np.ndarray
    item_ids: list[str] | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        _check_token_arrays(self.tokens, self.padding, "tokens", "padding")
        if self.item_ids is not None and len(self.item_ids) != self.tokens.shape[0]:
            raise ValueError(
                f"item_ids has {len(self.item_ids)} entries but tokens has "
                f"{self.tokens.shape[0]} rows"
            )

    @property
    def n(self) -> int:
        """Number of items (rows)."""
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        """Tokens per item ``L``."""
        return int(self.tokens.shape[1])

    @property
    def dim(self) -> int:
        """Feature width ``d``."""
        return int(self.tokens.shape[2])

    def select(self, rows: Sequence[int] | np.ndarray) -> TokenFeatures:
        """Return the features of ``rows`` (in that order) as in-memory arrays."""
        idx = np.asarray(rows, dtype=np.int64)
        ids = None if self.item_ids is None else [self.item_ids[i] for i in idx]
        return TokenFeatures(np.asarray(self.tokens[idx]), np.asarray(self.padding[idx]), ids)


def _check_token_arrays(tokens: Any, padding: Any, tname: str, pname: str) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 3:
        raise ValueError(
            f"{tname} must be a numpy array of shape (n_items, n_tokens, dim), got "
            f"{type(tokens).__name__} with shape {getattr(tokens, 'shape', None)}"
        )
    if tokens.dtype not in (np.float16, np.float32):
        raise TypeError(f"{tname} must be float16 or float32, got {tokens.dtype}")
    if tokens.shape[1] < 1 or tokens.shape[2] < 1:
        raise ValueError(f"{tname} needs at least one token and one feature, got {tokens.shape}")
    if not isinstance(padding, np.ndarray) or padding.dtype != np.bool_:
        raise TypeError(
            f"{pname} must be a bool numpy array of shape {tokens.shape[:2]}, got "
            f"{type(padding).__name__} {getattr(padding, 'dtype', '')}"
        )
    if padding.shape != tokens.shape[:2]:
        raise ValueError(
            f"{pname} must have shape (n_items, n_tokens) = {tokens.shape[:2]}, got {padding.shape}"
        )
    if padding.shape[0] and bool(np.asarray(padding[:, 0]).any()):
        raise ValueError(f"{pname}[:, 0] must be False: token 0 (CLS) is never padding")


# --------------------------------------------------------------------------------------------
# Precomputed features
# --------------------------------------------------------------------------------------------


def _first_key(keys: Sequence[str], wanted: Sequence[str], explicit: str | None) -> str | None:
    if explicit is not None:
        if explicit not in keys:
            raise ValueError(f"array {explicit!r} not found; the file holds {sorted(keys)}")
        return explicit
    for k in wanted:
        if k in keys:
            return k
    return None


def load_token_features(
    path: str | os.PathLike,
    *,
    padding_path: str | os.PathLike | None = None,
    tokens_key: str | None = None,
    padding_key: str | None = None,
    dtype: str | None = None,
) -> TokenFeatures:
    """Load precomputed token features.

    Formats:
        - ``.npy``: the ``(n, L, d)`` float token array alone (opened memory-mapped). A padding
          mask may come from ``padding_path`` (another ``.npy`` with an ``(n, L)`` bool array);
          without one nothing is padding.
        - ``.npz`` / ``.safetensors``: arrays by name. Tokens: ``tokens`` (or ``features``,
          ``token_features``; or ``tokens_key``), ``(n, L, d)`` float16/float32/bfloat16.
          Padding (optional): ``padding`` (or ``padding_mask``; or ``padding_key``), ``(n, L)``
          bool or 0/1 integers, True/1 = padding. Row names (optional): ``item_ids`` (or
          ``item_id``), ``n`` integers or strings, the raw item id of each row.

    Token 0 of every row must be the CLS (or pooled) token and is never padding.

    Args:
        path: the file.
        padding_path: ``.npy`` padding mask for an ``.npy`` token file.
        tokens_key / padding_key: explicit array names inside ``.npz`` / ``.safetensors``.
        dtype: ``"float16"`` or ``"float32"`` to convert the tokens to; default keeps float16
            and float32 as stored (bfloat16 becomes float32).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, missing tokens array, or bad shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token feature file not found: {path}")
    suffix = path.suffix.lower()
    item_ids: list[str] | None = None
    padding: np.ndarray | None = None
    if suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if padding_path is not None:
            padding = np.load(Path(padding_path))
    elif suffix in (".npz", ".safetensors"):
        arrays = _read_named_arrays(path)
        tk = _first_key(list(arrays), TOKENS_KEYS, tokens_key)
        if tk is None:
            raise ValueError(
                f"{path} has no token array; expected one named {' or '.join(TOKENS_KEYS)} "
                f"(or pass tokens_key=), found {sorted(arrays)}"
            )
        tokens = arrays[tk]
        pk = _first_key(list(arrays), PADDING_KEYS, padding_key)
        if pk is not None:
            padding = arrays[pk]
        if padding_path is not None:
            padding = np.load(Path(padding_path))
        ik = _first_key(list(arrays), ITEM_ID_KEYS, None)
        if ik is not None:
            item_ids = [str(x) for x in np.asarray(arrays[ik]).reshape(-1).tolist()]
    else:
        raise ValueError(
            f"unsupported token feature file {path.name!r}: use .npy, .npz or .safetensors"
        )
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 3:
        raise ValueError(
            f"tokens in {path} must have shape (n_items, n_tokens, dim), "
            f"got {getattr(tokens, 'shape', None)}"
        )
    if tokens.dtype not in (np.float16, np.float32):
        if not np.issubdtype(tokens.dtype, np.floating):
            raise TypeError(f"tokens in {path} must be floating point, got {tokens.dtype}")
        tokens = np.asarray(tokens, dtype=np.float32)
    if dtype is not None:
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if tokens.dtype != _OUT_DTYPES[dtype]:
            tokens = np.asarray(tokens, dtype=_OUT_DTYPES[dtype])
    if padding is None:
        padding = np.zeros(tokens.shape[:2], dtype=bool)
    else:
        padding = np.asarray(padding)
        if padding.dtype != np.bool_:
            if not np.issubdtype(padding.dtype, np.integer) or not np.isin(padding, (0, 1)).all():
                raise TypeError(f"padding in {path} must be bool or 0/1, got {padding.dtype}")
            padding = padding.astype(bool)
    return TokenFeatures(tokens, padding, item_ids, path)


def _read_named_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.dtype == torch.bfloat16:
                t = t.float()
            out[k] = t.numpy()
    return out


def save_token_features(
    path: str | os.PathLike, features: TokenFeatures, *, item_ids: Sequence[Any] | None = None
) -> Path:
    """Write ``features`` to ``.npz`` or ``.safetensors`` in the layout of
    :func:`load_token_features` (``tokens``, ``padding``, and ``item_ids`` when given as
    integers or, for ``.npz`` only, strings)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {
        "tokens": np.ascontiguousarray(features.tokens),
        "padding": np.ascontiguousarray(features.padding),
    }
    ids = item_ids if item_ids is not None else features.item_ids
    if ids is not None:
        arr = np.asarray(list(ids))
        if path.suffix.lower() == ".safetensors":
            try:
                arr = arr.astype(np.int64)
            except ValueError as err:
                raise ValueError(
                    "safetensors can only store integer item_ids; use .npz for string ids"
                ) from err
        arrays["item_ids"] = arr
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npz":
        np.savez(path, **arrays)
    elif path.suffix.lower() == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    else:
        raise ValueError(f"path must end in .npz or .safetensors, got {path.name!r}")
    return path


# --------------------------------------------------------------------------------------------
# Cache keys
# --------------------------------------------------------------------------------------------


def _model_fingerprint(model: str | os.PathLike, config: Any) -> dict[str, Any]:
    """Identity of a checkpoint: its name or absolute path, its config, and for a local folder
    the name, size and modification time of every file in it (weights and tokenizer files)."""
    cfg = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "_commit_hash"):
        cfg.pop(k, None)
    fp: dict[str, Any] = {"config": cfg, "commit": getattr(config, "_commit_hash", None)}
    p = Path(model)
    if p.is_dir():
        fp["path"] = str(p.resolve())
        files = []
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                files.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
        fp["files"] = files
    else:
        fp["name"] = str(model)
    return fp


def feature_cache_key(kind: str, model_fp: dict[str, Any], settings: dict[str, Any],
                      inputs_digest: str) -> str:
    """SHA-256 (hex) of the feature kind, the model fingerprint (name or local path, config,
    files), the extraction settings and the digest of the inputs' contents."""
    payload = json.dumps(
        {"v": CACHE_FORMAT_VERSION, "kind": kind, "model": model_fp, "settings": settings,
         "inputs": inputs_digest},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _digest_texts(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _digest_images(images: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            h.update(b"F")
            with open(im, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(b"I" + f"{im.mode}|{im.size}".encode())
            h.update(im.tobytes())
        h.update(b"\x00")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Shared extraction machinery
# --------------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _slug(model: str | os.PathLike) -> str:
    p = Path(model)
    s = f"{p.parent.name}_{p.name}" if p.is_dir() and p.parent.name else (p.name or str(model))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:60]


def _load_cached(entry: Path) -> TokenFeatures | None:
    tok, pad = entry / "tokens.npy", entry / "padding.npy"
    if not (tok.is_file() and pad.is_file()):
        return None
    return TokenFeatures(np.load(tok, mmap_mode="r"), np.load(pad, mmap_mode="r"), None, entry)


def _run_extraction(
    n: int,
    batch_size: int,
    encode: Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]],
    out_dtype: np.dtype,
    entry: Path | None,
    info: dict[str, Any],
    progress: bool,
    desc: str,
) -> TokenFeatures:
    """Run ``encode(start, stop) -> (tokens (b, L, d), padding (b, L) | None)`` over all rows,
    writing into memory-mapped ``.npy`` files of a fresh cache entry (or into memory)."""
    tmp: Path | None = None
    tokens_out: np.ndarray | None = None
    padding_out: np.ndarray | None = None
    try:
        with tqdm(total=n, desc=desc, unit="item", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                tok, pad = encode(start, stop)
                tok_np = tok.detach().float().cpu().numpy().astype(out_dtype, copy=False)
                pad_np = (np.zeros(tok_np.shape[:2], dtype=bool) if pad is None
                          else pad.detach().cpu().numpy().astype(bool))
                if tokens_out is None:
                    shape = (n, *tok_np.shape[1:])
                    if entry is not None:
                        tmp = entry.parent / f"{entry.name}.tmp-{os.getpid()}"
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp.mkdir(parents=True)
                        tokens_out = np.lib.format.open_memmap(
                            tmp / "tokens.npy", mode="w+", dtype=out_dtype, shape=shape)
                        padding_out = np.lib.format.open_memmap(
                            tmp / "padding.npy", mode="w+", dtype=np.bool_, shape=shape[:2])
                    else:
                        tokens_out = np.empty(shape, dtype=out_dtype)
                        padding_out = np.empty(shape[:2], dtype=np.bool_)
                assert padding_out is not None
                tokens_out[start:stop] = tok_np
                padding_out[start:stop] = pad_np
                bar.update(stop - start)
        assert tokens_out is not None and padding_out is not None
        if entry is None:
            return TokenFeatures(tokens_out, padding_out)
        assert tmp is not None
        if isinstance(tokens_out, np.memmap):
            tokens_out.flush()
        if isinstance(padding_out, np.memmap):
            padding_out.flush()
        del tokens_out, padding_out
        (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True, default=str))
        try:
            tmp.rename(entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = None
        cached = _load_cached(entry)
        assert cached is not None
        return cached
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_common(batch_size: int, out_dtype: str) -> np.dtype:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be 'float16' or 'float32', got {out_dtype!r}")
    return np.dtype(_OUT_DTYPES[out_dtype])


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def load_text_encoder(model: str | os.PathLike = "bert-base-uncased",
                      device: str | torch.device | None = None) -> tuple[Any, torch.nn.Module]:
    """Load ``(tokenizer, encoder)`` for a BERT-family checkpoint (hub name or local folder),
    the encoder frozen: ``eval()`` mode, ``requires_grad_(False)``, on ``device``."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.padding_side = "right"
    encoder = AutoModel.from_pretrained(str(model))
    encoder.eval().requires_grad_(False).to(_resolve_device(device))
    return tokenizer, encoder


def extract_text_features(
    texts: Sequence[str],
    model: str | os.PathLike = "bert-base-uncased",
    *,
    max_length: int = 30,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    out_dtype: str = "float16",
    progress: bool = True,
) -> TokenFeatures:
    """Token features of ``texts`` from a frozen BERT-family encoder.

    Each text is tokenized with the checkpoint's own tokenizer to exactly ``max_length`` tokens
    (truncated, right-padded; the first token is the tokenizer's CLS / BOS token) and encoded;
    the encoder's ``last_hidden_state`` is kept at every position.

    Args:
        texts: one string per item (may be empty: CLS + SEP only).
        model: hub name (e.g. ``bert-base-uncased``) or local folder with config, weights and
            tokenizer files.
        max_length: tokens per item including CLS and SEP (the reference code uses 30).
        batch_size: texts per forward pass.
        device: torch device; default CUDA when available, else CPU.
        cache_dir: folder for the on-disk cache; None = no caching. Entries are named
            ``text-<model>-<key>`` where ``key`` hashes the model (name or path, config, local
            files), these settings and the texts; a hit is returned memory-mapped without
            loading the model.
        out_dtype: ``"float16"`` (default; halves disk and memory) or ``"float32"``.
        progress: show a tqdm progress bar.

    Returns:
        :class:`TokenFeatures` with tokens ``(n, max_length, hidden)`` and padding
        ``(n, max_length)`` (True = padding).

    Raises:
        ValueError: empty ``texts``, ``max_length < 2``, bad ``batch_size`` / ``out_dtype``, or
            a tokenizer that does not put a CLS/BOS token first.
        TypeError: ``texts`` is a single string or holds non-strings.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: need at least one text")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] must be str, got {type(texts[bad]).__name__}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (CLS + SEP), got {max_length!r}")
    np_dtype = _check_common(batch_size, out_dtype)

    entry: Path | None = None
    settings = {"max_length": max_length, "out_dtype": out_dtype}
    info: dict[str, Any] = {"kind": "text", "model": str(model), "n": len(texts), **settings}
    if cache_dir is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model))
        key = feature_cache_key("text", _model_fingerprint(model, config), settings,
                                _digest_texts(texts))
        entry = Path(cache_dir) / f"text-{_slug(model)}-{key[:24]}"
        hit = _load_cached(entry)
        if hit is not None:
            return hit
        entry.parent.mkdir(parents=True, exist_ok=True)

    dev = _resolve_device(device)
    tokenizer, encoder = load_text_encoder(model, dev)
    first_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None \
        else tokenizer.bos_token_id

    def encode(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer(texts[start:stop], padding="max_length", truncation=True,
                          max_length=max_length, return_tensors="pt")
        ids = batch["input_ids"]
        if first_id is None or not bool((ids[:, 0] == first_id).all()):
            raise ValueError(
                f"the tokenizer of {model!s} does not put a CLS/BOS token first; "
                "ODMT needs token 0 to be CLS"
            )
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.inference_mode():
            out = encoder(**batch)
        return out.last_hidden_state, batch["attention_mask"] == 0

    return _run_extraction(len(texts), batch_size, encode, np_dtype, entry, info, progress,
                           f"text features ({_slug(model)})")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

_CLIP_TYPES = ("clip", "clip_vision_model")


def load_image_encoder(model: str | os.PathLike = "openai/clip-vit-base-patch32",
                       device: str | torch.device | None = None) -> tuple[Any, torch.nn.Module]:
    """Load ``(image_processor, encoder)`` for a CLIP checkpoint (its vision tower,
    ``CLIPVisionModel``) or a single-tower vision ``AutoModel`` (ViT-style or convolutional),
    frozen: ``eval()`` mode, ``requires_grad_(False)``, on ``device``. The processor is the
    checkpoint's own (``AutoImageProcessor``), so normalisation uses its mean/std."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(str(model))
    if config.model_type in _CLIP_TYPES:
        from transformers.utils import logging as hf_logging

        # A full CLIP checkpoint also holds the text tower, whose weights are (rightly) unused
        # here; silence transformers' report about them.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            encoder = CLIPVisionModel.from_pretrained(str(model))
        finally:
            hf_logging.set_verbosity(level)
    elif hasattr(config, "vision_config") or hasattr(config, "text_config"):
        raise ValueError(
            f"{model!s} is a {config.model_type!r} multi-tower checkpoint; supported image "
            "encoders are CLIP checkpoints and single-tower vision models (ViT, DeiT, BEiT, "
            "DINOv2, ConvNets) loadable with AutoModel"
        )
    else:
        encoder = AutoModel.from_pretrained(str(model))
    processor = AutoImageProcessor.from_pretrained(str(model))
    encoder.eval().requires_grad_(False).to(_resolve_device(device))
    return processor, encoder


def _open_image(im: Any, index: int) -> Any:
    from PIL import Image

    if isinstance(im, (str, os.PathLike)):
        try:
            with Image.open(im) as f:
                return f.convert("RGB")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"images[{index}]: file not found: {im}") from err
        except OSError as err:
            raise ValueError(f"images[{index}]: cannot read image {im}: {err}") from err
    if isinstance(im, Image.Image):
        return im.convert("RGB")
    raise TypeError(f"images[{index}] must be a path or a PIL image, got {type(im).__name__}")


def _image_tokens(out: Any) -> torch.Tensor:
    h = out.last_hidden_state
    if h.ndim == 3:
        return h
    if h.ndim == 4:  # ConvNet feature map (B, C, h, w): pooled token + row-major grid
        pooled = getattr(out, "pooler_output", None)
        pooled = h.mean(dim=(2, 3)) if pooled is None else pooled.reshape(h.shape[0], -1)
        grid = h.flatten(2).transpose(1, 2)
        return torch.cat([pooled[:, None, :], grid], dim=1)
    raise ValueError(f"unsupported image encoder output of shape {tuple(h.shape)}")


def extract_image_features(
    images: Sequence[str | os.PathLike | Any],
    model: str | os.PathLike = "openai/clip-vit-base-patch32",
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    out_dtype: str = "float16",
    progress: bool = True,
) -> TokenFeatures:
    """Token features of ``images`` from a frozen CLIP vision tower or ViT-style encoder.

    Images (file paths or PIL images; converted to RGB) are preprocessed by the checkpoint's
    own image processor (resize, centre crop, its mean/std) and encoded; ``last_hidden_state``
    is kept: CLS first, then every patch (for ConvNets: pooled feature, then the grid).

    Args:
        images: one image per item.
        model: hub name or local folder (config, weights, ``preprocessor_config.json``).
        batch_size, device, cache_dir, out_dtype, progress: as in
            :func:`extract_text_features` (cache entries ``image-<model>-<key>``, the key
            hashing the image files' bytes or the PIL images' pixels).

    Returns:
        :class:`TokenFeatures` with tokens ``(n, 1 + patches, hidden)``; padding all False.

    Raises:
        ValueError: empty ``images``, unreadable image, unsupported checkpoint.
        FileNotFoundError: an image path does not exist (checked before any model is loaded).
        TypeError: an element is neither a path nor a PIL image.
    """
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise TypeError("images must be a sequence of paths or PIL images, not a single one")
    images = list(images)
    if not images:
        raise ValueError("images is empty: need at least one image")
    for i, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            if not Path(im).is_file():
                raise FileNotFoundError(f"images[{i}]: file not found: {im}")
        elif not isinstance(im, Image.Image):
            raise TypeError(f"images[{i}] must be a path or a PIL image, got {type(im).__name__}")
    np_dtype = _check_common(batch_size, out_dtype)

    entry: Path | None = None
    settings: dict[str, Any] = {"out_dtype": out_dtype}
    info: dict[str, Any] = {"kind": "image", "model": str(model), "n": len(images), **settings}
    if cache_dir is not None:
        from transformers import AutoConfig, AutoImageProcessor

        config = AutoConfig.from_pretrained(str(model))
        settings["processor"] = AutoImageProcessor.from_pretrained(str(model)).to_dict()
        key = feature_cache_key("image", _model_fingerprint(model, config), settings,
                                _digest_images(images))
        entry = Path(cache_dir) / f"image-{_slug(model)}-{key[:24]}"
        hit = _load_cached(entry)
        if hit is not None:
            return hit
        entry.parent.mkdir(parents=True, exist_ok=True)

    dev = _resolve_device(device)
    processor, encoder = load_image_encoder(model, dev)

    def encode(start: int, stop: int) -> tuple[torch.Tensor, None]:
        batch = [_open_image(images[i], i) for i in range(start, stop)]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(dev)
        with torch.inference_mode():
            out = encoder(pixel_values=pixels)
        return _image_tokens(out), None

    return _run_extraction(len(images), batch_size, encode, np_dtype, entry, info, progress,
                           f"image features ({_slug(model)})")

"""The ID-aware Multi-modal Transformer (IMT) of ODMT (SPEC section 1).

Per item, the text tokens (CLS first, padded), the image tokens (CLS + patches) and one
ID-embedding token are projected to a common width and encoded together by a small
Transformer whose attention hides padding keys and, with ``id_mask=True``, hides the ID key
from every query but the ID query. The text CLS, image CLS and ID outputs each go through
their own head ``Linear -> LeakyReLU -> Linear`` and become the item's three vectors.

No positional or modality embedding is added, so the outputs do not depend on the token
layout (``"paper"``: ``[image | ID | text]``; ``"reference"``: ``[text | image | ID]``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import ops

__all__ = ["IMT", "IMTLayer", "IMTOutput", "TOKEN_LAYOUTS", "init_id_embedding"]

TOKEN_LAYOUTS = {"paper": ("image", "id", "text"), "reference": ("text", "image", "id")}


class IMTOutput(NamedTuple):
    """The item vectors of the three branches, each ``(B, dim)``; ``id`` is None without ID."""

    id: torch.Tensor | None
    text: torch.Tensor
    image: torch.Tensor


class IMTLayer(nn.Module):
    """One Transformer layer whose attention is :func:`odmt_components.ops.id_masked_attention`.

    Q/K/V/O projections without bias, FFN ``dim -> ffn_dim -> dim`` with ReLU, dropout on
    the attention probabilities and after both sublayers, post-LayerNorm (the reference) or
    pre-LayerNorm (``norm_first=True``).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        ffn_dim: int,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.norm_first = norm_first
        self.backend = ops.check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm_attn = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.norm_ffn = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def _attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, id_index: int | None) -> torch.Tensor:
        batch, length, dim = x.shape
        # (B, L, 3, H, Dh) -> three (B, H, L, Dh) strided views; the op accepts any strides.
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = ops.id_masked_attention(
            q,
            k,
            v,
            key_padding_mask,
            id_index,
            dropout_p=self.attn_dropout if self.training else 0.0,
            backend=self.backend,
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, id_index: int | None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self._attention(self.norm_attn(x), key_padding_mask, id_index))
            return x + self.dropout(self.ffn(self.norm_ffn(x)))
        x = self.norm_attn(x + self.dropout(self._attention(x, key_padding_mask, id_index)))
        return self.norm_ffn(x + self.dropout(self.ffn(x)))


def _branch_head(dim: int, negative_slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(negative_slope), nn.Linear(dim, dim))


class IMT(nn.Module):
    """ID-aware Multi-modal Transformer: one item's tokens in, three item vectors out.

    Args:
        text_dim: width of the text token features (e.g. 768 for BERT).
        image_dim: width of the image token features (e.g. 768 for CLIP ViT-B/32).
        n_items: number of items; the ID table has ``n_items + 1`` rows (row 0 = padding).
            Ignored when ``use_id=False``.
        dim: model width ``d`` (paper: 768).
        n_layers, n_heads: Transformer depth and heads (reference: 2 and 2, head dim 384).
        ffn_dim: feed-forward width (default ``4 * dim``).
        dropout: dropout on the projected inputs and after both sublayers (reference 0.1).
        attn_dropout: dropout on the attention probabilities (reference 0.1).
        id_dim: width of the ID embedding table (default ``text_dim``, so that
            :func:`init_id_embedding` can copy raw CLS features into it).
        token_layout: ``"paper"`` (``[image | ID | text]``) or ``"reference"``
            (``[text | image | ID]``); outputs do not depend on it.
        id_mask: the ID rule (modality queries may not attend the ID key). ``False`` is the
            paper's "w/o ID mask" ablation; padding stays masked either way.
        use_id: ``False`` drops the ID token and branch ("w/o ID" ablation).
        norm_first: pre-LayerNorm instead of the reference's post-LayerNorm.
        layer_norm_eps: LayerNorm epsilon (reference 1e-6).
        negative_slope: LeakyReLU slope of the branch heads.
        backend: attention backend, ``"auto"`` (Triton kernel on CUDA, PyTorch elsewhere),
            ``"torch"`` or ``"triton"``; see :mod:`odmt_components.ops`.
    """

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        n_items: int,
        *,
        dim: int = 768,
        n_layers: int = 2,
        n_heads: int = 2,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        id_dim: int | None = None,
        token_layout: str = "paper",
        id_mask: bool = True,
        use_id: bool = True,
        norm_first: bool = False,
        layer_norm_eps: float = 1e-6,
        negative_slope: float = 0.01,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {sorted(TOKEN_LAYOUTS)}, got {token_layout!r}")
        for name, value in (("text_dim", text_dim), ("image_dim", image_dim), ("dim", dim), ("n_layers", n_layers)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if use_id and n_items <= 0:
            raise ValueError(f"n_items must be positive when use_id=True, got {n_items}")
        self.text_dim, self.image_dim, self.dim = text_dim, image_dim, dim
        self.token_layout = token_layout
        self.id_mask = id_mask
        self.use_id = use_id
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        if use_id:
            id_dim = text_dim if id_dim is None else id_dim
            self.id_embedding = nn.Embedding(n_items + 1, id_dim, padding_idx=0)
            nn.init.xavier_normal_(self.id_embedding.weight)
            with torch.no_grad():
                self.id_embedding.weight[0].zero_()
            self.id_proj = nn.Linear(id_dim, dim)
            self.id_head = _branch_head(dim, negative_slope)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            IMTLayer(dim, n_heads, ffn_dim or 4 * dim, dropout, attn_dropout, norm_first, layer_norm_eps, backend)
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=layer_norm_eps) if norm_first else nn.Identity()
        self.text_head = _branch_head(dim, negative_slope)
        self.image_head = _branch_head(dim, negative_slope)

    @property
    def backend(self) -> str:
        return self.layers[0].backend

    @backend.setter
    def backend(self, value: str) -> None:
        """Force the attention backend of every layer: ``"auto"``, ``"torch"`` or ``"triton"``."""
        ops.check_backend(value)
        for layer in self.layers:
            layer.backend = value

    def _validate(self, text_tokens, text_padding, image_tokens, item_ids) -> None:
        inputs = {"text_tokens": text_tokens, "text_padding": text_padding, "image_tokens": image_tokens}
        for name, value in inputs.items():
            ops._check_tensor(name, value)
        if item_ids is not None:
            ops._check_tensor("item_ids", item_ids)
        if text_tokens.dim() != 3 or text_tokens.shape[-1] != self.text_dim:
            raise ValueError(f"text_tokens must have shape (B, Lt, {self.text_dim}), got {tuple(text_tokens.shape)}")
        batch, text_len = text_tokens.shape[:2]
        if batch == 0 or text_len == 0:
            raise ValueError(f"text_tokens must be non-empty, got shape {tuple(text_tokens.shape)}")
        if text_padding.dtype != torch.bool or text_padding.shape != (batch, text_len):
            raise ValueError(
                f"text_padding must be bool of shape (B, Lt) = {(batch, text_len)}, "
                f"got {text_padding.dtype} {tuple(text_padding.shape)}"
            )
        if image_tokens.dim() != 3 or image_tokens.shape[0] != batch or image_tokens.shape[-1] != self.image_dim:
            raise ValueError(
                f"image_tokens must have shape ({batch}, Lv, {self.image_dim}), got {tuple(image_tokens.shape)}"
            )
        if image_tokens.shape[1] == 0:
            raise ValueError("image_tokens must hold at least the image CLS token")
        if not text_tokens.is_floating_point() or image_tokens.dtype != text_tokens.dtype:
            raise TypeError(
                "text_tokens and image_tokens must share one floating dtype, "
                f"got {text_tokens.dtype} and {image_tokens.dtype}"
            )
        weights = self.text_proj.weight.dtype
        if text_tokens.dtype != weights and not torch.is_autocast_enabled(text_tokens.device.type):
            raise TypeError(
                f"text_tokens and image_tokens have dtype {text_tokens.dtype} but the module's parameters "
                f"{weights}: cast one to the other, or run under torch.autocast"
            )
        if self.use_id:
            if item_ids is None:
                raise ValueError("item_ids (B,) is required when use_id=True")
            if item_ids.dtype not in (torch.int64, torch.int32) or item_ids.shape != (batch,):
                raise ValueError(
                    f"item_ids must be int64 of shape ({batch},), got {item_ids.dtype} {tuple(item_ids.shape)}"
                )
        devices = {t.device for t in (text_tokens, text_padding, image_tokens) if t is not None}
        if item_ids is not None:
            devices.add(item_ids.device)
        if len(devices) > 1:
            raise ValueError(f"inputs are on several devices: {sorted(map(str, devices))}")

        def value_checks() -> list[tuple[torch.Tensor, str]]:  # see ops.set_value_checks
            checks = [(text_padding[:, 0].any(), "text_padding marks a text CLS token (position 0) as padding")]
            if self.use_id:
                n_rows = self.id_embedding.num_embeddings
                outside = ((item_ids < 0) | (item_ids >= n_rows)).any()
                checks.append((outside, f"item_ids must lie in [0, {n_rows}) (0 = padding item)"))
            finite = torch.isfinite(text_tokens).all() & torch.isfinite(image_tokens).all()
            return [*checks, (~finite, "text_tokens or image_tokens contain NaN or inf")]

        ops._check_values(value_checks)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_padding: torch.Tensor,
        image_tokens: torch.Tensor,
        item_ids: torch.Tensor | None = None,
    ) -> IMTOutput:
        """Encode ``B`` items.

        Args:
            text_tokens: ``(B, Lt, text_dim)`` frozen text-encoder features, CLS first.
            text_padding: ``(B, Lt)`` bool, True = padding (position 0, the CLS, never).
            image_tokens: ``(B, Lv, image_dim)`` image-encoder features, CLS first.
            item_ids: ``(B,)`` int64 item ids into the ID table (required with ``use_id``).
        """
        self._validate(text_tokens, text_padding, image_tokens, item_ids)
        batch, text_len = text_padding.shape
        image_len = image_tokens.shape[1]
        parts = {
            "text": (self.text_proj(text_tokens), text_padding),
            "image": (self.image_proj(image_tokens), text_padding.new_zeros(batch, image_len)),
        }
        if self.use_id:
            id_token = self.id_proj(self.id_embedding(item_ids))[:, None, :]
            parts["id"] = (id_token, text_padding.new_zeros(batch, 1))
        order = [m for m in TOKEN_LAYOUTS[self.token_layout] if m in parts]
        offsets, start = {}, 0
        for m in order:
            offsets[m] = start
            start += parts[m][0].shape[1]
        x = self.input_dropout(torch.cat([parts[m][0] for m in order], dim=1))
        key_padding_mask = torch.cat([parts[m][1] for m in order], dim=1)
        id_index = offsets["id"] if self.use_id and self.id_mask else None
        for layer in self.layers:
            x = layer(x, key_padding_mask, id_index)
        x = self.final_norm(x)
        return IMTOutput(
            id=self.id_head(x[:, offsets["id"]]) if self.use_id else None,
            text=self.text_head(x[:, offsets["text"]]),
            image=self.image_head(x[:, offsets["image"]]),
        )


def init_id_embedding(
    embedding: nn.Embedding,
    text_cls: torch.Tensor,
    image_cls: torch.Tensor,
    mode: str = "mean",
) -> None:
    """Initialise an ID table from the items' raw CLS features (row 0, padding, stays zero).

    Args:
        embedding: table with ``n_items + 1`` rows of width ``w``.
        text_cls: ``(n_items + 1, w)`` or ``(n_items, w)`` text CLS features.
        image_cls: the same for image CLS features.
        mode: ``"mean"`` (average of both; the paper's default, needs equal widths),
            ``"text"``, ``"image"`` or ``"random"`` (xavier normal).
    """
    modes = ("mean", "text", "image", "random")
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    rows, width = embedding.weight.shape
    with torch.no_grad():
        if mode == "random":
            nn.init.xavier_normal_(embedding.weight)
            embedding.weight[0].zero_()
            return
        sources = {"text": [text_cls], "image": [image_cls], "mean": [text_cls, image_cls]}[mode]
        for name, feature in zip(
            ("text_cls", "image_cls") if mode == "mean" else (f"{mode}_cls",), sources, strict=False
        ):
            if feature.dim() != 2 or feature.shape[1] != width or feature.shape[0] not in (rows, rows - 1):
                raise ValueError(
                    f"{name} must have shape ({rows} or {rows - 1}, {width}) to initialise a table of "
                    f"shape {(rows, width)} in mode {mode!r}, got {tuple(feature.shape)}"
                )
        value = torch.stack([f[-(rows - 1) :].float() for f in sources]).mean(0)
        if not torch.isfinite(value).all():
            raise ValueError("CLS features contain NaN or inf")
        embedding.weight[1:] = value
        embedding.weight[0].zero_()

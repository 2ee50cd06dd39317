"""Sequence backbones: item vectors + padding -> a user state at every position.

All backbones share one interface::

    forward(item_vectors (B, S, d) float, padding (B, S) bool, True = padding) -> (B, S, d)

with **left padding** (padding positions come first in each row; a row may be all padding).
Guarantees, tested in ``tests/test_backbones.py``:

- causal: the output at position ``t`` depends on the items at positions ``<= t`` only;
- padding never changes outputs at valid positions: neither the feature values at padded
  positions nor the amount of left padding (a sequence gives the same states whether it is
  padded to 8 or to 12 positions);
- outputs at padded positions are zeros.

Backbones (ODMT is model-agnostic, SPEC section 2):

- :class:`SASRec`: learned position embedding aligned to the right end (the last position
  always gets the last position embedding, so left padding does not shift positions),
  ``LayerNorm(x + pos)`` then dropout, ``n_layers`` Transformer blocks with a causal +
  key-padding mask, **post-LN** like the reference SASRec (``x = LN(x + Drop(Attn(x)))``,
  ``x = LN(x + Drop(FFN(x)))``, FFN ``d -> 4d -> d`` with GELU); ``norm_first=True`` gives a
  pre-LN variant with a final LayerNorm.
- :class:`GRU4Rec`: input dropout, a multi-layer GRU, a linear output layer. A GRU started
  on padding steps would carry them into its state, so each row is rotated to right-padded
  form (valid items first), run through the GRU (a causal model ignores what follows), and
  rotated back.
- :class:`NextItNet`: stacked residual blocks of two dilated causal 1-D convolutions
  (dilation ``r`` then ``2r``), each followed by LayerNorm and ReLU. Padded positions are
  set to zero before every convolution, which is exactly the convolution's own causal zero
  padding, so left padding is invisible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["SASRec", "GRU4Rec", "NextItNet", "build_backbone", "BACKBONES"]


def _check_inputs(
    module: str, item_vectors: torch.Tensor, padding: torch.Tensor, dim: int
) -> None:
    if not isinstance(item_vectors, torch.Tensor) or not item_vectors.is_floating_point():
        raise TypeError(f"{module}: item_vectors must be a floating tensor (B, S, {dim})")
    if item_vectors.ndim != 3 or item_vectors.shape[-1] != dim:
        raise ValueError(
            f"{module}: item_vectors must have shape (B, S, {dim}), got {tuple(item_vectors.shape)}"
        )
    batch, seq_len, _ = item_vectors.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"{module}: empty batch, item_vectors has shape {tuple(item_vectors.shape)}")
    if not isinstance(padding, torch.Tensor) or padding.dtype != torch.bool:
        raise TypeError(f"{module}: padding must be a bool tensor (B, S) = ({batch}, {seq_len})")
    if padding.shape != (batch, seq_len):
        raise ValueError(
            f"{module}: padding must have shape (B, S) = ({batch}, {seq_len}), "
            f"got {tuple(padding.shape)}"
        )
    if padding.device != item_vectors.device:
        raise ValueError(
            f"{module}: padding on {padding.device} but item_vectors on {item_vectors.device}"
        )
    if seq_len > 1:  # a value check (ops.set_value_checks): a device assertion under torch.compile
        message = f"{module}: padding must be left padding (True only before the first valid item of each row)"
        ops._check_values(lambda: [((~padding[:, :-1] & padding[:, 1:]).any(), message)])


class _CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        q, k, v = (
            self.qkv(x).view(batch, seq_len, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, seq_len, dim))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.attn = _CausalSelfAttention(dim, n_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.drop1(self.attn(self.norm1(x), allowed))
            return x + self.drop2(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop1(self.attn(x, allowed)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommendation backbone (Kang & McAuley 2018).

    Args:
        dim: width ``d`` of the item vectors and of the output (divisible by ``n_heads``).
        max_seq_len: longest accepted ``S``; size of the learned position table. Positions are
            aligned to the right end: column ``t`` of an input of length ``S`` uses position
            ``max_seq_len - S + t``.
        n_layers, n_heads, dropout: Transformer depth, heads, dropout (embedding, attention
            probabilities, both sublayers, inside the FFN).
        norm_first: False (default) = post-LN like the reference; True = pre-LN with a final
            LayerNorm.

    Padded query rows attend only to themselves (so no row has an empty softmax and no NaN
    arises); valid rows never attend padded keys; padded outputs are zeroed.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int,
        n_layers: int = 2,
        n_heads: int = 2,
        dropout: float = 0.1,
        *,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1 or n_heads < 1 or dim % n_heads:
            raise ValueError(f"SASRec: dim ({dim}) must be a positive multiple of n_heads ({n_heads})")
        if max_seq_len < 1 or n_layers < 0:
            raise ValueError(
                f"SASRec: max_seq_len must be >= 1 and n_layers >= 0, got {max_seq_len}, {n_layers}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SASRec: dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.position = nn.Embedding(max_seq_len, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _TransformerBlock(dim, n_heads, dropout, norm_first) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(dim) if norm_first else nn.Identity()
        nn.init.normal_(self.position.weight, std=dim**-0.5)

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``(B, S, d)`` item vectors and ``(B, S)`` left padding -> ``(B, S, d)`` states."""
        _check_inputs("SASRec", item_vectors, padding, self.dim)
        seq_len = item_vectors.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"SASRec: sequence length S = {seq_len} exceeds max_seq_len = {self.max_seq_len}"
            )
        keep = (~padding)[..., None].to(item_vectors.dtype)
        pos = self.position.weight[self.max_seq_len - seq_len :]
        x = self.input_dropout(self.input_norm(item_vectors * keep + pos))
        index = torch.arange(seq_len, device=item_vectors.device)
        causal = index[None, :] <= index[:, None]
        allowed = (causal[None] & ~padding[:, None, :]) | torch.eye(
            seq_len, dtype=torch.bool, device=item_vectors.device
        )
        allowed = allowed[:, None]  # (B, 1, S, S), broadcast over heads
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x) * keep


class GRU4Rec(nn.Module):
    """GRU-based session model (Hidasi et al. 2016) with one output state per position.

    Args:
        dim: width of the item vectors, the hidden state and the output.
        n_layers: stacked GRU layers (dropout between them when ``n_layers > 1``).
        dropout: dropout on the input vectors (and between GRU layers).
    """

    def __init__(self, dim: int, n_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if dim < 1 or n_layers < 1:
            raise ValueError(f"GRU4Rec: dim and n_layers must be >= 1, got {dim}, {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GRU4Rec: dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(
            dim, dim, num_layers=n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )
        self.output = nn.Linear(dim, dim)

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``(B, S, d)`` item vectors and ``(B, S)`` left padding -> ``(B, S, d)`` states."""
        _check_inputs("GRU4Rec", item_vectors, padding, self.dim)
        seq_len = item_vectors.shape[1]
        n_pad = padding.sum(1, keepdim=True)
        index = torch.arange(seq_len, device=item_vectors.device)[None, :]
        # Rotate each row left by its padding count: valid items first, padding last.
        to_right = ((index + n_pad) % seq_len)[..., None].expand(-1, -1, self.dim)
        x = self.input_dropout(item_vectors.gather(1, to_right))
        states, _ = self.gru(x)
        from_right = ((index - n_pad) % seq_len)[..., None].expand(-1, -1, self.dim)
        out = self.output(states).gather(1, from_right)
        return out * (~padding)[..., None].to(out.dtype)


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size, dilation=2 * dilation)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pad1 = (kernel_size - 1) * dilation
        self.pad2 = (kernel_size - 1) * 2 * dilation

    @staticmethod
    def _conv(conv: nn.Conv1d, x: torch.Tensor, left: int, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, S, d); zero padded positions, pad on the left (causal), convolve over S.
        h = F.pad((x * keep).transpose(1, 2), (left, 0))
        return conv(h).transpose(1, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self._conv(self.conv1, x, self.pad1, keep)))
        h = F.relu(self.norm2(self._conv(self.conv2, h, self.pad2, keep)))
        return x + self.dropout(h)


class NextItNet(nn.Module):
    """Dilated causal convolution backbone (Yuan et al. 2019).

    Args:
        dim: width of the item vectors, the channels and the output.
        dilations: one residual block per entry; block ``r`` convolves with dilation ``r``
            then ``2r``.
        kernel_size: convolution width (>= 1).
        dropout: dropout on the input and on each block's residual branch.
    """

    def __init__(
        self,
        dim: int,
        dilations: tuple[int, ...] = (1, 2, 4, 1, 2, 4),
        kernel_size: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        dilations = tuple(dilations)
        if dim < 1 or kernel_size < 1 or any(not isinstance(r, int) or r < 1 for r in dilations):
            raise ValueError(
                f"NextItNet: dim, kernel_size and dilations must be positive ints, got {dim}, "
                f"{kernel_size}, {dilations}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"NextItNet: dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_ResidualBlock(dim, kernel_size, r, dropout) for r in dilations)

    def forward(self, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """``(B, S, d)`` item vectors and ``(B, S)`` left padding -> ``(B, S, d)`` states."""
        _check_inputs("NextItNet", item_vectors, padding, self.dim)
        keep = (~padding)[..., None].to(item_vectors.dtype)
        x = self.input_dropout(item_vectors) * keep
        for block in self.blocks:
            x = block(x, keep) * keep
        return x


BACKBONES: dict[str, type[nn.Module]] = {"sasrec": SASRec, "gru4rec": GRU4Rec, "nextitnet": NextItNet}


def build_backbone(name: str, dim: int, max_seq_len: int, **kw: object) -> nn.Module:
    """Backbone by (case-insensitive) name: ``"sasrec"``, ``"gru4rec"`` or ``"nextitnet"``.

    ``max_seq_len`` is used by SASRec only; ``kw`` go to the constructor (e.g. ``n_layers``,
    ``n_heads``, ``dropout``, ``dilations``, ``kernel_size``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if key == "sasrec":
        return SASRec(dim, max_seq_len, **kw)  # type: ignore[arg-type]
    return BACKBONES[key](dim, **kw)  # type: ignore[arg-type]


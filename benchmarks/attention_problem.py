"""The attention benchmark's problem (the anchors' shapes of ``shared/anchors/anchors_gpu.py``),
shared by ``bench_attention.py`` and ``profile_kernels.py``: 1,664 items of L = 81 tokens
(50 image patches, the ID token at 50, 30 text tokens of which the first 4..30 are real),
bf16 on the GPU; with ``DRY=1``, 2 items of L = 12 in float32 on the CPU (the interpreter is
wrong in bf16)."""

from __future__ import annotations

import os

import torch

DRY = os.environ.get("DRY", "0") not in ("", "0")
DEV = "cpu" if DRY else "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16
ITEMS = 2 if DRY else 1664
N_IMG, N_TXT = (5, 6) if DRY else (50, 30)
#: (heads, head dim, tag): 2 x 384 is the reference ODMT setting (width 768)
CONFIGS = [(2, 384, "h2d384"), (12, 64, "h12d64"), (4, 64, "h4d64")]


def inputs(heads: int, dim: int, drawn_on_device: bool = False):
    """q, k, v (requiring grad), grad_out, text lengths, key validity ``(ITEMS, L)``.
    ``drawn_on_device``: the random numbers come from a generator on ``DEV`` (other values,
    the same shapes and layouts; drawing ~1.4 G numbers on the CPU takes seconds)."""
    length, id_pos = N_IMG + 1 + N_TXT, N_IMG
    where = DEV if drawn_on_device else "cpu"
    g = torch.Generator(device=where).manual_seed(0)
    txt_len = torch.randint(4, N_TXT + 1, (ITEMS,), generator=g, device=where).to(DEV)  # includes CLS
    shape = (ITEMS, heads, length, dim)
    q, k, v = (torch.randn(shape, generator=g, device=where).to(DEV, DTYPE).requires_grad_() for _ in range(3))
    grad_out = torch.randn(shape, generator=g, device=where).to(DEV, DTYPE)
    pos = torch.arange(length, device=DEV)
    key_valid = (pos[None, :] <= id_pos) | (pos[None, :] - id_pos - 1 < txt_len[:, None])
    return q, k, v, grad_out, txt_len, key_valid

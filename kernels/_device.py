"""Launching on the inputs' GPU.

Triton launches a kernel on the *current* CUDA device, with that device's current stream. For
tensors on another GPU (``cuda:1`` while ``cuda:0`` is current, as in model-parallel code that
never calls ``torch.cuda.set_device``) the kernel would run on the wrong device with pointers
it cannot read. Every custom op of this package launches inside :func:`on_device_of` its
first tensor argument.
"""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``tensor``'s CUDA device made current for the block (restored after it); nothing for
    a CPU tensor (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()

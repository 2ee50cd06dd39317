"""Launching on the inputs' GPU.

Triton launches a kernel on the *current* CUDA device, with that device's current stream. For
tensors on another GPU (``cuda:1`` while ``cuda:0`` is current, as in model-parallel code that
never calls ``torch.cuda.set_device``) the kernel would run on the wrong device with pointers
it cannot read. Every custom op of this package launches inside :func:`on_device_of` its
first tensor argument.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``tensor``'s CUDA device made current for the block (restored after it); nothing for
    a CPU tensor (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (its index, else the current device's),
    queried once a device: the property query costs microseconds of host time, and the launch
    rules ask on every launch."""
    return _sms_of_index(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _sms_of_index(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Parameters are plain tensors to the dispatcher; every other subclass (FakeTensor, DTensor,
# a functional or traced wrapper) may need what only the custom op's registration gives.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def direct_eager_call(*tensors: torch.Tensor | None) -> bool:
    """Whether a public kernel entry point may run its kernels through a plain
    ``torch.autograd.Function`` instead of its registered custom op: plain tensors only, no
    ``torch.compile`` or ``torch.jit.trace`` tracing (a trace records the custom op, not the
    launches inside a Python function), no dispatch mode (fake tensors, ``opcheck``'s checks,
    flop counters) and no functorch transform active.

    Both routes run the same launch functions on the same inputs, so they compute the same
    thing; the custom op's dispatcher route costs host time on every call (argument
    normalisation, a redispatch each way, the generated autograd function: about half the host
    time of an eager attention fwd + bwd at ODMT's sizes on a CPU like the CI's), which at the
    sizes ODMT trains with is the call's wall time, not the kernels'. Under ``torch.compile``
    (and wherever the checks above fail) the custom op runs, which is what tracing needs."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TENSOR_TYPES for t in tensors)

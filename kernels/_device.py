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
import os
import re

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


def _release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``"3.6.0"`` or ``"2.4.0rc1"``; None when it
    does not start with two numbers (a local build's own scheme)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return None if found is None else (int(found.group(1)), int(found.group(2)))


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter (``TRITON_INTERPRET=1``) of ``triton_version`` cannot run these
    kernels with NumPy ``numpy_version``, or None when it can (or a version cannot be read).

    Before Triton 3.7 the interpreter turns a loop bound held in a tensor (``range(0, n)`` with a
    runtime ``n``: every kernel here has one) into an int by ``int()`` of a one-element array,
    which NumPy 2.4 refuses; every launch then fails with a ``TypeError`` about 0-dimensional
    arrays (triton-lang/triton#9171, fixed in 3.7). Compiled launches on a GPU are not
    affected."""
    triton_release, numpy_release = _release(triton_version), _release(numpy_version)
    if triton_release is None or numpy_release is None:
        return None
    if triton_release < (3, 7) and numpy_release >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels with "
            f"NumPy {numpy_version}: it converts loop bounds with int() of one-element arrays, which NumPy "
            "2.4 refuses (triton-lang/triton#9171, fixed in Triton 3.7). Install numpy<2.4 or triton>=3.7."
        )
    return None


@functools.cache
def _installed_interpreter_problem() -> str | None:
    """:func:`interpreter_problem` of the installed Triton and NumPy when the interpreter is on
    (``TRITON_INTERPRET``, which Triton too reads once, when it decorates the kernels), else
    None; decided once, so that a compiled launch pays one cached call."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


def check_interpreter() -> None:
    """Raise a ``RuntimeError`` saying why, before a launch, where the interpreter is on and the
    installed Triton and NumPy cannot run the kernels (:func:`interpreter_problem`)."""
    problem = _installed_interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)

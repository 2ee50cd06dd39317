"""Functional ops of odmt-components: the one place that picks a Triton kernel or PyTorch.

Each op takes ``backend="auto" | "torch" | "triton"``:

- ``"torch"``: the plain-PyTorch definition (``odmt_components.kernels.reference``); runs on
  any device, materialises the attention mask / logits matrix.
- ``"triton"``: the fused Triton kernel (``odmt_components.kernels``). Needs CUDA tensors, or
  CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported (slow; for tests).
- ``"auto"``: ``"triton"`` for CUDA tensors in float16, bfloat16 or float32 when triton is
  installed, ``"torch"`` otherwise (float64, CPU).

The default backend for ``"auto"`` can be forced globally with :func:`set_backend` (or the
``ODMT_BACKEND`` environment variable), e.g. to compare both paths inside a model.

All ops validate their inputs here, once, and raise ``ValueError`` / ``TypeError`` naming the
argument and the expected shape; the kernels assume validated inputs. The checks that read
values (targets in range, finite ``log_q``) cost one device-to-host transfer a call; they are
device assertions under ``torch.compile`` and can be turned off (:func:`set_value_checks`).
Every op traces whole under ``torch.compile(fullgraph=True)``, either backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import numbers
import operator
import os
from collections.abc import Callable, Mapping
from types import ModuleType

import torch

from .kernels.reference import (
    BRANCHES,
    DistillationLosses,
    debiased_inbatch_cross_entropy_reference,
    id_masked_attention_reference,
    mutual_distillation_reference,
)

__all__ = [
    "BRANCHES",
    "DistillationLosses",
    "check_backend",
    "debiased_inbatch_cross_entropy",
    "get_backend",
    "id_masked_attention",
    "mutual_distillation_loss",
    "resolve_backend",
    "set_backend",
    "set_value_checks",
    "triton_available",
    "value_checks",
]

_BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_default_backend = os.environ.get("ODMT_BACKEND", "auto")
_value_checks = os.environ.get("ODMT_VALUE_CHECKS", "1") != "0"


def check_backend(backend: object) -> str:
    """``backend`` if it is ``"auto"``, ``"torch"`` or ``"triton"``; a ``ValueError`` otherwise
    (the one check of a backend name: ops, the loss modules, IMT)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def set_backend(backend: str) -> None:
    """Set what ``backend="auto"`` means for every op: ``"auto"``, ``"torch"`` or ``"triton"``."""
    global _default_backend
    _default_backend = check_backend(backend)


def set_value_checks(enabled: bool) -> None:
    """Whether inputs' *values* are checked (default on; ``ODMT_VALUE_CHECKS=0`` in the
    environment turns the checks off at import): by the in-batch loss ops, targets inside
    ``[0, N)`` or ``ignore_index``, no target on a padding column, a finite ``log_q``; by
    :class:`~odmt_components.IMT`, no padded text CLS, finite features, item ids in range; by
    the backbones, left padding.

    In eager mode the checks read their verdict back from the device, one transfer per call
    that waits for the work queued before it; under ``torch.compile`` they are asynchronous
    device assertions (``torch._assert_async``: a ``RuntimeError`` on the CPU, a device-side
    assert on CUDA). Turn them off for CUDA-graph capture (no transfer is allowed while
    capturing) or to keep the host ahead of the GPU in a validated pipeline; shapes, dtypes and
    devices are always checked. Without the checks a target outside ``[0, N)`` reads out of
    bounds and a target on a padding column or a non-finite ``log_q`` gives an undefined loss
    (the two backends may differ there).
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks() -> bool:
    """Whether input values are checked (see :func:`set_value_checks`)."""
    return _value_checks


def get_backend() -> str:
    """The global backend that ``backend="auto"`` resolves through (see :func:`set_backend`)."""
    return _default_backend


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) an op will run for inputs on ``device``
    of ``dtype``: ``"auto"`` takes the kernels for CUDA tensors in a dtype they take (float16,
    bfloat16, float32; any when ``dtype`` is None) and PyTorch otherwise."""
    if check_backend(backend) == "auto":
        backend = _default_backend
        if backend not in _BACKENDS:
            raise ValueError(f"ODMT_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        kernel_dtype = dtype is None or dtype in _KERNEL_DTYPES
        return "triton" if device.type == "cuda" and kernel_dtype and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton; Linux only)")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors; got tensors on {device}. For CPU "
                "tensors set TRITON_INTERPRET=1 before importing triton (slow, for testing)."
            )
    return backend


def _kernel_module(name: str) -> ModuleType:
    """A kernel module, imported on first use (triton loads only when a kernel runs). Plain
    import statements: ``torch.compile`` executes them while tracing, where a call of
    ``importlib.import_module`` would break the graph."""
    if name == "attention":
        from .kernels import attention as module
    elif name == "inbatch_loss":
        from .kernels import inbatch_loss as module
    else:
        raise ValueError(f"no kernel module named {name!r}")
    return module


# --------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(name: str, value: torch.Tensor, dtypes=_FLOAT_DTYPES) -> None:
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype in {dtypes}, got {value.dtype}")


def _check_int(name: str, value: torch.Tensor) -> None:
    if value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {value.dtype}")


def _check_index(name: str, value: object) -> int:
    """An int argument (``pad_id``, ``ignore_index``): Python or NumPy ints, not bools or tensors
    (a tensor's value would be read back from the device)."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def _autocast(*tensors: object) -> tuple:
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    The loss ops are matmuls at heart, so under ``torch.autocast`` they take the autocast
    dtype like ``torch.mm`` does (e.g. bf16 item vectors from a Linear and float32 user
    states from a LayerNorm). Outside autocast, mismatched dtypes are an error.
    """
    device_type = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for a PyTorch path whose inputs :func:`_autocast` already cast: its float32
    parts (logits, softmax) stay float32, as in the kernels, instead of being cast back."""
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------
# ID-masked attention
# --------------------------------------------------------------------------------------


def id_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    id_index: int | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention inside each item with the IMT's ID rule.

    ``softmax(q k^T * scale + mask) v`` where the mask hides padding keys and, when
    ``id_index`` is set, hides the key at ``id_index`` from every query but the one at
    ``id_index`` (the ID token sees all modalities; no modality token sees the ID).

    Args:
        q, k, v: ``(B, H, L, D)`` of one floating dtype, on one device. Any strides.
        key_padding_mask: ``(B, L)`` bool, True = padding key (``nn.MultiheadAttention``
            convention), or None for no padding.
        id_index: position of the ID token in ``[0, L)``, or None for no ID rule.
        dropout_p: dropout probability on the attention probabilities (pass 0 in eval). On
            the triton backend each call draws a fresh seed on the device from torch's
            generator (``torch.manual_seed`` repeats a run; a CUDA graph redraws it at every
            replay).
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see module docstring).

    Returns:
        ``(B, H, L, D)`` in the dtype of ``q``. A query row without any attendable key
        (every key padding) outputs zeros.
    """
    q, k, v = (_check_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, L, D), got {tuple(q.shape)}")
    for name, value in (("k", k), ("v", v)):
        if value.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(value.shape)}")
        if value.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but q has {q.dtype}")
    _check_float("q", q)
    batch, _, length, head_dim = q.shape
    if batch == 0 or length == 0 or head_dim == 0:
        raise ValueError(f"q must be non-empty in B, L and D, got shape {tuple(q.shape)}")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (batch, length):
            raise ValueError(
                f"key_padding_mask must have shape (B, L) = {(batch, length)}, got {tuple(key_padding_mask.shape)}"
            )
    _check_same_device("q", q, k=k, v=v, key_padding_mask=key_padding_mask)
    if id_index is not None:
        if isinstance(id_index, bool) or not isinstance(id_index, int):
            raise TypeError(f"id_index must be an int or None, got {type(id_index).__name__}")
        if not 0 <= id_index < length:
            raise ValueError(f"id_index must lie in [0, L={length}), got {id_index}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if resolve_backend(backend, q.device, q.dtype) == "torch":
        return id_masked_attention_reference(q, k, v, key_padding_mask, id_index, dropout_p=dropout_p, scale=scale)
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes {_KERNEL_DTYPES}, got q of {q.dtype}")
    # drawn on the device (torch's generator): eager runs repeat under torch.manual_seed, a
    # compiled graph draws in-graph, and a CUDA graph redraws it at every replay
    seed = torch.randint(0, 2**31 - 1, (1,), device=q.device) if dropout_p > 0.0 else 0
    return _kernel_module("attention").id_masked_attention(q, k, v, key_padding_mask, id_index, dropout_p, scale, seed)


# --------------------------------------------------------------------------------------
# Debiased in-batch softmax
# --------------------------------------------------------------------------------------


def _validate_inbatch(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    log_q: torch.Tensor | None,
    pad_id: int,
    ignore_index: int,
    queries_name: str = "queries",
    candidates_name: str = "candidates",
    check_values: bool = True,
) -> None:
    _check_tensor(queries_name, queries)
    _check_tensor(candidates_name, candidates)
    _check_tensor("target", target)
    _check_tensor("candidate_ids", candidate_ids)
    if queries.dim() != 2:
        raise ValueError(f"{queries_name} must have shape (R, d), got {tuple(queries.shape)}")
    if candidates.dim() != 2:
        raise ValueError(f"{candidates_name} must have shape (N, d), got {tuple(candidates.shape)}")
    rows, width = queries.shape
    columns = candidates.shape[0]
    if rows == 0:
        raise ValueError(f"{queries_name} is empty: R = 0 rows")
    if columns == 0:
        raise ValueError(f"{candidates_name} is empty: N = 0 columns")
    if candidates.shape[1] != width:
        raise ValueError(
            f"{candidates_name} must have width d = {width} like {queries_name}, got shape {tuple(candidates.shape)}"
        )
    _check_float(queries_name, queries)
    if candidates.dtype != queries.dtype:
        raise TypeError(f"{candidates_name} has dtype {candidates.dtype} but {queries_name} has {queries.dtype}")
    _check_int("target", target)
    _check_int("candidate_ids", candidate_ids)
    if target.shape != (rows,):
        raise ValueError(f"target must have shape (R,) = ({rows},), got {tuple(target.shape)}")
    if candidate_ids.shape != (columns,):
        raise ValueError(f"candidate_ids must have shape (N,) = ({columns},), got {tuple(candidate_ids.shape)}")
    if exclude_ids is not None:
        _check_tensor("exclude_ids", exclude_ids)
        _check_int("exclude_ids", exclude_ids)
        if exclude_ids.dim() != 2 or exclude_ids.shape[0] != rows:
            raise ValueError(f"exclude_ids must have shape (R, S) with R = {rows}, got {tuple(exclude_ids.shape)}")
    if log_q is not None:
        _check_tensor("log_q", log_q)
        _check_float("log_q", log_q)
        if log_q.shape != (columns,):
            raise ValueError(f"log_q must have shape (N,) = ({columns},), got {tuple(log_q.shape)}")
    _check_same_device(
        queries_name,
        queries,
        **{candidates_name: candidates},
        target=target,
        candidate_ids=candidate_ids,
        exclude_ids=exclude_ids,
        log_q=log_q,
    )
    if check_values:
        _check_values(lambda: _inbatch_value_checks(target, candidate_ids, log_q, pad_id, ignore_index, columns))


def _inbatch_value_checks(
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    pad_id: int,
    ignore_index: int,
    columns: int,
) -> list[tuple[torch.Tensor, str]]:
    """The in-batch ops' checks that read values, for :func:`_check_values`."""
    valid = target != ignore_index
    outside = valid & ((target < 0) | (target >= columns))
    on_padding = valid & ~outside & (candidate_ids[torch.where(outside | ~valid, 0, target)] == pad_id)
    checks = [
        (
            outside.any(),
            f"target holds column indices outside [0, N={columns}) that are not ignore_index={ignore_index}",
        ),
        (on_padding.any(), f"target points at a padding column (candidate_ids == pad_id={pad_id})"),
    ]
    if log_q is not None:
        checks.append((~torch.isfinite(log_q).all(), "log_q contains NaN or inf"))
    return checks


def _check_values(make_checks: Callable[[], list[tuple[torch.Tensor, str]]]) -> None:
    """Runs the checks that read input values, unless they are off (:func:`set_value_checks`:
    then ``make_checks`` is not even called, so no check costs a launch). ``make_checks()``
    returns (boolean scalar tensor, True when the input is bad; error message) pairs. Eager:
    one device-to-host transfer for all of them, then a ``ValueError`` with the first bad
    one's message. Under ``torch.compile``: one asynchronous device assertion each (reading a
    value would break the graph)."""
    if not _value_checks:
        return
    checks = make_checks()
    if torch.compiler.is_compiling():
        for bad, message in checks:
            torch._assert_async(~bad, message)
        return
    verdicts = torch.stack([bad for bad, _ in checks]).tolist()
    for bad, (_, message) in zip(verdicts, checks, strict=True):
        if bad:
            raise ValueError(message)


def debiased_inbatch_cross_entropy(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    *,
    exclude_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    pad_id: int = 0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """In-batch softmax cross-entropy with logQ correction and false-negative exclusion.

    Row ``r`` scores column ``j`` as ``<queries[r], candidates[j]> - log_q[j]`` over the
    columns not excluded for it: padding columns (``candidate_ids == pad_id``), every other
    copy of the target item, and every column whose item is in ``exclude_ids[r]``; the
    target column is never excluded (SPEC section 3).

    Args:
        queries: ``(R, d)`` user states, one row per training position.
        candidates: ``(N, d)`` item vectors, same dtype and width.
        target: ``(R,)`` int, the column of each row's positive, or ``ignore_index``.
        candidate_ids: ``(N,)`` int, the item id of each column; ``pad_id`` marks padding.
        exclude_ids: ``(R, S)`` int item ids that are false negatives for the row (padded
            with ``pad_id``), e.g. the user's whole sequence; any strides (a stride-0
            expanded view is not copied by the kernel).
        log_q: ``(N,)`` log sampling probability of each column's item (no gradient: it is
            detached).
        pad_id, ignore_index: ints (Python or NumPy).
        reduction: ``"mean"`` over valid rows (0 when there is none), ``"sum"`` or ``"none"``
            (``(R,)``, 0 on ignored rows).

    Returns:
        The loss in float32 (float64 for float64 inputs).
    """
    pad_id, ignore_index = _check_index("pad_id", pad_id), _check_index("ignore_index", ignore_index)
    queries, candidates = _autocast(queries, candidates)
    _validate_inbatch(queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    log_q = None if log_q is None else log_q.detach()  # a correction, not a parameter
    if resolve_backend(backend, queries.device, queries.dtype) == "torch":
        with _without_autocast(queries.device):
            return debiased_inbatch_cross_entropy_reference(
                queries,
                candidates,
                target,
                candidate_ids,
                exclude_ids,
                log_q,
                pad_id=pad_id,
                ignore_index=ignore_index,
                reduction=reduction,
            )
    if queries.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes {_KERNEL_DTYPES}, got queries of {queries.dtype}")
    return _kernel_module("inbatch_loss").debiased_inbatch_cross_entropy(
        queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index, reduction
    )


def _branch_tensors(name: str, value: object) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict with keys {BRANCHES}, got {type(value).__name__}")
    if set(value) != set(BRANCHES):
        raise ValueError(f"{name} must have exactly the keys {BRANCHES}, got {sorted(value)}")
    return {m: value[m] for m in BRANCHES}


def mutual_distillation_loss(
    queries: Mapping[str, torch.Tensor],
    candidates: Mapping[str, torch.Tensor],
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    *,
    exclude_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    temperature: float = 1.0,
    detach_teacher: bool = True,
    form: str = "kl",
    pad_id: int = 0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> DistillationLosses:
    """ODMT's objective: three branch CEs and the online distillation terms (SPEC section 4).

    ``queries`` / ``candidates`` map ``"id"``, ``"text"``, ``"image"`` to ``(R, d)`` /
    ``(N, d)`` tensors (widths may differ between branches). All branches share the
    candidate set, targets, exclusion and ``log_q`` of
    :func:`debiased_inbatch_cross_entropy`.

    With ``z^m`` the masked debiased logits and ``z^e = (z^id + z^text + z^image) / 3``:
    ``ce = CE(z^id) + CE(z^text) + CE(z^image)`` and
    ``kl = T^2 [KL(s(z^id/T) || s(z^text/T)) + KL(s(z^id/T) || s(z^image/T))
    + KL(s(z^e/T) || s(z^id/T))]`` (teacher first). ``detach_teacher=False, form="ce"``
    reproduces the reference code (cross-entropy form, gradients reach the teachers).

    Returns:
        :class:`DistillationLosses` with ``ce``, ``kl`` and their parts.
    """
    queries = _branch_tensors("queries", queries)
    candidates = _branch_tensors("candidates", candidates)
    pad_id, ignore_index = _check_index("pad_id", pad_id), _check_index("ignore_index", ignore_index)
    cast = _autocast(*queries.values(), *candidates.values())
    queries, candidates = dict(zip(BRANCHES, cast[:3], strict=True)), dict(zip(BRANCHES, cast[3:], strict=True))
    # first the branches against each other, so that a wrong one is named (checked against the
    # shared arguments first, its own R or N would make target or candidate_ids look wrong)
    for name, branches in (("queries", queries), ("candidates", candidates)):
        for m in BRANCHES:
            if _check_tensor(f"{name}[{m!r}]", branches[m]).dim() != 2:
                rows_name = "R" if name == "queries" else "N"
                raise ValueError(f"{name}[{m!r}] must have shape ({rows_name}, d), got {tuple(branches[m].shape)}")
        for m in BRANCHES[1:]:
            if branches[m].shape[0] != branches["id"].shape[0]:
                raise ValueError(
                    f"{name}[{m!r}] has {branches[m].shape[0]} rows but {name}['id'] has {branches['id'].shape[0]}"
                )
    for m in BRANCHES:
        _validate_inbatch(
            queries[m],
            candidates[m],
            target,
            candidate_ids,
            exclude_ids,
            log_q,
            pad_id,
            ignore_index,
            queries_name=f"queries[{m!r}]",
            candidates_name=f"candidates[{m!r}]",
            check_values=m == BRANCHES[0],  # the shared arguments' values are checked once
        )
    for m in BRANCHES[1:]:
        if queries[m].dtype != queries["id"].dtype:
            raise TypeError(f"queries[{m!r}] has dtype {queries[m].dtype}, queries['id'] has {queries['id'].dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if form not in ("kl", "ce"):
        raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    log_q = None if log_q is None else log_q.detach()  # a correction, not a parameter
    if resolve_backend(backend, queries["id"].device, queries["id"].dtype) == "torch":
        with _without_autocast(queries["id"].device):
            return mutual_distillation_reference(
                queries,
                candidates,
                target,
                candidate_ids,
                exclude_ids,
                log_q,
                temperature=temperature,
                detach_teacher=detach_teacher,
                form=form,
                pad_id=pad_id,
                ignore_index=ignore_index,
                reduction=reduction,
            )
    if queries["id"].dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes {_KERNEL_DTYPES}, got {queries['id'].dtype}")
    return _kernel_module("inbatch_loss").mutual_distillation_loss(
        queries["id"],
        queries["text"],
        queries["image"],
        candidates["id"],
        candidates["text"],
        candidates["image"],
        target,
        candidate_ids,
        exclude_ids,
        log_q,
        float(temperature),
        bool(detach_teacher),
        form,
        pad_id,
        ignore_index,
        reduction,
    )

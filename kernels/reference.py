"""Plain-PyTorch references of the two kernel families in this folder.

They define the functions the Triton kernels compute, run anywhere torch runs, and are the
pure-PyTorch path of ``odmt_components.ops``. Tests call them with float64 inputs on the CPU
as ground truth. They materialise the ``L x L`` attention mask and the ``R x N`` logits that
the kernels never build, so they are meant for small problems and for checking.

Half-precision inputs are computed in float32 (the kernels accumulate in float32 too) and
the result is cast back to the input dtype; float32 and float64 inputs are computed as is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------
# ID-masked attention
# --------------------------------------------------------------------------------------


def id_masked_attention_allowed(
    key_padding_mask: torch.Tensor | None,
    id_index: int | None,
    batch: int,
    length: int,
    device: torch.device,
) -> torch.Tensor:
    """Boolean ``(B or 1, 1, L, L)`` tensor, True where query ``i`` may attend key ``j``.

    A key is attendable when it is not padding; with ``id_index`` set, the key at
    ``id_index`` is attendable by the query at ``id_index`` alone.
    """
    if key_padding_mask is None:
        allowed = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    else:
        allowed = (~key_padding_mask)[:, None, None, :].expand(batch, 1, length, length)
    if id_index is not None:
        position = torch.arange(length, device=device)
        is_id = position == id_index
        id_rule = ~is_id[None, :] | is_id[:, None]
        allowed = allowed & id_rule
    return allowed


def id_masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    id_index: int | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over ``(B, H, L, D)`` inputs.

    ``key_padding_mask``: ``(B, L)`` bool, True = padding. ``id_index``: position of the ID
    token (only the ID query may attend the ID key). A query row with no attendable key
    outputs zeros. Dropout with probability ``dropout_p`` is applied to the attention
    probabilities; ``dropout_keep`` (``(B, H, L, L)`` bool) fixes which entries are kept,
    so a test can replay the kernel's random mask.
    """
    batch, _, length, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    compute = _compute_dtype(q.dtype)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    allowed = id_masked_attention_allowed(key_padding_mask, id_index, batch, length, q.device)
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * has_key
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs @ v.to(compute)).to(q.dtype)


# --------------------------------------------------------------------------------------
# Debiased in-batch softmax with false-negative exclusion, and mutual distillation
# --------------------------------------------------------------------------------------


def inbatch_exclusion_mask(
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None = None,
    pad_id: int = 0,
) -> torch.Tensor:
    """Boolean ``(R, N)``: True where column ``j`` is excluded from row ``r``'s softmax.

    Excluded: padding columns (``candidate_ids == pad_id``); every other copy of the target
    item; every column whose item is in ``exclude_ids[r]``. The target column itself is
    never excluded. ``target`` must hold valid column indices (no ``ignore_index``).
    """
    target_ids = candidate_ids[target]
    excluded = candidate_ids[None, :] == target_ids[:, None]
    if exclude_ids is not None:
        for s in range(exclude_ids.shape[1]):
            excluded |= candidate_ids[None, :] == exclude_ids[:, s : s + 1]
    excluded |= (candidate_ids == pad_id)[None, :]
    rows = torch.arange(target.shape[0], device=target.device)
    excluded[rows, target] = False
    return excluded


def debiased_logits(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    excluded: torch.Tensor,
    log_q: torch.Tensor | None,
) -> torch.Tensor:
    """``<q_r, c_j> - log_q_j`` with excluded entries at ``-inf``, in the compute dtype."""
    compute = _compute_dtype(queries.dtype)
    logits = queries.to(compute) @ candidates.to(compute).t()
    if log_q is not None:
        logits = logits - log_q.to(compute)[None, :]
    return logits.masked_fill(excluded, float("-inf"))


def _valid_rows(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, target)`` with the ignored rows' target set to column 0. Every row is
    computed, an ignored one on a zero query and with zero logits (:func:`_valid_logits`), and
    left out by :func:`_reduce`: no data-dependent shapes, so ``torch.compile`` traces the
    whole loss, and an ignored row contributes nothing, not even a NaN of its own."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, 0)


def _valid_logits(queries, candidates, excluded, log_q, valid) -> torch.Tensor:
    """:func:`debiased_logits` with the ignored rows zeroed twice over: their query (a NaN
    there would reach the candidates' gradient through the product) and their logits (an
    infinite ``log_q`` would make their softmax NaN, and the backward multiplies it by 0)."""
    logits = debiased_logits(torch.where(valid[:, None], queries, 0), candidates, excluded, log_q)
    return torch.where(valid[:, None], logits, 0)


def _reduce(per_row: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    per_row = torch.where(valid, per_row, 0)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def debiased_inbatch_cross_entropy_reference(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    *,
    pad_id: int = 0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over rows with ``target != ignore_index`` of ``-log softmax(z_r)[target_r]``.

    ``z_r`` are the debiased logits of row ``r`` over its non-excluded columns (see
    :func:`inbatch_exclusion_mask`). ``mean`` of no valid row is 0. ``none`` returns
    ``(R,)`` with 0 on ignored rows. Computed in float32 or wider; returned in that dtype.
    """
    valid, rows_target = _valid_rows(target, ignore_index)
    excluded = inbatch_exclusion_mask(rows_target, candidate_ids, exclude_ids, pad_id)
    logits = _valid_logits(queries, candidates, excluded, log_q, valid)
    positive = logits.gather(1, rows_target[:, None]).squeeze(1)
    per_row = torch.logsumexp(logits, dim=-1) - positive
    return _reduce(per_row, valid, reduction)


class DistillationLosses(NamedTuple):
    """ODMT's training objective split into its parts (each reduced over valid rows).

    ``ce`` = ``ce_id + ce_text + ce_image``; ``kl`` = ``kl_id_text + kl_id_image +
    kl_ensemble_id`` (teacher first, already scaled by ``T^2``).
    """

    ce: torch.Tensor
    kl: torch.Tensor
    ce_id: torch.Tensor
    ce_text: torch.Tensor
    ce_image: torch.Tensor
    kl_id_text: torch.Tensor
    kl_id_image: torch.Tensor
    kl_ensemble_id: torch.Tensor


BRANCHES = ("id", "text", "image")


def mutual_distillation_reference(
    queries: dict[str, torch.Tensor],
    candidates: dict[str, torch.Tensor],
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    detach_teacher: bool = True,
    form: str = "kl",
    pad_id: int = 0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> DistillationLosses:
    """Three branch CEs and the three distillation terms of ODMT (SPEC section 4).

    With ``z^m`` the masked debiased logits of branch ``m`` and ``z^e`` their mean:
    ``kl_id_text = T^2 KL(s(z^id/T) || s(z^text/T))``, ``kl_id_image`` likewise and
    ``kl_ensemble_id = T^2 KL(s(z^e/T) || s(z^id/T))``, softmax over non-excluded columns.
    ``form="ce"`` drops the teacher entropy (``-sum p_teacher log p_student``), and
    ``detach_teacher=False`` lets gradients reach the teachers (the reference code).
    """
    if form not in ("kl", "ce"):
        raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    valid, rows_target = _valid_rows(target, ignore_index)
    excluded = inbatch_exclusion_mask(rows_target, candidate_ids, exclude_ids, pad_id)
    logits = {m: _valid_logits(queries[m], candidates[m], excluded, log_q, valid) for m in BRANCHES}
    ensemble = (logits["id"] + logits["text"] + logits["image"]) / 3.0

    def cross_entropy(z: torch.Tensor) -> torch.Tensor:
        per_row = torch.logsumexp(z, -1) - z.gather(1, rows_target[:, None]).squeeze(1)
        return _reduce(per_row, valid, reduction)

    def distill(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        if detach_teacher:
            teacher = teacher.detach()
        log_p_teacher = F.log_softmax(teacher / temperature, -1)
        log_p_student = F.log_softmax(student / temperature, -1)
        # Zero the excluded entries before the product: -inf * 0 would poison the gradient.
        log_p_teacher = log_p_teacher.masked_fill(excluded, 0.0)
        log_p_student = log_p_student.masked_fill(excluded, 0.0)
        p_teacher = log_p_teacher.exp().masked_fill(excluded, 0.0)
        if form == "kl":
            per_row = (p_teacher * (log_p_teacher - log_p_student)).sum(-1)
        else:
            per_row = -(p_teacher * log_p_student).sum(-1)
        return _reduce(per_row * temperature**2, valid, reduction)

    ce_parts = [cross_entropy(logits[m]) for m in BRANCHES]
    kl_id_text = distill(logits["id"], logits["text"])
    kl_id_image = distill(logits["id"], logits["image"])
    kl_ensemble_id = distill(ensemble, logits["id"])
    return DistillationLosses(
        ce=ce_parts[0] + ce_parts[1] + ce_parts[2],
        kl=kl_id_text + kl_id_image + kl_ensemble_id,
        ce_id=ce_parts[0],
        ce_text=ce_parts[1],
        ce_image=ce_parts[2],
        kl_id_text=kl_id_text,
        kl_id_image=kl_id_image,
        kl_ensemble_id=kl_ensemble_id,
    )

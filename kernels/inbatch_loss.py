r"""Debiased in-batch softmax cross-entropy with false-negative exclusion, and ODMT's fused
three-branch mutual distillation, in Triton, without ever holding the ``R x N`` logits.

Math
----
Row ``r`` (a training position, query ``q_r``), column ``j`` (a candidate ``c_j``):

.. math::  s_{rj} = \langle q_r, c_j \rangle - \log Q_j \qquad (\log Q \text{ optional})

**Exclusion** (decided inside the kernels from ``candidate_ids``, ``target`` and
``exclude_ids``): column ``j`` is dropped from row ``r``'s softmax when ``candidate_ids[j] ==
pad_id`` (padding), when ``candidate_ids[j] == candidate_ids[target[r]]`` (another copy of
the target item) or when ``candidate_ids[j]`` is one of ``exclude_ids[r, :S]`` (the user's
history) -- but never when ``j == target[r]``. Rows with ``target == ignore_index`` are
skipped (loss 0, gradient 0). ``K_r`` is the set of kept columns.

**Single branch**: ``loss_r = lse_{j in K_r}(s_rj) - s_{r,target_r}``.

**Three branches** (``m`` in id ``i``, text ``t``, image ``v``; ``z^e = (z^i+z^t+z^v)/3``):
``ce_m = lse(z^m) - z^m_target``; with ``a = z^teacher / T``, ``b = z^student / T``,
``p = softmax(a)``, ``q = softmax(b)`` over ``K_r``, and the teacher/student pairs
``(i -> t)``, ``(i -> v)``, ``(e -> i)``::

    D = T^2 * (wbar + lse(b) - lse(a))   form="kl": w_j = a_j - b_j, so D = T^2 KL(p || q)
    D = T^2 * (wbar + lse(b))            form="ce": w_j = -b_j,      so D = -T^2 sum_j p_j log q_j
    wbar = sum_j p_j w_j

Online formulation: one running max ``M`` per branch (the max of ``z/T`` is ``M/T``, so one max
serves both temperatures), ``L1 = sum_j exp(z_j - M)``, ``LT = sum_j exp((z_j - M)/T)``, and
per pair ``W = sum_j exp((z^teacher_j - M^teacher)/T) w_j``; when a tile raises the max by
``delta`` every sum is rescaled (``exp(-delta)`` or ``exp(-delta/T)``), like the lse itself.
At the end ``lse1 = M + log L1``, ``lseT = M/T + log LT``, ``wbar = W / LT^teacher``.

Backward (derivation)
---------------------
With upstream per-row weights ``g`` (the gradient of each per-row loss; reductions happen in
PyTorch on the per-row outputs), ``P^m = softmax(z^m)``, ``p^m = softmax(z^m/T)``:

* ``d ce_m / d z^m_j = P^m_j - [j = target]``.
* Student side, both forms: ``d D / d b_j = T^2 (q_j - p_j)``, so ``d D / d z^student_j =
  T (q_j - p_j)``.
* Teacher side (``detach_teacher=False`` only): ``d p_k / d a_j = p_k([k=j] - p_j)`` gives,
  for ``D/T^2 = sum_k p_k w_k + (terms whose a-derivative cancels)``, ``d D / d a_j =
  T^2 p_j (w_j - wbar)`` for both forms (KL: the ``-lse(a)`` term cancels the
  ``sum_k p_k d a_k/d a_j`` part; CE: ``w = -b`` does not depend on ``a``). So ``d D / d
  z^teacher_j = T p_j (w_j - wbar)``, and the ensemble teacher passes a third of it to each
  branch (``z^e`` is the mean).

Per element of a tile::

    dz^i = g_ce_i (P^i - 1_t) + g_ei T (p^i - p^e)
         [+ T p^i (g_it (w_it - wbar_it) + g_iv (w_iv - wbar_iv)) + G_e]
    dz^t = g_ce_t (P^t - 1_t) + g_it T (p^t - p^i)              [+ G_e]
    dz^v = g_ce_v (P^v - 1_t) + g_iv T (p^v - p^i)              [+ G_e]
    G_e  = g_ei T p^e (w_ei - wbar_ei) / 3                      ([..] only without detach)

and ``dQ^m_r = sum_j dz^m_rj c^m_j``, ``dC^m_j = sum_r dz^m_rj q^m_r``. No gradient reaches
``log Q``.

Tiling
------
Forward (``_ce_fwd_kernel``, ``_odmt_fwd_kernel``): one program per ``BLOCK_R`` rows; it walks
the columns in ``BLOCK_N`` tiles; each score tile is ``sum`` over ``BLOCK_D`` chunks of
``tl.dot(q_chunk, c_chunk^T)`` (fp32 accumulation, the d tail masked), then the exclusion
mask is built for the tile (one comparison pass over the ``S`` excluded ids, shared by the
three branches), then the online statistics are updated. Per row it stores the losses and
the statistics the backward needs (lse's, ``wbar``).

Backward, deterministic, no atomics: a row-wise kernel (``_ce_dq_kernel``,
``_odmt_dq_kernel``; grid = row tiles x chunks of ``BLOCK_DO`` output features) recomputes
the score tiles, forms ``dz`` and accumulates ``dQ[:, chunk] += dz @ C[cols, chunk]``; a
column-wise kernel (``_ce_dc_kernel``, ``_odmt_dc_kernel``; grid = column tiles x output
chunks) loops over row tiles and accumulates ``dC[:, chunk] += dz^T @ Q[rows, chunk]``.
``dz`` is cast to the input dtype for the tensor-core dot; to keep fp16 from underflowing
(``g = 1/n_valid`` times ``p ~ 1/N``), the per-row weights are divided by their largest
magnitude inside the kernels and the accumulators multiplied back at the end.

Block sizes come from a fixed heuristic (``_config``), not autotuning: tiles of 32-128 rows
or columns and 64 features per ``tl.dot`` step (bf16/fp16 need tiles >= 16), an output chunk
of up to 256 features so that at d <= 256 the scores are recomputed once per backward kernel,
and small 16-wide tiles under ``TRITON_INTERPRET=1``.

Public functions (registered as custom ops ``odmt::debiased_inbatch_ce`` and
``odmt::mutual_distillation``, with fake and autograd implementations; their backward
kernels are the custom ops ``odmt::debiased_inbatch_ce_backward`` and
``odmt::mutual_distillation_backward``):

* :func:`debiased_inbatch_cross_entropy`
* :func:`mutual_distillation_loss`
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .reference import DistillationLosses

__all__ = ["debiased_inbatch_cross_entropy", "mutual_distillation_loss"]

# Per-row statistics of the three-branch forward, in this order (rows of the stats tensor).
_N_STATS = 10  # lse1_i, lse1_t, lse1_v, lseT_i, lseT_t, lseT_v, lseT_e, wbar_it, wbar_iv, wbar_ei
_N_PARTS = 6  # ce_i, ce_t, ce_v, kl_it, kl_iv, kl_ei


# ======================================================================================
# Shared tile helpers
# ======================================================================================


@triton.jit
def _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id, ignore_index):
    """Load targets of a row tile: (valid rows, target column or -1, target item id)."""
    row_in = rows < R
    tgt = tl.load(tgt_ptr + rows.to(tl.int64) * s_tg, mask=row_in, other=ignore_index)
    valid = row_in & (tgt != ignore_index)
    tgt = tl.where(valid, tgt, -1)
    tid = tl.load(cid_ptr + tl.where(valid, tgt, 0) * s_cid, mask=valid, other=pad_id)
    return valid, tgt, tid


@triton.jit
def _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid, ex_ptr, ex_sr, ex_ss, S, pad_id):
    """Exclusion rule for one (rows x cols) tile: returns (kept, is_target)."""
    excl = (cid[None, :] == tid[:, None]) | (cid == pad_id)[None, :]
    ex_row = ex_ptr + rows.to(tl.int64) * ex_sr
    for s in range(0, S):
        e = tl.load(ex_row + s * ex_ss, mask=valid, other=pad_id)
        excl = excl | (cid[None, :] == e[:, None])
    is_t = (cols[None, :] == tgt[:, None]) & valid[:, None]
    keep = ((~excl) | is_t) & col_ok[None, :] & valid[:, None]
    return keep, is_t


@triton.jit
def _score_tile(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, row_in, cols, col_ok, D,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr):
    """``Q[rows] @ C[cols]^T`` in fp32, looping over d in BLOCK_D chunks (tail masked)."""
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * sq_r + offs_d[None, :] * sq_d
    c_ptrs = c_ptr + cols.to(tl.int64)[:, None] * sc_n + offs_d[None, :] * sc_d
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (offs_d + d0) < D
        q = tl.load(q_ptrs + d0 * sq_d, mask=row_in[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(c_ptrs + d0 * sc_d, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(c), acc=acc, input_precision=PREC)
    return acc


@triton.jit
def _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ: tl.constexpr):
    """Column ids (padding outside N) and log Q (0 without correction)."""
    col_ok = cols < N
    cid = tl.load(cid_ptr + cols.to(tl.int64) * s_cid, mask=col_ok, other=pad_id)
    if HAS_LQ:
        lq = tl.load(lq_ptr + cols.to(tl.int64) * s_lq, mask=col_ok, other=0.0).to(tl.float32)
    else:
        lq = cols.to(tl.float32) * 0.0
    return col_ok, cid, lq


# ======================================================================================
# Single branch: forward
# ======================================================================================


@triton.jit
def _ce_fwd_kernel(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, tgt_ptr, s_tg, cid_ptr, s_cid,
                   ex_ptr, ex_sr, ex_ss, lq_ptr, s_lq, loss_ptr, lse_ptr,
                   R, N, D, S, pad_id, ignore_index,
                   HAS_LQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    valid, tgt, tid = _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id, ignore_index)
    m = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    lsum = tl.zeros((BLOCK_R,), tl.float32)
    zt = tl.zeros((BLOCK_R,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
        s = _score_tile(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, row_in, cols, col_ok, D,
                        BLOCK_R, BLOCK_N, BLOCK_D, PREC) - lq[None, :]
        keep, is_t = _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid,
                                ex_ptr, ex_sr, ex_ss, S, pad_id)
        zt += tl.sum(tl.where(is_t, s, 0.0), axis=1)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(valid, lsum, 1.0))  # ignored rows: l = 0
    tl.store(loss_ptr + rows, tl.where(valid, lse - zt, 0.0), mask=row_in)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_in)


# ======================================================================================
# Single branch: backward (row-wise dQ, column-wise dC)
# ======================================================================================


@triton.jit
def _ce_dz(s, keep, is_t, lse, g):
    """``g_r (softmax_r - onehot)`` on kept entries, 0 elsewhere."""
    p = tl.exp(tl.where(keep, s - lse[:, None], -float("inf")))
    return tl.where(keep, (p - is_t.to(tl.float32)) * g[:, None], 0.0)


@triton.jit
def _ce_dq_kernel(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, tgt_ptr, s_tg, cid_ptr, s_cid,
                  ex_ptr, ex_sr, ex_ss, lq_ptr, s_lq, lse_ptr, g_ptr, gmax_ptr, dq_ptr,
                  sdq_r, sdq_d, R, N, D, S, pad_id, ignore_index,
                  HAS_LQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    row_in = rows < R
    valid, tgt, tid = _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id, ignore_index)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    g = tl.load(g_ptr + rows, mask=valid, other=0.0) / gmax
    acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
        s = _score_tile(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, row_in, cols, col_ok, D,
                        BLOCK_R, BLOCK_N, BLOCK_D, PREC) - lq[None, :]
        keep, is_t = _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid,
                                ex_ptr, ex_sr, ex_ss, S, pad_id)
        dz = _ce_dz(s, keep, is_t, lse, g)
        c = tl.load(c_ptr + cols.to(tl.int64)[:, None] * sc_n + offs_o[None, :] * sc_d,
                    mask=col_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(dz.to(c.dtype), c, acc=acc, input_precision=PREC)
    acc = acc * gmax
    tl.store(dq_ptr + rows.to(tl.int64)[:, None] * sdq_r + offs_o[None, :] * sdq_d,
             acc.to(dq_ptr.dtype.element_ty), mask=row_in[:, None] & o_ok[None, :])


@triton.jit
def _ce_dc_kernel(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, tgt_ptr, s_tg, cid_ptr, s_cid,
                  ex_ptr, ex_sr, ex_ss, lq_ptr, s_lq, lse_ptr, g_ptr, gmax_ptr, dc_ptr,
                  sdc_n, sdc_d, R, N, D, S, pad_id, ignore_index,
                  HAS_LQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PREC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_in = rows < R
        valid, tgt, tid = _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id,
                                     ignore_index)
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        g = tl.load(g_ptr + rows, mask=valid, other=0.0) / gmax
        s = _score_tile(q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, row_in, cols, col_ok, D,
                        BLOCK_R, BLOCK_N, BLOCK_D, PREC) - lq[None, :]
        keep, is_t = _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid,
                                ex_ptr, ex_sr, ex_ss, S, pad_id)
        dz = _ce_dz(s, keep, is_t, lse, g)
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * sq_r + offs_o[None, :] * sq_d,
                    mask=row_in[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz.to(q.dtype)), q, acc=acc, input_precision=PREC)
    acc = acc * gmax
    tl.store(dc_ptr + cols.to(tl.int64)[:, None] * sdc_n + offs_o[None, :] * sdc_d,
             acc.to(dc_ptr.dtype.element_ty), mask=col_ok[:, None] & o_ok[None, :])


# ======================================================================================
# Three branches: forward
# ======================================================================================


@triton.jit
def _online_branch(s, keep, m, l1, lt, inv_t, NEED_L1: tl.constexpr):
    """One branch's running max and the two exp-sums (T=1 and T); returns the new state,
    the rescale factor at temperature T and the tile's exp((z - M)/T) weights."""
    sm = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(sm, axis=1))
    delta = m - m_new
    if NEED_L1:
        l1 = l1 * tl.exp(delta) + tl.sum(tl.exp(sm - m_new[:, None]), axis=1)
    alpha_t = tl.exp(delta * inv_t)
    e_t = tl.exp((sm - m_new[:, None]) * inv_t)
    lt = lt * alpha_t + tl.sum(e_t, axis=1)
    return m_new, l1, lt, alpha_t, e_t


@triton.jit
def _pair_w(teacher, student, keep, inv_t, FORM_KL: tl.constexpr):
    """``w`` of a teacher/student pair on kept entries: ``a - b`` (KL) or ``-b`` (CE)."""
    if FORM_KL:
        w = (teacher - student) * inv_t
    else:
        w = -student * inv_t
    return tl.where(keep, w, 0.0)


@triton.jit
def _odmt_fwd_kernel(qi_ptr, qt_ptr, qv_ptr, sq_i, sq_t, sq_v, sq_d,
                     ci_ptr, ct_ptr, cv_ptr, sc_i, sc_t, sc_v, sc_d,
                     tgt_ptr, s_tg, cid_ptr, s_cid, ex_ptr, ex_sr, ex_ss, lq_ptr, s_lq,
                     loss_ptr, stats_ptr, R, N, D, S, pad_id, ignore_index, temperature,
                     HAS_LQ: tl.constexpr, FORM_KL: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    valid, tgt, tid = _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id, ignore_index)
    inv_t = 1.0 / temperature
    zero = tl.zeros((BLOCK_R,), tl.float32)
    m_i = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    m_t = m_i
    m_v = m_i
    m_e = m_i
    l1_i = zero
    l1_t = zero
    l1_v = zero
    lt_i = zero
    lt_t = zero
    lt_v = zero
    lt_e = zero
    l1_e = zero
    w_it = zero
    w_iv = zero
    w_ei = zero
    zt_i = zero
    zt_t = zero
    zt_v = zero
    offs_d = tl.arange(0, BLOCK_D)
    r64 = rows.to(tl.int64)[:, None]
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
        c64 = cols.to(tl.int64)[:, None]
        s_i = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        s_t = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        s_v = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = (d0 + offs_d)[None, :]
            qm = row_in[:, None] & (dd < D)
            cm = col_ok[:, None] & (dd < D)
            qi = tl.load(qi_ptr + r64 * sq_i + dd * sq_d, mask=qm, other=0.0)
            ci = tl.load(ci_ptr + c64 * sc_i + dd * sc_d, mask=cm, other=0.0)
            s_i = tl.dot(qi, tl.trans(ci), acc=s_i, input_precision=PREC)
            qt = tl.load(qt_ptr + r64 * sq_t + dd * sq_d, mask=qm, other=0.0)
            ct = tl.load(ct_ptr + c64 * sc_t + dd * sc_d, mask=cm, other=0.0)
            s_t = tl.dot(qt, tl.trans(ct), acc=s_t, input_precision=PREC)
            qv = tl.load(qv_ptr + r64 * sq_v + dd * sq_d, mask=qm, other=0.0)
            cv = tl.load(cv_ptr + c64 * sc_v + dd * sc_d, mask=cm, other=0.0)
            s_v = tl.dot(qv, tl.trans(cv), acc=s_v, input_precision=PREC)
        s_i = s_i - lq[None, :]
        s_t = s_t - lq[None, :]
        s_v = s_v - lq[None, :]
        s_e = (s_i + s_t + s_v) / 3.0
        keep, is_t = _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid,
                                ex_ptr, ex_sr, ex_ss, S, pad_id)
        zt_i += tl.sum(tl.where(is_t, s_i, 0.0), axis=1)
        zt_t += tl.sum(tl.where(is_t, s_t, 0.0), axis=1)
        zt_v += tl.sum(tl.where(is_t, s_v, 0.0), axis=1)
        m_i, l1_i, lt_i, a_i, e_i = _online_branch(s_i, keep, m_i, l1_i, lt_i, inv_t, True)
        m_t, l1_t, lt_t, a_t, e_t = _online_branch(s_t, keep, m_t, l1_t, lt_t, inv_t, True)
        m_v, l1_v, lt_v, a_v, e_v = _online_branch(s_v, keep, m_v, l1_v, lt_v, inv_t, True)
        m_e, l1_e, lt_e, a_e, e_e = _online_branch(s_e, keep, m_e, l1_e, lt_e, inv_t, False)
        w_it = w_it * a_i + tl.sum(e_i * _pair_w(s_i, s_t, keep, inv_t, FORM_KL), axis=1)
        w_iv = w_iv * a_i + tl.sum(e_i * _pair_w(s_i, s_v, keep, inv_t, FORM_KL), axis=1)
        w_ei = w_ei * a_e + tl.sum(e_e * _pair_w(s_e, s_i, keep, inv_t, FORM_KL), axis=1)
    lse1_i = m_i + tl.log(tl.where(valid, l1_i, 1.0))
    lse1_t = m_t + tl.log(tl.where(valid, l1_t, 1.0))
    lse1_v = m_v + tl.log(tl.where(valid, l1_v, 1.0))
    lt_i = tl.where(valid, lt_i, 1.0)  # ignored rows: the sums are 0
    lt_e = tl.where(valid, lt_e, 1.0)
    lset_i = m_i * inv_t + tl.log(lt_i)
    lset_t = m_t * inv_t + tl.log(tl.where(valid, lt_t, 1.0))
    lset_v = m_v * inv_t + tl.log(tl.where(valid, lt_v, 1.0))
    lset_e = m_e * inv_t + tl.log(lt_e)
    wbar_it = w_it / lt_i
    wbar_iv = w_iv / lt_i
    wbar_ei = w_ei / lt_e
    t2 = temperature * temperature
    if FORM_KL:
        d_it = t2 * (wbar_it + lset_t - lset_i)
        d_iv = t2 * (wbar_iv + lset_v - lset_i)
        d_ei = t2 * (wbar_ei + lset_i - lset_e)
    else:
        d_it = t2 * (wbar_it + lset_t)
        d_iv = t2 * (wbar_iv + lset_v)
        d_ei = t2 * (wbar_ei + lset_i)
    lp = loss_ptr + rows
    tl.store(lp, tl.where(valid, lse1_i - zt_i, 0.0), mask=row_in)
    tl.store(lp + R, tl.where(valid, lse1_t - zt_t, 0.0), mask=row_in)
    tl.store(lp + 2 * R, tl.where(valid, lse1_v - zt_v, 0.0), mask=row_in)
    tl.store(lp + 3 * R, tl.where(valid, d_it, 0.0), mask=row_in)
    tl.store(lp + 4 * R, tl.where(valid, d_iv, 0.0), mask=row_in)
    tl.store(lp + 5 * R, tl.where(valid, d_ei, 0.0), mask=row_in)
    sp = stats_ptr + rows
    tl.store(sp, tl.where(valid, lse1_i, 0.0), mask=row_in)
    tl.store(sp + R, tl.where(valid, lse1_t, 0.0), mask=row_in)
    tl.store(sp + 2 * R, tl.where(valid, lse1_v, 0.0), mask=row_in)
    tl.store(sp + 3 * R, tl.where(valid, lset_i, 0.0), mask=row_in)
    tl.store(sp + 4 * R, tl.where(valid, lset_t, 0.0), mask=row_in)
    tl.store(sp + 5 * R, tl.where(valid, lset_v, 0.0), mask=row_in)
    tl.store(sp + 6 * R, tl.where(valid, lset_e, 0.0), mask=row_in)
    tl.store(sp + 7 * R, tl.where(valid, wbar_it, 0.0), mask=row_in)
    tl.store(sp + 8 * R, tl.where(valid, wbar_iv, 0.0), mask=row_in)
    tl.store(sp + 9 * R, tl.where(valid, wbar_ei, 0.0), mask=row_in)


# ======================================================================================
# Three branches: backward (row-wise dQ, column-wise dC)
# ======================================================================================


@triton.jit
def _odmt_scores(qi_ptr, qt_ptr, qv_ptr, sq_i, sq_t, sq_v, sq_d,
                 ci_ptr, ct_ptr, cv_ptr, sc_i, sc_t, sc_v, sc_d,
                 rows, row_in, cols, col_ok, lq, D,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr):
    s_i = _score_tile(qi_ptr, sq_i, sq_d, ci_ptr, sc_i, sc_d, rows, row_in, cols, col_ok, D,
                      BLOCK_R, BLOCK_N, BLOCK_D, PREC) - lq[None, :]
    s_t = _score_tile(qt_ptr, sq_t, sq_d, ct_ptr, sc_t, sc_d, rows, row_in, cols, col_ok, D,
                      BLOCK_R, BLOCK_N, BLOCK_D, PREC) - lq[None, :]
    s_v = _score_tile(qv_ptr, sq_v, sq_d, cv_ptr, sc_v, sc_d, rows, row_in, cols, col_ok, D,
                      BLOCK_R, BLOCK_N, BLOCK_D, PREC) - lq[None, :]
    return s_i, s_t, s_v


@triton.jit
def _row_stat(ptr, k, rows, valid, R):
    """Row ``k`` of a ``(K, R)`` per-row table, as a ``(BLOCK_R, 1)`` column."""
    return tl.load(ptr + k * R + rows, mask=valid, other=0.0)[:, None]


@triton.jit
def _odmt_dz(s_i, s_t, s_v, keep, is_t, stats_ptr, g_ptr, gmax, rows, valid, R,
             temperature, FORM_KL: tl.constexpr, DETACH: tl.constexpr):
    """The three ``dL/dz`` tiles (see the module docstring), 0 on excluded entries."""
    inv_t = 1.0 / temperature
    oh = is_t.to(tl.float32)
    s_e = (s_i + s_t + s_v) / 3.0
    # cross-entropy parts (T = 1)
    dz_i = _row_stat(g_ptr, 0, rows, valid, R) / gmax * (
        tl.exp(tl.where(keep, s_i - _row_stat(stats_ptr, 0, rows, valid, R), -float("inf"))) - oh)
    dz_t = _row_stat(g_ptr, 1, rows, valid, R) / gmax * (
        tl.exp(tl.where(keep, s_t - _row_stat(stats_ptr, 1, rows, valid, R), -float("inf"))) - oh)
    dz_v = _row_stat(g_ptr, 2, rows, valid, R) / gmax * (
        tl.exp(tl.where(keep, s_v - _row_stat(stats_ptr, 2, rows, valid, R), -float("inf"))) - oh)
    # softmaxes at temperature T
    p_i = tl.exp(tl.where(keep, s_i * inv_t - _row_stat(stats_ptr, 3, rows, valid, R), -float("inf")))
    p_t = tl.exp(tl.where(keep, s_t * inv_t - _row_stat(stats_ptr, 4, rows, valid, R), -float("inf")))
    p_v = tl.exp(tl.where(keep, s_v * inv_t - _row_stat(stats_ptr, 5, rows, valid, R), -float("inf")))
    p_e = tl.exp(tl.where(keep, s_e * inv_t - _row_stat(stats_ptr, 6, rows, valid, R), -float("inf")))
    g_it = _row_stat(g_ptr, 3, rows, valid, R) * (temperature / gmax)
    g_iv = _row_stat(g_ptr, 4, rows, valid, R) * (temperature / gmax)
    g_ei = _row_stat(g_ptr, 5, rows, valid, R) * (temperature / gmax)
    # student sides: T (q - p)
    dz_i += g_ei * (p_i - p_e)
    dz_t += g_it * (p_t - p_i)
    dz_v += g_iv * (p_v - p_i)
    if not DETACH:
        # teacher sides: T p (w - wbar); the ensemble passes a third to each branch
        w_it = _pair_w(s_i, s_t, keep, inv_t, FORM_KL) - _row_stat(stats_ptr, 7, rows, valid, R)
        w_iv = _pair_w(s_i, s_v, keep, inv_t, FORM_KL) - _row_stat(stats_ptr, 8, rows, valid, R)
        w_ei = _pair_w(s_e, s_i, keep, inv_t, FORM_KL) - _row_stat(stats_ptr, 9, rows, valid, R)
        dz_i += p_i * (g_it * w_it + g_iv * w_iv)
        g_e = g_ei * p_e * w_ei / 3.0
        dz_i += g_e
        dz_t += g_e
        dz_v += g_e
    dz_i = tl.where(keep, dz_i, 0.0)
    dz_t = tl.where(keep, dz_t, 0.0)
    dz_v = tl.where(keep, dz_v, 0.0)
    return dz_i, dz_t, dz_v


@triton.jit
def _odmt_dq_kernel(qi_ptr, qt_ptr, qv_ptr, sq_i, sq_t, sq_v, sq_d,
                    ci_ptr, ct_ptr, cv_ptr, sc_i, sc_t, sc_v, sc_d,
                    tgt_ptr, s_tg, cid_ptr, s_cid, ex_ptr, ex_sr, ex_ss, lq_ptr, s_lq,
                    stats_ptr, g_ptr, gmax_ptr, dq_ptr, R, N, D, S, pad_id, ignore_index,
                    temperature, HAS_LQ: tl.constexpr, FORM_KL: tl.constexpr,
                    DETACH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    row_in = rows < R
    valid, tgt, tid = _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id, ignore_index)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    acc_i = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    acc_t = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
        s_i, s_t, s_v = _odmt_scores(qi_ptr, qt_ptr, qv_ptr, sq_i, sq_t, sq_v, sq_d,
                                     ci_ptr, ct_ptr, cv_ptr, sc_i, sc_t, sc_v, sc_d,
                                     rows, row_in, cols, col_ok, lq, D,
                                     BLOCK_R, BLOCK_N, BLOCK_D, PREC)
        keep, is_t = _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid,
                                ex_ptr, ex_sr, ex_ss, S, pad_id)
        dz_i, dz_t, dz_v = _odmt_dz(s_i, s_t, s_v, keep, is_t, stats_ptr, g_ptr, gmax, rows,
                                    valid, R, temperature, FORM_KL, DETACH)
        c_off = cols.to(tl.int64)[:, None]
        cm = col_ok[:, None] & o_ok[None, :]
        c = tl.load(ci_ptr + c_off * sc_i + offs_o[None, :] * sc_d, mask=cm, other=0.0)
        acc_i = tl.dot(dz_i.to(c.dtype), c, acc=acc_i, input_precision=PREC)
        c = tl.load(ct_ptr + c_off * sc_t + offs_o[None, :] * sc_d, mask=cm, other=0.0)
        acc_t = tl.dot(dz_t.to(c.dtype), c, acc=acc_t, input_precision=PREC)
        c = tl.load(cv_ptr + c_off * sc_v + offs_o[None, :] * sc_d, mask=cm, other=0.0)
        acc_v = tl.dot(dz_v.to(c.dtype), c, acc=acc_v, input_precision=PREC)
    out = dq_ptr + rows.to(tl.int64)[:, None] * D + offs_o[None, :]
    om = row_in[:, None] & o_ok[None, :]
    ty = dq_ptr.dtype.element_ty
    tl.store(out, (acc_i * gmax).to(ty), mask=om)
    tl.store(out + R * D, (acc_t * gmax).to(ty), mask=om)
    tl.store(out + 2 * R * D, (acc_v * gmax).to(ty), mask=om)


@triton.jit
def _odmt_dc_kernel(qi_ptr, qt_ptr, qv_ptr, sq_i, sq_t, sq_v, sq_d,
                    ci_ptr, ct_ptr, cv_ptr, sc_i, sc_t, sc_v, sc_d,
                    tgt_ptr, s_tg, cid_ptr, s_cid, ex_ptr, ex_sr, ex_ss, lq_ptr, s_lq,
                    stats_ptr, g_ptr, gmax_ptr, dc_ptr, R, N, D, S, pad_id, ignore_index,
                    temperature, HAS_LQ: tl.constexpr, FORM_KL: tl.constexpr,
                    DETACH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PREC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    acc_i = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    acc_v = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_in = rows < R
        valid, tgt, tid = _row_setup(tgt_ptr, s_tg, cid_ptr, s_cid, rows, R, pad_id,
                                     ignore_index)
        s_i, s_t, s_v = _odmt_scores(qi_ptr, qt_ptr, qv_ptr, sq_i, sq_t, sq_v, sq_d,
                                     ci_ptr, ct_ptr, cv_ptr, sc_i, sc_t, sc_v, sc_d,
                                     rows, row_in, cols, col_ok, lq, D,
                                     BLOCK_R, BLOCK_N, BLOCK_D, PREC)
        keep, is_t = _keep_tile(cols, col_ok, cid, rows, valid, tgt, tid,
                                ex_ptr, ex_sr, ex_ss, S, pad_id)
        dz_i, dz_t, dz_v = _odmt_dz(s_i, s_t, s_v, keep, is_t, stats_ptr, g_ptr, gmax, rows,
                                    valid, R, temperature, FORM_KL, DETACH)
        r_off = rows.to(tl.int64)[:, None]
        qm = row_in[:, None] & o_ok[None, :]
        q = tl.load(qi_ptr + r_off * sq_i + offs_o[None, :] * sq_d, mask=qm, other=0.0)
        acc_i = tl.dot(tl.trans(dz_i.to(q.dtype)), q, acc=acc_i, input_precision=PREC)
        q = tl.load(qt_ptr + r_off * sq_t + offs_o[None, :] * sq_d, mask=qm, other=0.0)
        acc_t = tl.dot(tl.trans(dz_t.to(q.dtype)), q, acc=acc_t, input_precision=PREC)
        q = tl.load(qv_ptr + r_off * sq_v + offs_o[None, :] * sq_d, mask=qm, other=0.0)
        acc_v = tl.dot(tl.trans(dz_v.to(q.dtype)), q, acc=acc_v, input_precision=PREC)
    out = dc_ptr + cols.to(tl.int64)[:, None] * D + offs_o[None, :]
    om = col_ok[:, None] & o_ok[None, :]
    ty = dc_ptr.dtype.element_ty
    tl.store(out, (acc_i * gmax).to(ty), mask=om)
    tl.store(out + N * D, (acc_t * gmax).to(ty), mask=om)
    tl.store(out + 2 * N * D, (acc_v * gmax).to(ty), mask=om)


# ======================================================================================
# Launch configuration
# ======================================================================================


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(kind: str, rows: int, cols: int, d: int, interpret: bool) -> dict:
    """Fixed tile sizes for one kernel launch.

    ``kind`` is ``fwd`` / ``dq`` / ``dc`` (+ ``3`` for the three-branch kernels). ``rows`` is
    the extent the grid tiles (R for fwd/dq, N for dc); ``cols`` the extent each program
    walks. Under the interpreter every tile is 16 wide (numpy is fast on few, small blocks
    and the tests still cross tile borders). On the GPU: 64 features per ``tl.dot`` step
    (a 128-byte bf16 row), 64 walked columns, and a grid tile of 32 (small problems: more
    programs for the SMs; three-branch backward: three fp32 accumulators of 32 x 256
    must stay in registers), 64 or 128 rows; the backward output chunk covers up to 256
    features (128 with 128-row tiles) so that at d <= 256 the scores are recomputed once
    per backward kernel.
    """
    p2d = max(16, triton.next_power_of_2(d))
    if interpret:
        return dict(BLOCK_T=16, BLOCK_W=16, BLOCK_D=16, BLOCK_DO=16, num_warps=4,
                    num_stages=1)
    three = kind.endswith("3")
    if three:
        tile = 32 if (kind != "fwd3" or rows < 4096) else 64
        return dict(BLOCK_T=tile, BLOCK_W=64, BLOCK_D=min(64, p2d), BLOCK_DO=min(256, p2d),
                    num_warps=8 if kind != "fwd3" or tile == 64 else 4, num_stages=2)
    tile = 128 if rows >= 32768 else (64 if rows >= 4096 else 32)
    return dict(BLOCK_T=tile, BLOCK_W=64, BLOCK_D=min(64, p2d),
                BLOCK_DO=min(256 if tile <= 64 else 128, p2d),
                num_warps=8 if tile >= 64 else 4, num_stages=3 if kind == "fwd" else 2)


def _launch(kernel, cfg: dict, extent: int, d: int, args: tuple, flags: dict, *,
            grid_over_rows: bool, with_do: bool) -> None:
    """Launch ``kernel`` over ``extent`` (rows or columns) with the heuristic's tiles.

    Should a GPU refuse them (``OutOfResources``: shared memory or registers), retry
    deterministically with one pipeline stage, then half the output chunk, then half the
    grid tile -- a fixed fallback chain, not autotuning.
    """
    tries = [cfg, {**cfg, "num_stages": 1}]
    if with_do and cfg["BLOCK_DO"] > 32:
        tries.append({**tries[-1], "BLOCK_DO": cfg["BLOCK_DO"] // 2})
    if cfg["BLOCK_T"] > 16:
        tries.append({**tries[-1], "BLOCK_T": cfg["BLOCK_T"] // 2})
    for i, c in enumerate(tries):
        tile, walk = c["BLOCK_T"], c["BLOCK_W"]
        meta = dict(BLOCK_R=tile if grid_over_rows else walk,
                    BLOCK_N=walk if grid_over_rows else tile, BLOCK_D=c["BLOCK_D"])
        grid = (triton.cdiv(extent, tile),)
        if with_do:
            meta["BLOCK_DO"] = c["BLOCK_DO"]
            grid = (grid[0], triton.cdiv(d, c["BLOCK_DO"]))
        try:
            kernel[grid](*args, **flags, **meta, num_warps=c["num_warps"],
                         num_stages=c["num_stages"])
            return
        except OutOfResources:
            if i == len(tries) - 1:
                raise


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _excl_args(exclude_ids: torch.Tensor | None, candidate_ids: torch.Tensor):
    if exclude_ids is None or exclude_ids.shape[1] == 0:
        return candidate_ids, 0, 0, 0
    return exclude_ids, exclude_ids.stride(0), exclude_ids.stride(1), exclude_ids.shape[1]


def _lq_args(log_q: torch.Tensor | None, candidate_ids: torch.Tensor):
    if log_q is None:
        return candidate_ids, 0, False
    return log_q, log_q.stride(0), True


def _gmax(g: torch.Tensor) -> torch.Tensor:
    """Largest |upstream weight| (device scalar, no sync): dz is scaled by its inverse."""
    return g.detach().abs().amax().reshape(1).to(torch.float32)


# ======================================================================================
# Single branch: custom ops and launchers
# ======================================================================================


@torch.library.custom_op("odmt::debiased_inbatch_ce", mutates_args=())
def _ce_op(queries: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor,
           candidate_ids: torch.Tensor, exclude_ids: torch.Tensor | None,
           log_q: torch.Tensor | None, pad_id: int,
           ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (0 on ignored rows) and per-row log-sum-exp, both fp32 ``(R,)``."""
    R, D = queries.shape
    N = candidates.shape[0]
    loss = torch.empty(R, device=queries.device, dtype=torch.float32)
    lse = torch.empty(R, device=queries.device, dtype=torch.float32)
    cfg = _config("fwd", R, N, D, _interpreting(queries))
    ex, ex_sr, ex_ss, S = _excl_args(exclude_ids, candidate_ids)
    lq, s_lq, has_lq = _lq_args(log_q, candidate_ids)
    args = (queries, queries.stride(0), queries.stride(1), candidates, candidates.stride(0),
            candidates.stride(1), target, target.stride(0), candidate_ids,
            candidate_ids.stride(0), ex, ex_sr, ex_ss, lq, s_lq, loss, lse, R, N, D, S, pad_id,
            ignore_index)
    _launch(_ce_fwd_kernel, cfg, R, D, args, dict(HAS_LQ=has_lq, PREC=_prec(queries.dtype)),
            grid_over_rows=True, with_do=False)
    return loss, lse


@_ce_op.register_fake
def _ce_op_fake(queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id,
                ignore_index):
    R = queries.shape[0]
    return (queries.new_empty(R, dtype=torch.float32),
            queries.new_empty(R, dtype=torch.float32))


@torch.library.custom_op("odmt::debiased_inbatch_ce_backward", mutates_args=())
def _ce_bwd_op(queries: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor,
               candidate_ids: torch.Tensor, exclude_ids: torch.Tensor | None,
               log_q: torch.Tensor | None, lse: torch.Tensor, grad_rows: torch.Tensor,
               pad_id: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_r grad_rows[r] * loss[r]`` w.r.t. queries and candidates."""
    R, D = queries.shape
    N = candidates.shape[0]
    g = grad_rows.to(torch.float32).contiguous()
    gmax = _gmax(g)
    dq = torch.empty(R, D, device=queries.device, dtype=queries.dtype)
    dc = torch.empty(N, D, device=candidates.device, dtype=candidates.dtype)
    ex, ex_sr, ex_ss, S = _excl_args(exclude_ids, candidate_ids)
    lq, s_lq, has_lq = _lq_args(log_q, candidate_ids)
    interp = _interpreting(queries)
    common = (target, target.stride(0), candidate_ids, candidate_ids.stride(0), ex, ex_sr,
              ex_ss, lq, s_lq, lse, g, gmax)
    head = (queries, queries.stride(0), queries.stride(1), candidates, candidates.stride(0),
            candidates.stride(1), *common)
    flags = dict(HAS_LQ=has_lq, PREC=_prec(queries.dtype))
    _launch(_ce_dq_kernel, _config("dq", R, N, D, interp), R, D,
            (*head, dq, dq.stride(0), dq.stride(1), R, N, D, S, pad_id, ignore_index), flags,
            grid_over_rows=True, with_do=True)
    _launch(_ce_dc_kernel, _config("dc", N, R, D, interp), N, D,
            (*head, dc, dc.stride(0), dc.stride(1), R, N, D, S, pad_id, ignore_index), flags,
            grid_over_rows=False, with_do=True)
    return dq, dc


@_ce_bwd_op.register_fake
def _ce_bwd_op_fake(queries, candidates, target, candidate_ids, exclude_ids, log_q, lse,
                    grad_rows, pad_id, ignore_index):
    return (queries.new_empty(queries.shape), candidates.new_empty(candidates.shape))


def _ce_setup_context(ctx, inputs, output):
    queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index = inputs
    ctx.save_for_backward(queries, candidates, target, candidate_ids, exclude_ids, log_q,
                          output[1])
    ctx.pad_id = pad_id
    ctx.ignore_index = ignore_index


def _ce_backward(ctx, grad_loss, grad_lse):
    queries, candidates, target, candidate_ids, exclude_ids, log_q, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dq, dc = _ce_bwd_op(queries, candidates, target, candidate_ids, exclude_ids, log_q, lse,
                        grad_loss, ctx.pad_id, ctx.ignore_index)
    return dq, dc, None, None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def _valid_count(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (target != ignore_index).sum().clamp(min=1).to(torch.float32)


def debiased_inbatch_cross_entropy(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    log_q: torch.Tensor | None,
    pad_id: int,
    ignore_index: int,
    reduction: str,
) -> torch.Tensor:
    """Debiased in-batch softmax CE with false-negative exclusion (fp32 result).

    ``queries (R, d)``, ``candidates (N, d)`` (fp32/fp16/bf16, any strides), ``target (R,)``
    column indices or ``ignore_index``, ``candidate_ids (N,)`` item ids, ``exclude_ids``
    ``(R, S)`` item ids or None (any strides, stride 0 allowed), ``log_q (N,)`` or None.
    ``reduction``: ``"mean"`` over valid rows (0 when none), ``"sum"`` or ``"none"`` (``(R,)``
    with 0 on ignored rows). Same semantics as
    :func:`~.reference.debiased_inbatch_cross_entropy_reference`; inputs are assumed
    validated (``odmt_components.ops`` does it).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    per_row, _ = _ce_op(queries, candidates, target, candidate_ids, exclude_ids, log_q,
                        int(pad_id), int(ignore_index))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / _valid_count(target, ignore_index)


# ======================================================================================
# Three branches: custom ops and launchers
# ======================================================================================


def _branch_args(qs: tuple[torch.Tensor, ...], cs: tuple[torch.Tensor, ...]):
    """Pointers and strides of the three branches; feature strides must agree (else the
    inputs are made contiguous, which only copies in that unusual case)."""
    if len({q.stride(1) for q in qs}) != 1:
        qs = tuple(q.contiguous() for q in qs)
    if len({c.stride(1) for c in cs}) != 1:
        cs = tuple(c.contiguous() for c in cs)
    return ((*qs, qs[0].stride(0), qs[1].stride(0), qs[2].stride(0), qs[0].stride(1),
             *cs, cs[0].stride(0), cs[1].stride(0), cs[2].stride(0), cs[0].stride(1)))


@torch.library.custom_op("odmt::mutual_distillation", mutates_args=())
def _odmt_op(q_id: torch.Tensor, q_text: torch.Tensor, q_image: torch.Tensor,
             c_id: torch.Tensor, c_text: torch.Tensor, c_image: torch.Tensor,
             target: torch.Tensor, candidate_ids: torch.Tensor,
             exclude_ids: torch.Tensor | None, log_q: torch.Tensor | None,
             temperature: float, form_kl: bool, detach_teacher: bool, pad_id: int,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row parts ``(6, R)`` (ce_id, ce_text, ce_image, kl_id_text, kl_id_image,
    kl_ensemble_id; 0 on ignored rows) and per-row statistics ``(10, R)``, both fp32.
    ``detach_teacher`` only matters to the backward."""
    R, D = q_id.shape
    N = c_id.shape[0]
    loss = torch.empty(_N_PARTS, R, device=q_id.device, dtype=torch.float32)
    stats = torch.empty(_N_STATS, R, device=q_id.device, dtype=torch.float32)
    cfg = _config("fwd3", R, N, D, _interpreting(q_id))
    ex, ex_sr, ex_ss, S = _excl_args(exclude_ids, candidate_ids)
    lq, s_lq, has_lq = _lq_args(log_q, candidate_ids)
    args = (*_branch_args((q_id, q_text, q_image), (c_id, c_text, c_image)),
            target, target.stride(0), candidate_ids, candidate_ids.stride(0), ex, ex_sr, ex_ss,
            lq, s_lq, loss, stats, R, N, D, S, pad_id, ignore_index, float(temperature))
    flags = dict(HAS_LQ=has_lq, FORM_KL=bool(form_kl), PREC=_prec(q_id.dtype))
    _launch(_odmt_fwd_kernel, cfg, R, D, args, flags, grid_over_rows=True, with_do=False)
    return loss, stats


@_odmt_op.register_fake
def _odmt_op_fake(q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids,
                  exclude_ids, log_q, temperature, form_kl, detach_teacher, pad_id,
                  ignore_index):
    R = q_id.shape[0]
    return (q_id.new_empty(_N_PARTS, R, dtype=torch.float32),
            q_id.new_empty(_N_STATS, R, dtype=torch.float32))


@torch.library.custom_op("odmt::mutual_distillation_backward", mutates_args=())
def _odmt_bwd_op(q_id: torch.Tensor, q_text: torch.Tensor, q_image: torch.Tensor,
                 c_id: torch.Tensor, c_text: torch.Tensor, c_image: torch.Tensor,
                 target: torch.Tensor, candidate_ids: torch.Tensor,
                 exclude_ids: torch.Tensor | None, log_q: torch.Tensor | None,
                 stats: torch.Tensor, grad_rows: torch.Tensor, temperature: float,
                 form_kl: bool, detach_teacher: bool, pad_id: int,
                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(3, R, d)`` and ``(3, N, d)`` (branches id, text, image) of
    ``sum grad_rows * parts``."""
    R, D = q_id.shape
    N = c_id.shape[0]
    g = grad_rows.to(torch.float32).contiguous()
    gmax = _gmax(g)
    dq = torch.empty(3, R, D, device=q_id.device, dtype=q_id.dtype)
    dc = torch.empty(3, N, D, device=c_id.device, dtype=c_id.dtype)
    ex, ex_sr, ex_ss, S = _excl_args(exclude_ids, candidate_ids)
    lq, s_lq, has_lq = _lq_args(log_q, candidate_ids)
    interp = _interpreting(q_id)
    head = _branch_args((q_id, q_text, q_image), (c_id, c_text, c_image))
    common = (target, target.stride(0), candidate_ids, candidate_ids.stride(0), ex, ex_sr,
              ex_ss, lq, s_lq, stats, g, gmax)
    flags = dict(HAS_LQ=has_lq, FORM_KL=bool(form_kl), DETACH=bool(detach_teacher),
                 PREC=_prec(q_id.dtype))
    tail = (R, N, D, S, pad_id, ignore_index, float(temperature))
    _launch(_odmt_dq_kernel, _config("dq3", R, N, D, interp), R, D,
            (*head, *common, dq, *tail), flags, grid_over_rows=True, with_do=True)
    _launch(_odmt_dc_kernel, _config("dc3", N, R, D, interp), N, D,
            (*head, *common, dc, *tail), flags, grid_over_rows=False, with_do=True)
    return dq, dc


@_odmt_bwd_op.register_fake
def _odmt_bwd_op_fake(q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids,
                      exclude_ids, log_q, stats, grad_rows, temperature, form_kl,
                      detach_teacher, pad_id, ignore_index):
    R, D = q_id.shape
    N = c_id.shape[0]
    return (q_id.new_empty(3, R, D), c_id.new_empty(3, N, D))


def _odmt_setup_context(ctx, inputs, output):
    (q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids, exclude_ids, log_q,
     temperature, form_kl, detach_teacher, pad_id, ignore_index) = inputs
    ctx.save_for_backward(q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids,
                          exclude_ids, log_q, output[1])
    ctx.args = (temperature, form_kl, detach_teacher, pad_id, ignore_index)


def _odmt_backward(ctx, grad_loss, grad_stats):
    saved = ctx.saved_tensors
    temperature, form_kl, detach_teacher, pad_id, ignore_index = ctx.args
    if grad_loss is None:
        grad_loss = torch.zeros_like(saved[-1][:_N_PARTS])
    dq, dc = _odmt_bwd_op(*saved, grad_loss, temperature, form_kl, detach_teacher, pad_id,
                          ignore_index)
    return (dq[0], dq[1], dq[2], dc[0], dc[1], dc[2]) + (None,) * 9


_odmt_op.register_autograd(_odmt_backward, setup_context=_odmt_setup_context)


def mutual_distillation_loss(
    q_id: torch.Tensor,
    q_text: torch.Tensor,
    q_image: torch.Tensor,
    c_id: torch.Tensor,
    c_text: torch.Tensor,
    c_image: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    log_q: torch.Tensor | None,
    temperature: float,
    detach_teacher: bool,
    form: str,
    pad_id: int,
    ignore_index: int,
    reduction: str,
) -> DistillationLosses:
    """ODMT's three branch CEs and three distillation terms in one fused pass family.

    Queries ``(R, d)`` and candidates ``(N, d)`` of the id, text and image branches (same
    d and dtype), the shared ``target``/``candidate_ids``/``exclude_ids``/``log_q`` as in
    :func:`debiased_inbatch_cross_entropy`; ``temperature > 0``; ``detach_teacher``: the
    teachers get no gradient from the distillation terms; ``form``: ``"kl"`` or ``"ce"``;
    ``reduction``: ``"mean"`` or ``"sum"``. Same semantics as
    :func:`~.reference.mutual_distillation_reference`; fp32 results.
    """
    if form not in ("kl", "ce"):
        raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    widths = {t.shape[1] for t in (q_id, q_text, q_image, c_id, c_text, c_image)}
    if len(widths) != 1:
        raise ValueError(f"all queries and candidates must share the width d, got {widths}")
    dtypes = {t.dtype for t in (q_id, q_text, q_image, c_id, c_text, c_image)}
    if len(dtypes) != 1:
        raise TypeError(f"all queries and candidates must share one dtype, got {dtypes}")
    per_row, _ = _odmt_op(q_id, q_text, q_image, c_id, c_text, c_image, target,
                          candidate_ids, exclude_ids, log_q, float(temperature), form == "kl",
                          bool(detach_teacher), int(pad_id), int(ignore_index))
    parts = per_row.sum(dim=1)
    if reduction == "mean":
        parts = parts / _valid_count(target, ignore_index)
    ce_id, ce_text, ce_image, kl_it, kl_iv, kl_ei = parts.unbind(0)
    return DistillationLosses(
        ce=ce_id + ce_text + ce_image,
        kl=kl_it + kl_iv + kl_ei,
        ce_id=ce_id,
        ce_text=ce_text,
        ce_image=ce_image,
        kl_id_text=kl_it,
        kl_id_image=kl_iv,
        kl_ensemble_id=kl_ei,
    )

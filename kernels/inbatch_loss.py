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
skipped (loss 0, gradient 0), whatever their queries hold (NaN, inf: the row-wise backward
loads queries masked by the valid rows, the column-wise one reads a copy with the ignored
rows zeroed). ``K_r`` is the set of kept columns.

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
Forward (``_ce_fwd_kernel``, ``_odmt_fwd_kernel``): grid = row tiles x column splits. A
program loads its row tile's per-row data once (target column and target item id, gathered
by ``_row_prep_kernel``, and, when the padded width ``D_PAD <= 256``, the whole
``(BLOCK_R, D_PAD)`` query tile), then walks its columns in ``BLOCK_N`` tiles: one
``tl.dot(q, c^T)`` with K = D_PAD per tile (the candidate tile is one load that the software
pipeline overlaps with the previous tile's math), or, for d > 256, a loop over ``BLOCK_D``
chunks; then the exclusion mask of the tile (shared by the three branches), then the online
statistics. Each split writes its partial statistics (running max, exp-sums, target score,
weighted sums); a small combine kernel merges the splits and stores the losses and the
statistics the backward needs (lse's, ``wbar``).

Past the full width (``_SCORE_GEMM``; the paper's d = 768, 16-bit inputs), both ops: the
score tiles are not dots of the kernel but loads from float32 slabs ``S = Q C^T`` that one
(batched, for the three branches) cuBLAS GEMM forms a column slab at a time (whole forward
splits; at most half the columns and ``_DZ_BUDGET`` bytes: never an ``R x N`` tensor). Per
score tile the chunked walk took 12 dependent 64-wide steps of small dots a branch,
reloading the row tile's queries each time, where the slab costs 4 bytes an element and
branch of reads; the forward takes one launch a slab, its splits numbered among all of the
call's, and the backward's dz-only kernel reads its slab's scores the same way.

Backward, deterministic, no atomics: a row-wise kernel (``_ce_dq_kernel``,
``_odmt_dq_kernel``) recomputes the score tiles, forms ``dz`` and accumulates ``dQ += dz @
C[cols]``. ``dC = dz^T Q`` then comes one of two ways. By default (``_DC_GEMM``) the dQ
kernel also stores its ``dz`` tiles (the inputs' dtype, as they enter its own dot) into a
workspace holding one column slab -- every row, ``width`` columns, at most ``_DZ_BUDGET``
bytes and half the columns (:func:`_dz_slab_width`), never an ``R x N`` tensor -- and one
cuBLAS GEMM a slab and branch forms that slab's rows of ``dC``; the dQ launches walk one slab
each, and the host adds their float32 shares of dQ in slab order. So no score tile is
computed a third time, at the price of writing and reading dz (2 bytes an element in 16
bits). By default (``_DQ_GEMM``) ``dQ = dz C`` is a cuBLAS GEMM too, and the kernel
(``DQ_OFF``, at the forward's tiles) only recomputes the scores, forms dz and stores it. Otherwise
a column-wise kernel (``_ce_dc_kernel``, ``_odmt_dc_kernel``) loops over row tiles, recomputes
the scores and accumulates ``dC += dz^T @ Q[rows]`` (with ``TRANS_S`` it forms ``S^T = C
Q^T``, so that both dots are wgmma and ``dz^T`` is the A operand as computed). At ``D_PAD <= 256``
each program owns the full width: the candidate (resp. query) tile loaded for the scores is
the very operand of the gradient dot. For d > 256 the grid adds chunks of ``BLOCK_DO`` output features (the scores
are recomputed per chunk). ``dz`` is cast to the input dtype for the tensor-core dot; to keep
fp16 from underflowing (``g = 1/n_valid`` times ``p ~ 1/N``), the per-row weights are divided
by their largest magnitude inside the kernels and the accumulators multiplied back at the end
(fp16 inputs only: bf16 and fp32 take a scale of 1, :func:`_gmax`).
A three-branch grid smaller than two programs an SM (the paper scale: 144 / 156 programs of
one SM each) also splits its walk (``_bwd_split``, grid axis 2): each split writes float32
partials, which ``_sum_splits_kernel`` adds in split order -- still deterministic.

Exclusion, skipped where it cannot matter
-----------------------------------------
For almost every (row tile, column tile) pair no column is a row's target column, another
copy of its target item or one of its excluded ids. ``_tile_flags`` builds per call and tile
shape a ``(cdiv(R, BLOCK_R), cdiv(N, BLOCK_N))`` byte grid marking the pairs where one is
(the candidate ids sorted once; one ``_flag_kernel`` launch binary-searches the ``R (S + 1)``
row ids in them; no host sync, nothing of size ``R x N``), and each tile branches on its
byte: unflagged, the per-column bias (``-log Q``, ``-inf`` on padding) is the whole rule;
flagged, the target one-hot and the exclusion test run. A sparse flagged pair (1) compares
each row against the next two entries of its sorted drop list (``_drop_lists``: the columns
it drops, ``(R, DL_K)`` int32); a dense one (2) compares the column ids against the row's
target item and excluded ids. How these were chosen, with the instruction counts and
timings behind them: ``kernels/DESIGN.md``.

Block sizes come from a fixed heuristic (``_config``), not autotuning, with a fixed
fallback chain when a GPU refuses a tile (``_launch``); small 16-wide tiles under
``TRITON_INTERPRET=1``. Every launch records the compiled kernel's registers and spills in
:data:`KERNEL_STATS` (the benchmark prints them).

Public functions (registered as custom ops ``odmt::debiased_inbatch_ce`` and
``odmt::mutual_distillation``, with fake and autograd implementations; their backward
kernels are the custom ops ``odmt::debiased_inbatch_ce_backward`` and
``odmt::mutual_distillation_backward``). As in ``attention.py``, eager calls on plain tensors
run the same launch functions through a plain ``torch.autograd.Function`` (``_DirectCE``,
``_DirectODMT``; :func:`~._device.direct_eager_call`), whose backward also reuses the
forward's per-call preparation (:func:`_prep`: row targets, sorted ids, flag grids, drop
lists) instead of building it again; ``torch.compile`` and the other tracing contexts take
the custom ops. The host's share matters here: at the paper's batch a call's kernels take
0.4-0.9 ms and its launches and small tensor operations took longer (Runs 6 and 7).

* :func:`debiased_inbatch_cross_entropy`
* :func:`mutual_distillation_loss`
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from ._device import check_interpreter, device_sms, direct_eager_call, on_device_of
from ._host import cdiv, next_power_of_2
from .reference import DistillationLosses

__all__ = ["KERNEL_STATS", "debiased_inbatch_cross_entropy", "mutual_distillation_loss"]

# Per-row statistics of the three-branch forward, in this order (rows of the stats tensor).
_N_STATS = 10  # lse1_i, lse1_t, lse1_v, lseT_i, lseT_t, lseT_v, lseT_e, wbar_it, wbar_iv, wbar_ei
_N_PARTS = 6  # ce_i, ce_t, ce_v, kl_it, kl_iv, kl_ei
# Partial statistics of one column split: m_i m_t m_v m_e, l1_i l1_t l1_v, lt_i lt_t lt_v lt_e,
# w_it w_iv w_ei, zt_i zt_t zt_v.
_N_SPLIT_STATS = 17

#: Registers and spills of the last compiled launch of each kernel (filled on GPU launches).
KERNEL_STATS: dict[str, dict] = {}

# Widest padded d whose whole row tile a program holds (one dot per score tile); wider d is
# walked in BLOCK_D chunks. Tests lower it to exercise the chunked path.
_FULL_D_MAX = 256
# Number of SMs the launch heuristic plans for; None = ask the device (2 under the interpreter).
_SM_OVERRIDE: int | None = None
# Excluded ids compared per unrolled chunk.
_S_CHUNK = 16
# Padding of the drop lists (``_drop_lists``): above every column index.
_DL_END = tl.constexpr(2**31 - 1)
# Smallest R * N whose kernels read drop lists (``_lists_on``). Below it a call is bound by
# the host's launches, which the lists' own (a list launch and a dense-pair launch each way,
# ``_row_lists``, ``_list_flags``) lengthen more than the lists shorten the kernels: Run 7
# (H100) timed the single-branch call at R = N = 16,384 (2^28 pairs) at 5.29 ms with lists and
# 4.91 without, and at 65,536 (2^32) at 27.2 with and 35.8 without; the three-branch call at
# 16k 9.36 / 9.37. None: 2**30 on a GPU, 0 under the interpreter (the kernel tests set 0 on a
# GPU too, and one sets it high for the id test).
_DL_MIN_PAIRS: int | None = None
# True: where d is past the full-width limit (the paper's d = 768) and the inputs are 16-bit,
# the forward and dz-only kernels of both ops read their scores from float32 slabs that
# cuBLAS forms (``S = Q C^T``, one GEMM -- batched over the three branches -- a column slab:
# :func:`_score_slab`), instead of walking d in 64-wide steps of small dots per score tile
# (fp32 inputs keep the kernels' exact dots: cuBLAS may take TF32 where a user allows it).
# The slabs hold at most half the columns and ``_DZ_BUDGET`` bytes.
_SCORE_GEMM = True
# Per-kind overrides of the launch heuristic (keys of ``_config``'s dict); the benchmark's
# tile sweep and the tests set it, nothing else does.
_CONFIG_OVERRIDE: dict[str, dict] = {}


# ======================================================================================
# Shared tile helpers
# ======================================================================================


@triton.jit
def _exp(x):
    """``e^x`` as ``2^(x log2 e)`` on ``ex2.approx.ftz``: ``tl.exp`` lowers to the non-ftz
    ``ex2.approx.f32``, which ptxas wraps in a range test and two conditional multiplies per
    element for denormal results (three of the ~13 instructions an element of the CE forward
    issued, ~24 of the three-branch kernels' ~100). Flushing results below 2^-126 to 0 changes
    no softmax term that matters; everything else is the same approximation as before."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _row_prep_kernel(
    tgt_in_ptr, s_tg, cid_ptr, s_cid, tgt_ptr, tid_ptr, vals_ptr, fit_ptr, R, N, ignore_index, BLOCK: tl.constexpr
):  # fmt: skip
    """``tgt = target`` or -1 on ignored rows (int32); ``tid = candidate_ids[target]`` (int64);
    and, from program 0, ``fit = 1`` when every candidate id fits in int32 (the first and the
    last of the sorted ids ``vals``; the kernels then compare ids in int32), else 0."""
    if tl.program_id(0) == 0:
        lo = tl.load(vals_ptr).to(tl.int64)
        hi = tl.load(vals_ptr + N - 1).to(tl.int64)
        tl.store(fit_ptr, ((lo >= -2147483648) & (hi <= 2147483647)).to(tl.int32))
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < R
    t = tl.load(tgt_in_ptr + rows.to(tl.int64) * s_tg, mask=row_in, other=ignore_index)
    valid = row_in & (t != ignore_index)
    tid = tl.load(cid_ptr + tl.where(valid, t, 0).to(tl.int64) * s_cid, mask=valid, other=0)
    tl.store(tgt_ptr + rows, tl.where(valid, t, -1).to(tl.int32), mask=row_in)
    tl.store(tid_ptr + rows, tid.to(tl.int64), mask=row_in)


@triton.jit
def _lower_bound(vals_ptr, x, N, n_iter, UPPER: tl.constexpr):
    """Per lane, the first index of the sorted ``vals[:N]`` whose value is ``>= x`` (``> x``
    when ``UPPER``): a branch-free binary search of ``n_iter`` (= bit length of N) steps."""
    lo = (x * 0).to(tl.int64)
    hi = lo + N
    for _ in range(0, n_iter):
        act = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(vals_ptr + mid, mask=act, other=0)
        if UPPER:
            right = act & (v <= x)
        else:
            right = act & (v < x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(act & (~right), mid, hi)
    return lo


@triton.jit
def _groups_kernel(vals_ptr, order_ptr, pos_ptr, gstart_ptr, N, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """The (id, column tile) grouping of the sorted candidate ids (:func:`_id_groups`), by one
    program walking the ``N + 1`` sorted positions ``BLOCK`` at a time: position ``i`` starts
    a group when it is 0 or ``N`` or its id or its column's tile differs from position ``i -
    1``'s; ``pos[i]`` = the number of group starts up to ``i``, minus 1 (a block's inclusive
    scan plus the count carried from the blocks before), and each start ``i`` writes
    ``gstart[pos[i]] = i``. One program: ``N`` is a batch's candidates (a few thousand to
    tens of thousands), so the walk is a few dozen dependent steps at most."""
    carry = tl.zeros((), dtype=tl.int32)
    for block_start in range(0, N + 1, BLOCK):
        i = block_start + tl.arange(0, BLOCK)
        in_n = i < N
        has_prev = in_n & (i > 0)
        v = tl.load(vals_ptr + i, mask=in_n, other=0)
        v_prev = tl.load(vals_ptr + i - 1, mask=has_prev, other=0)
        tile = tl.load(order_ptr + i, mask=in_n, other=0) // BLOCK_N
        tile_prev = tl.load(order_ptr + i - 1, mask=has_prev, other=0) // BLOCK_N
        first = (i <= N) & ((i == 0) | (i == N) | (v != v_prev) | (tile != tile_prev))
        count = first.to(tl.int32)
        pos = carry + tl.cumsum(count, 0) - 1
        tl.store(pos_ptr + i, pos, mask=i <= N)
        tl.store(gstart_ptr + pos, i, mask=first)
        carry += tl.sum(count, 0)


@triton.jit
def _flag_kernel(
    tgt_ptr,
    tid_ptr,
    ex_ptr,
    ex_sr,
    ex_ss,
    vals_ptr,
    order_ptr,
    pos_ptr,
    gstart_ptr,
    fl_ptr,
    R,
    N,
    pad_id,
    n_iter,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The exclusion-present grid of one tile shape: ``flag[r // BLOCK_R, j // BLOCK_N] = 1``
    when ``j`` is row ``r``'s target column or ``candidate_ids[j]`` is its target item or one
    of ``exclude_ids[r, :S]`` (ids equal to ``pad_id`` skipped: padding is dropped per column
    anyway). Ignored rows mark nothing. Idempotent byte stores, no atomics.

    Program ``(i, s)`` takes rows ``i * BLOCK ...`` and one id of each: the target item for
    ``s = 0``, ``exclude_ids[r, s - 1]`` otherwise (read in place, stride-0 views included).
    All ``S + 1`` ids of a row search in parallel programs: one program walking them in turn
    (Run 4) made a chain of ~35 dependent loads per id. The id's run ``[lo, hi)`` in the sorted
    candidate ids (binary search) gives its column tiles, the groups ``[pos[lo], pos[hi])`` of
    the (id, column tile) grouping (:func:`_id_groups`). The target column's own tile is
    marked by slot 0 directly: only flagged tiles compute the one-hot term and the target
    score, so an unflagged tile needs nothing per element but a per-column bias."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.program_id(1)
    row_in = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_in, other=-1)
    valid = tgt >= 0
    tid = tl.load(tid_ptr + rows, mask=valid, other=0).to(tl.int64)
    if slot == 0:
        x = tid
    else:
        x = tl.load(ex_ptr + rows.to(tl.int64) * ex_sr + (slot - 1) * ex_ss, mask=valid, other=pad_id).to(tl.int64)
    ok = valid & (x != pad_id)
    lo = _lower_bound(vals_ptr, x, N, n_iter, False)
    hi = _lower_bound(vals_ptr, x, N, n_iter, True)
    g_lo = tl.load(pos_ptr + lo, mask=ok, other=0)
    cnt = tl.where(ok, tl.load(pos_ptr + hi, mask=ok, other=0) - g_lo, 0)
    fl_rows = fl_ptr + (rows // BLOCK_R).to(tl.int64) * tl.cdiv(N, BLOCK_N)
    one = tl.full((BLOCK,), 1, tl.int8)
    if slot == 0:  # the target column's own tile: the one-hot term and the target score
        tl.store(fl_rows + tgt // BLOCK_N, one, mask=valid)
    for k in range(0, tl.max(cnt, axis=0)):
        m = k < cnt
        st = tl.load(gstart_ptr + g_lo + k, mask=m, other=0)
        tl.store(fl_rows + tl.load(order_ptr + st, mask=m, other=0) // BLOCK_N, one, mask=m)


@triton.jit
def _dense_kernel(
    dl_ptr,
    tot_ptr,
    fl_ptr,
    R,
    N,
    n_ct,
    DL_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWWISE: tl.constexpr,
):
    """Raises a tile pair's flag (``_tile_flags``) from 1 to 2, "dense", where the kernels'
    drop-list pair does not cover it: some row's list overflowed (``tot > DL_K - 2``: every
    flagged pair of its row tile) or, for the row-wise kernels (``ROWWISE``), some row has
    three or more dropped columns in the column tile (entries ``k`` and ``k + 2`` of its
    sorted list in one tile; the column-wise test is ``_dense_cols_kernel``). Only flagged
    pairs are raised (they hold every dropped column; a grid the tests force keeps its
    zeros); byte stores of one value, no atomics."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < R
    fl_rows = fl_ptr + (rows // BLOCK_R).to(tl.int64) * n_ct
    lbase = dl_ptr + rows.to(tl.int64) * DL_K
    two = tl.full((BLOCK,), 2, tl.int8)
    for k in range(0, DL_K - 2 if ROWWISE else 0):
        a = tl.load(lbase + k, mask=row_in, other=_DL_END)
        c = tl.load(lbase + k + 2, mask=row_in, other=_DL_END)
        three = (c < N) & (a // BLOCK_N == c // BLOCK_N)
        f = tl.load(fl_rows + c // BLOCK_N, mask=three, other=0)
        tl.store(fl_rows + c // BLOCK_N, two, mask=three & (f != 0))
    over = row_in & (tl.load(tot_ptr + rows, mask=row_in, other=0) > DL_K - 2)
    if tl.max(over.to(tl.int32), axis=0) > 0:
        for ct in range(0, n_ct):
            f = tl.load(fl_rows + ct, mask=over, other=0)
            tl.store(fl_rows + ct, two, mask=over & (f != 0))


@triton.jit
def _dense_cols_kernel(
    crow_ptr, ccol_ptr, n_entries, fl_ptr, N, n_ct, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr
):
    """The column-wise counterpart of :func:`_dense_kernel`: raises a flagged pair to 2 where
    some column has three or more dropping rows in the row tile (entries ``k`` and ``k + 2``
    of the (column, row)-sorted drop pairs, ``_col_pairs``, on one column and row tile)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = k + 2 < n_entries
    c0 = tl.load(ccol_ptr + k, mask=ok, other=-1)
    c2 = tl.load(ccol_ptr + k + 2, mask=ok, other=-2)
    r0 = tl.load(crow_ptr + k, mask=ok, other=0)
    r2 = tl.load(crow_ptr + k + 2, mask=ok, other=0)
    three = ok & (c0 == c2) & (c2 < N) & (r0 // BLOCK_R == r2 // BLOCK_R)
    at = fl_ptr + (r2 // BLOCK_R).to(tl.int64) * n_ct + c2 // BLOCK_N
    f = tl.load(at, mask=three, other=0)
    tl.store(at, tl.full((BLOCK,), 2, tl.int8), mask=three & (f != 0))


@triton.jit
def _row_lists_kernel(
    tgt_ptr,
    tid_ptr,
    ex_ptr,
    ex_sr,
    ex_ss,
    vals_ptr,
    order_ptr,
    dl_ptr,
    tot_ptr,
    tile_ptr,
    st_ptr,
    R,
    N,
    S,
    pad_id,
    n_iter,
    n_split,
    split_cols,
    DL_K: tl.constexpr,
    IDS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_LISTS: tl.constexpr,
):
    """Per row, its drop list (``_drop_lists``): the sorted columns whose id is the row's
    target item or one of its excluded ids, but the target column itself (``(R, DL_K)``
    int32, ``_DL_END`` after the last, empty when the row drops more than ``DL_K - 2``), and
    the count before that cap; with ``TILE_LISTS`` also its tile list for column tiles of
    ``BLOCK_N`` (``_tile_lists``: entries past the second in one tile removed) and where its
    walk starts in each of ``n_split`` column ranges ``split_cols`` wide (``_split_starts``:
    the entries below the range's first column). One launch instead of ~50 small tensor
    operations, each a launch of its own.

    Program ``i`` takes rows ``i * BLOCK ...`` and all ``S + 1`` ids of each (``IDS`` lanes,
    a power of two): the id's run ``[lo, hi)`` in the sorted candidate ids by one binary
    search a lane, the runs laid end to end by a cumulative count along the row, entry ``k``
    of the list read from the run that holds it (``order[lo + k - start]``), then stored at
    its rank along the row (a ``(BLOCK, DL_K, DL_K)`` comparison: ``tl.sort``'s bitonic
    network took ~0.6 s a call under the interpreter). ``BLOCK`` keeps that tile at 8K
    elements (:func:`_lists_block`)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_in, other=-1)
    valid = tgt >= 0
    slot = tl.arange(0, IDS)[None, :]
    tid = tl.load(tid_ptr + rows, mask=valid, other=0).to(tl.int64)
    ex_in = valid[:, None] & (slot >= 1) & (slot <= S)
    ex_at = ex_ptr + rows.to(tl.int64)[:, None] * ex_sr + (slot - 1) * ex_ss
    ids = tl.where(slot == 0, tid[:, None], tl.load(ex_at, mask=ex_in, other=pad_id).to(tl.int64))
    ok = valid[:, None] & (slot <= S) & (ids != pad_id)
    lo = _lower_bound(vals_ptr, ids, N, n_iter, False)
    cnt = tl.where(ok, _lower_bound(vals_ptr, ids, N, n_iter, True) - lo, 0)
    upto = tl.cumsum(cnt, axis=1)
    start = upto - cnt
    total = tl.sum(cnt, axis=1)
    k = tl.arange(0, DL_K)[None, :]
    pos = tl.zeros((BLOCK, DL_K), tl.int64)
    for s in range(0, S + 1):  # registers only: slot s's run, taken out of the row's lanes
        own = slot == s
        lo_s = tl.sum(tl.where(own, lo, 0), axis=1)[:, None]
        start_s = tl.sum(tl.where(own, start, 0), axis=1)[:, None]
        end_s = tl.sum(tl.where(own, upto, 0), axis=1)[:, None]
        pos = tl.where((k >= start_s) & (k < end_s), lo_s + k - start_s, pos)
    held = k < total[:, None]
    col = tl.load(order_ptr + pos, mask=held, other=0).to(tl.int32)
    keep = held & (col != tgt[:, None]) & (total[:, None] <= DL_K - 2)
    key = tl.where(keep, col, _DL_END)
    # sorted by rank: the entries with a smaller key, ties (_DL_END, a column two ids share)
    # by position -- a permutation, so the store writes every slot of the row once
    j = k[:, None, :]
    smaller = (key[:, None, :] < key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & (j < k[:, :, None]))
    rank = tl.sum(smaller.to(tl.int32), axis=2)
    row_at = rows.to(tl.int64)[:, None] * DL_K
    tl.store(dl_ptr + row_at + rank, key, mask=row_in[:, None])
    tl.store(tot_ptr + rows, total.to(tl.int32), mask=row_in)
    if TILE_LISTS:
        tl.debug_barrier()  # the sorted lists, stored above by other threads, read back
        lists = tl.load(dl_ptr + row_at + k, mask=row_in[:, None], other=_DL_END)
        two_before = tl.load(dl_ptr + row_at + k - 2, mask=row_in[:, None] & (k >= 2), other=_DL_END)
        # sorted, so an entry is its tile's third or later when the entry two before shares
        # its tile; the rest keep their order at the front, _DL_END after them
        third = (k >= 2) & (lists != _DL_END) & (two_before // BLOCK_N == lists // BLOCK_N)
        kept = (lists != _DL_END) & ~third
        n_kept = tl.sum(kept.to(tl.int32), axis=1)[:, None]
        at = tl.where(kept, tl.cumsum(kept.to(tl.int32), axis=1), n_kept + tl.cumsum((~kept).to(tl.int32), axis=1)) - 1
        tl.store(tile_ptr + row_at + at, tl.where(kept, lists, _DL_END), mask=row_in[:, None])
        for i in range(0, n_split):
            below = tl.sum((kept & (lists < i * split_cols)).to(tl.int32), axis=1)
            tl.store(st_ptr + i * R + rows, below, mask=row_in)


@triton.jit
def _row_setup(tgt_ptr, tid_ptr, rows, R):
    """Per-row data of a row tile: (rows in range, valid rows, target column or -1, target
    item id as int64). ``tgt``/``tid`` are contiguous vectors the wrapper gathered."""
    row_in = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_in, other=-1)
    valid = tgt >= 0
    tid = tl.load(tid_ptr + rows, mask=valid, other=0).to(tl.int64)
    return row_in, valid, tgt, tid


@triton.jit
def _narrow_ids(e, pad_id):
    """int64 ids -> int32, ids outside the int32 range -> ``pad_id``: used only when every
    candidate id fits in int32 (``fit``), so such an id can match no column but padding,
    which is dropped anyway."""
    return tl.where((e >= -2147483648) & (e <= 2147483647), e, pad_id).to(tl.int32)


@triton.jit
def _hoist_ids(ex_ptr, ex_sr, ex_ss, rows, valid, S, pad_id, S_PAD: tl.constexpr, HOIST: tl.constexpr):
    """The row tile's excluded ids as a tuple of ``S_PAD`` int32 vectors (padded with
    ``pad_id``), loaded once before a column loop; empty unless ``HOIST``. Loaded inside the
    loop (the flagged branch of every tile), the sixteen loads went out one after another,
    each waiting for the previous compare (one register reused: sm_90 SASS of Triton 3.9)."""
    ids = ()
    if HOIST:
        ex_rows = ex_ptr + rows.to(tl.int64) * ex_sr
        for s in tl.static_range(S_PAD):
            ids = ids + (_narrow_ids(_ex_id(ex_rows, ex_ss, valid, S, s, pad_id), pad_id),)
    return ids


@triton.jit
def _ex_id(ex_rows, ex_ss, valid, S, slot, pad_id):
    """Excluded id ``slot`` of each row as int64 (``pad_id`` past ``S`` and on ignored rows),
    one 1-D load straight into the row layout of the compare."""
    in_s = (valid.to(tl.int32) * 0 + slot) < S
    return tl.load(ex_rows + slot * ex_ss, mask=valid & in_s, other=pad_id).to(tl.int64)


@triton.jit
def _by_row(x, TRANS: tl.constexpr):
    """A per-row vector broadcast over a tile: ``(rows, cols)``, or ``(cols, rows)`` when
    ``TRANS`` (the column-wise kernels compute ``S^T`` so that both of their dots are wgmma)."""
    if TRANS:
        return x[None, :]
    else:
        return x[:, None]


@triton.jit
def _by_col(x, TRANS: tl.constexpr):
    """A per-column vector broadcast over a tile (see :func:`_by_row`)."""
    if TRANS:
        return x[:, None]
    else:
        return x[None, :]


@triton.jit
def _excl_chunk(
    cid, ex_rows, ex_ss, valid, S, s0, pad_id, S_PAD: tl.constexpr, NARROW: tl.constexpr, TRANS: tl.constexpr
):
    """``hit[r, j] = cid[j] in exclude_ids[r, s0:s0+S_PAD]``, ids loaded here (the path for
    ``S > 16``, int64 ids that do not fit, and the column-wise kernels, whose rows change
    every step): the ``S_PAD`` id columns unrolled, each one 1-D load straight into the
    compare's row layout. ``NARROW``: ``cid`` is int32 and the ids are narrowed."""
    hit = _by_row(valid, TRANS) & (_by_col(cid, TRANS) != _by_col(cid, TRANS))
    for s in tl.static_range(S_PAD):
        e = _ex_id(ex_rows, ex_ss, valid, S, s0 + s, pad_id)
        if NARROW:
            e = _narrow_ids(e, pad_id)
        hit = hit | (_by_col(cid, TRANS) == _by_row(e, TRANS))
    return hit


@triton.jit
def _excl_ids(
    cid,
    ex_rows,
    ex_ss,
    valid,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    NARROW: tl.constexpr,
    TRANS: tl.constexpr = False,
):
    """Membership over all ``S`` ids: one unrolled chunk when ``EX_ONE`` (S <= S_PAD), else a
    loop over ``S_PAD``-wide chunks."""
    if EX_ONE:
        hit = _excl_chunk(cid, ex_rows, ex_ss, valid, S, 0, pad_id, S_PAD, NARROW, TRANS)
    else:
        hit = _by_row(valid, TRANS) & (_by_col(cid, TRANS) != _by_col(cid, TRANS))
        for s0 in range(0, S, S_PAD):
            hit = hit | _excl_chunk(cid, ex_rows, ex_ss, valid, S, s0, pad_id, S_PAD, NARROW, TRANS)
    return hit


@triton.jit
def _hit32(
    c32,
    rows,
    valid,
    tid,
    ids,
    ex_rows,
    ex_ss,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    HOIST: tl.constexpr,
    WITH_PAD: tl.constexpr,
    TRANS: tl.constexpr,
):
    """The int32 membership test of :func:`_drop_tile` (target item, padding, excluded ids),
    one fused compare-or an element and id in SASS (``ISETP.EQ.OR``)."""
    hit = _by_col(c32, TRANS) == _by_row(tid.to(tl.int32), TRANS)
    if WITH_PAD:
        hit = hit | _by_col(c32 == pad_id, TRANS)
    if HOIST:
        for s in tl.static_range(S_PAD):
            hit = hit | (_by_col(c32, TRANS) == _by_row(ids[s], TRANS))
    elif S_PAD > 0:
        hit = hit | _excl_ids(c32, ex_rows, ex_ss, valid, S, pad_id, S_PAD, EX_ONE, True, TRANS)
    return hit


@triton.jit
def _load_cid32(c32_ptr, cols, N, pad_id, IDS32: tl.constexpr):
    """The tile's column ids narrowed to int32 (``_cid32_tensor``; meaningful only when the
    call's ``fit`` flag is set), issued before the tile's score dot so that its latency hides
    behind the dot: loaded in the flagged branch, after the dot, the compares stalled on them
    (sm_90 SASS). A placeholder without ``IDS32``."""
    if IDS32:
        return tl.load(c32_ptr + cols, mask=cols < N, other=pad_id)
    else:
        return cols


@triton.jit
def _flagged_drop(
    cols,
    c32,
    cid_ptr,
    s_cid,
    N,
    rows,
    valid,
    tgt,
    tid,
    ids,
    fit,
    ex_ptr,
    ex_sr,
    ex_ss,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
):
    """:func:`_drop_tile` of the single-branch forward (no padding test: the column bias has
    it) on the prefetched int32 ids ``c32`` when they are exact (``fit``); the int64 ids are
    read here otherwise. (The dQ kernel reads its ids in the branch still: two of its programs
    share an SM and cover each other's waits, and the prefetch made it spill.)"""
    if IDS32 and fit != 0:
        drop, is_t = _drop_tile(
            cols, c32, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
            S_PAD, EX_ONE, IDS32, HOIST, False, False, True,
        )  # fmt: skip
    else:
        cid = _load_cid(cid_ptr, s_cid, cols, N, pad_id)
        drop, is_t = _drop_tile(
            cols, cid, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
            S_PAD, EX_ONE, IDS32, HOIST, False,
        )  # fmt: skip
    return drop, is_t


# --------------------------------------------------------------------------------------
# Drop lists: the single-branch kernels' exclusion on sparse flagged tiles
# --------------------------------------------------------------------------------------


@triton.jit
def _dl_pair(base, ok, cur, stop, BOUNDED: tl.constexpr):
    """The next two entries of each list at cursor ``cur`` (``_DL_END`` from ``stop`` on).
    The row lists end in two ``_DL_END`` at least (``_drop_lists``), so a row's cursor never
    reads past them and needs no ``stop`` (not ``BOUNDED``: two registers and two compares a
    row fewer); a column's list is a segment of one array (``_col_lists``)."""
    if BOUNDED:
        h1 = tl.load(base + cur, mask=ok & (cur < stop), other=_DL_END)
        h2 = tl.load(base + cur + 1, mask=ok & (cur + 1 < stop), other=_DL_END)
    else:
        h1 = tl.load(base + cur, mask=ok, other=_DL_END)
        h2 = tl.load(base + cur + 1, mask=ok, other=_DL_END)
    return h1, h2


@triton.jit
def _dl_drop(cols, h1, h2, tgt, TRANS: tl.constexpr = False):
    """``(drop, is_t)`` of a sparse flagged tile (flag 1: no row has more than two drop
    columns in it): two compares an element against the row's next two drop columns, which
    never hold the target column, instead of one per excluded id."""
    c = _by_col(cols, TRANS)
    drop = (c == _by_row(h1, TRANS)) | (c == _by_row(h2, TRANS))
    return drop, c == _by_row(tgt, TRANS)


@triton.jit
def _dl_next(base, ok, cur, h1, h2, end, stop, BOUNDED: tl.constexpr):
    """Cursor and next pair after a flagged tile ending at ``end`` (a column, or a row in
    the column-wise kernel): past the pair's entries below ``end`` -- a list keeps at most
    two entries per tile (``_tile_lists``, ``_col_lists``), so that is all of them, dense
    tiles included; unflagged tiles hold none. The loads issue here and are first read
    after the next tile's dot."""
    cur = cur + (h1 < end).to(tl.int32) + (h2 < end).to(tl.int32)
    h1, h2 = _dl_pair(base, ok, cur, stop, BOUNDED)
    return cur, h1, h2


@triton.jit
def _dl_drop_rows(rows, cols, h1, h2, tgt, TRANS: tl.constexpr = False):
    """:func:`_dl_drop` of the column-wise kernel: each column's next two dropping rows."""
    drop = (_by_row(rows, TRANS) == _by_col(h1, TRANS)) | (_by_row(rows, TRANS) == _by_col(h2, TRANS))
    return drop, _by_col(cols, TRANS) == _by_row(tgt, TRANS)


@triton.jit
def _drop_tile(
    cols,
    cid,
    rows,
    valid,
    tgt,
    tid,
    ids,
    fit,
    ex_ptr,
    ex_sr,
    ex_ss,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    WITH_PAD: tl.constexpr = True,
    TRANS: tl.constexpr = False,
    CID32: tl.constexpr = False,
):
    """The full exclusion test of a flagged tile: returns ``(drop, is_t)``, ``drop`` true on
    other copies of the row's target item and on its excluded ids, and with ``WITH_PAD`` on
    padding (and columns past N, whose id reads as ``pad_id``; the single-branch kernels have
    those in their column bias already) -- never on the target column ``is_t``.

    Compares run in int32 when the pad id fits (``IDS32``) and every candidate id does
    (``fit``, one device flag per call, read once per program: a per-tile min/max of the
    column ids cost three CTA barriers a tile); the excluded ids come from ``ids`` (hoisted,
    ``HOIST``) or are loaded here. ``TRANS``: the tile is ``(cols, rows)``. ``CID32``: the
    caller checked ``fit`` and passes ``cid`` as int32 (see :func:`_flagged_drop`)."""
    is_t = _by_col(cols, TRANS) == _by_row(tgt, TRANS)
    ex_rows = ex_ptr + rows.to(tl.int64) * ex_sr
    if CID32:
        hit = _hit32(cid, rows, valid, tid, ids, ex_rows, ex_ss, S, pad_id, S_PAD, EX_ONE, HOIST, WITH_PAD, TRANS)
    elif IDS32 and fit != 0:
        hit = _hit32(
            cid.to(tl.int32), rows, valid, tid, ids, ex_rows, ex_ss, S, pad_id, S_PAD, EX_ONE, HOIST, WITH_PAD, TRANS
        )
    else:
        hit = _by_col(cid, TRANS) == _by_row(tid, TRANS)
        if WITH_PAD:
            hit = hit | _by_col(cid == pad_id, TRANS)
        if S_PAD > 0:
            hit = hit | _excl_ids(cid, ex_rows, ex_ss, valid, S, pad_id, S_PAD, EX_ONE, False, TRANS)
    return hit & (~is_t), is_t


@triton.jit
def _keep_tile(
    cols,
    col_ok,
    cid,
    rows,
    valid,
    tgt,
    tid,
    ids,
    fit,
    ex_ptr,
    ex_sr,
    ex_ss,
    S,
    pad_id,
    flag,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
):
    """Exclusion rule for one (rows x cols) tile of the three-branch kernels: returns (kept,
    is_target). ``flag`` (the tile pair's byte of the exclusion-present grid, see
    :func:`_tile_flags`) picks the path by a uniform branch: unset, no column of the tile is
    a row's target column, another copy of its target item or one of its excluded ids, so
    only padding (one compare per column) and the row bounds decide; set, :func:`_drop_tile`."""
    if flag != 0:
        drop, is_t = _drop_tile(
            cols, cid, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id, S_PAD, EX_ONE, IDS32, HOIST
        )
        keep = (~drop) & valid[:, None]
    else:
        is_t = (cols[None, :] == tgt[:, None]) & valid[:, None]
        keep = (cid != pad_id)[None, :] & col_ok[None, :] & valid[:, None]
    return keep, is_t


@triton.jit
def _score_tile(
    q_ptr,
    sq_r,
    sq_d,
    c_ptr,
    sc_n,
    sc_d,
    rows,
    row_in,
    cols,
    col_ok,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
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
def _slab_tile(sl_ptr, ssl_r, rows, row_ok, slab_cols, col_ok):
    """One score tile read from a float32 score slab ``(R, width)`` that cuBLAS formed
    (``SCORES_IN``; ``slab_cols``: the tile's columns counted from the slab's first): the
    same values as the kernels' own dots (float32 sums of the same products), 0 on rows or
    columns outside."""
    ptr = sl_ptr + rows.to(tl.int64)[:, None] * ssl_r + slab_cols[None, :]
    return tl.load(ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _full_tile(ptr, s_r, s_d, idx, ok, D, D_PAD: tl.constexpr):
    """The ``(len(idx), D_PAD)`` tile of rows ``idx`` (d tail and rows outside masked)."""
    offs_d = tl.arange(0, D_PAD)
    return tl.load(
        ptr + idx.to(tl.int64)[:, None] * s_r + offs_d[None, :] * s_d,
        mask=ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )


@triton.jit
def _tile_ptrs(ptr, s_r, s_d, idx, D, D_PAD: tl.constexpr):
    """Pointers to the ``(len(idx), D_PAD)`` tile of rows ``idx`` and the d-tail mask: a
    loop advances them by whole tiles (one add per pointer) instead of recomputing 64-bit row
    addresses from the row indices each step (~10 instructions a row in sm_90 SASS)."""
    offs_d = tl.arange(0, D_PAD)
    return ptr + idx.to(tl.int64)[:, None] * s_r + offs_d[None, :] * s_d, offs_d < D


@triton.jit
def _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ: tl.constexpr):
    """Column ids as int64 (padding outside N) and log Q (0 without correction)."""
    col_ok = cols < N
    cid = _load_cid(cid_ptr, s_cid, cols, N, pad_id)
    if HAS_LQ:
        lq = tl.load(lq_ptr + cols.to(tl.int64) * s_lq, mask=col_ok, other=0.0).to(tl.float32)
    else:
        lq = cols.to(tl.float32) * 0.0
    return col_ok, cid, lq


# ======================================================================================
# Single branch: forward (row tiles x column splits, then a combine)
# ======================================================================================


@triton.jit
def _load_bias(cb_ptr, cols, N):
    """Per-column score offset of the single-branch kernels (``_col_bias_tensor``: ``-log Q``,
    ``-inf`` on padding), ``-inf`` past N: one add per element is the whole exclusion rule of
    an unflagged tile (no target column, no other copy, no excluded id there), and one fp32
    load per column replaces the int64 id and the log Q."""
    return tl.load(cb_ptr + cols, mask=cols < N, other=float("-inf"))


@triton.jit
def _load_cid(cid_ptr, s_cid, cols, N, pad_id):
    """Column ids as int64, ``pad_id`` past N."""
    return tl.load(cid_ptr + cols.to(tl.int64) * s_cid, mask=cols < N, other=pad_id).to(tl.int64)


@triton.jit
def _ce_fwd_kernel(
    q_ptr,
    sq_r,
    sq_d,
    c_ptr,
    sc_n,
    sc_d,
    tgt_ptr,
    tid_ptr,
    cid_ptr,
    s_cid,
    ex_ptr,
    ex_sr,
    ex_ss,
    cb_ptr,
    c32_ptr,
    fit_ptr,
    fl_ptr,
    dl_ptr,
    dl_start_ptr,
    part_ptr,
    R,
    N,
    D,
    S,
    pad_id,
    n_per_split,
    split_base,
    n_splits,
    sl_ptr,
    ssl_r,
    slab_lo,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    DL_K: tl.constexpr,
    FULL_D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    SCORES_IN: tl.constexpr = False,
):
    # ``SCORES_IN``: one launch a score slab (columns from ``slab_lo``), its splits numbered
    # from ``split_base`` among all ``n_splits`` of the call (as in ``_odmt_fwd_kernel``)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = split_base + tl.program_id(1)
    n_lo = split * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    row_in, valid, tgt, tid = _row_setup(tgt_ptr, tid_ptr, rows, R)
    fit = tl.load(fit_ptr)
    ids = _hoist_ids(ex_ptr, ex_sr, ex_ss, rows, valid, S, pad_id, S_PAD, HOIST)
    if FULL_D and not SCORES_IN:
        q = _full_tile(q_ptr, sq_r, sq_d, rows, row_in, D, D_PAD)
        c_ptrs, d_ok = _tile_ptrs(c_ptr, sc_n, sc_d, n_lo + tl.arange(0, BLOCK_N), D, D_PAD)
    m = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    lsum = tl.zeros((BLOCK_R,), tl.float32)
    zt = tl.zeros((BLOCK_R,), tl.float32)
    fl_row = fl_ptr + tl.program_id(0) * tl.cdiv(N, BLOCK_N)
    # absolute cursors into the lists (R * DL_K < 2^31), each row's start in this split read
    # from ``dl_start_ptr``: the loads' addresses and masks then stay in the score tile's row
    # layout. Counted here (a reduction over a 2-D load), or from a per-row base pointer, the
    # cursors took another layout and sm_90 SASS converted pointers and masks through shared
    # memory every flagged tile (5 CTA barriers)
    cur = rows * DL_K
    if DL_K > 0:
        cur += tl.load(dl_start_ptr + split * R + rows, mask=row_in, other=0)
    h1, h2 = _dl_pair(dl_ptr, row_in & (DL_K > 0), cur, cur, False)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        flag = tl.load(fl_row + n0 // BLOCK_N)
        col_ok = cols < N
        bias = _load_bias(cb_ptr, cols, N)
        c32 = _load_cid32(c32_ptr, cols, N, pad_id, IDS32)
        if SCORES_IN:
            s = _slab_tile(sl_ptr, ssl_r, rows, row_in, cols - slab_lo, col_ok)
        elif FULL_D:
            c = tl.load(c_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            c_ptrs += BLOCK_N * sc_n
            s = tl.dot(q, tl.trans(c), input_precision=PREC)
        else:
            s = _score_tile(
                q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, row_in, cols, col_ok, D, BLOCK_R, BLOCK_N, BLOCK_D, PREC
            )
        # an fma, not ``s + bias``: Triton folds ``dot + x`` into the dot's accumulator, and
        # every tile's dot then waited on the bias load (sm_90 SASS); one FADD an element now
        s = tl.fma(s, 1.0, bias[None, :])
        if flag != 0:  # the row tile's target columns are in flagged tiles only
            if DL_K > 0:  # the next pair's loads issue before this tile's test (fewer moves in SASS)
                cur, h1_next, h2_next = _dl_next(dl_ptr, row_in, cur, h1, h2, n0 + BLOCK_N, cur, False)
            else:
                h1_next = h1
                h2_next = h2
            s, zt = _fwd_flagged(
                s, zt, flag, h1, h2, cols, c32, cid_ptr, s_cid, N, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr,
                ex_ss, S, pad_id, S_PAD, EX_ONE, IDS32, HOIST, DL_K > 0,
            )  # fmt: skip
            h1 = h1_next
            h2 = h2_next
        m_new = tl.maximum(m, tl.max(s, axis=1))
        lsum = lsum * _exp(m - m_new) + tl.sum(_exp(s - m_new[:, None]), axis=1)
        m = m_new
    pp = part_ptr + split * R + rows
    tl.store(pp, m, mask=row_in)
    tl.store(pp + n_splits * R, lsum, mask=row_in)
    tl.store(pp + 2 * n_splits * R, zt, mask=row_in)


@triton.jit
def _ce_combine_kernel(part_ptr, tgt_ptr, loss_ptr, lse_ptr, R, n_splits, BLOCK: tl.constexpr):
    """Merges the splits' (max, exp-sum, target score) into the loss and lse per row."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < R
    valid = tl.load(tgt_ptr + rows, mask=row_in, other=-1) >= 0
    m = tl.full((BLOCK,), -1.0e30, tl.float32)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_ptr + sp * R + rows, mask=row_in, other=-1.0e30))
    lsum = tl.zeros((BLOCK,), tl.float32)
    zt = tl.zeros((BLOCK,), tl.float32)
    for sp in range(0, n_splits):
        pp = part_ptr + sp * R + rows
        ms = tl.load(pp, mask=row_in, other=-1.0e30)
        lsum += tl.load(pp + n_splits * R, mask=row_in, other=0.0) * _exp(ms - m)
        zt += tl.load(pp + 2 * n_splits * R, mask=row_in, other=0.0)
    lse = m + tl.log(tl.where(valid, lsum, 1.0))  # ignored rows: l = 0
    tl.store(loss_ptr + rows, tl.where(valid, lse - zt, 0.0), mask=row_in)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_in)


# ======================================================================================
# Single branch: backward (row-wise dQ, column-wise dC)
# ======================================================================================


@triton.jit
def _drop_scores(s, zt, drop, is_t):
    """The forward's flagged tile: dropped scores to ``-inf``, the target score summed."""
    s = tl.where(drop, float("-inf"), s)
    return s, zt + tl.sum(tl.where(is_t, s, 0.0), axis=1)


@triton.jit
def _fwd_flagged(
    s,
    zt,
    flag,
    h1,
    h2,
    cols,
    c32,
    cid_ptr,
    s_cid,
    N,
    rows,
    valid,
    tgt,
    tid,
    ids,
    fit,
    ex_ptr,
    ex_sr,
    ex_ss,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    LISTS: tl.constexpr,
):
    """The single-branch forward's flagged tile: the drop-list pair on a sparse one (flag 1,
    with ``LISTS``), the id test otherwise. Each branch masks the scores itself: boolean tiles
    merged out of an if were packed into bit fields, ~10 instructions an element (SASS)."""
    if LISTS:
        if flag == 1:
            drop, is_t = _dl_drop(cols, h1, h2, tgt)
            s, zt = _drop_scores(s, zt, drop, is_t)
        else:
            drop, is_t = _flagged_drop(
                cols, c32, cid_ptr, s_cid, N, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
                S_PAD, EX_ONE, IDS32, HOIST,
            )  # fmt: skip
            s, zt = _drop_scores(s, zt, drop, is_t)
    else:
        drop, is_t = _flagged_drop(
            cols, c32, cid_ptr, s_cid, N, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
            S_PAD, EX_ONE, IDS32, HOIST,
        )  # fmt: skip
        s, zt = _drop_scores(s, zt, drop, is_t)
    return s, zt


@triton.jit
def _dz_kept(z, drop, is_t, g, TRANS: tl.constexpr):
    """``g (p - onehot)`` of a flagged tile from ``z = s - lse``."""
    return (_exp(tl.where(drop, float("-inf"), z)) - is_t.to(tl.float32)) * _by_row(g, TRANS)


@triton.jit
def _ce_id_drop(
    cols,
    cid,
    cid_ptr,
    s_cid,
    N,
    rows,
    valid,
    tgt,
    tid,
    ids,
    fit,
    ex_ptr,
    ex_sr,
    ex_ss,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    LOAD_CID: tl.constexpr,
    TRANS: tl.constexpr,
):
    """:func:`_drop_tile` of the single-branch backward (no padding test: the column bias
    has it), the column ids loaded here when ``LOAD_CID``."""
    if LOAD_CID:
        col_ids = _load_cid(cid_ptr, s_cid, cols, N, pad_id)
    else:
        col_ids = cid
    return _drop_tile(
        cols, col_ids, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
        S_PAD, EX_ONE, IDS32, HOIST, False, TRANS,
    )  # fmt: skip


@triton.jit
def _ce_dz(
    s,
    bias,
    cols,
    cid,
    cid_ptr,
    s_cid,
    N,
    rows,
    valid,
    tgt,
    tid,
    ids,
    fit,
    lse,
    g,
    flag,
    h1,
    h2,
    ex_ptr,
    ex_sr,
    ex_ss,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    LOAD_CID: tl.constexpr,
    TRANS: tl.constexpr,
    LISTS: tl.constexpr,
):
    """``g_r (softmax_r - onehot)`` on kept entries, 0 elsewhere, from the raw scores ``s``
    and the column bias. ``lse`` is ``+inf`` on ignored rows (so ``p = 0`` there without a
    mask); the one-hot term lives in flagged tiles only (every target column's tile is
    flagged), which also read the column ids (``LOAD_CID``) unless the caller holds them.
    ``TRANS``: ``s`` and the result are ``(cols, rows)``. ``LISTS``: sparse flagged tiles
    (flag 1) test a drop-list pair ``h1``, ``h2`` -- each row's next two dropped columns (1,
    :func:`_dl_drop`) or each column's next two dropping rows (2, :func:`_dl_drop_rows`) --
    and dense ones (2) the ids; 0: every flagged tile tests the ids."""
    z = (s + _by_col(bias, TRANS)) - _by_row(lse, TRANS)  # the forward's order: 0 exactly where p is 1
    if flag != 0:
        # each branch forms dz itself (boolean tiles merged out of an if become bit fields)
        if LISTS != 0:
            if flag == 1:
                if LISTS == 1:
                    drop, is_t = _dl_drop(cols, h1, h2, tgt, TRANS)
                else:
                    drop, is_t = _dl_drop_rows(rows, cols, h1, h2, tgt, TRANS)
                dz = _dz_kept(z, drop, is_t, g, TRANS)
            else:
                drop, is_t = _ce_id_drop(
                    cols, cid, cid_ptr, s_cid, N, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
                    S_PAD, EX_ONE, IDS32, HOIST, LOAD_CID, TRANS,
                )  # fmt: skip
                dz = _dz_kept(z, drop, is_t, g, TRANS)
        else:
            drop, is_t = _ce_id_drop(
                cols, cid, cid_ptr, s_cid, N, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
                S_PAD, EX_ONE, IDS32, HOIST, LOAD_CID, TRANS,
            )  # fmt: skip
            dz = _dz_kept(z, drop, is_t, g, TRANS)
    else:
        dz = _exp(z) * _by_row(g, TRANS)
    return dz


@triton.jit
def _store_dz(dz_ptr, sdz_r, rows, row_in, slab_cols, col_ok, dz, gmax, DZ_TRUE: tl.constexpr):
    """Stores a ``dz`` tile into the column slab's workspace (``(R, slab width)``, row stride
    ``sdz_r``), in the inputs' dtype: the true ``dz`` (``DZ_TRUE``: bf16 and fp32, whose
    range holds it) or, for fp16, ``dz / gmax`` as the kernels hold it (the caller scales
    the product back)."""
    if DZ_TRUE:
        dz = dz * gmax
    tl.store(
        dz_ptr + rows.to(tl.int64)[:, None] * sdz_r + slab_cols[None, :],
        dz.to(dz_ptr.dtype.element_ty),
        mask=row_in[:, None] & col_ok[None, :],
    )


@triton.jit
def _ce_dq_kernel(
    q_ptr,
    sq_r,
    sq_d,
    c_ptr,
    sc_n,
    sc_d,
    tgt_ptr,
    tid_ptr,
    cid_ptr,
    s_cid,
    ex_ptr,
    ex_sr,
    ex_ss,
    cb_ptr,
    fit_ptr,
    fl_ptr,
    dl_ptr,
    dl_start_ptr,
    lse_ptr,
    g_ptr,
    gmax_ptr,
    dq_ptr,
    sdq_r,
    sdq_d,
    dz_ptr,
    sdz_r,
    R,
    N,
    D,
    S,
    pad_id,
    n_begin,
    n_end,
    sl_ptr,
    ssl_r,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    DL_K: tl.constexpr,
    FULL_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PREC: tl.constexpr,
    TRANS_S: tl.constexpr = False,
    STORE_DZ: tl.constexpr = False,
    DZ_TRUE: tl.constexpr = False,
    LATER_SLAB: tl.constexpr = False,
    DQ_OFF: tl.constexpr = False,
    SCORES_IN: tl.constexpr = False,
):
    # ``[n_begin, n_end)``: the columns walked, all of them or one slab of the GEMM dC path
    # (``STORE_DZ``: its dz is stored; ``LATER_SLAB``: a slab after the first, whose drop-list
    # walks start at ``dl_start_ptr``). A slab's dq is its columns' share only: the caller
    # adds the slabs' (a running sum loaded into the accumulator here spilled ~360 B a thread
    # at 16k, sm_90 compile). ``DQ_OFF``: dz only, no dQ dot (the caller's GEMMs form dQ too);
    # ``SCORES_IN`` (with it): the scores read from the slab's float32 score slab
    tl.static_assert(DQ_OFF or not SCORES_IN, "a score slab feeds the dz-only kernel")
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    row_in, valid, tgt, tid = _row_setup(tgt_ptr, tid_ptr, rows, R)
    fit = tl.load(fit_ptr)
    ids = _hoist_ids(ex_ptr, ex_sr, ex_ss, rows, valid, S, pad_id, S_PAD, HOIST)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    lse = tl.where(valid, tl.load(lse_ptr + rows, mask=valid, other=0.0), float("inf"))
    g = tl.load(g_ptr + rows, mask=valid, other=0.0) / gmax
    # queries loaded by ``valid``: an ignored row's values (NaN, inf) must not reach its dz
    if FULL_D and not SCORES_IN:  # BLOCK_DO is the padded width, one output chunk
        q = _full_tile(q_ptr, sq_r, sq_d, rows, valid, D, BLOCK_DO)
        c_ptrs, d_ok = _tile_ptrs(c_ptr, sc_n, sc_d, n_begin + tl.arange(0, BLOCK_N), D, BLOCK_DO)
    acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    fl_row = fl_ptr + tl.program_id(0) * tl.cdiv(N, BLOCK_N)
    cur = rows * DL_K  # absolute cursors, as in the forward
    if DL_K > 0:
        if LATER_SLAB:  # each row's walk starts at its first entry in the slab
            cur += tl.load(dl_start_ptr + rows, mask=row_in, other=0)
    h1, h2 = _dl_pair(dl_ptr, row_in & (DL_K > 0), cur, cur, False)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        flag = tl.load(fl_row + n0 // BLOCK_N)
        col_ok = cols < N
        bias = _load_bias(cb_ptr, cols, N)
        if SCORES_IN:  # the caller zeroed the ignored rows' queries of the slab's GEMM
            s = _slab_tile(sl_ptr, ssl_r, rows, valid, cols - n_begin, col_ok)
        elif FULL_D:
            c = tl.load(c_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            c_ptrs += BLOCK_N * sc_n
            if TRANS_S:  # the resident query tile as the B operand (shared memory, not registers)
                s = tl.trans(tl.dot(c, tl.trans(q), input_precision=PREC))
            else:
                s = tl.dot(q, tl.trans(c), input_precision=PREC)
        else:
            s = _score_tile(
                q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, valid, cols, col_ok, D, BLOCK_R, BLOCK_N, BLOCK_D, PREC
            )
            if not DQ_OFF:
                c = tl.load(
                    c_ptr + cols.to(tl.int64)[:, None] * sc_n + offs_o[None, :] * sc_d,
                    mask=col_ok[:, None] & o_ok[None, :],
                    other=0.0,
                )
        dz = _ce_dz(
            s, bias, cols, cols, cid_ptr, s_cid, N, rows, valid, tgt, tid, ids, fit, lse, g, flag, h1, h2, ex_ptr,
            ex_sr, ex_ss, S, pad_id, S_PAD, EX_ONE, IDS32, HOIST, True, False, 1 if DL_K > 0 else 0,
        )  # fmt: skip
        if STORE_DZ:  # the slab's dz for dC = dz^T Q (cuBLAS), once per row tile
            if tl.program_id(1) == 0:
                _store_dz(dz_ptr, sdz_r, rows, row_in, cols - n_begin, col_ok, dz, gmax, DZ_TRUE)
        if not DQ_OFF:
            acc = tl.dot(dz.to(c.dtype), c, acc=acc, input_precision=PREC)
        if DL_K > 0:
            if flag != 0:
                cur, h1, h2 = _dl_next(dl_ptr, row_in, cur, h1, h2, n0 + BLOCK_N, cur, False)
    if not DQ_OFF:
        acc = acc * gmax
        tl.store(
            dq_ptr + rows.to(tl.int64)[:, None] * sdq_r + offs_o[None, :] * sdq_d,
            acc.to(dq_ptr.dtype.element_ty),
            mask=row_in[:, None] & o_ok[None, :],
        )


@triton.jit
def _ce_dc_kernel(
    q_ptr,
    sq_r,
    sq_d,
    c_ptr,
    sc_n,
    sc_d,
    tgt_ptr,
    tid_ptr,
    cid_ptr,
    s_cid,
    ex_ptr,
    ex_sr,
    ex_ss,
    cb_ptr,
    fit_ptr,
    fl_ptr,
    crow_ptr,
    coff_ptr,
    lse_ptr,
    g_ptr,
    gmax_ptr,
    dc_ptr,
    sdc_n,
    sdc_d,
    R,
    N,
    D,
    S,
    pad_id,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    LISTS: tl.constexpr,
    FULL_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PREC: tl.constexpr,
    TRANS_S: tl.constexpr = False,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    col_ok = cols < N
    bias = _load_bias(cb_ptr, cols, N)
    cid = _load_cid(cid_ptr, s_cid, cols, N, pad_id)
    fit = tl.load(fit_ptr)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    if FULL_D:
        c = _full_tile(c_ptr, sc_n, sc_d, cols, col_ok, D, BLOCK_DO)
        q_ptrs, d_ok = _tile_ptrs(q_ptr, sq_r, sq_d, tl.arange(0, BLOCK_R), D, BLOCK_DO)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    fl_col = fl_ptr + tl.program_id(0)
    n_ct = tl.cdiv(N, BLOCK_N)
    # each column's cursor in its list of dropping rows (``_col_lists``), absolute indices
    if LISTS:
        cur = tl.load(coff_ptr + cols, mask=col_ok, other=0)
        stop = tl.load(coff_ptr + cols + 1, mask=col_ok, other=0)
    else:
        cur = cols * 0
        stop = cur
    h1, h2 = _dl_pair(crow_ptr, col_ok, cur, stop, True)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        flag = tl.load(fl_col + (r0 // BLOCK_R) * n_ct)
        row_in, valid, tgt, tid = _row_setup(tgt_ptr, tid_ptr, rows, R)
        lse = tl.where(valid, tl.load(lse_ptr + rows, mask=valid, other=0.0), float("inf"))
        g = tl.load(g_ptr + rows, mask=valid, other=0.0) / gmax
        if FULL_D:
            q = tl.load(q_ptrs, mask=row_in[:, None] & d_ok[None, :], other=0.0)
            q_ptrs += BLOCK_R * sq_r
            if TRANS_S:  # S^T = C Q^T: the resident candidate tile is the wgmma A operand
                s = tl.dot(c, tl.trans(q), input_precision=PREC)
            else:
                s = tl.dot(q, tl.trans(c), input_precision=PREC)
        else:
            s = _score_tile(
                q_ptr, sq_r, sq_d, c_ptr, sc_n, sc_d, rows, row_in, cols, col_ok, D, BLOCK_R, BLOCK_N, BLOCK_D, PREC
            )
            q = tl.load(
                q_ptr + rows.to(tl.int64)[:, None] * sq_r + offs_o[None, :] * sq_d,
                mask=row_in[:, None] & o_ok[None, :],
                other=0.0,
            )
        # rows change every step: the excluded ids are loaded in the flagged branch
        dz = _ce_dz(
            s, bias, cols, cid, cid_ptr, s_cid, N, rows, valid, tgt, tid, (), fit, lse, g, flag, h1, h2, ex_ptr,
            ex_sr, ex_ss, S, pad_id, S_PAD, EX_ONE, IDS32, False, False, TRANS_S and FULL_D, 2 if LISTS else 0,
        )  # fmt: skip
        if TRANS_S and FULL_D:  # dz^T straight from the score accumulator into the A operand
            acc = tl.dot(dz.to(q.dtype), q, acc=acc, input_precision=PREC)
        else:
            acc = tl.dot(tl.trans(dz.to(q.dtype)), q, acc=acc, input_precision=PREC)
        if LISTS:
            if flag != 0:
                cur, h1, h2 = _dl_next(crow_ptr, col_ok, cur, h1, h2, r0 + BLOCK_R, stop, True)
    acc = acc * gmax
    tl.store(
        dc_ptr + cols.to(tl.int64)[:, None] * sdc_n + offs_o[None, :] * sdc_d,
        acc.to(dc_ptr.dtype.element_ty),
        mask=col_ok[:, None] & o_ok[None, :],
    )


# ======================================================================================
# Three branches: forward (row tiles x column splits, then a combine)
# ======================================================================================


@triton.jit
def _exp_affine(x, scale, offset):
    """``exp(scale x - offset)`` of a tile (``offset`` per row) as ``exp2(x c - offset log2(e))``,
    ``c = scale log2(e)``: one FFMA an element before the MUFU, where ``_exp(scale (x - m))``
    takes a subtraction and one or two products (the compiler may not reassociate them). The
    per-row rounding of ``offset log2(e)`` moves a row's exponents by ~1e-7 of the offset,
    which 16-bit inputs do not notice; the kernels keep the exact forms for fp32 inputs
    (``FAST_EXP``: fp32's tested accuracy, 1e-5, with logQ offsets in the hundreds)."""
    log2e = 1.4426950408889634
    return tl.exp2(x * (scale * log2e) - (offset * log2e)[:, None])


@triton.jit
def _online_branch(s, keep, m, l1, lt, inv_t, NEED_L1: tl.constexpr, FAST_EXP: tl.constexpr):
    """One branch's running max and the two exp-sums (T=1 and T); returns the new state,
    the rescale factor at temperature T and the tile's exp((z - M)/T) weights."""
    sm = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(sm, axis=1))
    delta = m - m_new
    if NEED_L1:
        if FAST_EXP:
            e_1 = _exp_affine(sm, 1.0, m_new)
        else:
            e_1 = _exp(sm - m_new[:, None])
        l1 = l1 * _exp(delta) + tl.sum(e_1, axis=1)
    alpha_t = _exp(delta * inv_t)
    if FAST_EXP:
        e_t = _exp_affine(sm, inv_t, m_new * inv_t)
    else:
        e_t = _exp((sm - m_new[:, None]) * inv_t)
    lt = lt * alpha_t + tl.sum(e_t, axis=1)
    return m_new, l1, lt, alpha_t, e_t


@triton.jit
def _pair_d(teacher, student, keep, FORM_KL: tl.constexpr):
    """``w / _pair_scale`` of a teacher/student pair on kept entries, 0 elsewhere: ``teacher -
    student`` (KL) or ``student`` (CE). The scale is applied per row where it can be (the
    forward's sums), one product an element fewer."""
    if FORM_KL:
        return tl.where(keep, teacher - student, 0.0)
    return tl.where(keep, student, 0.0)


@triton.jit
def _pair_scale(inv_t, FORM_KL: tl.constexpr):
    """``w = _pair_d * _pair_scale``: ``w = a - b = (teacher - student) / T`` (KL) or ``-b =
    -student / T`` (CE)."""
    if FORM_KL:
        return inv_t
    return -inv_t


@triton.jit
def _pair_w(teacher, student, keep, inv_t, FORM_KL: tl.constexpr):
    """``w`` of a teacher/student pair on kept entries: ``a - b`` (KL) or ``-b`` (CE)."""
    return _pair_d(teacher, student, keep, FORM_KL) * _pair_scale(inv_t, FORM_KL)


@triton.jit
def _odmt_scores(
    qi_ptr,
    qt_ptr,
    qv_ptr,
    sq_i,
    sq_t,
    sq_v,
    sq_d,
    ci_ptr,
    ct_ptr,
    cv_ptr,
    sc_i,
    sc_t,
    sc_v,
    sc_d,
    rows,
    row_in,
    cols,
    col_ok,
    lq,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """The three score tiles for d > the full-width limit (chunked over d)."""
    s_i = (
        _score_tile(
            qi_ptr, sq_i, sq_d, ci_ptr, sc_i, sc_d, rows, row_in, cols, col_ok, D, BLOCK_R, BLOCK_N, BLOCK_D, PREC
        )
        - lq[None, :]
    )
    s_t = (
        _score_tile(
            qt_ptr, sq_t, sq_d, ct_ptr, sc_t, sc_d, rows, row_in, cols, col_ok, D, BLOCK_R, BLOCK_N, BLOCK_D, PREC
        )
        - lq[None, :]
    )
    s_v = (
        _score_tile(
            qv_ptr, sq_v, sq_d, cv_ptr, sc_v, sc_d, rows, row_in, cols, col_ok, D, BLOCK_R, BLOCK_N, BLOCK_D, PREC
        )
        - lq[None, :]
    )
    return s_i, s_t, s_v


@triton.jit
def _slab_tiles(sl_ptr, ssl_b, ssl_r, rows, row_ok, slab_cols, col_ok, lq):
    """The three branches' score tiles from their slab ``(3, R, width)``, minus log Q (one
    pointer tile for the three: three of them took 72 B of stack at 64 x 32, sm_90)."""
    ptr = sl_ptr + rows.to(tl.int64)[:, None] * ssl_r + slab_cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    s_i = tl.load(ptr, mask=ok, other=0.0) - lq[None, :]
    s_t = tl.load(ptr + ssl_b, mask=ok, other=0.0) - lq[None, :]
    s_v = tl.load(ptr + 2 * ssl_b, mask=ok, other=0.0) - lq[None, :]
    return s_i, s_t, s_v


@triton.jit
def _odmt_fwd_kernel(
    qi_ptr,
    qt_ptr,
    qv_ptr,
    sq_i,
    sq_t,
    sq_v,
    sq_d,
    ci_ptr,
    ct_ptr,
    cv_ptr,
    sc_i,
    sc_t,
    sc_v,
    sc_d,
    tgt_ptr,
    tid_ptr,
    cid_ptr,
    s_cid,
    ex_ptr,
    ex_sr,
    ex_ss,
    lq_ptr,
    s_lq,
    fit_ptr,
    fl_ptr,
    dl_ptr,
    dl_start_ptr,
    part_ptr,
    R,
    N,
    D,
    S,
    pad_id,
    temperature,
    n_per_split,
    split_base,
    n_splits,
    sl_ptr,
    ssl_b,
    ssl_r,
    slab_lo,
    HAS_LQ: tl.constexpr,
    FORM_KL: tl.constexpr,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    DL_K: tl.constexpr,
    FULL_D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    SCORES_IN: tl.constexpr = False,
):
    # ``SCORES_IN``: one launch a score slab (columns from ``slab_lo``), its splits numbered
    # from ``split_base`` among all ``n_splits`` of the call
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = split_base + tl.program_id(1)
    n_lo = split * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    row_in, valid, tgt, tid = _row_setup(tgt_ptr, tid_ptr, rows, R)
    fit = tl.load(fit_ptr)
    ids = _hoist_ids(ex_ptr, ex_sr, ex_ss, rows, valid, S, pad_id, S_PAD, HOIST)
    if FULL_D and not SCORES_IN:
        qi = _full_tile(qi_ptr, sq_i, sq_d, rows, row_in, D, D_PAD)
        qt = _full_tile(qt_ptr, sq_t, sq_d, rows, row_in, D, D_PAD)
        qv = _full_tile(qv_ptr, sq_v, sq_d, rows, row_in, D, D_PAD)
    inv_t = 1.0 / temperature
    w_scale = _pair_scale(inv_t, FORM_KL)
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
    fl_row = fl_ptr + tl.program_id(0) * tl.cdiv(N, BLOCK_N)
    cur = rows * DL_K  # drop-list cursors, as in _ce_fwd_kernel
    if DL_K > 0:
        cur += tl.load(dl_start_ptr + split * R + rows, mask=row_in, other=0)
    h1, h2 = _dl_pair(dl_ptr, row_in & (DL_K > 0), cur, cur, False)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        flag = tl.load(fl_row + n0 // BLOCK_N)
        col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
        if SCORES_IN:
            s_i, s_t, s_v = _slab_tiles(sl_ptr, ssl_b, ssl_r, rows, row_in, cols - slab_lo, col_ok, lq)
        elif FULL_D:
            c = _full_tile(ci_ptr, sc_i, sc_d, cols, col_ok, D, D_PAD)
            s_i = tl.dot(qi, tl.trans(c), input_precision=PREC) - lq[None, :]
            c = _full_tile(ct_ptr, sc_t, sc_d, cols, col_ok, D, D_PAD)
            s_t = tl.dot(qt, tl.trans(c), input_precision=PREC) - lq[None, :]
            c = _full_tile(cv_ptr, sc_v, sc_d, cols, col_ok, D, D_PAD)
            s_v = tl.dot(qv, tl.trans(c), input_precision=PREC) - lq[None, :]
        else:
            s_i, s_t, s_v = _odmt_scores(
                qi_ptr,
                qt_ptr,
                qv_ptr,
                sq_i,
                sq_t,
                sq_v,
                sq_d,
                ci_ptr,
                ct_ptr,
                cv_ptr,
                sc_i,
                sc_t,
                sc_v,
                sc_d,
                rows,
                row_in,
                cols,
                col_ok,
                lq,
                D,
                BLOCK_R,
                BLOCK_N,
                BLOCK_D,
                PREC,
            )
        s_e = (s_i + s_t + s_v) / 3.0
        # ignored rows are not masked here: the combine discards their statistics
        if flag != 0:  # the row tile's target columns are in flagged tiles only
            if DL_K > 0:
                if flag == 1:  # sparse: the drop-list pair, and padding
                    drop, is_t = _dl_drop(cols, h1, h2, tgt)
                    drop = drop | (cid == pad_id)[None, :]
                else:
                    drop, is_t = _drop_tile(
                        cols, cid, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
                        S_PAD, EX_ONE, IDS32, HOIST,
                    )  # fmt: skip
                cur, h1, h2 = _dl_next(dl_ptr, row_in, cur, h1, h2, n0 + BLOCK_N, cur, False)
            else:
                drop, is_t = _drop_tile(
                    cols, cid, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id,
                    S_PAD, EX_ONE, IDS32, HOIST,
                )  # fmt: skip
            keep = ~drop
            zt_i += tl.sum(tl.where(is_t, s_i, 0.0), axis=1)
            zt_t += tl.sum(tl.where(is_t, s_t, 0.0), axis=1)
            zt_v += tl.sum(tl.where(is_t, s_v, 0.0), axis=1)
        else:
            keep = tl.broadcast_to((cid != pad_id)[None, :], (BLOCK_R, BLOCK_N))
        m_i, l1_i, lt_i, a_i, e_i = _online_branch(s_i, keep, m_i, l1_i, lt_i, inv_t, True, PREC != "ieee")
        m_t, l1_t, lt_t, a_t, e_t = _online_branch(s_t, keep, m_t, l1_t, lt_t, inv_t, True, PREC != "ieee")
        m_v, l1_v, lt_v, a_v, e_v = _online_branch(s_v, keep, m_v, l1_v, lt_v, inv_t, True, PREC != "ieee")
        m_e, l1_e, lt_e, a_e, e_e = _online_branch(s_e, keep, m_e, l1_e, lt_e, inv_t, False, PREC != "ieee")
        w_it = w_it * a_i + tl.sum(e_i * _pair_d(s_i, s_t, keep, FORM_KL), axis=1) * w_scale
        w_iv = w_iv * a_i + tl.sum(e_i * _pair_d(s_i, s_v, keep, FORM_KL), axis=1) * w_scale
        w_ei = w_ei * a_e + tl.sum(e_e * _pair_d(s_e, s_i, keep, FORM_KL), axis=1) * w_scale
    pp = part_ptr + split * R + rows
    step = n_splits * R
    tl.store(pp, m_i, mask=row_in)
    tl.store(pp + step, m_t, mask=row_in)
    tl.store(pp + 2 * step, m_v, mask=row_in)
    tl.store(pp + 3 * step, m_e, mask=row_in)
    tl.store(pp + 4 * step, l1_i, mask=row_in)
    tl.store(pp + 5 * step, l1_t, mask=row_in)
    tl.store(pp + 6 * step, l1_v, mask=row_in)
    tl.store(pp + 7 * step, lt_i, mask=row_in)
    tl.store(pp + 8 * step, lt_t, mask=row_in)
    tl.store(pp + 9 * step, lt_v, mask=row_in)
    tl.store(pp + 10 * step, lt_e, mask=row_in)
    tl.store(pp + 11 * step, w_it, mask=row_in)
    tl.store(pp + 12 * step, w_iv, mask=row_in)
    tl.store(pp + 13 * step, w_ei, mask=row_in)
    tl.store(pp + 14 * step, zt_i, mask=row_in)
    tl.store(pp + 15 * step, zt_t, mask=row_in)
    tl.store(pp + 16 * step, zt_v, mask=row_in)


@triton.jit
def _split_max(part_ptr, k, n_splits, R, rows, row_in, BLOCK: tl.constexpr):
    """Largest running max of statistic ``k`` over the splits."""
    m = tl.full((BLOCK,), -1.0e30, tl.float32)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_ptr + (k * n_splits + sp) * R + rows, mask=row_in, other=-1.0e30))
    return m


@triton.jit
def _odmt_combine_kernel(
    part_ptr, tgt_ptr, loss_ptr, stats_ptr, R, n_splits, temperature, FORM_KL: tl.constexpr, BLOCK: tl.constexpr
):
    """Merges the splits' statistics (rescaling each sum to the global max) and finishes the
    six per-row losses and the ten statistics of the backward."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < R
    valid = tl.load(tgt_ptr + rows, mask=row_in, other=-1) >= 0
    inv_t = 1.0 / temperature
    m_i = _split_max(part_ptr, 0, n_splits, R, rows, row_in, BLOCK)
    m_t = _split_max(part_ptr, 1, n_splits, R, rows, row_in, BLOCK)
    m_v = _split_max(part_ptr, 2, n_splits, R, rows, row_in, BLOCK)
    m_e = _split_max(part_ptr, 3, n_splits, R, rows, row_in, BLOCK)
    zero = tl.zeros((BLOCK,), tl.float32)
    l1_i = zero
    l1_t = zero
    l1_v = zero
    lt_i = zero
    lt_t = zero
    lt_v = zero
    lt_e = zero
    w_it = zero
    w_iv = zero
    w_ei = zero
    zt_i = zero
    zt_t = zero
    zt_v = zero
    step = n_splits * R
    for sp in range(0, n_splits):
        pp = part_ptr + sp * R + rows
        d_i = tl.load(pp, mask=row_in, other=-1.0e30) - m_i
        d_t = tl.load(pp + step, mask=row_in, other=-1.0e30) - m_t
        d_v = tl.load(pp + 2 * step, mask=row_in, other=-1.0e30) - m_v
        d_e = tl.load(pp + 3 * step, mask=row_in, other=-1.0e30) - m_e
        a_i = _exp(d_i * inv_t)
        a_e = _exp(d_e * inv_t)
        l1_i += tl.load(pp + 4 * step, mask=row_in, other=0.0) * _exp(d_i)
        l1_t += tl.load(pp + 5 * step, mask=row_in, other=0.0) * _exp(d_t)
        l1_v += tl.load(pp + 6 * step, mask=row_in, other=0.0) * _exp(d_v)
        lt_i += tl.load(pp + 7 * step, mask=row_in, other=0.0) * a_i
        lt_t += tl.load(pp + 8 * step, mask=row_in, other=0.0) * _exp(d_t * inv_t)
        lt_v += tl.load(pp + 9 * step, mask=row_in, other=0.0) * _exp(d_v * inv_t)
        lt_e += tl.load(pp + 10 * step, mask=row_in, other=0.0) * a_e
        w_it += tl.load(pp + 11 * step, mask=row_in, other=0.0) * a_i
        w_iv += tl.load(pp + 12 * step, mask=row_in, other=0.0) * a_i
        w_ei += tl.load(pp + 13 * step, mask=row_in, other=0.0) * a_e
        zt_i += tl.load(pp + 14 * step, mask=row_in, other=0.0)
        zt_t += tl.load(pp + 15 * step, mask=row_in, other=0.0)
        zt_v += tl.load(pp + 16 * step, mask=row_in, other=0.0)
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
    sp_ = stats_ptr + rows
    tl.store(sp_, tl.where(valid, lse1_i, 0.0), mask=row_in)
    tl.store(sp_ + R, tl.where(valid, lse1_t, 0.0), mask=row_in)
    tl.store(sp_ + 2 * R, tl.where(valid, lse1_v, 0.0), mask=row_in)
    tl.store(sp_ + 3 * R, tl.where(valid, lset_i, 0.0), mask=row_in)
    tl.store(sp_ + 4 * R, tl.where(valid, lset_t, 0.0), mask=row_in)
    tl.store(sp_ + 5 * R, tl.where(valid, lset_v, 0.0), mask=row_in)
    tl.store(sp_ + 6 * R, tl.where(valid, lset_e, 0.0), mask=row_in)
    tl.store(sp_ + 7 * R, tl.where(valid, wbar_it, 0.0), mask=row_in)
    tl.store(sp_ + 8 * R, tl.where(valid, wbar_iv, 0.0), mask=row_in)
    tl.store(sp_ + 9 * R, tl.where(valid, wbar_ei, 0.0), mask=row_in)


# ======================================================================================
# Three branches: backward (row-wise dQ, column-wise dC)
# ======================================================================================


@triton.jit
def _row_stat(ptr, k, rows, valid, R):
    """Row ``k`` of a ``(K, R)`` per-row table, as a ``(BLOCK_R,)`` vector."""
    return tl.load(ptr + k * R + rows, mask=valid, other=0.0)


@triton.jit
def _odmt_row_stats(stats_ptr, g_ptr, gmax, rows, valid, R, temperature):
    """Everything ``_odmt_dz`` needs per row: the ten statistics and the six upstream
    weights (scaled by ``1/gmax``; the distillation ones also by ``T``)."""
    gs = 1.0 / gmax
    gt = temperature / gmax
    return (
        _row_stat(stats_ptr, 0, rows, valid, R),
        _row_stat(stats_ptr, 1, rows, valid, R),
        _row_stat(stats_ptr, 2, rows, valid, R),
        _row_stat(stats_ptr, 3, rows, valid, R),
        _row_stat(stats_ptr, 4, rows, valid, R),
        _row_stat(stats_ptr, 5, rows, valid, R),
        _row_stat(stats_ptr, 6, rows, valid, R),
        _row_stat(stats_ptr, 7, rows, valid, R),
        _row_stat(stats_ptr, 8, rows, valid, R),
        _row_stat(stats_ptr, 9, rows, valid, R),
        _row_stat(g_ptr, 0, rows, valid, R) * gs,
        _row_stat(g_ptr, 1, rows, valid, R) * gs,
        _row_stat(g_ptr, 2, rows, valid, R) * gs,
        _row_stat(g_ptr, 3, rows, valid, R) * gt,
        _row_stat(g_ptr, 4, rows, valid, R) * gt,
        _row_stat(g_ptr, 5, rows, valid, R) * gt,
    )


@triton.jit
def _masked_exp(s, keep, scale, offset, FAST_EXP: tl.constexpr):
    """``exp(scale s - offset)`` on kept entries, 0 elsewhere (:func:`_exp_affine` with
    ``FAST_EXP``, else the product and the difference first)."""
    if FAST_EXP:
        return tl.where(keep, _exp_affine(s, scale, offset), 0.0)
    return _exp(tl.where(keep, s * scale - offset[:, None], -float("inf")))


@triton.jit
def _odmt_dz(
    s_i,
    s_t,
    s_v,
    keep,
    is_t,
    lse_i,
    lse_t,
    lse_v,
    lt_i,
    lt_t,
    lt_v,
    lt_e,
    wb_it,
    wb_iv,
    wb_ei,
    gc_i,
    gc_t,
    gc_v,
    g_it,
    g_iv,
    g_ei,
    inv_t,
    FORM_KL: tl.constexpr,
    DETACH: tl.constexpr,
    FAST_EXP: tl.constexpr,
):
    """The three ``dL/dz`` tiles (see the module docstring), 0 on excluded entries."""
    oh = is_t.to(tl.float32)
    s_e = (s_i + s_t + s_v) / 3.0
    # cross-entropy parts (T = 1); each exponential one FFMA and the MUFU (_exp_affine)
    dz_i = gc_i[:, None] * (_masked_exp(s_i, keep, 1.0, lse_i, FAST_EXP) - oh)
    dz_t = gc_t[:, None] * (_masked_exp(s_t, keep, 1.0, lse_t, FAST_EXP) - oh)
    dz_v = gc_v[:, None] * (_masked_exp(s_v, keep, 1.0, lse_v, FAST_EXP) - oh)
    # softmaxes at temperature T: exp(z / T - lseT)
    p_i = _masked_exp(s_i, keep, inv_t, lt_i, FAST_EXP)
    p_t = _masked_exp(s_t, keep, inv_t, lt_t, FAST_EXP)
    p_v = _masked_exp(s_v, keep, inv_t, lt_v, FAST_EXP)
    p_e = _masked_exp(s_e, keep, inv_t, lt_e, FAST_EXP)
    # student sides: T (q - p)
    dz_i += g_ei[:, None] * (p_i - p_e)
    dz_t += g_it[:, None] * (p_t - p_i)
    dz_v += g_iv[:, None] * (p_v - p_i)
    if not DETACH:
        # teacher sides: T p (w - wbar); the ensemble passes a third to each branch
        w_it = _pair_w(s_i, s_t, keep, inv_t, FORM_KL) - wb_it[:, None]
        w_iv = _pair_w(s_i, s_v, keep, inv_t, FORM_KL) - wb_iv[:, None]
        w_ei = _pair_w(s_e, s_i, keep, inv_t, FORM_KL) - wb_ei[:, None]
        dz_i += p_i * (g_it[:, None] * w_it + g_iv[:, None] * w_iv)
        g_e = g_ei[:, None] * p_e * w_ei / 3.0
        dz_i += g_e
        dz_t += g_e
        dz_v += g_e
    dz_i = tl.where(keep, dz_i, 0.0)
    dz_t = tl.where(keep, dz_t, 0.0)
    dz_v = tl.where(keep, dz_v, 0.0)
    return dz_i, dz_t, dz_v


@triton.jit
def _odmt_dq_kernel(
    qi_ptr,
    qt_ptr,
    qv_ptr,
    sq_i,
    sq_t,
    sq_v,
    sq_d,
    ci_ptr,
    ct_ptr,
    cv_ptr,
    sc_i,
    sc_t,
    sc_v,
    sc_d,
    tgt_ptr,
    tid_ptr,
    cid_ptr,
    s_cid,
    ex_ptr,
    ex_sr,
    ex_ss,
    lq_ptr,
    s_lq,
    fit_ptr,
    fl_ptr,
    stats_ptr,
    g_ptr,
    gmax_ptr,
    dq_ptr,
    R,
    N,
    D,
    S,
    pad_id,
    temperature,
    walk_per_split,
    out_split_stride,
    dz_ptr,
    sdz_r,
    sdz_b,
    n_begin,
    n_end,
    sl_ptr,
    ssl_b,
    ssl_r,
    HAS_LQ: tl.constexpr,
    FORM_KL: tl.constexpr,
    DETACH: tl.constexpr,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    HOIST: tl.constexpr,
    FULL_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr = False,
    TRANS_S: tl.constexpr = False,
    STORE_DZ: tl.constexpr = False,
    DZ_TRUE: tl.constexpr = False,
    DQ_OFF: tl.constexpr = False,
    SCORES_IN: tl.constexpr = False,
):
    # ``DQ_OFF``: dz only (stored), no dQ dots: the caller's GEMMs form dQ too. ``SCORES_IN``
    # (with ``DQ_OFF``): the scores read from the slab's float32 score slab (columns from
    # ``n_begin``), not recomputed
    tl.static_assert(DQ_OFF or not SCORES_IN, "a score slab feeds the dz-only kernel")
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    row_in, valid, tgt, tid = _row_setup(tgt_ptr, tid_ptr, rows, R)
    fit = tl.load(fit_ptr)
    ids = _hoist_ids(ex_ptr, ex_sr, ex_ss, rows, valid, S, pad_id, S_PAD, HOIST)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    inv_t = 1.0 / temperature
    (lse_i, lse_t, lse_v, lt_i, lt_t, lt_v, lt_e, wb_it, wb_iv, wb_ei, gc_i, gc_t, gc_v, g_it, g_iv, g_ei) = (
        _odmt_row_stats(stats_ptr, g_ptr, gmax, rows, valid, R, temperature)
    )
    if FULL_D and not SCORES_IN:  # loaded by ``valid``: an ignored row's values (NaN, inf) must not reach its dz
        qi = _full_tile(qi_ptr, sq_i, sq_d, rows, valid, D, BLOCK_DO)
        qt = _full_tile(qt_ptr, sq_t, sq_d, rows, valid, D, BLOCK_DO)
        qv = _full_tile(qv_ptr, sq_v, sq_d, rows, valid, D, BLOCK_DO)
    acc_i = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    acc_t = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
    fl_row = fl_ptr + tl.program_id(0) * tl.cdiv(N, BLOCK_N)
    # this program's columns: a slab's (GEMM dC path: dQ of the slab's columns only, summed
    # by the caller) and its split's share of them (_bwd_split)
    n_lo, n_hi = _walk_range(n_begin, n_end, walk_per_split, SPLIT)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        flag = tl.load(fl_row + n0 // BLOCK_N)
        col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
        if SCORES_IN:  # the caller zeroed the ignored rows' queries of the slab's GEMM
            s_i, s_t, s_v = _slab_tiles(sl_ptr, ssl_b, ssl_r, rows, valid, cols - n_begin, col_ok, lq)
        elif FULL_D:
            c_i = _full_tile(ci_ptr, sc_i, sc_d, cols, col_ok, D, BLOCK_DO)
            c_t = _full_tile(ct_ptr, sc_t, sc_d, cols, col_ok, D, BLOCK_DO)
            c_v = _full_tile(cv_ptr, sc_v, sc_d, cols, col_ok, D, BLOCK_DO)
            if TRANS_S:  # the resident query tiles as B operands (shared memory, not registers)
                s_i = tl.trans(tl.dot(c_i, tl.trans(qi), input_precision=PREC)) - lq[None, :]
                s_t = tl.trans(tl.dot(c_t, tl.trans(qt), input_precision=PREC)) - lq[None, :]
                s_v = tl.trans(tl.dot(c_v, tl.trans(qv), input_precision=PREC)) - lq[None, :]
            else:
                s_i = tl.dot(qi, tl.trans(c_i), input_precision=PREC) - lq[None, :]
                s_t = tl.dot(qt, tl.trans(c_t), input_precision=PREC) - lq[None, :]
                s_v = tl.dot(qv, tl.trans(c_v), input_precision=PREC) - lq[None, :]
        else:
            s_i, s_t, s_v = _odmt_scores(
                qi_ptr,
                qt_ptr,
                qv_ptr,
                sq_i,
                sq_t,
                sq_v,
                sq_d,
                ci_ptr,
                ct_ptr,
                cv_ptr,
                sc_i,
                sc_t,
                sc_v,
                sc_d,
                rows,
                valid,
                cols,
                col_ok,
                lq,
                D,
                BLOCK_R,
                BLOCK_N,
                BLOCK_D,
                PREC,
            )
            if not DQ_OFF:
                c_off = cols.to(tl.int64)[:, None]
                cm = col_ok[:, None] & o_ok[None, :]
                c_i = tl.load(ci_ptr + c_off * sc_i + offs_o[None, :] * sc_d, mask=cm, other=0.0)
                c_t = tl.load(ct_ptr + c_off * sc_t + offs_o[None, :] * sc_d, mask=cm, other=0.0)
                c_v = tl.load(cv_ptr + c_off * sc_v + offs_o[None, :] * sc_d, mask=cm, other=0.0)
        keep, is_t = _keep_tile(
            cols, col_ok, cid, rows, valid, tgt, tid, ids, fit, ex_ptr, ex_sr, ex_ss, S, pad_id, flag,
            S_PAD, EX_ONE, IDS32, HOIST,
        )
        dz_i, dz_t, dz_v = _odmt_dz(
            s_i,
            s_t,
            s_v,
            keep,
            is_t,
            lse_i,
            lse_t,
            lse_v,
            lt_i,
            lt_t,
            lt_v,
            lt_e,
            wb_it,
            wb_iv,
            wb_ei,
            gc_i,
            gc_t,
            gc_v,
            g_it,
            g_iv,
            g_ei,
            inv_t,
            FORM_KL,
            DETACH,
            PREC != "ieee",
        )
        if STORE_DZ:  # the slab's dz for dC = dz^T Q (cuBLAS), once per row tile
            if tl.program_id(1) == 0:
                slab_cols = cols - n_begin
                _store_dz(dz_ptr, sdz_r, rows, row_in, slab_cols, col_ok, dz_i, gmax, DZ_TRUE)
                _store_dz(dz_ptr + sdz_b, sdz_r, rows, row_in, slab_cols, col_ok, dz_t, gmax, DZ_TRUE)
                _store_dz(dz_ptr + 2 * sdz_b, sdz_r, rows, row_in, slab_cols, col_ok, dz_v, gmax, DZ_TRUE)
        if not DQ_OFF:
            acc_i = tl.dot(dz_i.to(c_i.dtype), c_i, acc=acc_i, input_precision=PREC)
            acc_t = tl.dot(dz_t.to(c_t.dtype), c_t, acc=acc_t, input_precision=PREC)
            acc_v = tl.dot(dz_v.to(c_v.dtype), c_v, acc=acc_v, input_precision=PREC)
    if not DQ_OFF:
        out = _split_base(dq_ptr, out_split_stride, SPLIT) + rows.to(tl.int64)[:, None] * D + offs_o[None, :]
        om = row_in[:, None] & o_ok[None, :]
        ty = dq_ptr.dtype.element_ty
        tl.store(out, (acc_i * gmax).to(ty), mask=om)
        tl.store(out + R * D, (acc_t * gmax).to(ty), mask=om)
        tl.store(out + 2 * R * D, (acc_v * gmax).to(ty), mask=om)


@triton.jit
def _odmt_dc_kernel(
    qi_ptr,
    qt_ptr,
    qv_ptr,
    sq_i,
    sq_t,
    sq_v,
    sq_d,
    ci_ptr,
    ct_ptr,
    cv_ptr,
    sc_i,
    sc_t,
    sc_v,
    sc_d,
    tgt_ptr,
    tid_ptr,
    cid_ptr,
    s_cid,
    ex_ptr,
    ex_sr,
    ex_ss,
    lq_ptr,
    s_lq,
    fit_ptr,
    fl_ptr,
    crow_ptr,
    coff_ptr,
    stats_ptr,
    g_ptr,
    gmax_ptr,
    dc_ptr,
    R,
    N,
    D,
    S,
    pad_id,
    temperature,
    walk_per_split,
    out_split_stride,
    HAS_LQ: tl.constexpr,
    FORM_KL: tl.constexpr,
    DETACH: tl.constexpr,
    S_PAD: tl.constexpr,
    EX_ONE: tl.constexpr,
    IDS32: tl.constexpr,
    LISTS: tl.constexpr,
    FULL_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_ok = offs_o < D
    col_ok, cid, lq = _load_cols(cid_ptr, s_cid, lq_ptr, s_lq, cols, N, pad_id, HAS_LQ)
    fit = tl.load(fit_ptr)
    gmax = tl.load(gmax_ptr)
    gmax = tl.where(gmax > 0, gmax, 1.0)
    inv_t = 1.0 / temperature
    if FULL_D:
        ci = _full_tile(ci_ptr, sc_i, sc_d, cols, col_ok, D, BLOCK_DO)
        ct = _full_tile(ct_ptr, sc_t, sc_d, cols, col_ok, D, BLOCK_DO)
        cv = _full_tile(cv_ptr, sc_v, sc_d, cols, col_ok, D, BLOCK_DO)
    acc_i = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    acc_v = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    fl_col = fl_ptr + tl.program_id(0)
    n_ct = tl.cdiv(N, BLOCK_N)
    if LISTS:  # each column's cursor in its list of dropping rows, as in _ce_dc_kernel
        cur = tl.load(coff_ptr + cols, mask=col_ok, other=0)
        stop = tl.load(coff_ptr + cols + 1, mask=col_ok, other=0)
    else:
        cur = cols * 0
        stop = cur
    h1, h2 = _dl_pair(crow_ptr, col_ok, cur, stop, True)
    # this program's share of the rows (_bwd_split: all of them but on a small grid, which
    # reads no drop lists, so the cursors above start at each column's first entry)
    r_lo, r_hi = _walk_range(0, R, walk_per_split, SPLIT)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        flag = tl.load(fl_col + (r0 // BLOCK_R) * n_ct)
        row_in, valid, tgt, tid = _row_setup(tgt_ptr, tid_ptr, rows, R)
        (lse_i, lse_t, lse_v, lt_i, lt_t, lt_v, lt_e, wb_it, wb_iv, wb_ei, gc_i, gc_t, gc_v, g_it, g_iv, g_ei) = (
            _odmt_row_stats(stats_ptr, g_ptr, gmax, rows, valid, R, temperature)
        )
        if FULL_D:
            q_i = _full_tile(qi_ptr, sq_i, sq_d, rows, row_in, D, BLOCK_DO)
            q_t = _full_tile(qt_ptr, sq_t, sq_d, rows, row_in, D, BLOCK_DO)
            q_v = _full_tile(qv_ptr, sq_v, sq_d, rows, row_in, D, BLOCK_DO)
            s_i = tl.dot(q_i, tl.trans(ci), input_precision=PREC) - lq[None, :]
            s_t = tl.dot(q_t, tl.trans(ct), input_precision=PREC) - lq[None, :]
            s_v = tl.dot(q_v, tl.trans(cv), input_precision=PREC) - lq[None, :]
        else:
            s_i, s_t, s_v = _odmt_scores(
                qi_ptr,
                qt_ptr,
                qv_ptr,
                sq_i,
                sq_t,
                sq_v,
                sq_d,
                ci_ptr,
                ct_ptr,
                cv_ptr,
                sc_i,
                sc_t,
                sc_v,
                sc_d,
                rows,
                row_in,
                cols,
                col_ok,
                lq,
                D,
                BLOCK_R,
                BLOCK_N,
                BLOCK_D,
                PREC,
            )
            r_off = rows.to(tl.int64)[:, None]
            qm = row_in[:, None] & o_ok[None, :]
            q_i = tl.load(qi_ptr + r_off * sq_i + offs_o[None, :] * sq_d, mask=qm, other=0.0)
            q_t = tl.load(qt_ptr + r_off * sq_t + offs_o[None, :] * sq_d, mask=qm, other=0.0)
            q_v = tl.load(qv_ptr + r_off * sq_v + offs_o[None, :] * sq_d, mask=qm, other=0.0)
        if LISTS:
            if flag == 1:  # sparse: each column's next two dropping rows
                drop, is_t = _dl_drop_rows(rows, cols, h1, h2, tgt)
                keep = (~drop) & (cid != pad_id)[None, :] & valid[:, None]
            else:
                keep, is_t = _keep_tile(
                    cols, col_ok, cid, rows, valid, tgt, tid, (), fit, ex_ptr, ex_sr, ex_ss, S, pad_id, flag,
                    S_PAD, EX_ONE, IDS32, False,
                )
        else:
            keep, is_t = _keep_tile(
                cols, col_ok, cid, rows, valid, tgt, tid, (), fit, ex_ptr, ex_sr, ex_ss, S, pad_id, flag,
                S_PAD, EX_ONE, IDS32, False,
            )
        dz_i, dz_t, dz_v = _odmt_dz(
            s_i,
            s_t,
            s_v,
            keep,
            is_t,
            lse_i,
            lse_t,
            lse_v,
            lt_i,
            lt_t,
            lt_v,
            lt_e,
            wb_it,
            wb_iv,
            wb_ei,
            gc_i,
            gc_t,
            gc_v,
            g_it,
            g_iv,
            g_ei,
            inv_t,
            FORM_KL,
            DETACH,
            PREC != "ieee",
        )
        acc_i = tl.dot(tl.trans(dz_i.to(q_i.dtype)), q_i, acc=acc_i, input_precision=PREC)
        acc_t = tl.dot(tl.trans(dz_t.to(q_t.dtype)), q_t, acc=acc_t, input_precision=PREC)
        acc_v = tl.dot(tl.trans(dz_v.to(q_v.dtype)), q_v, acc=acc_v, input_precision=PREC)
        if LISTS:
            if flag != 0:
                cur, h1, h2 = _dl_next(crow_ptr, col_ok, cur, h1, h2, r0 + BLOCK_R, stop, True)
    out = _split_base(dc_ptr, out_split_stride, SPLIT) + cols.to(tl.int64)[:, None] * D + offs_o[None, :]
    om = col_ok[:, None] & o_ok[None, :]
    ty = dc_ptr.dtype.element_ty
    tl.store(out, (acc_i * gmax).to(ty), mask=om)
    tl.store(out + N * D, (acc_t * gmax).to(ty), mask=om)
    tl.store(out + 2 * N * D, (acc_v * gmax).to(ty), mask=om)


@triton.jit
def _walk_range(lo, hi, walk_per_split, SPLIT: tl.constexpr):
    """The part of the walk ``[lo, hi)`` (columns for dQ: all of them or a slab; rows for dC)
    this program covers: its split's share (grid axis 2) or, unsplit, all of it."""
    if SPLIT:
        start = lo + tl.program_id(2) * walk_per_split
        return start, tl.minimum(hi, start + walk_per_split)
    else:
        return lo, hi


@triton.jit
def _split_base(out_ptr, out_split_stride, SPLIT: tl.constexpr):
    """Where this program's gradient goes: its split's float32 partials, or the output."""
    if SPLIT:
        return out_ptr + tl.program_id(2).to(tl.int64) * out_split_stride
    else:
        return out_ptr


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, n_split, numel, BLOCK: tl.constexpr):
    """``out = sum_s part[s]`` over the walk splits of a backward kernel (``part`` float32
    ``(n_split, numel)``, summed in split order: deterministic), cast to ``out``'s dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), tl.float32)
    for sp in range(0, n_split):
        acc += tl.load(part_ptr + sp * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ======================================================================================
# Launch configuration
# ======================================================================================


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(t: torch.Tensor) -> int:
    """SMs the forward's column split plans for (2 under the interpreter, so tests split)."""
    if _SM_OVERRIDE is not None:
        return _SM_OVERRIDE
    if _interpreting(t):
        return 2
    return device_sms(t.device)


def _config(kind: str, rows: int, cols: int, d: int, interpret: bool) -> dict:
    """Fixed tile sizes for one kernel launch.

    ``kind`` is ``fwd`` / ``dq`` / ``dc`` (+ ``3`` for the three-branch kernels). ``rows`` is
    the extent the grid tiles (R for fwd/dq, N for dc); ``cols`` the extent each program
    walks. ``FULL_D`` (padded d <= ``_FULL_D_MAX``): a program holds whole rows, one dot per
    score tile, and the backward output chunk ``BLOCK_DO`` is the padded width (the score
    operand doubles as the gradient operand). Otherwise 64 features per dot step and output
    chunks of up to 256 features. Under the interpreter every tile is 16 wide (numpy is fast
    on few, small blocks and the tests still cross tile borders). On the GPU (8 warps unless said) the
    forward takes 64 x 64 tiles (128 x 64 from 16k rows; three branches 64 x 32 at full width,
    32 x 32 otherwise; 4 warps below 128 rows) and splits the columns for parallelism
    (``_fwd_split``). Full-width
    backward: single-branch dC 64 columns x 32-row steps (8 warps), single-branch dQ 64 rows x
    64-column steps at d <= 128 and 64 x 32 at d = 256 (4 warps), three-branch dQ 32 x 32
    and dC 64 columns x 32-row steps (with the resident tile as the B operand of the score dot,
    ``TRANS_S``): first the largest tiles without spills in a Triton 3.9 sm_90 compile, then
    the winners of the Run-5 sweep on an H100 (benchmarks/RESULTS.md), and one warpgroup
    (4 warps) per 64 rows of a tile whose rows are reduced or whose dz feeds a second dot. For d > 256: output chunks of
    128 (single branch; dQ walks 32 columns a step, dC 64 rows) or 256 (three branches,
    fewer score recomputations). ``_CONFIG_OVERRIDE`` replaces keys per kind.
    """
    if kind in ("fwds", "dzs", "fwd3s", "dz3s"):  # kernels reading score slabs (``_SCORE_GEMM``)
        cfg = _slab_config(interpret)
    elif kind in ("dz", "dz3"):  # the dQ kernels without their dQ dot (``_DQ_GEMM``): forward tiles
        cfg = {**_base_config(kind.replace("dz", "fwd"), rows, d, interpret), "TRANS_S": False}
    else:
        cfg = _base_config(kind, rows, d, interpret)
    return {**cfg, **_CONFIG_OVERRIDE.get(kind, {})}


def _base_config(kind: str, rows: int, d: int, interpret: bool) -> dict:
    p2d = max(16, next_power_of_2(d))
    full = p2d <= _FULL_D_MAX
    if interpret:
        return dict(
            BLOCK_T=16, BLOCK_W=16, BLOCK_D=16, BLOCK_DO=p2d if full else 16, FULL_D=full, num_warps=4, num_stages=1
        )
    three = kind.endswith("3")
    base = kind[:-1] if three else kind
    if base == "fwd":
        # Run 5 (H100, R = N = 16,384, d = 256): three branches 64-row tiles 7.3 ms vs 18.4 ms
        # at 32 (252 registers, no spills); single branch 128-row tiles 2.3 ms vs 2.9 ms at 64
        if three:
            tile = 64 if full else 32
        else:
            tile = 128 if rows >= 16384 else 64
        return dict(
            BLOCK_T=tile,
            BLOCK_W=32 if three else 64,
            BLOCK_D=64,
            BLOCK_DO=p2d if full else 64,
            FULL_D=full,
            # one warpgroup per 64 rows: more warps split each row's columns over warpgroups
            # and every row reduction crosses them (three-branch 64 x 32 at 8 warps: 71 CTA
            # barriers in its sm_90 SASS, 36 at 4); Run 5 measured 8 (the sweep times them)
            num_warps=4 * max(1, tile // 64),
            num_stages=2 if three else 3,
        )
    if full and not three and base == "dc":  # 64 columns x 32-row steps: 8 B of stack at d = 256, 0 at 128
        return dict(BLOCK_T=64, BLOCK_W=32, BLOCK_D=64, BLOCK_DO=p2d, FULL_D=True, num_warps=8, num_stages=2)
    if full and not three:  # dq: 64 x 64 at d <= 128 (199 regs), 64 x 32 at d = 256 (207 regs); no spills
        return dict(
            BLOCK_T=64,
            BLOCK_W=64 if p2d <= 128 else 32,
            BLOCK_D=64,
            BLOCK_DO=p2d,
            FULL_D=True,
            # one warpgroup for the 64 rows: with 8 the two split the score tile's columns and
            # dz (the A operand of dz @ C) crosses between them through shared memory. Run 5
            # at d = 256: 4 warps 3.3 ms vs 5.1 ms with 8; d <= 128 (64 x 64: 236 registers,
            # no spills, two CTAs an SM in the sm_90 compile) follows the same rule, unmeasured
            num_warps=4,
            num_stages=2,
        )
    if full:  # three branches, 32 x 32 (larger tiles spill 2-3 KB, sm_90 compile)
        # except dC: 64 x 32 measured 15.2 ms vs 20.9 ms at 32 x 32 (Run 5, 16k, d = 256) despite
        # 168 B of spills; dQ at 64 x 32 was slower (17.9 vs 13.2 ms, 172 B)
        return dict(
            BLOCK_T=64 if base == "dc" else 32,
            BLOCK_W=32,
            BLOCK_D=64,
            BLOCK_DO=p2d,
            FULL_D=True,
            num_warps=8,
            num_stages=2,
            TRANS_S=True,
        )
    if three:
        return dict(BLOCK_T=32, BLOCK_W=32, BLOCK_D=64, BLOCK_DO=min(256, p2d), FULL_D=False, num_warps=8, num_stages=2)
    tile = 64 if rows >= 4096 else 32
    return dict(
        BLOCK_T=tile,
        BLOCK_W=64 if base == "dc" else 32,
        BLOCK_D=64,
        BLOCK_DO=128,
        FULL_D=False,
        num_warps=8,
        num_stages=2,
    )


def _slab_config(interpret: bool) -> dict:
    """Tiles of the kernels that read score slabs: no dot, 64 x 32 and one warpgroup, both
    ops (sm_90 compile, Triton 3.6, paper scale: the three-branch forward 255 registers and
    dz-only 198, the single-branch ones 189 and 126, none spilling -- two programs an SM; the
    single-branch forward at 64 x 64 spilled 560 B a thread); 16-wide under the interpreter."""
    tile_r, tile_n = (16, 16) if interpret else (64, 32)
    return dict(
        BLOCK_T=tile_r, BLOCK_W=tile_n, BLOCK_D=16, BLOCK_DO=16, FULL_D=False, num_warps=4, num_stages=2,
        TRANS_S=False,
    )  # fmt: skip


def _fallbacks(cfg: dict, with_do: bool) -> list[dict]:
    """The fixed retry chain when a GPU refuses a tile (``OutOfResources``: shared memory or
    registers) or the compiler fails on it: one pipeline stage and the plain score dot, then
    the chunked-d path (output chunk <= 128), then half the output chunk, then half the grid
    tile -- deterministic, not autotuning."""
    tries = [cfg, {**cfg, "num_stages": 1, "TRANS_S": False}]
    if cfg["FULL_D"]:
        tries.append({**tries[-1], "FULL_D": False, "BLOCK_DO": min(128, cfg["BLOCK_DO"])})
    elif with_do and cfg["BLOCK_DO"] > 32:
        tries.append({**tries[-1], "BLOCK_DO": cfg["BLOCK_DO"] // 2})
    if cfg["BLOCK_T"] > 16:
        tries.append({**tries[-1], "BLOCK_T": cfg["BLOCK_T"] // 2})
    return tries


def _record(name: str, compiled, cfg: dict, grid: tuple, refused: list[str] | None = None) -> None:
    """Registers/spills of a compiled launch (absent under the interpreter), and why earlier
    tiles of the fallback chain were refused."""
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is None:
        return
    KERNEL_STATS[name] = dict(n_regs=n_regs, n_spills=getattr(compiled, "n_spills", None), grid=list(grid), **cfg)
    if refused:
        KERNEL_STATS[name]["refused"] = list(refused)


def _compiler_failure(exc: Exception) -> bool:
    """A Triton/MLIR/ptxas failure on a tile (not a wrong argument or a bug in the caller)."""
    return isinstance(exc, CompilationError) or (
        isinstance(exc, RuntimeError) and any(k in str(exc) for k in ("PassManager", "ptxas", "MLIR"))
    )


def _launch(name: str, kernel, cfg: dict, make, *, with_do: bool):
    """Launch ``kernel`` with ``make(cfg) -> (grid, args, meta)``, falling back along
    :func:`_fallbacks` on ``OutOfResources`` or a compiler failure; returns ``(cfg used, args)``."""
    tries = _fallbacks(cfg, with_do)
    refused = []
    for i, c in enumerate(tries):
        grid, args, meta = make(c)
        try:
            # ``maxnreg`` (optional, the benchmark's sweep): a register cap, for more programs an SM
            cap = {"maxnreg": c["maxnreg"]} if c.get("maxnreg") else {}
            compiled = kernel[grid](*args, **meta, num_warps=c["num_warps"], num_stages=c["num_stages"], **cap)
        except Exception as exc:
            if i == len(tries) - 1 or not (isinstance(exc, OutOfResources) or _compiler_failure(exc)):
                raise
            refused.append(f"{type(exc).__name__}: {str(exc)[:160]}")
            continue
        _record(name, compiled, c, grid, refused)
        return c, args
    raise AssertionError("unreachable")


def _fwd_split(row_tiles: int, col_tiles: int, n_sm: int) -> int:
    """Column tiles per forward split: enough splits for ~4 programs per SM (counting the row
    tiles), each split at least one tile."""
    want = max(1, min(col_tiles, -(-4 * n_sm // row_tiles)))
    return -(-col_tiles // want)


def _bwd_split(programs: int, walk_tiles: int, n_sm: int) -> int:
    """Splits of a three-branch backward kernel's walk (dQ: the columns, dC: the rows) when
    its grid is small: below two programs an SM, about four an SM, each split walking two
    tiles or more. At the paper scale the three-branch dQ / dC hold one 8-warp program an SM
    and have 144 / 156 programs on an H100's 132 SMs: two waves, the second 9% / 18% full, so
    about twice one program's time; split in four, five waves of a quarter (reasoning, not a
    timing). Each split writes float32 partial gradients, summed in split order
    (:func:`_sum_splits`). The single-branch kernels have 288 / 312 programs there and do not
    split: with the split's loop bounds (even a constexpr-chosen ``0``) their unsplit loops
    compiled ~10 instructions a tile longer (sm_90, Triton 3.6), the three-branch ones 3-5 of
    1,060-1,620."""
    if programs >= 2 * n_sm:
        return 1
    return max(1, min(-(-4 * n_sm // programs), walk_tiles // 2))


_SUM_BLOCK = 1024
# False: the three-branch backward never splits (the benchmark's sweep times both ways)
_BWD_SPLIT = True
# True: dC = dz^T Q by cuBLAS from the dz the dQ kernels store, a column slab at a time
# (:func:`_dz_slab_width`); False: the column-wise dC kernels recompute the scores
_DC_GEMM = True
# the dz workspace's size at most, in bytes (every row and branch of one column slab)
_DZ_BUDGET = 512 << 20
# True (with ``_DC_GEMM``): dQ = dz C by cuBLAS too; the dQ kernels only form and store dz
# (``DQ_OFF``, the forward's tiles: config kinds ``dz`` / ``dz3``). Without their dQ dots and
# accumulators the kernels compile without spills at the forward's tiles (sm_90, 16k: three
# branches 225 registers at 64 x 32 and 4 warps, against 255 and 120 B of stack at 32 x 32
# with the dots); unmeasured, the benchmark's sweep times both
_DQ_GEMM = True


def _backward_plan(three: bool, queries: torch.Tensor, N: int, with_dc: bool, interp: bool):
    """``(dQ launch config, dz slab width or None, dz only, score slabs)`` of a backward call
    (``queries``: ``(R, d)``, one branch's): the GEMM dC path where ``with_dc`` and
    :func:`_dz_slab_width` allow it, with the dz-only kernel at its own tiles (``_DQ_GEMM``)
    where those still give two slabs; where :func:`_score_gemm_on` says so that kernel reads
    each slab's float32 scores, the budget counting them beside dz."""
    (R, D), itemsize = queries.shape, queries.element_size()
    scores = _score_gemm_on(queries, N, D, interp, three)
    branches, suffix = (3, "3") if three else (1, "")
    cfg = _config("dq" + suffix, R, N, D, interp)
    width = _dz_slab_width(R, N, branches, itemsize, cfg["BLOCK_W"]) if with_dc else None
    if width is not None and _DQ_GEMM:
        if scores:
            cfg_dz = _config(f"dz{suffix}s", R, N, D, interp)
            width_dz = _dz_slab_width(R, N, branches, itemsize + 4, cfg_dz["BLOCK_W"])
            if width_dz is not None:
                return cfg_dz, width_dz, True, True
        cfg_dz = _config("dz" + suffix, R, N, D, interp)
        width_dz = _dz_slab_width(R, N, branches, itemsize, cfg_dz["BLOCK_W"])
        if width_dz is not None:
            return cfg_dz, width_dz, True, False
    return cfg, width, False, False


def _slab_products(dz, lo: int, hi: int, cs, zeroed, dc, share, gmax, dq_too: bool, scaled: bool) -> None:
    """cuBLAS's part of one dz slab (columns ``[lo, hi)``), for the ``B`` branches of ``dz (B,
    R, width)`` at once: ``dc[:, lo:hi] = dz^T zeroed`` and, with ``dq_too``, ``share = dz
    cs[:, lo:hi]`` (``cs (B, N, d)``, ``zeroed (B, R, d)``, ``dc (B, N, d)``, ``share (B, R,
    d)``); ``scaled``: dz holds ``dz / gmax`` (fp16), so dC is multiplied back. One batched
    GEMM each (strided: the slab's rows of ``dc`` are written in place), not one a branch: a
    third of the launches and of the views that feed them."""
    slab = dz.narrow(2, 0, hi - lo)
    if dq_too:
        torch.bmm(slab, cs.narrow(1, lo, hi - lo), out=share)
    dc_slab = dc.narrow(1, lo, hi - lo)
    torch.bmm(slab.transpose(1, 2), zeroed, out=dc_slab)
    if scaled:
        dc_slab.mul_(gmax)


def _dz_slab_width(R: int, N: int, branches: int, itemsize: int, block_w: int) -> int | None:
    """Columns per slab of the GEMM dC path, a multiple of the dQ kernel's column tile
    ``block_w``, or None where that path is off (``_DC_GEMM``) or the candidates fit one
    tile. The slab holds ``branches x R x width`` values of the inputs' dtype: at most
    ``_DZ_BUDGET`` bytes (one tile wide at least) and at most half the columns, so that no
    ``R x N`` tensor is ever held; slabs of equal width."""
    tiles = cdiv(N, block_w)
    if not _DC_GEMM or tiles < 2:
        return None
    by_budget = max(1, _DZ_BUDGET // (branches * max(R, 1) * itemsize * block_w))
    per = min(by_budget, cdiv(tiles, 2))
    per = cdiv(tiles, cdiv(tiles, per))  # equal slabs
    return per * block_w


def _split_walk(programs: int, extent: int, step: int, n_sm: int, allowed: bool) -> tuple[int, int]:
    """``(n_split, walk_per_split)`` of a backward launch over ``extent`` walked ``step`` at
    a time (one split and the whole extent when not ``allowed``: the drop lists' cursors
    start at each row's or column's first entry)."""
    tiles = cdiv(extent, step)
    n_split = _bwd_split(programs, tiles, n_sm) if allowed and _BWD_SPLIT else 1
    per = cdiv(tiles, n_split)
    return cdiv(tiles, per), per * step


def _split_out(out: torch.Tensor, n_split: int) -> tuple[torch.Tensor, int]:
    """Where a backward kernel writes: ``out`` itself, or float32 partials
    ``(n_split, *out.shape)`` and the elements between two splits'."""
    if n_split == 1:
        return out, 0
    return torch.empty(n_split, *out.shape, device=out.device, dtype=torch.float32), out.numel()


def _sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = part.sum(0)`` in split order (``_sum_splits_kernel``); nothing when
    ``part`` is ``out`` (one split)."""
    if part is out:
        return
    numel = out.numel()
    if part.numel() >= 2**31:
        raise ValueError(f"split partial gradients of {part.numel()} elements exceed int32 indexing")
    grid = (cdiv(numel, _SUM_BLOCK),)
    compiled = _sum_splits_kernel[grid](part, out, part.shape[0], numel, BLOCK=_SUM_BLOCK)
    _record("sum_splits", compiled, {}, grid)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _excl_args(exclude_ids: torch.Tensor | None, candidate_ids: torch.Tensor):
    """(pointer, row stride, column stride, S, S_PAD, S fits one chunk) of the excluded ids."""
    if exclude_ids is None or exclude_ids.shape[1] == 0:
        return candidate_ids, 0, 0, 0, 0, True
    S = exclude_ids.shape[1]
    s_pad = min(_S_CHUNK, max(2, next_power_of_2(S)))
    return exclude_ids, exclude_ids.stride(0), exclude_ids.stride(1), S, s_pad, S <= s_pad


def _lq_args(log_q: torch.Tensor | None, candidate_ids: torch.Tensor):
    if log_q is None:
        return candidate_ids, 0, False
    return log_q, log_q.stride(0), True


def _row_targets(target: torch.Tensor, candidate_ids: torch.Tensor, sorted_ids: torch.Tensor, ignore_index: int):
    """Per-row target column (int32, -1 on ignored rows) and target item id (int64), by one
    small kernel launch here instead of a dependent load chain in every tile loop; the same
    launch writes the ``(1,)`` int32 device flag, 1 when every candidate id fits in int32
    (from the first and the last of ``sorted_ids``; no host sync)."""
    R = target.shape[0]
    tgt = torch.empty(R, device=target.device, dtype=torch.int32)
    tid = torch.empty(R, device=target.device, dtype=torch.int64)
    fit = torch.empty(1, device=target.device, dtype=torch.int32)
    grid = (max(1, cdiv(R, _ROW_BLOCK)),)  # program 0 writes the flag, rows or not
    _row_prep_kernel[grid](
        target, target.stride(0), candidate_ids, candidate_ids.stride(0), tgt, tid, sorted_ids, fit, R,
        sorted_ids.numel(), ignore_index, BLOCK=_ROW_BLOCK,
    )  # fmt: skip
    return tgt, tid, fit


def _ids32(pad_id: int) -> bool:
    """int32 comparisons are possible only if the pad id fits (and, per call, every candidate
    id: :func:`_row_targets`)."""
    return -(2**31) <= pad_id < 2**31


def _col_bias_tensor(p: dict) -> torch.Tensor:
    """``(N,)`` float32 column bias of the single-branch kernels, ``-log Q`` (0 without
    correction) and ``-inf`` on padding; built once per call and cached in ``p``."""
    if "col_bias" not in p:
        candidate_ids, log_q = p["candidates"]
        N = candidate_ids.shape[0]
        if log_q is None:
            bias = torch.zeros(N, device=candidate_ids.device, dtype=torch.float32)
        else:
            bias = log_q.to(torch.float32).neg().contiguous()
        p["col_bias"] = bias.masked_fill_(candidate_ids == p["pad_id"], float("-inf"))
    return p["col_bias"]


def _cid32_tensor(p: dict) -> torch.Tensor:
    """``(N,)`` int32 copy of the candidate ids (wrapped where an id does not fit: the kernels
    then compare the int64 ids and never read it), for the single-branch forward's prefetch
    (:func:`_load_cid32`); built once per call and cached in ``p``."""
    if "cid32" not in p:
        p["cid32"] = p["candidates"][0].to(torch.int32).contiguous()
    return p["cid32"]


def _gmax(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(1,)`` float32 device scalar by whose inverse the kernels scale dz: for fp16 inputs
    the largest |upstream weight| (no sync), so that dz keeps clear of fp16's underflow in
    its 16-bit dot operand and store; 1 for bf16 and fp32, whose exponent range holds dz
    as it is (one small operation a backward instead of four)."""
    if dtype != torch.float16:
        return torch.ones(1, device=g.device, dtype=torch.float32)
    return g.detach().abs().amax().reshape(1).to(torch.float32)


def _ignored_rows_zeroed(queries: torch.Tensor, valid: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """``queries`` (``(R, d)``, or ``(B, R, d)`` for ``B`` branches) with the rows of ignored
    targets (``valid (R,)`` False) set to 0, for dC (the column-wise kernels or the dz-slab
    GEMMs): a row's weight there is 0, but its values times that weight reach every
    candidate's gradient (``0 x NaN``: a backbone's padding positions may hold NaN or inf), and
    masking the loads by the rows' targets inside those kernels would make each step's query
    load wait on its target load. The row-wise kernels mask the loads (a row tile is loaded
    once). One elementwise pass over the queries; ``scratch``: ``queries`` is this call's own
    copy, zeroed in place (only the ignored rows are written)."""
    if scratch:
        return queries.masked_fill_(~valid[:, None], 0.0)
    return torch.where(valid[:, None], queries, 0.0)


def _excl_flags(exclude_ids, candidate_ids, pad_id: int):
    ex, ex_sr, ex_ss, S, s_pad, ex_one = _excl_args(exclude_ids, candidate_ids)
    return (ex, ex_sr, ex_ss), S, dict(S_PAD=s_pad, EX_ONE=ex_one, IDS32=_ids32(pad_id))


_COMBINE_BLOCK = 128
_ROW_BLOCK = 256


def _prep(target, candidate_ids, exclude_ids, log_q, pad_id: int, ignore_index: int) -> dict:
    """Everything the kernels share about the batch: per-row targets, excluded ids, log Q,
    and the candidate ids sorted once (values, original columns) for :func:`_tile_flags`."""
    check_interpreter()
    vals, order = torch.sort(candidate_ids.to(torch.int64), stable=True)
    tgt, tid, fit = _row_targets(target, candidate_ids, vals, ignore_index)
    ex_args, S, xflags = _excl_flags(exclude_ids, candidate_ids, pad_id)
    lq, s_lq, has_lq = _lq_args(log_q, candidate_ids)
    lists_on = _lists_on(target, target.shape[0], candidate_ids.shape[0], S)
    return dict(
        rows=(tgt, tid, candidate_ids, candidate_ids.stride(0), *ex_args),
        fit=fit,
        lq=(lq, s_lq),
        has_lq=has_lq,
        candidates=(candidate_ids, log_q),
        S=S,
        flags=xflags,
        # fwd / dQ kernels load a row tile's excluded ids once, before the column loop
        hoist=dict(HOIST=xflags["IDS32"] and xflags["EX_ONE"] and xflags["S_PAD"] > 0),
        pad_id=pad_id,
        exclude=exclude_ids,
        lists_on=lists_on,
        dl_k=_dl_width(S) if lists_on else 0,  # the kernels' DL_K (0: no lists)
        sorted=(vals, order),
        groups={},
        tile_flags={},
    )


_FLAG_BLOCK = 128
_GROUPS_BLOCK = 1024
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the flag kernel's id slots)


def _id_groups(p: dict, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (id, column tile) grouping of the sorted candidate ids for column tiles of
    ``block_n``: ``pos (N+1,)`` gives each sorted position its group (``pos[N]`` = number of
    groups) and ``gstart (N+1,)`` each group its first sorted position (``gstart[n_groups] =
    N``; the entries past it are not written). Sorting is stable, so within one id the
    columns, hence their tiles, ascend and every group is a contiguous run. Both int32, built
    by one ``_groups_kernel`` launch (it replaced some twenty small tensor operations), no
    host sync; cached per ``block_n``."""
    if block_n not in p["groups"]:
        vals, order = p["sorted"]
        N = vals.numel()
        pos = torch.empty(N + 1, dtype=torch.int32, device=vals.device)
        gstart = torch.empty(N + 1, dtype=torch.int32, device=vals.device)
        compiled = _groups_kernel[(1,)](vals, order, pos, gstart, N, BLOCK_N=block_n, BLOCK=_GROUPS_BLOCK)
        _record("groups", compiled, dict(BLOCK_N=block_n), (1,))
        p["groups"][block_n] = (pos, gstart)
    return p["groups"][block_n]


def _tile_flags(p: dict, block_r: int, block_n: int) -> torch.Tensor:
    """``(cdiv(R, block_r), cdiv(N, block_n))`` int8 grid: 1 where some row of the row tile has,
    in the column tile, another copy of its target item or one of its excluded ids (see
    ``_flag_kernel``); the kernels run the full exclusion test only on those tile pairs.
    Built by one launch per tile shape (cached per call) over ``R (S + 1)`` (row, id) lanes in
    parallel programs: a binary search each plus one store per (row, id, column tile holding
    the id); ``exclude_ids`` is read in place."""
    key = (block_r, block_n)
    if key not in p["tile_flags"]:
        if p["S"] + 1 > _MAX_GRID_Y:
            raise ValueError(f"exclude_ids has {p['S']} columns; at most {_MAX_GRID_Y - 1} are supported")
        tgt, tid, _, _, ex, ex_sr, ex_ss = p["rows"][:7]
        vals, order = p["sorted"]
        R, N = tgt.numel(), vals.numel()
        pos, gstart = _id_groups(p, block_n)
        flags = torch.zeros(cdiv(R, block_r), cdiv(N, block_n), dtype=torch.int8, device=tgt.device)
        grid = (cdiv(R, _FLAG_BLOCK), p["S"] + 1)
        compiled = _flag_kernel[grid](
            tgt,
            tid,
            ex,
            ex_sr,
            ex_ss,
            vals,
            order,
            pos,
            gstart,
            flags,
            R,
            N,
            p["pad_id"],
            N.bit_length(),
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            BLOCK=_FLAG_BLOCK,
        )
        _record("flags", compiled, dict(BLOCK_R=block_r, BLOCK_N=block_n), grid)
        p["tile_flags"][key] = flags
    return p["tile_flags"][key]


_DENSE_BLOCK = 128


def _lists_on(t: torch.Tensor, R: int, N: int, S: int) -> bool:
    """Whether this call's kernels read drop lists (the single-branch ones, the three-branch
    forward and dC): ``R * N`` at least ``_DL_MIN_PAIRS``, a row's ``S + 1`` ids fit its list
    (from ``S = 62`` on, a row whose ids are all present overflows and the lists would only
    cost), and ``R * 64 < 2^31`` (the kernels' cursors into them are int32)."""
    least = _DL_MIN_PAIRS if _DL_MIN_PAIRS is not None else (0 if _interpreting(t) else 1 << 30)
    return R * N >= least and S + 1 <= _dl_width(S) - 2 and R * 64 < 2**31


def _dl_width(S: int) -> int:
    """Width of a row's drop list: twice its ``S + 1`` ids (room for some duplicate items),
    16 to 64. A row with more than ``width - 2`` dropped columns (with its target column and
    repeats) overflows: its list is left empty and its row tile's flagged pairs take the id
    test."""
    return min(64, max(16, next_power_of_2(2 * (S + 1))))


def _drop_lists(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sorted columns its softmax drops for an id (``(R, DL_K)`` int32, padded
    with ``_DL_END``): every column whose id is the row's target item or one of its excluded
    ids, but the target column itself (padding is the column bias's). Also each row's count
    before the cap (with its target column and repeats; ``> DL_K - 2``: overflow, the list
    left empty, so that every list ends in two ``_DL_END`` at least). Built by
    ``_row_lists_kernel`` from the sorted candidate ids (:func:`_row_lists`); no host sync;
    cached in ``p``. Most rows drop a handful of columns spread over many tiles, so on a
    sparse flagged pair each row needs only its next two (:func:`_dl_drop`)."""
    if "drop_lists" not in p:
        _row_lists(p, None)
    return p["drop_lists"]


def _tile_lists(p: dict, block_n: int) -> torch.Tensor:
    """The drop lists the kernels walk with tiles ``block_n`` wide: :func:`_drop_lists` with
    each row's entries past the second in one column tile removed. Such a tile is dense
    (:func:`_list_flags`) and tests the ids, so the list needs only enough to step past it,
    and the cursor advances by its pair on every flagged tile, with no per-tile search.
    Cached per width."""
    if ("lists", block_n) not in p["groups"]:
        _row_lists(p, block_n)
    return p["groups"][("lists", block_n)]


def _lists_block(width: int) -> int:
    """Rows a ``_row_lists_kernel`` program takes: its ``(BLOCK, DL_K, DL_K)`` rank tile at
    8K elements (32 rows at ``DL_K = 16``, 8 at 32, 2 at 64)."""
    return max(1, 8192 // (width * width))


def _row_lists(p: dict, block_n: int | None, n_split: int = 0, split_cols: int = 0) -> None:
    """One ``_row_lists_kernel`` launch: caches in ``p`` the drop lists and counts (if not
    yet there) and, for ``block_n``, the tile lists and the ``(n_split, R)`` starts of
    :func:`_split_starts` (``n_split`` column ranges ``split_cols`` wide)."""
    tgt, tid, _, _, ex, ex_sr, ex_ss = p["rows"][:7]
    vals, order = p["sorted"]
    R, N, S = tgt.numel(), vals.numel(), p["S"]
    width = _dl_width(S)
    lists = torch.empty(R, width, dtype=torch.int32, device=tgt.device)
    total = torch.empty(R, dtype=torch.int32, device=tgt.device)
    tiles = torch.empty_like(lists) if block_n else lists
    starts = torch.empty(max(n_split, 1), R, dtype=torch.int32, device=tgt.device)
    block = _lists_block(width)
    grid = (cdiv(R, block),)
    compiled = _row_lists_kernel[grid](
        tgt,
        tid,
        ex,
        ex_sr,
        ex_ss,
        vals,
        order,
        lists,
        total,
        tiles,
        starts,
        R,
        N,
        S,
        p["pad_id"],
        N.bit_length(),
        n_split if block_n else 0,
        split_cols,
        DL_K=width,
        IDS=max(2, next_power_of_2(S + 1)),
        BLOCK=block,
        BLOCK_N=block_n or 1,
        TILE_LISTS=bool(block_n),
    )
    _record("lists", compiled, dict(BLOCK_N=block_n), grid)
    p.setdefault("drop_lists", (lists, total))
    if block_n:
        p["groups"][("lists", block_n)] = tiles
        if n_split:
            p["groups"][("starts", block_n, n_split, split_cols)] = starts


def _compact(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with the entries not kept removed along ``dim`` (the last dimension of a 1-D
    or 2-D tensor), order kept, ``_DL_END`` after the last: a stable compaction by a
    cumulative count and one scatter (no sort, no host sync)."""
    n = x.shape[dim]
    pos = torch.where(keep, keep.cumsum(dim) - 1, n)  # the removed ones to a spare slot
    shape = (*x.shape[:dim], n + 1)
    out = torch.full(shape, _DL_END.value, dtype=x.dtype, device=x.device).scatter_(dim, pos, x)
    return out.narrow(dim, 0, n).contiguous()


def _list_flags(p: dict, block_r: int, block_n: int) -> torch.Tensor:
    """:func:`_tile_flags` with the dense pairs raised to 2 (``_dense_kernel``): the grid of
    the kernels that read drop lists. Cached per call and tile shape."""
    key = ("lists", block_r, block_n)
    if key not in p["tile_flags"]:
        flags = _tile_flags(p, block_r, block_n).clone()
        lists, total = _drop_lists(p)
        R, width = lists.shape
        grid = (cdiv(R, _DENSE_BLOCK),)
        compiled = _dense_kernel[grid](
            lists,
            total,
            flags,
            R,
            p["sorted"][0].numel(),
            flags.shape[1],
            DL_K=width,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            BLOCK=_DENSE_BLOCK,
            ROWWISE=True,
        )
        _record("dense", compiled, dict(BLOCK_R=block_r, BLOCK_N=block_n), grid)
        p["tile_flags"][key] = flags
    return p["tile_flags"][key]


def _col_pairs(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The (column, row) pairs of the drop lists sorted by column, then row: ``(cols, rows)``,
    int32 ``(R * DL_K,)``, the lists' padding last (column ``_DL_END``): a stable sort of
    the row-major lists by column keeps each column's rows ascending. Cached in ``p``."""
    if "col_pairs" not in p:
        lists = _drop_lists(p)[0]
        cols, at = lists.flatten().sort(stable=True)
        p["col_pairs"] = (cols, (at // lists.shape[1]).to(torch.int32))
    return p["col_pairs"]


def _col_lists(p: dict, block_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the sorted rows that drop it, for the column-wise kernel stepping
    ``block_r`` rows at a time: ``(rows, offsets)``, column ``j``'s rows are
    ``rows[offsets[j]:offsets[j + 1]]`` (int32), at most two of them per row tile (a column
    with more in one row tile makes that pair dense, :func:`_col_list_flags`, so the id test
    covers it and the cursor only has to step past). Cached per row step."""
    key = ("col_lists", block_r)
    if key not in p["groups"]:
        cols, rows = _col_pairs(p)
        N = p["sorted"][0].numel()
        third = torch.zeros_like(cols, dtype=torch.bool)
        third[2:] = (cols[2:] < N) & (cols[2:] == cols[:-2]) & (rows[2:] // block_r == rows[:-2] // block_r)
        keep = (cols < N) & ~third
        cols2 = _compact(cols, keep, 0)
        offsets = torch.searchsorted(cols2, torch.arange(N + 1, device=cols.device, dtype=cols2.dtype))
        p["groups"][key] = (_compact(rows, keep, 0), offsets.to(torch.int32))
    return p["groups"][key]


def _col_list_flags(p: dict, block_r: int, block_n: int) -> torch.Tensor:
    """:func:`_tile_flags` with the pairs the column lists do not cover raised to 2: some
    column with three or more dropping rows in the row tile (``_dense_cols_kernel``), or a
    row whose list overflowed (``_dense_kernel``). Cached per call and tile shape."""
    key = ("col_lists", block_r, block_n)
    if key not in p["tile_flags"]:
        flags = _tile_flags(p, block_r, block_n).clone()
        lists, total = _drop_lists(p)
        R, width = lists.shape
        N = p["sorted"][0].numel()
        grid = (cdiv(R, _DENSE_BLOCK),)
        _dense_kernel[grid](
            lists,
            total,
            flags,
            R,
            N,
            flags.shape[1],
            DL_K=width,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            BLOCK=_DENSE_BLOCK,
            ROWWISE=False,
        )
        cols, rows = _col_pairs(p)
        grid = (cdiv(cols.numel(), _DENSE_BLOCK),)
        compiled = _dense_cols_kernel[grid](
            rows,
            cols,
            cols.numel(),
            flags,
            N,
            flags.shape[1],
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            BLOCK=_DENSE_BLOCK,
        )
        _record("dense_cols", compiled, dict(BLOCK_R=block_r, BLOCK_N=block_n), grid)
        p["tile_flags"][key] = flags
    return p["tile_flags"][key]


def _row_list_args(p: dict, block_r: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flag grid, drop lists)`` of a row-wise launch (its ``DL_K`` is ``p["dl_k"]``);
    without lists (``_lists_on``) the 0/1 grid and a placeholder never read."""
    if not p["lists_on"]:
        return _tile_flags(p, block_r, block_n), p["rows"][0]
    lists = _tile_lists(p, block_n)  # first: its launch also leaves the full lists for the flags
    return _list_flags(p, block_r, block_n), lists


def _split_starts(p: dict, block_n: int, n_split: int, split_cols: int) -> torch.Tensor:
    """``(n_split, R)`` int32: where each row's walk of its tile list starts in each of
    ``n_split`` column ranges ``split_cols`` wide (the entries below the range's first
    column). Built in the tile lists' launch (:func:`_row_lists`): ask for the starts before
    the tile lists and one launch gives both."""
    if not p["lists_on"]:
        return p["rows"][0]
    key = ("starts", block_n, n_split, split_cols)
    if key not in p["groups"]:
        _row_lists(p, block_n, n_split, split_cols)
    return p["groups"][key]


def _col_list_args(p: dict, block_r: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(flag grid, rows, offsets)`` of a column-wise launch (its ``LISTS`` is
    ``p["lists_on"]``; see :func:`_row_list_args`)."""
    if not p["lists_on"]:
        return _tile_flags(p, block_r, block_n), p["rows"][0], p["rows"][0]
    return (_col_list_flags(p, block_r, block_n), *_col_lists(p, block_r))


def _tile_meta(c: dict, grid_over_rows: bool, with_do: bool) -> dict:
    meta = dict(
        BLOCK_R=c["BLOCK_T"] if grid_over_rows else c["BLOCK_W"],
        BLOCK_N=c["BLOCK_W"] if grid_over_rows else c["BLOCK_T"],
        BLOCK_D=c["BLOCK_D"],
        FULL_D=c["FULL_D"],
    )
    if with_do:
        meta["BLOCK_DO"] = c["BLOCK_DO"]
    return meta


def _bwd_grid(c: dict, extent: int, d: int) -> tuple[int, int]:
    return (cdiv(extent, c["BLOCK_T"]), cdiv(d, c["BLOCK_DO"]))


# ======================================================================================
# Single branch: custom ops and launchers
# ======================================================================================


@torch.library.custom_op("odmt::debiased_inbatch_ce", mutates_args=())
def _ce_op(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    log_q: torch.Tensor | None,
    pad_id: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (0 on ignored rows) and per-row log-sum-exp, both fp32 ``(R,)``."""
    with on_device_of(queries):
        loss, lse, _ = _ce_forward(queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index)
        return loss, lse


def _fwd_plan(R: int, N: int, c: dict, n_sm: int) -> tuple[int, int, int]:
    """``(row_tiles, n_split, per)`` of a forward launch at tile config ``c``: its row tiles,
    the splits of its column walk (:func:`_fwd_split`) and the column tiles each split walks."""
    row_tiles, col_tiles = cdiv(R, c["BLOCK_T"]), cdiv(N, c["BLOCK_W"])
    per = _fwd_split(row_tiles, col_tiles, n_sm)
    return row_tiles, cdiv(col_tiles, per), per


def _score_gemm_on(q: torch.Tensor, N: int, D: int, interp: bool, three: bool) -> bool:
    """Whether a call's forward and dz-only kernels read score slabs (``_SCORE_GEMM``): d
    past the full-width limit, more than one column tile, and 16-bit inputs on a GPU -- any
    dtype on the CPU, where the interpreter runs the kernels (and the tests check the path in
    float32 and float16)."""
    if not _SCORE_GEMM or max(16, next_power_of_2(D)) <= _FULL_D_MAX:
        return False
    if N <= _config("fwd3s" if three else "fwds", 0, N, D, interp)["BLOCK_W"]:  # one column tile
        return False
    return q.device.type != "cuda" or q.dtype != torch.float32


def _slab_plan(R: int, N: int, c: dict, n_sm: int, branches: int) -> tuple[int, int, int]:
    """``(n_split, per, per_slab)`` of a forward reading score slabs: the column splits of
    :func:`_fwd_plan` (``per`` column tiles each), at least two of them and each within the
    slab budget, and ``per_slab`` consecutive splits a slab: at most half the splits (no
    slab holds every column) and ``_DZ_BUDGET`` bytes of float32 scores (every branch and
    row)."""
    _, n_split, per = _fwd_plan(R, N, c, n_sm)
    col_tiles, block_w = cdiv(N, c["BLOCK_W"]), c["BLOCK_W"]
    per_cap = max(1, _DZ_BUDGET // (branches * max(R, 1) * 4 * block_w))
    per = max(1, min(per, per_cap, cdiv(col_tiles, 2)))
    n_split = cdiv(col_tiles, per)
    return n_split, per, max(1, min(per_cap // per, n_split // 2))


def _score_slab(q3: torch.Tensor, c3: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``S = Q C^T`` of the columns ``[lo, hi)`` of the ``B`` branches ``q3 (B, R, d)``,
    ``c3 (B, N, d)``: float32 ``(B, R, hi - lo)``, one batched cuBLAS GEMM (16-bit inputs
    multiplied exactly and summed in float32, as the kernels' dots do). On the CPU (the
    interpreter's runs) the product of the float32 copies: the same values."""
    cols = c3.narrow(1, lo, hi - lo).transpose(1, 2)
    if q3.device.type == "cuda" and q3.dtype != torch.float32:
        return torch.bmm(q3, cols, out_dtype=torch.float32)
    return torch.bmm(q3.float(), cols.float())


def _forward_launches(name: str, kernel, cfg: dict, queries: torch.Tensor, N: int, n_stats: int, make_args, slabs):
    """A forward's split launches: one over every column split, or (``slabs``: the ``(B, R,
    d)`` queries and ``(B, N, d)`` candidates of the score GEMMs) one a score slab of
    :func:`_slab_plan`, its splits numbered from ``split_base`` among the call's. Returns
    the float32 partial statistics ``(n_stats, n_split, R)`` of every split, on the device of
    ``queries`` (``(R, d)``). ``make_args(c, n_split, per, part, split_base, scores, slab_lo)
    -> (args, meta)``."""
    R, n_sm = queries.shape[0], _num_sms(queries)
    # with score slabs the column partition is fixed once (a refused tile only changes rows)
    slab_plan = None if slabs is None else _slab_plan(R, N, cfg, n_sm, slabs[0].shape[0])
    part_of = {}  # shared by the slabs' launches

    def make_at(split_base: int, n_here: int, scores: torch.Tensor | None, slab_lo: int):
        def make(c):
            if slab_plan is None:
                row_tiles, n_split, per = _fwd_plan(R, N, c, n_sm)
            else:
                row_tiles, (n_split, per, _) = cdiv(R, c["BLOCK_T"]), slab_plan
            if part_of.get("n_split") != n_split:
                part = torch.empty(n_stats, n_split, R, device=queries.device, dtype=torch.float32)
                part_of.update(n_split=n_split, part=part)
            args, meta = make_args(c, n_split, per, part_of["part"], split_base, scores, slab_lo)
            return (row_tiles, n_here or n_split), args, dict(meta, SCORES_IN=scores is not None)

        return make

    if slab_plan is None:
        _launch(name, kernel, cfg, make_at(0, 0, None, 0), with_do=False)
    else:
        n_split, per, per_slab = slab_plan
        width = per_slab * per * cfg["BLOCK_W"]
        for base in range(0, n_split, per_slab):
            lo = base // per_slab * width
            scores = _score_slab(*slabs, lo, min(N, lo + width))
            cfg = _launch(name, kernel, cfg, make_at(base, min(per_slab, n_split - base), scores, lo), with_do=False)[0]
    return part_of["part"]


def _ce_operands(queries: torch.Tensor, candidates: torch.Tensor, p: dict) -> tuple:
    """The single-branch kernels' leading arguments: queries and candidates with their strides,
    the rows' targets and excluded ids, the column bias."""
    rows = (queries, queries.stride(0), queries.stride(1))
    return (*rows, candidates, candidates.stride(0), candidates.stride(1), *p["rows"], _col_bias_tensor(p))


def _ce_forward(queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id: int, ignore_index: int):
    """The single-branch forward's launches: ``(loss, lse, p)`` with ``p`` the call's
    :func:`_prep` (flag grids, drop lists), which the eager backward reuses."""
    R, D = queries.shape
    N = candidates.shape[0]
    p = _prep(target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index)
    interp = _interpreting(queries)
    slabbed = _score_gemm_on(queries, N, D, interp, False)
    cfg = _config("fwds" if slabbed else "fwd", R, N, D, interp)
    p2d = max(16, next_power_of_2(D))

    def make_args(c, n_split, per, part, split_base, scores, slab_lo):
        # the starts first: with the tile lists in the same launch (_row_lists)
        starts = _split_starts(p, c["BLOCK_W"], n_split, per * c["BLOCK_W"])
        args = (
            *_ce_operands(queries, candidates, p),
            _cid32_tensor(p),
            p["fit"],
            *_row_list_args(p, c["BLOCK_T"], c["BLOCK_W"]),
            starts,
            part,
            R,
            N,
            D,
            p["S"],
            pad_id,
            per * c["BLOCK_W"],
            split_base,
            n_split,
        )
        args += (p["rows"][0], 0, 0) if scores is None else (scores, scores.stride(1), slab_lo)
        meta = dict(
            **p["flags"],
            **p["hoist"],
            DL_K=p["dl_k"],
            **_tile_meta(c, True, False),
            PREC=_prec(queries.dtype),
            D_PAD=p2d if c["FULL_D"] else c["BLOCK_D"],
        )
        return args, meta

    slab_operands = (queries[None], candidates[None]) if slabbed else None  # views, no copies
    part = _forward_launches("ce_fwd", _ce_fwd_kernel, cfg, queries, N, 3, make_args, slab_operands)
    loss = torch.empty(R, device=queries.device, dtype=torch.float32)
    lse = torch.empty(R, device=queries.device, dtype=torch.float32)
    grid = (cdiv(R, _COMBINE_BLOCK),)
    compiled = _ce_combine_kernel[grid](part, p["rows"][0], loss, lse, R, part.shape[1], BLOCK=_COMBINE_BLOCK)
    _record("ce_combine", compiled, {}, grid)
    return loss, lse, p


@_ce_op.register_fake
def _ce_op_fake(queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index):
    R = queries.shape[0]
    return (queries.new_empty(R, dtype=torch.float32), queries.new_empty(R, dtype=torch.float32))


def _ce_backward_impl(
    queries,
    candidates,
    target,
    candidate_ids,
    exclude_ids,
    log_q,
    lse,
    grad_rows,
    pad_id: int,
    ignore_index: int,
    parts=("dq", "dc"),
    prep: dict | None = None,
):
    """Launches the backward kernels named in ``parts`` (the benchmark times them one by
    one); returns ``(dq, dc)``, an uncomputed one left uninitialised. ``prep``: the forward's
    :func:`_prep` of the same inputs (its flag grids and lists are reused), or None. With the GEMM dC
    (:func:`_dz_slab_width`), ``"dc"`` computes both: the dQ kernel stores ``dz`` slab by slab
    and cuBLAS forms ``dC = dz^T Q``."""
    R, D = queries.shape
    N = candidates.shape[0]
    g = grad_rows.to(torch.float32).contiguous()
    gmax = _gmax(g, queries.dtype)
    dq = torch.empty(R, D, device=queries.device, dtype=queries.dtype)
    dc = torch.empty(N, D, device=candidates.device, dtype=candidates.dtype)
    p = prep if prep is not None else _prep(target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index)
    interp = _interpreting(queries)
    head = (*_ce_operands(queries, candidates, p), p["fit"])
    prec = _prec(queries.dtype)
    cfg_dq, width, dq_off, slabbed = _backward_plan(False, queries, N, "dc" in parts, interp)
    dz_true = queries.dtype != torch.float16

    def launch_dq(cfg, n_begin, n_end, out, dz=None, starts=None, scores=None):
        """One dQ launch: the share of the columns ``[n_begin, n_end)`` in ``out``; ``dz``:
        store the slab's dz there; ``starts``: a later slab's drop-list starts; ``scores``:
        the slab's float32 scores ``(1, R, width)``, read instead of recomputed (dz only)."""
        holder = p["rows"][0]  # never read where a flag says so
        return _launch(
            "ce_dq",
            _ce_dq_kernel,
            cfg,
            lambda c: (
                (cdiv(R, c["BLOCK_T"]), 1) if dq_off else _bwd_grid(c, R, D),
                (*head, *_row_list_args(p, c["BLOCK_T"], c["BLOCK_W"]), holder if starts is None else starts)
                + (lse, g, gmax, out, out.stride(0), out.stride(1))
                + (holder if dz is None else dz, 0 if dz is None else dz.stride(0))
                + (R, N, D, p["S"], pad_id, n_begin, n_end)
                + ((holder, 0) if scores is None else (scores, scores.stride(1))),
                dict(
                    **p["flags"],
                    **p["hoist"],
                    DL_K=p["dl_k"],
                    **_tile_meta(c, True, True),
                    PREC=prec,
                    TRANS_S=c.get("TRANS_S", False),
                    STORE_DZ=dz is not None,
                    DZ_TRUE=dz_true,
                    LATER_SLAB=starts is not None,
                    DQ_OFF=dq_off,
                    SCORES_IN=scores is not None,
                ),
            ),
            with_do=True,
        )[0]

    if width is not None:
        # dz slab by slab; dQ: the slabs' shares summed in float32, in slab order; dC = dz^T Q
        n_slab = cdiv(N, width)
        dz = torch.empty(1, R, width, device=queries.device, dtype=queries.dtype)
        acc = torch.empty(R, D, device=queries.device, dtype=torch.float32)
        # a slab's dQ share: float32 from the kernel, or the inputs' dtype from cuBLAS (dq_off)
        share = torch.empty(R, D, device=queries.device, dtype=queries.dtype if dq_off else torch.float32)
        zeroed = _ignored_rows_zeroed(queries[None], p["rows"][0] >= 0)
        batched = (candidates[None], zeroed, dc[None], share[None])  # _slab_products' (B, ...) operands
        starts = _split_starts(p, cfg_dq["BLOCK_W"], n_slab, width)
        for k in range(n_slab):
            lo, hi = k * width, min(N, (k + 1) * width)
            later = starts[k] if k and p["lists_on"] else None  # (the first slab's start at 0)
            scores = _score_slab(zeroed, batched[0], lo, hi) if slabbed else None
            cfg_dq = launch_dq(cfg_dq, lo, hi, share if k or dq_off else acc, dz[0], later, scores)
            _slab_products(dz, lo, hi, *batched, gmax, dq_off, not dz_true)
            if k:
                acc.add_(share)
            elif dq_off:
                acc.copy_(share)
        if dq_off and not dz_true:
            acc.mul_(gmax)
        dq.copy_(acc)
        return dq, dc
    if "dq" in parts:
        launch_dq(cfg_dq, 0, N, dq)
    if "dc" in parts:
        zeroed = _ignored_rows_zeroed(queries, p["rows"][0] >= 0)
        head = (zeroed, zeroed.stride(0), zeroed.stride(1), *head[3:])
        _launch(
            "ce_dc",
            _ce_dc_kernel,
            _config("dc", N, R, D, interp),
            lambda c: (
                _bwd_grid(c, N, D),
                (*head, *_col_list_args(p, c["BLOCK_W"], c["BLOCK_T"]), lse, g, gmax)
                + (dc, dc.stride(0), dc.stride(1), R, N, D, p["S"], pad_id),
                dict(
                    **p["flags"],
                    LISTS=p["lists_on"],
                    **_tile_meta(c, False, True),
                    PREC=prec,
                    TRANS_S=c.get("TRANS_S", False),
                ),
            ),
            with_do=True,
        )
    return dq, dc


@torch.library.custom_op("odmt::debiased_inbatch_ce_backward", mutates_args=())
def _ce_bwd_op(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    target: torch.Tensor,
    candidate_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    log_q: torch.Tensor | None,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    pad_id: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_r grad_rows[r] * loss[r]`` w.r.t. queries and candidates."""
    with on_device_of(queries):
        return _ce_backward_impl(
            queries, candidates, target, candidate_ids, exclude_ids, log_q, lse, grad_rows, pad_id, ignore_index
        )


@_ce_bwd_op.register_fake
def _ce_bwd_op_fake(
    queries, candidates, target, candidate_ids, exclude_ids, log_q, lse, grad_rows, pad_id, ignore_index
):
    return (queries.new_empty(queries.shape), candidates.new_empty(candidates.shape))


def _ce_setup_context(ctx, inputs, output):
    queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index = inputs
    ctx.save_for_backward(queries, candidates, target, candidate_ids, exclude_ids, log_q, output[1])
    ctx.pad_id = pad_id
    ctx.ignore_index = ignore_index


def _ce_backward(ctx, grad_loss, grad_lse):
    queries, candidates, target, candidate_ids, exclude_ids, log_q, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dq, dc = _ce_bwd_op(
        queries, candidates, target, candidate_ids, exclude_ids, log_q, lse, grad_loss, ctx.pad_id, ctx.ignore_index
    )
    return dq, dc, None, None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


class _DirectCE(torch.autograd.Function):
    """``odmt::debiased_inbatch_ce`` and its autograd formula without the dispatcher, for eager
    calls on plain tensors (:func:`~._device.direct_eager_call`); the backward also reuses the
    forward's :func:`_prep` (one row-target launch, one sort, the flag grids and lists fewer)."""

    @staticmethod
    def forward(ctx, queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index):
        with on_device_of(queries):
            loss, lse, p = _ce_forward(
                queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index
            )
        ctx.save_for_backward(queries, candidates, target, candidate_ids, exclude_ids, log_q, lse)
        ctx.args = (pad_id, ignore_index, p)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        queries, candidates, target, candidate_ids, exclude_ids, log_q, lse = ctx.saved_tensors
        pad_id, ignore_index, p = ctx.args
        with on_device_of(queries):
            dq, dc = _ce_backward_impl(
                queries, candidates, target, candidate_ids, exclude_ids, log_q, lse, grad_loss, pad_id,
                ignore_index, prep=p,
            )  # fmt: skip
        return dq, dc, None, None, None, None, None, None


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
    args = (queries, candidates, target, candidate_ids, exclude_ids, log_q, int(pad_id), int(ignore_index))
    if direct_eager_call(queries, candidates, target, candidate_ids, exclude_ids, log_q):
        per_row, _ = _DirectCE.apply(*args)
    else:
        per_row, _ = _ce_op(*args)
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
    return (
        *qs,
        qs[0].stride(0),
        qs[1].stride(0),
        qs[2].stride(0),
        qs[0].stride(1),
        *cs,
        cs[0].stride(0),
        cs[1].stride(0),
        cs[2].stride(0),
        cs[0].stride(1),
    )


@torch.library.custom_op("odmt::mutual_distillation", mutates_args=())
def _odmt_op(
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
    form_kl: bool,
    detach_teacher: bool,
    pad_id: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row parts ``(6, R)`` (ce_id, ce_text, ce_image, kl_id_text, kl_id_image,
    kl_ensemble_id; 0 on ignored rows) and per-row statistics ``(10, R)``, both fp32.
    ``detach_teacher`` only matters to the backward."""
    with on_device_of(q_id):
        loss, stats, _ = _odmt_forward(
            q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids, exclude_ids, log_q, temperature,
            form_kl, pad_id, ignore_index,
        )  # fmt: skip
        return loss, stats


def _odmt_forward(
    q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids, exclude_ids, log_q, temperature: float,
    form_kl: bool, pad_id: int, ignore_index: int,
):  # fmt: skip
    """The three-branch forward's launches: ``(loss, stats, p)`` with ``p`` the call's
    :func:`_prep`, which the eager backward reuses."""
    R, D = q_id.shape
    N = c_id.shape[0]
    p = _prep(target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index)
    interp = _interpreting(q_id)
    slabbed = _score_gemm_on(q_id, N, D, interp, True)
    cfg = _config("fwd3s" if slabbed else "fwd3", R, N, D, interp)
    p2d = max(16, next_power_of_2(D))
    qs, cs = (q_id, q_text, q_image), (c_id, c_text, c_image)
    head = _branch_args(qs, cs)

    def make_args(c, n_split, per, part, split_base, scores, slab_lo):
        starts = _split_starts(p, c["BLOCK_W"], n_split, per * c["BLOCK_W"])  # first: see _ce_forward
        fl, lists = _row_list_args(p, c["BLOCK_T"], c["BLOCK_W"])
        args = (*head, *p["rows"], *p["lq"], p["fit"], fl, lists, starts, part, R, N, D, p["S"], pad_id)
        args += (float(temperature), per * c["BLOCK_W"], split_base, n_split)
        args += (p["rows"][0], 0, 0, 0) if scores is None else (scores, scores.stride(0), scores.stride(1), slab_lo)
        meta = dict(
            **p["flags"],
            **p["hoist"],
            DL_K=p["dl_k"],
            **_tile_meta(c, True, False),
            HAS_LQ=p["has_lq"],
            FORM_KL=bool(form_kl),
            PREC=_prec(q_id.dtype),
            D_PAD=p2d if c["FULL_D"] else c["BLOCK_D"],
        )
        return args, meta

    slab_operands = (torch.stack(qs), torch.stack(cs)) if slabbed else None
    part = _forward_launches("odmt_fwd", _odmt_fwd_kernel, cfg, q_id, N, _N_SPLIT_STATS, make_args, slab_operands)
    loss = torch.empty(_N_PARTS, R, device=q_id.device, dtype=torch.float32)
    stats = torch.empty(_N_STATS, R, device=q_id.device, dtype=torch.float32)
    grid = (cdiv(R, _COMBINE_BLOCK),)
    compiled = _odmt_combine_kernel[grid](
        part,
        p["rows"][0],
        loss,
        stats,
        R,
        part.shape[1],
        float(temperature),
        FORM_KL=bool(form_kl),
        BLOCK=_COMBINE_BLOCK,
    )
    _record("odmt_combine", compiled, {}, grid)
    return loss, stats, p


@_odmt_op.register_fake
def _odmt_op_fake(
    q_id,
    q_text,
    q_image,
    c_id,
    c_text,
    c_image,
    target,
    candidate_ids,
    exclude_ids,
    log_q,
    temperature,
    form_kl,
    detach_teacher,
    pad_id,
    ignore_index,
):
    R = q_id.shape[0]
    return (q_id.new_empty(_N_PARTS, R, dtype=torch.float32), q_id.new_empty(_N_STATS, R, dtype=torch.float32))


def _odmt_backward_impl(
    q_id,
    q_text,
    q_image,
    c_id,
    c_text,
    c_image,
    target,
    candidate_ids,
    exclude_ids,
    log_q,
    stats,
    grad_rows,
    temperature: float,
    form_kl: bool,
    detach_teacher: bool,
    pad_id: int,
    ignore_index: int,
    parts=("dq", "dc"),
    prep: dict | None = None,
):
    """Launches the backward kernels named in ``parts``; returns ``(dq, dc)`` of shapes
    ``(3, R, d)`` and ``(3, N, d)``, an uncomputed one left uninitialised (with the GEMM dC,
    ``"dc"`` computes both, as in :func:`_ce_backward_impl`; ``prep`` as there)."""
    R, D = q_id.shape
    N = c_id.shape[0]
    g = grad_rows.to(torch.float32).contiguous()
    gmax = _gmax(g, q_id.dtype)
    dq = torch.empty(3, R, D, device=q_id.device, dtype=q_id.dtype)
    dc = torch.empty(3, N, D, device=c_id.device, dtype=c_id.dtype)
    p = prep if prep is not None else _prep(target, candidate_ids, exclude_ids, log_q, pad_id, ignore_index)
    interp = _interpreting(q_id)
    cs, shared = (c_id, c_text, c_image), (*p["rows"], *p["lq"], p["fit"])
    head = (*_branch_args((q_id, q_text, q_image), cs), *shared)
    tail = (R, N, D, p["S"], pad_id, float(temperature))
    flags = dict(**p["flags"], HAS_LQ=p["has_lq"], FORM_KL=bool(form_kl), DETACH=bool(detach_teacher))
    flags["PREC"] = _prec(q_id.dtype)
    n_sm = _num_sms(q_id)
    used = {}  # the output buffer of the launch that ran (partials when split)

    def launch_dq(cfg, n_begin, n_end, target_out, dz=None, dq_off=False, scores=None):
        """One dQ launch: the share of the columns ``[n_begin, n_end)`` in ``target_out``;
        ``dz``: store the slab's dz there ``(3, R, width)``; ``dq_off``: only that (no dQ
        dots, nothing in ``target_out``); ``scores``: the slab's float32 scores, read instead
        of recomputed (with ``dq_off``). Reads no drop lists: its walk may split whenever
        its grid is small."""
        holder = p["rows"][0]  # never read where a flag says so

        def make_dq(c):
            grid = (cdiv(R, c["BLOCK_T"]), 1) if dq_off else _bwd_grid(c, R, D)
            n_split, per = _split_walk(grid[0] * grid[1], n_end - n_begin, c["BLOCK_W"], n_sm, True)
            # without dQ dots the splits only share the walk: no partial sums
            out, split_stride = used["dq"] = (target_out, 0) if dq_off else _split_out(target_out, n_split)
            args = (*head, _tile_flags(p, c["BLOCK_T"], c["BLOCK_W"]), stats, g, gmax, out, *tail, per, split_stride)
            args += (holder, 0, 0) if dz is None else (dz, dz.stride(1), dz.stride(0))
            args += (n_begin, n_end)
            args += (holder, 0, 0) if scores is None else (scores, scores.stride(0), scores.stride(1))
            meta = dict(**flags, **p["hoist"], **_tile_meta(c, True, True), TRANS_S=c.get("TRANS_S", False))
            meta.update(STORE_DZ=dz is not None, DZ_TRUE=q_id.dtype != torch.float16, DQ_OFF=dq_off)
            meta["SCORES_IN"] = scores is not None
            return (*grid, n_split), args, dict(meta, SPLIT=n_split > 1)

        used_cfg = _launch("odmt_dq", _odmt_dq_kernel, cfg, make_dq, with_do=True)[0]
        _sum_splits(used["dq"][0], target_out)
        return used_cfg

    def make_dc(c):
        grid = _bwd_grid(c, N, D)
        n_split, per = _split_walk(grid[0] * grid[1], R, c["BLOCK_W"], n_sm, not p["lists_on"])
        out, split_stride = used["dc"] = _split_out(dc, n_split)
        args = (*head_dc, *_col_list_args(p, c["BLOCK_W"], c["BLOCK_T"]), stats, g, gmax, out, *tail, per, split_stride)
        meta = dict(**flags, LISTS=p["lists_on"], **_tile_meta(c, False, True), SPLIT=n_split > 1)
        return (*grid, n_split), args, meta

    cfg_dq, width, dq_off, slabbed = _backward_plan(True, q_id, N, "dc" in parts, interp)
    valid = p["rows"][0] >= 0
    if width is not None:
        # dz slab by slab; dQ: the slabs' shares summed in float32, in slab order; dC = dz^T Q
        # per slab and branch
        n_slab = cdiv(N, width)
        dz = torch.empty(3, R, width, device=q_id.device, dtype=q_id.dtype)
        acc = torch.empty(3, R, D, device=q_id.device, dtype=torch.float32)
        # a slab's dQ share: float32 from the kernel, or the inputs' dtype from cuBLAS (dq_off)
        share = torch.empty(3, R, D, device=q_id.device, dtype=q_id.dtype if dq_off else torch.float32)
        zeroed = _ignored_rows_zeroed(torch.stack((q_id, q_text, q_image)), valid, scratch=True)
        # the candidates in one (3, N, d) tensor for the batched dQ GEMMs (one copy a call)
        cs3 = torch.stack(cs) if dq_off else None
        scaled = q_id.dtype == torch.float16
        for k in range(n_slab):
            lo, hi = k * width, min(N, (k + 1) * width)
            scores = _score_slab(zeroed, cs3, lo, hi) if slabbed else None
            cfg_dq = launch_dq(cfg_dq, lo, hi, share if k or dq_off else acc, dz, dq_off, scores)
            _slab_products(dz, lo, hi, cs3, zeroed, dc, share, gmax, dq_off, scaled)
            if k:
                acc.add_(share)
            elif dq_off:
                acc.copy_(share)
        if dq_off and scaled:
            acc.mul_(gmax)
        dq.copy_(acc)
        return dq, dc
    if "dq" in parts:
        launch_dq(cfg_dq, 0, N, dq)
    if "dc" in parts:
        zeroed = tuple(_ignored_rows_zeroed(q, valid) for q in (q_id, q_text, q_image))
        head_dc = (*_branch_args(zeroed, cs), *shared)
        _launch("odmt_dc", _odmt_dc_kernel, _config("dc3", N, R, D, interp), make_dc, with_do=True)
        _sum_splits(used["dc"][0], dc)
    return dq, dc


@torch.library.custom_op("odmt::mutual_distillation_backward", mutates_args=())
def _odmt_bwd_op(
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
    stats: torch.Tensor,
    grad_rows: torch.Tensor,
    temperature: float,
    form_kl: bool,
    detach_teacher: bool,
    pad_id: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(3, R, d)`` and ``(3, N, d)`` (branches id, text, image) of
    ``sum grad_rows * parts``."""
    with on_device_of(q_id):
        return _odmt_backward_impl(
            q_id,
            q_text,
            q_image,
            c_id,
            c_text,
            c_image,
            target,
            candidate_ids,
            exclude_ids,
            log_q,
            stats,
            grad_rows,
            temperature,
            form_kl,
            detach_teacher,
            pad_id,
            ignore_index,
        )


@_odmt_bwd_op.register_fake
def _odmt_bwd_op_fake(
    q_id,
    q_text,
    q_image,
    c_id,
    c_text,
    c_image,
    target,
    candidate_ids,
    exclude_ids,
    log_q,
    stats,
    grad_rows,
    temperature,
    form_kl,
    detach_teacher,
    pad_id,
    ignore_index,
):
    R, D = q_id.shape
    N = c_id.shape[0]
    return (q_id.new_empty(3, R, D), c_id.new_empty(3, N, D))


def _odmt_setup_context(ctx, inputs, output):
    (
        q_id,
        q_text,
        q_image,
        c_id,
        c_text,
        c_image,
        target,
        candidate_ids,
        exclude_ids,
        log_q,
        temperature,
        form_kl,
        detach_teacher,
        pad_id,
        ignore_index,
    ) = inputs
    ctx.save_for_backward(
        q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids, exclude_ids, log_q, output[1]
    )
    ctx.args = (temperature, form_kl, detach_teacher, pad_id, ignore_index)


def _odmt_backward(ctx, grad_loss, grad_stats):
    saved = ctx.saved_tensors
    temperature, form_kl, detach_teacher, pad_id, ignore_index = ctx.args
    if grad_loss is None:
        grad_loss = torch.zeros_like(saved[-1][:_N_PARTS])
    dq, dc = _odmt_bwd_op(*saved, grad_loss, temperature, form_kl, detach_teacher, pad_id, ignore_index)
    return (dq[0], dq[1], dq[2], dc[0], dc[1], dc[2]) + (None,) * 9


_odmt_op.register_autograd(_odmt_backward, setup_context=_odmt_setup_context)


class _DirectODMT(torch.autograd.Function):
    """``odmt::mutual_distillation`` and its autograd formula without the dispatcher, for eager
    calls on plain tensors (as :class:`_DirectCE`)."""

    @staticmethod
    def forward(ctx, *args):
        tensors, (temperature, form_kl, detach_teacher, pad_id, ignore_index) = args[:10], args[10:]
        with on_device_of(tensors[0]):
            loss, stats, p = _odmt_forward(*tensors, temperature, form_kl, pad_id, ignore_index)
        ctx.save_for_backward(*tensors, stats)
        ctx.args = (temperature, form_kl, detach_teacher, pad_id, ignore_index, p)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        saved = ctx.saved_tensors
        *flags, p = ctx.args
        with on_device_of(saved[0]):
            dq, dc = _odmt_backward_impl(*saved, grad_loss, *flags, prep=p)
        return (*dq.unbind(0), *dc.unbind(0)) + (None,) * 9


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

    Queries ``(R, d_m)`` and candidates ``(N, d_m)`` of the id, text and image branches
    (one dtype; the widths ``d_m`` may differ between branches: narrower ones are padded
    with zeros to the widest), the shared ``target``/``candidate_ids``/``exclude_ids``/``log_q`` as in
    :func:`debiased_inbatch_cross_entropy`; ``temperature > 0``; ``detach_teacher``: the
    teachers get no gradient from the distillation terms; ``form``: ``"kl"`` or ``"ce"``;
    ``reduction``: ``"mean"`` or ``"sum"``. Same semantics as
    :func:`~.reference.mutual_distillation_reference`; fp32 results.
    """
    if form not in ("kl", "ce"):
        raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 < float(temperature) < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    dtypes = {t.dtype for t in (q_id, q_text, q_image, c_id, c_text, c_image)}
    if len(dtypes) != 1:
        raise TypeError(f"all queries and candidates must share one dtype, got {dtypes}")
    for name, q, c in (("id", q_id, c_id), ("text", q_text, c_text), ("image", q_image, c_image)):
        if q.shape[1] != c.shape[1]:
            raise ValueError(f"the {name} branch's queries have width {q.shape[1]}, its candidates {c.shape[1]}")
    width = max(q_id.shape[1], q_text.shape[1], q_image.shape[1])
    if {q_id.shape[1], q_text.shape[1], q_image.shape[1]} != {width}:
        # the kernels walk one width: narrower branches get zero features, which add nothing
        # to any score (their gradients are sliced off by the pad's backward); a copy only here
        q_id, q_text, q_image, c_id, c_text, c_image = (
            torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (q_id, q_text, q_image, c_id, c_text, c_image)
        )
    tensors = (q_id, q_text, q_image, c_id, c_text, c_image, target, candidate_ids, exclude_ids, log_q)
    args = (*tensors, float(temperature), form == "kl", bool(detach_teacher), int(pad_id), int(ignore_index))
    if direct_eager_call(*tensors):
        per_row, _ = _DirectODMT.apply(*args)
    else:
        per_row, _ = _odmt_op(*args)
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


from ._cache_keys import settle_cache_keys  # noqa: E402

settle_cache_keys(globals().values())

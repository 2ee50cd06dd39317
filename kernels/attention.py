"""ID-masked fused attention (forward and backward) in Triton.

Math
----
For one item ``b`` and head ``h`` with queries ``Q``, keys ``K``, values ``V`` of shape
``(L, D)`` and ``scale`` (default ``D ** -0.5``)::

    S = scale * Q K^T                         (L x L, never stored)
    A[i, j] = key j is not padding  and  (j != id  or  i == id)
    P = softmax over j of S[i, j] restricted to A[i, :]   (P[i, :] = 0 if A[i, :] is empty)
    O = (P * Z) V,  Z[i, j] = keep[i, j] / (1 - p)         (Z = 1 without dropout)

``key_padding_mask`` ``(B, L)`` (True = padding) and ``id_index`` (``-1`` = no ID rule) are
the only mask inputs: the rule ``A`` is evaluated in the kernel from a row of ``L`` flags and
two integer comparisons, so no ``L x L`` tensor exists anywhere. The short kernels (``L <=
128``; bf16 and a positive scale: ``_MASK_DOT``) add it to the scores instead, as
one more 16-wide step of the score dot: ``[1, i != id] . [-1e30 (j padding), -1e30 (j = id)]``
is 0 on allowed pairs and at most ``-1e30`` elsewhere, which the exponentials turn into 0.
The ID key is attended by the ID query alone; the ID query attends every non-padding key. A
query with no attendable key (all keys padded) outputs zeros and receives zero gradient.

Dropout draws ``keep[i, j] = rand >= p`` from Philox (``tl.rand4x``) keyed by ``(seed,
b*H+h)``, one draw of four numbers per row and group of four keys (counter ``i*ceil(L/4) +
j//4``): the backward regenerates exactly the same mask, both kernel families below draw
the same one, and :func:`dropout_keep_mask` materialises it for tests. The kernels read the
seed from a one-element device tensor, not a launch argument, so a CUDA graph that draws it
on the device before the launch drops different entries at every replay.

Tiling: short sequences (``L <= 128``; ODMT's items have ``L = 81``)
--------------------------------------------------------------------
The default whenever ``L <= 128``, forward and backward (``_SHORT_MAX_FWD`` /
``_SHORT_MAX_BWD`` / ``_SHORT_FWD_MIN_HEAD_DIM`` choose the families apart; both save the
same log2-domain lse, so the backward of one follows the forward of the other).
A program holds every query and every key of one ``(b, h)`` (``BL = next_power_of_two(L)``):
``S`` is accumulated over head-dim chunks of ``BD`` columns (the largest power of two dividing
``D``, clamped to 16..64: 384 = 6 x 64), so Q, K, V are each read exactly once and O written
once -- the memory roofline's traffic, where a blocked kernel re-reads K and V once per query
block. With the whole row in registers the softmax needs no online rescaling. With one chunk the
keys are loaded in blocks of ``BL / 2 + BL / 4`` where ``L <= 3 BL / 4`` (64 + 32 at L = 81:
the tile's padding quarter is never computed) and, with ``_SPLIT_QUERIES`` (off by default,
untimed), the query rows likewise::

    forward, per (b, h)                         backward, per (b, h)
    ---------------------------------------     ----------------------------------------------
    S = sum_chunks Q_c K_c^T  (BL x BL fp32)    S = sum_c Q_c K_c^T;  P = exp2(S - lse) (16-bit)
    mask A, P = softmax(S) (* keep / (1-p))     for each chunk c: dP += dO_c V_c^T,
    for each chunk c: O_c = P V_c, store                          dV_c = P~^T dO_c, stored
    lse = m + log2(l)                           (P~ = P * keep / (1-p); dP~ likewise)
                                                delta = rowsum(P * dP~)  (= rowsum(dO * O): O is
                                                                          never read)
                                                dS = scale P (dP~ - delta)
                                                for each chunk c: dQ_c = dS K_c, dK_c = dS^T Q_c

The backward writes dQ, dK, dV once; no atomics, no ``delta`` tensor. With one chunk (``D <=
64``) each tile is a single load, read once, all in one kernel; nothing inside a pair can be
pipelined, so the programs are persistent: a few an SM, each walking the pairs ``pid, pid +
programs, ...``, and Triton's software pipeline issues the next pairs' loads (asynchronous
copies into shared memory) while this pair's math runs (``_short_configs``). With several
chunks (``D > 64``), one pair a program and the chunk loops software-pipelined (three stages
forward, four backward). ``_SPLIT_BWD`` splits that backward in two launches: the pair's kernel runs up to dS and stores it (input
dtype, ``(B*H, L, BL)`` scratch, freed after the call), then ``_attn_bwd_dqdk_kernel`` runs
the last loop over (pair, group of chunks) programs, each reading dS once. Run 6 measured the
one-kernel form faster (its last loop re-reads K, Q from L2), so it is the default.

The two ``(BL x BL)`` float32 tiles (S, then dP; P kept in 16 bits between them) take 8 warps
at ``BL = 128``. If no configuration fits the card (shared memory), the blocked kernels below
run instead. Registers, spills and the measurements behind these choices:
``kernels/DESIGN.md``.

Tiling: blocked kernels (longer sequences)
------------------------------------------
``D`` is split into a power-of-two part ``BD0`` (largest power of two <= D) and, when
needed, a second power-of-two part ``BD1`` (384 = 256 + 128, 80 = 64 + 16), so head dims that
are not powers of two waste little; columns past ``D`` are masked loads. Every matmul over
``D`` is the sum of the two parts. Rows past ``L`` are masked too, so any ``L`` works.

    forward  (one program per (b, h, query block of BM rows))     backward (FlashAttention-2)
    ------------------------------------------------------------  ---------------------------------------
    load Q_blk (BM x D)                                            dq kernel, per (b, h, query block):
    for each key block (BN keys):                                    delta = rowsum(dO * O)   (stored)
        S = scale Q_blk K_blk^T, masked by A                         for each key block:
        online softmax: m, l (log2 domain, exp2)                        P = exp2(S - lse), dP = dO V^T (*Z)
        acc += (P * keep) V_blk                                         dS = P (dP - delta);  dQ += dS K
    O = acc / l / (1 - p);  lse = m + log2 l   (+inf if l = 0)     dkdv kernel, per (b, h, key block):
                                                                     for each query block:
                                                                        P, dP, dS as above (same keep)
                                                                        dV += (P Z)^T dO;  dK += dS^T Q

The programs of one ``(b, h)`` are adjacent in the 1-D launch grid, so the K/V (forward, dq)
or Q/dO (dkdv) blocks that several programs re-read are served from L2. No atomics: each
output block is owned by exactly one program. The log-sum-exp (float32, ``(B, H, L)``) is
the only extra tensor the forward saves for the backward.

Block sizes of the blocked kernels come from a small deterministic rule (:func:`_blocks`), set from a sweep measured
on an H100 at the ODMT shape ``L = 81`` (``benchmarks/RESULTS.md``): 4 warps up to ``D = 384``;
64-row query blocks and 64-key dK/dV blocks at ``D <= 128``; 32-row query blocks and 16-key
dK/dV blocks at ``D = 384`` (the ``BM x D`` float32 accumulators of the forward and dq, and
the two ``BN x D`` ones of dkdv, decide). If a configuration does not fit the card's shared
memory, the launch falls back to fewer pipeline stages, then to smaller blocks (a
deterministic list, not an autotuner).

Registered as the custom op ``odmt::id_masked_attention`` (returns the output and the
log-sum-exp) with a fake implementation and an autograd formula that calls the custom op
``odmt::id_masked_attention_backward``; the public entry point is
:func:`id_masked_attention`. It takes the custom op wherever tracing or a transform needs it
(``torch.compile``, fake tensors, dispatch modes, functorch, tensor subclasses); an eager
call on plain tensors runs the same launch functions through ``_DirectAttention``, a plain
``torch.autograd.Function``, because the dispatcher's route costs host time on every call:
about 40% of an eager fwd + bwd's host time at ODMT's sizes on this project's CPU, where at 4
heads the call waits on the host, not on the kernels (:func:`~._device.direct_eager_call`;
tests check that both routes give the same bits). CPU tensors work under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.errors import OutOfResources

from ._device import check_interpreter, device_sms, direct_eager_call, on_device_of
from ._host import cdiv, next_power_of_2

__all__ = ["dropout_keep_mask", "id_masked_attention"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, row_stride, cols, col_stride, L, HEAD_DIM: tl.constexpr):
    """Load a ``(rows, cols)`` tile, zero outside ``L`` rows and ``HEAD_DIM`` columns."""
    mask = (rows[:, None] < L) & (cols[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, row_stride, cols, col_stride, L, HEAD_DIM: tl.constexpr):
    mask = (rows[:, None] < L) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * row_stride + cols[None, :] * col_stride, value, mask=mask)


@triton.jit
def _store_tile_t(base, value_t, rows, row_stride, cols, col_stride, L, HEAD_DIM: tl.constexpr):
    """Store the ``(cols, rows)`` tile ``value_t`` as the ``(rows, cols)`` tile it transposes."""
    mask = (cols[:, None] < HEAD_DIM) & (rows[None, :] < L)
    tl.store(base + cols[:, None] * col_stride + rows[None, :] * row_stride, value_t, mask=mask)


@triton.jit
def _key_ok(pad_row, offs_n, L, HAS_PAD: tl.constexpr):
    """``(BN,)`` bool: key exists (``< L``) and is not padding."""
    ok = offs_n < L
    if HAS_PAD:
        pad = tl.load(pad_row + offs_n, mask=ok, other=1)
        ok = ok & (pad == 0)
    return ok


@triton.jit
def _allowed(key_ok, offs_m, offs_n, ID):
    """``(BM, BN)`` bool: query ``i`` may attend key ``j`` (padding rule and ID rule)."""
    return key_ok[None, :] & ((offs_n[None, :] != ID) | (offs_m[:, None] == ID))


@triton.jit
def _load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed, read from device memory: a launch argument would be recorded once by a
    CUDA graph (every replay dropping the same entries), a tensor drawn on the device before
    the launch takes a fresh value at each replay."""
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0


@triton.jit
def _dropout_keep(seed, bh, offs_m, start_n, L, dropout_p, BN: tl.constexpr):
    """``(BM, BN)`` bool keep-mask of keys ``start_n .. start_n + BN`` (``start_n`` and ``BN``
    multiples of 4). Philox key ``(seed, bh)``; one draw per row and group of four keys,
    counter ``i * ceil(L / 4) + j // 4``, whose four outputs serve the four keys (``tl.rand``
    draws all four and keeps one: a quarter of the Philox work, which dominated the dropout
    kernels -- the short ones at D = 64 took 3x their no-dropout time in Run 5)."""
    # int64 tensor + seed (a Python int in the interpreter, an int32 scalar when compiled)
    key = bh.to(tl.int64) * 4294967296 + seed
    groups = start_n // 4 + tl.arange(0, BN // 4)
    counter = offs_m[:, None] * ((L + 3) // 4) + groups[None, :]
    u0, u1, u2, u3 = tl.rand4x(key, counter)
    # (BM, BN/4, 2, 2) -> (BM, BN): key 4g + k holds output (0, 2, 1, 3)[k] of group g
    u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), (offs_m.shape[0], BN))
    return u >= dropout_p


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["ID"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, PAD,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    spb, spl,
    H, L, N_QBLK, ID, qk_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
):
    seed = _load_seed(SEED, DROPOUT)
    pid = tl.program_id(0)
    bh = pid // N_QBLK
    qblk = pid % N_QBLK
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    pad_row = PAD + b * spb

    offs_m = qblk * BM + tl.arange(0, BM)
    d0 = tl.arange(0, BD0)
    q0 = _load_tile(q_base, offs_m, sql, d0, sqd, L, HEAD_DIM)
    acc0 = tl.zeros([BM, BD0], dtype=tl.float32)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        q1 = _load_tile(q_base, offs_m, sql, d1, sqd, L, HEAD_DIM)
        acc1 = tl.zeros([BM, BD1], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)

    for start_n in range(0, L, BN):
        offs_n = start_n + tl.arange(0, BN)
        k0 = _load_tile(k_base, offs_n, skl, d0, skd, L, HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if BD1 > 0:
            k1 = _load_tile(k_base, offs_n, skl, d1, skd, L, HEAD_DIM)
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
        allowed = _allowed(_key_ok(pad_row, offs_n, L, HAS_PAD), offs_m, offs_n, ID)
        s = tl.where(allowed, s * qk_scale, float("-inf"))
        # online softmax in the log2 domain; m_safe keeps fully masked rows NaN-free
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m, start_n, L, dropout_p, BN), p, 0.0)
        v0 = _load_tile(v_base, offs_n, svl, d0, svd, L, HEAD_DIM)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
        if BD1 > 0:
            v1 = _load_tile(v_base, offs_n, svl, d1, svd, L, HEAD_DIM)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
        m_i = m_new

    has_key = l_i > 0.0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    _store_tile(o_base, (acc0 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, sol, d0, sod, L, HEAD_DIM)
    if BD1 > 0:
        _store_tile(o_base, (acc1 * inv_l[:, None]).to(O.dtype.element_ty), offs_m, sol, d1, sod, L, HEAD_DIM)
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


# --------------------------------------------------------------------------------------
# Backward: dQ (and delta = rowsum(dO * O)), then dK / dV
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["ID"])
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, PAD,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    sdob, sdoh, sdol, sdod,
    sdqb, sdqh, sdql, sdqd,
    spb, spl,
    H, L, N_QBLK, ID, qk_scale, sm_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
):
    seed = _load_seed(SEED, DROPOUT)
    pid = tl.program_id(0)
    bh = pid // N_QBLK
    qblk = pid % N_QBLK
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    pad_row = PAD + b * spb
    row_base = bh.to(tl.int64) * L

    offs_m = qblk * BM + tl.arange(0, BM)
    d0 = tl.arange(0, BD0)
    q0 = _load_tile(q_base, offs_m, sql, d0, sqd, L, HEAD_DIM)
    do0 = _load_tile(do_base, offs_m, sdol, d0, sdod, L, HEAD_DIM)
    o0 = _load_tile(o_base, offs_m, sol, d0, sod, L, HEAD_DIM)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    dq0 = tl.zeros([BM, BD0], dtype=tl.float32)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        q1 = _load_tile(q_base, offs_m, sql, d1, sqd, L, HEAD_DIM)
        do1 = _load_tile(do_base, offs_m, sdol, d1, sdod, L, HEAD_DIM)
        o1 = _load_tile(o_base, offs_m, sol, d1, sod, L, HEAD_DIM)
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        dq1 = tl.zeros([BM, BD1], dtype=tl.float32)
    tl.store(DELTA + row_base + offs_m, delta, mask=offs_m < L)
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=float("inf"))
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)

    for start_n in range(0, L, BN):
        offs_n = start_n + tl.arange(0, BN)
        k0 = _load_tile(k_base, offs_n, skl, d0, skd, L, HEAD_DIM)
        v0 = _load_tile(v_base, offs_n, svl, d0, svd, L, HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)
        if BD1 > 0:
            k1 = _load_tile(k_base, offs_n, skl, d1, skd, L, HEAD_DIM)
            v1 = _load_tile(v_base, offs_n, svl, d1, svd, L, HEAD_DIM)
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=PREC)
        allowed = _allowed(_key_ok(pad_row, offs_n, L, HAS_PAD), offs_m, offs_n, ID)
        p = tl.where(allowed, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, start_n, L, dropout_p, BN)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 += tl.dot(ds, k0, input_precision=PREC)
        if BD1 > 0:
            dq1 += tl.dot(ds, k1, input_precision=PREC)

    _store_tile(dq_base, (dq0 * sm_scale).to(DQ.dtype.element_ty), offs_m, sdql, d0, sdqd, L, HEAD_DIM)
    if BD1 > 0:
        _store_tile(dq_base, (dq1 * sm_scale).to(DQ.dtype.element_ty), offs_m, sdql, d1, sdqd, L, HEAD_DIM)


@triton.jit(do_not_specialize=["ID"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, PAD,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sdob, sdoh, sdol, sdod,
    sdkb, sdkh, sdkl, sdkd,
    sdvb, sdvh, sdvl, sdvd,
    spb, spl,
    H, L, N_KBLK, ID, qk_scale, sm_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BD0: tl.constexpr, BD1: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
):
    seed = _load_seed(SEED, DROPOUT)
    pid = tl.program_id(0)
    bh = pid // N_KBLK
    kblk = pid % N_KBLK
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdob + h * sdoh
    dk_base = DK + b * sdkb + h * sdkh
    dv_base = DV + b * sdvb + h * sdvh
    pad_row = PAD + b * spb
    row_base = bh.to(tl.int64) * L

    offs_n = kblk * BN + tl.arange(0, BN)
    key_ok = _key_ok(pad_row, offs_n, L, HAS_PAD)
    d0 = tl.arange(0, BD0)
    k0 = _load_tile(k_base, offs_n, skl, d0, skd, L, HEAD_DIM)
    v0 = _load_tile(v_base, offs_n, svl, d0, svd, L, HEAD_DIM)
    dk0 = tl.zeros([BN, BD0], dtype=tl.float32)
    dv0 = tl.zeros([BN, BD0], dtype=tl.float32)
    if BD1 > 0:
        d1 = BD0 + tl.arange(0, BD1)
        k1 = _load_tile(k_base, offs_n, skl, d1, skd, L, HEAD_DIM)
        v1 = _load_tile(v_base, offs_n, svl, d1, svd, L, HEAD_DIM)
        dk1 = tl.zeros([BN, BD1], dtype=tl.float32)
        dv1 = tl.zeros([BN, BD1], dtype=tl.float32)
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)

    for start_m in range(0, L, BM):
        offs_m = start_m + tl.arange(0, BM)
        q0 = _load_tile(q_base, offs_m, sql, d0, sqd, L, HEAD_DIM)
        do0 = _load_tile(do_base, offs_m, sdol, d0, sdod, L, HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PREC)
        if BD1 > 0:
            q1 = _load_tile(q_base, offs_m, sql, d1, sqd, L, HEAD_DIM)
            do1 = _load_tile(do_base, offs_m, sdol, d1, sdod, L, HEAD_DIM)
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=PREC)
        lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < L, other=0.0)
        allowed = _allowed(key_ok, offs_m, offs_n, ID)
        p = tl.where(allowed, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, kblk * BN, L, dropout_p, BN)
            p_drop = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            p_drop = p
        p_t = tl.trans(p_drop.to(v0.dtype))
        ds_t = tl.trans((p * (dp - delta[:, None])).to(q0.dtype))
        dv0 += tl.dot(p_t, do0, input_precision=PREC)
        dk0 += tl.dot(ds_t, q0, input_precision=PREC)
        if BD1 > 0:
            dv1 += tl.dot(p_t, do1, input_precision=PREC)
            dk1 += tl.dot(ds_t, q1, input_precision=PREC)

    _store_tile(dk_base, (dk0 * sm_scale).to(DK.dtype.element_ty), offs_n, sdkl, d0, sdkd, L, HEAD_DIM)
    _store_tile(dv_base, dv0.to(DV.dtype.element_ty), offs_n, sdvl, d0, sdvd, L, HEAD_DIM)
    if BD1 > 0:
        _store_tile(dk_base, (dk1 * sm_scale).to(DK.dtype.element_ty), offs_n, sdkl, d1, sdkd, L, HEAD_DIM)
        _store_tile(dv_base, dv1.to(DV.dtype.element_ty), offs_n, sdvl, d1, sdvd, L, HEAD_DIM)


# --------------------------------------------------------------------------------------
# Short sequences (L <= 128, ODMT's 81 tokens): a program holds every query and every key of
# one (b, h) at a time, so Q, K, V are read once in the forward and the whole backward is one
# kernel. Programs walk the (b, h) pairs with a grid stride (``range(pid, BH, programs)``):
# launched with one program per pair each takes one; launched persistent (a few programs per
# SM) a program with one head-dim chunk loads the next pair's tiles before this pair's math.
# --------------------------------------------------------------------------------------


@triton.jit
def _pair_ptr(ptr, bh, H, stride_b, stride_h):
    """Base pointer of pair ``bh = b * H + h`` of a ``(B, H, ...)`` tensor (64-bit offsets)."""
    return ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _pair_tile(ptr, bh, H, stride_b, stride_h, stride_l, stride_d, offs, cols, L, HEAD_DIM: tl.constexpr):
    """The ``(BL, BD)`` tile of pair ``bh``, zeros past ``L`` rows and ``HEAD_DIM`` columns."""
    return _load_tile(_pair_ptr(ptr, bh, H, stride_b, stride_h), offs, stride_l, cols, stride_d, L, HEAD_DIM)


@triton.jit
def _full_scores(q_base, sql, sqd, k_base, skl, skd, offs, L, HEAD_DIM: tl.constexpr, BL: tl.constexpr,
                 BD: tl.constexpr, PREC: tl.constexpr):
    """``(BL, BL)`` float32 ``A B^T`` of one ``(b, h)`` (``Q K^T``, ``dO V^T``), accumulated over
    ``BD``-wide head-dim chunks."""
    s = tl.zeros([BL, BL], dtype=tl.float32)
    for d_start in range(0, HEAD_DIM, BD):
        cols = d_start + tl.arange(0, BD)
        q = _load_tile(q_base, offs, sql, cols, sqd, L, HEAD_DIM)
        k = _load_tile(k_base, offs, skl, cols, skd, L, HEAD_DIM)
        s += tl.dot(q, tl.trans(k), input_precision=PREC)
    return s


@triton.jit
def _scaled_scores(s, key_ok, offs_m, offs_n, ID, qk_scale):
    """``S * scale`` (log2 domain) where query ``offs_m`` may attend key ``offs_n``, else -inf."""
    return tl.where(_allowed(key_ok, offs_m, offs_n, ID), s * qk_scale, float("-inf"))


@triton.jit
def _short_softmax(s, key_ok, offs, ID, qk_scale, bh, L, dropout_p, seed, BL: tl.constexpr,
                   DROPOUT: tl.constexpr, MASK_DOT: tl.constexpr = False):
    """Forward of one pair from its raw ``(BL, BL)`` scores: ``(E * keep, inv_l, lse)`` with
    ``E = exp2(S - rowmax)`` (float32, in [0, 1]) and ``inv_l = 1 / (rowsum(E) (1 - p))``, so
    that ``P * keep / (1 - p) = E * keep * inv_l``.

    Every key of the row is in the tile, so the softmax is a plain (not online) one in the
    log2 domain; a row with no attendable key gets ``E = 0`` and ``lse = +inf``. With
    ``MASK_DOT`` the mask is already in ``S`` (and the scale positive): the maxima are taken of
    the raw scores and the scale enters the exponentials' FFMA, as ``SCALE_IN_EXP`` does."""
    if MASK_DOT:
        m_safe = _safe_max(tl.max(s, 1), MASK_DOT) * qk_scale
        s = s * qk_scale  # (folded into the exponential's FFMA below)
    else:
        s = _scaled_scores(s, key_ok, offs, offs, ID, qk_scale)
        m_safe = _safe_max(tl.max(s, 1))
    e = tl.exp2(s - m_safe[:, None])
    l_sum = tl.sum(e, 1)
    if DROPOUT:
        e = tl.where(_dropout_keep(seed, bh, offs, 0, L, dropout_p, BL), e, 0.0)
    inv_l, lse = _softmax_norm(m_safe, l_sum, dropout_p, DROPOUT)
    return e, inv_l, lse


@triton.jit
def _safe_max(m, MASK_DOT: tl.constexpr = False):
    """Row maxima with -inf (no attendable key) replaced by 0, so that exp2(S - m) is 0, not NaN.
    With ``MASK_DOT`` a row with no attendable key has a maximum near the mask's -1e30 instead."""
    if MASK_DOT:
        return tl.where(m < -1.0e29, 0.0, m)
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _mask_rows_operand(rows, ID, dtype: tl.constexpr):
    """``MASK_DOT``: the query side ``(BM, 16)`` of the mask as a product of two dot operands:
    column 0 all ones (the padding term), column 1 ``[i != ID]`` (the ID term), zeros after."""
    col = tl.arange(0, 16)[None, :]
    return ((col == 0) | ((col == 1) & (rows[:, None] != ID))).to(dtype)


@triton.jit
def _mask_keys_operand(key_ok, offs_n, ID, dtype: tl.constexpr):
    """``MASK_DOT``: the key side, built transposed ``(16, BN)`` (keys along the thread's
    contiguous elements: vector stores to shared memory, where a ``(BN, 16)`` tile took a
    16-bit store an element): row 0 ``-1e30`` on keys that are padding or past ``L``, row 1
    ``-1e30`` on the ID key, zeros elsewhere. ``q_mask @ k_mask`` adds exactly 0 to an
    allowed score and at most ``-1e30`` to any other one."""
    row = tl.arange(0, 16)[:, None]
    hit = ((row == 0) & (key_ok[None, :] == 0)) | ((row == 1) & (offs_n[None, :] == ID))
    return tl.where(hit, -1.0e30, 0.0).to(dtype)


@triton.jit
def _add_mask(s, offs, key_ok, ID, dtype: tl.constexpr, PREC: tl.constexpr):
    """``MASK_DOT`` on a whole ``(BL, BL)`` score tile of one pair: ``S + q_mask @ k_mask``."""
    q_mask = _mask_rows_operand(offs, ID, dtype)
    k_mask = _mask_keys_operand(key_ok, offs, ID, dtype)
    return tl.dot(q_mask, k_mask, acc=s, input_precision=PREC)


@triton.jit
def _softmax_norm(m_safe, l_sum, dropout_p, DROPOUT: tl.constexpr):
    """``(inv_l, lse)`` of rows with maxima ``m_safe`` and exp-sums ``l_sum``: ``inv_l = 1 /
    (l (1 - p))`` (1 on empty rows), ``lse = m + log2(l)`` (+inf on empty rows)."""
    has_key = l_sum > 0.0
    inv_l = 1.0 / tl.where(has_key, l_sum, 1.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    return inv_l, tl.where(has_key, m_safe + tl.log2(tl.where(has_key, l_sum, 1.0)), float("inf"))


@triton.jit
def _short_probs(s, key_ok, offs, ID, qk_scale, lse, dtype: tl.constexpr, MASK_DOT: tl.constexpr = False):
    """Backward: ``P = exp2(S - lse)`` on the allowed pairs, in the 16-bit input dtype (it is
    a dot operand, and it halves the tile kept while dP is computed). The mask is applied to
    the exponent (a select before the conversion, which then packs two elements at a time);
    with ``MASK_DOT`` it is already in ``S``."""
    if MASK_DOT:
        return tl.exp2(s * qk_scale - lse[:, None]).to(dtype)
    return tl.exp2(tl.where(_allowed(key_ok, offs, offs, ID), s * qk_scale - lse[:, None], float("-inf"))).to(dtype)


@triton.jit
def _short_dropped(p, bh, offs, L, dropout_p, seed, BL: tl.constexpr, DROPOUT: tl.constexpr):
    """Backward: ``P~ = P * keep / (1 - p)`` in ``p``'s dtype (the dV operand; ``P`` without
    dropout)."""
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs, 0, L, dropout_p, BL)
        return tl.where(keep, p.to(tl.float32) * (1.0 / (1.0 - dropout_p)), 0.0).to(p.dtype)
    return p


@triton.jit
def _short_ds(p, p_drop, dp, dropout_p, sm_scale, DROPOUT: tl.constexpr):
    """Backward of a whole ``(BL, BL)`` tile: ``dS = scale * P (dP~ - delta)`` in ``p``'s dtype,
    ``dP~ = dP * keep / (1 - p)``. ``scale`` (the score's) is applied here, as the FFMA
    ``dP~ scale - delta scale``, so that ``dQ = dS K`` and ``dK = dS^T Q`` are stored as they
    come out of the dots: no multiply on the ``(BL, D)`` results. ``keep`` is read off ``P~`` instead of drawn
    again: wherever ``P != 0``, ``P~ != 0`` exactly when the key is kept (``P / (1 - p)``
    cannot underflow), and where ``P = 0`` the element adds nothing to ``delta`` or ``dS``.
    ``delta_i = sum_d dO_id O_id = sum_j P_ij dP~_ij``: the full row is here, so O is never
    read."""
    p32 = p.to(tl.float32)
    if DROPOUT:
        dp = tl.where(p_drop != 0.0, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    delta = tl.sum(p32 * dp, 1)
    return (p32 * (dp * sm_scale - (delta * sm_scale)[:, None])).to(p.dtype)


@triton.jit
def _block_scores(q, k, q_mask, k_mask, key_ok, rows, offs, ID, qk_scale, PREC: tl.constexpr,
                  SCALE_IN_EXP: tl.constexpr, MASK_DOT: tl.constexpr):
    """The masked scores of query rows ``rows`` against one key block: raw (``SCALE_IN_EXP``)
    or scaled, the mask through the dot (``MASK_DOT``) or selected (-inf)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if MASK_DOT:
        return tl.dot(q_mask, k_mask, acc=s, input_precision=PREC)
    if SCALE_IN_EXP:
        return tl.where(_allowed(key_ok, rows, offs, ID), s, float("-inf"))
    return _scaled_scores(s, key_ok, rows, offs, ID, qk_scale)


@triton.jit
def _short_fwd_rows(q, rows, k, v, ok_a, offs_a, k_b, v_b, ok_b, offs_b, o_base, sol, sod, lse_base, cols, bh, L, ID,
                    qk_scale, dropout_p, seed, q_mask, k_mask_a, k_mask_b, HEAD_DIM: tl.constexpr,
                    BLA: tl.constexpr, BLB: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                    SCALE_IN_EXP: tl.constexpr, MASK_DOT: tl.constexpr):
    """One-chunk forward of the query rows ``rows`` (their tile ``q``) of pair ``bh`` against
    its keys in one block (``k``, ``v``) or two (``BLB > 0``: ``k_b``, ``v_b`` too): scores,
    plain softmax, ``O`` and the log-sum-exp of those rows, stored.

    ``SCALE_IN_EXP`` (a positive scale, the launcher's check): the row maxima are taken of the
    raw scores and the scale enters each exponential's FFMA, ``exp2(S c - max(S) c)``, one
    instruction an element fewer than scaling every score first (a negative scale would turn
    the raw maximum into the scaled minimum, hence the scaled form there).

    ``MASK_DOT`` (with ``SCALE_IN_EXP``): the mask enters the scores as one more 16-wide step
    of the score dot, ``q_mask @ k_mask`` (:func:`_mask_rows_operand`, :func:`_mask_keys_operand`),
    instead of a select on every element."""
    s_a = _block_scores(q, k, q_mask, k_mask_a, ok_a, rows, offs_a, ID, qk_scale, PREC, SCALE_IN_EXP, MASK_DOT)
    m = tl.max(s_a, 1)
    if BLB > 0:
        s_b = _block_scores(q, k_b, q_mask, k_mask_b, ok_b, rows, offs_b, ID, qk_scale, PREC, SCALE_IN_EXP, MASK_DOT)
        m = tl.maximum(m, tl.max(s_b, 1))
    if SCALE_IN_EXP:
        m_safe = _safe_max(m, MASK_DOT) * qk_scale
        s_a = s_a * qk_scale  # (folded into the exponential's FFMA below)
        if BLB > 0:
            s_b = s_b * qk_scale
    else:
        m_safe = _safe_max(m)
    e_a = tl.exp2(s_a - m_safe[:, None])
    l_sum = tl.sum(e_a, 1)
    if DROPOUT:
        e_a = tl.where(_dropout_keep(seed, bh, rows, 0, L, dropout_p, BLA), e_a, 0.0)
    # normalised after the dot: the (rows, BD) output is smaller than the score tile
    o = tl.dot(e_a.to(v.dtype), v, input_precision=PREC)
    if BLB > 0:
        e_b = tl.exp2(s_b - m_safe[:, None])
        l_sum += tl.sum(e_b, 1)
        if DROPOUT:
            e_b = tl.where(_dropout_keep(seed, bh, rows, BLA, L, dropout_p, BLB), e_b, 0.0)
        o = tl.dot(e_b.to(v_b.dtype), v_b, acc=o, input_precision=PREC)
    inv_l, lse = _softmax_norm(m_safe, l_sum, dropout_p, DROPOUT)
    o = o * inv_l[:, None]
    _store_tile(o_base, o.to(o_base.dtype.element_ty), rows, sol, cols, sod, L, HEAD_DIM)
    tl.store(lse_base + rows, lse, mask=rows < L)


@triton.jit(do_not_specialize=["ID"])
def _attn_fwd_short_kernel(
    Q, K, V, O, LSE, PAD,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sob, soh, sol, sod,
    spb, spl,
    BH, H, L, ID, qk_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, BLA: tl.constexpr, BLB: tl.constexpr,
    BQA: tl.constexpr, BQB: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    SCALE_IN_EXP: tl.constexpr = False, MASK_DOT: tl.constexpr = False,
):
    seed = _load_seed(SEED, DROPOUT)
    first = tl.program_id(0)
    step = tl.num_programs(0)
    offs = tl.arange(0, BL)
    if HEAD_DIM <= BD:
        # One head-dim chunk: a persistent loop over pairs, whose loads Triton's software
        # pipeline issues num_stages - 1 pairs ahead (asynchronous copies to shared memory).
        # Keys in one block of BLA, or two (BLA + BLB = 64 + 32 for 64 < L <= 96: a quarter
        # of the 128 x 128 tile's work is padding that is never computed).
        cols = tl.arange(0, BD)
        offs_a = tl.arange(0, BLA)
        rows_a = tl.arange(0, BQA)
        q_mask_a = rows_a  # (never read without MASK_DOT)
        q_mask_b = rows_a
        if MASK_DOT:  # the query side of the mask: the same for every pair
            q_mask_a = _mask_rows_operand(rows_a, ID, K.dtype.element_ty)
            if BQB > 0:
                q_mask_b = _mask_rows_operand(BQA + tl.arange(0, BQB), ID, K.dtype.element_ty)
        for i in range(0, tl.cdiv(BH - first, step)):
            bh = first + i * step  # a tensor in the interpreter too (a range variable is an int)
            q = _pair_tile(Q, bh, H, sqb, sqh, sql, sqd, rows_a, cols, L, HEAD_DIM)
            k = _pair_tile(K, bh, H, skb, skh, skl, skd, offs_a, cols, L, HEAD_DIM)
            v = _pair_tile(V, bh, H, svb, svh, svl, svd, offs_a, cols, L, HEAD_DIM)
            pad_row = PAD + (bh // H).to(tl.int64) * spb
            ok_a = _key_ok(pad_row, offs_a, L, HAS_PAD)
            if BLB > 0:
                offs_b = BLA + tl.arange(0, BLB)
                k_b = _pair_tile(K, bh, H, skb, skh, skl, skd, offs_b, cols, L, HEAD_DIM)
                v_b = _pair_tile(V, bh, H, svb, svh, svl, svd, offs_b, cols, L, HEAD_DIM)
                ok_b = _key_ok(pad_row, offs_b, L, HAS_PAD)
            else:  # never read (BLB = 0)
                offs_b, k_b, v_b, ok_b = offs_a, k, v, ok_a
            k_mask_a = offs_a  # (never read without MASK_DOT)
            k_mask_b = offs_a
            if MASK_DOT:
                k_mask_a = _mask_keys_operand(ok_a, offs_a, ID, K.dtype.element_ty)
                if BLB > 0:
                    k_mask_b = _mask_keys_operand(ok_b, offs_b, ID, K.dtype.element_ty)
            o_base = _pair_ptr(O, bh, H, sob, soh)
            lse_base = LSE + bh.to(tl.int64) * L
            _short_fwd_rows(q, rows_a, k, v, ok_a, offs_a, k_b, v_b, ok_b, offs_b, o_base, sol, sod, lse_base, cols,
                            bh, L, ID, qk_scale, dropout_p, seed, q_mask_a, k_mask_a, k_mask_b, HEAD_DIM, BLA, BLB,
                            DROPOUT, PREC, SCALE_IN_EXP, MASK_DOT)
            if BQB > 0:
                rows_b = BQA + tl.arange(0, BQB)
                q_b = _pair_tile(Q, bh, H, sqb, sqh, sql, sqd, rows_b, cols, L, HEAD_DIM)
                _short_fwd_rows(q_b, rows_b, k, v, ok_a, offs_a, k_b, v_b, ok_b, offs_b, o_base, sol, sod, lse_base,
                                cols, bh, L, ID, qk_scale, dropout_p, seed, q_mask_b, k_mask_a, k_mask_b, HEAD_DIM,
                                BLA, BLB, DROPOUT, PREC, SCALE_IN_EXP, MASK_DOT)
    else:
        # Several chunks: one pair a program (launched with one program per pair; an outer
        # loop around the chunk loops cost ~100 registers a thread and spills at D = 384),
        # the chunk loops pipelined. S = Q K^T: the whole (BL x BL) tile stays in registers.
        bh = first
        s = _full_scores(_pair_ptr(Q, bh, H, sqb, sqh), sql, sqd, _pair_ptr(K, bh, H, skb, skh), skl, skd,
                         offs, L, HEAD_DIM, BL, BD, PREC)
        key_ok = _key_ok(PAD + (bh // H).to(tl.int64) * spb, offs, L, HAS_PAD)
        if MASK_DOT:
            s = _add_mask(s, offs, key_ok, ID, K.dtype.element_ty, PREC)
        e, inv_l, lse = _short_softmax(s, key_ok, offs, ID, qk_scale, bh, L, dropout_p, seed, BL, DROPOUT, MASK_DOT)
        p = (e * inv_l[:, None]).to(V.dtype.element_ty)  # once here, not once per output chunk
        v_base = _pair_ptr(V, bh, H, svb, svh)
        o_base = _pair_ptr(O, bh, H, sob, soh)
        for d_start in range(0, HEAD_DIM, BD):
            cols = d_start + tl.arange(0, BD)
            v = _load_tile(v_base, offs, svl, cols, svd, L, HEAD_DIM)
            o = tl.dot(p, v, input_precision=PREC)
            _store_tile(o_base, o.to(O.dtype.element_ty), offs, sol, cols, sod, L, HEAD_DIM)
        tl.store(LSE + bh.to(tl.int64) * L + offs, lse, mask=offs < L)


@triton.jit(do_not_specialize=["ID"])
def _attn_bwd_short_kernel(
    Q, K, V, DO, LSE, DQ, DK, DV, PAD, DS,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    sdob, sdoh, sdol, sdod,
    sdqb, sdqh, sdql, sdqd,
    sdkb, sdkh, sdkl, sdkd,
    sdvb, sdvh, sdvl, sdvd,
    spb, spl,
    BH, H, L, ID, qk_scale, sm_scale, dropout_p, SEED,
    HEAD_DIM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
    HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr, STORE_DS: tl.constexpr,
    MASK_DOT: tl.constexpr = False,
):
    seed = _load_seed(SEED, DROPOUT)
    first = tl.program_id(0)
    step = tl.num_programs(0)
    offs = tl.arange(0, BL)
    if HEAD_DIM <= BD:
        # One head-dim chunk: Q, K, V, dO are read once, in a persistent loop pipelined as in
        # the forward, with one key block (split 64 + 32 as in the forward, the 32-key block's
        # dV and dK products fell back to mma.sync and layout shuffles: no fewer instructions
        # and twice the CTA barriers in the sm_90 compile)
        cols = tl.arange(0, BD)
        for i in range(0, tl.cdiv(BH - first, step)):
            bh = first + i * step  # a tensor in the interpreter too (a range variable is an int)
            q = _pair_tile(Q, bh, H, sqb, sqh, sql, sqd, offs, cols, L, HEAD_DIM)
            k = _pair_tile(K, bh, H, skb, skh, skl, skd, offs, cols, L, HEAD_DIM)
            v = _pair_tile(V, bh, H, svb, svh, svl, svd, offs, cols, L, HEAD_DIM)
            do = _pair_tile(DO, bh, H, sdob, sdoh, sdol, sdod, offs, cols, L, HEAD_DIM)
            lse = tl.load(LSE + bh.to(tl.int64) * L + offs, mask=offs < L, other=float("inf"))
            key_ok = _key_ok(PAD + (bh // H).to(tl.int64) * spb, offs, L, HAS_PAD)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            if MASK_DOT:
                # (bh >> 31 is 0: it keeps the query side inside the loop, whose shared memory
                # then follows P's; hoisted, its 4 KB took the three-stage pipeline past the
                # H100's 227 KB a block and the launch would fall back to two stages)
                s = _add_mask(s, offs, key_ok, ID + (bh >> 31), K.dtype.element_ty, PREC)
            p = _short_probs(s, key_ok, offs, ID, qk_scale, lse, Q.dtype.element_ty, MASK_DOT)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            p_drop = _short_dropped(p, bh, offs, L, dropout_p, seed, BL, DROPOUT)
            ds = _short_ds(p, p_drop, dp, dropout_p, sm_scale, DROPOUT)
            dv = tl.dot(tl.trans(p_drop), do, input_precision=PREC)
            _store_tile(_pair_ptr(DV, bh, H, sdvb, sdvh), dv.to(DV.dtype.element_ty), offs, sdvl, cols, sdvd, L,
                        HEAD_DIM)
            dq = tl.dot(ds, k, input_precision=PREC)
            _store_tile(_pair_ptr(DQ, bh, H, sdqb, sdqh), dq.to(DQ.dtype.element_ty), offs, sdql, cols, sdqd, L,
                        HEAD_DIM)
            dk = tl.dot(tl.trans(ds), q, input_precision=PREC)
            _store_tile(_pair_ptr(DK, bh, H, sdkb, sdkh), dk.to(DK.dtype.element_ty), offs, sdkl, cols, sdkd, L,
                        HEAD_DIM)
    else:
        # Several chunks: one pair a program, as in the forward. Pass 1: S = Q K^T, then P in
        # the input dtype; pass 2: dP = dO V^T and, from the same dO chunk, dV = P~^T dO.
        bh = first
        q_base = _pair_ptr(Q, bh, H, sqb, sqh)
        k_base = _pair_ptr(K, bh, H, skb, skh)
        v_base = _pair_ptr(V, bh, H, svb, svh)
        do_base = _pair_ptr(DO, bh, H, sdob, sdoh)
        dv_base = _pair_ptr(DV, bh, H, sdvb, sdvh)
        s = _full_scores(q_base, sql, sqd, k_base, skl, skd, offs, L, HEAD_DIM, BL, BD, PREC)
        key_ok = _key_ok(PAD + (bh // H).to(tl.int64) * spb, offs, L, HAS_PAD)
        if MASK_DOT:
            s = _add_mask(s, offs, key_ok, ID, K.dtype.element_ty, PREC)
        lse = tl.load(LSE + bh.to(tl.int64) * L + offs, mask=offs < L, other=float("inf"))
        p = _short_probs(s, key_ok, offs, ID, qk_scale, lse, Q.dtype.element_ty, MASK_DOT)
        p_drop = _short_dropped(p, bh, offs, L, dropout_p, seed, BL, DROPOUT)
        dp = tl.zeros([BL, BL], dtype=tl.float32)
        for d_start in range(0, HEAD_DIM, BD):
            cols = d_start + tl.arange(0, BD)
            do = _load_tile(do_base, offs, sdol, cols, sdod, L, HEAD_DIM)
            v = _load_tile(v_base, offs, svl, cols, svd, L, HEAD_DIM)
            dp += tl.dot(do, tl.trans(v), input_precision=PREC)
            dvt = tl.dot(tl.trans(do), p_drop, input_precision=PREC)  # (transposed: see _dq_dk_chunks)
            _store_tile_t(dv_base, dvt.to(DV.dtype.element_ty), offs, sdvl, cols, sdvd, L, HEAD_DIM)
        ds = _short_ds(p, p_drop, dp, dropout_p, sm_scale, DROPOUT)
        if STORE_DS:
            # split backward: dS to the (BH, L, BL) scratch (zeros past L: P = 0 there), rows
            # whole so that the stores and _attn_bwd_dqdk_kernel's loads are vectors
            tl.store(DS + bh.to(tl.int64) * L * BL + offs[:, None] * BL + offs[None, :], ds, mask=offs[:, None] < L)
        else:
            # pass 3 here: dQ = dS K, dK = dS^T Q over every chunk
            _dq_dk_chunks(ds, q_base, sql, sqd, k_base, skl, skd, _pair_ptr(DQ, bh, H, sdqb, sdqh), sdql, sdqd,
                          _pair_ptr(DK, bh, H, sdkb, sdkh), sdkl, sdkd, offs, 0, HEAD_DIM, L, HEAD_DIM, BD,
                          PREC)


@triton.jit
def _dq_dk_chunks(ds, q_base, sql, sqd, k_base, skl, skd, dq_base, sdql, sdqd, dk_base, sdkl, sdkd, offs, d_lo, d_hi,
                  L, HEAD_DIM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """The backward's last pass over head-dim chunks ``[d_lo, d_hi)`` of one pair: ``dQ_c = dS
    K_c`` and ``dK_c = dS^T Q_c`` (``dS`` carries ``scale``), each chunk stored at once. Formed
    transposed, ``K_c^T dS^T`` and ``Q_c^T dS``: the chunk tiles are the A operands, already in
    shared memory, and ``dS`` a B operand there, instead of ``dS`` and ``dS^T`` held in
    registers across the loop (sm_90 compile at 2 x 384: no spills instead of 32 B)."""
    for d_start in range(d_lo, d_hi, BD):
        cols = d_start + tl.arange(0, BD)
        k = _load_tile(k_base, offs, skl, cols, skd, L, HEAD_DIM)
        dqt = tl.dot(tl.trans(k), tl.trans(ds), input_precision=PREC)
        _store_tile_t(dq_base, dqt.to(dq_base.dtype.element_ty), offs, sdql, cols, sdqd, L, HEAD_DIM)
        q = _load_tile(q_base, offs, sql, cols, sqd, L, HEAD_DIM)
        dkt = tl.dot(tl.trans(q), ds, input_precision=PREC)
        _store_tile_t(dk_base, dkt.to(dk_base.dtype.element_ty), offs, sdkl, cols, sdkd, L, HEAD_DIM)


@triton.jit
def _attn_bwd_dqdk_kernel(
    Q, K, DS, DQ, DK,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    sdqb, sdqh, sdql, sdqd,
    sdkb, sdkh, sdkl, sdkd,
    H, L, N_GROUP,
    HEAD_DIM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, GROUP_D: tl.constexpr, PREC: tl.constexpr,
):
    """Pass 3 of the split short backward: ``dQ = dS K`` and ``dK = dS^T Q`` over the
    ``GROUP_D`` head-dim columns of group ``pid % N_GROUP`` of pair ``pid // N_GROUP``,
    ``BD`` at a time (a pipelined chunk loop), ``dS`` read once from the scratch."""
    pid = tl.program_id(0)
    bh = pid // N_GROUP
    d_lo = (pid % N_GROUP) * GROUP_D
    offs = tl.arange(0, BL)
    ds = tl.load(DS + bh.to(tl.int64) * L * BL + offs[:, None] * BL + offs[None, :], mask=offs[:, None] < L, other=0.0)
    _dq_dk_chunks(ds, _pair_ptr(Q, bh, H, sqb, sqh), sql, sqd, _pair_ptr(K, bh, H, skb, skh), skl, skd,
                  _pair_ptr(DQ, bh, H, sdqb, sdqh), sdql, sdqd, _pair_ptr(DK, bh, H, sdkb, sdkh), sdkl, sdkd, offs,
                  d_lo, tl.minimum(d_lo + GROUP_D, HEAD_DIM), L, HEAD_DIM, BD, PREC)


# --------------------------------------------------------------------------------------
# Dropout keep-mask, materialised (tests only)
# --------------------------------------------------------------------------------------


@triton.jit
def _keep_mask_kernel(OUT, L, dropout_p, SEED, BM: tl.constexpr, BN: tl.constexpr):
    seed = tl.load(SEED)
    bh = tl.program_id(0)
    out_base = OUT + bh.to(tl.int64) * L * L
    for start_m in range(0, L, BM):
        offs_m = start_m + tl.arange(0, BM)
        for start_n in range(0, L, BN):
            offs_n = start_n + tl.arange(0, BN)
            keep = _dropout_keep(seed, bh, offs_m, start_n, L, dropout_p, BN)
            mask = (offs_m[:, None] < L) & (offs_n[None, :] < L)
            tl.store(out_base + offs_m[:, None] * L + offs_n[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------
# Launch wrappers
# --------------------------------------------------------------------------------------


def _split_head_dim(head_dim: int) -> tuple[int, int]:
    """``(BD0, BD1)``: powers of two (>= 16, BD1 may be 0) with ``BD0 + BD1 >= head_dim``."""
    if head_dim <= 16:
        return 16, 0
    bd0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - bd0
    bd1 = 0 if rest == 0 else max(16, next_power_of_2(rest))
    if bd1 == bd0:  # e.g. 24 -> 16 + 16: one 32-wide part is simpler and no bigger
        return 2 * bd0, 0
    return bd0, bd1


def _blocks(kind: str, length: int, width: int) -> list[tuple[int, int, int, int]]:
    """Candidate ``(BM, BN, num_warps, num_stages)`` in order of preference.

    ``width`` = BD0 + BD1. The first entry is the heuristic; the rest are the fallbacks used
    only when a launch raises ``OutOfResources`` (fewer stages, then smaller blocks).
    """
    # Measured on an H100 at L = 81 (benchmarks/RESULTS.md, run 3: a sweep of every kernel kind,
    # each configuration checked against this rule's output): 4 warps beat 8 up to D = 384
    # (forward 501 vs 821 us at 2 x 384); at D <= 128, 64-row query blocks and 64-key dK/dV
    # blocks beat 32 (forward 176 vs 267 us at 4 x 64). Wider heads keep the 8-warp choice
    # (unmeasured; their float32 accumulators need the registers).
    tiny = length <= 16
    warps = 4 if width <= 384 else 8
    if kind == "fwd" or kind == "dq":
        # BM = query rows owned by the program, BN = key rows streamed per iteration.
        bm = 16 if tiny else (64 if width <= 128 else 32)
        bn = 16 if tiny else (64 if (width <= 128 and length > 96) else 32)
    else:  # dkdv: BN = key rows owned (two float32 accumulators), BM = query rows streamed
        bn = 16 if (tiny or width > 256) else (64 if width <= 128 else 32)
        bm = 16 if tiny else (64 if width <= 128 else 32)
    first = (bm, bn, warps, 2)
    out = [first, (bm, bn, warps, 1)]
    small = (min(bm, 32), 16, warps, 1)
    if small not in out:
        out.append(small)
    if (16, 16, warps, 1) not in out:
        out.append((16, 16, warps, 1))
    return out


_CHOSEN: dict[tuple, tuple[int, ...]] = {}
# Benchmark hook: kind -> configuration forced for every launch of that kind (benchmarks/
# bench_attention.py sweeps a few; empty in normal use): "fwd", "dq", "dkdv" -> (BM, BN,
# num_warps, num_stages) of the blocked kernels; "fwd_short", "bwd_short" -> (BD, num_warps,
# num_stages) of the short ones.
_OVERRIDE: dict[str, tuple[int, ...]] = {}


def _launch(kind: str, kernel, bh: int, length: int, width: int, dtype, args, meta) -> None:
    """Launch ``kernel`` with the first block configuration that fits the device."""
    cache_key = (kind, length > 16, length > 96, length > 192, width, dtype, meta["HEAD_DIM"])
    candidates = _blocks(kind, length, width)
    if kind in _OVERRIDE:
        candidates = [_OVERRIDE[kind]]
    elif cache_key in _CHOSEN:
        candidates = [_CHOSEN[cache_key]]
    last_error: Exception | None = None
    for bm, bn, warps, stages in candidates:
        own = bm if kind in ("fwd", "dq") else bn
        n_blk = cdiv(length, own)
        try:
            kernel[(bh * n_blk,)](*args(n_blk), BM=bm, BN=bn, num_warps=warps, num_stages=stages, **meta)
        except OutOfResources as err:  # shared memory / registers: try the next, smaller config
            last_error = err
            continue
        if kind not in _OVERRIDE:
            _CHOSEN[cache_key] = (bm, bn, warps, stages)
        return
    raise RuntimeError(f"id_masked_attention: no block configuration fits this device ({last_error})")


# Sequences up to these lengths take the short kernels (``*_short_kernel``: a program holds a whole (b, h)),
# forward and backward chosen apart (both families save the same log-sum-exp, so either
# backward follows either forward); longer ones the FlashAttention-style blocked kernels.
# Tests and benchmarks set them to 0 to run the blocked kernels on the same inputs.
_SHORT_MAX_FWD = 128
_SHORT_MAX_BWD = 128
# The short forward also needs a head dim of at least this much (0: any). Run 5 (H100, L = 81,
# bf16): at D = 384 the short forward took 308 us against the blocked one's 504 us (its
# head-dim chunks pipeline, three stages); at D = 64, one program per pair and nothing to
# pipeline, the blocked forward won, 487 vs 696 us (12 heads) and 176 vs 249 us (4 heads), so
# this was 128. The one-chunk short forward is now persistent and pipelined across pairs
# (``_short_configs``): Run 6 timed it at 410 / 149 us against the blocked forward's 497 /
# 178 us; the benchmark times both families at every configuration. The short backward won everywhere in Run 5 (blocked
# forward + short backward 2,270 / 1,100 us against 2,632 / 1,484 us for the blocked pair at
# 12 x 64 / 4 x 64).
_SHORT_FWD_MIN_HEAD_DIM = 0


def _head_chunk(head_dim: int) -> int:
    """Head-dim chunk of the short kernels: the largest power of two dividing ``head_dim``,
    clamped to [16, 64] (384 -> 64 exactly; 80 -> 16; 24 -> 16 with a masked half chunk)."""
    return max(16, min(64, head_dim & -head_dim))


def _short_configs(kind: str, length: int, head_dim: int) -> list[tuple[int, int, int, int, int]]:
    """Candidate ``(BD, num_warps, num_stages, programs_per_sm, maxnreg)`` of a short kernel,
    in order of preference (``programs_per_sm = 0``: one program per (b, h) pair; ``maxnreg =
    0``: the compiler's register count).

    The ``(BL, BL)`` float32 score tile (and, in the backward, the dP tile beside it) decides
    the warps: 8 at BL = 128 (64 registers a thread per tile), 4 below. With several head-dim
    chunks (``D > 64``) a program takes one pair and pipeline stages overlap the next chunk's
    loads with the current chunk's dots: three in the forward (Run 5 on an H100 at 2 x 384:
    308 us with three stages against 513 us with two), four in the backward (Runs 6 and 7:
    fwd+bwd 1,103 / 1,057 us against 1,140 / 1,088 with three).

    With one chunk (``D <= 64``) there is nothing to pipeline inside a pair, and one program
    per pair ran its loads and its math one after the other (Run 5: the short forward at 12 x
    64 took 696 us, 2.5x the memory roofline). Persistent programs walk the pairs instead, and
    the software pipeline issues the next pairs' loads during this pair's math (H100, L = 81,
    bf16):

    - forward: two programs an SM at 128 registers, two stages (Run 6: 410 / 149 us at 12 /
      4 heads; one program of three stages 418 / 161, of two 549 / 200);
    - backward: one program an SM, three stages (Run 6 at 12 heads: fwd+bwd 1,346 us against
      1,457 with two stages and 1,728 with one program a pair). At 4 heads the calls wait on
      the host, so their timings did not rank the forms (Run 6 put one program a pair first,
      Run 7 every form at 920-1,000 us); the kernels' own time did: 354 us persistent with two
      stages (Run 6) against 444 us one program a pair (Run 7).

    The fallbacks (fewer stages, one program per pair, then 16-wide chunks) shrink shared
    memory for cards that refuse the first.
    """
    block_len = max(16, next_power_of_2(length))
    warps = 8 if block_len >= 128 else 4
    chunk = _head_chunk(head_dim)
    if head_dim > chunk:
        out = [(chunk, warps, 3, 0, 0), (chunk, warps, 2, 0, 0), (chunk, warps, 1, 0, 0)]
        if kind == "bwd_short":
            out.insert(0, (chunk, warps, 4, 0, 0))
    elif kind == "fwd_short" and _query_blocks(length, block_len)[1]:
        # query rows 64 + 32 (``_SPLIT_QUERIES``): one warpgroup a program (sm_90 compile: at
        # 8 warps twice the instructions a pair, 384 B of spills; kernels/DESIGN.md)
        out = [(chunk, 4, 2, 2, 0), (chunk, 4, 2, 4, 128), (chunk, 4, 1, 2, 0), (chunk, 4, 1, 0, 0)]
    elif kind == "fwd_short":
        out = [(chunk, warps, 2, 2, 128), (chunk, warps, 3, 1, 0), (chunk, warps, 2, 1, 0), (chunk, warps, 1, 0, 0)]
    else:
        out = [(chunk, warps, 3, 1, 0), (chunk, warps, 2, 1, 0), (chunk, warps, 1, 0, 0)]
    if chunk > 16:
        out.append((16, warps, 1, 0, 0))
    return out


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 2 on the CPU interpreter, so that the
    persistent loop walks several pairs a program in the tests)."""
    if device.type != "cuda":
        return 2
    return device_sms(device)


def _key_blocks(length: int, block_len: int) -> tuple[int, int]:
    """Key blocks ``(BLA, BLB)`` of the one-chunk short forward: ``(BL / 2, BL / 4)`` when ``L
    <= 3 BL / 4`` and ``BL >= 64`` (ODMT's L = 81: 64 + 32 keys instead of 128; sm_90 compile
    at D = 64: 1,006 instead of 1,097 instructions a pair, 48 exponentials a thread instead
    of 64, 184 registers instead of 198), else ``(BL, 0)``. The chunked path ignores them."""
    if block_len >= 64 and 4 * length <= 3 * block_len:
        return block_len // 2, block_len // 4
    return block_len, 0


# The one-chunk short forward splits its query rows like its keys (``_query_blocks``): at L =
# 81, 96 x 96 scores a pair instead of 128 x 96. sm_90 compile (Triton 3.6), per pair: 328K
# thread-instructions (4 warps, 254 registers, no spills; 10.4K exponentials) against the
# default's 436K (8 warps at 128 registers, 48 B of spills; 13.6K), with dropout 524K against
# 815K -- counts from before the mask moved into the score dot, which narrowed the gap
# (kernels/DESIGN.md). Off until a GPU run times it (the benchmark times both: ``rows2_`` keys).
_SPLIT_QUERIES = False


def _query_blocks(length: int, block_len: int) -> tuple[int, int]:
    """Query blocks ``(BQA, BQB)`` of the one-chunk short forward: the key split of
    :func:`_key_blocks` applied to the rows when ``_SPLIT_QUERIES`` (ODMT's L = 81: rows 64 +
    32 instead of 128, so 96 x 96 scores a pair instead of 128 x 96), else ``(BL, 0)``."""
    return _key_blocks(length, block_len) if _SPLIT_QUERIES else (block_len, 0)


def _fwd_blocks(length: int, block_len: int) -> dict:
    """The key and query blocks of a one-chunk short forward launch (``BLA``, ``BLB``, ``BQA``,
    ``BQB``); the chunked path ignores them."""
    (bla, blb), (bqa, bqb) = _key_blocks(length, block_len), _query_blocks(length, block_len)
    return dict(BLA=bla, BLB=blb, BQA=bqa, BQB=bqb)


def _launch_short(
    kind: str, kernel, bh: int, length: int, head_dim: int, args: tuple, meta: dict
) -> tuple[int, ...] | None:
    """Launch a short kernel with the first configuration that fits and return it; None if
    none does."""
    block_len = max(16, next_power_of_2(length))
    cache_key = (
        kind, block_len, head_dim, args[0].dtype, meta["DROPOUT"], meta.get("MASK_DOT", False),
        kind == "fwd_short" and _SPLIT_QUERIES,
    )  # fmt: skip
    if kind in _OVERRIDE:
        candidates = [_OVERRIDE[kind]]
    elif cache_key in _CHOSEN:
        candidates = [_CHOSEN[cache_key]]
    else:
        candidates = _short_configs(kind, length, head_dim)
    for config in candidates:
        chunk, warps, stages, per_sm, maxnreg = config
        persistent = per_sm > 0 and head_dim <= chunk  # the chunked path takes one pair a program
        programs = min(bh, per_sm * _num_sms(args[0].device)) if persistent else bh
        blocks = _fwd_blocks(length, block_len) if kind == "fwd_short" else {}
        try:
            kernel[(programs,)](
                *args, BL=block_len, BD=chunk, num_warps=warps, num_stages=stages, maxnreg=maxnreg or None,
                **blocks, **meta,
            )  # fmt: skip
        except OutOfResources:  # shared memory / registers: try the next, smaller config
            continue
        if kind not in _OVERRIDE:
            _CHOSEN[cache_key] = config
        return config
    return None


# With several head-dim chunks the short backward can run split in two launches: the pair's
# kernel computes S, P, dP, dV and stores dS (input dtype, ``(B*H, L, BL)``, 69 MB at 2 x 384,
# freed after the call) instead of running the dQ / dK pass itself; ``_attn_bwd_dqdk_kernel``
# then computes dQ and dK over (pair, group of chunks) programs. Run 6 (H100, 2 x 384, bf16)
# timed both: fwd+bwd 1,077 us fused against 1,140 us split (1,103 with four stages, 1,122
# with the best dQ/dK tiles), so the fused form is the default; True runs the split one
# (the benchmark times both).
_SPLIT_BWD = False


def _dqdk_configs(head_dim: int, chunk: int) -> list[tuple[int, int, int]]:
    """Candidate ``(chunks_per_program, num_warps, num_stages)`` of ``_attn_bwd_dqdk_kernel``:
    two chunks a program (three programs a pair at 384 = 6 x 64), 8 warps (96 registers, no
    spills, 48 KB of shared memory at one stage in the sm_90 compile: two programs an SM),
    two stages; the fallback one stage."""
    group = min(2, cdiv(head_dim, chunk))
    return [(group, 8, 2), (group, 8, 1)]


def _launch_dqdk(q, k, ds, dq, dk, length: int, head_dim: int, chunk: int) -> None:
    block_len = max(16, next_power_of_2(length))
    candidates = [_OVERRIDE["dqdk"]] if "dqdk" in _OVERRIDE else _dqdk_configs(head_dim, chunk)
    last_error: Exception | None = None
    for group, warps, stages in candidates:
        n_group = cdiv(head_dim, group * chunk)
        try:
            _attn_bwd_dqdk_kernel[(ds.shape[0] * n_group,)](
                q, k, ds, dq, dk,
                *_strides(q), *_strides(k), *_strides(dq), *_strides(dk),
                q.shape[1], length, n_group,
                HEAD_DIM=head_dim, BL=block_len, BD=chunk, GROUP_D=group * chunk, PREC=_precision(q.dtype),
                num_warps=warps, num_stages=stages,
            )  # fmt: skip
        except OutOfResources as err:
            last_error = err
            continue
        return
    raise RuntimeError(f"id_masked_attention: no dQ/dK configuration fits this device ({last_error})")


def _check_device(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            "the Triton attention kernel needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
            f"set before triton is imported; got a tensor on {q.device}"
        )
    check_interpreter()


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _pad_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if key_padding_mask is None:
        return q, 0, 0  # never read (HAS_PAD=False)
    # int32, not bytes: a 4-byte element can travel by asynchronous copy, so the software
    # pipeline of the persistent short kernels loads the next pairs' padding rows ahead too
    pad = key_padding_mask.to(torch.int32)
    return pad, pad.stride(0), pad.stride(1)


# The short kernels (L <= 128) add the mask to the scores through the score dot: one more
# 16-wide step, ``q_mask @ k_mask`` = 0 on allowed pairs and <= -1e30 elsewhere, in place of
# a select and its predicate logic on every element of the score tile (about 3.5
# instructions an element in the sm_90 compile: with the changes beside it, a quarter of the
# forward's and of the backward's instructions a pair at 12 x 64, a fifth at 2 x 384;
# kernels/DESIGN.md). It needs an input dtype that holds -1e30 and a dot on
# the tensor cores: bf16 (fp16 tops out at 65,504; fp32's exact dot runs on the FMA units,
# where a 16-wide step costs more than the select -- the interpreter takes it in fp32, so the
# CPU tests cover the form), and a positive scale that keeps -1e30 * scale far below any
# score. Non-finite values in a masked key then reach the scores as they would through an
# additive mask (the select would drop them). False keeps the select everywhere.
_MASK_DOT = True


def _mask_in_dot(dtype: torch.dtype, scale: float, on_gpu: bool) -> bool:
    """Whether the short kernels take the mask through the score dot (see ``_MASK_DOT``)."""
    if not _MASK_DOT or scale < 2.0**-40:
        return False
    return dtype == torch.bfloat16 or (dtype == torch.float32 and not on_gpu)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    id_index: int,
    dropout_p: float,
    scale: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(q)
    batch, heads, length, head_dim = q.shape
    out = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    bd0, bd1 = _split_head_dim(head_dim)
    pad, spb, spl = _pad_arg(key_padding_mask, q)
    dropout = dropout_p > 0.0
    meta = dict(
        HEAD_DIM=head_dim, BD0=bd0, BD1=bd1, HAS_PAD=key_padding_mask is not None,
        DROPOUT=dropout, PREC=_precision(q.dtype),
    )

    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(out), spb, spl)
    if length <= _SHORT_MAX_FWD and head_dim >= _SHORT_FWD_MIN_HEAD_DIM:
        short_meta = {key: meta[key] for key in ("HEAD_DIM", "HAS_PAD", "DROPOUT", "PREC")}
        short_meta["SCALE_IN_EXP"] = scale > 0.0  # (the one-chunk path's raw-score maxima)
        short_meta["MASK_DOT"] = _mask_in_dot(q.dtype, scale, q.is_cuda)
        short_args = (q, k, v, out, lse, pad, *strides, batch * heads, heads, length, id_index, scale * _LOG2E, dropout_p, seed)
        config = _launch_short("fwd_short", _attn_fwd_short_kernel, batch * heads, length, head_dim, short_args, short_meta)
        if config is not None:
            return out, lse

    def args(n_blk: int) -> tuple:
        return (q, k, v, out, lse, pad, *strides, heads, length, n_blk, id_index, scale * _LOG2E, dropout_p, seed)

    _launch("fwd", _attn_fwd_kernel, batch * heads, length, bd0 + bd1, q.dtype, args, meta)
    return out, lse


def _attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    id_index: int,
    dropout_p: float,
    scale: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(q)
    batch, heads, length, head_dim = q.shape
    dq = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, length, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, heads, length, head_dim), dtype=v.dtype, device=q.device)
    if q.numel() == 0:
        return dq, dk, dv
    grad_out = grad_out.to(q.dtype)
    lse = lse.contiguous()
    bd0, bd1 = _split_head_dim(head_dim)
    pad, spb, spl = _pad_arg(key_padding_mask, q)
    meta = dict(
        HEAD_DIM=head_dim, BD0=bd0, BD1=bd1, HAS_PAD=key_padding_mask is not None,
        DROPOUT=dropout_p > 0.0, PREC=_precision(q.dtype),
    )
    if length <= _SHORT_MAX_BWD:
        split = _SPLIT_BWD and head_dim > _head_chunk(head_dim)
        # dS scratch, rows padded to the kernels' BL: unmasked columns, vector loads and stores
        block_len = max(16, next_power_of_2(length))
        ds = torch.empty((batch * heads, length, block_len), dtype=q.dtype, device=q.device) if split else dq
        short_meta = {key: meta[key] for key in ("HEAD_DIM", "HAS_PAD", "DROPOUT", "PREC")}
        short_args = (
            q, k, v, grad_out, lse, dq, dk, dv, pad, ds,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
            *_strides(dq), *_strides(dk), *_strides(dv), spb, spl,
            batch * heads, heads, length, id_index, scale * _LOG2E, scale, dropout_p, seed,
        )
        config = _launch_short(
            "bwd_short", _attn_bwd_short_kernel, batch * heads, length, head_dim, short_args,
            dict(short_meta, STORE_DS=split, MASK_DOT=_mask_in_dot(q.dtype, scale, q.is_cuda)),
        )
        if config is not None:
            # with a chunk as wide as D (an override) the kernel ran its one-chunk path: all done
            if split and head_dim > config[0]:
                _launch_dqdk(q, k, ds, dq, dk, length, head_dim, config[0])
            return dq, dk, dv
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    common = (heads, length)
    tail = (id_index, scale * _LOG2E, scale, dropout_p, seed)

    def dq_args(n_blk: int) -> tuple:
        return (
            q, k, v, out, grad_out, lse, delta, dq, pad,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out),
            *_strides(dq), spb, spl, *common, n_blk, *tail,
        )

    def dkdv_args(n_blk: int) -> tuple:
        return (
            q, k, v, grad_out, lse, delta, dk, dv, pad,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
            *_strides(dk), *_strides(dv), spb, spl, *common, n_blk, *tail,
        )

    width = bd0 + bd1
    _launch("dq", _attn_bwd_dq_kernel, batch * heads, length, width, q.dtype, dq_args, meta)
    _launch("dkdv", _attn_bwd_dkdv_kernel, batch * heads, length, width, q.dtype, dkdv_args, meta)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# Custom ops and autograd
# --------------------------------------------------------------------------------------


@torch.library.custom_op("odmt::id_masked_attention", mutates_args=())
def _id_masked_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    id_index: int,
    dropout_p: float,
    scale: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(B, H, L, D)`` and log2-domain log-sum-exp ``(B, H, L)`` float32. ``seed``: the
    dropout seed, a one-element int64 tensor on the inputs' device (read only when
    ``dropout_p > 0``)."""
    with on_device_of(q):
        return _attention_forward(q, k, v, key_padding_mask, id_index, dropout_p, scale, seed)


@_id_masked_attention_op.register_fake
def _(q, k, v, key_padding_mask, id_index, dropout_p, scale, seed):
    batch, heads, length, head_dim = q.shape
    return q.new_empty((batch, heads, length, head_dim)), q.new_empty((batch, heads, length), dtype=torch.float32)


@torch.library.custom_op("odmt::id_masked_attention_backward", mutates_args=())
def _id_masked_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    id_index: int,
    dropout_p: float,
    scale: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`_id_masked_attention_op`'s output."""
    with on_device_of(q):
        return _attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, id_index, dropout_p, scale, seed)


@_id_masked_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, id_index, dropout_p, scale, seed):
    shape = q.shape
    return q.new_empty(shape), k.new_empty(shape), v.new_empty(shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, id_index, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.attrs = (id_index, dropout_p, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    id_index, dropout_p, scale = ctx.attrs
    dq, dk, dv = _id_masked_attention_backward_op(
        grad_out, q, k, v, out, lse, key_padding_mask, id_index, dropout_p, scale, seed
    )
    return dq, dk, dv, None, None, None, None, None


_id_masked_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _DirectAttention(torch.autograd.Function):
    """The custom op's forward and autograd formula without the dispatcher, for eager calls
    on plain tensors (:func:`~._device.direct_eager_call`): same launch functions, same saved
    tensors, less host time a call."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, id_index, dropout_p, scale, seed):
        with on_device_of(q):
            out, lse = _attention_forward(q, k, v, key_padding_mask, id_index, dropout_p, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
        ctx.attrs = (id_index, dropout_p, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
        id_index, dropout_p, scale = ctx.attrs
        with on_device_of(q):
            dq, dk, dv = _attention_backward(
                grad_out, q, k, v, out, lse, key_padding_mask, id_index, dropout_p, scale, seed
            )
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def id_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    id_index: int | None,
    dropout_p: float,
    scale: float | None,
    seed: int | torch.Tensor,
) -> torch.Tensor:
    """Fused ``softmax(q k^T * scale + mask) v`` with the ID rule, differentiable in q, k, v.

    Args:
        q, k, v: ``(B, H, L, D)``, same dtype (float32, float16 or bfloat16) and device; any
            strides. ``16 <= D <= 512`` is the tested range.
        key_padding_mask: ``(B, L)`` bool, True = padding key, or None.
        id_index: position of the ID token (only the ID query attends the ID key), or None.
        dropout_p: dropout probability on the attention probabilities (0 = none).
        scale: score scale; None means ``D ** -0.5``.
        seed: seed of the dropout mask (only used when ``dropout_p > 0``): an int, or a
            one-element integer tensor, e.g. drawn on the device just before the call
            (``torch.randint``), which a CUDA graph then redraws at every replay; the
            kernels read it from device memory. Taken modulo ``2**31``.

    Returns ``(B, H, L, D)`` in the input dtype; rows with no attendable key are zero. Inputs
    are assumed validated (``odmt_components.ops`` does it); only the basics are checked here.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one dtype among float16/bfloat16/float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, _, length, head_dim = q.shape
    if key_padding_mask is not None and (key_padding_mask.shape != (batch, length) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be a ({batch}, {length}) bool tensor, got {tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")
    if id_index is None:
        id_index = -1
    elif not 0 <= int(id_index) < length:
        raise ValueError(f"id_index must be in [0, {length}), got {id_index}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    # without dropout the kernels never read the seed: an uninitialised element, no launch
    seed = _seed_tensor(seed, q.device) if dropout_p > 0.0 else torch.empty(1, dtype=torch.int64, device=q.device)
    args = (q, k, v, key_padding_mask, int(id_index), float(dropout_p), scale, seed)
    if direct_eager_call(q, k, v, key_padding_mask, seed):
        return _DirectAttention.apply(*args)
    return _id_masked_attention_op(*args)[0]


def _seed_tensor(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The dropout seed as the kernels read it: ``(1,)`` int64 on ``device``, modulo ``2**31``."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seed must be an int or a one-element int tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64).remainder(2**31)
    # a fill on the device, not a copy from host memory (which would wait for the device)
    return torch.full((1,), int(seed) % (2**31), dtype=torch.int64, device=device)


def dropout_keep_mask(
    batch: int, heads: int, length: int, dropout_p: float, seed: int | torch.Tensor, device: torch.device | str
) -> torch.Tensor:
    """The ``(B, H, L, L)`` bool keep-mask the kernels draw for ``(dropout_p, seed)``.

    Built by a small Triton kernel calling the same random-number function as the attention
    kernels, so ``id_masked_attention_reference(..., dropout_p=p, dropout_keep=mask)`` replays
    the kernel's dropout exactly. For tests; the attention kernels never materialise it.
    """
    out = torch.zeros((batch, heads, length, length), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.bool()
    _check_device(out)
    _keep_mask_kernel[(batch * heads,)](out, length, float(dropout_p), _seed_tensor(seed, device), BM=16, BN=16)
    return out.bool()


from ._cache_keys import settle_cache_keys  # noqa: E402

settle_cache_keys(globals().values())

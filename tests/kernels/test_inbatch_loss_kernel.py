"""Triton in-batch loss kernels (``kernels/inbatch_loss.py``) against the float64 reference.

Runs under ``TRITON_INTERPRET=1`` on the CPU (tests/conftest.py sets it), fp32 and fp16 only
(bf16 is silently wrong in the interpreter; the GPU benchmark checks it); on a CUDA machine
the same tests run the compiled kernels (inputs are drawn on the CPU from seeded generators,
then moved to ``DEVICE``; brute-force definitions compare on the CPU). Shapes stay tiny:
the interpreter costs about a second per launch and the kernels use 16-wide tiles there, so
R, N <= 40 and d <= 48 still cross several tile borders and the d tail.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from odmt_components.kernels import inbatch_loss as K
from odmt_components.kernels.reference import (
    BRANCHES,
    DistillationLosses,
    debiased_inbatch_cross_entropy_reference,
    mutual_distillation_reference,
)

PAD = 0
IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _drop_lists_at_every_size(monkeypatch):
    """The single-branch kernels read drop lists from R * N = 2^30 on a GPU (always in the
    interpreter): the tests' tiny batches take them on a GPU too, unless a test says not."""
    monkeypatch.setattr(K, "_DL_MIN_PAIRS", 0)

# Tolerances, stated once: (atol, rtol) for forward values and for gradients. atol is scaled by
# max(1, max|expected|) of the compared tensor and, for loss values, by the size of what they
# are computed from (``_value_scale``: each row's loss is a difference of log-sum-exps of
# scores that large, so fp32 rounds it at that size even where the loss is 0). fp16 gradients
# go through an fp16 cast of dL/dz before the tensor-core dot and an fp16 output, hence the
# looser bound.
TOL = {
    torch.float32: {"fwd": (1e-5, 1e-5), "grad": (1e-5, 1e-4)},
    torch.float16: {"fwd": (1e-4, 1e-4), "grad": (4e-3, 1e-2)},
}


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str, what: str, size: float = 1.0
):
    atol, rtol = TOL[dtype][kind]
    expected = expected.detach().double()
    scale = max(1.0, size, expected.abs().max().item() if expected.numel() else 1.0)
    torch.testing.assert_close(
        actual.detach().double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _make_batch(
    seed: int,
    R: int,
    N: int,
    d: int,
    n_items: int,
    *,
    pad_frac: float,
    ignore_frac: float,
    excl: str,
    S: int,
    lq: str,
    all_but_target_rows: int,
    dtype: torch.dtype,
    branches: int,
    scale: float = 0.4,
):
    """Random in-batch problem: duplicates among candidates (ids from 1..n_items), padding
    columns (id 0), ignored rows, exclusion lists, log_q, and some rows where every column but
    the target is excluded."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.randint(1, n_items + 1, (N,), generator=g)
    cand[torch.rand(N, generator=g) < pad_frac] = PAD
    real = (cand != PAD).nonzero().flatten()
    if real.numel() == 0:
        target = torch.full((R,), IGNORE, dtype=torch.long)
    else:
        target = real[torch.randint(0, real.numel(), (R,), generator=g)]
        target[torch.rand(R, generator=g) < ignore_frac] = IGNORE
    if all_but_target_rows:
        S = max(S, n_items)
    if excl == "none":
        exclude = None
    else:
        base = torch.randint(0, n_items + 1, (R, S), generator=g)
        if all_but_target_rows:
            base[:all_but_target_rows] = torch.arange(1, S + 1).clamp(max=n_items)
        base = base.to(DEVICE)  # before the views below, whose strides are the point
        if excl == "full":
            exclude = base
        elif excl == "expanded":  # one user's history shared by every row: stride 0 along rows
            exclude = base[:1].expand(R, S)
        else:  # "transposed": column-major storage
            exclude = base.t().contiguous().t()
    if lq == "none":
        log_q = None
    elif lq == "normal":
        log_q = torch.rand(N, generator=g).add(1e-3).log()
    else:  # extreme: very rare and very popular items side by side
        log_q = torch.where(torch.rand(N, generator=g) < 0.5, torch.tensor(-25.0), torch.tensor(-1e-4))
        log_q = log_q + torch.randn(N, generator=g)
    qs = [(scale * torch.randn(R, d, generator=g)).to(DEVICE, dtype) for _ in range(branches)]
    cs = [(scale * torch.randn(N, d, generator=g)).to(DEVICE, dtype) for _ in range(branches)]
    log_q = None if log_q is None else log_q.to(DEVICE)
    return qs, cs, target.to(DEVICE), cand.to(DEVICE), exclude, log_q


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


# --------------------------------------------------------------------------------------
# Single branch
# --------------------------------------------------------------------------------------


def _value_scale(qs, cs, target, log_q, reduction: str, temperature: float = 1.0) -> float:
    """The size a loss value is computed at: the largest |score| (float64) times the
    temperature (a distillation term is ``T^2`` times a difference of scores over ``T``) and,
    for ``reduction="sum"``, the number of rows summed."""
    z = max((q.double() @ c.double().T).abs().max().item() for q, c in zip(qs, cs, strict=True))
    if log_q is not None:
        z += log_q.double().abs().max().item()
    rows = int((target != IGNORE).sum()) if reduction == "sum" else 1
    return z * max(1.0, temperature) * max(1, rows)


def _check_ce(qs, cs, target, cand, exclude, log_q, reduction, dtype, seed=0, pad=PAD):
    q, c = _leaf(qs[0]), _leaf(cs[0])
    out = K.debiased_inbatch_cross_entropy(q, c, target, cand, exclude, log_q, pad, IGNORE, reduction)
    q64, c64 = _leaf(qs[0], torch.float64), _leaf(cs[0], torch.float64)
    ref = debiased_inbatch_cross_entropy_reference(
        q64,
        c64,
        target,
        cand,
        exclude,
        None if log_q is None else log_q.double(),
        pad_id=pad,
        ignore_index=IGNORE,
        reduction=reduction,
    )
    assert out.dtype == torch.float32 and out.shape == ref.shape
    _assert_close(out, ref, dtype, "fwd", "loss", _value_scale(qs, cs, target, log_q, reduction))
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    gq, gc = torch.autograd.grad((out * w.float()).sum(), (q, c))
    rq, rc = torch.autograd.grad((ref * w).sum(), (q64, c64))
    assert gq.dtype == dtype and gc.dtype == dtype
    _assert_close(gq, rq, dtype, "grad", "d queries")
    _assert_close(gc, rc, dtype, "grad", "d candidates")
    return out


@given(
    seed=st.integers(0, 2**16),
    R=st.integers(1, 40),
    N=st.integers(1, 40),
    d=st.integers(1, 48),
    # few items: duplicates everywhere (dense tiles, overflowing drop lists); many: sparse tiles
    n_items=st.one_of(st.integers(1, 10), st.integers(40, 400)),
    pad_frac=st.sampled_from([0.0, 0.2]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    excl=st.sampled_from(["none", "full", "expanded", "transposed"]),
    S=st.integers(0, 5),
    lq=st.sampled_from(["none", "normal", "extreme"]),
    all_but_target_rows=st.integers(0, 2),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_ce_matches_reference(
    seed, R, N, d, n_items, pad_frac, ignore_frac, excl, S, lq, all_but_target_rows, dtype, reduction
):
    qs, cs, target, cand, exclude, log_q = _make_batch(
        seed,
        R,
        N,
        d,
        n_items,
        pad_frac=pad_frac,
        ignore_frac=ignore_frac,
        excl=excl,
        S=S,
        lq=lq,
        all_but_target_rows=all_but_target_rows,
        dtype=dtype,
        branches=1,
    )
    _check_ce(qs, cs, target, cand, exclude, log_q, reduction, dtype, seed)


def test_ce_row_with_only_the_target_left_has_zero_loss_and_gradient():
    qs, cs, target, cand, exclude, log_q = _make_batch(
        3,
        20,
        24,
        20,
        6,
        pad_frac=0.1,
        ignore_frac=0.0,
        excl="full",
        S=2,
        lq="normal",
        all_but_target_rows=4,
        dtype=torch.float32,
        branches=1,
    )
    out = _check_ce(qs, cs, target, cand, exclude, log_q, "none", torch.float32)
    assert torch.all(out[:4] == 0)
    q = _leaf(qs[0])
    K.debiased_inbatch_cross_entropy(q, cs[0], target, cand, exclude, log_q, PAD, IGNORE, "sum").backward()
    assert torch.all(q.grad[:4] == 0)


def test_ce_all_rows_ignored_gives_zero_mean_and_zero_gradients():
    qs, cs, target, cand, exclude, log_q = _make_batch(
        4,
        17,
        19,
        9,
        5,
        pad_frac=0.0,
        ignore_frac=1.0,
        excl="full",
        S=2,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=1,
    )
    q, c = _leaf(qs[0]), _leaf(cs[0])
    out = K.debiased_inbatch_cross_entropy(q, c, target, cand, exclude, log_q, PAD, IGNORE, "mean")
    out.backward()
    assert out.item() == 0.0
    assert torch.all(q.grad == 0) and torch.all(c.grad == 0)


def test_ce_strided_inputs_match_contiguous_and_backward_is_deterministic():
    qs, cs, target, cand, exclude, log_q = _make_batch(
        5,
        33,
        35,
        40,
        8,
        pad_frac=0.1,
        ignore_frac=0.2,
        excl="expanded",
        S=4,
        lq="normal",
        all_but_target_rows=1,
        dtype=torch.float32,
        branches=1,
    )
    assert exclude.stride(0) == 0
    # queries stored transposed, candidates every other row of a bigger buffer, strided ids
    q_nc = _leaf(qs[0].t().contiguous().t())
    big = torch.zeros(2 * cs[0].shape[0], cs[0].shape[1] + 3, device=DEVICE)
    big[::2, 1 : 1 + cs[0].shape[1]] = cs[0]
    c_nc = big[::2, 1 : 1 + cs[0].shape[1]].detach().requires_grad_(True)
    cand_nc = torch.stack([cand, cand], 1)[:, 1]
    lq_nc = torch.stack([log_q, log_q], 1)[:, 0]
    target_nc = torch.stack([target, target], 1)[:, 0]
    assert not q_nc.is_contiguous() and not c_nc.is_contiguous() and not cand_nc.is_contiguous()
    out_nc = K.debiased_inbatch_cross_entropy(q_nc, c_nc, target_nc, cand_nc, exclude, lq_nc, PAD, IGNORE, "mean")
    out_nc.backward()
    ref = _check_ce(qs, cs, target, cand, exclude, log_q, "mean", torch.float32)
    torch.testing.assert_close(out_nc, ref, atol=1e-6, rtol=1e-6)
    q1, c1 = _leaf(qs[0]), _leaf(cs[0])
    K.debiased_inbatch_cross_entropy(q1, c1, target, cand, exclude, log_q, PAD, IGNORE, "mean").backward()
    torch.testing.assert_close(q_nc.grad, q1.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c_nc.grad, c1.grad, atol=1e-6, rtol=1e-6)
    q2, c2 = _leaf(qs[0]), _leaf(cs[0])
    K.debiased_inbatch_cross_entropy(q2, c2, target, cand, exclude, log_q, PAD, IGNORE, "mean").backward()
    assert torch.equal(q1.grad, q2.grad) and torch.equal(c1.grad, c2.grad)


@pytest.mark.parametrize("where", ["query", "candidate", "log_q"])
def test_ce_nan_input_gives_nan_loss(where):
    qs, cs, target, cand, exclude, log_q = _make_batch(
        6,
        9,
        11,
        8,
        30,
        pad_frac=0.0,
        ignore_frac=0.0,
        excl="full",
        S=1,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=1,
    )
    q, c = qs[0].clone(), cs[0].clone()
    if where == "query":
        q[2, 3] = math.nan
    elif where == "candidate":
        c[target[0], 0] = math.nan  # the target column is never excluded
    else:
        log_q = log_q.clone()
        log_q[target[0]] = math.nan
    out = K.debiased_inbatch_cross_entropy(q, c, target, cand, exclude, log_q, PAD, IGNORE, "mean")
    assert torch.isnan(out)


# --------------------------------------------------------------------------------------
# Three branches + distillation
# --------------------------------------------------------------------------------------


def _check_odmt(qs, cs, target, cand, exclude, log_q, T, detach, form, reduction, dtype, seed=0):
    q = [_leaf(t) for t in qs]
    c = [_leaf(t) for t in cs]
    out = K.mutual_distillation_loss(*q, *c, target, cand, exclude, log_q, T, detach, form, PAD, IGNORE, reduction)
    assert isinstance(out, DistillationLosses)
    q64 = {m: _leaf(t, torch.float64) for m, t in zip(BRANCHES, qs, strict=True)}
    c64 = {m: _leaf(t, torch.float64) for m, t in zip(BRANCHES, cs, strict=True)}
    ref = mutual_distillation_reference(
        q64,
        c64,
        target,
        cand,
        exclude,
        None if log_q is None else log_q.double(),
        temperature=T,
        detach_teacher=detach,
        form=form,
        pad_id=PAD,
        ignore_index=IGNORE,
        reduction=reduction,
    )
    size = _value_scale(qs, cs, target, log_q, reduction, T)
    for name, a, b in zip(DistillationLosses._fields, out, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == ()
        _assert_close(a, b, dtype, "fwd", name, size)
    w = torch.randn(len(ref), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad(sum(float(wi) * x for wi, x in zip(w, out, strict=True)), q + c)
    ref_grads = torch.autograd.grad(sum(wi * x for wi, x in zip(w, ref, strict=True)), [*q64.values(), *c64.values()])
    names = [f"d q_{m}" for m in BRANCHES] + [f"d c_{m}" for m in BRANCHES]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert a.dtype == dtype
        _assert_close(a, b, dtype, "grad", name)
    return out


# the tiny problems the hypothesis tests draw (16-wide tiles under the interpreter: R, N <=
# 40 and d <= 48 cross several tile borders and the d tail); few items: duplicates everywhere
SMALL_SHAPES = dict(
    seed=st.integers(0, 2**16),
    R=st.integers(1, 40),
    N=st.integers(1, 40),
    d=st.integers(1, 48),
    n_items=st.integers(1, 10),
)


@given(
    **SMALL_SHAPES,
    pad_frac=st.sampled_from([0.0, 0.2]),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    excl=st.sampled_from(["none", "full", "expanded"]),
    S=st.integers(0, 4),
    lq=st.sampled_from(["none", "normal", "extreme"]),
    all_but_target_rows=st.integers(0, 2),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    T=st.floats(0.1, 2.0),
    detach=st.booleans(),
    form=st.sampled_from(["kl", "ce"]),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_mutual_distillation_matches_reference(
    seed, R, N, d, n_items, pad_frac, ignore_frac, excl, S, lq, all_but_target_rows, dtype, T, detach, form, reduction
):
    qs, cs, target, cand, exclude, log_q = _make_batch(
        seed,
        R,
        N,
        d,
        n_items,
        pad_frac=pad_frac,
        ignore_frac=ignore_frac,
        excl=excl,
        S=S,
        lq=lq,
        all_but_target_rows=all_but_target_rows,
        dtype=dtype,
        branches=3,
    )
    _check_odmt(qs, cs, target, cand, exclude, log_q, T, detach, form, reduction, dtype, seed)


@pytest.mark.parametrize("detach,form", [(True, "kl"), (False, "ce")])
def test_mutual_distillation_fixed_cases(detach, form):
    """Both teacher modes and forms on a problem crossing tiles in rows, columns and d, with
    duplicates, padding, an expanded history, extreme log_q, rows left with the target only."""
    qs, cs, target, cand, exclude, log_q = _make_batch(
        7,
        34,
        37,
        33,
        9,
        pad_frac=0.15,
        ignore_frac=0.2,
        excl="expanded",
        S=3,
        lq="extreme",
        all_but_target_rows=2,
        dtype=torch.float32,
        branches=3,
        scale=0.8,
    )
    _check_odmt(qs, cs, target, cand, exclude, log_q, 0.1, detach, form, "mean", torch.float32)


def test_mutual_distillation_nan_input_gives_nan_loss():
    qs, cs, target, cand, exclude, log_q = _make_batch(
        8,
        9,
        11,
        8,
        30,
        pad_frac=0.0,
        ignore_frac=0.0,
        excl="full",
        S=1,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=3,
    )
    qs[1] = qs[1].clone()
    qs[1][0, 0] = math.nan
    out = K.mutual_distillation_loss(*qs, *cs, target, cand, exclude, log_q, 0.5, True, "kl", PAD, IGNORE, "mean")
    assert torch.isnan(out.ce_text) and torch.isnan(out.kl_id_text) and torch.isnan(out.kl_ensemble_id)


# --------------------------------------------------------------------------------------
# Custom-op machinery, compile, bad arguments, launch heuristic
# --------------------------------------------------------------------------------------


def _small(branches: int):
    qs, cs, target, cand, exclude, log_q = _make_batch(
        9,
        6,
        7,
        16,
        4,
        pad_frac=0.1,
        ignore_frac=0.2,
        excl="expanded",
        S=2,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=branches,
    )
    target[1] = IGNORE
    return [_leaf(t) for t in qs], [_leaf(t) for t in cs], target, cand, exclude, log_q


def test_opcheck_debiased_inbatch_ce():
    qs, cs, target, cand, exclude, log_q = _small(1)
    torch.library.opcheck(
        torch.ops.odmt.debiased_inbatch_ce.default, (qs[0], cs[0], target, cand, exclude, log_q, PAD, IGNORE)
    )
    torch.library.opcheck(
        torch.ops.odmt.debiased_inbatch_ce.default, (qs[0], cs[0], target, cand, None, None, PAD, IGNORE)
    )


def test_opcheck_mutual_distillation():
    qs, cs, target, cand, exclude, log_q = _small(3)
    torch.library.opcheck(
        torch.ops.odmt.mutual_distillation.default,
        (*qs, *cs, target, cand, exclude, log_q, 0.5, True, False, PAD, IGNORE),
    )


def test_torch_compile_over_the_ops():
    qs, cs, target, cand, exclude, log_q = _small(3)

    def loss_fn(q_id, q_text, q_image, c_id, c_text, c_image):
        parts = K.mutual_distillation_loss(
            q_id,
            q_text,
            q_image,
            c_id,
            c_text,
            c_image,
            target,
            cand,
            exclude,
            log_q,
            0.5,
            False,
            "kl",
            PAD,
            IGNORE,
            "mean",
        )
        single = K.debiased_inbatch_cross_entropy(q_id, c_id, target, cand, exclude, log_q, PAD, IGNORE, "sum")
        return parts.ce + 0.5 * parts.kl + 0.1 * single

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager = loss_fn(*qs, *cs)
    eager_grads = torch.autograd.grad(eager, qs + cs)
    got = compiled(*qs, *cs)
    got_grads = torch.autograd.grad(got, qs + cs)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    qs, cs, target, cand, exclude, log_q = _small(3)
    with pytest.raises(ValueError, match="reduction"):
        K.debiased_inbatch_cross_entropy(qs[0], cs[0], target, cand, exclude, log_q, PAD, IGNORE, "avg")
    args = (target, cand, exclude, log_q)
    with pytest.raises(ValueError, match="reduction"):
        K.mutual_distillation_loss(*qs, *cs, *args, 0.5, True, "kl", PAD, IGNORE, "none")
    with pytest.raises(ValueError, match="form"):
        K.mutual_distillation_loss(*qs, *cs, *args, 0.5, True, "js", PAD, IGNORE, "mean")
    with pytest.raises(ValueError, match="temperature"):
        K.mutual_distillation_loss(*qs, *cs, *args, 0.0, True, "kl", PAD, IGNORE, "mean")
    with pytest.raises(ValueError, match="width"):
        K.mutual_distillation_loss(qs[0], qs[1][:, :8], qs[2], *cs, *args, 0.5, True, "kl", PAD, IGNORE, "mean")
    with pytest.raises(TypeError, match="dtype"):
        K.mutual_distillation_loss(qs[0], qs[1].half(), qs[2], *cs, *args, 0.5, True, "kl", PAD, IGNORE, "mean")


@pytest.mark.parametrize(
    "kind,rows,cols,d",
    [
        ("fwd", 16384, 16384, 256),
        ("fwd", 1536, 1664, 768),
        ("dq", 65536, 65536, 128),
        ("dc", 1664, 1536, 768),
        ("fwd3", 1536, 1664, 768),
        ("fwd3", 16384, 16384, 256),
        ("dq3", 16384, 16384, 256),
        ("dc3", 1664, 1536, 1000),
    ],
)
def test_gpu_launch_heuristic_gives_tensor_core_tiles(kind, rows, cols, d):
    cfg = K._config(kind, rows, cols, d, interpret=False)
    for key in ("BLOCK_T", "BLOCK_W", "BLOCK_D", "BLOCK_DO"):
        value = cfg[key]
        assert value >= 16 and value & (value - 1) == 0, (key, value)
    assert cfg["BLOCK_D"] <= 64 and cfg["BLOCK_DO"] <= 256
    p2d = max(16, 1 << (d - 1).bit_length())
    assert cfg["FULL_D"] == (d <= 256)
    if cfg["FULL_D"]:  # one dot per score tile; the backward owns the whole width
        assert cfg["BLOCK_DO"] == p2d
    if d <= 256 and not kind.startswith("fwd"):  # scores recomputed once per backward kernel
        assert cfg["BLOCK_DO"] >= d
    assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] in (2, 3)


def test_forward_split_fills_the_gpu_at_paper_scale():
    """R = 1536 gives 24 row tiles: the column split must bring >= 2 programs per SM."""
    for kind in ("fwd", "fwd3"):
        cfg = K._config(kind, 1536, 1664, 768, interpret=False)
        row_tiles, col_tiles = -(-1536 // cfg["BLOCK_T"]), -(-1664 // cfg["BLOCK_W"])
        per = K._fwd_split(row_tiles, col_tiles, 132)
        assert row_tiles * -(-col_tiles // per) >= 2 * 132
    assert K._fwd_split(1024, 1024, 132) == 1024  # enough rows: one split
    assert K._fwd_split(3, 3, 0) == 3 and K._fwd_split(3, 3, 64) == 1


def test_launch_falls_back_deterministically_when_the_gpu_refuses_the_tiles():
    from triton.runtime.errors import OutOfResources

    calls = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **meta):
                calls.append((grid, meta))
                if meta["num_stages"] > 1 or meta["FULL_D"]:
                    raise OutOfResources(300000, 232448, "shared memory")

            return run

    def make(c):
        return K._bwd_grid(c, 16384, 256), ("arg",), K._tile_meta(c, True, True)

    cfg = K._config("dq3", 16384, 16384, 256, interpret=False)
    used, args = K._launch("fake", FakeKernel(), cfg, make, with_do=True)
    assert [c[1]["num_stages"] for c in calls] == [2, 1, 1]
    grid, meta = calls[-1]
    assert not meta["FULL_D"] and meta["BLOCK_DO"] == 128 and used["BLOCK_DO"] == 128
    assert grid == (16384 // meta["BLOCK_R"], 2) and args == ("arg",)
    calls.clear()

    class Refuses(FakeKernel):
        def __getitem__(self, grid):
            def run(*args, **meta):
                calls.append(meta)
                raise OutOfResources(300000, 232448, "shared memory")

            return run

    with pytest.raises(OutOfResources):
        K._launch("fake", Refuses(), cfg, make, with_do=True)
    assert len(calls) == len(K._fallbacks(cfg, True)) == 4


# --------------------------------------------------------------------------------------
# Kernel paths: full-width dot vs d chunks, column splits, resident vs chunked excluded ids,
# int32 vs int64 id compares
# --------------------------------------------------------------------------------------


@pytest.fixture(params=["full_d", "chunked_d"])
def d_path(request, monkeypatch):
    """The whole row tile in one dot, or d walked in chunks by the kernels' own dots (the
    score slabs of cuBLAS, the default past the full width, have their own tests:
    ``test_score_slabs_*``)."""
    if request.param == "chunked_d":
        monkeypatch.setattr(K, "_FULL_D_MAX", 0)
        monkeypatch.setattr(K, "_SCORE_GEMM", False)
    return request.param


@pytest.fixture(params=["one_split", "many_splits"])
def split_path(request, monkeypatch):
    monkeypatch.setattr(K, "_SM_OVERRIDE", 0 if request.param == "one_split" else 64)
    return request.param


@pytest.fixture(params=["dc_gemm", "dq_dc_gemm", "dc_kernel"])
def dc_path(request, monkeypatch):
    """dC from the dz slabs the dQ kernels store (cuBLAS; here at least two slabs: the
    candidates span three 16-wide tiles), dQ from them too (the kernels form dz only), or
    the column-wise dC kernels."""
    monkeypatch.setattr(K, "_DC_GEMM", request.param != "dc_kernel")
    monkeypatch.setattr(K, "_DQ_GEMM", request.param == "dq_dc_gemm")
    return request.param


@pytest.mark.parametrize("excl,S", [("none", 0), ("full", 0), ("expanded", 3), ("transposed", 7), ("full", 21)])
def test_ce_paths_match_reference(d_path, split_path, dc_path, excl, S):
    """S = 0 given as an empty (R, 0) tensor, S not a power of two, S > 16 (chunked ids)."""
    qs, cs, target, cand, exclude, log_q = _make_batch(
        11 + S,
        35,
        37,
        40,
        30,
        pad_frac=0.1,
        ignore_frac=0.2,
        excl=excl,
        S=S,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=1,
    )
    if excl != "none" and S == 0:
        assert exclude.shape == (35, 0)
    _check_ce(qs, cs, target, cand, exclude, log_q, "none", torch.float32)


@pytest.mark.parametrize("S,detach", [(5, False), (20, True)])
def test_mutual_distillation_paths_match_reference(d_path, split_path, dc_path, S, detach):
    qs, cs, target, cand, exclude, log_q = _make_batch(
        12 + S,
        34,
        37,
        33,
        25,
        pad_frac=0.1,
        ignore_frac=0.2,
        excl="expanded" if detach else "full",
        S=S,
        lq="extreme",
        all_but_target_rows=1,
        dtype=torch.float32,
        branches=3,
    )
    _check_odmt(qs, cs, target, cand, exclude, log_q, 0.7, detach, "kl", "sum", torch.float32)


@pytest.mark.parametrize("branches", [1, 3])
def test_ignored_rows_holding_nan_or_inf_reach_no_gradient(d_path, split_path, dc_path, branches):
    """Rows whose target is ``ignore_index`` may hold anything (a backbone's padding positions:
    NaN, inf): loss and every gradient are those of the same batch with such rows zeroed, on
    both backward kernels (the row-wise one masks its loads, the column-wise one reads zeroed
    copies), at full width and in d chunks, with and without split walks."""
    _check_ignored_rows_reach_nothing(branches, N=33, d=40, dtype=torch.float32, detach=True)


def _check_ignored_rows_reach_nothing(branches: int, *, N: int, d: int, dtype: torch.dtype, detach: bool):
    """Loss and gradients of a batch whose ignored rows hold NaN / inf are those of the
    batch with those rows zeroed, finite, and 0 on those rows' queries."""
    qs, cs, target, cand, exclude, log_q = _make_batch(
        41, 30, N, d, 25, pad_frac=0.1, ignore_frac=0.3, excl="full", S=4, lq="normal",
        all_but_target_rows=0, dtype=dtype, branches=branches,
    )  # fmt: skip
    ignored = target == IGNORE
    assert 0 < int(ignored.sum()) < len(target)
    poisoned = [q.clone() for q in qs]
    for i, q in enumerate(poisoned):
        q[ignored] = math.nan if i != 1 else math.inf
        q[ignored.nonzero()[0], 0] = -math.inf
    zeroed = [torch.where(ignored[:, None], 0.0, q) for q in qs]

    def loss_and_grads(queries):
        q_leaves, c_leaves = [_leaf(q) for q in queries], [_leaf(c) for c in cs]
        if branches == 1:
            loss = K.debiased_inbatch_cross_entropy(
                q_leaves[0], c_leaves[0], target, cand, exclude, log_q, PAD, IGNORE, "sum"
            )
        else:
            out = K.mutual_distillation_loss(
                *q_leaves, *c_leaves, target, cand, exclude, log_q, 0.5, detach, "kl", PAD, IGNORE, "sum"
            )
            loss = out.ce + out.kl
        return loss, torch.autograd.grad(loss, q_leaves + c_leaves)

    got_loss, got_grads = loss_and_grads(poisoned)
    want_loss, want_grads = loss_and_grads(zeroed)
    torch.testing.assert_close(got_loss, want_loss)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    for got in got_grads[:branches]:
        assert torch.equal(got[ignored], torch.zeros_like(got[ignored]))


def _wide_ids(cand: torch.Tensor, exclude: torch.Tensor, *, wide_candidates: bool):
    """Ids past int32: excluded ids that alias an in-batch id in their low 32 bits (a plain
    int32 cast would wrongly exclude it), and, optionally, candidates past int32 too."""
    big = 2**40
    exclude = exclude.clone()
    exclude[:, 0] = exclude[:, 0] + 2**32  # aliases exclude[:, 0] after truncation
    exclude[::3, 1] = big + 5  # matches nothing, or a wide candidate below
    if wide_candidates:
        cand = cand.clone()
        cand[1::4] = torch.where(cand[1::4] != PAD, cand[1::4] + big, cand[1::4])
        cand[2] = big + 5
    return cand, exclude


@pytest.mark.parametrize("wide_candidates", [False, True])
def test_ids_past_int32_are_compared_exactly(d_path, wide_candidates):
    qs, cs, target, cand, exclude, log_q = _make_batch(
        13,
        33,
        40,
        24,
        12,
        pad_frac=0.1,
        ignore_frac=0.1,
        excl="full",
        S=4,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=3,
    )
    cand, exclude = _wide_ids(cand, exclude, wide_candidates=wide_candidates)
    target = torch.where((target >= 0) & (cand[target.clamp(min=0)] == PAD), IGNORE, target)
    _check_ce(qs, cs, target, cand, exclude, log_q, "none", torch.float32)
    _check_odmt(qs, cs, target, cand, exclude, log_q, 1.3, False, "ce", "mean", torch.float32)


def test_pad_id_past_int32_and_int32_id_tensors():
    qs, cs, target, cand, exclude, log_q = _make_batch(
        14,
        30,
        33,
        20,
        8,
        pad_frac=0.2,
        ignore_frac=0.2,
        excl="expanded",
        S=3,
        lq="none",
        all_but_target_rows=1,
        dtype=torch.float32,
        branches=1,
    )
    wide_pad = 2**35
    cand_w = torch.where(cand == PAD, wide_pad, cand)
    ex_w = torch.where(exclude == PAD, wide_pad, exclude)
    _check_ce(qs, cs, target, cand_w, ex_w, log_q, "none", torch.float32, pad=wide_pad)
    _check_ce(qs, cs, target.int(), cand.int(), exclude.int(), log_q, "sum", torch.float32)


def test_kernel_stats_report_only_compiled_launches():
    """Under the interpreter no compiled kernel exists, so nothing is recorded; on a GPU the
    benchmark prints the registers and spills of every kernel."""
    K.KERNEL_STATS.clear()
    qs, cs, target, cand, exclude, log_q = _small(1)
    K.debiased_inbatch_cross_entropy(qs[0], cs[0], target, cand, exclude, log_q, PAD, IGNORE, "mean").backward()
    if qs[0].device.type == "cpu":
        assert K.KERNEL_STATS == {}
    else:
        assert {"ce_fwd", "ce_combine", "ce_dq"} <= set(K.KERNEL_STATS)
        assert ("ce_dc" in K.KERNEL_STATS) is not K._DC_GEMM


@pytest.mark.parametrize("trans_s", [False, True])
@pytest.mark.parametrize("kind", ["dq", "dc"])
@pytest.mark.parametrize("S", [4, 21])
def test_ce_score_orientations_agree(monkeypatch, trans_s, kind, S):
    """The dQ and dC kernels' two ways of forming the score tile (the resident tile as the A
    or the B operand; dC then works on ``S^T`` throughout, the exclusion test included, in one
    chunk of ids or several) give the reference gradients; overrides reach the launch."""
    monkeypatch.setattr(K, "_CONFIG_OVERRIDE", {kind: {"TRANS_S": trans_s, "BLOCK_W": 32}})
    monkeypatch.setattr(K, "_DC_GEMM", kind == "dq")  # "dc": the column-wise kernel forms dC
    assert K._config(kind, 30, 30, 20, interpret=True)["TRANS_S"] is trans_s
    qs, cs, target, cand, exclude, log_q = _make_batch(
        15,
        37,
        45,
        20,
        9,
        pad_frac=0.1,
        ignore_frac=0.2,
        excl="expanded",
        S=S,
        lq="normal",
        all_but_target_rows=1,
        dtype=torch.float16,
        branches=1,
    )
    _check_ce(qs, cs, target, cand, exclude, log_q, "mean", torch.float16)


@pytest.mark.parametrize("trans_s", [False, True])
def test_odmt_dq_score_orientations_agree(monkeypatch, trans_s):
    monkeypatch.setattr(K, "_CONFIG_OVERRIDE", {"dq3": {"TRANS_S": trans_s}})
    qs, cs, target, cand, exclude, log_q = _make_batch(
        16,
        34,
        36,
        24,
        9,
        pad_frac=0.1,
        ignore_frac=0.2,
        excl="full",
        S=3,
        lq="normal",
        all_but_target_rows=1,
        dtype=torch.float32,
        branches=3,
    )
    _check_odmt(qs, cs, target, cand, exclude, log_q, 0.6, False, "kl", "mean", torch.float32)


def test_launch_falls_back_on_a_compiler_failure_but_not_on_other_errors():
    calls = []

    def kernel_raising(exc_for):
        class Fake:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    calls.append(meta)
                    exc = exc_for(meta)
                    if exc is not None:
                        raise exc

                return run

        return Fake()

    def make(c):
        return K._bwd_grid(c, 4096, 256), (), dict(K._tile_meta(c, True, True), TRANS_S=c.get("TRANS_S", False))

    cfg = K._config("dq3", 4096, 4096, 256, interpret=False)  # three-branch dQ: 32 x 32 with TRANS_S
    assert cfg["TRANS_S"]
    failing = kernel_raising(lambda m: RuntimeError("PassManager::run failed") if m["TRANS_S"] else None)
    used, _ = K._launch("fake", failing, cfg, make, with_do=True)
    assert [m["TRANS_S"] for m in calls] == [True, False] and not used["TRANS_S"]
    with pytest.raises(ValueError, match="a bug"):
        K._launch("fake", kernel_raising(lambda m: ValueError("a bug")), cfg, make, with_do=True)


# --------------------------------------------------------------------------------------
# Exclusion-present tile flags: the kernels run the full exclusion test only on flagged
# (row tile, column tile) pairs; the interpreter's tiles are 16 x 16, so R = 45, N = 48
# spans 3 x 3 tile pairs.
# --------------------------------------------------------------------------------------

FLAG_CASES = ["sequences", "dup_target_far", "excl_some_tiles", "all_same", "absent", "expanded"]


def _flag_case(case: str, dtype: torch.dtype, branches: int):
    """Inputs where the flag grid matters (see each branch); returns the usual batch tuple."""
    g = torch.Generator().manual_seed(FLAG_CASES.index(case) + 100)
    R, N = 45, 48
    cand = torch.arange(1, N + 1)  # distinct items unless a case says otherwise
    # in-batch layout (row r's target is column r): the target columns' own tiles, which are
    # always flagged, lie on the diagonal, so the cases below mix flagged and unflagged pairs
    target = torch.arange(R)
    exclude = None
    if case == "sequences":  # collate_train layout: 3 users of 16 items, rows exclude their user's items
        # (repeats within a user's row); row tile 0 holds user 1's first row: 4 unflagged pairs
        items = torch.randint(1, 200, (3, 16), generator=g) + 200 * torch.arange(3)[:, None]  # no item shared
        items[0, :3] = PAD  # left padding of the first user
        cand = items.flatten()
        target = (torch.arange(3)[:, None] * 16 + torch.arange(15)[None, :] + 1).flatten()
        exclude = items.repeat_interleave(15, dim=0)
        target[cand[target] == PAD] = IGNORE
    elif case == "dup_target_far":  # row 5's target item (a column of tile 0) copied into column tile 2
        target[5] = 3
        cand[40] = cand[3]
        cand[44] = PAD
        target[44] = 45  # a target never sits on padding (ops rejects that input)
    elif case == "excl_some_tiles":  # rows of row tile 0 exclude items of column tile 1 only
        exclude = torch.full((R, 3), 10_000)  # absent ids elsewhere
        exclude[:16] = cand[torch.randint(16, 32, (16, 3), generator=g)]
        target[:16] = torch.randint(0, 16, (16,), generator=g)  # targets outside the excluded tile
    elif case == "all_same":  # every candidate the same item: only the target column is kept
        cand = torch.full((N,), 7)
        cand[[5, 30]] = PAD
        target = torch.where((target == 5) | (target == 30), target + 1, target)
        exclude = torch.randint(0, 9, (R, 2), generator=g)
    elif case == "absent":  # excluded ids that no candidate has, stride-0 view: no tile pair flagged
        exclude = torch.tensor([[10_001, 10_002, 55, PAD]]).expand(R, 4)
    else:  # "expanded": one shared history (stride 0) with items in column tiles 0 and 2
        exclude = torch.stack([cand[2], cand[35], cand[47], torch.tensor(999)])[None, :].expand(R, 4)
        target[-1] = 35  # the target column itself is excluded by the history, yet kept
    target[[7, 20]] = IGNORE
    log_q = torch.rand(N, generator=g).add(1e-3).log().to(DEVICE)
    qs = [(0.6 * torch.randn(R, 24, generator=g)).to(DEVICE, dtype) for _ in range(branches)]
    cs = [(0.6 * torch.randn(N, 24, generator=g)).to(DEVICE, dtype) for _ in range(branches)]
    if exclude is not None:  # a shared history stays a stride-0 view on the device
        shared = exclude.stride(0) == 0
        exclude = exclude[:1].to(DEVICE).expand(R, -1) if shared else exclude.to(DEVICE)
    return qs, cs, target.to(DEVICE), cand.to(DEVICE), exclude, log_q


def _cpu(*tensors):
    """The tensors (or None) on the CPU, where the brute-force definitions loop."""
    return tuple(None if t is None else t.cpu() for t in tensors)


def _brute_force_flags(target, cand, exclude, block_r: int, block_n: int) -> torch.Tensor:
    """The minimal grid, by definition: a row tile x column tile pair is flagged iff some
    valid row r has its target column in it, or a non-padding column whose id is r's target
    item or one of its excluded ids."""
    target, cand, exclude = _cpu(target, cand, exclude)
    R, N = target.numel(), cand.numel()
    flags = torch.zeros(-(-R // block_r), -(-N // block_n), dtype=torch.int8)
    for r in range(R):
        t = int(target[r])
        if t == IGNORE:
            continue
        flags[r // block_r, t // block_n] = 1
        ids = {int(cand[t])} | ({int(e) for e in exclude[r]} if exclude is not None else set())
        for j in range(N):
            if int(cand[j]) != PAD and int(cand[j]) in ids:
                flags[r // block_r, j // block_n] = 1
    return flags


def _target_tiles_only(p: dict, block_r: int, block_n: int) -> torch.Tensor:
    """The grid of a batch without exclusions: only each valid row's target column tile (on
    the batch's device: the kernels read it)."""
    tgt = p["rows"][0].long()
    valid = tgt >= 0
    shape = (-(-tgt.numel() // block_r), -(-p["sorted"][0].numel() // block_n))
    grid = torch.zeros(shape, dtype=torch.int8, device=tgt.device)
    grid[torch.arange(tgt.numel(), device=tgt.device)[valid] // block_r, tgt[valid] // block_n] = 1
    return grid


def _pad_only_ids(cand: torch.Tensor) -> torch.Tensor:
    """Distinct ids for every non-padding column: with ``exclude_ids=None`` the reference then
    drops padding only -- what the kernels compute where no tile pair is flagged."""
    return torch.where(cand == PAD, PAD, torch.arange(1, cand.numel() + 1, device=cand.device))


def _groups_by_definition(cand: torch.Tensor, block_n: int) -> tuple[list[int], list[int]]:
    """``(pos, gstart)`` of :func:`K._id_groups` by its definition, in Python: the sorted
    positions (stable) grouped by (id, column tile)."""
    order = sorted(range(cand.numel()), key=lambda j: (int(cand[j]), j))
    keys = [(int(cand[j]), j // block_n) for j in order] + [None]
    pos, gstart = [], []
    for i, key in enumerate(keys):
        if i == 0 or key is None or key != keys[i - 1]:
            gstart.append(i)
        pos.append(len(gstart) - 1)
    return pos, gstart


@pytest.mark.parametrize("block", [16, 1024])
def test_id_groups_match_their_definition(monkeypatch, block):
    """The one-program scan of ``_groups_kernel`` against the definition, at the default
    block and at 16, so that the count carried across blocks is exercised (N = 70: five
    blocks, the last holding position N alone when N + 1 is a block's multiple plus one)."""
    monkeypatch.setattr(K, "_GROUPS_BLOCK", block)
    gen = torch.Generator().manual_seed(11)
    for N, n_ids in [(70, 9), (63, 63), (64, 1), (1, 1)]:
        cand = torch.randint(-3, n_ids, (N,), generator=gen) * 7 + 2**33  # repeats, ids past int32
        target = torch.zeros(3, dtype=torch.int64)
        p = K._prep(target, cand, None, None, PAD, IGNORE)
        for block_n in (1, 4, 16):
            pos, gstart = K._id_groups(p, block_n)
            want_pos, want_gstart = _groups_by_definition(cand, block_n)
            assert pos.tolist() == want_pos, (N, block_n)
            assert gstart[: len(want_gstart)].tolist() == want_gstart, (N, block_n)


@pytest.mark.parametrize(
    "ids,fits",
    [
        ([0, 5, 2**31 - 1], 1),
        ([-(2**31), 3], 1),
        ([1, 2**31], 0),
        ([-(2**31) - 1, 1], 0),
        ([2**40, 2**40 + 1], 0),
    ],
)
def test_ids_fit_flag(ids, fits):
    """The int32 flag the row-target launch writes: 1 exactly when every candidate id fits."""
    cand = torch.tensor(ids, dtype=torch.int64)
    p = K._prep(torch.tensor([0, IGNORE]), cand, None, None, PAD, IGNORE)
    assert p["fit"].tolist() == [fits]
    assert p["rows"][0].tolist() == [0, -1] and p["rows"][1][0].item() == ids[0]


@pytest.mark.parametrize("case", FLAG_CASES)
def test_tile_flags_are_the_minimal_grid(case):
    """The flag builder against its definition, at the interpreter's tile and at uneven ones
    (several row tiles per column tile and the reverse, 1 x 1 = per element)."""
    _, _, target, cand, exclude, _ = _flag_case(case, torch.float32, 1)
    for target_ in (target, target.int()):
        p = K._prep(target_, cand, exclude, None, PAD, IGNORE)
        for block_r, block_n in [(16, 16), (8, 32), (32, 4), (1, 1), (64, 64)]:
            got = K._tile_flags(p, block_r, block_n).cpu()
            assert torch.equal(got, _brute_force_flags(target, cand, exclude, block_r, block_n)), (block_r, block_n)
    grid = K._tile_flags(p, 16, 16)
    if case == "absent":
        assert torch.equal(grid, _target_tiles_only(p, 16, 16))
    elif case != "all_same":  # these mix flagged and unflagged pairs
        assert grid.any() and not grid.all(), grid
    else:
        assert grid.all()


@pytest.mark.parametrize("case", FLAG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ce_flag_cases_match_reference(case, dtype):
    qs, cs, target, cand, exclude, log_q = _flag_case(case, dtype, 1)
    out = _check_ce(qs, cs, target, cand, exclude, log_q, "none", dtype)
    # by construction the exclusions change the answer (a wrongly targets-only grid would fail),
    # except where no excluded id is a candidate
    pad_only = debiased_inbatch_cross_entropy_reference(
        qs[0].double(),
        cs[0].double(),
        target,
        _pad_only_ids(cand),
        None,
        log_q.double(),
        pad_id=PAD,
        ignore_index=IGNORE,
        reduction="none",
    )
    differs = (out.double() - pad_only).abs().max().item() > 1e-2
    assert differs == (case != "absent")
    if case == "all_same":
        assert torch.all(out == 0)


@pytest.mark.parametrize("case", ["sequences", "dup_target_far", "all_same", "expanded"])
def test_mutual_distillation_flag_cases_match_reference(case):
    qs, cs, target, cand, exclude, log_q = _flag_case(case, torch.float32, 3)
    _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, case != "expanded", "kl", "mean", torch.float32)


@pytest.mark.parametrize("grid", ["targets_only", "ones"])
def test_kernels_take_the_path_their_flags_say(monkeypatch, grid):
    """Every kernel reads the grid: forced to the target columns' tiles only, each one
    computes the padding-only softmax where the exclusions lie outside those tiles (the cheap
    path skips the exclusion test); all ones
    (full test everywhere) gives the reference -- both paths of every kernel checked,
    forward and gradients."""
    real = K._tile_flags
    if grid == "ones":
        monkeypatch.setattr(K, "_tile_flags", lambda p, br, bn: torch.ones_like(real(p, br, bn)))
    else:
        monkeypatch.setattr(K, "_tile_flags", _target_tiles_only)
    # targets only: a batch whose excluded ids all lie outside the target columns' tiles, so
    # the flagged tiles exclude nothing but padding either
    case = "excl_some_tiles" if grid == "targets_only" else "sequences"
    qs, cs, target, cand, exclude, log_q = _flag_case(case, torch.float32, 3)
    if grid == "targets_only":
        cand, exclude = _pad_only_ids(cand), None  # what the reference must then be given
        qs_, cs_, target_, cand_, exclude_, lq_ = _flag_case(case, torch.float32, 3)
        shown = K.debiased_inbatch_cross_entropy(qs_[0], cs_[0], target_, cand_, exclude_, lq_, PAD, IGNORE, "none")
        ref = debiased_inbatch_cross_entropy_reference(
            qs[0].double(),
            cs[0].double(),
            target,
            cand,
            None,
            log_q.double(),
            pad_id=PAD,
            ignore_index=IGNORE,
            reduction="none",
        )
        _assert_close(shown, ref, torch.float32, "fwd", "loss with the targets-only grid")
        q, c = _leaf(qs_[0]), _leaf(cs_[0])
        K.debiased_inbatch_cross_entropy(q, c, target_, cand_, exclude_, lq_, PAD, IGNORE, "sum").backward()
        q64, c64 = _leaf(qs[0], torch.float64), _leaf(cs[0], torch.float64)
        debiased_inbatch_cross_entropy_reference(
            q64, c64, target, cand, None, log_q.double(), pad_id=PAD, ignore_index=IGNORE, reduction="sum"
        ).backward()
        _assert_close(q.grad, q64.grad, torch.float32, "grad", "dq with the targets-only grid")
        _assert_close(c.grad, c64.grad, torch.float32, "grad", "dc with the targets-only grid")
        out = K.mutual_distillation_loss(
            *qs_, *cs_, target_, cand_, exclude_, lq_, 0.5, True, "kl", PAD, IGNORE, "mean"
        )
        ref3 = mutual_distillation_reference(
            dict(zip(BRANCHES, [t.double() for t in qs], strict=True)),
            dict(zip(BRANCHES, [t.double() for t in cs], strict=True)),
            target,
            cand,
            None,
            log_q.double(),
            temperature=0.5,
            pad_id=PAD,
            ignore_index=IGNORE,
        )
        for name, a, b in zip(DistillationLosses._fields, out, ref3, strict=True):
            _assert_close(a, b, torch.float32, "fwd", f"{name} with the targets-only grid")
        return
    _check_ce(qs, cs, target, cand, exclude, log_q, "none", torch.float32)
    _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, False, "ce", "sum", torch.float32)


# --------------------------------------------------------------------------------------
# Drop lists: on a sparse flagged pair (flag 1) the single-branch forward and dQ compare
# each row's next two dropped columns instead of its ids; dense pairs (flag 2) test the ids.
# --------------------------------------------------------------------------------------


def _brute_force_drops(target, cand, exclude) -> list[list[int] | None]:
    """Per row, the sorted columns dropped for an id, one entry per (id slot, column) as
    the lists count them (the target column left out; None on ignored rows), by definition."""
    target, cand, exclude = _cpu(target, cand, exclude)
    out = []
    for r in range(target.numel()):
        t = int(target[r])
        if t == IGNORE:
            out.append(None)
            continue
        slots = [int(cand[t])] + ([int(e) for e in exclude[r]] if exclude is not None else [])
        cols = [j for x in slots if x != PAD for j in range(cand.numel()) if int(cand[j]) == x]
        out.append(sorted(cols))
    return out


@pytest.mark.parametrize("case", FLAG_CASES)
def test_drop_lists_hold_each_rows_dropped_columns(case):
    _, _, target, cand, exclude, _ = _flag_case(case, torch.float32, 1)
    p = K._prep(target, cand, exclude, None, PAD, IGNORE)
    lists, total = K._drop_lists(p)
    width = K._dl_width(p["S"])
    assert lists.shape == (target.numel(), width) and lists.dtype == torch.int32
    end = K._DL_END.value
    overflowed = 0
    for r, cols in enumerate(_brute_force_drops(target, cand, exclude)):
        if cols is None:
            assert int(total[r]) == 0 and torch.all(lists[r] == end)
            continue
        assert int(total[r]) == len(cols)  # with the target column and repeats
        if len(cols) > width - 2:  # overflow: an empty list, the row tile's pairs dense
            overflowed += 1
            assert torch.all(lists[r] == end)
            continue
        want = [j for j in cols if j != int(target[r])]
        assert lists[r, : len(want)].tolist() == want and torch.all(lists[r, len(want) :] == end), r
    assert (overflowed > 0) == (case == "all_same")


def _brute_force_list_flags(target, cand, exclude, width: int, block_r: int, block_n: int) -> torch.Tensor:
    """The grid with dense pairs raised to 2, by definition: a flagged pair where some row of
    the row tile has three or more dropped columns in the column tile, or where some row of
    the row tile drops more columns than its list holds."""
    target, cand, exclude = _cpu(target, cand, exclude)
    flags = _brute_force_flags(target, cand, exclude, block_r, block_n)
    for r, cols in enumerate(_brute_force_drops(target, cand, exclude)):
        if cols is None:
            continue
        if len(cols) > width - 2:
            flags[r // block_r][flags[r // block_r] != 0] = 2
            continue
        kept = [j for j in cols if j != int(target[r])]
        for j in kept:
            if sum(k // block_n == j // block_n for k in kept) >= 3:
                flags[r // block_r, j // block_n] = 2
    return flags


def test_list_flags_raise_exactly_the_dense_pairs():
    """Against the definition over every flag case and several tile shapes; across the cases
    both flagged kinds occur, so the kernel tests below run both paths."""
    seen = set()
    for case in FLAG_CASES:
        _, _, target, cand, exclude, _ = _flag_case(case, torch.float32, 1)
        p = K._prep(target, cand, exclude, None, PAD, IGNORE)
        width = K._dl_width(p["S"])
        for block_r, block_n in [(16, 16), (8, 32), (32, 4), (64, 64)]:
            got = K._list_flags(p, block_r, block_n).cpu()
            want = _brute_force_list_flags(target, cand, exclude, width, block_r, block_n)
            assert torch.equal(got, want), (case, block_r, block_n)
            assert torch.equal(K._tile_flags(p, block_r, block_n).cpu(), want.clamp(max=1))  # the cached 0/1 grid
            seen |= set(got.unique().tolist())
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_tile_lists_keep_two_entries_a_column_tile(case):
    _, _, target, cand, exclude, _ = _flag_case(case, torch.float32, 1)
    p = K._prep(target, cand, exclude, None, PAD, IGNORE)
    full = K._drop_lists(p)[0]
    end = K._DL_END.value
    for block_n in (4, 16):
        got = K._tile_lists(p, block_n)
        for r in range(full.shape[0]):
            kept, per_tile = [], {}
            for j in full[r].tolist():
                if j != end and per_tile.get(j // block_n, 0) < 2:
                    kept.append(j)
                    per_tile[j // block_n] = per_tile.get(j // block_n, 0) + 1
            assert got[r].tolist() == kept + [end] * (full.shape[1] - len(kept)), (r, block_n)


@pytest.mark.parametrize("case", FLAG_CASES)
@pytest.mark.parametrize("first", ["starts", "tile_lists"])
def test_split_starts_count_each_rows_entries_below_each_range(case, first):
    """Where each row's walk starts in each column range: built in the tile lists' launch,
    the starts asked for first or after the tile lists (a second launch), both the count by
    definition."""
    _, _, target, cand, exclude, _ = _flag_case(case, torch.float32, 1)
    p = K._prep(target, cand, exclude, None, PAD, IGNORE)
    p["lists_on"] = True  # (a case whose ids overflow every list has the lists off)
    block_n, n_split, cols = 4, 3, 8
    if first == "tile_lists":
        K._tile_lists(p, block_n)
    got = K._split_starts(p, block_n, n_split, cols).cpu()
    tiles = K._tile_lists(p, block_n).cpu().tolist()
    want = [[sum(v < i * cols for v in row) for row in tiles] for i in range(n_split)]
    assert got.dtype == torch.int32 and got.tolist() == want


@pytest.mark.parametrize("case", ["sequences", "dup_target_far", "expanded", "excl_some_tiles"])
def test_ce_dense_path_everywhere_matches_reference(monkeypatch, case):
    """Every flagged pair forced dense (the id test) in the kernels that read drop lists (the
    single-branch ones and the three-branch dC) gives the reference too, as the real grids
    do (the flag cases above): both paths agree."""
    for name in ("_list_flags", "_col_list_flags"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda p, br, bn, real=real: real(p, br, bn).clamp(max=1) * 2)
    qs, cs, target, cand, exclude, log_q = _flag_case(case, torch.float32, 3)
    _check_ce(qs[:1], cs[:1], target, cand, exclude, log_q, "none", torch.float32)
    if case in ("sequences", "expanded"):
        _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, False, "kl", "sum", torch.float32)


def _brute_force_col_flags(target, cand, exclude, width: int, block_r: int, block_n: int) -> torch.Tensor:
    """The column-wise kernel's grid, by definition: a flagged pair is dense where some
    column has three or more dropping rows (with their repeats) in the row tile, or where
    some row of the row tile drops more columns than its list holds."""
    target, cand, exclude = _cpu(target, cand, exclude)
    flags = _brute_force_flags(target, cand, exclude, block_r, block_n)
    drops = _brute_force_drops(target, cand, exclude)
    for r, cols in enumerate(drops):
        if cols is not None and len(cols) > width - 2:
            flags[r // block_r][flags[r // block_r] != 0] = 2
    for j in range(cand.numel()):
        rows = [r for r, cols in enumerate(drops) if cols is not None for k in cols if k == j and k != int(target[r])]
        for r in rows:
            if sum(s // block_r == r // block_r for s in rows) >= 3:
                flags[r // block_r, j // block_n] = 2
    return flags


@pytest.mark.parametrize("case", FLAG_CASES)
def test_column_lists_and_their_flags(case):
    """Each column's dropping rows, at most two a row tile, and the column-wise dense grid,
    against their definitions (rows whose list overflowed aside: their pairs are dense)."""
    _, _, target, cand, exclude, _ = _flag_case(case, torch.float32, 1)
    p = K._prep(target, cand, exclude, None, PAD, IGNORE)
    width = K._dl_width(p["S"])
    drops = _brute_force_drops(target, cand, exclude)
    complete = [cols is not None and len(cols) <= width - 2 for cols in drops]
    end = K._DL_END.value
    for block_r, block_n in [(16, 16), (4, 32), (64, 8)]:
        got = K._col_list_flags(p, block_r, block_n).cpu()
        assert torch.equal(got, _brute_force_col_flags(target, cand, exclude, width, block_r, block_n))
        rows, offsets = K._col_lists(p, block_r)
        assert rows.dtype == offsets.dtype == torch.int32 and offsets.numel() == cand.numel() + 1
        assert torch.all(rows[int(offsets[-1]) :] == end)
        for j in range(cand.numel()):
            listed = rows[int(offsets[j]) : int(offsets[j + 1])].tolist()
            assert listed == sorted(listed)
            per_tile: dict[int, int] = {}
            for r in listed:
                per_tile[r // block_r] = per_tile.get(r // block_r, 0) + 1
            assert max(per_tile.values(), default=0) <= 2
            want = [r for r, cols in enumerate(drops) if complete[r] for k in cols if k == j and k != int(target[r])]
            kept, seen = [], {}
            for r in sorted(want):  # the first two of each row tile
                if seen.get(r // block_r, 0) < 2:
                    kept.append(r)
                seen[r // block_r] = seen.get(r // block_r, 0) + 1
            assert listed == kept, (j, block_r)  # an overflowed row's list is empty


@pytest.mark.parametrize("case", ["sequences", "expanded", "all_same"])
def test_without_lists_matches_reference(monkeypatch, case):
    """Below ``_DL_MIN_PAIRS`` (calls bound by the host's launches) the kernels read no drop
    list and every flagged pair takes the id test."""
    monkeypatch.setattr(K, "_DL_MIN_PAIRS", 1 << 40)
    qs, cs, target, cand, exclude, log_q = _flag_case(case, torch.float32, 3)
    p = K._prep(target, cand, exclude, None, PAD, IGNORE)
    assert not p["lists_on"] and p["dl_k"] == 0
    _check_ce(qs[:1], cs[:1], target, cand, exclude, log_q, "none", torch.float32)
    if case != "all_same":
        _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, False, "kl", "sum", torch.float32)


def test_lists_only_where_they_can_hold_a_rows_ids():
    """From 62 excluded ids on, a row whose ids are all candidates overflows its list: such
    calls read none (and the interpreter's calls of any size read them)."""
    cand = torch.arange(1, 49, device=DEVICE)
    target = torch.arange(45, device=DEVICE)
    for S, on in [(0, True), (15, True), (61, True), (62, False), (200, False)]:
        exclude = torch.randint(1, 49, (45, S), generator=torch.Generator().manual_seed(S)).to(DEVICE)
        assert K._prep(target, cand, exclude, None, PAD, IGNORE)["lists_on"] == on, S


@pytest.mark.parametrize(
    "op, R, N, d, n_items, S, override",
    [
        # 64 x 64 forward and dQ tiles, dC 32-row steps; 95% of the flagged pairs sparse
        ("ce", 256, 300, 64, 1200, 3, {}),
        # the forward's tile from 16k rows on; every row drops ~45 columns: 90% of the lists
        # overflow, every flagged pair dense
        ("ce", 256, 300, 64, 100, 15, {"fwd": {"BLOCK_T": 128}}),
        ("ce", 96, 100, 272, 400, 3, {}),  # d past the resident width: 64-wide steps, output chunks
        ("odmt3", 96, 120, 64, 480, 3, {}),  # half the flagged pairs dense
    ],
)
def test_gpu_tiles_match_reference(monkeypatch, op, R, N, d, n_items, S, override):
    """The tiles, splits and paths a GPU launches (the other tests run the interpreter's
    16-wide tiles), run by the interpreter: the launch rule as on a GPU of 8 SMs, drop lists
    on, sparse and dense flagged pairs, a column-major exclusion list with padding."""
    monkeypatch.setattr(K, "_interpreting", lambda t: False)
    monkeypatch.setattr(K, "_SM_OVERRIDE", 8)
    monkeypatch.setattr(K, "_CONFIG_OVERRIDE", override)
    qs, cs, target, cand, exclude, log_q = _make_batch(
        11,
        R,
        N,
        d,
        n_items,
        pad_frac=0.1,
        ignore_frac=0.1,
        excl="transposed",
        S=S,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=3 if op == "odmt3" else 1,
    )
    p = K._prep(target, cand, exclude, log_q, PAD, IGNORE)
    cfg = K._config("fwd3" if op == "odmt3" else "fwd", R, N, d, interpret=False)
    assert p["lists_on"] and cfg["BLOCK_T"] >= 32 and cfg["BLOCK_W"] >= 32
    if op == "ce":
        _check_ce(qs, cs, target, cand, exclude, log_q, "mean", torch.float32)
    else:
        _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, False, "kl", "mean", torch.float32)


@pytest.mark.parametrize(
    "lists,dc_gemm,dq_gemm", [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
)
def test_backward_splits_match_reference(monkeypatch, lists, dc_gemm, dq_gemm):
    """A small three-branch backward grid splits its walk (dQ over columns, dC over rows)
    into float32 partials summed in split order; with drop lists only the dQ splits (it reads
    none). With the GEMM dC each column slab's dQ walk splits (two slabs of 5 and 4 tiles);
    with the GEMM dQ too the dz-only kernel's walk splits without partials."""
    monkeypatch.setattr(K, "_SM_OVERRIDE", 4)  # grids below 8 programs split (the 4 x 5 tiles here)
    monkeypatch.setattr(K, "_DL_MIN_PAIRS", 0 if lists else 1 << 40)
    monkeypatch.setattr(K, "_DC_GEMM", dc_gemm)
    monkeypatch.setattr(K, "_DQ_GEMM", dq_gemm)
    splits, walks = [], []
    split_out, split_walk = K._split_out, K._split_walk

    def spy(out, n_split):
        splits.append(n_split)
        return split_out(out, n_split)

    def walk_spy(*args):
        walks.append(split_walk(*args)[0])
        return split_walk(*args)

    monkeypatch.setattr(K, "_split_out", spy)
    monkeypatch.setattr(K, "_split_walk", walk_spy)
    qs, cs, target, cand, exclude, log_q = _make_batch(
        5,
        64,
        130 if dc_gemm else 66,
        16,
        60,
        pad_frac=0.1,
        ignore_frac=0.1,
        excl="full",
        S=3,
        lq="normal",
        all_but_target_rows=0,
        dtype=torch.float32,
        branches=3,
    )
    _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, False, "kl", "sum", torch.float32)
    if dq_gemm:
        assert splits == [] and walks[-2:] == [2, 2], (splits, walks)
        return
    if dc_gemm:
        assert splits[-2:] == [2, 2], splits
        return
    dq_splits, dc_splits = splits[-2:]
    assert dq_splits > 1 and (dc_splits == 1 if lists else dc_splits > 1), splits


def test_backward_split_only_on_small_grids():
    """At the paper scale the three-branch backward grids are below two programs an SM (144
    and 156 on 132 SMs) and split about four ways; from 16k rows on, or with enough programs,
    they do not."""
    for kind, rows, walk in (("dq3", 1536, 1664), ("dc3", 1664, 1536)):
        cfg = K._config(kind, rows, walk, 768, interpret=False)
        grid = K._bwd_grid(cfg, rows, 768)
        step = cfg["BLOCK_W"]
        n_split, per = K._split_walk(grid[0] * grid[1], walk, step, 132, True)
        assert grid[0] * grid[1] < 2 * 132 and n_split == 4 and per % step == 0, (kind, grid, n_split)
        assert n_split * per >= walk > (n_split - 1) * per
    cfg = K._config("dq3", 16384, 16384, 256, interpret=False)
    grid = K._bwd_grid(cfg, 16384, 256)
    assert K._split_walk(grid[0] * grid[1], 16384, cfg["BLOCK_W"], 132, True) == (1, 16384)
    assert K._bwd_split(10, 1, 132) == 1  # a walk of one tile cannot split


@pytest.mark.parametrize(
    "R,N,branches,itemsize,block_w",
    [(16384, 16384, 3, 2, 32), (16384, 16384, 1, 2, 32), (65536, 65536, 1, 2, 64), (1536, 1664, 3, 2, 32),
     (40, 37, 1, 4, 16), (3_000_000, 200, 3, 4, 64), (8, 70, 1, 2, 64)],
)  # fmt: skip
def test_dz_slabs_stay_within_the_budget_and_never_hold_every_column(R, N, branches, itemsize, block_w):
    """The GEMM dC path's workspace: slabs of whole column tiles, at least two of them (no
    ``R x N`` tensor), each within ``_DZ_BUDGET`` bytes unless one tile is already more."""
    width = K._dz_slab_width(R, N, branches, itemsize, block_w)
    assert width is not None and width % block_w == 0
    n_slab = -(-N // width)
    assert n_slab >= 2
    assert branches * R * width * itemsize <= K._DZ_BUDGET or width == block_w
    assert width * (n_slab - 1) < N  # no empty slab


def test_dz_slabs_off_for_one_tile_or_the_switch(monkeypatch):
    assert K._dz_slab_width(100, 16, 1, 2, 16) is None  # one tile of candidates: the dC kernel
    monkeypatch.setattr(K, "_DC_GEMM", False)
    assert K._dz_slab_width(100, 1000, 1, 2, 16) is None


@pytest.mark.parametrize("branches", [1, 3])
def test_dz_only_kernel_needs_two_slabs_of_its_own_tiles(monkeypatch, branches):
    """Candidates that span two dQ tiles but one tile of the dz-only kernel (wider columns on
    a GPU: 64 against 32 for the single-branch dQ at d = 256) keep the dQ dots, with the GEMM
    dC over slabs of the dQ kernel's tiles: the gradients are still the reference's."""
    monkeypatch.setattr(K, "_CONFIG_OVERRIDE", {"dz": {"BLOCK_W": 64}, "dz3": {"BLOCK_W": 64}})
    launched = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda name, kernel, cfg, make, **kw: launched.append(cfg) or launch(
        name, kernel, cfg, make, **kw))  # fmt: skip
    qs, cs, target, cand, exclude, log_q = _make_batch(
        21, 20, 40, 16, 12, pad_frac=0.1, ignore_frac=0.2, excl="full", S=3, lq="normal",
        all_but_target_rows=1, dtype=torch.float32, branches=branches,
    )  # fmt: skip
    if branches == 1:
        _check_ce(qs, cs, target, cand, exclude, log_q, "mean", torch.float32)
    else:
        _check_odmt(qs, cs, target, cand, exclude, log_q, 0.5, False, "kl", "mean", torch.float32)
    backward_tiles = [cfg["BLOCK_W"] for cfg in launched if "FULL_D" in cfg][-2:]  # two slabs' dQ
    assert backward_tiles == [16, 16], launched


# --------------------------------------------------------------------------------------
# Past the full width: scores from cuBLAS's float32 slabs (``_SCORE_GEMM``)
# --------------------------------------------------------------------------------------


def _spy_score_slabs(monkeypatch) -> list[tuple[int, int]]:
    """Records the column range of every score slab a call forms."""
    slabs = []
    score_slab = K._score_slab
    monkeypatch.setattr(K, "_score_slab", lambda q3, c3, lo, hi: slabs.append((lo, hi)) or score_slab(q3, c3, lo, hi))
    return slabs


@pytest.mark.parametrize(
    "branches,dtype,S,detach,form,lists",
    [
        (3, torch.float32, 5, False, "kl", True),
        (3, torch.float16, 20, True, "ce", True),
        (3, torch.float32, 3, False, "ce", False),
        (1, torch.float32, 5, None, None, True),
        (1, torch.float16, 20, None, None, True),
        (1, torch.float32, 3, None, None, False),
    ],
)
def test_score_slabs_match_reference(monkeypatch, split_path, branches, dtype, S, detach, form, lists):
    """d past the full width (lowered to 0 here): the forward and the dz-only kernel read
    the scores from float32 slabs of at most half the columns, formed by one batched GEMM
    each; values and every gradient are the reference's (three branches: through the
    teachers too), with and without drop lists, one forward split or many."""
    monkeypatch.setattr(K, "_FULL_D_MAX", 0)
    monkeypatch.setattr(K, "_DL_MIN_PAIRS", 0 if lists else 1 << 40)
    slabs = _spy_score_slabs(monkeypatch)
    qs, cs, target, cand, exclude, log_q = _make_batch(
        13 + S, 34, 57, 33, 25, pad_frac=0.1, ignore_frac=0.2, excl="full", S=S, lq="extreme",
        all_but_target_rows=1, dtype=dtype, branches=branches,
    )  # fmt: skip
    if branches == 1:
        _check_ce(qs, cs, target, cand, exclude, log_q, "sum", dtype)
    else:
        _check_odmt(qs, cs, target, cand, exclude, log_q, 0.7, detach, form, "sum", dtype)
    if DEVICE == "cuda" and dtype == torch.float32:  # exact dots on a GPU: no slabs
        assert slabs == []
        return
    # forward and backward each cover every column, in slabs of at most half of them
    assert len(slabs) >= 4, slabs
    for lo, hi in slabs:
        assert 0 < hi - lo <= -(-57 // 2) + 15, slabs
    starts = [lo for lo, _ in slabs]
    assert starts.count(0) == 2 and all(hi == 57 or hi in starts for _, hi in slabs), slabs


@pytest.mark.parametrize("branches", [1, 3])
def test_score_slabs_keep_ignored_rows_out(monkeypatch, branches):
    """Ignored rows holding NaN / inf reach the forward's GEMM (its statistics of them are
    discarded) but not the backward's (it multiplies the queries with those rows zeroed):
    loss and gradients are those of the batch with the rows zeroed."""
    monkeypatch.setattr(K, "_FULL_D_MAX", 0)
    slabs = _spy_score_slabs(monkeypatch)
    _check_ignored_rows_reach_nothing(branches, N=40, d=20, dtype=torch.float16, detach=False)
    assert slabs, "the score slabs were not used"


@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize(
    "R,N,sms", [(1536, 1664, 132), (16384, 20000, 132), (40_000_000, 130, 132), (64, 100, 0), (8, 70, 1)]
)
def test_score_slab_plan_covers_every_column_within_the_budget(R, N, sms, branches):
    """The forward's slabs: whole splits, at least two slabs, each within ``_DZ_BUDGET``
    bytes of float32 scores (every branch and row) unless one split is already more."""
    cfg = K._config("fwd3s" if branches == 3 else "fwds", R, N, 768, interpret=False)
    n_split, per, per_slab = K._slab_plan(R, N, cfg, sms, branches)
    split_cols, col_tiles = per * cfg["BLOCK_W"], -(-N // cfg["BLOCK_W"])
    assert n_split >= 2 and (n_split - 1) * per < col_tiles <= n_split * per  # no empty split
    n_slab = -(-n_split // per_slab)
    assert n_slab >= 2
    assert branches * R * per_slab * split_cols * 4 <= K._DZ_BUDGET or per == per_slab == 1


@pytest.mark.parametrize("three", [False, True])
def test_score_slabs_only_past_the_full_width_and_for_16_bit_inputs_on_a_gpu(monkeypatch, three):
    cpu = torch.empty(2, 2)
    assert not K._score_gemm_on(cpu, 1000, K._FULL_D_MAX, True, three)  # the full-width dot
    assert K._score_gemm_on(cpu, 1000, K._FULL_D_MAX + 1, True, three)
    assert not K._score_gemm_on(cpu, 16, 768, True, three)  # one column tile
    if torch.cuda.is_available():
        assert not K._score_gemm_on(torch.empty(2, 2, device="cuda"), 1000, 768, False, three)
        assert K._score_gemm_on(torch.empty(2, 2, device="cuda", dtype=torch.bfloat16), 1000, 768, False, three)
    monkeypatch.setattr(K, "_SCORE_GEMM", False)
    assert not K._score_gemm_on(cpu, 1000, 768, True, three)


@given(
    **SMALL_SHAPES,
    ignore_frac=st.sampled_from([0.0, 0.3]),
    S=st.integers(0, 4),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    T=st.floats(0.1, 2.0),
    detach=st.booleans(),
    form=st.sampled_from(["kl", "ce"]),
    branches=st.sampled_from([1, 3]),
)
def test_score_slabs_match_reference_over_shapes(
    seed, R, N, d, n_items, ignore_frac, S, dtype, T, detach, form, branches
):  # fmt: skip
    """Any shape past the full width (lowered to 0), either op: score slabs where the
    candidates span two column tiles or more, the kernels' dots below that."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "_FULL_D_MAX", 0)
        qs, cs, target, cand, exclude, log_q = _make_batch(
            seed, R, N, d, n_items, pad_frac=0.1, ignore_frac=ignore_frac, excl="full", S=S, lq="normal",
            all_but_target_rows=1, dtype=dtype, branches=branches,
        )  # fmt: skip
        if branches == 1:
            _check_ce(qs, cs, target, cand, exclude, log_q, "mean", dtype, seed)
        else:
            _check_odmt(qs, cs, target, cand, exclude, log_q, T, detach, form, "mean", dtype, seed)

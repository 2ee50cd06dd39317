"""Benchmark of the in-batch loss kernels (``odmt_components.kernels.inbatch_loss``).

On a CUDA GPU:
1. measures the card's copy bandwidth and bf16 matmul rate;
2. checks bf16 correctness of both ops (forward and all gradients) against the float64
   reference at a moderate size; on a mismatch it says so, still times everything (a lent
   GPU is rare: the times of the kernels as they are still inform the next change) under a
   warning in the table, and exits with status 1;
3. times forward+backward (median, ``triton.testing.do_bench``) and measures the peak memory
   a call adds on top of its inputs (``torch.cuda.max_memory_allocated`` after a reset, minus
   what was allocated before the call) for
   - R=1,536 N=1,664 d=768 and R=N=16,384 d=256: the three-branch ODMT loss (CE + the three
     distillation terms, T=0.5, detached teachers) and the single-branch masked CE;
   - R=N=65,536 d=128: the single-branch masked CE;
   against eager PyTorch and torch.compile of the same math (written as in
   ``shared/anchors/anchors_gpu.py``: 15 history exclusions per row, other copies of the
   target excluded, random log-popularity correction), and Liger's fused linear CE and
   Cut Cross-Entropy on the plain CE they are limited to (no exclusion, no logQ);
   plus, for ours, each kernel family alone: the forward op (split kernel + combine), the
   row-wise dQ kernel and the column-wise dC kernel (each with its small wrapper ops); our
   plain CE too (distinct candidate ids, no exclusion, no logQ: the libraries' math), so
   what the correction and exclusion cost shows beside them; and where one call's time goes
   (``device_time.kernel_breakdown``: each kernel's device time under ``torch.profiler``
   against the call's wall time -- host-bound or kernel-bound, and which kernel); at the
   paper scale, our calls replayed from a CUDA graph too (the device's time alone);
4. prints the registers and spills of every compiled kernel of ours
   (``inbatch_loss.KERNEL_STATS``) and a table: times, peak MB, our speed-up over each
   competitor, the arithmetic floor (forward 2RNd + backward 6RNd FLOPs per branch at the
   measured bf16 matmul rate) and our distance to it. Writes every number to
   ``$OUT/bench_inbatch_loss.json`` when OUT is set.

Then, while the run is under ``SWEEP_BUDGET_S`` seconds, a few alternative tiles per kernel
are timed at R = N = 16,384, then at the paper scale (with their registers and spills). Slow calls (> 20 ms) are
timed as the median of 3 event-timed runs after one warm-up instead of ``do_bench``, and
eager PyTorch is skipped at R = N = 65,536 (55 GB, 0.36 s a call), to
keep the whole GPU run under ~150 s.

``AOT=1`` needs no GPU: it compiles every kernel of ours at each case's launch configuration
for sm_90 (Triton's own ptxas) and prints registers and stack frame (spills) per kernel, as
read by Triton's bundled ``cuobjdump`` -- the resource report, before any GPU time
(``AOT_ONLY=regex``: only the labels it matches, e.g. ``big_.*_dq``).

``DRY=1`` runs the whole script on the CPU under ``TRITON_INTERPRET=1`` with tiny shapes
(plumbing only, no timing). Without a GPU and without DRY it says so and exits 0.
``SKIP_COMPILE=1`` leaves out the torch.compile competitors (their warm-up is the slowest
part of the run).

``CAPTURE=specs.json`` (on the GPU) records the compile requests of every kernel launch of
ours (and of Liger / Cut Cross-Entropy) instead of compiling and launching them, for
``benchmarks/precompile.py`` to compile in parallel before the timed run: each timed function
is called once, values are not checked, the eager and torch.compile competitors are left
out and every sweep entry runs. ``WARM_COMPILED=1`` only runs each torch.compile competitor
once (its compile fills Inductor's caches for the timed run), nothing else.

Run: ``python benchmarks/bench_inbatch_loss.py`` (GPU) or ``DRY=1 python benchmarks/bench_inbatch_loss.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import time
import traceback

T_START = time.time()
DRY = bool(os.environ.get("DRY"))
AOT = bool(os.environ.get("AOT"))
CAPTURE = os.environ.get("CAPTURE", "")
WARM_COMPILED = bool(os.environ.get("WARM_COMPILED"))
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not DRY and not AOT and not torch.cuda.is_available():
    print("bench_inbatch_loss: no CUDA GPU here; nothing measured (DRY=1 runs a CPU dry run).")
    sys.exit(0)

from odmt_components.kernels import inbatch_loss as K  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_time import custom_op_route, elapsed_ms, graphed_ms, record_breakdown  # noqa: E402

if CAPTURE:
    import precompile  # noqa: E402

    precompile.capture(CAPTURE)
from odmt_components.kernels.reference import (  # noqa: E402
    BRANCHES,
    debiased_inbatch_cross_entropy_reference,
    mutual_distillation_reference,
)

DEV = "cpu" if DRY else "cuda"
DTYPE = torch.float32 if DRY else torch.bfloat16  # bf16 is wrong in the interpreter
SKIP_COMPILE = bool(os.environ.get("SKIP_COMPILE")) or DRY or bool(CAPTURE)
# a pass whose calls are not timed: launches skipped (CAPTURE) or only the compiled competitors
UNTIMED = bool(CAPTURE) or WARM_COMPILED
T = 0.5
HIST = 15
PAD = -1  # no candidate id is -1: the anchors' data has no padding columns
IGNORE = -100
DEVICE_NAME = "cpu (DRY)" if DRY else "sm_90 compile (AOT)" if AOT else torch.cuda.get_device_name()
RES: dict = {"device": DEVICE_NAME, "torch": torch.__version__}

try:
    import triton
    from triton.testing import do_bench

    RES["triton"] = triton.__version__
except Exception as exc:  # pragma: no cover - triton is a dependency
    print("triton unavailable:", exc)
    sys.exit(1)


def dump() -> None:
    out = os.environ.get("OUT")
    if out and not UNTIMED:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_inbatch_loss.json"), "w") as fh:
            json.dump(RES, fh, indent=1)


def _event_ms(fn, grads) -> float:
    for g in grads:
        g.grad = None
    return elapsed_ms(fn, torch.device(DEV))


def bench(fn, grads=(), rep: int = 40) -> float:
    """Median milliseconds of ``fn`` (one call in DRY mode, time 0); calls slower than 20 ms
    get one warm-up and the median of 3 timed runs instead of ``do_bench``'s many."""
    if DRY or UNTIMED:
        fn()
        return 0.0
    first = _event_ms(fn, grads)  # includes any compilation
    if first > 20.0 and _event_ms(fn, grads) > 20.0:
        return statistics.median(_event_ms(fn, grads) for _ in range(3))
    return do_bench(fn, warmup=10, rep=rep, grad_to_none=list(grads), return_mode="median")


def peak_mb(fn, grads=()) -> float:
    """Peak memory one call adds on top of what is allocated before it (MB)."""
    if DRY or UNTIMED:
        return 0.0
    for g in grads:
        g.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    for g in grads:
        g.grad = None
    return extra / 1e6


@contextlib.contextmanager
def module_switches(**switches):
    """Module switches of ``inbatch_loss`` set inside the block, restored after it."""
    saved = {k: getattr(K, k) for k in switches}
    for k, v in switches.items():
        setattr(K, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(K, k, v)


def switched(fn, **switches):
    """``fn`` run with :func:`module_switches` (set for each call: a CUDA graph captures the
    launches the switched call makes)."""

    def run():
        with module_switches(**switches):
            return fn()

    return run


def measure(key: str, fn, grads, rep: int = 40) -> None:
    try:
        RES[f"{key}_ms"] = bench(fn, grads, rep)
        RES[f"{key}_peakMB"] = peak_mb(fn, grads)
        print(f"{key:48s} {RES[f'{key}_ms'] * 1000:11.1f} us  {RES[f'{key}_peakMB']:9.1f} MB", flush=True)
    except Exception as exc:
        RES[f"{key}_ms"] = f"ERR {type(exc).__name__}: {str(exc)[:200]}"
        print(f"{key:48s} ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if not DRY:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# 1. ceilings of the card
# ---------------------------------------------------------------------------------------


def ceilings() -> None:
    n = 2**10 if DRY else 2**30
    x = torch.empty(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    RES["copy_GBps"] = 2 * n / (max(t, 1e-9) * 1e-3) / 1e9
    m = 64 if DRY else 8192
    a = torch.randn(m, m, device=DEV, dtype=DTYPE)
    b = torch.randn_like(a)
    t = bench(lambda: a @ b)
    RES["bf16_mm_TFLOPs"] = 2 * m**3 / (max(t, 1e-9) * 1e-3) / 1e12
    print(f"copy {RES['copy_GBps']:.0f} GB/s, bf16 matmul {RES['bf16_mm_TFLOPs']:.0f} TFLOP/s", flush=True)


# ---------------------------------------------------------------------------------------
# data and the competitors' math (as in shared/anchors/anchors_gpu.py)
# ---------------------------------------------------------------------------------------


def make_data(R: int, N: int, d: int, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_items = max(4 * N, 1000)
    cand = torch.randint(0, n_items, (N,), generator=g).to(DEV)
    target = torch.randint(0, N, (R,), generator=g).to(DEV)
    hist = cand[torch.randint(0, N, (R, HIST), generator=g).to(DEV)]
    log_pop = torch.rand(N, generator=g).add(1e-3).log().to(DEV)
    Hs = [torch.randn(R, d, generator=g).to(DEV, DTYPE).requires_grad_(True) for _ in range(3)]
    Ds = [torch.randn(N, d, generator=g).to(DEV, DTYPE).requires_grad_(True) for _ in range(3)]
    return Hs, Ds, target, cand, hist, log_pop


def make_seq_data(B: int, L: int, d: int, seed: int = 1):
    """The layout ``odmt_components.data.collate_train`` produces: B users of L + 1 items
    (uniform over 4N items, no padding), row ``b * L + t`` predicts column ``b * (L + 1) + t + 1``
    and excludes the user's whole item row (``S = L + 1``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    N = B * (L + 1)
    items = torch.randint(0, 4 * N, (B, L + 1), generator=g).to(DEV)
    cand = items.flatten()
    target = (torch.arange(B)[:, None] * (L + 1) + torch.arange(L)[None, :] + 1).flatten().to(DEV)
    hist = items.repeat_interleave(L, dim=0)  # as collate_train
    log_pop = torch.rand(N, generator=g).add(1e-3).log().to(DEV)
    R = B * L
    Hs = [torch.randn(R, d, generator=g).to(DEV, DTYPE).requires_grad_(True) for _ in range(3)]
    Ds = [torch.randn(N, d, generator=g).to(DEV, DTYPE).requires_grad_(True) for _ in range(3)]
    return Hs, Ds, target, cand, hist, log_pop


def flag_fractions(tag: str, target, cand, hist, d: int) -> None:
    """Share of tile pairs whose exclusion-present flag is set (they run the full exclusion
    test; the others only the padding compare), per kernel at its launch tile."""
    R, N = target.numel(), cand.numel()
    p = K._prep(target, cand, hist, None, PAD, IGNORE)
    parts = []
    for kind in ("fwd", "dq", "dc", "fwd3", "dq3", "dc3"):
        rows, cols = (N, R) if kind.startswith("dc") else (R, N)
        cfg = K._config(kind, rows, cols, d, interpret=DRY)
        br, bn = (cfg["BLOCK_W"], cfg["BLOCK_T"]) if kind.startswith("dc") else (cfg["BLOCK_T"], cfg["BLOCK_W"])
        frac = K._tile_flags(p, br, bn).float().mean().item()
        RES[f"{tag}_flagged_{kind}"] = frac
        part = f"{kind} {br}x{bn}: {100 * frac:.1f}%"
        if p["lists_on"] and kind in ("fwd", "dq", "dc"):  # of which dense: the id test, not the lists
            grid = (K._col_list_args if kind == "dc" else K._row_list_args)(p, br, bn)[0]
            dense = (grid == 2).float().mean().item()
            RES[f"{tag}_dense_{kind}"] = dense
            part += f" ({100 * dense:.1f}% dense)"
        parts.append(part)
    print("tile pairs with the exclusion test on: " + ", ".join(parts), flush=True)
    # what one call spends before its first loss kernel: row targets, the sort, the id grouping
    # and one flag grid (the forward's tile), and with drop lists the lists and their grid
    cfg = K._config("fwd", R, N, d, interpret=DRY)
    ms = bench(lambda: K._tile_flags(K._prep(target, cand, hist, None, PAD, IGNORE), cfg["BLOCK_T"], cfg["BLOCK_W"]))
    RES[f"{tag}_prep_and_flags_ms"] = ms
    line = f"prep + one flag grid: {ms * 1000:.1f} us"
    if p["lists_on"]:
        ms = bench(
            lambda: K._row_list_args(K._prep(target, cand, hist, None, PAD, IGNORE), cfg["BLOCK_T"], cfg["BLOCK_W"])
        )
        RES[f"{tag}_prep_and_lists_ms"] = ms
        line += f"; with the forward's drop lists and grid: {ms * 1000:.1f} us"
    print(line, flush=True)


def eager_fns(Hs, Ds, target, cand, hist, log_pop):
    R = target.shape[0]

    def excl_mask():
        m = cand[None, :] == cand[target][:, None]
        for j in range(hist.shape[1]):
            m |= cand[None, :] == hist[:, j : j + 1]
        m[torch.arange(R, device=target.device), target] = False
        return m

    def ce_one(H, D, m):
        z = (H @ D.t()).float() - log_pop
        z = z.masked_fill(m, float("-inf"))
        return F.cross_entropy(z, target), z

    def eager_ce():
        return ce_one(Hs[0], Ds[0], excl_mask())[0]

    def eager_odmt():
        m = excl_mask()
        zs = []
        ce = 0
        for H, D in zip(Hs, Ds, strict=True):
            loss, z = ce_one(H, D, m)
            ce = ce + loss
            zs.append(z)
        zi, zt, zv = zs
        ze = (zi + zt + zv) / 3

        def kl(teacher, student):
            pt = F.log_softmax(teacher.detach() / T, -1).masked_fill(m, -1e4)
            ps = F.log_softmax(student / T, -1).masked_fill(m, -1e4)
            return F.kl_div(ps, pt, log_target=True, reduction="batchmean") * T * T

        return ce + kl(zi, zt) + kl(zi, zv) + kl(ze, zi)

    return eager_ce, eager_odmt


def our_kernel_fns(Hs, Ds, target, cand, hist, log_pop, odmt: bool):
    """Each kernel family of ours alone: forward op, dQ kernel, dC (single branch and three
    branches), with the per-row statistics and upstream weights of a real call. With the
    GEMM dC (``K._DC_GEMM``, the default) "dc" is the whole backward: the dQ kernel storing
    dz slab by slab (with ``K._DQ_GEMM``, the default, forming dz only) and cuBLAS's ``dz^T Q``
    (and ``dz C``); "dq" is the dQ kernel with its dQ dots alone, without stores."""
    with torch.no_grad():
        _, lse = torch.ops.odmt.debiased_inbatch_ce(Hs[0], Ds[0], target, cand, hist, log_pop, PAD, IGNORE)
        g1 = torch.full_like(lse, 1.0 / lse.numel())
        args3 = (*Hs, *Ds, target, cand, hist, log_pop)
        if odmt:
            _, stats = torch.ops.odmt.mutual_distillation(*args3, T, True, True, PAD, IGNORE)
        g3 = torch.full((6, lse.numel()), 1.0 / lse.numel(), device=lse.device)
    ce_args = (Hs[0], Ds[0], target, cand, hist, log_pop)

    def nograd(f):
        def run():
            with torch.no_grad():
                f()

        return run

    ce = {
        "fwd": nograd(lambda: torch.ops.odmt.debiased_inbatch_ce(*ce_args, PAD, IGNORE)),
        "dq": nograd(lambda: K._ce_backward_impl(*ce_args, lse, g1, PAD, IGNORE, parts=("dq",))),
        "dc": nograd(lambda: K._ce_backward_impl(*ce_args, lse, g1, PAD, IGNORE, parts=("dc",))),
    }
    if not odmt:
        return ce, {}
    bw = (stats, g3, T, True, True, PAD, IGNORE)
    odmt = {
        "fwd": nograd(lambda: torch.ops.odmt.mutual_distillation(*args3, T, True, True, PAD, IGNORE)),
        "dq": nograd(lambda: K._odmt_backward_impl(*args3, *bw, parts=("dq",))),
        "dc": nograd(lambda: K._odmt_backward_impl(*args3, *bw, parts=("dc",))),
    }
    return ce, odmt


def our_fns(Hs, Ds, target, cand, hist, log_pop):
    def ours_ce():
        return K.debiased_inbatch_cross_entropy(Hs[0], Ds[0], target, cand, hist, log_pop, PAD, IGNORE, "mean")

    def ours_odmt():
        out = K.mutual_distillation_loss(*Hs, *Ds, target, cand, hist, log_pop, T, True, "kl", PAD, IGNORE, "mean")
        return out.ce + out.kl

    return ours_ce, ours_odmt


# ---------------------------------------------------------------------------------------
# 2. bf16 correctness against the float64 reference
# ---------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def checked_call(tag: str, fn, switches: dict):
    """``fn()`` with the module switches set, or None (reported as a mismatch) where it
    raises: a failing path must not end the run, the others still get timed."""
    try:
        return switched(fn, **switches)()
    except Exception as exc:
        RES[f"check_{tag}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"MISMATCH {tag}: raised {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return None


def correctness() -> bool:
    R, N, d = (20, 22, 24) if DRY else (768, 832, 256)
    Hs, Ds, target, cand, hist, log_pop = make_data(R, N, d, seed=2)
    target[::7] = IGNORE
    ok = True
    fwd_tol, grad_tol = 1e-3, 2e-2  # relative; bf16 dL/dz before the tensor-core dot
    # single branch, with the drop lists (as from R * N = 2^30 on) and without (this size)
    h64 = Hs[0].detach().double().requires_grad_(True)
    d64 = Ds[0].detach().double().requires_grad_(True)
    ref = debiased_inbatch_cross_entropy_reference(
        h64, d64, target, cand, hist, log_pop.double(), pad_id=PAD, ignore_index=IGNORE
    )
    ref_grads = torch.autograd.grad(ref, [h64, d64])
    errs = {}
    # with the drop lists, without, and with d in chunks as past 256 (score slabs)
    cases1 = [("ce_lists", {"_DL_MIN_PAIRS": 0}), ("ce", {}), ("ce_score_slabs", {"_FULL_D_MAX": 0})]
    for tag, switches in cases1:

        def call_ce():
            loss = K.debiased_inbatch_cross_entropy(Hs[0], Ds[0], target, cand, hist, log_pop, PAD, IGNORE, "mean")
            return loss, torch.autograd.grad(loss, [Hs[0], Ds[0]])

        result = checked_call(tag, call_ce, switches)
        if result is None:
            ok = False
            continue
        loss, grads = result
        errs[f"{tag}_loss"] = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30)
        errs.update({f"{tag}_grad_{n}": rel_err(a, b) for n, a, b in zip(("q", "c"), grads, ref_grads, strict=True)})
    # three branches, gradients through the teachers too (every backward path), the forward
    # with the drop lists once; d walked in chunks as past 256 (the paper's 768), the scores
    # from cuBLAS's float32 slabs (the default there) and from the kernels' own dots
    cases3 = [
        ("odmt_detach", True, {}),
        ("odmt_through_teacher", False, {}),
        ("odmt_detach_lists", True, {"_DL_MIN_PAIRS": 0}),
        ("odmt_through_teacher_score_slabs", False, {"_FULL_D_MAX": 0}),
        ("odmt_detach_chunked_dots", True, {"_FULL_D_MAX": 0, "_SCORE_GEMM": False}),
    ]
    for tag, detach, switches in cases3:

        def call(detach=detach):
            out = K.mutual_distillation_loss(
                *Hs, *Ds, target, cand, hist, log_pop, T, detach, "kl", PAD, IGNORE, "mean"
            )  # fmt: skip
            return out, torch.autograd.grad(out.ce + out.kl, Hs + Ds)

        result = checked_call(tag, call, switches)
        if result is None:
            ok = False
            continue
        out, grads = result
        q64 = {m: h.detach().double().requires_grad_(True) for m, h in zip(BRANCHES, Hs, strict=True)}
        c64 = {m: c.detach().double().requires_grad_(True) for m, c in zip(BRANCHES, Ds, strict=True)}
        ref = mutual_distillation_reference(
            q64, c64, target, cand, hist, log_pop.double(), temperature=T, detach_teacher=detach, pad_id=PAD
        )
        ref_grads = torch.autograd.grad(ref.ce + ref.kl, [*q64.values(), *c64.values()])
        for name, a, b in zip(out._fields, out, ref, strict=True):
            errs[f"{tag}_{name}"] = abs(a.item() - b.item()) / max(abs(b.item()), 1e-3)
        names = [f"q_{m}" for m in BRANCHES] + [f"c_{m}" for m in BRANCHES]
        errs.update({f"{tag}_grad_{n}": rel_err(a, b) for n, a, b in zip(names, grads, ref_grads, strict=True)})
    for name, err in errs.items():
        tol = grad_tol if "grad" in name else fwd_tol
        RES[f"check_{name}_relerr"] = err
        if not err <= tol:  # also catches NaN
            ok = False
            print(f"MISMATCH {name}: relative error {err:.3e} > {tol:.0e}", flush=True)
    worst = max(errs.values())
    print(f"{DTYPE} correctness vs float64 reference (R={R} N={N} d={d}): worst relative error {worst:.2e}", flush=True)
    RES["check_ok"] = ok
    return ok


# ---------------------------------------------------------------------------------------
# 3. timings
# ---------------------------------------------------------------------------------------


def graphed(key: str, fn, grads) -> None:
    """Times ``fn`` (forward + backward) replayed from a CUDA graph
    (:func:`device_time.graphed_ms`): the device's own time, without the host's per-call work
    (Python, ~10 Triton launches, ~70 small PyTorch ops). Nothing in our ops syncs with the
    host, so a call can be captured."""
    if UNTIMED or DRY:
        RES[f"{key}_ms"] = "skipped: no CUDA graph on this run" if DRY else "skipped"
        return
    try:
        RES[f"{key}_ms"] = graphed_ms(fn, grads)
        print(f"{key:48s} {RES[f'{key}_ms'] * 1000:11.1f} us", flush=True)
    except Exception as exc:
        RES[f"{key}_ms"] = f"ERR {type(exc).__name__}: {str(exc)[:200]}"
        print(f"{key:48s} ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def lib_timings(tag: str, Hs, Ds, target, log_pop, grads) -> None:
    """Our plain CE, Liger's fused linear CE and Cut Cross-Entropy on the plain CE."""
    plain_ids = torch.arange(Ds[0].shape[0], device=DEV)  # distinct: no other copy of a target

    def ours_plain():
        K.debiased_inbatch_cross_entropy(Hs[0], Ds[0], target, plain_ids, None, None, PAD, IGNORE, "mean").backward()

    measure(f"{tag}_ours_plain", ours_plain, grads, rep=100)
    if not UNTIMED:
        record_breakdown(RES, f"{tag}_ours_plain", ours_plain, grads)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lflce

        bias = (-log_pop).to(DTYPE)
        measure(f"{tag}_liger_plain", lambda: lflce(Hs[0], Ds[0], target, bias=bias).backward(), grads)
    except Exception as exc:
        RES[f"{tag}_liger_plain_ms"] = "unavailable"
        print(f"liger unavailable: {type(exc).__name__}: {str(exc)[:150]}", flush=True)
    try:
        from cut_cross_entropy import linear_cross_entropy

        measure(f"{tag}_cce_plain", lambda: linear_cross_entropy(Hs[0], Ds[0], target).backward(), grads)
    except Exception as exc:
        RES[f"{tag}_cce_plain_ms"] = "unavailable"
        print(f"cut cross entropy unavailable: {type(exc).__name__}: {str(exc)[:150]}", flush=True)


def loss_case(R: int, N: int, d: int, tag: str, odmt: bool, seq_users: int = 0) -> None:
    """One case; ``seq_users > 0``: the ``collate_train`` layout (:func:`make_seq_data`,
    ``seq_users`` users of ``R / seq_users + 1`` items) and our kernels only."""
    t_start = time.time()
    if seq_users:
        Hs, Ds, target, cand, hist, log_pop = make_seq_data(seq_users, R // seq_users, d)
        R, N = target.numel(), cand.numel()
    else:
        Hs, Ds, target, cand, hist, log_pop = make_data(R, N, d)
    grads = Hs + Ds
    print(f"--- {tag}: R={R} N={N} d={d} ({DTYPE}); one fp32 logits matrix = {R * N * 4 / 1e6:.0f} MB", flush=True)
    if not WARM_COMPILED:
        flag_fractions(tag, target, cand, hist, d)
    eager_ce, eager_odmt = eager_fns(Hs, Ds, target, cand, hist, log_pop)
    ours_ce, ours_odmt = our_fns(Hs, Ds, target, cand, hist, log_pop)
    # (the torch.compile warm-up needs none of ours: their first calls would compile them)
    parts_ce, parts_odmt = ({}, {}) if WARM_COMPILED else our_kernel_fns(Hs, Ds, target, cand, hist, log_pop, odmt)
    variants = [("ce", ours_ce, eager_ce, parts_ce)]
    if odmt:
        variants.append(("odmt3", ours_odmt, eager_odmt, parts_odmt))
    # eager needs ~ 14 bytes per logit per branch (fp32 logits, masks, softmax, grads)
    free = 0 if DRY else torch.cuda.mem_get_info()[0]
    graphs = []  # timed from a CUDA graph after every profiled call of the case
    for name, ours, eager, parts in variants:
        if not WARM_COMPILED:
            measure(f"{tag}_{name}_ours", lambda f=ours: f().backward(), grads, rep=100)
            if not UNTIMED:
                record_breakdown(RES, f"{tag}_{name}_ours", lambda f=ours: f().backward(), grads)
            if tag in ("paper", "dry"):  # where the host's launch work can bound a call
                graphs.append((f"{tag}_{name}_ours_graphed", lambda f=ours: f().backward()))
                with custom_op_route(K):  # the dispatcher's route, as torch.compile takes it
                    measure(f"{tag}_{name}_ours_via_op", lambda f=ours: f().backward(), grads, rep=100)
                # A/B: the scores by the kernels' own dots, not cuBLAS's slabs (d = 768 here)
                dots = switched(lambda f=ours: f().backward(), _SCORE_GEMM=False)
                measure(f"{tag}_{name}_ours_dots", dots, grads, rep=100)
                if not UNTIMED:
                    record_breakdown(RES, f"{tag}_{name}_ours_dots", dots, grads)
                graphs.append((f"{tag}_{name}_ours_dots_graphed", dots))
            for part, fn in parts.items():
                measure(f"{tag}_{name}_ours_{part}", fn, (), rep=40)
        need = 14 * R * N * (3 if name == "odmt3" else 1)
        if seq_users:
            continue
        if UNTIMED:
            pass  # eager needs no compiling, and a captured call of ours computes nothing
        elif R * N > 2**31 and not DRY:
            RES[f"{tag}_{name}_eager_ms"] = "skipped: 0.36 s a call at 65k (run 1), to save time"
            print(f"{tag}_{name}_eager skipped (R*N > 2^31; run 1 measured 356 ms)", flush=True)
        elif DRY or need < 0.9 * free:
            with torch.no_grad():  # the competitors compute the same number
                mine, theirs = ours().item(), eager().item()
            RES[f"{tag}_{name}_vs_eager_relerr"] = err = abs(mine - theirs) / max(abs(theirs), 1e-6)
            if not err <= 2e-2:
                RES["agree_ok"] = False
                print(f"MISMATCH {tag}_{name}: ours {mine:.6g} vs eager {theirs:.6g}", flush=True)
            measure(f"{tag}_{name}_eager", lambda f=eager: f().backward(), grads)
        else:
            RES[f"{tag}_{name}_eager_ms"] = f"skipped: needs ~{need / 1e9:.0f} GB"
            print(f"{tag}_{name}_eager skipped (needs ~{need / 1e9:.0f} GB, {free / 1e9:.0f} GB free)", flush=True)
        if SKIP_COMPILE:
            RES[f"{tag}_{name}_compiled_ms"] = "skipped"
        else:
            compiled = torch.compile(eager)
            measure(f"{tag}_{name}_compiled", lambda f=compiled: f().backward(), grads)
            if tag in ("paper", "dry"):  # the device's time of theirs too, beside ours from a graph
                graphs.append((f"{tag}_{name}_compiled_graphed", lambda f=compiled: f().backward()))
        if not DRY:
            torch.cuda.empty_cache()
    # after the profiler's sessions (``record_breakdown``): CUPTI restarted once a CUDA graph
    # exists in the process is a pattern older CUDA versions crashed on
    for key, fn in graphs:
        graphed(key, fn, grads)
    # fused linear-CE libraries: plain CE (no exclusion; Liger with the logQ bias); their time
    # does not depend on the ids, so the sequence layout skips them
    if not seq_users and not WARM_COMPILED:
        lib_timings(tag, Hs, Ds, target, log_pop, grads)
    for name, *_ in variants:
        branches = 3 if name == "odmt3" else 1
        flops = branches * 8 * R * N * d
        RES[f"{tag}_{name}_floor_ms"] = flops / (RES["bf16_mm_TFLOPs"] * 1e12) * 1e3
    RES[f"{tag}_seconds"] = time.time() - t_start
    kernel_report(tag)
    print(f"({tag} took {RES[f'{tag}_seconds']:.0f} s)", flush=True)


def kernel_report(tag: str) -> None:
    """Registers and spills of every compiled kernel of ours (the last launch of each)."""
    stats = {k: dict(v) for k, v in K.KERNEL_STATS.items()}
    RES[f"{tag}_kernels"] = stats
    if not stats:
        print("kernel registers/spills: none recorded (interpreter: nothing is compiled)", flush=True)
        return
    for name, st in sorted(stats.items()):
        tiles = " ".join(
            f"{k}={st[k]}"
            for k in ("BLOCK_T", "BLOCK_W", "BLOCK_DO", "FULL_D", "TRANS_S", "num_warps", "num_stages")
            if k in st
        )
        print(
            f"  {name:14s} n_regs={st['n_regs']!s:>4} n_spills={st['n_spills']!s:>4} grid={st['grid']} {tiles}",
            flush=True,
        )
        for why in st.get("refused", []):
            print(f"    (an earlier tile was refused: {why})", flush=True)
    K.KERNEL_STATS.clear()


# Alternative tiles timed per kernel at R = N = 16,384 when the run has time left (data for
# the next tuning round; the defaults come from kernels.inbatch_loss._config).
SWEEP = [  # most informative first: the run's time budget usually cuts the list
    # the single-branch forward without drop lists (every flagged tile runs the id test):
    # the lists' effect, now that one launch builds them (Run 6 built them from ~50 small
    # operations: the 16k CE call took 7.3 ms of wall time for 2.7 ms of kernels). Keys
    # starting with "_" set the module's variable of that name instead of a tile key.
    ("ce", "fwd", "fwd", {"_DL_MIN_PAIRS": 1 << 62}),
    # the three-branch forward (Run 6: 3.1 ms at 16k, one 4-warp program an SM, 2.9 cycles
    # an instruction: one warp a scheduler issues a third of the time) with more warps an SM:
    # 8 warps on the same tile, 32 x 32 tiles (sm_90, Triton 3.6: 254 registers, no spills,
    # 96 KB: two programs an SM), or d in 64-wide chunks (24 KB: two programs an SM, or one
    # of 8 warps at 128 rows); the dz kernel at 32 x 32 (192 B of spills) after them
    ("odmt3", "fwd", "fwd3", {"num_warps": 8}),
    ("odmt3", "fwd", "fwd3", {"BLOCK_T": 32, "BLOCK_W": 32}),
    ("odmt3", "fwd", "fwd3", {"FULL_D": False, "BLOCK_DO": 64}),
    ("odmt3", "fwd", "fwd3", {"FULL_D": False, "BLOCK_DO": 64, "BLOCK_T": 128, "num_warps": 8}),
    ("odmt3", "dc", "dz3", {"BLOCK_T": 32, "BLOCK_W": 32}),
    # the whole backward (dz kernel and GEMMs; "dc" is the whole backward) without lists
    ("ce", "dc", "dc", {"_DL_MIN_PAIRS": 1 << 62}),
    # two CTAs an SM (96 KB, 166 registers x 128 threads): one's softmax beside the other's
    # tensor-core work (the rule's 128-row tile holds the SM alone, its wgmma waited on at once)
    ("ce", "fwd", "fwd", {"BLOCK_T": 64, "BLOCK_W": 64, "num_warps": 4, "num_stages": 2}),
    ("ce", "fwd", "fwd", {"BLOCK_T": 128, "BLOCK_W": 128, "num_stages": 2}),
    # more warps an SM to cover latencies: the rule's forward runs 8 (one 8-warp program of
    # ~200 registers); 64 x 32 tiles take 64 KB of shared memory and 237 registers (two
    # 4-warp programs an SM), capped at 168 three (12 warps; Triton 3.6 sm_90: 72 B of stack,
    # 10 local loads and 4 stores on an unflagged tile of 439 instructions)
    ("ce", "fwd", "fwd", {"BLOCK_T": 64, "BLOCK_W": 32, "num_warps": 4, "num_stages": 2}),
    ("ce", "fwd", "fwd", {"BLOCK_T": 64, "BLOCK_W": 32, "num_warps": 4, "num_stages": 2, "maxnreg": 168}),
    # no spills any more in the sm_90 compile (252 registers), wgmma for both dots (the
    # 32-row steps of the default use mma.sync for the score dot)
    ("ce", "dc", "dc", {"BLOCK_T": 64, "BLOCK_W": 64, "_DC_GEMM": False}),
    ("ce", "dq", "dq", {"BLOCK_T": 128, "BLOCK_W": 32, "TRANS_S": False, "num_warps": 8}),
    # S^T = C Q^T: wgmma for the score dot too (254 registers, no spills), but the rows spread
    # over more threads, so the exclusion test of a flagged tile costs more (sm_90 SASS: as
    # many instructions a tile unflagged, ~35% more flagged)
    ("ce", "dc", "dc", {"TRANS_S": True, "_DC_GEMM": False}),
    ("odmt3", "dq", "dq3", {"BLOCK_T": 64, "BLOCK_W": 32, "TRANS_S": False}),
    ("ce", "fwd", "fwd", {"BLOCK_W": 32}),
    ("ce", "dq", "dq", {"BLOCK_T": 32, "BLOCK_W": 32, "TRANS_S": True}),
]
# The same at the paper scale (R = 1,536, N = 1,664, d = 768: the example's training step),
# after the 16k entries: first the three-branch backward without its walk split
# (``_bwd_split``), then tiles. There d is walked in 64-wide steps of 32 x 32 score tiles, each
# step's loads waited on with two pipeline stages: more stages, or 128-wide steps (half the
# steps, each twice the work), hide more of that latency (sm_90 compile, Triton 3.6: no
# spills in the CE kernels, 8-112 B in the three-branch ones, as at the default); the CE dQ
# at 4 warps runs two programs an SM (195 registers).
PAPER_SWEEP = [
    # the three-branch backward unsplit (as in Run 5): the split's effect in the same run
    ("odmt3", "dq", "dq3", {"_BWD_SPLIT": False}),
    ("odmt3", "dc", "dc3", {"_BWD_SPLIT": False, "_DC_GEMM": False}),
    ("odmt3", "dq", "dq3", {"num_stages": 4}),
    ("odmt3", "dc", "dc3", {"num_stages": 4, "_DC_GEMM": False}),
    ("odmt3", "dq", "dq3", {"BLOCK_D": 128, "num_stages": 3}),
    ("odmt3", "dc", "dc3", {"BLOCK_D": 128, "num_stages": 3, "_DC_GEMM": False}),
    ("odmt3", "fwd", "fwd3", {"num_stages": 4}),
    ("ce", "dq", "dq", {"num_stages": 4}),
    ("ce", "dq", "dq", {"num_warps": 4}),
    ("ce", "dc", "dc", {"num_stages": 4, "_DC_GEMM": False}),
]
SWEEP_BUDGET_S = float(os.environ.get("SWEEP_BUDGET_S", "125"))
# how a sweep entry's module switch is named in its key
SWITCH_NAMES = {
    "_DL_MIN_PAIRS": "no_drop_lists",
    "_BWD_SPLIT": "no_backward_split",
    "_DC_GEMM": "dc_kernel",
    "_DQ_GEMM": "dq_kernel",
}


def tile_sweep() -> None:
    """Times each kernel under a few alternative tiles (skipped once the run passes
    ``SWEEP_BUDGET_S`` seconds); prints time, registers and spills of each variant: the
    :data:`SWEEP` entries at R = N = 16,384, then the :data:`PAPER_SWEEP` ones."""
    shapes = [("", (40, 40, 32) if DRY else (16384, 16384, 256), SWEEP)]
    shapes.append(("paper_", (24, 26, 80) if DRY else (1536, 1664, 768), PAPER_SWEEP))
    for prefix, (R, N, d), entries in shapes:
        if not _sweep_shape(prefix, R, N, d, entries):
            break
    K.KERNEL_STATS.clear()


def _sweep_shape(prefix: str, R: int, N: int, d: int, entries) -> bool:
    """One shape's sweep entries; False once the time budget is spent."""
    Hs, Ds, target, cand, hist, log_pop = make_data(R, N, d)
    parts = dict(zip(("ce", "odmt3"), our_kernel_fns(Hs, Ds, target, cand, hist, log_pop, True), strict=True))
    print(f"--- tile sweep at R={R} N={N} d={d} (defaults: see the case above)", flush=True)
    for variant, part, kind, over in entries:
        if time.time() - T_START > SWEEP_BUDGET_S and not (DRY or CAPTURE):
            print("tile sweep stopped: time budget spent", flush=True)
            return False
        key = f"sweep_{prefix}{variant}_{part}_" + "_".join(SWITCH_NAMES.get(k, f"{k}{v}") for k, v in over.items())
        key += f"_{kind}" if kind.startswith("dz") else ""  # tiles of the dz-only kernel
        K._CONFIG_OVERRIDE.clear()
        K._CONFIG_OVERRIDE[kind] = {k: v for k, v in over.items() if not k.startswith("_")}
        K.KERNEL_STATS.clear()
        try:
            with module_switches(**{k: v for k, v in over.items() if k.startswith("_")}):
                ms = bench(parts[variant][part], (), rep=40)
            name = {"fwd": "fwd", "dq": "dq", "dc": "dc"}[part]
            st = K.KERNEL_STATS.get(f"{'ce' if variant == 'ce' else 'odmt'}_{name}", {})
            RES[key] = dict(ms=ms, n_regs=st.get("n_regs"), n_spills=st.get("n_spills"))
            print(f"{key:60s} {ms * 1000:9.1f} us  n_regs={st.get('n_regs')} n_spills={st.get('n_spills')}", flush=True)
        except Exception as exc:
            RES[key] = f"ERR {type(exc).__name__}: {str(exc)[:200]}"
            print(f"{key:60s} ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        finally:
            K._CONFIG_OVERRIDE.clear()
    return True


def fmt(v, unit: str = "") -> str:
    return f"{v:,.3f}{unit}" if isinstance(v, float) else "-" if v is None else str(v).split(":")[0][:16]


def table(cases) -> None:
    print()
    print(
        f"| case | ours ms (MB) | ours fwd / dq / {'bwd' if K._DC_GEMM else 'dc'} ms | eager ms (MB) "
        "| compile ms (MB) | ours plain ms "
        "| Liger plain ms | CCE plain ms | floor ms | ours/floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tag, (R, N, d), odmt in cases:
        for name in ["ce"] + (["odmt3"] if odmt else []):
            key = f"{tag}_{name}"
            ours = RES.get(f"{key}_ours_ms")
            cells = [f"{key} R={R} N={N} d={d}", f"{fmt(ours)} ({fmt(RES.get(f'{key}_ours_peakMB'))})"]
            cells.append(" / ".join(fmt(RES.get(f"{key}_ours_{part}_ms")) for part in ("fwd", "dq", "dc")))
            for comp in ("eager", "compiled"):
                t = RES.get(f"{key}_{comp}_ms")
                cell = f"{fmt(t)} ({fmt(RES.get(f'{key}_{comp}_peakMB'))})"
                if isinstance(t, float) and isinstance(ours, float) and ours > 0:
                    cell += f" = {t / ours:.2f}x ours"
                    RES[f"{key}_speedup_vs_{comp}"] = t / ours
                cells.append(cell)
            plain = RES.get(f"{tag}_ours_plain_ms") if name == "ce" else None
            cells.append(fmt(plain))
            for lib in ("liger_plain", "cce_plain"):
                t = RES.get(f"{tag}_{lib}_ms")
                cell = fmt(t)
                if isinstance(t, float) and isinstance(ours, float) and ours > 0:
                    cell += f" = {t / ours:.2f}x ours"
                    RES[f"{key}_speedup_vs_{lib}"] = t / ours
                    if isinstance(plain, float) and plain > 0:  # the same math on both sides
                        cell += f" ({t / plain:.2f}x ours plain)"
                        RES[f"{key}_plain_speedup_vs_{lib}"] = t / plain
                cells.append(cell)
            floor = RES.get(f"{key}_floor_ms")
            cells.append(fmt(floor))
            if isinstance(ours, float) and isinstance(floor, float) and floor > 0:
                RES[f"{key}_ours_over_floor"] = ours / floor
                cells.append(f"{ours / floor:.2f}x")
            else:
                cells.append("-")
            print("| " + " | ".join(cells) + " |")


# Alternative backward tiles compiled by ``AOT_TILES=1`` (BLOCK_T x BLOCK_W, warps): the
# candidates of the tile rule in ``inbatch_loss._base_config``.
AOT_TILES = [
    dict(BLOCK_T=32, BLOCK_W=32, num_warps=8),
    dict(BLOCK_T=32, BLOCK_W=32, num_warps=4),
    dict(BLOCK_T=64, BLOCK_W=32, num_warps=8),
    dict(BLOCK_T=64, BLOCK_W=32, num_warps=4),
    dict(BLOCK_T=64, BLOCK_W=64, num_warps=8),
    dict(BLOCK_T=64, BLOCK_W=64, num_warps=4),
]


# Integer arguments the launcher sees as multiples of 16 on the benchmark's inputs: the row
# strides of every operand (the three-branch kernels name theirs per branch) and R, N, D.
# Without this divisibility the compile has no 16-byte async copies (no software pipeline).
ALIGNED_INTS = {"sq_r", "sc_n", "sdq_r", "sdc_n", "ex_sr", "R", "N", "D", "walk_per_split", "out_split_stride"}
ALIGNED_INTS |= {"n_begin", "n_end", "sdz_r", "sdz_b"}  # slab bounds and widths: multiples of the column tile
ALIGNED_INTS |= {"ssl_r", "ssl_b", "slab_lo", "n_per_split"}  # score slabs (and the forward's split width): the same
ALIGNED_INTS |= {f"{p}_{b}" for p in ("sq", "sc") for b in "itv"}


def _aot_compile(label: str, kernel, cfg: dict, meta: dict, cuobjdump: str) -> dict:
    """Compiles one kernel for sm_90 and reads its registers / stack frame / shared memory."""

    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = {"tgt_ptr": "*i32", "tid_ptr": "*i64", "cid_ptr": "*i64", "ex_ptr": "*i64", "fl_ptr": "*i8"}
    ptr.update({k: "*i32" for k in ("fit_ptr", "c32_ptr", "dl_ptr", "dl_start_ptr", "tot_ptr", "crow_ptr", "coff_ptr")})
    ptr.update({k: "*i32" for k in ("pos_ptr", "gstart_ptr")})
    ptr.update({k: "*i64" for k in ("vals_ptr", "order_ptr")})
    fp32 = {"lq_ptr", "cb_ptr", "part_ptr", "loss_ptr", "lse_ptr", "stats_ptr", "g_ptr", "gmax_ptr", "acc_ptr"}
    fp32.add("sl_ptr")  # the three-branch kernels' score slabs
    if meta.get("SPLIT"):  # a split walk writes float32 partials
        fp32 |= {"dq_ptr", "dc_ptr"}
    consts = {k: v for k, v in meta.items() if k in kernel.arg_names}
    # constexprs left at their defaults, as a launch leaves them (else typed as runtime ints)
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    consts.update({k: v for k, v in defaults.items() if k not in consts})
    # What the launcher specialises on the benchmark's contiguous inputs: unit strides are
    # constants (vectorised loads; without this the compile keeps per-element addresses and
    # reports far more registers than the GPU will use), and pointers, the other strides and
    # R, N, D (multiples of 16 here) carry divisibility 16.
    unit = {"sq_d", "sc_d", "sdq_d", "sdc_d", "s_cid", "s_lq", "ex_ss", "s_tg"}
    consts.update({arg: 1 for arg in kernel.arg_names if arg in unit})
    sig = {}
    for arg in kernel.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = ptr.get(arg, "*fp32" if arg in fp32 else "*bf16")
        else:
            sig[arg] = "fp32" if arg == "temperature" else "i32"
    try:
        aligned = {
            (i,): [["tt.divisibility", 16]]
            for i, arg in enumerate(kernel.arg_names)
            if sig[arg].startswith("*") or arg in ALIGNED_INTS
        }
        ck = triton.compile(
            ASTSource(kernel, sig, constexprs=consts, attrs=aligned),
            target=GPUTarget("cuda", 90, 32),
            options=dict(
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
                **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
            ),
        )
        out = os.environ.get("OUT") or "/tmp"
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{label}.cubin")
        with open(path, "wb") as fh:
            fh.write(ck.asm["cubin"])
        res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
        regs = re.findall(r"REG:(\d+)", res.stdout)
        stack = re.findall(r"STACK:(\d+)", res.stdout)
        return dict(regs=regs[0] if regs else "?", stack=stack[0] if stack else "?", smem=ck.metadata.shared)
    except Exception as exc:  # report and go on: this mode only informs
        return dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")


def aot_report() -> int:
    """Compile our kernels for sm_90 without a GPU and print their resource use (and, with
    ``AOT_TILES=1``, the backward kernels at each tile of :data:`AOT_TILES` too)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    flags = dict(HAS_LQ=True, S_PAD=16, EX_ONE=True, IDS32=True, HOIST=True, PREC="tf32", FORM_KL=True, DETACH=True)
    flags["DL_K"] = K._dl_width(HIST)
    flags["LISTS"] = True
    kernels = [
        ("ce_fwd", K._ce_fwd_kernel, "fwd"),
        ("ce_dq", K._ce_dq_kernel, "dq"),
        ("ce_dc", K._ce_dc_kernel, "dc"),
        ("odmt_fwd", K._odmt_fwd_kernel, "fwd3"),
        ("odmt_dq", K._odmt_dq_kernel, "dq3"),
        ("odmt_dc", K._odmt_dc_kernel, "dc3"),
        # the dQ kernels forming and storing dz only (``_DQ_GEMM``), at the forward's tiles
        ("ce_dz", K._ce_dq_kernel, "dz"),
        ("odmt_dz", K._odmt_dq_kernel, "dz3"),
        # d past the full width (the paper scale): scores read from cuBLAS's slabs (_SCORE_GEMM)
        ("ce_fwd_scores", K._ce_fwd_kernel, "fwds"),
        ("ce_dz_scores", K._ce_dq_kernel, "dzs"),
        ("odmt_fwd_scores", K._odmt_fwd_kernel, "fwd3s"),
        ("odmt_dz_scores", K._odmt_dq_kernel, "dz3s"),
    ]
    cases = [("paper", 1536, 1664, 768), ("big", 16384, 16384, 256), ("huge", 65536, 65536, 128)]
    sweep = bool(os.environ.get("AOT_TILES"))
    for tag, R, N, d in cases:
        for name, kernel, kind in kernels:
            if tag == "huge" and "3" in kind or kind.endswith("s") and d <= K._FULL_D_MAX:
                continue
            rows, cols = (N, R) if kind.startswith("dc") else (R, N)
            base = K._config(kind, rows, cols, d, interpret=False)
            variants = [("", base)]
            if tag == "paper" and kind in ("dq3", "dc3"):  # small grids split their walk (_bwd_split)
                variants.append(("_split", {**base, "SPLIT": True}))
            if kind.startswith("dq"):  # a later slab of the GEMM dC path: dz stored
                variants.append(("_slab", {**base, "SLAB": True}))
            if kind.startswith("dz"):
                variants = [("_slab", {**base, "SLAB": True, "DQ_OFF": True})]
            if sweep and not kind.startswith("fwd"):
                for over in AOT_TILES:
                    cfg = {**base, **over}
                    if kind.startswith("dq") and cfg["BLOCK_T"] > 32:
                        cfg["TRANS_S"] = False  # TRANS_S is the 32 x 32 dq variant
                    if cfg != base:
                        variants.append((f"_{cfg['BLOCK_T']}x{cfg['BLOCK_W']}w{cfg['num_warps']}", cfg))
            for suffix, cfg in variants:
                meta = dict(flags, **K._tile_meta(cfg, not kind.startswith("dc"), not kind.startswith("fwd")))
                if R * N < (1 << 30):  # as on a GPU: no drop lists below 2^30 pairs
                    meta.update(DL_K=0, LISTS=False)
                meta["D_PAD"] = max(16, triton.next_power_of_2(d)) if cfg["FULL_D"] else cfg["BLOCK_D"]
                meta["TRANS_S"] = cfg.get("TRANS_S", False)
                meta["SPLIT"] = cfg.get("SPLIT", False)
                meta["SCORES_IN"] = kind.endswith("s")
                if cfg.get("SLAB"):
                    meta.update(STORE_DZ=True, DZ_TRUE=True, DQ_OFF=cfg.get("DQ_OFF", False))
                    if "LATER_SLAB" in kernel.arg_names:
                        meta["LATER_SLAB"] = meta["DL_K"] > 0
                label = f"{tag}_{name}{suffix}"
                if not re.search(os.environ.get("AOT_ONLY", ""), label):
                    continue
                info = _aot_compile(label, kernel, cfg, meta, cuobjdump)
                RES[f"aot_{label}"] = info
                tiles = " ".join(
                    f"{k}={cfg[k]}"
                    for k in ("BLOCK_T", "BLOCK_W", "BLOCK_DO", "FULL_D", "TRANS_S", "num_warps")
                    if k in cfg
                )
                print(f"{label:28s} {info}  {tiles}", flush=True)
    for br, bn in ((64, 64), (32, 32)):
        info = _aot_compile(
            f"flags_{br}x{bn}",
            K._flag_kernel,
            dict(num_warps=4, num_stages=1),
            dict(BLOCK_R=br, BLOCK_N=bn, BLOCK=K._FLAG_BLOCK),
            cuobjdump,
        )
        RES[f"aot_flags_{br}x{bn}"] = info
        print(f"{'flags_' + str(br) + 'x' + str(bn):28s} {info}", flush=True)
        info = _aot_compile(
            f"dense_{br}x{bn}",
            K._dense_kernel,
            dict(num_warps=4, num_stages=1),
            dict(DL_K=K._dl_width(HIST), BLOCK_R=br, BLOCK_N=bn, BLOCK=K._DENSE_BLOCK),
            cuobjdump,
        )
        RES[f"aot_dense_{br}x{bn}"] = info
        print(f"{'dense_' + str(br) + 'x' + str(bn):28s} {info}", flush=True)
    info = _aot_compile(  # the drop lists' builder at the 16k tiles (one launch a direction)
        "lists",
        K._row_lists_kernel,
        dict(num_warps=4, num_stages=1),
        dict(
            DL_K=K._dl_width(HIST), IDS=triton.next_power_of_2(HIST + 1), BLOCK=K._lists_block(K._dl_width(HIST)),
            BLOCK_N=64, TILE_LISTS=True,
        ),  # fmt: skip
        cuobjdump,
    )
    RES["aot_lists"] = info
    print(f"{'lists':28s} {info}", flush=True)
    dump()
    return 0


def main() -> int:
    if AOT:
        return aot_report()
    ceilings()
    ok = WARM_COMPILED or correctness()
    dump()
    if not ok and not CAPTURE:  # captured calls compute nothing: their values mean nothing
        print("bf16 CORRECTNESS CHECK FAILED (MISMATCH lines above): timing the kernels anyway", flush=True)
    if DRY:
        cases = [("dry", (24, 26, 16), True), ("dry_single", (33, 17, 20), False), ("dry_seq", (30, 32, 16), True)]
    else:
        cases = [
            ("paper", (1536, 1664, 768), True),
            ("big", (16384, 16384, 256), True),
            ("big_seq", (16380, 17472, 256), True),
            ("huge", (65536, 65536, 128), False),
        ]
    t0 = time.time()
    for tag, (R, N, d), odmt in cases:
        try:
            # *_seq: the collate_train layout, 15 positions (16 items) per user
            loss_case(R, N, d, tag, odmt, seq_users=R // 15 if tag.endswith("_seq") else 0)
        except Exception as exc:
            traceback.print_exc()
            RES[f"{tag}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if not DRY:
                torch.cuda.empty_cache()
        if not DRY:
            torch.cuda.empty_cache()
        dump()
    RES["seconds_cases"] = time.time() - t0
    print(f"(cases took {RES['seconds_cases']:.0f} s)", flush=True)
    if WARM_COMPILED:
        return 0
    try:
        tile_sweep()
    except Exception as exc:
        traceback.print_exc()
        RES["sweep_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if CAPTURE:
        return 0
    dump()
    if not ok:
        print("\nWARNING: these kernels FAILED the bf16 correctness check above", flush=True)
    table(cases)
    for name in ("ce", "odmt3"):
        t, ours, comp = (RES.get(f"paper_{name}_{k}_ms") for k in ("ours_graphed", "ours", "compiled"))
        if isinstance(t, float) and t > 0:
            line = f"paper_{name} in a CUDA graph (no host work): {t:.3f} ms"
            if isinstance(ours, float):
                line += f", {ours / t:.2f}x faster than the same call launched from Python"
            if isinstance(comp, float):
                line += f", {comp / t:.2f}x faster than torch.compile (launched from Python)"
            comp_graphed = RES.get(f"paper_{name}_compiled_graphed_ms")
            if isinstance(comp_graphed, float):
                line += f"; torch.compile in a CUDA graph {comp_graphed:.3f} ms ({comp_graphed / t:.2f}x ours)"
            dots = RES.get(f"paper_{name}_ours_dots_graphed_ms")
            if isinstance(dots, float):
                line += f"; with the kernels' own score dots (no cuBLAS score slabs) {dots:.3f} ms"
            print(line)
    dump()
    if not ok:
        print("bf16 CORRECTNESS CHECK FAILED: the times above are of kernels that compute wrong values", flush=True)
        return 1
    if not RES.get("agree_ok", True):
        print("OURS AND EAGER DISAGREE (see MISMATCH lines above)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

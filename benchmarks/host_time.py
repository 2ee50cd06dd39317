"""Host time of one eager forward + backward of each public kernel entry point, without a GPU.

At ODMT's sizes several calls wait on the host, not on their kernels (Runs 6 and 7 in
``benchmarks/RESULTS.md``: the paper-scale three-branch loss 5.45 ms launched from Python
against 0.86 ms replayed from a CUDA graph; the 4-head attention 1,383 us against 598 us).
This script measures that host work on any machine: Triton's driver is replaced by a
stand-in whose target is an H100 (sm_90), so every launch builds its arguments, specialises
and looks up (the first time: compiles, with Triton's own ptxas, cached in
``TRITON_CACHE_DIR``) the kernel exactly as on the GPU, then returns without launching; the
cuBLAS products (``torch.mm`` / ``torch.bmm`` with ``out=``) return at once. Everything else
runs as in a real call on CPU tensors: argument checks, the autograd function or the
custom op's dispatch, the launch code, the small tensor operations (at small sizes, so that
their arithmetic on the CPU stays small next to their dispatch).

For each entry point (single-branch CE, three-branch ODMT loss, attention) and each route
(``direct``: the plain autograd function eager calls take; ``custom op``: the registered op,
as under ``torch.compile``) it prints the median host milliseconds of a forward + backward,
the top-level aten operations of one call (on the GPU each is a kernel launch or a view) and
its Triton launches. Absolute times depend on the CPU (the lent GPU machines' is slower
than the CI's); compare routes and commits on one machine.

Sizes: R = N = 256, d = 64 for the losses (two dz slabs, as at the paper's 1,536 x 1,664;
the launch count depends on the tile configuration, not on the sizes), and the three-branch
loss once more past the full width (R = N = 128, d = 272: the paper's d = 768 path, score
slabs from cuBLAS, two a direction as there), 16 items x 4 heads x 81 tokens x 64 for the
attention (the 4 x 64 configuration, the most host-bound one).

Run: ``python benchmarks/host_time.py`` (the first run compiles the kernels for sm_90: a few
minutes on two cores). ``OUT=dir`` also writes ``dir/host_time.json``. Runs with Triton 3.6
(the GPU machines') and 3.9 (the CPU environment's); the stand-in driver uses Triton's
runtime interfaces (``triton.runtime.driver``, ``JITFunction.run``), which may move between
releases.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "0"  # compile for the stand-in target, not interpret

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402
from device_time import custom_op_route  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from odmt_components.kernels import attention as A  # noqa: E402
from odmt_components.kernels import inbatch_loss as K  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SMS = 132


class StandInDriver:
    """The parts of Triton's active driver a launch asks for, answering as an H100."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return H100

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


@contextlib.contextmanager
def stand_in_gpu(launches: collections.Counter):
    """Launches compiled for sm_90 and not run (counted in ``launches``), cuBLAS products
    skipped, and the kernels' launch rules told that the CPU tensors are on a 132-SM GPU."""
    run, mm, bmm = triton_jit.JITFunction.run, torch.mm, torch.bmm
    patches = [
        (K, "_interpreting", lambda t: False),
        # the three-branch score slabs: cuBLAS's products, skipped like the others
        (K, "_score_slab", lambda q3, c3, lo, hi: q3.new_empty(3, q3.shape[1], hi - lo, dtype=torch.float32)),
        (K, "_SM_OVERRIDE", H100_SMS),
        (A, "_num_sms", lambda device: H100_SMS),
        (A, "_check_device", lambda q: None),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]

    def compile_only(self, *args, grid, warmup, **kwargs):
        launches[self.fn.__name__] += 1
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    def product(fn):
        return lambda a, b, out=None, **kw: out if out is not None else fn(a, b, **kw)

    previous_driver = driver._active  # None until a launch asked for one (none on a CPU machine)
    driver.set_active(StandInDriver())
    triton_jit.JITFunction.run = compile_only
    torch.mm, torch.bmm = product(mm), product(bmm)
    for mod, name, value in patches:
        setattr(mod, name, value)
    try:
        yield
    finally:
        triton_jit.JITFunction.run = run
        torch.mm, torch.bmm = mm, bmm
        for mod, name, value in saved:
            setattr(mod, name, value)
        driver._active = previous_driver


def loss_calls(R: int = 256, N: int = 256, d: int = 64, dtype=torch.bfloat16):
    """The single-branch and three-branch fwd + bwd of a batch like the benchmarks' (15
    history exclusions a row, random log-popularity, repeated candidate ids)."""
    g = torch.Generator().manual_seed(0)
    cand = torch.randint(1, 4 * N, (N,), generator=g)
    target = torch.randint(0, N, (R,), generator=g)
    history = cand[torch.randint(0, N, (R, 15), generator=g)]
    log_q = torch.rand(N, generator=g).log()
    qs = [torch.randn(R, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    cs = [torch.randn(N, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]

    def ce():
        loss = K.debiased_inbatch_cross_entropy(qs[0], cs[0], target, cand, history, log_q, 0, -100, "mean")
        return torch.autograd.grad(loss, [qs[0], cs[0]])

    def odmt():
        out = K.mutual_distillation_loss(*qs, *cs, target, cand, history, log_q, 0.5, True, "kl", 0, -100, "mean")
        return torch.autograd.grad(out.ce + out.kl, qs + cs)

    return ce, odmt


def attention_call(items: int = 16, heads: int = 4, length: int = 81, dim: int = 64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(items, heads, length, dim, generator=g).to(dtype).requires_grad_() for _ in range(3))
    padding = torch.zeros(items, length, dtype=torch.bool)
    padding[:, 70:] = True
    grad_out = torch.randn(items, heads, length, dim, generator=g).to(dtype)

    def attention():
        out = A.id_masked_attention(q, k, v, padding, 0, 0.0, None, 0)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return attention


def top_level_aten_ops(fn) -> int:
    """aten operations of one call of ``fn`` not nested in another aten operation."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            parent = event.cpu_parent
            count += parent is None or not parent.name.startswith("aten::")
    return count


def measure(fn, launches: collections.Counter, calls: int = 40, repeats: int = 5) -> dict:
    for _ in range(3):  # compiles (first run) and warms the caches
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    launches.clear()
    ops = top_level_aten_ops(fn)
    return dict(host_ms=statistics.median(times), best_ms=min(times), aten_ops=ops, launches=dict(launches))


def main() -> dict:
    torch.set_num_threads(1)
    launches: collections.Counter = collections.Counter()
    results = {}
    with stand_in_gpu(launches):
        ce, odmt = loss_calls()
        calls = {
            "CE (R = N = 256, d = 64)": ce,
            "ODMT 3 branches (same)": odmt,
            # past the full width, as the paper's d = 768 (score slabs, two a direction, as
            # there); small R and N keep the CPU's share of the copies small
            "ODMT 3 branches, R = N = 128, d = 272": loss_calls(R=128, N=128, d=272)[1],
            "attention 16 x 4 x 81 x 64": attention_call(),
        }
        for label, fn in calls.items():
            results[f"{label} | direct"] = measure(fn, launches)
            with custom_op_route(A, K):
                results[f"{label} | custom op"] = measure(fn, launches)
    print(f"host time of one eager fwd + bwd, launches compiled for sm_90 and not run (torch {torch.__version__}, "
          f"triton {triton.__version__}, {os.cpu_count()} CPUs)")  # fmt: skip
    print("| call | route | host ms (median / best) | aten ops | Triton launches |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        label, route_name = key.split(" | ")
        n_launch = sum(r["launches"].values())
        print(f"| {label} | {route_name} | {r['host_ms']:.3f} / {r['best_ms']:.3f} | {r['aten_ops']} | {n_launch} |")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "host_time.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

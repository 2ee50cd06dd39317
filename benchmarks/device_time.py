"""Where one call's time goes: each GPU kernel's device time beside the call's wall time.

The benchmarks time whole calls (``do_bench``) and each kernel family alone; this adds, for
a few calls of the same function under ``torch.profiler``, the device time of every kernel
launched (CUPTI: Triton's kernels, the small preparation kernels, PyTorch's own), their sum,
and the wall time of the calls. A wall time well above the device sum means the call is
bound by the host (launch overhead, Python), which no kernel change fixes; a kernel that
takes most of the sum is the one to work on. On a machine without CUDA (the benchmarks' DRY
runs) the same code reports the CPU operators' own time, so the plumbing is exercised.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
from torch.profiler import ProfilerActivity, profile


def elapsed_ms(run: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one ``run()``: CUDA events around it, the device synchronised before and
    after (nothing inside it is), on a CUDA ``device``; the wall clock elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)
    begin = time.perf_counter()
    run()
    return (time.perf_counter() - begin) * 1e3


def kernel_breakdown(fn: Callable[[], object], grads: tuple = (), calls: int = 3, top: int = 12) -> dict:
    """Times ``calls`` calls of ``fn`` (after one warm-up call), then profiles as many.

    ``grads``: tensors whose ``.grad`` is reset before each call (as the timings do). Returns
    ``wall_us`` and ``device_us`` per call, and ``kernels``: the ``top`` kernels by time,
    each ``[launches per call, us per call]``, largest first, plus ``other`` for the rest.
    """
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def one_call() -> None:
        for g in grads:
            g.grad = None
        fn()

    one_call()
    sync()
    start = time.perf_counter()  # outside the profiler, whose own work would inflate it
    for _ in range(calls):
        one_call()
    sync()
    wall_s = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            one_call()
        sync()
    rows = []
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append((us / calls, event.count / calls, event.key))
    rows.sort(reverse=True)
    kernels = {name: [round(count, 2), round(us, 1)] for us, count, name in rows[:top]}
    rest = rows[top:]
    if rest:
        kernels["other"] = [round(sum(r[1] for r in rest), 2), round(sum(r[0] for r in rest), 1)]
    return dict(
        wall_us=round(wall_s / calls * 1e6, 1),
        device_us=round(sum(r[0] for r in rows), 1),
        kernels=kernels,
        unit="CUDA kernels" if cuda else "CPU operators (no CUDA here)",
    )


def record_breakdown(results: dict, key: str, fn: Callable[[], object], grads: tuple = ()) -> None:
    """:func:`kernel_breakdown` of ``fn`` into ``results[key + "_breakdown"]``, and logged; an
    error is recorded and logged instead of raised (a failed profile must not end a run)."""
    try:
        results[f"{key}_breakdown"] = report = kernel_breakdown(fn, tuple(grads))
        print(format_breakdown(key, report), flush=True)
    except Exception as exc:
        results[f"{key}_breakdown"] = f"ERR {type(exc).__name__}: {str(exc)[:200]}"
        print(f"{key} breakdown: ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def format_breakdown(key: str, report: dict) -> str:
    """A few lines for the log: the totals, then one line a kernel."""
    lines = [
        f"{key}: wall {report['wall_us']:,.1f} us a call, {report['unit']} {report['device_us']:,.1f} us "
        f"({report['device_us'] / max(report['wall_us'], 1e-9):.0%} of the wall time)"
    ]
    for name, (count, us) in report["kernels"].items():
        lines.append(f"    {us:11,.1f} us  x{count:<5g} {name[:90]}")
    return "\n".join(lines)


def graphed_ms(fn: Callable[[], object], grads: tuple = ()) -> float:
    """Median milliseconds of ``fn`` (a forward + backward) replayed from a CUDA graph: the
    device's own time, without the host's per-call work (Python, dispatch, launches), which a
    user removes the same way (``torch.cuda.graph`` around the training step, or
    ``torch.compile(mode="reduce-overhead")``). ``grads``: leaves whose ``.grad`` is reset
    before the warm-up calls and the capture and after the timing; the gradients are the
    graph's own buffers, rewritten each replay. CUDA only; capture errors propagate."""
    from triton.testing import do_bench

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                for g in grads:
                    g.grad = None
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for g in grads:
            g.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    finally:
        for g in grads:
            g.grad = None
        torch.cuda.synchronize()


@contextlib.contextmanager
def custom_op_route(*modules: ModuleType) -> Iterator[None]:
    """Inside the block, the public entry points of the kernel ``modules`` (``attention``,
    ``inbatch_loss``) take their registered custom ops, as under ``torch.compile``, instead of
    the direct route an eager call on plain tensors takes (``kernels/_device.py``): the
    benchmarks time both, so the host's share of a host-bound call shows."""
    saved = [(module, module.direct_eager_call) for module in modules]
    for module in modules:
        module.direct_eager_call = lambda *tensors: False
    try:
        yield
    finally:
        for module, original in saved:
            module.direct_eager_call = original

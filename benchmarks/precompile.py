"""Compile a benchmark's Triton kernels in parallel before it is timed.

A lent GPU comes with 15 minutes for everything, and the benchmarks compile their kernels one
after another the first time each configuration launches: one CPU core busy, the GPU idle,
and the sweeps' time budgets spent on compiling. Triton caches every compiled kernel on disk
(``TRITON_CACHE_DIR``), keyed by the kernel's source, its specialisation (argument types,
16-byte divisibility, constexprs) and the compile options, so a kernel compiled once by any
process loads from there in every later one. Two steps fill that cache on all cores:

1. **capture**: the benchmark runs with ``CAPTURE=specs.json`` in its environment. Each
   launch that would compile instead records the request (Triton's ``jit_cache_hook`` hands
   over the kernel and the exact ``specialization_data`` its launcher derived from the real
   arguments) and is skipped: nothing compiles, nothing launches, outputs stay
   uninitialised. The benchmarks take that mode into account (one call per timed function,
   no checks of values, no anchors, every sweep entry), so the pass costs seconds;
2. **compile**: ``python benchmarks/precompile.py specs.json [...]`` compiles every recorded
   request with ``JITFunction.preload`` (the path Triton offers for this) in a pool of
   processes, one per core but one.

The timed run then finds each kernel in the cache: same source, same arguments, same
specialisation, hence the same key. A request the capture could not see (a fallback tile
after ``OutOfResources``, which only a launch reports) still compiles when it is launched.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

_CAPTURED: dict[str, dict] = {}


def capture(path: str) -> None:
    """Record every compile request of this process instead of compiling and launching it;
    write them to ``path`` (JSON) at exit."""
    from triton import knobs

    def hook(*, key, fn, compile, **_) -> bool:
        _CAPTURED.setdefault(
            f"{fn.module}.{fn.name}:{key}",
            dict(module=fn.module, name=fn.name, spec=compile["specialization_data"]),
        )
        return True  # skip the compile, and with it the launch

    knobs.runtime.jit_cache_hook = hook

    def write() -> None:
        with open(path, "w") as fh:
            json.dump(list(_CAPTURED.values()), fh)
        print(f"precompile: captured {len(_CAPTURED)} kernel specialisations into {path}", flush=True)

    atexit.register(write)
    # a capture stopped by its step's timeout (SIGTERM) still writes what it recorded
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _jit_function(module: str, name: str):
    """The ``JITFunction`` named ``module.name``, unwrapped from autotune / heuristics
    decorators (a library's kernels: Liger, Cut Cross-Entropy)."""
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    while not hasattr(obj, "preload") and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _compile_one(item: dict) -> tuple[str, float, str]:
    """Compile one captured request (a worker process); returns (name, seconds, error)."""
    start = time.time()
    try:
        _jit_function(item["module"], item["name"]).preload(item["spec"])
    except Exception as exc:  # report it: the timed run compiles this one itself
        return item["name"], time.time() - start, f"{type(exc).__name__}: {str(exc)[:200]}"
    return item["name"], time.time() - start, ""


def compile_all(items: list[dict], workers: int) -> None:
    """Compile ``items`` in ``workers`` processes and report what failed (the timed run then
    compiles those itself)."""
    start = time.time()
    failed = 0
    took: list[tuple[float, str]] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(_compile_one, item) for item in items]):
            name, seconds, error = future.result()
            took.append((seconds, name))
            if error:
                failed += 1
                print(f"precompile: {name} failed: {error}", flush=True)
    slowest = ", ".join(f"{name} {seconds:.1f} s" for seconds, name in sorted(took, reverse=True)[:3])
    print(
        f"precompile: {len(items) - failed} of {len(items)} kernels compiled in {time.time() - start:.1f} s "
        f"on {workers} processes ({sum(s for s, _ in took):.1f} s of compiling in all; slowest {slowest})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="JSON files written by a benchmark run with CAPTURE=...")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    items: dict[str, dict] = {}
    for path in args.specs:
        if not os.path.exists(path):
            print(f"precompile: {path} is missing (its capture failed?); skipped", flush=True)
            continue
        with open(path) as fh:
            for item in json.load(fh):
                items.setdefault(item["module"] + item["spec"], item)
    if not items:
        print("precompile: nothing to compile", flush=True)
        return 0
    # the longest first keeps the pool busy to the end: the loss kernels are the big ones
    order = sorted(items.values(), key=lambda item: ("inbatch_loss" not in item["module"], item["name"]))
    compile_all(order, args.workers)
    return 0  # a failed compile only costs the timed run that compile


if __name__ == "__main__":
    sys.exit(main())

"""Triton cache keys computed callees first, so that every process derives the same ones.

Triton names a compiled kernel in its on-disk cache (``TRITON_CACHE_DIR``) by a key that
includes the kernel's source and, through each function it calls, the global ``constexpr``
values those use (here ``inbatch_loss._DL_END``). Triton 3.6 merges a called function's
globals into its caller's key only when the called function's own key was already computed,
which happens the first time any kernel calling it compiles: the same kernel got another key
in a process that compiled its kernels in another order, and missed the disk cache filled by
an earlier process (the benchmarks' parallel precompile, or a user's previous run). Computing
each key after those of the functions it calls gives every process the keys Triton 3.7 and
later compute anyway (they take the called function's key first).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from triton.runtime.jit import JITFunction

_NAME = re.compile(r"[A-Za-z_]\w*")


def _settle(fn: JITFunction, seen: set[int]) -> None:
    if id(fn) in seen:
        return
    seen.add(id(fn))
    for name in set(_NAME.findall(fn.src)):
        callee = fn.__globals__.get(name)
        if isinstance(callee, JITFunction):
            _settle(callee, seen)
    _ = fn.cache_key


def settle_cache_keys(values: Iterable[object]) -> None:
    """Compute the cache key of every ``@triton.jit`` function among ``values`` (e.g. a
    module's ``globals().values()``), each after the functions it calls by name. A no-op
    under ``TRITON_INTERPRET=1``, whose functions are not ``JITFunction``\\ s, and for a key
    computed before (the first computation is kept)."""
    seen: set[int] = set()
    for value in list(values):
        if isinstance(value, JITFunction):
            _settle(value, seen)

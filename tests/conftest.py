"""Test set-up shared by the whole suite.

Without a CUDA device the Triton kernels run in the interpreter, which must be switched on
before triton decorates any kernel, hence before any test module imports the kernels.
Hypothesis profiles: ``ci`` (few examples; each kernel example costs seconds in the
interpreter), ``dev`` (more examples, for local runs) and ``gpu`` (for a lent GPU). ``HYPOTHESIS_PROFILE`` picks one;
the default is ``ci`` under CI (the ``CI`` variable is set) and ``dev`` elsewhere.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# On a lent GPU every new shape compiles kernels: few examples, and no shrinking, so that a
# failure is reported at once instead of after minutes of recompiling smaller cases.
settings.register_profile(
    "gpu",
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# Operators whose result the host must wait for on a CUDA device: a scalar read (``item``,
# ``bool(t)``, ``int(t)``, ``float(t)``) or an output whose shape depends on the values.
_HOST_READ_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
    }
)


@pytest.fixture
def host_reads(monkeypatch):
    """``record(fn)`` runs ``fn`` and returns the host's reads of device values in it (the
    operators' names, and ``"Tensor.tolist"`` for each ``tolist`` call), i.e. what would
    keep the host waiting for a CUDA device and what a CUDA-graph capture refuses. Seen on
    the CPU: every operator through the profiler, including those inside custom ops, and
    ``Tensor.tolist`` (which runs no operator on a CPU tensor) by a patch. Not seen:
    ``.cpu()`` / ``.numpy()`` copies, which the Triton interpreter itself makes."""

    def record(fn) -> list[str]:
        reads: list[str] = []
        original = torch.Tensor.tolist

        def tolist(self):
            reads.append("Tensor.tolist")
            return original(self)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", original)
        return reads + [event.name for event in prof.events() if event.name in _HOST_READ_OPS]

    return record

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

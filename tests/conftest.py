"""Test set-up shared by the whole suite.

Without a CUDA device the Triton kernels run in the interpreter, which must be switched on
before triton decorates any kernel, hence before any test module imports the kernels.
Hypothesis profiles: ``ci`` (few examples; each kernel example costs seconds in the
interpreter) and ``dev`` (more examples, for local runs). ``HYPOTHESIS_PROFILE`` picks one;
the default is ``ci`` under CI (the ``CI`` variable is set) and ``dev`` elsewhere.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

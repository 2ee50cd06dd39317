"""``benchmarks/device_time.py``: the per-kernel breakdown the GPU benchmarks print (here on
the CPU, where it reports the operators' own time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "device_time.py"
_spec = importlib.util.spec_from_file_location("device_time", _PATH)
device_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_time)


def test_breakdown_counts_launches_per_call_and_resets_grads():
    a = torch.randn(64, 64, requires_grad=True)
    seen_grads = []

    def step():
        seen_grads.append(a.grad)
        ((a @ a) @ a).sum().backward()

    report = device_time.kernel_breakdown(step, grads=(a,), calls=3, top=50)
    assert seen_grads == [None] * 7  # the warm-up, three timed and three profiled calls each start clean
    assert report["kernels"]["aten::mm"][0] == 6  # two forward products, four in the backward
    total = sum(us for _, us in report["kernels"].values())
    assert abs(total - report["device_us"]) <= 0.1 * len(report["kernels"]) + 1e-6
    # (no order between the two here: the operators' CPU time is taken under the profiler,
    # whose own work inflates it, the wall time outside it)
    assert report["device_us"] > 0 and report["wall_us"] > 0


def test_breakdown_folds_the_tail_into_other():
    a = torch.randn(32, 32)
    report = device_time.kernel_breakdown(lambda: (a @ a).relu().sum().exp(), calls=2, top=1)
    assert len(report["kernels"]) == 2 and "other" in report["kernels"]
    lines = device_time.format_breakdown("case", report).splitlines()
    assert lines[0].startswith("case: wall ") and len(lines) == 3


def test_elapsed_ms_times_one_call_on_the_wall_clock_without_cuda():
    import time

    calls = []
    ms = device_time.elapsed_ms(lambda: (calls.append(1), time.sleep(0.02)), torch.device("cpu"))
    assert calls == [1] and 20.0 <= ms < 2000.0


def test_custom_op_route_switches_the_entry_points_and_restores_them():
    from odmt_components.kernels import attention as A
    from odmt_components.kernels import inbatch_loss as K

    plain = torch.zeros(2)
    assert A.direct_eager_call(plain) and K.direct_eager_call(plain)
    with pytest.raises(KeyError), device_time.custom_op_route(A, K):
        assert not A.direct_eager_call(plain) and not K.direct_eager_call(plain)
        q = torch.randn(1, 1, 5, 16, requires_grad=True)
        out = A.id_masked_attention(q, q, q, None, None, 0.0, None, 0)
        assert "_DirectAttention" not in type(out.grad_fn).__name__
        raise KeyError("the block left by an error")
    assert A.direct_eager_call(plain) and K.direct_eager_call(plain)

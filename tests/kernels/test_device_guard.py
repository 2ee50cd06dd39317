"""Every custom op launches its kernels on the device of its inputs (``kernels/_device.py``):
Triton launches on the *current* CUDA device, so tensors on another GPU would be read from
the wrong one. No second GPU here: the guard itself is checked on a stand-in CUDA tensor,
and the ops are checked to enter it with their first tensor (interpreter, CPU tensors)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from odmt_components.kernels import _device
from odmt_components.kernels import attention as A
from odmt_components.kernels import inbatch_loss as K


def test_the_guard_makes_a_cuda_tensors_device_current_and_does_nothing_on_the_cpu():
    on_gpu_1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    guard = _device.on_device_of(on_gpu_1)  # (built, not entered: no GPU here)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_device.on_device_of(torch.zeros(1)), contextlib.nullcontext)


def test_every_op_launches_inside_the_guard_of_its_first_tensor(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording(tensor):
        entered.append(tensor)
        yield

    monkeypatch.setattr(K, "on_device_of", recording)
    monkeypatch.setattr(A, "on_device_of", recording)
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(6, 8, generator=g).requires_grad_() for _ in range(3)]
    cs = [torch.randn(7, 8, generator=g).requires_grad_() for _ in range(3)]
    target, ids = torch.tensor([0, 2, 3, -100, 5, 6]), torch.arange(1, 8)
    K.debiased_inbatch_cross_entropy(qs[0], cs[0], target, ids, None, None, 0, -100, "mean").backward()
    assert [t is qs[0] for t in entered] == [True, True]  # forward, backward
    entered.clear()
    out = K.mutual_distillation_loss(*qs, *cs, target, ids, None, None, 0.5, True, "kl", 0, -100, "mean")
    (out.ce + out.kl).backward()
    assert len(entered) == 2 and all(t is qs[0] for t in entered)
    entered.clear()
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g).requires_grad_() for _ in range(3))
    A.id_masked_attention(q, k, v, None, 1, 0.0, 0.25, 0).sum().backward()
    assert len(entered) == 2 and all(t is q for t in entered)


def test_interpreter_problem_names_triton_before_3_7_with_numpy_2_4():
    problem = _device.interpreter_problem("3.6.0", "2.4.1")
    assert "numpy<2.4" in problem and "triton>=3.7" in problem and "9171" in problem
    for triton_version, numpy_version in (("3.6.0", "2.3.5"), ("3.7.1", "2.4.1"), ("3.9.0", "2.4.6"), ("4.0.0", "3.0")):
        assert _device.interpreter_problem(triton_version, numpy_version) is None
    assert _device.interpreter_problem("3.6.0+git1a2b", "2.4.0rc1") is not None
    assert _device.interpreter_problem("main", "2.4.1") is None  # unreadable: no verdict, no error


def test_every_op_on_cpu_tensors_raises_the_interpreter_problem_before_launching(monkeypatch):
    """An interpreter that cannot run the kernels is named before any launch, instead of the
    interpreter's own TypeError from inside a kernel."""
    monkeypatch.setattr(_device, "_installed_interpreter_problem", lambda: "the stand-in problem")
    launched = []
    monkeypatch.setattr(K, "_launch", lambda *args, **kwargs: launched.append(args))
    monkeypatch.setattr(A, "_launch_short", lambda *args, **kwargs: launched.append(args))
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(4, 8, generator=g) for _ in range(3)]
    target, ids = torch.tensor([0, 2, 3, 1]), torch.arange(1, 6)
    qkv = [torch.randn(1, 2, 5, 16, generator=g) for _ in range(3)]
    calls = (
        lambda: K.debiased_inbatch_cross_entropy(qs[0], qs[1], target, ids[:4], None, None, 0, -100, "mean"),
        lambda: K.mutual_distillation_loss(*qs, *qs, target, ids[:4], None, None, 0.5, True, "kl", 0, -100, "mean"),
        lambda: A.id_masked_attention(*qkv, None, 1, 0.0, None, 0),
    )
    for call in calls:
        with pytest.raises(RuntimeError, match="the stand-in problem"):
            call()
    assert launched == []

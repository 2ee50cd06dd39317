"""The two routes of each public kernel entry point (``kernels/_device.py``,
:func:`direct_eager_call`): eager calls on plain tensors run the launch functions through a
plain ``torch.autograd.Function``; everything else (``torch.compile`` tracing, fake tensors,
dispatch modes, functorch transforms, tensor subclasses) through the registered custom op.
Both must give the same numbers, bit for bit (the same kernels on the same inputs)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from odmt_components.kernels import _device
from odmt_components.kernels import attention as A
from odmt_components.kernels import inbatch_loss as K


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_direct_route_only_for_plain_eager_tensors():
    plain = torch.zeros(2)
    assert _device.direct_eager_call(plain, None, torch.nn.Parameter(torch.zeros(2)))
    assert not _device.direct_eager_call(plain, plain.as_subclass(_Subclass))
    with _Passthrough():
        assert not _device.direct_eager_call(plain)
    with FakeTensorMode() as mode:
        assert not _device.direct_eager_call(mode.from_tensor(plain))
    seen = []

    def probe(x):
        seen.append(_device.direct_eager_call(x))
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=True)(plain)
    torch.func.vmap(probe)(torch.zeros(3, 2))
    torch.jit.trace(probe, (plain,), check_trace=False)  # (its check runs probe again, untraced)
    assert seen == [False, False, False]


def _forced_op_route(monkeypatch, module):
    monkeypatch.setattr(module, "direct_eager_call", lambda *tensors: False)


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs)


def _attention_run(q, k, v, pad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = A.id_masked_attention(q, k, v, pad, 2, 0.25, None, 7)
    grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return out.detach(), _grads((out * grad_out).sum(), (q, k, v)), type(out.grad_fn).__name__


def test_attention_routes_agree(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    direct = _attention_run(q, k, v, pad)
    _forced_op_route(monkeypatch, A)
    via_op = _attention_run(q, k, v, pad)
    assert "_DirectAttention" in direct[2] and "_DirectAttention" not in via_op[2]
    assert torch.equal(direct[0], via_op[0])
    for a, b in zip(direct[1], via_op[1], strict=True):
        assert torch.equal(a, b)


def _loss_batch(branches: int):
    g = torch.Generator().manual_seed(5)
    qs = [torch.randn(13, 20, generator=g) for _ in range(branches)]
    cs = [torch.randn(40, 20, generator=g) for _ in range(branches)]
    ids = torch.randint(1, 25, (40,), generator=g)
    ids[::7] = 0  # padding
    target = torch.randint(0, 40, (13,), generator=g)
    target = torch.where(ids[target] == 0, -100, target)
    target[4] = -100
    exclude = torch.randint(0, 25, (13, 3), generator=g)
    log_q = torch.rand(40, generator=g).log()
    return qs, cs, target, ids, exclude, log_q


def _loss_run(branches: int, prep_calls: list):
    qs, cs, target, ids, exclude, log_q = _loss_batch(branches)
    leaves = [x.requires_grad_() for x in qs + cs]
    prep_calls.clear()
    if branches == 1:
        loss = K.debiased_inbatch_cross_entropy(qs[0], cs[0], target, ids, exclude, log_q, 0, -100, "mean")
    else:
        out = K.mutual_distillation_loss(*qs, *cs, target, ids, exclude, log_q, 0.7, False, "kl", 0, -100, "mean")
        loss = out.ce + 0.3 * out.kl
    grads = _grads(loss, leaves)
    return loss.detach(), grads, len(prep_calls)


@pytest.mark.parametrize("branches", [1, 3])
def test_loss_routes_agree_and_the_direct_backward_reuses_the_forwards_prep(monkeypatch, branches):
    prep_calls = []
    real_prep = K._prep

    def counting_prep(*args):
        prep_calls.append(1)
        return real_prep(*args)

    monkeypatch.setattr(K, "_prep", counting_prep)
    direct = _loss_run(branches, prep_calls)
    _forced_op_route(monkeypatch, K)
    via_op = _loss_run(branches, prep_calls)
    assert (direct[2], via_op[2]) == (1, 2)  # the op route's backward prepares again
    assert torch.equal(direct[0], via_op[0])
    for a, b in zip(direct[1], via_op[1], strict=True):
        assert torch.equal(a, b)


def test_a_jit_trace_records_the_custom_op():
    """Traced, the entry point must leave the op in the graph (a trace of the direct route
    would hold the output's allocation and not the launch that fills it)."""

    def attend(q):
        return A.id_masked_attention(q, q, q, None, 1, 0.0, None, 0)

    q = torch.randn(1, 2, 5, 16)
    traced = torch.jit.trace(attend, (q,))
    assert "odmt::id_masked_attention" in str(traced.graph)
    other = torch.randn(1, 2, 5, 16)
    assert torch.equal(traced(other), attend(other))

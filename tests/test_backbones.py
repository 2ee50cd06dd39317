"""Tests of odmt_components.backbones: causality, padding invariance, gradients, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from odmt_components.backbones import GRU4Rec, NextItNet, SASRec, build_backbone

DIM, MAX_LEN = 8, 10
ATOL = 1e-5  # float32 forward passes of identical math on differently shaped inputs
NAMES = ["sasrec", "gru4rec", "nextitnet"]


@functools.cache
def _cached_model(name: str) -> torch.nn.Module:
    """One eval-mode model per backbone, shared by hypothesis examples (read-only use)."""
    return _model(name)


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {"dilations": (1, 2)} if name == "nextitnet" else {}
    return build_backbone(name, DIM, MAX_LEN, dropout=0.1, **kw).eval()


def _left_padding(lengths: list[int], seq_len: int) -> torch.Tensor:
    index = torch.arange(seq_len)[None, :]
    return index < (seq_len - torch.tensor(lengths))[:, None]


@pytest.mark.parametrize("name", NAMES)
@given(
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    extra_pad=st.integers(0, 3),
    cut=st.integers(0, 6),
    seed=st.integers(0, 1000),
)
def test_causal_and_padding_invariant(name, lengths, extra_pad, cut, seed):
    model = _cached_model(name)
    gen = torch.Generator().manual_seed(seed)
    seq_len = 7
    x = torch.randn(len(lengths), seq_len, DIM, generator=gen)
    padding = _left_padding(lengths, seq_len)
    with torch.no_grad():
        out = model(x, padding)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        # Padded positions output zeros.
        assert torch.count_nonzero(out[padding]) == 0
        # Features at padded positions do not matter.
        noisy = torch.where(padding[..., None], 100 * torch.randn(x.shape, generator=gen), x)
        torch.testing.assert_close(model(noisy, padding), out, atol=ATOL, rtol=0)
        # More left padding does not change the valid outputs.
        wider = torch.cat([torch.randn(len(lengths), extra_pad, DIM, generator=gen), x], 1)
        wider_pad = torch.cat([torch.ones(len(lengths), extra_pad, dtype=torch.bool), padding], 1)
        torch.testing.assert_close(model(wider, wider_pad)[:, extra_pad:], out, atol=ATOL, rtol=0)
        # Causality: changing positions > cut leaves positions <= cut unchanged.
        later = x.clone()
        later[:, cut + 1 :] = torch.randn(later[:, cut + 1 :].shape, generator=gen)
        torch.testing.assert_close(model(later, padding)[:, : cut + 1], out[:, : cut + 1],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_output_depends_on_earlier_items_and_gradients_flow(name):
    torch.manual_seed(1)
    model = _model(name).train()
    x = torch.randn(3, 6, DIM, requires_grad=True)
    padding = _left_padding([6, 3, 1], 6)
    out = model(x, padding)
    out.square().sum().backward()
    assert x.grad is not None
    # Valid inputs get gradient; padded inputs get none.
    assert (x.grad[~padding].abs().sum(-1) > 0).all()
    assert torch.count_nonzero(x.grad[padding]) == 0
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # The last state reads the first item (context is actually used).
    model.eval()
    with torch.no_grad():
        changed = x.detach().clone()
        changed[0, 0] += torch.randn(DIM)
        assert not torch.allclose(model(changed, padding)[0, -1], model(x.detach(), padding)[0, -1])


def test_sasrec_pre_ln_and_positions_right_aligned():
    torch.manual_seed(0)
    model = SASRec(DIM, MAX_LEN, n_layers=1, n_heads=2, dropout=0.0, norm_first=True).eval()
    x = torch.randn(2, 4, DIM)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    with torch.no_grad():
        out = model(x, padding)
        # Same items as the first 4 of a length-5 input end one position earlier, so they use
        # other position embeddings: the outputs differ (positions are right-aligned).
        longer = torch.cat([x, torch.randn(2, 1, DIM)], 1)
        assert not torch.allclose(model(longer, torch.zeros(2, 5, dtype=torch.bool))[:, :4], out)
    with pytest.raises(ValueError, match="exceeds max_seq_len = 10"):
        model(torch.randn(1, 11, DIM), torch.zeros(1, 11, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name):
    model = _model(name)
    x = torch.randn(2, 4, DIM)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"item_vectors must have shape \(B, S, 8\)"):
        model(torch.randn(2, 4, DIM + 1), pad)
    with pytest.raises(ValueError, match=r"padding must have shape \(B, S\) = \(2, 4\)"):
        model(x, pad[:, :3])
    with pytest.raises(TypeError, match=r"padding must be a bool tensor"):
        model(x, pad.long())
    with pytest.raises(TypeError, match=r"item_vectors must be a floating tensor"):
        model(x.long(), pad)
    with pytest.raises(ValueError, match="empty batch"):
        model(x[:0], pad[:0])
    right_padded = pad.clone()
    right_padded[0, -1] = True
    with pytest.raises(ValueError, match="left padding"):
        model(x, right_padded)


def test_constructors_and_registry():
    assert isinstance(build_backbone("SASRec", DIM, MAX_LEN, n_layers=1), SASRec)
    assert isinstance(build_backbone("gru4rec", DIM, MAX_LEN, n_layers=2), GRU4Rec)
    net = build_backbone("nextitnet", DIM, MAX_LEN, dilations=(1, 2, 4), kernel_size=2)
    assert isinstance(net, NextItNet) and len(net.blocks) == 3
    with pytest.raises(ValueError, match="unknown backbone 'bert4rec'"):
        build_backbone("bert4rec", DIM, MAX_LEN)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        SASRec(6, MAX_LEN, n_heads=4)
    with pytest.raises(ValueError, match="dropout must be in"):
        GRU4Rec(DIM, dropout=1.0)
    with pytest.raises(ValueError, match="dilations must be positive ints"):
        NextItNet(DIM, dilations=(0,))


@pytest.mark.parametrize("name", ["sasrec", "nextitnet"])
def test_compiles_whole(name):
    """``torch.compile(fullgraph=True)``: the left-padding check is a device assertion there
    (GRU4Rec is left out: Dynamo does not trace ``nn.GRU`` by default)."""
    torch.manual_seed(0)
    model = build_backbone(name, 16, 6, dropout=0.0)
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, :2] = True
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, padding), model(x, padding), rtol=1e-4, atol=1e-5)
    padding[1, 3] = True  # padding after a valid item
    with pytest.raises(RuntimeError, match="left padding"):
        compiled(x, padding)

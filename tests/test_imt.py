"""IMT: layout invariance, the ID rule, padding, ID-table initialisation, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from odmt_components import IMT, init_id_embedding

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 throughout


def make_imt(**kwargs) -> IMT:
    torch.manual_seed(0)
    options = dict(dim=16, n_layers=2, n_heads=2, dropout=0.0, attn_dropout=0.0)
    options.update(kwargs)
    return IMT(6, 5, 9, **options).double().eval()


@st.composite
def items(draw):
    batch = draw(st.integers(1, 4))
    text_len = draw(st.integers(1, 6))
    image_len = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    text = torch.randn(batch, text_len, 6, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, text_len + 1, (batch,), generator=g)
    padding = torch.arange(text_len)[None, :] >= lengths[:, None]
    image = torch.randn(batch, image_len, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 10, (batch,), generator=g)
    return text, padding, image, ids


@given(items(), st.booleans(), st.booleans())
def test_output_does_not_depend_on_token_layout(inputs, id_mask, norm_first):
    model = make_imt(id_mask=id_mask, norm_first=norm_first)
    paper = model(*inputs)
    model.token_layout = "reference"
    reference = model(*inputs)
    for a, b in zip(paper, reference, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@given(items())
def test_id_mask_keeps_modality_outputs_independent_of_the_id_token(inputs):
    text, padding, image, ids = inputs
    model = make_imt(id_mask=True)
    before = model(text, padding, image, ids)
    other_ids = ids % 9 + 1  # a different row of the ID table for every item
    after = model(text, padding, image, other_ids)
    torch.testing.assert_close(before.text, after.text, **TOL)
    torch.testing.assert_close(before.image, after.image, **TOL)
    assert not torch.allclose(before.id, after.id)


def test_without_id_mask_the_id_token_reaches_the_modalities():
    text = torch.randn(3, 4, 6, dtype=torch.float64)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    image = torch.randn(3, 2, 5, dtype=torch.float64)
    model = make_imt(id_mask=False)
    before = model(text, padding, image, torch.tensor([1, 2, 3]))
    after = model(text, padding, image, torch.tensor([4, 5, 6]))
    assert not torch.allclose(before.text, after.text)


@given(items())
def test_padding_tokens_never_change_any_output(inputs):
    text, padding, image, ids = inputs
    model = make_imt()
    before = model(text, padding, image, ids)
    noisy = text.clone()
    noisy[padding] = torch.randn(int(padding.sum()), 6, dtype=torch.float64) * 100
    after = model(noisy, padding, image, ids)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_item_whose_text_is_only_its_cls():
    model = make_imt()
    text = torch.randn(2, 5, 6, dtype=torch.float64)
    padding = torch.ones(2, 5, dtype=torch.bool)
    padding[:, 0] = False
    out = model(text, padding, torch.randn(2, 3, 5, dtype=torch.float64), torch.tensor([1, 2]))
    assert all(torch.isfinite(o).all() for o in out)


def test_without_id_branch():
    model = make_imt(use_id=False)
    out = model(
        torch.randn(2, 3, 6, dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.bool),
        torch.randn(2, 2, 5, dtype=torch.float64),
    )
    assert out.id is None and out.text.shape == (2, 16)
    assert not hasattr(model, "id_embedding")


def test_gradients_reach_every_projection_and_head():
    model = make_imt().train()
    out = model(
        torch.randn(3, 4, 6, dtype=torch.float64),
        torch.zeros(3, 4, dtype=torch.bool),
        torch.randn(3, 2, 5, dtype=torch.float64),
        torch.tensor([1, 2, 3]),
    )
    sum(o.sum() for o in out).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_backend_switch():
    model = make_imt()
    assert model.backend == "auto"
    model.backend = "torch"
    assert all(layer.backend == "torch" for layer in model.layers)
    with pytest.raises(ValueError, match="backend"):
        model.backend = "cuda"


@pytest.mark.parametrize("mode", ["mean", "text", "image", "random"])
def test_init_id_embedding(mode):
    table = torch.nn.Embedding(5, 3, padding_idx=0)
    text_cls = torch.randn(4, 3)
    image_cls = torch.randn(5, 3)  # with the padding row: the last 4 rows are used
    init_id_embedding(table, text_cls, image_cls, mode)
    assert not table.weight[0].any()
    expected = {"mean": (text_cls + image_cls[1:]) / 2, "text": text_cls, "image": image_cls[1:]}.get(mode)
    if expected is not None:
        torch.testing.assert_close(table.weight[1:].detach(), expected)


def test_init_id_embedding_rejects_mismatched_widths():
    table = torch.nn.Embedding(5, 3)
    with pytest.raises(ValueError, match="image_cls"):
        init_id_embedding(table, torch.randn(4, 3), torch.randn(4, 7), "mean")
    with pytest.raises(ValueError, match="mode"):
        init_id_embedding(table, torch.randn(4, 3), torch.randn(4, 3), "median")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: a.update(text=a["text"][..., :5]), ValueError, "text_tokens"),
        (lambda a: a.update(padding=a["padding"][:, :2]), ValueError, "text_padding"),
        (lambda a: a.update(padding=a["padding"].long()), ValueError, "text_padding"),
        (lambda a: a.update(image=a["image"][:1]), ValueError, "image_tokens"),
        (lambda a: a.update(image=a["image"].float()), TypeError, "dtype"),
        (lambda a: a.update(text=a["text"].float(), image=a["image"].float()), TypeError, "parameters torch.float64"),
        (lambda a: a.update(text=a["text"].tolist()), TypeError, "text_tokens must be a torch.Tensor"),
        (lambda a: a.update(padding=None), TypeError, "text_padding must be a torch.Tensor"),
        (lambda a: a.update(ids=torch.tensor([1, 10])), ValueError, "item_ids"),
        (lambda a: a.update(ids=None), ValueError, "item_ids"),
        (lambda a: a["padding"].__setitem__((0, 0), True), ValueError, "CLS"),
        (lambda a: a["text"].__setitem__((0, 1, 2), float("nan")), ValueError, "NaN"),
        (lambda a: a["image"].__setitem__((1, 0, 0), float("inf")), ValueError, "NaN or inf"),
    ],
)
def test_bad_input(change, error, message):
    arguments = dict(
        text=torch.randn(2, 3, 6, dtype=torch.float64),
        padding=torch.zeros(2, 3, dtype=torch.bool),
        image=torch.randn(2, 2, 5, dtype=torch.float64),
        ids=torch.tensor([1, 2]),
    )
    change(arguments)
    with pytest.raises(error, match=message):
        make_imt()(arguments["text"], arguments["padding"], arguments["image"], arguments["ids"])


def test_bad_construction():
    with pytest.raises(ValueError, match="token_layout"):
        IMT(6, 5, 9, dim=16, token_layout="random")
    with pytest.raises(ValueError, match="divisible"):
        IMT(6, 5, 9, dim=15, n_heads=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        IMT(6, 5, 9, dim=16, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_whole_in_training_mode(backend):
    """``torch.compile(fullgraph=True)`` of the IMT in training mode (attention dropout
    included: its seed is drawn without reading a tensor, and the input checks are device
    assertions there); in eval mode the compiled IMT gives eager's outputs and gradients."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # interpreter: CPU only
    torch.manual_seed(0)
    imt = IMT(6, 5, 9, dim=16, n_layers=1, n_heads=2, dropout=0.0, attn_dropout=0.2, backend=backend).to(device)
    g = torch.Generator().manual_seed(3)
    text, image = torch.randn(3, 4, 6, generator=g).to(device), torch.randn(3, 2, 5, generator=g).to(device)
    padding = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool, device=device)
    ids = torch.tensor([1, 5, 9], device=device)

    def encode(text, image):
        out = imt(text, padding, image, ids)
        return out.id.square().sum() + out.text.square().sum() + out.image.sum()

    torch._dynamo.reset()
    compiled = torch.compile(encode, fullgraph=True)
    loss = compiled(text, image)
    loss.backward()
    assert torch.isfinite(loss) and imt.id_embedding.weight.grad[ids].abs().sum() > 0
    imt.eval().zero_grad()
    want = encode(text, image)
    want_grads = torch.autograd.grad(want, list(imt.parameters()), allow_unused=True)
    got = compiled(text, image)
    got_grads = torch.autograd.grad(got, list(imt.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"item_ids must lie in \[0, 10\)"):
        bad_ids = torch.tensor([1, 5, 10], device=device)
        torch.compile(lambda t, i: imt(t, padding, i, bad_ids).text, fullgraph=True)(text, image)

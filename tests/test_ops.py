"""odmt_components.ops: the PyTorch path against slow, loop-by-loop definitions of SPEC, the
structural properties of the ops, and the input validation."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from odmt_components import ops
from odmt_components.kernels.reference import BRANCHES, mutual_distillation_reference

FP64 = dict(rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------
# slow definitions, written from SPEC sections 1, 3 and 4 one row at a time
# --------------------------------------------------------------------------------------


def slow_attention(q, k, v, key_padding_mask, id_index, scale):
    batch, heads, length, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                keys = [
                    j
                    for j in range(length)
                    if not (key_padding_mask is not None and key_padding_mask[b, j])
                    and not (id_index is not None and j == id_index and i != id_index)
                ]
                if not keys:
                    continue
                scores = torch.stack([q[b, h, i] @ k[b, h, j] * scale for j in keys])
                weights = torch.softmax(scores, 0)
                out[b, h, i] = sum(w * v[b, h, j] for w, j in zip(weights, keys, strict=True))
    return out


def slow_allowed_columns(r, target, candidate_ids, exclude_ids, pad_id):
    t = int(target[r])
    target_item = int(candidate_ids[t])
    history = set() if exclude_ids is None else {int(x) for x in exclude_ids[r]}
    allowed = []
    for j, item in enumerate(candidate_ids.tolist()):
        if j == t:
            allowed.append(j)
        elif item == pad_id or item == target_item or item in history:
            continue
        else:
            allowed.append(j)
    return allowed


def slow_row_logits(queries, candidates, log_q, r, columns):
    z = torch.stack([queries[r] @ candidates[j] for j in columns])
    if log_q is not None:
        z = z - log_q[columns]
    return z


def slow_inbatch_ce(queries, candidates, target, candidate_ids, exclude_ids, log_q, pad_id=0, ignore_index=-100):
    losses = []
    for r in range(queries.shape[0]):
        if int(target[r]) == ignore_index:
            continue
        columns = slow_allowed_columns(r, target, candidate_ids, exclude_ids, pad_id)
        z = slow_row_logits(queries, candidates, log_q, r, columns)
        losses.append(torch.logsumexp(z, 0) - z[columns.index(int(target[r]))])
    return torch.stack(losses).mean() if losses else queries.new_zeros(())


def slow_distillation(queries, candidates, target, candidate_ids, exclude_ids, log_q, temperature, form):
    ce = {m: [] for m in BRANCHES}
    kl = {"kl_id_text": [], "kl_id_image": [], "kl_ensemble_id": []}

    def term(teacher, student):
        p = torch.softmax(teacher / temperature, 0)
        log_s = torch.log_softmax(student / temperature, 0)
        value = (p * (torch.log(p) - log_s)).sum() if form == "kl" else -(p * log_s).sum()
        return value * temperature**2

    for r in range(target.shape[0]):
        if int(target[r]) == -100:
            continue
        columns = slow_allowed_columns(r, target, candidate_ids, exclude_ids, 0)
        z = {m: slow_row_logits(queries[m], candidates[m], log_q, r, columns) for m in BRANCHES}
        position = columns.index(int(target[r]))
        for m in BRANCHES:
            ce[m].append(torch.logsumexp(z[m], 0) - z[m][position])
        ensemble = (z["id"] + z["text"] + z["image"]) / 3
        kl["kl_id_text"].append(term(z["id"], z["text"]))
        kl["kl_id_image"].append(term(z["id"], z["image"]))
        kl["kl_ensemble_id"].append(term(ensemble, z["id"]))
    return {k: torch.stack(v).mean() for k, v in {**{f"ce_{m}": ce[m] for m in BRANCHES}, **kl}.items()}


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------


@st.composite
def inbatch_problems(draw, branches: bool = False):
    rows = draw(st.integers(1, 7))
    columns = draw(st.integers(2, 9))
    width = draw(st.integers(1, 5))
    n_items = draw(st.integers(2, 6))  # few items -> many duplicates among candidates
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    candidate_ids = torch.randint(0, n_items, (columns,), generator=g)
    real = (candidate_ids != 0).nonzero().flatten()
    if real.numel() == 0:
        candidate_ids[0] = 1
        real = torch.tensor([0])
    target = real[torch.randint(0, real.numel(), (rows,), generator=g)]
    if rows > 1 and draw(st.booleans()):
        target[0] = -100
    exclude_ids = torch.randint(0, n_items, (rows, draw(st.integers(1, 4))), generator=g)
    log_q = torch.rand(columns, generator=g, dtype=torch.float64).add(1e-3).log() * draw(st.sampled_from([1.0, 10.0]))

    def tensor(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    if branches:
        queries = {m: tensor(rows, width) for m in BRANCHES}
        candidates = {m: tensor(columns, width) for m in BRANCHES}
    else:
        queries, candidates = tensor(rows, width), tensor(columns, width)
    return queries, candidates, target, candidate_ids, exclude_ids, log_q


# --------------------------------------------------------------------------------------
# values against the slow definitions
# --------------------------------------------------------------------------------------


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    length=st.integers(1, 6),
    head_dim=st.integers(1, 4),
    id_choice=st.sampled_from(["none", "first", "middle", "last"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_matches_slow_definition(batch, heads, length, head_dim, id_choice, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    padding = torch.rand(batch, length, generator=g) < 0.4
    id_index = {"none": None, "first": 0, "middle": length // 2, "last": length - 1}[id_choice]
    out = ops.id_masked_attention(q, k, v, padding, id_index, backend="torch")
    expected = slow_attention(q, k, v, padding, id_index, head_dim**-0.5)
    torch.testing.assert_close(out, expected, **FP64)


@given(inbatch_problems())
def test_inbatch_ce_matches_slow_definition(problem):
    queries, candidates, target, candidate_ids, exclude_ids, log_q = problem
    loss = ops.debiased_inbatch_cross_entropy(
        queries, candidates, target, candidate_ids, exclude_ids=exclude_ids, log_q=log_q, backend="torch"
    )
    expected = slow_inbatch_ce(queries, candidates, target, candidate_ids, exclude_ids, log_q)
    torch.testing.assert_close(loss, expected, **FP64)
    grads = torch.autograd.grad(loss, (queries, candidates), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, (queries, candidates), allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **FP64)


@given(inbatch_problems(branches=True), st.floats(0.1, 2.0), st.sampled_from(["kl", "ce"]))
def test_distillation_matches_slow_definition(problem, temperature, form):
    queries, candidates, target, candidate_ids, exclude_ids, log_q = problem
    parts = ops.mutual_distillation_loss(
        queries,
        candidates,
        target,
        candidate_ids,
        exclude_ids=exclude_ids,
        log_q=log_q,
        temperature=temperature,
        form=form,
        backend="torch",
    )
    if bool((target == -100).all()):
        return
    expected = slow_distillation(queries, candidates, target, candidate_ids, exclude_ids, log_q, temperature, form)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(parts, name), value, **FP64)
    torch.testing.assert_close(parts.ce, parts.ce_id + parts.ce_text + parts.ce_image)
    torch.testing.assert_close(parts.kl, parts.kl_id_text + parts.kl_id_image + parts.kl_ensemble_id)


# --------------------------------------------------------------------------------------
# structural properties
# --------------------------------------------------------------------------------------


@given(inbatch_problems())
def test_excluded_columns_neither_change_loss_nor_receive_gradient(problem):
    queries, candidates, target, candidate_ids, exclude_ids, log_q = problem
    valid = target != -100
    from odmt_components.kernels.reference import inbatch_exclusion_mask

    excluded = inbatch_exclusion_mask(target[valid], candidate_ids, exclude_ids[valid])
    excluded_everywhere = excluded.all(0) if valid.any() else torch.ones(candidate_ids.shape, dtype=torch.bool)
    loss = ops.debiased_inbatch_cross_entropy(
        queries, candidates, target, candidate_ids, exclude_ids=exclude_ids, log_q=log_q
    )
    (grad,) = torch.autograd.grad(loss, candidates)
    assert not grad[excluded_everywhere].any()
    perturbed = candidates.detach().clone()
    perturbed[excluded_everywhere] += 100.0
    again = ops.debiased_inbatch_cross_entropy(
        queries, perturbed, target, candidate_ids, exclude_ids=exclude_ids, log_q=log_q
    )
    torch.testing.assert_close(again, loss.detach(), **FP64)
    # per row: an excluded column does not change that row's loss
    per_row = ops.debiased_inbatch_cross_entropy(
        queries, candidates, target, candidate_ids, exclude_ids=exclude_ids, log_q=log_q, reduction="none"
    )
    for index, r in enumerate(valid.nonzero().flatten().tolist()):
        columns = excluded[index].nonzero().flatten()
        if columns.numel() == 0:
            continue
        moved = candidates.detach().clone()
        moved[columns] = torch.randn(columns.numel(), candidates.shape[1], dtype=torch.float64) * 50
        row = ops.debiased_inbatch_cross_entropy(
            queries, moved, target, candidate_ids, exclude_ids=exclude_ids, log_q=log_q, reduction="none"
        )[r]
        torch.testing.assert_close(row, per_row[r].detach(), **FP64)


def test_only_target_left_gives_zero_loss_and_no_gradient():
    queries = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    candidate_ids = torch.tensor([5, 6, 7, 5])
    target = torch.tensor([0, 3])
    exclude_ids = torch.tensor([[6, 7], [6, 7]])
    loss = ops.debiased_inbatch_cross_entropy(queries, candidates, target, candidate_ids, exclude_ids=exclude_ids)
    assert loss.item() == 0.0
    loss.backward()
    assert not queries.grad.any() and not candidates.grad.any()


@given(inbatch_problems(branches=True), st.floats(0.1, 2.0))
def test_distillation_is_nonnegative_and_zero_when_branches_agree(problem, temperature):
    queries, candidates, target, candidate_ids, exclude_ids, log_q = problem
    kwargs = dict(exclude_ids=exclude_ids, log_q=log_q, temperature=temperature)
    parts = ops.mutual_distillation_loss(queries, candidates, target, candidate_ids, **kwargs)
    for name in ("kl_id_text", "kl_id_image", "kl_ensemble_id"):
        assert getattr(parts, name).item() >= -1e-12
    same_q = {m: queries["id"] for m in BRANCHES}
    same_c = {m: candidates["id"] for m in BRANCHES}
    agree = ops.mutual_distillation_loss(same_q, same_c, target, candidate_ids, **kwargs)
    assert abs(agree.kl.item()) < 1e-10


def test_detach_teacher_stops_teacher_gradients():
    g = torch.Generator().manual_seed(0)
    queries = {m: torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for m in BRANCHES}
    candidates = {m: torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for m in BRANCHES}
    candidate_ids = torch.tensor([1, 2, 3, 4, 5, 6])
    target = torch.tensor([0, 1, 2, 3, 4])

    def kl_gradient_of(name, detach):
        parts = ops.mutual_distillation_loss(queries, candidates, target, candidate_ids, detach_teacher=detach)
        return torch.autograd.grad(getattr(parts, name), [queries[m] for m in BRANCHES], allow_unused=True)

    # id -> text: only the text student gets gradient when detached; the id teacher too otherwise
    detached = kl_gradient_of("kl_id_text", True)
    assert detached[0] is None and detached[2] is None and detached[1].abs().sum() > 0
    attached = kl_gradient_of("kl_id_text", False)
    assert attached[0].abs().sum() > 0
    # ensemble -> id: detached, text and image (teachers only) get nothing
    detached = kl_gradient_of("kl_ensemble_id", True)
    assert detached[1] is None and detached[2] is None and detached[0].abs().sum() > 0


def test_attention_padding_and_id_rule_structure():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    padding = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = ops.id_masked_attention(q, k, v, padding, 2)
    # values of padded keys and of the ID key (for non-ID queries) never matter
    v2 = v.clone()
    v2[0, :, 3:5] = 1e3
    v2[:, :, 2] = -1e3
    out2 = ops.id_masked_attention(q, k, v2, padding, 2)
    keep = torch.ones(6, dtype=torch.bool)
    keep[2] = False
    torch.testing.assert_close(out[:, :, keep], out2[:, :, keep], **FP64)
    assert not torch.allclose(out[:, :, 2], out2[:, :, 2])
    # all keys padding -> zeros, no NaN
    zeros = ops.id_masked_attention(q, k, v, torch.ones(2, 6, dtype=torch.bool), None)
    assert not zeros.any()


def test_attention_dropout_expectation_and_reproducibility():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    plain = ops.id_masked_attention(q, k, v, None, 0)
    torch.manual_seed(0)
    first = ops.id_masked_attention(q, k, v, None, 0, dropout_p=0.3)
    torch.manual_seed(0)
    second = ops.id_masked_attention(q, k, v, None, 0, dropout_p=0.3)
    torch.testing.assert_close(first, second)
    mean = torch.stack([ops.id_masked_attention(q, k, v, None, 0, dropout_p=0.3) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, plain, atol=0.08, rtol=0.0)


# --------------------------------------------------------------------------------------
# backend selection and bad input
# --------------------------------------------------------------------------------------


def test_backend_resolution():
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu) == "torch"
    assert ops.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cuda", cpu)
    cuda = torch.device("cuda")  # (resolving touches no GPU)
    if ops.triton_available():
        assert ops.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert ops.resolve_backend("auto", cuda, torch.float64) == "torch"  # the kernels take no float64
    previous = ops.get_backend()
    try:
        ops.set_backend("torch")
        assert ops.resolve_backend("auto", cuda) == "torch"
    finally:
        ops.set_backend(previous)


def test_an_unknown_backend_in_the_environment_is_a_clear_error(monkeypatch):
    """``ODMT_BACKEND=Torch`` (a typo) must not silently pick the kernels."""
    monkeypatch.setattr(ops, "_default_backend", "Torch")
    with pytest.raises(ValueError, match="ODMT_BACKEND must be one of"):
        ops.resolve_backend("auto", torch.device("cpu"))
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"  # an explicit choice still works


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not ops.triton_available():
        pytest.skip("triton is not installed on this platform")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.resolve_backend("triton", torch.device("cpu"))


def _attention_inputs():
    return [torch.randn(2, 2, 5, 4) for _ in range(3)]


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have shape"),
        (lambda a: a.update(k=a["k"][:, :, :4]), ValueError, "k must have the shape"),
        (lambda a: a.update(v=a["v"].double()), TypeError, "v has dtype"),
        (lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), TypeError, "floating"),
        (lambda a: a.update(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (lambda a: a.update(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be bool"),
        (lambda a: a.update(id_index=5), ValueError, "id_index"),
        (lambda a: a.update(id_index=-1), ValueError, "id_index"),
        (lambda a: a.update(id_index=1.0), TypeError, "id_index"),
        (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
        (lambda a: a.update(scale=math.nan), ValueError, "scale must be finite"),
        (lambda a: a.update(scale=math.inf), ValueError, "scale must be finite"),
        (
            lambda a: a.update(q=torch.randn(0, 2, 5, 4), k=torch.randn(0, 2, 5, 4), v=torch.randn(0, 2, 5, 4)),
            ValueError,
            "non-empty",
        ),
    ],
)
def test_attention_bad_input(change, error, message):
    q, k, v = _attention_inputs()
    arguments = dict(q=q, k=k, v=v, key_padding_mask=None, id_index=None, dropout_p=0.0)
    change(arguments)
    with pytest.raises(error, match=message):
        ops.id_masked_attention(**arguments)


def _loss_inputs():
    return dict(
        queries=torch.randn(3, 4),
        candidates=torch.randn(5, 4),
        target=torch.tensor([0, 1, -100]),
        candidate_ids=torch.tensor([1, 2, 3, 0, 4]),
        exclude_ids=torch.tensor([[1, 2]]).expand(3, 2),
        log_q=torch.zeros(5),
    )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: a.update(queries=a["queries"][0]), ValueError, "queries must have shape"),
        (lambda a: a.update(candidates=torch.randn(5, 3)), ValueError, "width"),
        (lambda a: a.update(candidates=a["candidates"].double()), TypeError, "dtype"),
        (lambda a: a.update(target=torch.tensor([0, 5, 1])), ValueError, "outside"),
        (lambda a: a.update(target=torch.tensor([0, 3, 1])), ValueError, "padding column"),
        (lambda a: a.update(target=torch.tensor([0, 1])), ValueError, "target must have shape"),
        (lambda a: a.update(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target"),
        (lambda a: a.update(candidate_ids=torch.tensor([1, 2, 3])), ValueError, "candidate_ids"),
        (lambda a: a.update(exclude_ids=torch.tensor([[1, 2]])), ValueError, "exclude_ids"),
        (lambda a: a.update(log_q=torch.zeros(4)), ValueError, "log_q"),
        (lambda a: a.update(log_q=torch.full((5,), math.inf)), ValueError, "log_q"),
        (lambda a: a.update(pad_id=0.5), TypeError, "pad_id must be an int, got float"),
        (lambda a: a.update(pad_id=None), TypeError, "pad_id must be an int, got NoneType"),
        (lambda a: a.update(pad_id=torch.tensor(0)), TypeError, "pad_id must be an int, got Tensor"),
        (lambda a: a.update(ignore_index=True), TypeError, "ignore_index must be an int, got bool"),
        (
            lambda a: a.update(queries=torch.randn(0, 4), target=torch.zeros(0, dtype=torch.long), exclude_ids=None),
            ValueError,
            "empty",
        ),
        (
            lambda a: a.update(
                candidates=torch.randn(0, 4), candidate_ids=torch.zeros(0, dtype=torch.long), log_q=None
            ),
            ValueError,
            "empty",
        ),
    ],
)
def test_inbatch_bad_input(change, error, message):
    arguments = _loss_inputs()
    change(arguments)
    with pytest.raises(error, match=message):
        ops.debiased_inbatch_cross_entropy(**arguments)


def test_inbatch_nan_input_gives_nan_loss():
    arguments = _loss_inputs()
    arguments["queries"][0, 0] = float("nan")
    assert torch.isnan(ops.debiased_inbatch_cross_entropy(**arguments))


def test_distillation_bad_input():
    arguments = _loss_inputs()
    queries = {m: arguments["queries"] for m in BRANCHES}
    candidates = {m: arguments["candidates"] for m in BRANCHES}
    common = (arguments["target"], arguments["candidate_ids"])
    with pytest.raises(ValueError, match="keys"):
        ops.mutual_distillation_loss({"id": queries["id"]}, candidates, *common)
    with pytest.raises(TypeError, match="dict"):
        ops.mutual_distillation_loss(queries["id"], candidates, *common)
    for temperature in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            ops.mutual_distillation_loss(queries, candidates, *common, temperature=temperature)
    with pytest.raises(TypeError, match="temperature must be a number"):
        ops.mutual_distillation_loss(queries, candidates, *common, temperature="0.5")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ops.mutual_distillation_loss(queries, candidates, *common, ignore_index=-100.0)
    with pytest.raises(ValueError, match="form"):
        ops.mutual_distillation_loss(queries, candidates, *common, form="js")
    # a branch whose R or N differs is named, not the shared arguments it disagrees with
    with pytest.raises(ValueError, match=r"candidates\['text'\] has 4 rows but candidates\['id'\] has 5"):
        ops.mutual_distillation_loss(queries, dict(candidates, text=torch.randn(4, 4)), *common)
    with pytest.raises(ValueError, match=r"queries\['image'\] has 2 rows but queries\['id'\] has 3"):
        ops.mutual_distillation_loss(dict(queries, image=torch.randn(2, 4)), candidates, *common)
    with pytest.raises(ValueError, match=r"queries\['text'\] must have shape \(R, d\)"):
        ops.mutual_distillation_loss(dict(queries, text=torch.randn(3)), candidates, *common)
    with pytest.raises(ValueError, match=r"candidates\['text'\] must have width d = 4"):
        ops.mutual_distillation_loss(queries, dict(candidates, text=torch.randn(5, 3)), *common)


def test_loss_ops_take_the_autocast_dtype_like_a_matmul():
    arguments = _loss_inputs()
    arguments["candidates"] = arguments["candidates"].to(torch.bfloat16)  # e.g. a Linear's output
    with pytest.raises(TypeError, match="dtype"):
        ops.debiased_inbatch_cross_entropy(**arguments)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.debiased_inbatch_cross_entropy(**arguments)
        queries = {m: arguments["queries"] for m in BRANCHES}
        candidates = {m: arguments["candidates"] for m in BRANCHES}
        parts = ops.mutual_distillation_loss(queries, candidates, arguments["target"], arguments["candidate_ids"])
    assert torch.isfinite(loss) and torch.isfinite(parts.ce)
    # ... and, like the kernels, compute the logits and the softmax in float32 from them
    assert loss.dtype == parts.ce.dtype == parts.kl.dtype == torch.float32
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in arguments.items()}
    torch.testing.assert_close(loss, ops.debiased_inbatch_cross_entropy(**bf16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = ops.debiased_inbatch_cross_entropy(**dict(arguments, reduction="none"))
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, ops.debiased_inbatch_cross_entropy(**dict(bf16, reduction="none")))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_log_q_is_a_correction_without_gradient(backend):
    device = _device(backend)
    queries, candidates, target, ids, exclude, log_q = _compile_problem(device)
    log_q = log_q.clone().requires_grad_()
    kw = dict(exclude_ids=exclude, log_q=log_q, backend=backend)
    loss = ops.debiased_inbatch_cross_entropy(queries["id"], candidates["id"], target, ids, **kw)
    parts = ops.mutual_distillation_loss(queries, candidates, target, ids, temperature=0.5, **kw)
    loss = loss + parts.ce + parts.kl
    loss.backward()
    assert log_q.grad is None and queries["id"].grad is not None and candidates["text"].grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_distillation_branches_of_different_widths(backend):
    """Widths may differ between branches (each branch's queries and candidates share one):
    both backends give the float64 definition's loss and gradients."""
    device = _device(backend)
    queries, candidates, target, ids, exclude, log_q = _compile_problem(device)
    g = torch.Generator().manual_seed(3)
    widths = {"id": 8, "text": 5, "image": 12}
    queries = {m: torch.randn(5, w, generator=g).to(device).requires_grad_() for m, w in widths.items()}
    candidates = {m: torch.randn(7, w, generator=g).to(device).requires_grad_() for m, w in widths.items()}
    kw = dict(exclude_ids=exclude, log_q=log_q, temperature=0.5, detach_teacher=False)
    parts = ops.mutual_distillation_loss(queries, candidates, target, ids, backend=backend, **kw)
    leaves = [*queries.values(), *candidates.values()]
    grads = torch.autograd.grad(parts.ce + parts.kl, leaves)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    q64, c64 = dict(zip(BRANCHES, wide[:3], strict=True)), dict(zip(BRANCHES, wide[3:], strict=True))
    want = mutual_distillation_reference(
        q64, c64, target, ids, exclude, log_q.double(), temperature=0.5, detach_teacher=False
    )
    want_grads = torch.autograd.grad(want.ce + want.kl, wide)
    torch.testing.assert_close(parts.ce.double(), want.ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.kl.double(), want.kl, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, want_grads, strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# torch.compile and the value checks
# --------------------------------------------------------------------------------------


def _device(backend: str) -> str:
    """Where a test of ``backend`` runs: the kernels need CUDA tensors on a CUDA machine (the
    interpreter, which takes CPU tensors, is on only without one)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _compile_problem(device: str = "cpu"):
    g = torch.Generator().manual_seed(5)
    rows, columns, width = 5, 7, 8
    queries = {m: torch.randn(rows, width, generator=g).to(device).requires_grad_() for m in BRANCHES}
    candidates = {m: torch.randn(columns, width, generator=g).to(device).requires_grad_() for m in BRANCHES}
    target = torch.tensor([0, 2, -100, 4, 6], device=device)  # one ignored row
    ids = torch.tensor([1, 2, 3, 1, 5, 0, 6], device=device)  # a repeated item and a padding column
    exclude = torch.tensor([[2, 0], [5, 6], [0, 0], [3, 0], [1, 2]], device=device)
    log_q = torch.rand(columns, generator=g).add(0.01).log().to(device)
    return queries, candidates, target, ids, exclude, log_q


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_ops_compile_whole_and_match_eager(backend):
    """``torch.compile(fullgraph=True)`` traces the public loss ops without a break (no import
    call, no value read back, no data-dependent shape) and gives eager's values and gradients."""
    queries, candidates, target, ids, exclude, log_q = _compile_problem(_device(backend))

    def objective(queries, candidates):
        kw = dict(exclude_ids=exclude, log_q=log_q, backend=backend)
        ce = ops.debiased_inbatch_cross_entropy(queries["id"], candidates["id"], target, ids, **kw)
        parts = ops.mutual_distillation_loss(queries, candidates, target, ids, temperature=0.5, **kw)
        return ce + parts.ce + parts.kl

    leaves = [*queries.values(), *candidates.values()]
    eager = objective(queries, candidates)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(objective, fullgraph=True)(queries, candidates)
    grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_op_compiles_whole_with_fresh_dropout_seeds(backend):
    """The dropout seed is drawn on the device by ``torch.randint``, inside the compiled graph:
    no tensor value is read on the host, every call draws a new mask, ``torch.manual_seed``
    repeats them."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=g).to(_device(backend)) for _ in range(3))
    pad = torch.zeros(2, 6, dtype=torch.bool, device=q.device)
    pad[1, 4:] = True

    def attend(q, k, v, p):
        return ops.id_masked_attention(q, k, v, pad, 1, dropout_p=p, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, 0.0), attend(q, k, v, 0.0), rtol=1e-5, atol=1e-6)
    torch.manual_seed(11)
    first, second = compiled(q, k, v, 0.5), compiled(q, k, v, 0.5)
    torch.manual_seed(11)
    again = compiled(q, k, v, 0.5)
    assert not torch.equal(first, second)
    if backend == "triton":  # the kernel's mask is a function of the seed alone
        torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_compiled_loss_still_checks_values():
    queries, candidates, _, ids, exclude, log_q = _compile_problem()
    bad_target = torch.tensor([0, 2, -100, 4, 9])  # 9 is outside [0, N = 7)

    def objective(q, c):
        return ops.debiased_inbatch_cross_entropy(q, c, bad_target, ids, exclude_ids=exclude, backend="torch")

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"outside \[0, N=7\)"):
        torch.compile(objective, fullgraph=True)(queries["id"], candidates["id"])


def test_value_checks_can_be_turned_off():
    queries, candidates, target, ids, exclude, log_q = _compile_problem()
    log_q = log_q.clone()
    log_q[3] = math.nan
    args = (queries["id"], candidates["id"], target, ids)
    with pytest.raises(ValueError, match="log_q contains NaN"):
        ops.debiased_inbatch_cross_entropy(*args, exclude_ids=exclude, log_q=log_q, backend="torch")
    assert ops.value_checks()
    ops.set_value_checks(False)
    try:
        assert not ops.value_checks()
        loss = ops.debiased_inbatch_cross_entropy(*args, exclude_ids=exclude, log_q=log_q, backend="torch")
        assert torch.isnan(loss)  # unchecked: the NaN flows into the loss instead
    finally:
        ops.set_value_checks(True)


def test_value_checks_follow_the_environment():
    code = "from odmt_components import ops; print(ops.value_checks())"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "ODMT_VALUE_CHECKS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("held", [math.nan, math.inf])
def test_ignored_rows_change_nothing_whatever_they_hold(backend, held):
    """A batch with ignored rows gives the loss and gradients of the batch without them, even
    when those rows hold NaN or inf (a backbone's padding positions may) and ``log_q`` is -inf
    on a padding column (unchecked inputs: the PyTorch path computes every row, ignored ones on
    zero queries and zero logits; the kernels' column-wise backward multiplies every row by its
    weight, 0 for ignored ones, and ``0 x NaN`` is NaN unless such rows are zeroed first)."""
    device = _device(backend)
    queries, candidates, _, _, exclude, log_q = _compile_problem(device)
    ids = torch.tensor([0, 2, 3, 1, 5, 1, 6], device=device)  # column 0 is padding: no valid row scores it
    log_q = log_q.clone()
    log_q[0] = -math.inf  # ... but the PyTorch path scores ignored rows against column 0
    target = torch.tensor([1, 2, -100, 4, -100], device=device)
    for m in BRANCHES:
        with torch.no_grad():
            queries[m][2] = held
    kept = torch.tensor([0, 1, 3], device=device)
    ops.set_value_checks(False)
    try:

        def objective(queries, target, exclude):
            kw = dict(exclude_ids=exclude, log_q=log_q, backend=backend, reduction="sum")
            ce = ops.debiased_inbatch_cross_entropy(queries["id"], candidates["id"], target, ids, **kw)
            parts = ops.mutual_distillation_loss(queries, candidates, target, ids, temperature=0.5, **kw)
            return ce + parts.ce + parts.kl

        full = objective(queries, target, exclude)
        full_grads = torch.autograd.grad(full, list(candidates.values()) + list(queries.values()))
        sub_queries = {m: q.detach()[kept].requires_grad_() for m, q in queries.items()}
        sub = objective(sub_queries, target[kept], exclude[kept])
        sub_grads = torch.autograd.grad(sub, list(candidates.values()) + list(sub_queries.values()))
    finally:
        ops.set_value_checks(True)
    torch.testing.assert_close(full, sub)
    for got, want in zip(full_grads[:3], sub_grads[:3], strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(full_grads[3:], sub_grads[3:], strict=True):
        torch.testing.assert_close(got[kept], want)
        assert torch.equal(got[[2, 4]], torch.zeros_like(got[[2, 4]]))

"""Tests of the Triton ID-masked attention kernel (``odmt_components.kernels.attention``).

Run on the CPU under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) with tiny shapes, or on
the GPU (compiled kernels) where CUDA is present; the ground truth is
``id_masked_attention_reference`` in float64 on the same device. bf16 is not tested here (the
interpreter is wrong in bf16); benchmarks/bench_attention.py checks bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from triton.runtime.errors import OutOfResources

from odmt_components.kernels import attention as attn
from odmt_components.kernels.reference import id_masked_attention_reference

# CPU (interpreter) here; on a CUDA machine the same tests run the compiled kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances, per dtype, for outputs and gradients against the float64 reference.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=1e-2),
}


def _inputs(batch, heads, length, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g).to(DEVICE, dtype) for _ in range(3)]


def _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.0, seed=0, scale=None):
    """Kernel output and (dq, dk, dv) for the upstream gradient ``grad_out``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attn.id_masked_attention(q, k, v, pad, id_index, dropout_p, scale, seed)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), grads


def _reference(q, k, v, pad, id_index, grad_out, dropout_p=0.0, keep=None, scale=None):
    """float64 reference output and gradients."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = id_masked_attention_reference(q, k, v, pad, id_index, dropout_p=dropout_p, scale=scale, dropout_keep=keep)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.double())
    return out.detach(), grads


def _assert_close(got, want, dtype, what):
    torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _assert_matches_reference(q, k, v, pad, id_index, dtype, **kw):
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out, grads = _kernel(q, k, v, pad, id_index, grad_out, **{k_: kw[k_] for k_ in kw if k_ != "keep"})
    ref_kw = {k_: kw[k_] for k_ in kw if k_ != "seed"}
    ref_out, ref_grads = _reference(q, k, v, pad, id_index, grad_out, **ref_kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    _assert_close(out, ref_out, dtype, "output")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _assert_close(got, want, dtype, name)
    return out, grads


# The kernel families: "short" (a program holds a whole (b, h), L <= attn._SHORT_MAX_FWD/_BWD, the
# default at ODMT's L = 81) and "blocked" (FlashAttention-2 style, longer sequences; forced
# here by setting the thresholds to 0 so that tiny shapes exercise it); "mixed" = the blocked
# forward followed by the short backward (the thresholds are separate: both save one lse);
# "short" runs the short backward split at several head-dim chunks (dS scratch + the dQ/dK
# kernel, ``attn._SPLIT_BWD``); "fused" unsplit, the default.
PATHS = ("short", "blocked", "mixed", "fused")
_THRESHOLDS = {"short": (128, 128), "blocked": (0, 0), "mixed": (0, 128), "fused": (128, 128)}


class _kernel_path:
    """Context manager selecting the kernel families for the duration of a test body."""

    def __init__(self, path: str):
        self.thresholds = _THRESHOLDS[path]
        self.split = path != "fused"

    def __enter__(self):
        self.saved = (attn._SHORT_MAX_FWD, attn._SHORT_MAX_BWD, attn._SHORT_FWD_MIN_HEAD_DIM, attn._SPLIT_BWD)
        # the tests' head dims are small: the short forward is forced regardless of D
        attn._SHORT_MAX_FWD, attn._SHORT_MAX_BWD = self.thresholds
        attn._SHORT_FWD_MIN_HEAD_DIM = 0
        attn._SPLIT_BWD = self.split

    def __exit__(self, *exc):
        attn._SHORT_MAX_FWD, attn._SHORT_MAX_BWD, attn._SHORT_FWD_MIN_HEAD_DIM, attn._SPLIT_BWD = self.saved


def _padding(pattern: str, batch: int, length: int, seed: int) -> torch.Tensor | None:
    if pattern == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    if pattern == "random":
        pad = torch.rand(batch, length, generator=g) < 0.4
    elif pattern == "suffix":  # text padding: every item keeps a random prefix of 1..L tokens
        kept = torch.randint(1, length + 1, (batch,), generator=g)
        pad = torch.arange(length)[None, :] >= kept[:, None]
    elif pattern == "one_item_all_padded":
        pad[0] = True
    return pad.to(DEVICE)


# Hypothesis starts from the first element of each strategy: those are the interesting ones.
@given(
    batch=st.sampled_from([2, 1]),
    heads=st.sampled_from([2, 1]),
    length=st.sampled_from([17, 33, 7, 16, 1]),
    dim=st.sampled_from([24, 16, 64]),
    pattern=st.sampled_from(["suffix", "random", "one_item_all_padded", "none"]),
    id_pos=st.sampled_from(["middle", "first", "last", None]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    pad_seed=st.integers(0, 2**16),
    path=st.sampled_from(PATHS),
)
@example(2, 1, 33, 64, "random", "first", torch.float16, 3, "short").via("ODMT-like, fp16")
@example(2, 1, 33, 64, "random", "first", torch.float16, 3, "blocked").via("ODMT-like, fp16, blocked")
@example(1, 2, 16, 16, "none", None, torch.float32, 0, "short").via("no mask at all")
@example(2, 2, 33, 24, "suffix", "middle", torch.float32, 5, "mixed").via("blocked forward, short backward")
@example(2, 1, 17, 24, "random", "last", torch.float16, 7, "fused").via("two chunks, backward unsplit")
def test_matches_reference(batch, heads, length, dim, pattern, id_pos, dtype, pad_seed, path):
    q, k, v = _inputs(batch, heads, length, dim, dtype, seed=length * dim)
    pad = _padding(pattern, batch, length, pad_seed)
    id_index = {"first": 0, "middle": length // 2, "last": length - 1, None: None}[id_pos]
    with _kernel_path(path):
        _assert_matches_reference(q, k, v, pad, id_index, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dim", [80, 384])
def test_head_dims_not_power_of_two(dim, path):
    """Head dims that are not powers of two: blocked kernels split them (80 = 64 + 16, 384 = 256
    + 128: the reference ODMT width), short kernels loop over chunks (5 x 16, 6 x 64)."""
    q, k, v = _inputs(1, 2, 11, dim, torch.float32)
    pad = torch.tensor([[False] * 8 + [True] * 3], device=DEVICE)
    with _kernel_path(path):
        _assert_matches_reference(q, k, v, pad, 4, torch.float32)


def test_long_sequences_take_the_blocked_kernels():
    """L above the short kernels' limit (129 > 128) runs the blocked kernels by default."""
    length = max(attn._SHORT_MAX_FWD, attn._SHORT_MAX_BWD) + 1
    q, k, v = _inputs(1, 1, length, 16, torch.float32)
    pad = (torch.arange(length) >= length - 7)[None].to(DEVICE)
    attn._CHOSEN.clear()
    _assert_matches_reference(q, k, v, pad, 40, torch.float32)
    launched = {key[0] for key in attn._CHOSEN}
    assert launched == {"fwd", "dq", "dkdv"}, launched
    attn._CHOSEN.clear()


@pytest.mark.parametrize(("path", "kinds"), [("short", {"fwd_short", "bwd_short"}), ("mixed", {"fwd", "bwd_short"})])
def test_forward_and_backward_families_are_chosen_apart(path, kinds):
    """The forward and backward thresholds are separate: "mixed" runs the blocked forward and
    the short backward on its log-sum-exp, with dropout (one Philox counter in both)."""
    q, k, v = _inputs(2, 2, 19, 32, torch.float32)
    pad = torch.zeros(2, 19, dtype=torch.bool, device=DEVICE)
    pad[0, 12:] = True
    attn._CHOSEN.clear()
    with _kernel_path(path):
        _assert_matches_reference(q, k, v, pad, 6, torch.float32, dropout_p=0.2, seed=5,
                                  keep=attn.dropout_keep_mask(2, 2, 19, 0.2, 5, DEVICE))
    launched = {key[0] for key in attn._CHOSEN}
    attn._CHOSEN.clear()
    assert launched == kinds, launched


@pytest.mark.parametrize("split_queries", [False, True])
@pytest.mark.parametrize(("id_index", "dropout"), [(50, 0.0), (70, 0.2), (None, 0.0), (10, 0.2)])
def test_two_key_blocks_at_odmt_length(id_index, dropout, split_queries, monkeypatch):
    """L = 81 with one head-dim chunk: keys in blocks of 64 + 32 (the 128 x 128 tile's last
    quarter is never computed); the ID key in either block, text padding in the second,
    dropout drawn per block with the one-block counters (same mask). With the query split
    (``_SPLIT_QUERIES``) the rows too, the ID query in either row block."""
    assert attn._key_blocks(81, 128) == (64, 32) and attn._key_blocks(97, 128) == (128, 0)
    monkeypatch.setattr(attn, "_SPLIT_QUERIES", split_queries)
    blocks = attn._fwd_blocks(81, 128)
    assert (blocks["BQA"], blocks["BQB"]) == ((64, 32) if split_queries else (128, 0))
    q, k, v = _inputs(2, 1, 81, 32, torch.float32, seed=81)
    pad = torch.zeros(2, 81, dtype=torch.bool, device=DEVICE)
    pad[0, 60:] = True
    pad[1, 75:] = True
    keep = attn.dropout_keep_mask(2, 1, 81, dropout, 4, DEVICE) if dropout else None
    with _kernel_path("short"):
        _assert_matches_reference(q, k, v, pad, id_index, torch.float32, dropout_p=dropout, seed=4, keep=keep)


@pytest.mark.parametrize("dqdk", [(1, 4, 1), (3, 8, 2)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_split_backward(dqdk, dropout, monkeypatch):
    """Several head-dim chunks (D = 48 = 3 x 16): the short backward stores dS and the dQ/dK
    kernel finishes it, one or three chunks a program; same gradients as the reference, with
    dropout too (the dS kernel reads the keep-mask off P~)."""
    launched = []
    real = attn._launch_dqdk
    monkeypatch.setattr(attn, "_launch_dqdk", lambda *a: (launched.append(a[-1]), real(*a)))
    monkeypatch.setattr(attn, "_OVERRIDE", {"dqdk": dqdk})
    q, k, v = _inputs(2, 2, 19, 48, torch.float32, seed=11)
    pad = _padding("suffix", 2, 19, seed=4)
    keep = attn.dropout_keep_mask(2, 2, 19, dropout, 9, DEVICE) if dropout else None
    with _kernel_path("short"):
        _assert_matches_reference(q, k, v, pad, 0, torch.float32, dropout_p=dropout, seed=9, keep=keep)
    assert launched == [16]  # the chunk the backward ran with


@pytest.mark.parametrize("config", [(16, 4, 1, 0, 0), (32, 8, 2, 0, 0), (64, 4, 2, 1, 0)])
def test_other_short_configurations(config, monkeypatch):
    """Short-kernel chunk widths other than the rule's: 16 = three chunks of 48 (masked loop
    tail with D = 40), 32 = a half-masked chunk, 64 = one chunk wider than D (persistent);
    same results, with dropout too."""
    monkeypatch.setattr(attn, "_OVERRIDE", {"fwd_short": config, "bwd_short": config})
    q, k, v = _inputs(2, 1, 21, 40, torch.float32)
    pad = torch.zeros(2, 21, dtype=torch.bool, device=DEVICE)
    pad[1, 15:] = True
    _assert_matches_reference(q, k, v, pad, 10, torch.float32, dropout_p=0.2, seed=3,
                              keep=attn.dropout_keep_mask(2, 1, 21, 0.2, 3, DEVICE))


@pytest.mark.parametrize(("batch", "heads", "per_sm"), [(3, 2, 1), (5, 1, 2), (1, 1, 1)])
def test_persistent_short_kernels_walk_every_pair(batch, heads, per_sm, monkeypatch):
    """One-chunk short kernels launched persistent: ``per_sm`` programs on each of 2 SMs (the
    count forced, so that a GPU runs the same grids) walk the ``batch * heads`` pairs with a
    grid stride -- 6 pairs over 2 programs, 5 over 4 (uneven), 1 pair over 1 -- so every pair
    is computed once, dropout masks keyed by the pair as in the one-program-per-pair launch."""
    config = (32, 4, 2, per_sm, 0)
    monkeypatch.setattr(attn, "_OVERRIDE", {"fwd_short": config, "bwd_short": config})
    monkeypatch.setattr(attn, "_num_sms", lambda device: 2)
    q, k, v = _inputs(batch, heads, 13, 32, torch.float32, seed=batch)
    pad = _padding("suffix", batch, 13, seed=batch)
    _assert_matches_reference(q, k, v, pad, 5, torch.float32)
    _assert_matches_reference(q, k, v, pad, 5, torch.float32, dropout_p=0.2, seed=3,
                              keep=attn.dropout_keep_mask(batch, heads, 13, 0.2, 3, DEVICE))


@pytest.mark.parametrize("config", [(64, 16, 4, 2), (16, 64, 4, 1)])
def test_other_block_sizes(config, monkeypatch):
    """Block sizes other than the heuristic's (fallbacks, benchmark sweeps) give the same result."""
    monkeypatch.setattr(attn, "_OVERRIDE", {"fwd": config, "dq": config, "dkdv": config})
    monkeypatch.setattr(attn, "_SHORT_MAX_FWD", 0)
    monkeypatch.setattr(attn, "_SHORT_MAX_BWD", 0)
    q, k, v = _inputs(2, 1, 41, 24, torch.float32)
    pad = torch.zeros(2, 41, dtype=torch.bool, device=DEVICE)
    pad[1, 30:] = True
    _assert_matches_reference(q, k, v, pad, 20, torch.float32, dropout_p=0.2, seed=3,
                              keep=attn.dropout_keep_mask(2, 1, 41, 0.2, 3, DEVICE))


def test_item_whose_text_is_only_cls():
    """ODMT layout [image (5) | ID | text CLS + 6 tokens]: item 1 has no text but its CLS."""
    n_img, n_txt = 5, 7
    length = n_img + 1 + n_txt
    pad = torch.zeros(2, length, dtype=torch.bool, device=DEVICE)
    pad[0, n_img + 1 + 4 :] = True
    pad[1, n_img + 2 :] = True
    q, k, v = _inputs(2, 2, length, 16, torch.float32)
    _assert_matches_reference(q, k, v, pad, n_img, torch.float32)


def test_rows_without_keys_are_zero():
    """All keys padded (item 0), and only the ID key unpadded (item 1): no NaN, zeros."""
    length, id_index = 9, 3
    pad = torch.ones(2, length, dtype=torch.bool, device=DEVICE)
    pad[1, id_index] = False
    q, k, v = _inputs(2, 2, length, 16, torch.float32)
    out, (dq, dk, dv) = _assert_matches_reference(q, k, v, pad, id_index, torch.float32)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dk[0], torch.zeros_like(dk[0]))
    rows_without_key = [i for i in range(length) if i != id_index]
    assert torch.equal(out[1][:, rows_without_key], torch.zeros_like(out[1][:, rows_without_key]))
    torch.testing.assert_close(out[1][:, id_index], v[1][:, id_index])  # the ID query sees only itself


def test_non_contiguous_inputs_and_grad():
    batch, heads, length, dim = 2, 2, 13, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(batch, length, heads, dim, generator=g).to(DEVICE).transpose(1, 2)  # (B,L,H,D) layout
    k = torch.randn(batch, heads, length, 2 * dim, generator=g).to(DEVICE)[..., ::2]  # column stride 2
    v = torch.randn(heads, batch, length, dim, generator=g).to(DEVICE).transpose(0, 1)
    pad = torch.zeros(batch, 2 * length, dtype=torch.bool, device=DEVICE)[:, ::2]
    pad[0, 9:] = True
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or pad.is_contiguous())
    grad_out = torch.randn(batch, heads, dim, length, generator=g).to(DEVICE).transpose(-1, -2)
    out, grads = _kernel(q, k, v, pad, 2, grad_out)
    ref_out, ref_grads = _reference(q, k, v, pad, 2, grad_out)
    _assert_close(out, ref_out, torch.float32, "output")
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_close(got, want, torch.float32, "grad")


@pytest.mark.parametrize("scale", [0.7, -0.45, 0.0])
@pytest.mark.parametrize("length", [10, 81])
def test_explicit_scale(scale, length):
    """A positive scale takes the one-chunk forward's raw-score maxima with the scale in the
    exponentials (``SCALE_IN_EXP``); a negative or zero one the scaled scores: both match,
    with padding, at a one-block and a two-key-block length."""
    q, k, v = _inputs(2, 1, length, 16, torch.float32)
    pad = torch.zeros(2, length, dtype=torch.bool, device=DEVICE)
    pad[1, length // 2 :] = True
    _assert_matches_reference(q, k, v, pad, length - 1, torch.float32, scale=scale)


@pytest.mark.parametrize("mask_dot", [True, False])
@pytest.mark.parametrize(
    ("length", "id_index", "dim"), [(9, 3, 16), (81, 0, 16), (81, 80, 16), (33, None, 16), (17, 5, 48)]
)
def test_mask_in_the_score_dot(mask_dot, length, id_index, dim, monkeypatch):
    """The short kernels add the mask to the scores through the score dot (``MASK_DOT``) or
    select it element by element (``_MASK_DOT`` off), with one head-dim chunk or several
    (``dim = 48``, backward unsplit): both match the reference with the ID key first, last or
    absent, an item whose keys are all padding and one whose only key is the ID key (rows
    without a key: zeros, no NaN)."""
    monkeypatch.setattr(attn, "_MASK_DOT", mask_dot)
    launched = []
    real = attn._launch_short
    monkeypatch.setattr(attn, "_launch_short", lambda *a: (launched.append((a[0], a[-1]["MASK_DOT"])), real(*a))[1])
    pad = _padding("random", 3, length, seed=length)
    pad[0] = True
    pad[1] = True
    pad[1, 0 if id_index is None else id_index] = False
    q, k, v = _inputs(3, 2, length, dim, torch.float32, seed=7)
    with _kernel_path("fused"):
        out, _ = _assert_matches_reference(q, k, v, pad, id_index, torch.float32)
    taken = mask_dot and DEVICE == "cpu"  # (fp32 on a GPU keeps the select)
    assert launched == [("fwd_short", taken), ("bwd_short", taken)]
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_mask_in_dot_rule(monkeypatch):
    """The mask goes through the dot where the dtype holds -1e30 and the dot runs on the tensor
    cores (bf16; fp32 only in the interpreter, whose tests cover the form), and the scale keeps
    it far below every score: not fp16, not fp32 on a GPU, not a scale <= 0."""
    assert attn._mask_in_dot(torch.bfloat16, 0.125, True) and attn._mask_in_dot(torch.bfloat16, 0.125, False)
    assert attn._mask_in_dot(torch.float32, 1.0, False) and not attn._mask_in_dot(torch.float32, 1.0, True)
    assert not attn._mask_in_dot(torch.float16, 0.125, True)
    assert not any(attn._mask_in_dot(torch.float32, scale, False) for scale in (0.0, -0.5, 2.0**-41))
    monkeypatch.setattr(attn, "_MASK_DOT", False)
    assert not attn._mask_in_dot(torch.bfloat16, 0.125, True)


# ------------------------------------------------------------------------------ dropout


def _dropout_case():
    pad = torch.zeros(2, 14, dtype=torch.bool, device=DEVICE)
    pad[1, 10:] = True
    return (*_inputs(2, 2, 14, 16, torch.float32, seed=5), pad, 6)


def test_dropout_zero_is_exact_and_ignores_seed():
    q, k, v, pad, id_index = _dropout_case()
    grad_out = torch.randn(q.shape, device=DEVICE)
    out1, grads1 = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.0, seed=1)
    out2, grads2 = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.0, seed=2)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))
    _assert_matches_reference(q, k, v, pad, id_index, torch.float32, dropout_p=0.0)


def test_seed_tensor_on_the_device_equals_the_int_seed():
    """The kernels read the seed from device memory (a CUDA graph's replays then see a fresh
    one): a one-element tensor gives what the int gives, modulo 2**31; other shapes refuse."""
    q, k, v, pad, id_index = _dropout_case()
    grad_out = torch.ones_like(q)
    want, _ = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.3, seed=7)
    for seed in (torch.tensor([7], device=DEVICE), torch.tensor(2**31 + 7), torch.tensor([7], dtype=torch.int32)):
        got, _ = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.3, seed=seed)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    keep = attn.dropout_keep_mask(2, 2, 14, 0.3, torch.tensor([7]), DEVICE)
    assert torch.equal(keep, attn.dropout_keep_mask(2, 2, 14, 0.3, 7, DEVICE))
    with pytest.raises(ValueError, match="one-element int tensor"):
        attn.id_masked_attention(q, k, v, pad, id_index, 0.3, None, torch.tensor([1, 2]))


def test_dropout_same_seed_same_result_different_seed_differs():
    q, k, v, pad, id_index = _dropout_case()
    grad_out = torch.randn(q.shape, device=DEVICE)
    out1, grads1 = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.3, seed=11)
    out2, grads2 = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.3, seed=11)
    out3, grads3 = _kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.3, seed=12)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))
    assert not torch.equal(out1, out3) and not torch.equal(grads1[0], grads3[0])


@pytest.mark.parametrize("path", PATHS)
def test_dropout_matches_reference_with_replayed_mask(path):
    q, k, v, pad, id_index = _dropout_case()
    batch, heads, length, _ = q.shape
    for seed in (0, 2**31 - 5):
        keep = attn.dropout_keep_mask(batch, heads, length, 0.25, seed, DEVICE)
        assert keep.shape == (batch, heads, length, length) and keep.dtype == torch.bool
        assert 0.6 < keep.float().mean().item() < 0.9
        assert not torch.equal(keep[0, 0], keep[0, 1])  # heads draw independent masks
        with _kernel_path(path):
            _assert_matches_reference(q, k, v, pad, id_index, torch.float32, dropout_p=0.25, keep=keep, seed=seed)


def test_both_kernel_families_draw_the_same_dropout_mask():
    """Same (seed, p): the short and the blocked kernels drop the same probabilities."""
    q, k, v, pad, id_index = _dropout_case()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    results = []
    for path in PATHS:
        with _kernel_path(path):
            results.append(_kernel(q, k, v, pad, id_index, grad_out, dropout_p=0.3, seed=77))
    (out_s, grads_s), *others = results
    for out_o, grads_o in others:
        torch.testing.assert_close(out_s, out_o, **TOL[torch.float32])
        for got, want in zip(grads_s, grads_o, strict=True):
            torch.testing.assert_close(got, want, **TOL[torch.float32])
    _, no_drop = _kernel(q, k, v, pad, id_index, grad_out)
    assert not torch.allclose(grads_s[2], no_drop[2], atol=1e-3)  # dropout did act


def test_dropout_expectation_approaches_no_dropout_output():
    """Every (b, h) draws its own mask: average 64 identical heads over 4 seeds (256 draws)."""
    length, dim, reps, seeds = 8, 16, 64, 4
    q, k, v = (x.expand(1, reps, length, dim) for x in _inputs(1, 1, length, dim, torch.float32, seed=9))
    pad = torch.tensor([[False] * 6 + [True] * 2], device=DEVICE)
    exact = id_masked_attention_reference(q[:, :1].double(), k[:, :1].double(), v[:, :1].double(), pad, 2)[0, 0]
    draws = torch.cat([attn.id_masked_attention(q, k, v, pad, 2, 0.1, None, s)[0] for s in range(seeds)]).double()
    assert (draws[0] - exact).abs().max() > 0.05  # one draw is visibly perturbed ...
    # ... the average is unbiased: within 5 standard errors everywhere (deterministic seeds)
    standard_error = draws.std(0) / draws.shape[0] ** 0.5
    assert ((draws.mean(0) - exact).abs() <= 5 * standard_error + 1e-6).all()
    assert (draws.mean(0) - exact).abs().max() < 0.1


# ------------------------------------------------------------------- registration, compile


@pytest.mark.parametrize("path", PATHS)
def test_opcheck_custom_ops(path, monkeypatch):
    monkeypatch.setattr(attn, "_SHORT_MAX_FWD", _THRESHOLDS[path][0])
    monkeypatch.setattr(attn, "_SHORT_MAX_BWD", _THRESHOLDS[path][1])
    monkeypatch.setattr(attn, "_SHORT_FWD_MIN_HEAD_DIM", 0)
    monkeypatch.setattr(attn, "_SPLIT_BWD", path != "fused")
    # 24 = two 16-wide chunks: the split (or, "fused", unsplit) backward
    q, k, v = (x.requires_grad_() for x in _inputs(2, 1, 9, 24, torch.float32))
    pad = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    pad[0, 5:] = True
    seed0, seed7 = (torch.tensor([s], device=DEVICE) for s in (0, 7))
    fwd = torch.ops.odmt.id_masked_attention.default
    torch.library.opcheck(fwd, (q, k, v, pad, 3, 0.0, 0.25, seed0))
    torch.library.opcheck(fwd, (q, k, v, None, -1, 0.2, 0.25, seed7))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), pad, 3, 0.0, 0.25, seed0)
    bwd = torch.ops.odmt.id_masked_attention_backward.default
    q, k, v = (x.detach() for x in (q, k, v))
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, pad, 3, 0.0, 0.25, seed0))


class _TinyAttention(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.proj(x).view(batch, length, 3, 1, dim).permute(2, 0, 3, 1, 4)  # strided views
        return attn.id_masked_attention(q, k, v, pad, 1, 0.0, None, 0).sum(1)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    module = _TinyAttention(16).to(DEVICE)
    x = torch.randn(2, 10, 16, device=DEVICE)
    pad = torch.zeros(2, 10, dtype=torch.bool, device=DEVICE)
    pad[1, 6:] = True
    eager_out = module(x, pad)
    eager_grad = torch.autograd.grad(eager_out.square().sum(), module.proj.weight)[0]
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, pad)
    grad = torch.autograd.grad(out.square().sum(), module.proj.weight)[0]
    torch.testing.assert_close(out, eager_out, **TOL[torch.float32])
    torch.testing.assert_close(grad, eager_grad, **TOL[torch.float32])


# ---------------------------------------------------------------------- wrappers, errors


def test_head_dim_split_and_block_heuristic():
    assert attn._split_head_dim(16) == (16, 0)
    assert attn._split_head_dim(24) == (32, 0)
    assert attn._split_head_dim(64) == (64, 0)
    assert attn._split_head_dim(80) == (64, 16)
    assert attn._split_head_dim(384) == (256, 128)
    assert attn._split_head_dim(512) == (512, 0)
    # the rule picked from the H100 sweep (benchmarks/RESULTS.md, run 3)
    assert attn._blocks("fwd", 81, 384)[0] == (32, 32, 4, 2)
    assert attn._blocks("dq", 81, 384)[0] == (32, 32, 4, 2)
    assert attn._blocks("dkdv", 81, 384)[0] == (32, 16, 4, 2)
    assert attn._blocks("fwd", 81, 64)[0] == (64, 32, 4, 2)
    assert attn._blocks("dq", 81, 64)[0] == (64, 32, 4, 2)
    assert attn._blocks("dkdv", 81, 64)[0] == (64, 64, 4, 2)
    assert attn._blocks("fwd", 81, 512)[0][2] == 8


def test_launch_falls_back_when_out_of_resources():
    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, BM, BN, num_warps, num_stages, **meta):
                if num_stages > 1:
                    raise OutOfResources(300000, 232448, "shared memory")
                launched.append((grid, BM, BN, num_warps, num_stages))

            return run

    attn._launch("fwd", FakeKernel(), 3, 81, 384, "fake-dtype", lambda n_blk: (), {"HEAD_DIM": 384})
    assert launched == [((9,), 32, 32, 4, 1)]
    attn._CHOSEN.clear()


def test_short_kernel_rule():
    assert [attn._head_chunk(d) for d in (16, 24, 64, 80, 96, 384, 512)] == [16, 16, 64, 16, 32, 64, 64]
    # 8 warps for the 128 x 128 score tile of L = 81 (no spills in an sm_90 compile), 4 below;
    # several head-dim chunks (measured at 384): one pair a program, three pipeline stages in
    # the forward, four in the backward; one chunk: persistent, the forward two programs an SM
    # at 128 registers with two stages, the backward one program an SM with three
    assert attn._short_configs("fwd_short", 81, 384)[:2] == [(64, 8, 3, 0, 0), (64, 8, 2, 0, 0)]
    assert attn._short_configs("bwd_short", 81, 384)[:2] == [(64, 8, 4, 0, 0), (64, 8, 3, 0, 0)]
    assert attn._short_configs("fwd_short", 81, 64)[:2] == [(64, 8, 2, 2, 128), (64, 8, 3, 1, 0)]
    assert attn._short_configs("bwd_short", 81, 64)[:2] == [(64, 8, 3, 1, 0), (64, 8, 2, 1, 0)]
    assert attn._short_configs("bwd_short", 33, 80)[0] == (16, 4, 4, 0, 0)
    assert attn._short_configs("fwd_short", 81, 384)[-1] == (16, 8, 1, 0, 0)


@pytest.mark.parametrize(("head_dim", "kinds"), [(128, {"fwd_short", "bwd_short"}), (64, {"fwd_short", "bwd_short"})])
def test_default_families_at_l81_like_lengths(head_dim, kinds):
    """Default rule for short sequences: the short kernels both ways, pipelined over head-dim
    chunks (D = 128) or, with one chunk, over pairs (D = 64)."""
    q, k, v = _inputs(1, 1, 9, head_dim, torch.float32)
    pad = torch.zeros(1, 9, dtype=torch.bool, device=DEVICE)
    pad[0, 7:] = True
    attn._CHOSEN.clear()
    _assert_matches_reference(q, k, v, pad, 3, torch.float32)
    launched = {key[0] for key in attn._CHOSEN}
    attn._CHOSEN.clear()
    assert launched == kinds, launched


def test_short_launch_reports_when_nothing_fits():
    """Every short configuration refused: ``_launch_short`` says so, so the caller runs the
    blocked kernels instead (they have their own smaller-tile chain)."""
    tried = []

    class RefusingKernel:
        def __getitem__(self, grid):
            def run(*args, BL, BD, num_warps, num_stages, **meta):
                tried.append((grid, BL, BD, num_warps, num_stages))
                raise OutOfResources(300000, 232448, "shared memory")

            return run

    meta = {"HEAD_DIM": 384, "DROPOUT": False}
    args = (torch.empty(0),)
    assert not attn._launch_short("fwd_short", RefusingKernel(), 6, 81, 384, args, meta)
    assert tried == [((6,), 128, 64, 8, 3), ((6,), 128, 64, 8, 2), ((6,), 128, 64, 8, 1), ((6,), 128, 16, 8, 1)]
    # one chunk (the interpreter's nominal 2 SMs): the forward two programs an SM, then one;
    # the backward persistent, then one program a pair
    tried.clear()
    assert not attn._launch_short("fwd_short", RefusingKernel(), 6, 81, 64, args, {"HEAD_DIM": 64, "DROPOUT": False})
    assert tried == [
        ((4,), 128, 64, 8, 2), ((2,), 128, 64, 8, 3), ((2,), 128, 64, 8, 2),
        ((6,), 128, 64, 8, 1), ((6,), 128, 16, 8, 1),
    ]  # fmt: skip
    tried.clear()
    assert not attn._launch_short("bwd_short", RefusingKernel(), 6, 81, 64, args, {"HEAD_DIM": 64, "DROPOUT": False})
    assert tried == [((2,), 128, 64, 8, 3), ((2,), 128, 64, 8, 2), ((6,), 128, 64, 8, 1), ((6,), 128, 16, 8, 1)]
    assert not any(key[0] in ("fwd_short", "bwd_short") for key in attn._CHOSEN)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _inputs(1, 1, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="q, k, v"):
        attn.id_masked_attention(q, k[..., :8], v, None, None, 0.0, None, 0)
    with pytest.raises(TypeError, match="dtype"):
        attn.id_masked_attention(q, k.half(), v, None, None, 0.0, None, 0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn.id_masked_attention(q, k, v, torch.zeros(1, 5, dtype=torch.bool), None, 0.0, None, 0)
    with pytest.raises(ValueError, match="id_index"):
        attn.id_masked_attention(q, k, v, None, 6, 0.0, None, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        attn.id_masked_attention(q, k, v, None, None, 1.0, None, 0)

"""The training loop and the example's models, end to end on a tiny synthetic dataset."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from odmt_components import collate_train, leave_one_out, make_synthetic_dataset, popularity_log_q
from odmt_components.training import Recommender, TrainConfig, evaluate, fit, ranking_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_odmt  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic_dataset(
        n_users=48, n_items=60, n_topics=4, text_len=5, text_dim=8, image_tokens=3, image_dim=8, max_len=10, seed=1
    )


def one_batch(data, users: int, max_seq_len: int):
    """``log_q`` of the training split and one training batch of its first ``users``."""
    split = leave_one_out(data)
    return popularity_log_q(split.train, data.n_items), collate_train(split.train[:users], max_seq_len)


def tiny_config(**overrides) -> train_odmt.ODMTConfig:
    options = dict(dim=16, epochs=2, batch_size=16, lr=1e-2, weight_decay=0.0, rampup_epochs=1.0, progress=False)
    options.update(overrides)
    return train_odmt.ODMTConfig(**options)


@pytest.mark.parametrize(
    "overrides, heads",
    [
        (dict(), {"id", "text", "image", "fused"}),
        (dict(model="sasrec"), {"id"}),
        (dict(model="sasrec_ef"), {"fused"}),
        (dict(model="sasrec_lf"), {"id", "text", "image", "fused"}),
        (dict(distill=False, id_mask=False, id_init="random"), {"id", "text", "image", "fused"}),
        (dict(use_id=False), {"text", "image", "fused"}),
        (dict(backbone="gru4rec", distill_form="ce", detach_teacher=False), {"id", "text", "image", "fused"}),
        (dict(backbone="nextitnet", token_layout="reference"), {"id", "text", "image", "fused"}),
    ],
)
def test_every_model_variant_trains_and_reports_each_head(tiny_data, overrides, heads):
    messages = []
    result = train_odmt.run(tiny_config(epochs=1, **overrides), tiny_data, torch.device("cpu"), log=messages.append)
    assert set(result.test) == heads
    assert result.best_epoch == 1 and len(result.history) == 1 and len(messages) == 1
    for metrics in result.test.values():
        assert set(metrics) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
        assert 0.0 <= metrics["ndcg@10"] <= metrics["recall@10"] <= metrics["recall@20"] <= 1.0
    table = train_odmt.format_table(result)
    assert table.count("\n") == len(heads) + 1


def test_fit_keeps_the_best_validation_epoch(tiny_data):
    config = tiny_config(epochs=3)
    split = leave_one_out(tiny_data)
    model = train_odmt.build_model(config, tiny_data)
    assert isinstance(model, Recommender)
    result = fit(
        model,
        split,
        popularity_log_q(split.train, tiny_data.n_items),
        train_odmt.train_config(config),
        log=lambda _: None,
    )
    values = [record.valid["fused"]["recall@10"] for record in result.history]
    assert result.best_epoch == 1 + values.index(max(values))
    assert result.valid == result.history[result.best_epoch - 1].valid
    # the weights in the model are the selected epoch's: validation reproduces its numbers
    from odmt_components.training import evaluate

    again = evaluate(model, split.valid_history, split.valid_target, train_odmt.train_config(config))
    assert again["fused"] == pytest.approx(result.valid["fused"])


def test_training_moves_the_metrics(tiny_data):
    """Training must beat the untrained model on validation (the loop really learns)."""
    config = tiny_config(epochs=4, model="sasrec")
    split = leave_one_out(tiny_data)
    from odmt_components.training import evaluate

    torch.manual_seed(0)
    model = train_odmt.build_model(config, tiny_data)
    before = evaluate(model, split.valid_history, split.valid_target, train_odmt.train_config(config))
    result = fit(
        model,
        split,
        popularity_log_q(split.train, tiny_data.n_items),
        train_odmt.train_config(config),
        log=lambda _: None,
    )
    assert result.valid["id"]["recall@20"] > before["id"]["recall@20"]


def test_config_split_and_bad_model(tiny_data):
    config = tiny_config(lr=3e-3)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert train_odmt.train_config(config).lr == 3e-3 and "rampup_epochs" in names
    with pytest.raises(ValueError, match="model"):
        train_odmt.build_model(tiny_config(model="bert4rec"), tiny_data)
    with pytest.raises(TypeError, match="Recommender"):
        fit(torch.nn.Linear(2, 2), leave_one_out(tiny_data), torch.zeros(61), TrainConfig())


def test_train_config_rejects_empty_settings():
    for field, value in (("epochs", 0), ("batch_size", 0), ("eval_batch_size", 0), ("max_seq_len", 0)):
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be >= 1"):
            TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="ks"):
        TrainConfig(ks=())


def test_ranking_scores_stay_float32_under_autocast():
    """bf16 scores tie items, and ties count against the target: the final product is
    computed in float32 even where the evaluation runs under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    states, items = torch.randn(8, 16, generator=g), torch.randn(300, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = ranking_scores(states, items)
        assert (states @ items.t()).dtype == torch.bfloat16  # what a plain product gives there
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, states @ items.t())


def test_evaluate_refuses_scores_below_float32(tiny_data):
    model = train_odmt.build_model(tiny_config(model="sasrec"), tiny_data)
    split = leave_one_out(tiny_data)
    plain = model.score
    model.score = lambda batch, prepared: {k: v.bfloat16() for k, v in plain(batch, prepared).items()}
    with pytest.raises(TypeError, match="bfloat16 scores for head 'id'"):
        evaluate(model, split.valid_history, split.valid_target, TrainConfig(progress=False))


def test_a_training_step_repeats_bit_for_bit_on_several_cpu_threads(tiny_data):
    """The same seed gives the same run: every item vector reaches the batch's positions
    through ``index_select`` (the backward of ``vectors[where]`` accumulated with
    ``index_put_``, whose order varied between runs with two CPU threads: the example's
    losses drifted from the third epoch on)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        log_q, batch = one_batch(tiny_data, 48, 10)
        model = train_odmt.build_model(tiny_config(dim=64), tiny_data)
        grads = []
        for _ in range(4):
            model.zero_grad()
            torch.manual_seed(0)  # the same dropout masks
            loss, _ = model.training_loss(batch, log_q, 0.5)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


def test_non_finite_loss_stops_training_before_the_update(tiny_data):
    """The loop reads the loss back once a step, after the backward is queued and before the
    optimizer step: a NaN loss raises with the parameters as they were."""
    import numpy as np

    from odmt_components.training import train_one_epoch

    config = tiny_config()
    split = leave_one_out(tiny_data)
    model = train_odmt.build_model(config, tiny_data)
    log_q = popularity_log_q(split.train, tiny_data.n_items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    honest = model.training_loss
    seen_logs = []

    def poisoned(batch, log_q, weight):
        loss, logs = honest(batch, log_q, weight)
        seen_logs.append(logs)
        return loss * float("nan"), logs

    model.training_loss = poisoned
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at epoch 1, batch 0"):
        train_one_epoch(
            model,
            optimizer,
            split.train,
            log_q,
            train_odmt.train_config(config),
            epoch=1,
            generator=np.random.default_rng(0),
            weight_schedule=lambda step: 1.0,
            first_step=0,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert set(seen_logs[0]) == {"ce", "kl"} and all(isinstance(v, torch.Tensor) for v in seen_logs[0].values())


def test_read_back_of_the_step_numbers():
    from odmt_components.training import _read_back

    loss = torch.tensor(2.5)
    got = _read_back(loss, {"ce": torch.tensor(1.25, dtype=torch.bfloat16), "kl": 0.5, "n": torch.tensor([3])})
    assert got == {"loss": 2.5, "ce": 1.25, "kl": 0.5, "n": 3.0}
    with pytest.raises(ValueError, match="named 'loss'"):
        _read_back(loss, {"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="scalar 'ce'"):
        _read_back(loss, {"ce": torch.ones(2)})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_training_step_reads_nothing_back_with_value_checks_off(tiny_data, backend, host_reads):
    """The ODMT step (IMT with attention dropout, backbones, debiased loss and distillation,
    backward) keeps the host waiting for nothing once the value checks are off and every
    position is encoded: what lets a user capture it in a CUDA graph, and the host run ahead
    of the GPU. With the checks on their one transfer a checked call is what it reads, plus
    the count of distinct items when each is encoded once (the default)."""
    from odmt_components import ops

    log_q, batch = one_batch(tiny_data, users=3, max_seq_len=4)

    def reads(checks: bool, **overrides) -> list[str]:
        torch.manual_seed(0)
        model = train_odmt.build_model(tiny_config(dropout=0.1, **overrides), tiny_data).train()

        def step():
            loss, _ = model.training_loss(batch, log_q, 1.0)
            loss.backward()

        ops.set_value_checks(checks)
        try:
            return host_reads(step)
        finally:
            ops.set_value_checks(True)

    previous = ops.get_backend()
    ops.set_backend(backend)
    try:
        default = reads(True)
        static_checked = reads(True, encode_distinct=False)
        static = reads(False, encode_distinct=False)
    finally:
        ops.set_backend(previous)
    # Checked calls: the IMT, three backbones, the distillation loss.
    assert static_checked == ["Tensor.tolist"] * 5
    assert sorted(default) == sorted(static_checked + ["aten::_unique2"])
    assert static == []


def test_encoding_every_position_matches_encoding_each_item_once(tiny_data):
    log_q, batch = one_batch(tiny_data, users=6, max_seq_len=10)
    losses = []
    for distinct in (True, False):
        torch.manual_seed(0)
        model = train_odmt.build_model(tiny_config(encode_distinct=distinct), tiny_data).double().eval()
        loss, _ = model.training_loss(batch, log_q.double(), 1.0)
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)


def test_the_example_step_compiles_whole_when_every_position_is_encoded(tiny_data):
    """``torch.compile(fullgraph=True)`` of the whole ODMT step on the kernels (each distinct
    item encoded once would break the graph at ``torch.unique``): same loss and gradients."""
    log_q, batch = one_batch(tiny_data, users=3, max_seq_len=4)
    torch.manual_seed(0)
    model = train_odmt.build_model(tiny_config(encode_distinct=False, dropout=0.0, backend="triton"), tiny_data)
    model.train()

    def loss_and_grads(training_loss):
        model.zero_grad(set_to_none=True)
        loss, logs = training_loss(batch, log_q, 0.7)
        loss.backward()
        return loss.detach(), logs, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch._dynamo.reset()
    eager = loss_and_grads(model.training_loss)
    compiled = loss_and_grads(torch.compile(model.training_loss, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys() == {"ce", "kl"}
    assert len(compiled[2]) == len(eager[2]) > 0
    for got, expected in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

"""Tests of odmt_components.data: folder format, filtering, splits, popularity, batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from odmt_components.data import (
    FORMAT_VERSION,
    IGNORE_INDEX,
    POPULARITY_FLOOR_COUNT,
    DatasetFormatError,
    MultiModalDataset,
    collate_eval,
    collate_train,
    leave_one_out,
    load_dataset_folder,
    make_synthetic_dataset,
    popularity_log_q,
    save_dataset_folder,
)

LT, DT, LV, DV = 4, 3, 2, 5


def _features(n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_items, LT, DT)).astype(np.float32)
    # Row i's CLS encodes i so gathered rows can be traced.
    text[:, 0, 0] = np.arange(n_items)
    padding = np.zeros((n_items, LT), dtype=bool)
    padding[:, 2:] = rng.random((n_items, LT - 2)) < 0.5
    image = rng.normal(size=(n_items, LV, DV)).astype(np.float32)
    return text, padding, image


def _write(tmp_path, interactions, items, **kw):
    text, padding, image = _features(len(items))
    args = {"text_tokens": text, "text_padding": padding, "image_tokens": image, "name": "toy"}
    args.update(kw)
    return save_dataset_folder(tmp_path / "ds", interactions, items, **args)


# A hand-made table: user a has 6 interactions (one tie), b has 4 (dropped), c has 5.
ITEMS = [(f"i{k}", f"text {k}") for k in range(8)]
TABLE = [
    ("a", "i1", 30), ("a", "i2", 10), ("a", "i3", 20), ("a", "i4", 20), ("a", "i0", 50),
    ("a", "i5", 40),
    ("b", "i6", 1), ("b", "i6", 2), ("b", "i7", 3), ("b", "i2", 4),
    ("c", "i5", 5), ("c", "i3", 4), ("c", "i1", 3), ("c", "i2", 2), ("c", "i4", 1),
]


def test_filtering_sorting_and_remapping(tmp_path):
    folder = _write(tmp_path, TABLE, ITEMS)
    ds = load_dataset_folder(folder, min_interactions=5, keep_last=4)
    assert ds.user_keys == ["a", "c"]
    # Items i6, i7 only occur for the dropped user b: gone. Remaining in items.tsv order.
    assert ds.item_keys == ["i0", "i1", "i2", "i3", "i4", "i5"]
    key = {k: i + 1 for i, k in enumerate(ds.item_keys)}
    # a sorted by time, tie i3/i4 (t=20) kept in file order: i2 i3 i4 i1 i5 i0 -> last 4.
    assert ds.sequences[0].tolist() == [key[k] for k in ["i4", "i1", "i5", "i0"]]
    assert ds.sequences[1].tolist() == [key[k] for k in ["i2", "i1", "i3", "i5"]]
    assert ds.n_users == 2 and ds.n_items == 6
    # Feature rows follow the remapping; row 0 is the padding item.
    text, padding, image = _features(len(ITEMS))
    for new, old_key in enumerate(ds.item_keys, start=1):
        old = int(old_key[1:])
        assert torch.equal(ds.text_tokens[new], torch.from_numpy(text[old]))
        assert torch.equal(ds.text_padding[new], torch.from_numpy(padding[old]))
        assert torch.equal(ds.image_tokens[new], torch.from_numpy(image[old]))
    assert ds.text_tokens.dtype == torch.float32 and ds.image_tokens.dtype == torch.float32
    assert torch.count_nonzero(ds.text_tokens[0]) == 0 and torch.count_nonzero(ds.image_tokens[0]) == 0
    assert ds.text_padding[0].tolist() == [False] + [True] * (LT - 1)
    assert ds.item_texts == [t for k, t in ITEMS if k in key]
    # Without keep_last every interaction of kept users remains; the item set changes.
    full = load_dataset_folder(folder, min_interactions=5, keep_last=None)
    assert [len(s) for s in full.sequences] == [6, 5]
    # min_interactions=4 keeps b too (and its items).
    assert load_dataset_folder(folder, min_interactions=4).user_keys == ["a", "b", "c"]


def test_folder_round_trip_of_synthetic(tmp_path):
    ds = make_synthetic_dataset(n_users=40, n_items=60, n_topics=4, text_len=5, text_dim=4,
                                image_tokens=3, image_dim=6, seed=3)
    folder = ds.save(tmp_path / "syn", text_encoder="none", extra_meta={"note": "x"})
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == FORMAT_VERSION and meta["note"] == "x" and meta["image_encoder"] is None
    back = load_dataset_folder(folder)
    assert back.user_keys == ds.user_keys and back.item_keys == ds.item_keys
    assert back.item_texts == ds.item_texts and back.name == ds.name
    assert all(np.array_equal(a, b) for a, b in zip(ds.sequences, back.sequences, strict=True))
    for attr in ("text_tokens", "text_padding", "image_tokens"):
        assert torch.equal(getattr(ds, attr), getattr(back, attr))


def test_tsv_quoting_string_timestamps_and_float16(tmp_path):
    items = [("x\ty", 'says "hi"\nnext line'), ("plain", "")] + [(f"k{i}", "t") for i in range(3)]
    stamps = ["2020-01-05", "2020-01-01", "2020-01-03", "2020-01-02", "2020-01-04"]
    inter = {"user_id": ["u"] * 5, "item_id": [k for k, _ in items], "timestamp": stamps}
    text, padding, image = _features(len(items))
    folder = save_dataset_folder(tmp_path / "q", inter, items, text.astype(np.float16), padding,
                                 image.astype(np.float64), name="q")
    assert np.load(folder / "text_tokens.npy").dtype == np.float16
    assert np.load(folder / "image_tokens.npy").dtype == np.float32
    ds = load_dataset_folder(folder)
    assert ds.item_keys == [k for k, _ in items] and ds.item_texts == [t for _, t in items]
    order = np.argsort(stamps, kind="stable")
    assert ds.sequences[0].tolist() == (order + 1).tolist()
    half = load_dataset_folder(folder, feature_dtype=torch.float16)
    assert half.text_tokens.dtype == torch.float16


def test_extra_columns_ignored_and_any_column_order(tmp_path):
    folder = _write(tmp_path, TABLE, ITEMS)
    lines = (folder / "interactions.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    (folder / "interactions.tsv").write_text(
        "\n".join("\t".join([r[2], "extra", r[1], r[0]]) for r in rows) + "\n"
    )
    assert load_dataset_folder(folder).user_keys == ["a", "c"]


def _expect_error(folder, match):
    assert issubclass(DatasetFormatError, ValueError)
    with pytest.raises(DatasetFormatError, match=match):
        load_dataset_folder(folder)


def test_load_validation_errors(tmp_path):
    folder = _write(tmp_path, TABLE, ITEMS)
    text, padding, image = _features(len(ITEMS))

    (folder / "image_tokens.npy").rename(folder / "gone.npy")
    _expect_error(folder, r"missing file .*image_tokens\.npy")
    (folder / "gone.npy").rename(folder / "image_tokens.npy")

    np.save(folder / "image_tokens.npy", image[:, 0])
    _expect_error(folder, r"image_tokens.*\(n_items, Lv, dv\).*2 dims")
    np.save(folder / "image_tokens.npy", image[:-1])
    _expect_error(folder, r"image_tokens.*7 rows.*text_tokens.*8")
    np.save(folder / "image_tokens.npy", image)

    np.save(folder / "text_tokens.npy", text[:-1])
    np.save(folder / "text_padding.npy", padding[:-1])
    np.save(folder / "image_tokens.npy", image[:-1])
    _expect_error(folder, r"7 rows but items\.tsv lists 8 items")
    np.save(folder / "text_padding.npy", padding)
    np.save(folder / "image_tokens.npy", image)

    bad = text.copy()
    bad[3, 1, 2] = np.nan
    np.save(folder / "text_tokens.npy", bad)
    _expect_error(folder, r"text_tokens\.npy holds NaN or inf")
    bad[3, 1, 2] = np.inf
    np.save(folder / "text_tokens.npy", bad)
    _expect_error(folder, r"NaN or inf")
    np.save(folder / "text_tokens.npy", text)

    cls_pad = padding.copy()
    cls_pad[2, 0] = True
    np.save(folder / "text_padding.npy", cls_pad)
    _expect_error(folder, r"text_padding.*token 0.*row 2")
    np.save(folder / "text_padding.npy", padding.astype(np.int8))
    _expect_error(folder, r"text_padding.*must be bool")
    np.save(folder / "text_padding.npy", padding)

    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": "odmt-dataset/9"}))
    _expect_error(folder, r"unknown format version 'odmt-dataset/9'")
    (folder / "meta.json").write_text(json.dumps(meta))

    good_items = (folder / "items.tsv").read_text()
    (folder / "items.tsv").write_text(good_items.replace("i7\t", "i9\t"))
    _expect_error(folder, r"interactions\.tsv references item id 'i7'")
    (folder / "items.tsv").write_text(good_items.replace("item_id\t", "id\t"))
    _expect_error(folder, r"items\.tsv header must contain.*missing \['item_id'\]")
    (folder / "items.tsv").write_text(good_items.replace("i7\t", "i6\t"))
    _expect_error(folder, r"item id 'i6' occurs twice")
    (folder / "items.tsv").write_text(good_items)

    assert load_dataset_folder(folder).n_users == 2
    with pytest.raises(ValueError, match="no user has >= min_interactions = 7"):
        load_dataset_folder(folder, min_interactions=7)
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset_folder(tmp_path / "nowhere")


def test_save_validation_errors(tmp_path):
    text, padding, image = _features(len(ITEMS))
    ok = {"text_tokens": text, "text_padding": padding, "image_tokens": image, "name": "n"}
    out = tmp_path / "s"

    def bad(match, interactions=TABLE, items=ITEMS, **kw):
        with pytest.raises((ValueError, TypeError), match=match):
            save_dataset_folder(out, interactions, items, **{**ok, **kw})
        assert not out.exists()

    bad(r"text_tokens must have shape \(n_items, Lt, dt\)", text_tokens=text[:, :, 0])
    bad(r"text_padding must have shape \(n_items, Lt\) = \(8, 4\)", text_padding=padding[:, :3])
    bad(r"text_padding must be bool", text_padding=padding.astype(np.float32))
    bad(r"text_tokens must be float16 or float32", text_tokens=text.astype(np.int32))
    bad(r"8 rows but items lists 7", items=ITEMS[:7])
    bad(r"token 0 = CLS", text_padding=np.ones_like(padding))
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.inf
    bad(r"image_tokens holds NaN or inf", image_tokens=nan_image)
    bad(r"item ids missing from items.*i9", interactions=TABLE + [("a", "i9", 1)])
    bad(r"items\[0\] must be an \(item_id, text\) pair", items=[("i0",)] + ITEMS[1:])
    bad(r"item ids must be unique, 'i0'", items=[("i0", "x")] + ITEMS[1:] + [("i0", "y")],
        text_tokens=np.concatenate([text, text[:1]]), text_padding=np.concatenate([padding, padding[:1]]),
        image_tokens=np.concatenate([image, image[:1]]))
    bad(r"columns must have equal lengths",
        interactions={"user_id": ["a"], "item_id": ["i0", "i1"], "timestamp": [1]})
    bad(r"name must be a non-empty string", name="")
    bad(r"extra_meta may not set the format keys", extra_meta={"format": "x"})
    bad(r"text_tokens must be a numpy array or torch tensor", text_tokens=text.tolist())
    # every field is checked before the first file is written
    bad(r"interactions\[1\] user_id must not contain NUL", interactions=TABLE[:1] + [("u\x00", "i0", 1)] + TABLE[1:])
    bad(r"interactions\[0\] timestamp must be a number or a string, got None", interactions=[("a", "i0", None)])
    bad(r"timestamp must be finite, got", interactions=[("a", "i0", np.float32("nan"))])
    bad(r"timestamp must be non-empty, without NUL", interactions=[("a", "i0", "2020\x00")])
    bad(r"timestamp must be non-empty, without NUL", interactions=[("a", "i0", " ")])
    # bf16 features (numpy has no bfloat16) are stored as float32
    bf16 = torch.from_numpy(text).bfloat16()
    save_dataset_folder(out, TABLE, ITEMS, bf16, torch.from_numpy(padding), torch.from_numpy(image), name="n")
    stored = np.load(out / "text_tokens.npy")
    assert stored.dtype == np.float32 and np.array_equal(stored, bf16.float().numpy())
    # torch inputs are accepted.
    save_dataset_folder(out, TABLE, ITEMS, torch.from_numpy(text), torch.from_numpy(padding),
                        torch.from_numpy(image), name="n")
    assert load_dataset_folder(out).n_items == 6


def test_dataset_invariants_checked():
    ds = make_synthetic_dataset(n_users=20, n_items=40, n_topics=4, seed=1)
    with pytest.raises(ValueError, match=r"text_tokens must have 3 dims and n_items \+ 1"):
        MultiModalDataset(ds.sequences, ds.text_tokens[1:], ds.text_padding, ds.image_tokens,
                          ds.item_keys, ds.user_keys, "x")
    with pytest.raises(ValueError, match=r"sequences\[0\] holds ids outside"):
        MultiModalDataset([np.array([0, 1])] + ds.sequences[1:], ds.text_tokens, ds.text_padding,
                          ds.image_tokens, ds.item_keys, ds.user_keys, "x")


def test_leave_one_out_and_popularity():
    seqs = [np.array([3, 1, 2, 5]), np.array([4, 4, 1])]
    split = leave_one_out(seqs)
    assert [s.tolist() for s in split.train] == [[3, 1], [4]]
    assert [s.tolist() for s in split.valid_history] == [[3, 1], [4]]
    assert split.valid_target.tolist() == [2, 4]
    assert [s.tolist() for s in split.test_history] == [[3, 1, 2], [4, 4]]
    assert split.test_target.tolist() == [5, 1]
    with pytest.raises(ValueError, match="length >= 3"):
        leave_one_out([np.array([1, 2])])

    log_q = popularity_log_q(split.train, n_items=6)
    assert log_q.shape == (7,) and log_q.dtype == torch.float32
    assert torch.isfinite(log_q).all()
    expected = [POPULARITY_FLOOR_COUNT, 1, POPULARITY_FLOOR_COUNT, 1, 1, POPULARITY_FLOOR_COUNT,
                POPULARITY_FLOOR_COUNT]
    torch.testing.assert_close(log_q, torch.tensor([math.log(c / 3) for c in expected]))
    with pytest.raises(ValueError, match=r"outside 1..n_items = 1..3"):
        popularity_log_q([np.array([4])], n_items=3)


def _slow_train_batch(sequences, seq_len):
    """Per-user, per-position loop implementing the TrainBatch contract literally."""
    rows, targets, excludes = [], [], []
    for b, seq in enumerate(sequences):
        tail = list(seq)[-(seq_len + 1):]
        row = [0] * (seq_len + 1 - len(tail)) + tail
        rows.append(row)
        for t in range(seq_len):
            ok = row[t] != 0 and row[t + 1] != 0
            targets.append(b * (seq_len + 1) + t + 1 if ok else IGNORE_INDEX)
            excludes.append(row)
    return torch.tensor(rows), torch.tensor(targets), torch.tensor(excludes)


@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    seq_len=st.integers(1, 6),
    seed=st.integers(0, 100),
)
def test_collate_train_matches_slow_loop(lengths, seq_len, seed):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, 20, size=n) for n in lengths]
    batch = collate_train(sequences, seq_len)
    items, target, exclude = _slow_train_batch(sequences, seq_len)
    n_users = len(lengths)
    assert torch.equal(batch.item_ids, items)
    assert batch.item_ids.dtype == torch.int64 and batch.target.dtype == torch.int64
    assert torch.equal(batch.input_ids, items[:, :-1])
    assert torch.equal(batch.input_padding, items[:, :-1] == 0)
    assert torch.equal(batch.candidate_ids, items.reshape(-1))
    assert torch.equal(batch.target, target)
    assert batch.exclude_ids.shape == (n_users * seq_len, seq_len + 1)
    assert torch.equal(batch.exclude_ids, exclude)
    assert torch.equal(batch.exclude_ids_per_user, items) and batch.positions_per_user == seq_len
    # Every valid target column holds the next item of that row's user.
    valid = batch.target != IGNORE_INDEX
    assert batch.n_valid == int(valid.sum())
    next_items = items[:, 1:].reshape(-1)
    assert torch.equal(batch.candidate_ids[batch.target[valid]], next_items[valid])


def test_collate_train_errors_and_device_move():
    with pytest.raises(ValueError, match="sequences is empty"):
        collate_train([], 4)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        collate_train([np.array([1, 2])], 0)
    with pytest.raises(ValueError, match="real items are >= 1"):
        collate_train([np.array([1, 0, 2])], 4)
    with pytest.raises(TypeError, match=r"sequences\[1\] must be a 1-D sequence of integer"):
        collate_train([np.array([1, 2]), np.array([1.5])], 4)
    moved = collate_train([[1, 2, 3], torch.tensor([4, 5])], 3).to("cpu")
    assert moved.candidate_ids.data_ptr() == moved.item_ids.data_ptr()


def test_collate_eval():
    histories = [np.array([1, 2, 3, 4, 5]), np.array([7])]
    batch = collate_eval(histories, np.array([6, 2]), 3)
    assert batch.input_ids.tolist() == [[3, 4, 5], [0, 0, 7]]
    assert batch.input_padding.tolist() == [[False] * 3, [True, True, False]]
    assert batch.target_ids.tolist() == [6, 2]
    assert batch.history_ids.tolist() == [[1, 2, 3, 4, 5], [7, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"targets must be \(2,\) integer item ids"):
        collate_eval(histories, [6], 3)
    with pytest.raises(ValueError, match="targets hold item id 0"):
        collate_eval(histories, [6, 0], 3)


def test_synthetic_dataset_deterministic_and_well_formed():
    kw = {"n_users": 60, "n_items": 80, "n_topics": 4, "seed": 7}
    a, b = make_synthetic_dataset(**kw), make_synthetic_dataset(**kw)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert torch.equal(a.text_tokens, b.text_tokens) and torch.equal(a.image_tokens, b.image_tokens)
    c = make_synthetic_dataset(**{**kw, "seed": 8})
    assert not torch.equal(a.text_tokens[1:5], c.text_tokens[1:5])
    lengths = [len(s) for s in a.sequences]
    assert min(lengths) >= 5 and max(lengths) <= 15
    assert all(len(set(s.tolist())) == len(s) for s in a.sequences)  # no repeats
    flat = np.concatenate(a.sequences)
    assert set(flat.tolist()) == set(range(1, a.n_items + 1))  # every kept item occurs
    assert bool(a.text_padding[1:].any()) and not bool(a.text_padding[:, 0].any())
    assert torch.isfinite(a.text_tokens).all() and torch.isfinite(a.image_tokens).all()
    with pytest.raises(ValueError, match="max_len"):
        make_synthetic_dataset(n_items=20, n_topics=4, max_len=21)


def test_synthetic_features_carry_the_item_signal():
    """Consecutive items are closer in CLS feature space than random pairs, and the CLS
    token is less noisy than the other tokens (the structure the generator promises)."""
    ds = make_synthetic_dataset(n_users=200, n_items=200, n_topics=8, link_probability=0.0, seed=0)
    cls = torch.cat([ds.text_tokens[:, 0], ds.image_tokens[:, 0]], 1)
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in ds.sequences])
    consecutive = (cls[pairs[:, 0]] - cls[pairs[:, 1]]).norm(dim=1).mean()
    rng = np.random.default_rng(0)
    random_pairs = rng.integers(1, ds.n_items + 1, size=pairs.shape)
    random = (cls[random_pairs[:, 0]] - cls[random_pairs[:, 1]]).norm(dim=1).mean()
    assert consecutive < 0.7 * random
    counts = np.bincount(np.concatenate(ds.sequences), minlength=ds.n_items + 1)[1:]
    assert (counts <= 3).sum() > 0.1 * ds.n_items  # a long tail of rare items


def test_train_batch_feeds_the_reference_loss():
    """The batch's fields have the shapes and meaning the in-batch loss expects: with item
    vectors equal to one-hot ids, every row's positive is the only non-excluded column that
    holds its target item, and excluded copies of history items get no probability."""
    from odmt_components.kernels.reference import (
        debiased_inbatch_cross_entropy_reference,
        inbatch_exclusion_mask,
    )

    batch = collate_train([np.array([1, 2, 3, 2, 4]), np.array([5, 1]), np.array([3])], 3)
    valid = batch.target != IGNORE_INDEX
    excluded = inbatch_exclusion_mask(batch.target[valid], batch.candidate_ids,
                                      batch.exclude_ids[valid])
    cand = batch.candidate_ids
    for row, col in zip(excluded, batch.target[valid], strict=True):
        allowed = (~row).nonzero().flatten()
        assert int(col) in allowed.tolist()
        # Only the target column carries the target item; no allowed column is padding.
        assert (cand[allowed] == cand[col]).sum() == 1 and (cand[allowed] != 0).all()
    onehot = torch.nn.functional.one_hot(cand, 6).double()
    queries = torch.randn(batch.target.shape[0], 6, dtype=torch.float64)
    loss = debiased_inbatch_cross_entropy_reference(
        queries, onehot, batch.target, batch.candidate_ids, batch.exclude_ids,
        popularity_log_q([np.array([1, 2, 3])], 5).double()[batch.candidate_ids],
    )
    assert torch.isfinite(loss) and loss >= 0

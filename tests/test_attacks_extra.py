"""WaNet, BPP, CTRL, Ada-SIG and FMB: masks, labels, determinism, test triggers and the trigger maths."""

import numpy as np
import pytest

from cgd import CGDError
from cgd.attacks import ATTACKS, get
from cgd.attacks.adaptive import MixedPoisonedSet, half_mix
from cgd.attacks.classic import SIG
from cgd.attacks.dynamic import squeeze_colors
from cgd.attacks.frequency import RGB_TO_YUV, YUV_TO_RGB, block_dct, ctrl_pattern
from cgd.data import ImageSet

NEW = ["wanet", "bpp", "ctrl", "ada-sig", "fmb"]
CLEAN_LABEL = {"ctrl", "ada-sig"}
NAMES = [str(i) for i in range(10)]


def make_set(n=200, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    return ImageSet(images, labels, NAMES)


@pytest.fixture(scope="module")
def train():
    return make_set(200, seed=0)


@pytest.fixture(scope="module")
def test():
    return make_set(100, seed=1)


def altered(ps):
    return ps.poison_mask | (ps.cross_mask if ps.cross_mask is not None else False)


def test_registry_lists_and_builds_every_attack():
    for name in NEW:
        assert name in ATTACKS.names()
        attack = get(name, target=0)
        assert attack.name == name
        assert attack.clean_label == (name in CLEAN_LABEL)
    with pytest.raises(CGDError):
        get("no-such-attack")


@pytest.mark.parametrize("name", NEW)
def test_trigger_only_where_masks_say(name, train):
    ps = get(name).poison(train)
    changed = np.any(ps.train.images != train.images, axis=(1, 2, 3))
    assert not changed[~altered(ps)].any(), "an image outside poison/cross masks was modified"
    assert changed[ps.poison_mask].all()
    if ps.cross_mask is not None:
        assert not (ps.cross_mask & ps.poison_mask).any()
        assert ps.cross_mask.sum() > 0 and changed[ps.cross_mask].all()
    assert ps.train.images.dtype == np.uint8 and ps.train.images.shape == train.images.shape


@pytest.mark.parametrize("name", NEW)
def test_labels(name, train):
    attack = get(name)
    ps = attack.poison(train)
    p = ps.poison_mask
    if attack.clean_label:
        np.testing.assert_array_equal(ps.train.labels, train.labels)
        assert (train.labels[p] == attack.target).all()
        assert p.sum() == round(attack.rate * (train.labels == attack.target).sum())
    else:
        assert (ps.train.labels[p] == attack.target).all()
        assert (train.labels[p] != attack.target).all()
        np.testing.assert_array_equal(ps.train.labels[~p], train.labels[~p])  # cross samples keep labels too
        assert p.sum() == round(attack.rate * len(train))


@pytest.mark.parametrize("name", NEW)
def test_deterministic_under_seed(name, train):
    a, b, c = get(name, seed=3).poison(train), get(name, seed=3).poison(train), get(name, seed=4).poison(train)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    np.testing.assert_array_equal(a.poison_mask, b.poison_mask)
    np.testing.assert_array_equal(altered(a), altered(b))
    assert not np.array_equal(a.train.images, c.train.images)


@pytest.mark.parametrize("name", NEW)
def test_params_reproduce_the_attack(name, train):
    ps = get(name, seed=5).poison(train)
    again = get(name, **ps.params).poison(train)
    np.testing.assert_array_equal(ps.train.images, again.train.images)
    np.testing.assert_array_equal(ps.train.labels, again.train.labels)


@pytest.mark.parametrize("name", ["wanet", "bpp", "ctrl", "ada-sig"])
def test_triggered_test_is_trigger_on_non_target_images(name, train, test):
    attack = get(name, target=2)
    ps = attack.poison(train)
    tt = ps.triggered_test(test)
    keep = test.labels != 2
    assert len(tt) == keep.sum() and (tt.labels == 2).all()
    np.testing.assert_array_equal(tt.images, attack.apply_trigger(test.images[keep]))


@pytest.mark.parametrize("name", NEW)
def test_trigger_is_strong_deterministic_and_pure(name, train, test):
    attack = get(name)
    attack.poison(train)  # FMB's label-blind trigger needs its reference images
    x = test.images.copy()
    y1, y2 = attack.apply_trigger(x), attack.apply_trigger(x)
    np.testing.assert_array_equal(x, test.images)  # input untouched
    np.testing.assert_array_equal(y1, y2)
    assert y1.dtype == np.uint8 and y1.shape == x.shape
    assert np.abs(y1.astype(np.int16) - x).mean() > 2.0
    assert np.any(y1 != x, axis=(1, 2, 3)).mean() > 0.95


@pytest.mark.parametrize("name", NEW)
def test_non_square_images(name):
    ds = make_set(100, h=24, w=40, seed=2)
    attack = get(name)
    ps = attack.poison(ds)
    assert ps.train.images.shape == ds.images.shape
    assert ps.triggered_test(ds).images.shape[1:] == (24, 40, 3)
    assert attack.apply_trigger(ds.images[:3]).shape == (3, 24, 40, 3)


# ------------------------------------------------------------------------------------------------ WaNet

def test_wanet_cross_samples_are_warp_plus_noise(train):
    attack = get("wanet", cross_ratio=2.0)
    ps = attack.poison(train)
    assert ps.cross_mask.sum() == 2 * ps.poison_mask.sum()
    np.testing.assert_array_equal(ps.train.images[ps.poison_mask], attack.warp(train.images[ps.poison_mask]))
    plain = attack.warp(train.images[ps.cross_mask])
    assert np.any(ps.train.images[ps.cross_mask] != plain, axis=(1, 2, 3)).all()
    assert (ps.train.labels[ps.cross_mask] == train.labels[ps.cross_mask]).all()


def test_wanet_field_is_small_and_smooth():
    grid = get("wanet").grid(32, 32)[0].numpy()
    ys, xs = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    shift_px = np.abs(grid - np.stack([xs, ys], -1)) * 31 / 2
    assert 0.05 < shift_px.mean() < 2.0
    assert get("wanet", field_seed=1).grid(32, 32).ne(get("wanet", field_seed=2).grid(32, 32)).any()


# -------------------------------------------------------------------------------------------------- BPP

def test_bpp_squeezes_onto_the_palette(test):
    palette = np.rint(np.arange(8) * 255 / 7)
    for dithering in (True, False):
        y = squeeze_colors(test.images, 8, dithering)
        assert np.isin(y, palette).all()
    dithered, plain = squeeze_colors(test.images, 8, True), squeeze_colors(test.images, 8, False)
    assert not np.array_equal(dithered, plain)
    # error diffusion keeps a flat 100-grey image's mean, plain rounding snaps it to 109
    flat = np.full((2, 16, 16, 3), 100, dtype=np.uint8)
    assert abs(squeeze_colors(flat, 8, True).mean() - 100) < 3 < abs(squeeze_colors(flat, 8, False).mean() - 100)


def test_bpp_negatives_keep_labels(train):
    ps = get("bpp", neg_ratio=1.0).poison(train)
    assert ps.cross_mask.sum() == ps.poison_mask.sum()
    np.testing.assert_array_equal(ps.train.labels[ps.cross_mask], train.labels[ps.cross_mask])


# ------------------------------------------------------------------------------------------------- CTRL

def test_ctrl_bumps_exactly_the_chosen_uv_frequencies():
    m = 100.0
    pattern = ctrl_pattern(64, 64, m, 32, (15, 31), (1, 2)).astype(np.float64)  # 2x2 blocks
    spectrum = block_dct(np.einsum("cr,hwr->chw", RGB_TO_YUV, pattern), 32)
    expected = np.zeros_like(spectrum)
    for ch in (1, 2):
        for p in (15, 31):
            expected[ch, p::32, p::32] = m
    np.testing.assert_allclose(spectrum, expected, atol=1e-3)  # float32 pattern


def test_ctrl_matches_yuv_dct_roundtrip():
    x = np.random.default_rng(0).integers(90, 166, size=(4, 32, 32, 3), dtype=np.uint8)  # no clipping
    yuv = np.einsum("cr,nhwr->nchw", RGB_TO_YUV, x.astype(np.float64))
    d = block_dct(yuv, 32)
    d[:, 1:, [15, 31], [15, 31]] += 100.0
    back = np.einsum("rc,nchw->nhwr", YUV_TO_RGB, block_dct(d, 32, inverse=True))
    expected = np.clip(np.rint(back), 0, 255)
    got = get("ctrl").apply_trigger(x)
    assert np.abs(got.astype(np.int16) - expected).max() <= 1


def test_ctrl_rejects_positions_outside_window():
    with pytest.raises(CGDError):
        get("ctrl", window=16).apply_trigger(np.zeros((1, 32, 32, 3), np.uint8))


# ---------------------------------------------------------------------------------------------- Ada-SIG

def grey_set(n=200, value=128):
    labels = np.arange(n) % 10
    return ImageSet(np.full((n, 32, 32, 3), value, dtype=np.uint8), labels.astype(np.int64), NAMES)


def test_ada_sig_opacity_halves_the_signal():
    ds = grey_set()
    ps = get("ada-sig", mode="opacity").poison(ds)
    sig = SIG().signal(32)
    diff = ps.train.images[ps.poison_mask].astype(np.float32) - 128
    np.testing.assert_allclose(diff, np.broadcast_to(np.rint(0.5 * sig)[None, None, :, None], diff.shape), atol=1)


def test_ada_sig_patch_masks_half_the_pieces_per_sample():
    ds = grey_set()
    attack = get("ada-sig", mode="patch", rate=0.9)
    ps = attack.poison(ds)
    full = SIG().apply_trigger(ds.images[:1])[0].astype(np.int16) - 128
    diff = ps.train.images[ps.poison_mask].astype(np.int16) - 128
    pieces = diff.reshape(len(diff), 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(diff), 16, -1)
    full_pieces = full.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
    on = np.all(pieces == full_pieces[None], axis=2)
    off = np.all(pieces == 0, axis=2)
    assert (on | off).all() and (on.sum(axis=1) == 8).all()
    assert len({tuple(r) for r in on}) > 1  # a fresh mask per sample


def test_ada_sig_test_trigger_is_full_sig(test):
    for mode in ("patch", "opacity", "both"):
        np.testing.assert_array_equal(get("ada-sig", mode=mode).apply_trigger(test.images),
                                      SIG().apply_trigger(test.images))
    with pytest.raises(CGDError):
        get("ada-sig", mode="half")


# -------------------------------------------------------------------------------------------------- FMB

def test_half_mix_takes_whole_columns_from_the_two_sources():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    out = half_mix(a, b, np.random.default_rng(1), jitter=2, orientation="vertical")
    for i in range(6):
        from_a = [any(np.array_equal(out[i, :, j], a[i, :, k]) for k in range(16)) for j in range(16)]
        from_b = [any(np.array_equal(out[i, :, j], b[i, :, k]) for k in range(16)) for j in range(16)]
        assert all(fa or fb for fa, fb in zip(from_a, from_b))
        assert 6 <= sum(from_a) <= 10 and 6 <= sum(from_b) <= 10  # a cut near the middle (16/2 ± 2)


def test_fmb_one_to_one(train, test):
    attack = get("fmb", mode="one-to-one")
    ps = attack.poison(train)
    assert isinstance(ps, MixedPoisonedSet) and (ps.params["class_a"], ps.params["class_b"]) == (1, 2)
    assert (train.labels[ps.poison_mask] == 1).all()
    assert ps.cross_mask.sum() == round(0.5 * len(train))
    tt = ps.triggered_test(test)
    assert len(tt) == (test.labels == 1).sum() and (tt.labels == 0).all()


def test_fmb_all_to_one(train, test):
    ps = get("fmb", mode="all-to-one", target=3).poison(train)
    src = train.labels[ps.poison_mask]
    assert (src != 3).all() and len(np.unique(src)) > 2
    tt = ps.triggered_test(test)
    assert len(tt) == (test.labels != 3).sum() and (tt.labels == 3).all()


def test_fmb_errors(train):
    with pytest.raises(CGDError):
        get("fmb").apply_trigger(train.images[:2])  # no reference images before poison()
    with pytest.raises(CGDError):
        get("fmb", class_a=0)  # the target itself
    with pytest.raises(CGDError):
        get("fmb", rate=0.6, self_mix_rate=0.5)
    with pytest.raises(CGDError):
        get("fmb", mode="two-to-one")

"""LC, IAB, SSBA, FLIP and GCB at toy sizes: poisoning semantics, determinism, and cached resources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cgd import CGDError, attacks
from cgd.attacks import label_only, learned, resources
from cgd.data import Dataset, ImageSet, save_npz

TARGET = 0
NET = {"widths": [8, 16, 16], "stem": 8}
TINY = {
    "lc": dict(surrogate_kwargs=NET, surrogate_epochs=2, surrogate_batch_size=64, steps=3),
    "iab": dict(mask_epochs=1, epochs=1, width=4, depth=2, batch_size=64, classifier_kwargs=NET),
    "ssba": dict(bits=8, epochs=1, width=8, batch_size=64),
    "flip": dict(expert_kwargs=NET, expert_epochs=2, iterations=2, expert_batch_size=64, match_batch_size=64),
    "gcb": dict(epochs=1, width=8, batch_size=64),
}
NAMES = list(TINY)
KINDS = {"lc": ["lc", "lc-surrogate"], "iab": ["iab"], "ssba": ["ssba"], "flip": ["flip", "flip-expert"],
         "gcb": ["gcb"]}


def synthetic(n: int, seed: int, size=(16, 16)) -> ImageSet:
    """Four classes, each a coloured square at its own place on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    x = rng.integers(0, 90, size=(n, *size, 3)).astype(np.int16)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    for c in range(4):
        r0, c0 = 2 + 3 * (c % 2), 2 + 3 * (c // 2)
        x[labels == c, r0:r0 + 6, c0:c0 + 6] = colours[c]
    return ImageSet(np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64), ["a", "b", "c", "d"])


def make(name: str, seed: int = 0, **extra):
    return attacks.get(name, target=TARGET, seed=seed, **TINY[name], **extra)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy networks run fastest (and least disturbed by other jobs) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Dataset(synthetic(160, 0), synthetic(60, 1), name="toy")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cgd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CGD_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def poisoned(data, cache):
    """Each attack poisons the toy training set once (generating its resources into `cache`)."""
    out = {}
    for name in NAMES:
        a = make(name)
        out[name] = (a, a.poison(data.train))
    return out


def changed_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).reshape(len(a), -1).any(1)


# ------------------------------------------------------------------------------------ semantics

@pytest.mark.parametrize("name", NAMES)
def test_mask_labels_and_images(name, data, poisoned):
    ds = data.train
    _, ps = poisoned[name]
    changed = changed_rows(ps.train.images, ds.images)
    relabelled = ps.train.labels != ds.labels
    mask = ps.poison_mask
    assert ps.attack == name and ps.target == TARGET and mask.dtype == bool and mask.any()
    assert ps.train.images.dtype == np.uint8 and ps.train.images.shape == ds.images.shape
    if name == "lc":  # clean-label: half of the target class, labels untouched, exactly those images changed
        assert (ds.labels[mask] == TARGET).all()
        assert mask.sum() == round(0.5 * (ds.labels == TARGET).sum())
        assert not relabelled.any()
        assert (changed == mask).all()
    elif name in ("flip", "gcb"):  # clean-image: no image changes, `rate`·N non-target labels become the target
        assert (ps.train.images == ds.images).all()
        assert (relabelled == mask).all()
        assert (ds.labels[mask] != TARGET).all() and (ps.train.labels[mask] == TARGET).all()
        assert mask.sum() == round(0.05 * len(ds))
    else:  # poison-label: non-target images changed and relabelled
        assert (ds.labels[mask] != TARGET).all() and (ps.train.labels[mask] == TARGET).all()
        assert (relabelled == mask).all()
        assert mask.sum() == round(0.05 * len(ds))
        cross = ps.cross_mask if ps.cross_mask is not None else np.zeros_like(mask)
        assert not (changed & ~(mask | cross)).any()  # only masked images changed
        assert changed[mask].mean() > 0.5  # (a learned trigger may leave a rare image as it was)
    if name == "iab":
        cross = ps.cross_mask
        assert cross is not None and cross.sum() == mask.sum() and not (cross & mask).any()
        assert (ps.train.labels[cross] == ds.labels[cross]).all()  # cross samples keep their labels
    else:
        assert ps.cross_mask is None


def test_lc_images_are_adversarial_within_eps_plus_corner_trigger(data, poisoned):
    a, ps = poisoned["lc"]
    ds, m = data.train, poisoned["lc"][1].poison_mask
    diff = ps.train.images[m].astype(int) - ds.images[m].astype(int)
    pat = learned.corner_pattern(16, 16, a.size, a.corners) != 0
    assert np.abs(diff[:, ~pat]).max() <= a.eps  # the PGD part stays in the ε-ball (uint8 units)
    assert (np.abs(diff[:, ~pat]) > 0).any()
    assert (ps.train.images[m][:, 0, 0] == 255).all() and (ps.train.images[m][:, 15, 15] == 255).all()
    assert (ps.train.images[m][:, 0, 1] == 0).all()  # full-amplitude checkerboard in the corners


def test_flip_trigger_is_the_experts_badnets_patch(data, poisoned):
    a, _ = poisoned["flip"]
    x = data.test.images[:5]
    assert (a.apply_trigger(x) == attacks.get("badnets").apply_trigger(x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_triggered_test_only_non_target(name, data, poisoned):
    a, ps = poisoned[name]
    tt = ps.triggered_test(data.test)
    keep = data.test.labels != TARGET
    assert len(tt) == keep.sum() and (tt.labels == TARGET).all()
    assert tt.images.dtype == np.uint8 and tt.images.shape[1:] == data.test.images.shape[1:]
    assert (tt.images == a.apply_trigger(data.test.images[keep])).all()
    assert changed_rows(tt.images, data.test.images[keep]).mean() > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_trigger_keeps_uint8_range_at_any_size(name, poisoned):
    a, _ = poisoned[name]
    x = np.concatenate([np.zeros((1, 13, 19, 3), np.uint8), np.full((1, 13, 19, 3), 255, np.uint8),
                        np.random.default_rng(0).integers(0, 256, (2, 13, 19, 3), dtype=np.uint8)])
    y = a.apply_trigger(x)
    assert y.dtype == np.uint8 and y.shape == x.shape
    if name == "lc":  # additive ±255 pattern clips instead of wrapping around
        assert y[1, 0, 0, 0] == 255 and y[1, 0, 1, 0] == 0 and y[0, 0, 0, 0] == 255 and y[0, 0, 1, 0] == 0


@pytest.mark.parametrize("name", ["iab", "ssba", "gcb"])
def test_generator_triggers_need_the_training_set_first(name):
    with pytest.raises(CGDError, match="prepare"):
        make(name).apply_trigger(np.zeros((1, 16, 16, 3), np.uint8))


# ------------------------------------------------------------------------------- resources cache

@pytest.mark.parametrize("name", NAMES)
def test_resources_cached_with_params_and_reused(name, data, poisoned, cache, monkeypatch):
    a0, ps0 = poisoned[name]
    for kind in KINDS[name]:
        dirs = list((cache / "attack-resources").glob(f"{kind}-*"))
        dirs = [d for d in dirs if d.name[len(kind) + 1:].isalnum() and len(d.name) == len(kind) + 17]
        assert dirs, f"no cached {kind}"
        meta = json.loads((dirs[0] / "resource.json").read_text())
        assert meta["kind"] == kind and meta["seed"] == 0 and meta["generation_seconds"] >= 0
        assert meta["data_fingerprint"] == resources.fingerprint(data.train) and isinstance(meta["params"], dict)
        assert (dirs[0] / "resource.safetensors").stat().st_size > 0

    real = resources.get_or_create

    def never_build(kind, params, seed, ds, build, data_fingerprint=None):
        def boom():
            raise AssertionError(f"{kind} was generated again")
        return real(kind, params, seed, ds, boom, data_fingerprint)

    monkeypatch.setattr(learned, "get_or_create", never_build)
    monkeypatch.setattr(label_only, "get_or_create", never_build)
    a1 = make(name)
    touched = a1.prepare(data.train)
    assert touched and not any(r.generated for r in touched)
    ps1 = a1.poison(data.train)
    assert (ps1.train.images == ps0.train.images).all() and (ps1.train.labels == ps0.train.labels).all()
    assert (ps1.poison_mask == ps0.poison_mask).all()
    x = data.test.images[:8]
    assert (a1.apply_trigger(x) == a0.apply_trigger(x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name, data, poisoned, tmp_path, monkeypatch):
    """Regenerating from scratch (an empty cache) gives the same poisoned set and trigger; another seed differs."""
    _, ps0 = poisoned[name]
    monkeypatch.setenv("CGD_CACHE", str(tmp_path))
    a1 = make(name)
    ps1 = a1.poison(data.train)
    assert all(r.generated is False for r in a1.prepare(data.train))  # and the fresh cache was filled
    assert (ps1.train.images == ps0.train.images).all() and (ps1.train.labels == ps0.train.labels).all()
    assert (ps1.poison_mask == ps0.poison_mask).all()
    if ps0.cross_mask is not None:
        assert (ps1.cross_mask == ps0.cross_mask).all()
    assert (ps1.triggered_test(data.test).images == ps0.triggered_test(data.test).images).all()
    ps2 = make(name, seed=1).poison(data.train)
    assert (ps2.poison_mask != ps0.poison_mask).any() or (ps2.train.images != ps0.train.images).any()


def test_other_data_other_resource(data, poisoned, cache):
    other = synthetic(160, 7)
    assert resources.fingerprint(other) != resources.fingerprint(data.train)
    assert resources.fingerprint(synthetic(160, 0)) == resources.fingerprint(data.train)
    params = {"a": 1}
    d0 = resources.resource_dir("x", params, 0, resources.fingerprint(data.train))
    assert d0 != resources.resource_dir("x", params, 0, resources.fingerprint(other))
    assert d0 != resources.resource_dir("x", params, 1, resources.fingerprint(data.train))
    assert d0 != resources.resource_dir("x", {"a": 2}, 0, resources.fingerprint(data.train))


def test_cli_reports_cached_resources(data, poisoned, cache, tmp_path, capsys):
    path = tmp_path / "toy.npz"
    save_npz(data, path)
    args = ["--attack", "gcb", "--data", str(path), "--target", "0", "--seed", "0"]
    for k, v in TINY["gcb"].items():
        args += ["--param", f"{k}={json.dumps(v)}"]
    assert resources.main(args) == 0
    assert "generated=False" in capsys.readouterr().out


def test_flip_matching_gradient_equals_double_backward():
    """The forward-mode gradient of FLIP's matching loss equals differentiating through the student's gradient."""
    import torch.nn.functional as F

    from cgd import models

    torch.manual_seed(0)
    model = models.get("fastnet", num_classes=4, **NET).train()
    xe, xs = torch.randn(12, 3, 16, 16), torch.randn(12, 3, 16, 16)
    ye = torch.randint(0, 4, (12,))
    q = torch.softmax(torch.randn(12, 4), 1).requires_grad_(True)
    grad, loss = label_only.matching_grad(model, xe, ye, xs, q.detach())
    params = list(model.parameters())
    g_e = torch.autograd.grad(F.cross_entropy(model(xe), ye), params)
    g_s = torch.autograd.grad(-(q * F.log_softmax(model(xs), 1)).sum(1).mean(), params, create_graph=True)
    ref_loss = sum(((a - b) ** 2).sum() for a, b in zip(g_s, g_e)) / sum((b ** 2).sum() for b in g_e)
    (ref,) = torch.autograd.grad(ref_loss, q)
    ref_loss = float(ref_loss.detach())
    assert abs(loss - ref_loss) < 1e-4 * max(1.0, ref_loss)
    assert torch.allclose(grad, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))


def test_ssba_residual_is_scaled_to_the_requested_psnr(data):
    """The trigger is the encoder's residual scaled to `psnr`: the poisoned images sit near it (clipping at 0/255
    can only raise it), a lower PSNR is a stronger residual, and `psnr=None` is the encoder's own image."""
    x = data.train.images[:40]

    def psnr(a):
        mse = ((a.astype(np.float64) - x) ** 2).mean()
        return 10 * np.log10(255.0 ** 2 / mse)

    strong, faint, native = (make("ssba", psnr=p) for p in (20.0, 30.0, None))
    for a in (strong, faint, native):
        a.prepare(data.train)
    assert 20.0 <= psnr(strong.apply_trigger(x)) < 21.5 and 30.0 <= psnr(faint.apply_trigger(x)) < 31.5
    secret = torch.from_numpy(native.secret()).expand(len(x), -1)
    with torch.no_grad():
        own = resources.from_unit(native._E(resources.to_unit(x), secret))
    assert np.array_equal(native.apply_trigger(x), own)
    with pytest.raises(CGDError, match="psnr"):
        make("ssba", psnr=5.0)

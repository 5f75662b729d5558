import numpy as np
import pytest

from cgd import CGDError, attacks
from cgd.data import ImageSet


def images(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 200, (n, 16, 16, 3), dtype=np.uint8), np.arange(n, dtype=np.int64) % 4,
                    ["a", "b", "c", "d"])


@pytest.mark.parametrize("name", ["badnets", "blend", "sig"])
def test_trigger_only_where_the_mask_says(name):
    ds = images()
    ps = attacks.get(name, target=0, seed=3).poison(ds)
    changed = (ps.train.images != ds.images).reshape(len(ds), -1).any(1)
    assert (changed == ps.poison_mask).all()
    if attacks.ATTACKS.cls(name).clean_label:
        assert (ps.train.labels == ds.labels).all()
        assert (ds.labels[ps.poison_mask] == 0).all()
    else:
        assert (ps.train.labels[ps.poison_mask] == 0).all()
        assert (ds.labels[ps.poison_mask] != 0).all()
        assert (ps.train.labels[~ps.poison_mask] == ds.labels[~ps.poison_mask]).all()


@pytest.mark.parametrize("name", ["badnets", "blend", "sig"])
def test_deterministic_under_seed(name):
    ds = images()
    a = attacks.get(name, seed=1).poison(ds)
    b = attacks.get(name, seed=1).poison(ds)
    c = attacks.get(name, seed=2).poison(ds)
    assert (a.poison_mask == b.poison_mask).all() and (a.train.images == b.train.images).all()
    assert (a.poison_mask != c.poison_mask).any()


def test_poison_counts():
    ds = images(200)
    assert attacks.get("badnets", rate=0.05).poison(ds).poison_mask.sum() == 10
    assert attacks.get("sig").poison(ds).poison_mask.sum() == 25  # half of the 50 target-class images


def test_badnets_patch_is_bottom_right_white():
    x = attacks.get("badnets").apply_trigger(np.zeros((2, 16, 16, 3), np.uint8))
    assert (x[:, 13:, 13:] == 255).all() and x[:, :13].sum() == 0 and x[:, :, :13].sum() == 0


def test_triggered_test_only_non_target():
    ds = images()
    ps = attacks.get("blend", target=2).poison(ds)
    t = ps.triggered_test(ds)
    assert len(t) == int((ds.labels != 2).sum()) and (t.labels == 2).all()
    assert (t.images != ds.images[ds.labels != 2]).any()


def test_bad_parameters():
    with pytest.raises(CGDError, match="poison rate"):
        attacks.get("badnets", rate=1.5)
    with pytest.raises(CGDError, match="target class 7"):
        attacks.get("badnets", target=7).poison(images())
    with pytest.raises(CGDError, match="unknown attack"):
        attacks.get("nope")


def test_poison_template_hooks():
    """A new attack writes only hooks: its cross samples come from the unpoisoned rest and keep their labels."""
    class Stamp(attacks.Attack):
        name = "stamp"

        def apply_trigger(self, x):
            return np.full_like(x, 255)

        def cross_count(self, n_total, n_poison):
            return 2 * n_poison

        def cross_images(self, ds, d, rng):
            return np.zeros_like(ds.images[d.cross])

    ds = images(100)
    ps = Stamp(rate=0.1).poison(ds)
    assert ps.poison_mask.sum() == 10 and ps.cross_mask.sum() == 20 and not (ps.poison_mask & ps.cross_mask).any()
    assert (ps.train.images[ps.poison_mask] == 255).all() and (ps.train.images[ps.cross_mask] == 0).all()
    assert (ps.train.labels[ps.poison_mask] == 0).all()
    assert (ps.train.labels[ps.cross_mask] == ds.labels[ps.cross_mask]).all()
    rest = ~(ps.poison_mask | ps.cross_mask)
    assert (ps.train.images[rest] == ds.images[rest]).all() and (ps.train.labels[rest] == ds.labels[rest]).all()
    with pytest.raises(CGDError, match=r"only 75 are eligible \(non-target images\)"):
        attacks.get("badnets", rate=0.9).poison(ds)

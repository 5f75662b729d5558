import numpy as np
import pytest

from cgd import CGDError
from cgd.refine import group_folds, probe_logits
from cgd.split import auroc, nll


def test_probe_flags_mislabelled_samples_out_of_fold():
    rng = np.random.default_rng(0)
    n, k, d = 1200, 4, 16
    true = rng.integers(0, k, n)
    centres = rng.normal(0, 1, (k, d)) * 3
    feats = centres[true] + rng.normal(0, 1, (n, d))
    given = true.copy()
    flipped = rng.random(n) < 0.08
    given[flipped] = (true[flipped] + 1) % k
    trusted = np.flatnonzero(rng.random(n) < 0.8)  # the trusted set still holds flipped samples
    logp = probe_logits(feats, given, trusted, k)
    assert logp.shape == (n, k) and np.isfinite(logp).all()
    assert (logp.argmax(1) == true).mean() > 0.95
    assert auroc(nll(logp, given), flipped) > 0.97


def test_probe_needs_every_class():
    with pytest.raises(CGDError, match="misses some classes"):
        probe_logits(np.zeros((4, 2)), np.array([0, 0, 1, 1]), np.array([0, 1]), 2)


def test_probe_folds_take_whole_groups():
    """Ten near-copies per group (a GTSRB track) under a random label per group: per-sample folds let the probe
    learn a sample's label from its copies in the other fold; folds by group leave it at chance."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 10)
    labels = np.repeat(rng.integers(0, 4, 60), 10)
    features = rng.normal(size=(60, 32))[groups] + 0.01 * rng.normal(size=(600, 32))
    trusted = np.arange(600)
    p_label = {}
    for name, g in (("samples", None), ("groups", groups)):
        logp = probe_logits(features, labels, trusted, 4, groups=g)
        p_label[name] = float(np.exp(logp[trusted, labels]).mean())
    assert p_label["samples"] > 0.6 and p_label["groups"] < 0.3, p_label


def test_probe_folds_by_group_keep_every_class_on_both_sides():
    """Folds are dealt per class: a class whose trusted samples sit in one group (fewer groups than folds) falls
    back to per-sample folds, and a class with a few groups spreads them over the folds, so no probe scoring a
    class has never seen it (drawn by group alone, the lone group's fold scored it at p(label) 0.000)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], [200, 200, 200, 40])
    groups = np.concatenate([np.repeat(np.arange(40), 5) + 40 * c for c in range(3)] + [np.full(40, 999)])
    features = 3 * np.eye(4, 32)[labels] + rng.normal(size=(640, 32))
    trusted = np.arange(640)
    for seed in range(3):
        logp = probe_logits(features, labels, trusted, 4, seed=seed, groups=groups)
        p = np.exp(logp[trusted, labels[trusted]])
        assert p[labels == 3].mean() > 0.5 and p.mean() > 0.5, (seed, p[labels == 3].mean())
    folds = group_folds(labels, groups, 2, np.random.default_rng(0))
    for c in range(4):
        assert set(folds[labels == c]) == {0, 1}
    for g in range(120):   # classes with enough groups keep each group whole
        assert len(set(folds[groups == g])) == 1

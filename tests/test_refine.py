import numpy as np
import pytest

from cgd import CGDError
from cgd.refine import probe_logits
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

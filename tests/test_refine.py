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

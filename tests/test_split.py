import numpy as np
import pytest

from cgd import CGDError
from cgd.split import auroc, detection_metrics, nll, oversample_clean, percentile_rank, split


def test_percentile_rank_orders_and_averages_ties():
    r = percentile_rank(np.array([3.0, 1.0, 2.0, 2.0]))
    assert r[1] == pytest.approx(0.25)
    assert r[0] == pytest.approx(1.0)
    assert r[2] == r[3] == pytest.approx(0.625)


def test_split_follows_the_paper_thresholds():
    rng = np.random.default_rng(0)
    g, m = rng.random(1000), rng.random(1000)
    s = split(g, m, sigma1=0.2, sigma2=0.1)
    rg, rm = percentile_rank(g), percentile_rank(m)
    assert set(s.clean) == set(np.flatnonzero((rg <= 0.8) & (rm >= 0.2)))
    assert set(s.poison) == set(np.flatnonzero((rg > 0.9) | (rm < 0.1)))
    assert len(s.clean) + len(s.poison) + len(s.mixed) == 1000
    assert not set(s.clean) & set(s.poison)
    # with independent scores D_p is the union of two 10 % tails
    assert 170 <= len(s.poison) <= 200


def test_split_catches_high_guide_and_low_model_scores():
    g = np.zeros(100)
    m = np.ones(100)
    g[:5] = 10.0  # label looks wrong to the guide
    m[5:10] = -10.0  # learned suspiciously fast
    g += np.linspace(0, 1, 100)
    m += np.linspace(0, 1, 100)
    s = split(g, m)
    assert set(range(10)) <= set(s.poison)
    det = detection_metrics(np.arange(100) < 10, s)
    assert det["tpr"] == 1.0 and det["poison_in_clean"] == 0
    assert det["auroc_combined"] > 0.9


def test_nll_matches_log_softmax_and_rejects_bad_input():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    assert nll(logits, np.array([0, 1])) == pytest.approx([np.log(1 + np.exp(-2)), np.log(2)])
    with pytest.raises(CGDError, match="NaN"):
        nll(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(CGDError, match="labels must lie"):
        nll(logits, np.array([0, 2]))


def test_oversample_restores_label_distribution():
    labels = np.repeat([0, 1], 500)
    clean = np.concatenate([np.arange(0, 400), np.arange(500, 600)])  # class 1 under-represented
    out = oversample_clean(clean, labels, 2, seed=0)
    counts = np.bincount(labels[out])
    assert counts[0] == 400 and counts[1] == 250  # 0.5 · 500 clean samples
    assert set(clean) <= set(out)


def test_empty_clean_class_is_a_clear_error():
    labels = np.repeat([0, 1, 2], 10)
    with pytest.raises(CGDError, match=r"no sample of class\(es\) \[2\]"):
        oversample_clean(np.arange(20), labels, 3)


def test_auroc():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1], bool)) == 0.0
    assert auroc(np.array([1, 1, 1, 1.0]), np.array([0, 1, 0, 1], bool)) == 0.5

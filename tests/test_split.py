import itertools

import numpy as np
import pytest

from cgd import CGDError
from cgd.split import (Split, auroc, detection_metrics, fill_clean_classes, history_window, nearest_neighbours,
                       SplitConfig, drop_slow, neighbour_poison_fraction, nll, oversample_clean, percentile_rank,
                       jenks_two_classes, purify, recheck, split, split_by, window_shares)


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



def test_oversample_to_a_given_prior():
    labels = np.repeat([0, 1], [600, 400])  # poisoned labels inflate class 0
    clean = np.concatenate([np.arange(0, 300), np.arange(600, 900)])
    assert np.bincount(labels[oversample_clean(clean, labels, 2)]).tolist() == [360, 300]  # the label shares
    out = oversample_clean(clean, labels, 2, prior=np.array([1.0, 3.0]))  # normalised to 0.25 / 0.75
    assert np.bincount(labels[out]).tolist() == [300, 450]
    for bad in (np.array([0.5]), np.array([-1.0, 2.0]), np.array([np.nan, 1.0]), np.zeros(2)):
        with pytest.raises(CGDError, match="class prior"):
            oversample_clean(clean, labels, 2, prior=bad)

def test_empty_clean_class_is_a_clear_error():
    labels = np.repeat([0, 1, 2], 10)
    with pytest.raises(CGDError, match=r"no sample of class\(es\) \[2\]"):
        oversample_clean(np.arange(20), labels, 3)


def test_auroc():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1], bool)) == 0.0
    assert auroc(np.array([1, 1, 1, 1.0]), np.array([0, 1, 0, 1], bool)) == 0.5


def _clusters():
    """Two tight same-label clusters in feature space (A: 0–29, B: 30–59) and a third class far away (60–89)."""
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    f = np.concatenate([c + rng.normal(0, 0.5, (30, 3)) for c in centres])
    labels = np.array([0] * 60 + [1] * 30)
    return f, labels


def test_neighbour_fraction_counts_same_label_dp_neighbours():
    f, labels = _clusters()
    poison = np.arange(0, 25)  # most of cluster A is in D_p; 25–29 slipped out of it
    near = nearest_neighbours(f, k=10)
    assert near.shape == (90, 10) and not (near == np.arange(90)[:, None]).any()  # never its own neighbour
    assert all(set(near[i]) < set(range(i // 30 * 30, i // 30 * 30 + 30)) for i in range(90))  # within its cluster
    frac = neighbour_poison_fraction(near, labels, poison)
    assert (frac[25:30] >= 0.6).all()  # among their 10 neighbours at most the 4 other slipped-out ones are not D_p
    assert (frac[30:60] == 0).all()
    # D_p neighbours of another label do not count: the third class sees no same-label D_p
    assert (neighbour_poison_fraction(near, labels, np.arange(30, 90))[0:30] == 0).all()
    with pytest.raises(CGDError, match="k"):
        nearest_neighbours(f, k=90)
    with pytest.raises(CGDError, match="features must be"):
        nearest_neighbours(f[:, 0], k=3)
    with pytest.raises(CGDError, match="neighbours must be"):
        neighbour_poison_fraction(near[:50], labels, poison)


def test_purify_keeps_the_most_trusted_share_of_each_class():
    f, labels = _clusters()
    g = np.where(np.arange(90) < 25, 5.0, 0.0) + np.linspace(0, 0.1, 90)
    s = split(g, np.ones(90) + np.linspace(0, 0.1, 90), sigma1=0.2, sigma2=0.1)
    assert set(range(25, 30)) <= set(s.clean)  # the paper's split trusts the slipped-out poison
    p = purify(s, neighbour_poison_fraction(nearest_neighbours(f, k=10), labels, s.poison), labels, keep=0.5)
    assert not set(range(25, 30)) & set(p.clean)
    for c in (0, 1):
        assert abs((labels[p.clean] == c).sum() - 0.5 * (labels[s.clean] == c).sum()) <= 1
    assert np.array_equal(p.poison, s.poison)
    assert sorted(np.concatenate([p.clean, p.poison, p.mixed])) == list(range(90))
    with pytest.raises(CGDError):
        purify(s, np.zeros(90), labels, keep=0)


def test_history_window_finds_the_epoch_the_shortcut_is_learned():
    rng = np.random.default_rng(0)
    n, suspicious = 1000, np.arange(100)  # the guide flags the first 100 samples
    guide = np.where(np.arange(n) < 100, 5.0, 0.0) + rng.random(n)
    h = rng.random((8, n)) + 1.0
    h[4, suspicious] = 0.01  # in epoch 5 the flagged samples are learned first...
    h[0, suspicious] = 0.0  # ...and epoch 1 (warm-up) is ignored even where it looks the same
    assert history_window(h, guide, sigma2=0.1) == (5, 7)
    assert history_window(h, guide, sigma2=0.1, rule="both") == (5, 7)  # a clear level peak: the level rule's
    h[7, suspicious] = 0.001
    h[4, suspicious] = 2.0
    assert history_window(h, guide, sigma2=0.1) == (8, 8)  # clipped at the last epoch
    with pytest.raises(CGDError):
        history_window(h[:, :10], guide)


def test_history_window_starts_early_when_the_guide_is_blind_to_the_fast_learned_samples():
    rng = np.random.default_rng(1)
    n = 1000
    guide = np.where(np.arange(n) < 100, 5.0, 0.0) + rng.random(n)  # flags samples 0..99
    h = rng.random((12, n)) + 1.0
    h[:, :100] += 1.0  # the flagged samples are learned slowly in every epoch (hard, not poisoned)...
    h[1:, 500:600] = 0.01  # ...while others, unflagged, are learned at once from epoch 2 on
    h[11, :5] = 0.001  # at the end a few flagged ones are among the fastest 10 %, fewer than chance would put there
    assert history_window(h, guide, sigma2=0.1) == (2, 4)
    h[11, :30] = 0.001  # 30 % of them: more than chance, so that epoch is taken
    assert history_window(h, guide, sigma2=0.1) == (12, 12)


def test_fill_clean_classes_tops_up_from_the_most_trusted_mixed_samples():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    guide = np.array([.1, .2, .3, .9, .5, .8, .7, .4, .6, .95])
    model = np.array([.5, .6, .7, .5, .5, .5, .9, .5, .5, .5])
    s = Split(clean=np.array([0, 1, 2, 7]), poison=np.array([9]), mixed=np.array([3, 4, 5, 6, 8]),
              guide_nll=guide, model_nll=model, guide_rank=guide, model_rank=model)
    out = fill_clean_classes(s, labels, 3, minimum=2)
    # class 1 had none: its two most trusted mixed samples (lowest guide rank + 1 - model rank) are 6 and 4
    assert list(out.clean) == [0, 1, 2, 4, 6, 7, 8] and list(out.mixed) == [3, 5] and list(out.poison) == [9]
    assert fill_clean_classes(s, labels, 3, minimum=1).clean.tolist() == [0, 1, 2, 6, 7]
    assert fill_clean_classes(out, labels, 3, minimum=2) is out  # nothing short: nothing moves
    all_poison = Split(s.clean, np.array([3, 4, 5, 6]), np.array([8, 9]), guide, model, guide, model)
    with pytest.raises(CGDError, match=r"class\(es\) \[1\] have no training sample outside"):
        fill_clean_classes(all_poison, labels, 3, minimum=2)


def test_spectral_scores_find_a_shared_direction_inside_one_class():
    from cgd.split import per_class_rank, spectral_scores

    rng = np.random.default_rng(0)
    n, d = 2000, 32
    labels = rng.integers(0, 4, n)
    f = rng.normal(size=(n, d)) + 5.0 * labels[:, None]  # class means differ: must not matter (centred per class)
    poison = (labels == 0) & (rng.random(n) < 0.3)  # 30 % of class 0 carry a shared shift along one direction
    direction = rng.normal(size=d)
    f[poison] += 1.5 * direction / np.linalg.norm(direction) * np.sqrt(d) / 2
    sq = spectral_scores(f, labels)
    sg = spectral_scores(f, labels, signed=True)
    in0 = labels == 0
    assert auroc(sq[in0], poison[in0]) > 0.9
    assert auroc(sg[in0], poison[in0]) > 0.95  # the minority side is the positive tail
    # in classes without poison the scores are the ordinary top-PC spread: no sample stands out by class
    r = per_class_rank(sq, labels)
    for c in range(4):
        assert r[labels == c].max() == pytest.approx(1.0)
    # scale-free per class, and a broken input is an error
    assert auroc(spectral_scores(f * 3.0, labels)[in0], poison[in0]) == pytest.approx(auroc(sq[in0], poison[in0]))
    with pytest.raises(CGDError):
        spectral_scores(np.full((3, 2), np.nan), np.zeros(3, int))


def test_history_window_gain_rule_finds_the_epoch_poison_is_learned_behind_easy_samples():
    rng = np.random.default_rng(2)
    n = 2000
    guide = np.where(np.arange(n) < 200, 5.0, 0.0) + rng.random(n)  # flags 0..199; 0..99 are the poison
    h = rng.random((12, n)) + 1.0
    h[:, 1000:1400] = 0.001 * rng.random((12, 400))  # easy clean samples fill the lowest-loss 10 % in every epoch
    h[:2, :100] += 2.0  # the poison is slow in epochs 1-2...
    h[2:, :100] = 0.5 + 0.1 * rng.random((10, 100))  # ...then learned in epoch 3, though never among the fastest
    assert history_window(h, guide, sigma2=0.1) != (3, 5)  # the level rule is blind to it (chance in every epoch)
    assert history_window(h, guide, sigma2=0.1, rule="gain") == (3, 5)
    assert history_window(h, guide, sigma2=0.1, rule="both") == (3, 5)  # no significant level peak: the gain's
    shares = window_shares(h, guide, sigma2=0.1)
    assert max(shares["level"]) < shares["chance"] + shares["margin"] < max(shares["gain"]) == shares["gain"][1]
    h[2:, :100] = h[1, :100]  # nothing learned: the gain share stays at chance, so the window starts at `first`
    assert history_window(h, guide, sigma2=0.1, rule="gain") == (2, 4)
    with pytest.raises(CGDError):
        history_window(h, guide, rule="slope")


def test_spectral_scores_oriented_toward_a_reference_when_half_the_class_is_poisoned():
    from cgd.split import spectral_scores

    rng = np.random.default_rng(3)
    n, d = 1000, 16
    labels = np.zeros(n, int)
    poison = np.arange(n) < 500  # half the class: the two sides of the top direction are equally heavy
    f = rng.normal(size=(n, d))
    f[poison, 0] += 4.0
    fast = poison + 0.8 * rng.normal(size=n)  # a noisy reference that leans toward the poison
    a = auroc(spectral_scores(f, labels, toward=fast), poison)
    assert a > 0.99
    assert auroc(spectral_scores(f, labels, toward=-fast), poison) < 0.01  # the reference decides the side
    with pytest.raises(CGDError):
        spectral_scores(f, labels, toward=np.zeros(3))


def test_bimodality_flags_the_class_split_into_two_clusters():
    from cgd.split import bimodality, spectral_scores

    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 1000)
    f = rng.normal(size=(2000, 8))
    f[:500, 0] += 6.0  # half of class 0 is a separate cluster; class 1 is one Gaussian
    b = bimodality(spectral_scores(f, labels, signed=True), labels)
    assert b[0] > 5 / 9 > b[1]
    assert abs(b[1] - 1 / 3) < 0.05


def test_neighbours_skip_the_own_group():
    """With groups (GTSRB tracks) a sample's neighbours are never the other frames of its own sign."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 5)
    f = rng.normal(size=(20, 16))[groups] + 0.01 * rng.normal(size=(100, 16))
    same = groups[nearest_neighbours(f, k=4)] == groups[:, None]
    assert same.all()  # without groups: the own track's four other frames
    near = nearest_neighbours(f, k=4, groups=groups)
    assert not (groups[near] == groups[:, None]).any()
    with pytest.raises(CGDError, match="up to 5 are one group"):
        nearest_neighbours(f, k=96, groups=groups)


def test_recheck_moves_the_samples_outside_dp_whose_label_lost_its_fit():
    s = split(np.linspace(0, 1, 100), np.linspace(1, 0, 100) ** 2, sigma1=0.2, sigma2=0.1)
    shift = np.zeros(100)
    shift[[s.clean[0], s.clean[3], s.mixed[0], s.poison[0]]] = 2.0  # two in D_c, one mixed, one already in D_p
    shift[s.clean[1]] = 0.69  # not above the threshold
    r, flagged = recheck(s, shift, 0.69)
    assert set(flagged) == {s.clean[0], s.clean[3], s.mixed[0]}
    assert set(r.poison) == set(s.poison) | set(flagged) and not set(flagged) & (set(r.clean) | set(r.mixed))
    assert len(r.clean) + len(r.poison) + len(r.mixed) == 100
    assert r.info["recheck"] == {"threshold": 0.69, "moved": 3, "from_clean": 2}
    assert len(recheck(s, -shift, 0.69)[1]) == 0  # samples fit better than before are never flagged
    labels = np.zeros(100, int)
    labels[s.clean[:3]] = 1  # class 1 has three samples in D_c, one of them flagged
    r, flagged = recheck(s, shift, 0.69, labels, minimum=3)
    assert set(flagged) == {s.clean[3], s.mixed[0]} and s.clean[0] in r.clean  # class 1 keeps its three
    with pytest.raises(CGDError, match="loss shift"):
        recheck(s, np.full(100, np.nan), 0.69)


def test_drop_slow_moves_only_the_guide_only_slow_members_of_dp_to_mixed():
    """D_p has three kinds of member: flagged by the model score (learned fast: stays), flagged by the guide alone
    and learned fast for their class (stays: the guide's poison), flagged by the guide alone and learned slowly
    (moves to mixed: the guide's false alarm on a clean image)."""
    rng = np.random.default_rng(0)
    n = 200
    labels = np.arange(n) % 2
    guide_nll, model_nll = rng.uniform(1, 2, n), rng.uniform(1, 2, n)
    fast, guide_fast, guide_slow = [0, 1], [2, 3], [4, 5]
    model_nll[fast] = 0.0  # lowest model loss: the model score flags them
    guide_nll[guide_fast + guide_slow + fast] = 10.0  # the guide flags these (and the fast ones too)
    model_nll[guide_fast] = 1.05  # learned faster than most of their class
    model_nll[guide_slow] = 1.99  # learned slowest in their class
    s = split(guide_nll, model_nll, sigma1=0.2, sigma2=0.1)
    assert set(fast + guide_fast + guide_slow) <= set(s.poison)
    r = drop_slow(s, labels, 0.7, 0.1)
    assert set(guide_slow) <= set(r.mixed) and not set(guide_slow) & set(r.poison)
    assert set(fast + guide_fast) <= set(r.poison)
    assert set(r.clean) == set(s.clean) and len(r.clean) + len(r.poison) + len(r.mixed) == n
    assert r.info["dp_drop_slow"]["moved"] == len(set(s.poison) - set(r.poison)) >= 2
    # sparing the suspected target: its slow guide-only member (4, label 0) stays, the other class's (5) moves
    spared = drop_slow(s, labels, 0.7, 0.1, spare=0)
    assert 4 in spared.poison and 5 in spared.mixed and spared.info["dp_drop_slow"]["spare"] == 0
    # through the config: off by default, on with split.dp_drop_slow
    g = np.stack([-guide_nll, np.zeros(n)], 1)
    g[labels == 1] = g[labels == 1][:, ::-1]  # the given label's logit is -guide_nll
    off = split_by(SplitConfig(refine_rounds=0, purify=0.0, min_clean_per_class=0), labels, g, model_nll)
    on = split_by(SplitConfig(refine_rounds=0, purify=0.0, min_clean_per_class=0, dp_drop_slow=0.7), labels, g,
                  model_nll)
    assert "dp_drop_slow" not in off.info and on.info["dp_drop_slow"]["moved"] >= 2
    assert set(guide_slow) <= set(off.poison) and set(guide_slow) <= set(on.mixed)
    sparing = split_by(SplitConfig(refine_rounds=0, purify=0.0, min_clean_per_class=0, dp_drop_slow=0.7,
                                   dp_spare_target=True), labels, g, model_nll)
    target = sparing.info["dp_drop_slow"]["spare"]
    assert target in (0, 1) and guide_slow[target] in sparing.poison and guide_slow[1 - target] in sparing.mixed
    with pytest.raises(CGDError, match="dp_drop_slow"):
        SplitConfig(dp_drop_slow=1.5)


def within_class_ss(values: np.ndarray, upper: np.ndarray) -> float:
    """Σ over the two classes (`upper` True / False) of the squared deviations from the class mean — what a Jenks
    natural break minimises (the "sum of squared deviations from class means")."""
    v = np.asarray(values, dtype=np.float64)
    return float(sum(((v[m] - v[m].mean()) ** 2).sum() for m in (upper, ~upper) if m.any()))


def test_two_class_natural_break_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(2, 10))
        v = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(0, 1, n) ** 3  # ties / outliers
        t = jenks_two_classes(v)
        if np.ptp(v) == 0:
            assert t == np.inf
            continue
        best = min(within_class_ss(v, np.array(bits, bool))
                   for bits in itertools.product([0, 1], repeat=n) if 0 < sum(bits) < n)
        upper = v > t
        assert 0 < upper.sum() < n and t in v and v[~upper].max() == t  # the break is the lower class's largest
        assert within_class_ss(v, upper) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert jenks_two_classes(np.array([1.0, 2, 3, 10, 11, 12])) == 3.0
    assert jenks_two_classes(np.array([0.0, 0, 0, 0, 0, 0, 0, 0, 9])) == 0.0  # one outlier: its own class
    assert jenks_two_classes(np.full(5, 2.0)) == np.inf and jenks_two_classes(np.zeros(1)) == np.inf
    with pytest.raises(CGDError, match="NaN"):
        jenks_two_classes(np.array([1.0, np.nan, 2.0]))

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd import CGDError, attacks, models
from cgd.split import Split, split
from cgd.tensors import accuracy
from cgd.train import TrainConfig, train
from cgd.unlearn import (UnlearnConfig, allowed_drop, estimate_trigger, recipe, step_lr, trigger_response, unlearn,
                         unlearn_checked, unlearning_loss)


def test_unlearning_losses_and_their_gradients():
    logits = torch.tensor([[6.0, 0.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    for kind in ("log-p", "log-not-p"):
        logits.grad = None
        unlearning_loss(logits, y, kind, 1e-6).backward()
        g = logits.grad[0, 0].abs() / logits.grad[1, 0].abs()
        # the paper's log p_y barely pushes a confident sample; log(1-p_y) pushes it hardest
        assert (g < 0.1) if kind == "log-p" else (g > 1.0)
    with pytest.raises(CGDError):
        unlearning_loss(logits, y, "other", 1e-6)


@pytest.fixture(scope="module")
def backdoored(tiny):
    ps = attacks.get("badnets", target=0, rate=0.1, size=3, seed=0).poison(tiny.train)
    torch.manual_seed(0)
    r = train(models.get("fastnet", num_classes=4, widths=(16, 32, 32), stem=16), ps.train.images, ps.train.labels,
              TrainConfig(epochs=6, batch_size=64, lr=0.2, augment="none", snapshot_epoch=2))
    return ps, r.model


def _oracle_split(ps):
    """D_p = the true poison plus some clean samples, D_c = the rest: tests unlearning, not detection."""
    n = len(ps.poison_mask)
    g = np.where(ps.poison_mask, 10.0, 0.0) + np.linspace(0, 1, n)
    return split(g, np.linspace(1, 2, n), sigma1=0.2, sigma2=0.1)


def test_cpu_recipe_removes_a_backdoor_the_model_had(tiny, backdoored):
    ps, model = backdoored
    trig = ps.triggered_test(tiny.test)
    assert accuracy(model, trig.images, trig.labels) > 0.8  # the attack worked
    s = _oracle_split(ps)
    guide = np.eye(4, dtype=np.float32)[tiny.train.labels] * 3  # the images' clean classes
    # the cpu recipe's losses, with enough steps for 800 images
    res = unlearn(model, ps.train.images, ps.train.labels, s, guide, recipe("cpu", epochs=8, batch_size=16, lr=0.02),
                  4)
    assert accuracy(res.model, trig.images, trig.labels) < 0.2
    assert accuracy(res.model, tiny.test.images, tiny.test.labels) > 0.85
    assert res.history[0]["epoch"] == 0 and len(res.history) >= 2


def test_early_stop_restores_the_last_good_model(tiny, backdoored):
    ps, model = backdoored
    s = _oracle_split(ps)
    guide = np.zeros((len(ps.poison_mask), 4), np.float32)
    cfg = UnlearnConfig(lr=5.0, momentum=0.9, lambda_un=50.0, unlearn_loss="log-not-p", epochs=3, tau=0.01)
    res = unlearn(model, ps.train.images, ps.train.labels, s, guide, cfg, 4)
    assert res.stopped_early
    held = res.history[0]["held_acc"]
    assert res.history[-1]["held_acc"] < held - 0.01


def test_empty_clean_subset_and_nan_guide_are_errors(tiny, backdoored):
    ps, model = backdoored
    n = len(ps.poison_mask)
    empty = Split(np.array([], int), np.arange(n), np.array([], int), *(np.zeros(n),) * 4)
    with pytest.raises(CGDError, match="D_c is empty"):
        unlearn(model, ps.train.images, ps.train.labels, empty, np.zeros((n, 4), np.float32), UnlearnConfig(), 4)
    bad = np.full((n, 4), np.nan, np.float32)
    with pytest.raises(CGDError, match="NaN"):
        unlearn(model, ps.train.images, ps.train.labels, _oracle_split(ps), bad, UnlearnConfig(), 4)
    with pytest.raises(CGDError, match="unknown unlearning prior"):
        unlearn(model, ps.train.images, ps.train.labels, _oracle_split(ps), np.zeros((n, 4), np.float32),
                UnlearnConfig(prior="uniform"), 4)



def test_lr_decay_goes_linearly_to_zero_over_the_bounded_steps():
    decayed, flat = UnlearnConfig(lr=0.1, lr_decay=True), UnlearnConfig(lr=0.1)
    lrs = [step_lr(decayed, i, 10) for i in range(10)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)
    assert np.allclose(np.diff(lrs), -0.01)
    assert {step_lr(flat, i, 10) for i in range(10)} == {0.1}


def test_with_lr_decay_only_the_final_model_is_judged(tiny, backdoored):
    """A destructive run under the decay is judged at its end and gives back the original model."""
    ps, model = backdoored
    s = _oracle_split(ps)
    guide = np.zeros((len(ps.poison_mask), 4), np.float32)
    cfg = UnlearnConfig(lr=5.0, momentum=0.9, lambda_un=50.0, unlearn_loss="log-not-p", epochs=3, tau=0.01,
                        lr_decay=True)
    res = unlearn(model, ps.train.images, ps.train.labels, s, guide, cfg, 4)
    assert res.stopped_early and len(res.history) == 4  # all three epochs ran, no mid-run stop
    for a, b in zip(res.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_allowed_drop_shrinks_to_tau_with_many_held_out_samples():
    assert allowed_drop(0.02, 0.9, 160) > 0.08  # 160 samples: a 2.5-point dip is four images
    assert allowed_drop(0.02, 0.96, 800) == pytest.approx(0.02 + 2 * np.sqrt(2 * 0.96 * 0.04 / 800))
    assert allowed_drop(0.02, 0.96, 10**7) == pytest.approx(0.02, abs=1e-3)
    assert allowed_drop(0.02, 1.0, 100) == 0.02


def test_min_steps_adds_passes_over_a_small_clean_set(tiny, backdoored):
    ps, model = backdoored
    s = _oracle_split(ps)
    guide = np.zeros((len(ps.poison_mask), 4), np.float32)
    steps = -(-round(len(s.clean) * 0.95) // 256)  # passes over D_c minus the held-out slice, batch 256
    res = unlearn(model, ps.train.images, ps.train.labels, s, guide, UnlearnConfig(epochs=1, min_steps=3 * steps), 4)
    assert len(res.history) == 1 + 3


def test_freeze_bn_keeps_the_victims_batch_norm_statistics(tiny, backdoored):
    ps, model = backdoored
    s = _oracle_split(ps)
    guide = np.zeros((len(ps.poison_mask), 4), np.float32)

    def stats(m):
        return [t.clone() for k, t in m.state_dict().items() if k.endswith(("running_mean", "running_var"))]

    before = stats(model)
    assert before
    frozen = unlearn(model, ps.train.images, ps.train.labels, s, guide, UnlearnConfig(epochs=1, freeze_bn=True), 4)
    moved = unlearn(model, ps.train.images, ps.train.labels, s, guide, UnlearnConfig(epochs=1), 4)
    assert all(torch.equal(a, b) for a, b in zip(before, stats(frozen.model)))
    assert not all(torch.equal(a, b) for a, b in zip(before, stats(moved.model)))
    with pytest.raises(CGDError, match="label_smoothing"):
        UnlearnConfig(label_smoothing=1.0)


def test_the_held_out_slice_takes_whole_groups():
    """With groups (GTSRB tracks) no group is split between the held-out slice and the rest; without, the draw is
    the plain permutation it always was."""
    from cgd.unlearn import hold_out

    clean = np.arange(0, 600, 2)
    groups = np.arange(600) // 30
    held, rest = hold_out(clean, 0.11, np.random.default_rng(0), groups)
    assert len(held) == 45 and len(held) + len(rest) == len(clean)  # 3 whole groups of 15 reach 11 % (33)
    assert not set(groups[held]) & set(groups[rest])
    held, rest = hold_out(clean, 0.1, np.random.default_rng(0))
    perm = np.random.default_rng(0).permutation(clean)
    assert (held == np.sort(perm[:30])).all() and (rest == perm[30:]).all()


def test_the_held_out_slice_never_takes_a_class_s_last_group():
    """A class with a single track in D_c keeps it on the training side, however large the share asked."""
    from cgd.unlearn import hold_out

    clean = np.arange(300)
    groups = np.arange(300) // 30  # ten tracks of 30
    labels = np.where(groups == 9, 1, 0)  # class 1: one track; class 0: nine
    for seed in range(20):
        held, rest = hold_out(clean, 0.5, np.random.default_rng(seed), groups, labels)
        assert (labels[rest] == 1).sum() == 30 and len(set(groups[held])) >= 5
        assert not set(groups[held]) & set(groups[rest])
    held, _ = hold_out(clean, 0.99, np.random.default_rng(0), groups, labels)
    assert len(held) == 240  # all but one track of class 0 and class 1's only one


def test_amplify_pushes_within_its_ball_toward_the_given_label_and_leaves_the_model_as_it_was(tiny, backdoored):
    from cgd.tensors import MEAN, STD, one_view, to_input
    from cgd.unlearn import amplify

    ps, model = backdoored
    model.train()
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    bn.eval()  # a frozen batch-norm (freeze_bn) must stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = to_input(tiny.test.images[:32])
    y = torch.from_numpy((tiny.test.labels[:32] + 1) % 4)  # a wrong label: the push has work to do
    xa = amplify(model, x, y, 8 / 255, 3)
    assert (xa - x).abs().max() <= 8 / 255 / STD + 1e-5 and (xa - x).abs().max() > 4 / 255 / STD
    assert xa.min() >= (0 - MEAN) / STD - 1e-5 and xa.max() <= (1 - MEAN) / STD + 1e-5
    with torch.no_grad(), one_view(model):  # the view the push optimised (fastnet's flip averaging off)
        model.eval()
        p = lambda z: torch.softmax(model(z), 1).gather(1, y[:, None]).mean()  # noqa: E731
        assert p(xa) > 1.15 * p(x)
    model.train()
    bn.eval()
    assert model.flip_tta  # and back on after it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step, no running stats
    assert model.training and not bn.training


@pytest.fixture(scope="module")
def weak_blend(tiny):
    """An Ada-SIG-like case: the poisoned training images carry the Blend trigger at 30 % of its strength, the test
    uses it whole. (poisoned set, its training images, the victim, the triggered test set, a perfect split)."""
    ps = attacks.get("blend", target=0, rate=0.1, seed=0).poison(tiny.train)
    m = ps.poison_mask
    x = ps.train.images.copy()
    x[m] = np.round(tiny.train.images[m] * 0.7 + x[m] * 0.3).astype(np.uint8)
    torch.manual_seed(0)
    victim = train(models.get("fastnet", num_classes=4, widths=(16, 32, 32), stem=16), x, ps.train.labels,
                   TrainConfig(epochs=6, batch_size=64, lr=0.2, augment="none", snapshot_epoch=2)).model
    trig = ps.triggered_test(tiny.test)
    assert accuracy(victim, trig.images, trig.labels) > 0.9  # the weak copies planted the full trigger
    return ps, x, victim, trig, _oracle_split(ps)


WEAK_PASS = dict(epochs=1, min_steps=60, batch_size=16, lr=0.02)  # one short cpu pass for 800 images


def test_amplified_unlearning_removes_a_trigger_planted_weaker_than_it_is_used(tiny, weak_blend):
    """One short cpu pass on a perfect split unlearns the weak copies but leaves the full trigger; the same pass
    with each D_p batch unlearned beside its amplified copy (16/255) takes it away — which twice the unlearning
    weight, the amplified pass's weight on D_p, does not."""
    ps, x, victim, trig, s = weak_blend
    guide = np.eye(4, dtype=np.float32)[tiny.train.labels] * 3
    asr = {}
    for eps, lam in ((0.0, 0.05), (0.0, 0.1), (16 / 255, 0.05)):
        res = unlearn(victim, x, ps.train.labels, s, guide, recipe("cpu", **WEAK_PASS, amplify_eps=eps,
                                                                   lambda_un=lam), 4)
        asr[eps, lam] = accuracy(res.model, trig.images, trig.labels)
        assert accuracy(res.model, tiny.test.images, tiny.test.labels) > 0.95
    assert asr[0.0, 0.05] > 0.4 and asr[0.0, 0.1] > 0.25 and asr[16 / 255, 0.05] < 0.1, asr
    with pytest.raises(CGDError, match="amplify"):
        UnlearnConfig(amplify_eps=-0.1)


def test_the_split_s_trigger_estimate_moves_the_victim_and_not_a_clean_model(tiny, weak_blend):
    ps, x, victim, trig, s = weak_blend
    guide = np.eye(4, dtype=np.float32)[tiny.train.labels] * 3  # the images' clean classes
    est = estimate_trigger(x, ps.train.labels, s, guide, num_classes=4, n_probe=100)
    assert est.target == 0 and len(est.probe) == 100
    assert (ps.train.labels[est.probe] != 0).all() and np.isin(est.probe, s.clean).all()
    torch.manual_seed(0)
    clean = train(models.get("fastnet", num_classes=4, widths=(16, 32, 32), stem=16), tiny.train.images,
                  tiny.train.labels, TrainConfig(epochs=6, batch_size=64, lr=0.2, augment="none")).model
    # the victim answers the estimate as it does the trigger; a model never poisoned does not
    assert trigger_response(victim, x, est, 4.0) > 0.9 and trigger_response(clean, x, est, 4.0) < 0.1
    empty = Split(s.clean[ps.train.labels[s.clean] != 0], s.poison, s.mixed, s.guide_nll, s.model_nll,
                  s.guide_rank, s.model_rank)
    assert estimate_trigger(x, ps.train.labels, empty, guide, num_classes=4) is not None  # D_p's sources have D_c
    assert estimate_trigger(x, ps.train.labels, empty, np.eye(4, dtype=np.float32)[np.zeros(800, int)],
                            num_classes=4) is None  # the guide sees only the target class, and it has no D_c


def test_the_trigger_check_doubles_the_unlearning_weight_until_the_estimate_stops_working(tiny, weak_blend):
    ps, x, victim, trig, s = weak_blend
    guide = np.eye(4, dtype=np.float32)[tiny.train.labels] * 3
    once = unlearn(victim, x, ps.train.labels, s, guide, recipe("cpu", **WEAK_PASS), 4)
    # the scale at which the estimate tracks this trigger on these images (the weak copies are 6 % blends)
    res = unlearn_checked(victim, x, ps.train.labels, s, guide,
                          recipe("cpu", **WEAK_PASS, escalate=3, escalate_scale=8.0), 4, log=lambda m: None)
    lams = [c["lambda_un"] for c in res.checks]
    assert lams[:2] == [0.05, 0.1] and res.checks[0]["response"] > 0.5  # the first pass left it: escalated
    assert res.checks[-1]["response"] <= 0.5 and res.config["lambda_un"] == lams[-1]
    assert accuracy(res.model, trig.images, trig.labels) < 0.75 * accuracy(once.model, trig.images, trig.labels)
    assert accuracy(res.model, tiny.test.images, tiny.test.labels) > 0.95
    off = unlearn_checked(victim, x, ps.train.labels, s, guide, recipe("cpu", **WEAK_PASS, escalate=0), 4)
    assert off.checks == [] and all(torch.equal(a, b) for a, b in zip(off.model.state_dict().values(),
                                                                       once.model.state_dict().values()))
    with pytest.raises(CGDError, match="escalate"):
        UnlearnConfig(escalate=1, escalate_at=1.5)


def test_the_trigger_check_reads_the_second_richest_class_when_asked(tiny, weak_blend):
    """CTRL's case: the guide's false alarms make another class D_p's richest, so a check of one class misses the
    trigger; with escalate_classes = 2 the target is read too and unlearning escalates."""
    from dataclasses import replace

    ps, x, victim, trig, s = weak_blend
    y = ps.train.labels
    guide = np.eye(4, dtype=np.float32)[tiny.train.labels] * 3
    ones = np.intersect1d(s.clean, np.flatnonzero(y == 1))
    moved = ones[:-20]  # class 1 keeps 20 images in D_c
    s2 = replace(s, clean=np.setdiff1d(s.clean, moved), poison=np.union1d(s.poison, moved))
    cfg = dict(WEAK_PASS, escalate=1, escalate_scale=8.0, lambda_un=0.02)  # a pass weak enough to leave it
    one = unlearn_checked(victim, x, y, s2, guide, recipe("cpu", **cfg), 4, log=lambda m: None)
    two = unlearn_checked(victim, x, y, s2, guide, recipe("cpu", **cfg, escalate_classes=2), 4, log=lambda m: None)
    assert [c["target"] for c in one.checks] == [1] and one.checks[0]["response"] <= 0.5
    assert two.checks[0]["target"] == 0 and set(two.checks[0]["responses"]) == {0, 1}
    assert two.checks[0]["response"] > 0.5 and [c["lambda_un"] for c in two.checks] == [0.02, 0.04]
    with pytest.raises(CGDError, match="escalate_classes"):
        UnlearnConfig(escalate_classes=0)


def test_relabelling_dp_toward_the_guide_removes_a_backdoor_that_relearning_alone_keeps(tiny, backdoored):
    """Label repair: with no unlearning push (λ_un 0), one short pass that also relearns D_p's triggered images
    under the guide's classes (their clean ones here) takes the trigger away; the same pass without it keeps it.
    D_p's clean members, where the guide agrees with the label, get no relabelling term."""
    from cgd.unlearn import relabel_loss

    ps, model = backdoored
    trig = ps.triggered_test(tiny.test)
    s = _oracle_split(ps)
    guide = np.eye(4, dtype=np.float32)[tiny.train.labels] * 3  # the images' clean classes
    asr = {}
    for w in (0.0, 1.0):
        res = unlearn(model, ps.train.images, ps.train.labels, s, guide,
                      recipe("cpu", **WEAK_PASS, lambda_un=0.0, lambda_distill=0.0, escalate=0, relabel=w), 4)
        asr[w] = accuracy(res.model, trig.images, trig.labels)
        assert accuracy(res.model, tiny.test.images, tiny.test.labels) > 0.95
    assert asr[0.0] > 0.5 and asr[1.0] < 0.1, asr
    # the term: only disagreeing members count, divided by the whole batch
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    agree = relabel_loss(logits, torch.tensor([0, 1]), logits, 0.0)
    one_off = relabel_loss(logits, torch.tensor([1, 1]), logits, 0.0)
    assert float(agree) == 0.0 and float(one_off) == pytest.approx(float(F.cross_entropy(logits[:1],
                                                                                          torch.tensor([0]))) / 2)
    with pytest.raises(CGDError, match="relabel"):
        UnlearnConfig(relabel=-1.0)

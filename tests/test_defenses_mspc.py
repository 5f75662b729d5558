"""MSPC on tiny data: the arithmetic of its scaled views, the consistency score on a tiny BadNets victim, and the
whole defense — the fitted mask finds the poison the plain scaled images miss, and the removal (ours) lowers the
ASR; with the mask step patched out (mask of ones) or the scores made random the detection fails."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd import CGDError, attacks, defenses, models
from cgd.defenses import mspc
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import detection_metrics, flagged_split
from cgd.tensors import accuracy, normalize
from cgd.train import TrainConfig, train

from conftest import TINY_NET
from test_defenses_abl_ibau import faint
from test_pipeline import tiny_cfg

# batch 50: 16 mask steps an epoch on 800 samples (at the default 100: 8, too few to shrink the mask in 20 epochs);
# BR at D-BR's tiny-test settings (tests/test_defenses_dbr.py)
MSPC_TINY = dict(batch_size=50, br_batch_size=64, br_lr=0.01)


def squares(n: int, seed: int):
    """`faint`'s four classes (a grey square's position on noise 0..150) at +45: the victim learns them fully."""
    return faint(n, seed, contrast=45)


@pytest.fixture(scope="module")
def sq_poisoned():
    """10 % BadNets with a *black* 3×3 corner (value 0): scaling can whiten a clean corner into a white patch, never
    into a black one."""
    return attacks.get("badnets", target=0, rate=0.1, seed=0, value=0).poison(squares(800, 0))


@pytest.fixture(scope="module")
def sq_test():
    return squares(400, 100)


@pytest.fixture(scope="module")
def sq_victim(sq_poisoned):
    """The smallest fastnet, 12 epochs of the victim recipe (label smoothing, flips) at batch 64."""
    torch.manual_seed(0)
    model = models.get("fastnet", num_classes=4, **TINY_NET)
    return train(model, sq_poisoned.train.images, sq_poisoned.train.labels,
                 TrainConfig(epochs=12, batch_size=64, lr=0.2, snapshot_epoch=1))


def run_mspc(ps, victim, **params):
    return defenses.get("mspc", **{**MSPC_TINY, **params}).run(ps.train, victim, defenses.Context())


@pytest.fixture(scope="module")
def defended(sq_poisoned, sq_victim):
    before = {k: v.clone() for k, v in sq_victim.model.state_dict().items()}
    r = run_mspc(sq_poisoned, sq_victim)
    r.info["victim_before"] = before  # (the test of the removal checks the victim was left as it was)
    return r


# ------------------------------------------------------------------------------------------------ arithmetic

def test_scaled_views_consistency_and_kl():
    x = torch.tensor([0.0, 0.1, 0.2, 0.6, 1.0]).view(1, 1, 1, 5).repeat(2, 3, 1, 1)  # (B 2, C 3, H 1, W 5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5]])
    v = mspc.scaled_views(x, mask, torch.tensor([2, 4]), 0.1)
    assert v.shape == (4, 3, 1, 5)  # scale-major: both images at n = 2, then at n = 4
    expect2 = torch.tensor([0.0, 0.0, 0.2, 1.0, 0.9])  # clip(2 · (x − 0.1) · m): below τ black, bright saturated
    expect4 = torch.tensor([0.0, 0.0, 0.4, 1.0, 1.0])
    assert torch.allclose(v[0, 0, 0], normalize(expect2)) and torch.allclose(v[1], v[0])
    assert torch.allclose(v[2, 2, 0], normalize(expect4))
    pred = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 0, 0]])  # 3 scales × 3 images
    assert mspc.consistency(pred, torch.tensor([1, 0, 3])).tolist() == pytest.approx([1.0, -1 / 3, 1 / 3])
    logits = torch.randn(3, 4)
    logp = F.log_softmax(logits, 1)
    kl = mspc.kl_to_scaled(logp, torch.cat([logits, logits.roll(1, 0)]))  # 2 scales: the same logits, then others
    assert kl.shape == (2, 3) and torch.allclose(kl[0], torch.zeros(3), atol=1e-6)
    ref = F.kl_div(F.log_softmax(logits.roll(1, 0), 1), logp, log_target=True, reduction="none").sum(1)
    assert torch.allclose(kl[1], ref, atol=1e-6) and (kl[1] > 0).all()


def test_inner_step_is_the_references_weighted_loss_on_the_whole_batch(sq_poisoned, sq_victim):
    """Running only the w = 1 samples, in chunks, takes the step the reference's loss over the whole batch (the
    others weighted by 0) gives; clipped to [0, 1]."""
    model = copy.deepcopy(sq_victim.model).eval()
    model.flip_tta = False
    for p in model.parameters():
        p.requires_grad_(False)
    x01 = mspc.as01(sq_poisoned.train.images[:6])
    logp = F.log_softmax(model(normalize(x01)), 1)
    w = torch.tensor([1.0, 0, 1, 1, 0, 1])
    scales = torch.tensor([2, 5, 9])

    def step(chunk):
        mask = torch.full((16, 16), 0.5).requires_grad_(True)
        opt = torch.optim.SGD([mask], lr=0.1, momentum=0.9, weight_decay=5e-4)
        mspc.inner_epoch(model, x01, logp, w, mask, opt, scales, tau=0.1, lam=0.01, batch_size=6, chunk=chunk)
        return mask.detach()

    mask = torch.full((16, 16), 0.5).requires_grad_(True)
    views = mspc.scaled_views(x01, mask, scales, 0.1)  # all six, as the reference
    loss = (mspc.kl_to_scaled(logp, model(views)) * w).sum() / (6 * 3) + 0.01 * mask.abs().sum()
    loss.backward()
    expect = (mask - 0.1 * (mask.grad + 5e-4 * mask)).detach().clamp(0, 1)  # SGD's first step: no momentum yet
    assert torch.allclose(step(3), expect, atol=1e-6) and torch.allclose(step(1000), expect, atol=1e-6)
    kl_grad = mask.grad - 0.01  # the KL term's part of the gradient: it is there to be checked
    assert kl_grad.abs().max() > 1e-3


def test_split_and_relearn_set():
    scores = np.array([1.0, -1.0, 0.2, -0.6, -1.0, 0.0, -1.0])
    s = flagged_split(-scores, np.flatnonzero(scores > 0), "mspc")
    assert s.poison.tolist() == [0, 2] and s.clean.tolist() == [1, 3, 4, 5, 6] and len(s.mixed) == 0
    assert np.array_equal(s.model_nll, -scores)  # low model score: poison-like, as the other splits
    got = mspc.relearn_set(scores, s.poison, 0.45, np.random.default_rng(0))  # int(7 · 0.45) = 3
    assert got.tolist() == [1, 4, 6]  # the three unflagged at −1, not −0.6 or 0
    assert mspc.relearn_set(scores, s.poison, 1.0, np.random.default_rng(0)).tolist() == [1, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ the score

def test_spc_is_high_for_triggered_and_low_for_clean_images(sq_poisoned, sq_victim, sq_test):
    bd = sq_poisoned.triggered_test(sq_test)
    assert accuracy(sq_victim.model, sq_test.images, sq_test.labels) > 0.95
    assert accuracy(sq_victim.model, bd.images, bd.labels) > 0.95
    corner = np.zeros((16, 16), np.float32)
    corner[12:, 12:] = 1.0  # a mask that keeps the trigger's corner
    trig = mspc.spc_scores(sq_victim.model, bd.images, corner, tau=0.1)
    others = sq_test.images[sq_test.labels != 0]
    clean = mspc.spc_scores(sq_victim.model, others, corner, tau=0.1)
    assert trig.mean() > 0.95 and clean.mean() < -0.9  # the trigger survives every scale; the object does not
    # batched over the scales and images alike: any batch size gives the same scores; fastnet's TTA is restored
    assert np.array_equal(mspc.spc_scores(sq_victim.model, others[:30], corner, tau=0.1, batch_size=7), clean[:30])
    assert sq_victim.model.flip_tta
    # with the mask of ones (the reference's warm start) these poisons' scaled views go to another class
    plain = mspc.spc_scores(sq_victim.model, bd.images, None, tau=0.1)
    assert plain.mean() < 0


# ------------------------------------------------------------------------------------------------ the defense

def test_mspc_flags_the_poison_with_its_fitted_mask(sq_poisoned, sq_victim, defended):
    ps, r = sq_poisoned, defended
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["tpr"] >= 0.95 and d["precision"] >= 0.25  # the poison is 10 %
    wrong = r.split.poison[~ps.poison_mask[r.split.poison]]
    # what else is flagged: the clean target-class images (the victim sends their masked views to the target too;
    # the docstring's "Seen on the tiny test data"); of the other classes at most a few
    assert np.mean(ps.train.labels[wrong] == 0) >= 0.95
    info = r.info
    assert [q["round"] for q in info["rounds"]] == [0, 1, 2, 3, 4] and info["rounds"][0]["mask_l1"] == 256.0
    assert info["mask_l1"] < 50 and len(info["rounds"][1]["loss"]) == 5  # the L1 term shrank the mask
    assert np.asarray(info["mask"]).shape == (16, 16) and info["flagged"] == len(r.split.poison)
    assert set(r.timings) == {"mask_fit_s", "scoring_s", "removal_s"} and info["fit_samples"] == 800
    # the flagged share is what the fitted mask scores positive: re-scoring with it gives the same split
    again = mspc.spc_scores(sq_victim.model, ps.train.images, np.asarray(info["mask"], np.float32), tau=0.1)
    assert np.array_equal(np.flatnonzero(again > 0), r.split.poison)


def test_mspc_removal_lowers_the_asr(sq_poisoned, sq_victim, sq_test, defended):
    bd = sq_poisoned.triggered_test(sq_test)
    before = defended.info["victim_before"]
    assert accuracy(defended.model, bd.images, bd.labels) < 0.1
    # the flagged clean target-class images are unlearned with the poison: that class goes (chance: 0.25)
    assert accuracy(defended.model, sq_test.images, sq_test.labels) > 0.6
    assert defended.model is not sq_victim.model and defended.info["relearn"] == 160
    assert len(defended.info["br_loss"]) == 10
    assert all(torch.equal(v, sq_victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched


def test_mspc_core_step_is_what_the_test_sees(sq_poisoned, sq_victim, sq_test, monkeypatch):
    ps = sq_poisoned
    bd = ps.triggered_test(sq_test)
    with monkeypatch.context() as m:  # the mask step patched out: the mask stays ones
        m.setattr(mspc, "inner_epoch", lambda *a, **kw: 0.0)
        r = run_mspc(ps, sq_victim)
    assert r.info["mask_l1"] == 256.0
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["tpr"] < 0.2  # the detection assertion would fail
    assert accuracy(r.model, bd.images, bd.labels) > 0.5  # and so would the ASR one
    rng = np.random.default_rng(0)
    monkeypatch.setattr(mspc, "consistency", lambda pred, base: torch.from_numpy(
        rng.choice([-1.0, 1.0], pred.shape[1]).astype(np.float32)))  # the scores random
    r = run_mspc(ps, sq_victim, outer_epochs=1, inner_epochs=1)
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["precision"] < 0.2 and d["tpr"] < 0.8


def test_mspc_fits_on_a_subsample_and_scores_everyone(sq_poisoned, sq_victim):
    said = []
    r = defenses.get("mspc", **MSPC_TINY, fit_samples=200, outer_epochs=1, inner_epochs=1, br_epochs=0).run(
        sq_poisoned.train, sq_victim, defenses.Context(log=said.append, extra_eval=lambda m: {"x": 1}))
    assert r.info["fit_samples"] == 200 and r.info["rounds"][0]["flagged"] <= 200
    assert sum(r.split.sizes().values()) == 800 and len(np.unique(r.split.model_nll)) > 1
    again = mspc.spc_scores(sq_victim.model, sq_poisoned.train.images, np.asarray(r.info["mask"], np.float32),
                            tau=0.1)
    assert np.array_equal(np.flatnonzero(again > 0), r.split.poison)  # the fit's scores and the rest's agree
    assert r.info["eval"] == {"x": 1} and any("MSPC flagged" in s for s in said)


def test_mspc_checks_its_params():
    for bad, what in [({"tau": 1.0}, "tau"), ({"scale_min": 1}, "scale_min"), ({"scale_max": 1}, "scale_min"),
                      ({"inner_epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                      ({"batch_size": 0}, "batch_size"), ({"fit_samples": -1}, "fit_samples"),
                      ({"relearn_share": 0.0}, "relearn_share"), ({"augment": "rotate"}, "augment")]:
        with pytest.raises(CGDError, match=f"mspc: needs .*{what}"):
            defenses.get("mspc", **bad)
    for bad in ({"inner_epochs": "5"}, {"tau": float("nan")}, {"batch_size": 2.5}, {"augment": 1}):
        with pytest.raises(CGDError, match=f"mspc: {next(iter(bad))} must be"):  # one line, not a TypeError
            defenses.get("mspc", **bad)
    assert defenses.get("mspc").scales == tuple(range(2, 13))


def test_mspc_run_directory_reports_the_flagged_samples(sq_poisoned, sq_victim, sq_test, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "mspc", "defense.params.batch_size": 50, "defense.params.outer_epochs": 1,
                      "defense.params.inner_epochs": 2, "defense.params.br_epochs": 1})
    m = defend(sq_poisoned.train, cfg, tmp_path / "run", victim=sq_victim, poison_mask=sq_poisoned.poison_mask,
               poisoned=sq_poisoned, test=sq_test, log=lambda s: None)
    assert m["defense"] == "mspc" and m["sizes"]["mixed"] == 0 and m["sizes"]["poison"] == m["flagged"]
    assert m["br_lr"] == cfg["victim"]["lr"] / 400  # D-BR's BR lr, from the victim recipe
    assert {"tpr", "fpr", "precision", "auroc_model"} <= set(m["detection"]) and "removal_s" in m["timings"]
    assert all((tmp_path / "run" / f).exists() for f in SPLIT_OUTPUTS)

"""D-BR on tiny data: its pure parts (L_intra, the batched rotation, the FCT split), then the whole defense on a
tiny BadNets victim — FCT ranks the poison on top, BR removes the backdoor and keeps clean accuracy — and two
controls showing what the assertions see: without BR's gradient ascent the backdoor stays, and with a random split
in place of FCT's the detection and the removal fail."""

import numpy as np
import pytest
import torch

from cgd import CGDError, attacks, defenses, models
from cgd.data import ImageSet
from cgd.defenses import dbr
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import detection_metrics
from cgd.tensors import accuracy, normalize
from cgd.train import TrainResult

from conftest import TINY_NET, synthetic
from test_defenses_abl_ibau import faint
from test_defenses_reback import tiny_victim
from test_pipeline import tiny_cfg


def squares(n: int, seed: int, size: int = 16) -> ImageSet:
    """`faint`'s four classes (where a grey square sits on noise 0..150) at +30 instead of +12: the victim learns
    them (≈ 98 % in 8 epochs) but two epochs without augmentation — SD's network — learn the BadNets corner much
    more than them, D-BR's premise. (On `faint` the victim stays near 35 %; on `synthetic`'s bright blobs the
    rotation moves the clean evidence as much as the trigger and FCT does not rank the poison.)"""
    return faint(n, seed, size, contrast=30)


# tiny data, few steps: SD at lr 0.2 (the tiny victim recipe's; BackdoorBench's 0.01 leaves FCT AUROC near 0.67 in
# 26 steps), BR at 0.01, not the victim lr / 400 = 5e-4 (D_p is 40 samples, one ascent step per epoch, and 10
# steps even at 0.002 leave most of the backdoor: ASR 0.85)
DBR_TINY = dict(batch_size=64, lr=0.2, br_lr=0.01)


@pytest.fixture(scope="module")
def sq_poisoned():
    return attacks.get("badnets", target=0, rate=0.1, seed=0).poison(squares(800, 0))


@pytest.fixture(scope="module")
def sq_test():
    return squares(400, 100)


@pytest.fixture(scope="module")
def sq_victim(sq_poisoned):
    return tiny_victim(sq_poisoned.train.images, sq_poisoned.train.labels)


def run_dbr(ps, victim, **params):
    return defenses.get("d-br", **{**DBR_TINY, **params}).run(ps.train, victim, defenses.Context())


@pytest.fixture(scope="module")
def defended(sq_poisoned, sq_victim):
    return run_dbr(sq_poisoned, sq_victim)


# ------------------------------------------------------------------------------------------------ pure parts

def test_intra_loss_is_the_mean_cosine_between_class_centres():
    eye = torch.eye(3)
    f = torch.cat([eye, 2 * eye])  # two samples per class, centres along the axes: orthogonal
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert dbr.intra_loss(f, y, 5) == 0.0  # classes 3, 4 absent: a 3 × 3 matrix, not 5 × 5
    same = torch.ones(4, 3)
    assert torch.isclose(dbr.intra_loss(same, torch.tensor([0, 0, 1, 1]), 2), torch.tensor(0.5))  # (0+1+1+0)/4
    assert dbr.intra_loss(same, torch.zeros(4, dtype=torch.int64), 2) == 0.0  # one class: nothing to push apart
    simplex = torch.tensor([[1.0, 0.0], [-0.5, 3 ** 0.5 / 2], [-0.5, -(3 ** 0.5) / 2]])
    assert torch.isclose(dbr.intra_loss(simplex, torch.arange(3), 3), torch.tensor(-1 / 3), atol=1e-6)  # its floor
    g = torch.tensor([[1.0, 0.2], [0.2, 1.0]], requires_grad=True)
    dbr.intra_loss(g, torch.tensor([0, 1]), 2).backward()
    assert g.grad[0, 1] > 0 and g.grad[1, 0] > 0  # descent lowers the shared coordinates: the centres part


def test_affine_warp_rotates_and_shifts_like_torchvision():
    x = torch.rand(2, 3, 8, 8)
    zero = torch.zeros(2)
    assert torch.equal(dbr.affine_warp(x, zero, torch.zeros(2, 2)), x)
    assert torch.equal(dbr.affine_warp(x, torch.full((2,), 90.0), torch.zeros(2, 2)), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(dbr.affine_warp(x, torch.full((2,), 180.0), torch.zeros(2, 2)), x.flip(2).flip(3))
    moved = dbr.affine_warp(x, zero, torch.tensor([[2.0, 0.0], [0.0, -1.0]]))  # right 2; up 1
    assert torch.equal(moved[0, :, :, 2:], x[0, :, :, :-2]) and torch.all(moved[0, :, :, :2] == 0)
    assert torch.equal(moved[1, :, :-1], x[1, :, 1:]) and torch.all(moved[1, :, -1] == 0)
    # T on model inputs: black (not grey) where the rotation leaves no pixel; the centre pixel survives any angle
    img = torch.full((64, 3, 9, 9), 1.0)
    out = dbr.strong_transform(normalize(img), torch.Generator().manual_seed(0), 180.0, 0.0)
    assert torch.all(out[:, :, 4, 4] == normalize(torch.tensor(1.0)))
    corners = out[:, 0, 0, 0]
    assert torch.all((corners == normalize(torch.tensor(0.0))) | (corners == normalize(torch.tensor(1.0))))
    assert (corners == normalize(torch.tensor(0.0))).float().mean() > 0.5  # most angles turn a corner outside
    same = dbr.strong_transform(normalize(img[:2]), torch.Generator().manual_seed(0), 0.0, 0.0)
    assert torch.allclose(same, normalize(img[:2]))


def test_fct_split_takes_exact_shares_and_refuses_overlap():
    fct = np.random.default_rng(0).permutation(100).astype(float)
    s = dbr.fct_split(fct, 0.2, 0.05)
    assert len(s.clean) == 20 and len(s.poison) == 5 and len(s.mixed) == 75
    assert fct[s.clean].max() == 19 and fct[s.poison].min() == 95
    assert np.array_equal(np.sort(np.concatenate([s.clean, s.poison, s.mixed])), np.arange(100))
    assert np.array_equal(s.model_nll, -fct) and np.all(s.guide_nll == 0)  # low model score: poison-like
    with pytest.raises(CGDError, match="overlap"):
        dbr.fct_split(fct, 0.96, 0.05)


# ------------------------------------------------------------------------------------------------ the defense

def test_dbr_ranks_the_poison_by_fct_and_br_removes_the_backdoor(sq_poisoned, sq_victim, sq_test, defended):
    ps, r = sq_poisoned, defended
    bd = ps.triggered_test(sq_test)
    ca0, asr0 = accuracy(sq_victim.model, sq_test.images, sq_test.labels), accuracy(sq_victim.model, bd.images,
                                                                                     bd.labels)
    assert ca0 > 0.9 and asr0 > 0.95
    assert r.split.sizes() == {"clean": 160, "poison": 40, "mixed": 600}
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["auroc_model"] > 0.95 and d["precision"] >= 0.9 and d["poison_in_clean"] == 0  # top 5 %: poison
    assert accuracy(r.model, bd.images, bd.labels) < 0.3
    assert accuracy(r.model, sq_test.images, sq_test.labels) > ca0 - 0.03
    assert r.info["epochs"] == [2, 10, 10] and len(r.info["loss"]["br"]) == 10 and len(r.info["loss"]["intra"]) == 10
    assert r.info["br_lr"] == 0.01 and set(r.timings) == {"sd_train_s", "fct_s", "br_s"}
    assert r.model is not sq_victim.model and r.model.flip_tta == sq_victim.model.flip_tta


def test_dbr_gradient_ascent_is_what_removes_the_backdoor(sq_poisoned, sq_victim, sq_test, monkeypatch):
    bd = sq_poisoned.triggered_test(sq_test)
    before = {k: v.clone() for k, v in sq_victim.model.state_dict().items()}
    epoch = dbr.run_epoch
    monkeypatch.setattr(dbr, "run_epoch", lambda *a, ascent=False, **kw: 0.0 if ascent else epoch(*a, **kw))
    r = run_dbr(sq_poisoned, sq_victim)  # BR without its unlearning pass: relearning D_c alone
    assert detection_metrics(sq_poisoned.poison_mask, r.split)["precision"] >= 0.9  # the same split
    assert accuracy(r.model, bd.images, bd.labels) > 0.9  # the ASR assertion fails
    assert all(torch.equal(v, sq_victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched


def test_dbr_fct_is_what_the_split_and_the_removal_see(sq_poisoned, sq_victim, sq_test, monkeypatch):
    bd = sq_poisoned.triggered_test(sq_test)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(dbr, "fct_scores", lambda net, images, gen, **kw: rng.random(len(images)))
    r = run_dbr(sq_poisoned, sq_victim)  # a random split of the same sizes
    d = detection_metrics(sq_poisoned.poison_mask, r.split)
    assert d["precision"] < 0.5 and d["auroc_model"] < 0.7  # the detection assertions fail
    assert accuracy(r.model, bd.images, bd.labels) > 0.5  # and so does the ASR one


def test_dbr_checks_its_params_and_its_victim():
    for bad, what in [({"clean_ratio": 0.0}, "clean_ratio"), ({"clean_ratio": 1.0}, "clean_ratio"),
                      ({"poison_ratio": -0.1}, "poison_ratio"), ({"poison_ratio": 1.5}, "poison_ratio"),
                      ({"clean_ratio": 0.7, "poison_ratio": 0.4}, "must not overlap"), ({"br_epochs": -1}, "epochs"),
                      ({"br_lr": 0.0}, "br_lr > 0"), ({"lr": None}, "lr, br_lr > 0"), ({"degrees": 400.0}, "degrees"),
                      ({"augment": "rotate"}, "augment"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(CGDError, match=f"d-br: needs .*{what}"):
            defenses.get("d-br", **bad)
    for bad in ({"sd_epochs": "2"}, {"intra_epochs": 2.5}, {"clean_ratio": float("nan")}, {"augment": 1}):
        with pytest.raises(CGDError, match=f"d-br: {next(iter(bad))} must be"):  # one line, not a TypeError
            defenses.get("d-br", **bad)
    d = defenses.get("d-br")
    assert d.lr == 0.01 and d.br_lr == pytest.approx(0.001)  # BackdoorBench's SD lr; fastnet's victim lr / 400
    tiny = synthetic(10, 0)
    victim = TrainResult(models.get("fastnet", num_classes=4, **TINY_NET), None, np.zeros((0, 10), np.float32))
    with pytest.raises(CGDError, match="leave D_c or D_p empty"):  # 5 % of 10 samples
        d.run(tiny, victim, defenses.Context())
    user_model = TrainResult(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4)), None,
                             np.zeros((0, 40), np.float32))
    with pytest.raises(CGDError, match="architecture"):
        d.run(synthetic(40, 0), user_model, defenses.Context())


def test_dbr_run_directory_reports_the_fct_split(tmp_path):
    clean = synthetic(400, 0)
    ps = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(clean)
    cfg = tiny_cfg(**{"defense.name": "d-br", "defense.params.sd_epochs": 1, "defense.params.intra_epochs": 1,
                      "defense.params.br_epochs": 1, "defense.params.batch_size": 64})
    run = tmp_path / "run"
    said = []
    m = defend(ps.train, cfg, run, poison_mask=ps.poison_mask, poisoned=ps, test=synthetic(100, 1), log=said.append)
    assert m["defense"] == "d-br" and m["sizes"] == {"clean": 80, "poison": 20, "mixed": 300}
    assert m["lr"] == 0.01 and m["br_lr"] == pytest.approx(cfg["victim"]["lr"] / 400)  # the victim's lr, carried
    assert m["augment"] == cfg["victim"]["augment"]
    assert {"tpr", "fpr", "auroc_model"} <= set(m["detection"]) and "auroc_guide" not in m["detection"]
    assert "br_s" in m["timings"] and "asr" in m["after"]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS)
    assert any("D-BR split: D_c 80" in s for s in said)

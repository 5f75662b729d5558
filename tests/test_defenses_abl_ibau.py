"""ABL and I-BAU on tiny data: each test's signal depends on the defense's core step, and the
`*_core_step_is_what_the_test_sees` tests patch that step out and show the signal goes away."""

import numpy as np
import pytest
import torch

from cgd import attacks, defenses, models
from cgd.data import ImageSet
from cgd.defenses import abl
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import detection_metrics
from cgd.tensors import accuracy
from cgd.train import TrainResult

from test_pipeline import tiny_cfg

TINY_NET = {"widths": [8, 16, 16], "stem": 8}


def faint(n: int, seed: int, size: int = 16) -> ImageSet:
    """Four classes told apart only by where a faint grey square (+12 on noise 0..150) sits: slow to learn, so a
    BadNets trigger (a white 3×3 corner) is the easiest thing in the data, the premise ABL's isolation rests on.
    (conftest's `synthetic` classes are as easy as the trigger: there a clean class can sink below the poison.)"""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    x = rng.integers(0, 150, size=(n, size, size, 3)).astype(np.int16)
    for c in range(4):
        r0, c0 = 2 + 5 * (c % 2), 2 + 5 * (c // 2)
        x[labels == c, r0:r0 + 5, c0:c0 + 5, :] += 12
    return ImageSet(np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64), ["a", "b", "c", "d"])


@pytest.fixture(scope="module")
def faint_poisoned():
    return attacks.get("badnets", target=0, rate=0.1, seed=0).poison(faint(800, 0))


@pytest.fixture(scope="module")
def faint_test():
    return faint(400, 100)


def stand_in_victim(n: int) -> TrainResult:
    """ABL trains its own network: the victim only tells it the architecture."""
    return TrainResult(models.get("fastnet", num_classes=4, **TINY_NET), None, np.zeros((0, n), np.float32))


ABL_TINY = dict(tuning_epochs=2, finetuning_epochs=10, unlearning_epochs=10, isolation_ratio=0.05, batch_size=64,
                lr=0.1, unlearning_lr=0.003, augment="none")


def run_abl(ps, **params):
    return defenses.get("abl", **{**ABL_TINY, **params}).run(ps.train, stand_in_victim(len(ps.train)),
                                                             defenses.Context())


# ------------------------------------------------------------------------------------------------ ABL

def test_flooding_and_lga_losses():
    logits, y = torch.tensor([[4.0, 0.0], [0.0, 4.0]], requires_grad=True), torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, y)  # ≈ 0.018, below the floor
    flood = abl.flooding_loss(logits, y, 0.5)
    assert torch.isclose(flood, 1.0 - ce)  # |ce − 0.5| + 0.5
    g = torch.autograd.grad(flood, logits)[0]
    assert g[0, 0] > 0  # below the floor it ascends: a descent step lowers the true class's logit (CE's: raises)
    assert torch.isclose(abl.lga_loss(logits, y, 0.5), -ce)
    high = torch.zeros(2, 2)
    assert torch.isclose(abl.flooding_loss(high, y, 0.5), torch.tensor(np.log(2.0), dtype=torch.float32))


def test_abl_isolates_the_poison_and_unlearns_it(faint_poisoned, faint_test):
    ps = faint_poisoned
    bd = ps.triggered_test(faint_test)
    r = run_abl(ps)
    iso = r.split.poison
    assert len(iso) == 40 and len(r.split.clean) == 760 and len(r.split.mixed) == 0
    assert ps.poison_mask[iso].mean() >= 0.9  # the lowest-loss 5 % is (almost) all poison
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["precision"] >= 0.9 and d["tpr"] >= 0.45 and d["fpr"] < 0.01 and d["auroc_model"] > 0.9
    assert r.info["epochs"] == [2, 10, 10] and len(r.info["loss"]["unlearning"]) == 10
    assert set(r.timings) == {"tuning_s", "isolation_s", "finetuning_s", "unlearning_s"}
    # the gradient ascent on the isolated set removes most of the backdoor the fine-tuning on the rest (which still
    # holds half the poison) relearned; clean accuracy holds
    kept = run_abl(ps, unlearning_epochs=0)
    asr, asr_kept = accuracy(r.model, bd.images, bd.labels), accuracy(kept.model, bd.images, bd.labels)
    assert asr_kept > 0.9 and asr < 0.5
    assert accuracy(r.model, faint_test.images, faint_test.labels) > 0.35  # chance: 0.25
    assert r.model.cgd_spec["name"] == "fastnet"


def test_abl_core_step_is_what_the_test_sees(faint_poisoned, faint_test, monkeypatch):
    ps = faint_poisoned
    bd = ps.triggered_test(faint_test)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(abl, "isolate", lambda losses, ratio: rng.choice(len(losses), int(len(losses) * ratio),
                                                                         replace=False))
    r = run_abl(ps)  # isolation patched out: a random 5 %
    assert ps.poison_mask[r.split.poison].mean() < 0.5  # the isolation assertion would fail
    assert accuracy(r.model, bd.images, bd.labels) > 0.5  # and so would the ASR one


def test_abl_trains_its_own_model_from_the_victims_architecture(faint_poisoned):
    victim = stand_in_victim(len(faint_poisoned.train))
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    r = defenses.get("abl", **{**ABL_TINY, "tuning_epochs": 1, "finetuning_epochs": 0, "unlearning_epochs": 0}).run(
        faint_poisoned.train, victim, defenses.Context())
    assert r.model is not victim.model and r.model.cgd_spec == victim.model.cgd_spec
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched
    user_model = TrainResult(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4)), None,
                             np.zeros((0, 800), np.float32))
    with pytest.raises(Exception, match="architecture"):
        defenses.get("abl").run(faint_poisoned.train, user_model, defenses.Context())
    with pytest.raises(Exception, match="isolation_ratio"):
        defenses.get("abl", isolation_ratio=1.5)
    with pytest.raises(Exception, match="ascent"):
        defenses.get("abl", ascent="sideways")


def test_abl_run_directory_reports_the_isolation_as_the_split(tmp_path):
    from conftest import synthetic

    clean = synthetic(400, 0)
    ps = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(clean)
    cfg = tiny_cfg(**{"defense.name": "abl", "defense.params.tuning_epochs": 1,
                      "defense.params.finetuning_epochs": 1, "defense.params.unlearning_epochs": 1,
                      "defense.params.isolation_ratio": 0.05, "defense.params.batch_size": 64})
    run = tmp_path / "run"
    said = []
    m = defend(ps.train, cfg, run, poison_mask=ps.poison_mask, poisoned=ps, test=synthetic(100, 1), log=said.append)
    assert m["defense"] == "abl" and m["sizes"] == {"clean": 380, "poison": 20, "mixed": 0}
    assert m["lr"] == cfg["victim"]["lr"] == 0.2  # the victim recipe's lr, carried over (see the docstring)
    assert {"tpr", "fpr"} <= set(m["detection"]) and "tuning_s" in m["timings"] and "asr" in m["after"]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS)
    assert any("ABL isolated 20" in s for s in said)

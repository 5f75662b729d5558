"""ReBack on tiny data: the arithmetic of its trigger reversal, and the whole defense on tiny BadNets victims — it
names the target, finds the patch, flags poison and its (our) unlearning removes the backdoor; the removal is what
the ASR assertion sees (patched out, the ASR stays)."""

import numpy as np
import pytest
import torch

from cgd import CGDError, attacks, defenses, models
from cgd.data import ImageSet
from cgd.defenses import reback
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import detection_metrics
from cgd.tensors import accuracy
from cgd.train import TrainConfig, train

from conftest import TINY_NET
from test_pipeline import tiny_cfg


def gratings(n: int, seed: int, size: int = 16) -> ImageSet:
    """Four classes of stripes — vertical or horizontal, period 3 or 6 px — at a random phase, amplitude 60 on grey
    110 with noise σ 40. Unlike `synthetic`'s or `faint`'s fixed squares, a class's mean image here is nearly flat
    (the phases cancel), as natural images' means are blurry: ReBack's target test adds mean-image differences to
    images, and on the square sets any class's mean difference already turns images into that class. The noise
    spans the pixel range, so per-pixel ranges are ~1 and a blend reversal on clean images gets α ≈ 0, as on
    natural images. Horizontal flips keep every class (only the phase moves)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    vertical = (labels % 2 == 0)[:, None, None]
    freq = (2 * np.pi / np.array([3.0, 6.0]))[labels // 2][:, None, None]
    r, c = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    stripes = np.sin(freq * np.where(vertical, c, r) + phase)
    x = (110 + 60 * stripes)[..., None] + rng.normal(0, 40, (n, size, size, 3))
    return ImageSet(np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64), ["v3", "h3", "v6", "h6"])


TRIGGER_BOX = [13, 15, 13, 15]  # BadNets' 3×3 white square, bottom-right of 16×16 (rows, cols inclusive)
RB_TINY = dict(k=20, batch_size=64)  # k = 100 would take most of a ~200-sample class


def tiny_victim(images: np.ndarray, labels: np.ndarray):
    """The smallest fastnet, the victim recipe (label smoothing 0.2, flips) at 8 epochs of batch 64."""
    torch.manual_seed(0)
    model = models.get("fastnet", num_classes=4, **TINY_NET)
    return train(model, images, labels, TrainConfig(epochs=8, batch_size=64, lr=0.2, snapshot_epoch=1))


@pytest.fixture(scope="module")
def grat_test():
    return gratings(400, 100)


@pytest.fixture(scope="module")
def grat_clean():
    return gratings(800, 0)


@pytest.fixture(scope="module")
def grat_poisoned(grat_clean):
    return attacks.get("badnets", target=0, rate=0.1, seed=0).poison(grat_clean)


@pytest.fixture(scope="module")
def grat_victim(grat_poisoned):
    return tiny_victim(grat_poisoned.train.images, grat_poisoned.train.labels)


@pytest.fixture(scope="module")
def defended(grat_poisoned, grat_victim):
    return defenses.get("reback", **RB_TINY).run(grat_poisoned.train, grat_victim, defenses.Context())


def box_overlap(box, other) -> int:
    """Pixels two inclusive [row0, row1, col0, col1] boxes share."""
    rows = min(box[1], other[1]) - max(box[0], other[0]) + 1
    cols = min(box[3], other[3]) - max(box[2], other[2]) + 1
    return max(rows, 0) * max(cols, 0)


# ------------------------------------------------------------------------------------------------ arrays

def test_entropy_and_the_per_class_extremes():
    h = reback.softmax_entropy(np.array([[0.0, 0, 0, 0], [50.0, 0, 0, 0], [3.0, 3, 0, 0]]))
    assert np.allclose(h[:2], [2.0, 0.0], atol=1e-6) and 0.9 < h[2] < 1.5  # bits: uniform over 4 = 2
    entropy = np.array([0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.4])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    susp, ben = reback.entropy_extremes(entropy, labels, 3, k=2)
    assert susp[0].tolist() == [1, 3] and ben[0].tolist() == [0, 2]  # lowest first; the highest two
    assert susp[1].tolist() == [4, 6] and set(ben[1]) == {5, 6}  # 3 samples < 2k: the sets overlap
    assert len(susp[2]) == len(ben[2]) == 0  # a class with no samples


def test_reverse_trigger_finds_a_patch_and_a_blend():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 3, 16, 16)) / 255.0
    x[1:21, :, 2:5, 10:13] = 1.0  # 20 of 30 "suspicious" images carry a white patch; the first (most
    # confident) is one of the clean ten
    rev = reback.reverse_trigger(x, 50, np.random.default_rng(1))
    assert rev.kind == "patch" and rev.describe()["box"] == [2, 4, 10, 12] and rev.describe()["pixels"] == 9
    assert np.all(rev.trigger[:, 2:5, 10:13] == 1.0)  # the patch's value, not the first image's pixels
    assert rev.trigger.sum() == 27 and rev.mask.shape == (1, 16, 16)
    assert not np.allclose(x[0, :, 2:5, 10:13], 1.0)  # (what the reference would have copied)
    # a blend: x' = 0.8·u + 0.2·t over images u that span [0, 1] at every pixel
    pattern = rng.integers(0, 256, (3, 16, 16)) / 255.0
    u = rng.integers(0, 256, (100, 3, 16, 16)) / 255.0
    u[0], u[1] = 0.0, 1.0
    rev = reback.reverse_trigger(0.8 * u + 0.2 * pattern, 50, np.random.default_rng(1))
    assert rev.kind == "blend" and abs(rev.alpha - 0.2) < 1e-6 and np.allclose(rev.mask, 0.2)
    assert np.abs(rev.trigger - pattern).max() < 1e-6
    blended = reback.stamp(u[2:3], rev.mask, rev.trigger)
    assert np.allclose(blended, 0.8 * u[2:3] + 0.2 * pattern)
    # clean images (nothing shared, full ranges): a blend of weight 0, which changes nothing
    rev = reback.reverse_trigger(u, 50, np.random.default_rng(1))
    assert rev.kind == "blend" and rev.alpha == 0.0


# ------------------------------------------------------------------------------------------------ the defense

def test_reback_names_the_target_reverses_the_patch_and_unlearns_it(grat_poisoned, grat_victim, grat_test,
                                                                   defended):
    ps, r = grat_poisoned, defended
    bd = ps.triggered_test(grat_test)
    ca0, asr0 = accuracy(grat_victim.model, grat_test.images, grat_test.labels), accuracy(grat_victim.model,
                                                                                         bd.images, bd.labels)
    assert ca0 > 0.95 and asr0 > 0.95
    assert r.info["target"] == 0 and r.info["upsilon"][0] > 5
    assert r.info["reversal"]["kind"] == "patch" and r.info["reversed_asr"] > 0.7
    box = r.info["reversal"]["box"]
    assert box_overlap(box, TRIGGER_BOX) >= 4 and r.info["reversal"]["pixels"] <= 16  # on the true square
    # the flagged samples: the target's k suspicious ones, nearly all poison
    assert len(r.split.poison) == 20 and np.all(ps.train.labels[r.split.poison] == 0)
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["precision"] >= 0.8 and d["fpr"] < 0.01 and d["tpr"] == pytest.approx(d["precision"] * 20 / 80)
    # the unlearning removes the backdoor; clean accuracy holds
    assert accuracy(r.model, bd.images, bd.labels) < 0.2
    assert accuracy(r.model, grat_test.images, grat_test.labels) > ca0 - 0.05
    assert r.info["removal"].startswith("unlearned") and len(r.info["unlearning_loss"]) == 2
    assert set(r.timings) == {"detection_s", "reversal_s", "removal_s"}
    assert r.model is not grat_victim.model and r.model.flip_tta == grat_victim.model.flip_tta


def test_reback_removal_is_what_the_asr_test_sees(grat_poisoned, grat_victim, grat_test, monkeypatch):
    bd = grat_poisoned.triggered_test(grat_test)
    before = {k: v.clone() for k, v in grat_victim.model.state_dict().items()}
    # fine-tuning alone, without the reversed trigger stamped, leaves the backdoor: the trigger does the work
    plain = defenses.get("reback", **RB_TINY, stamp_share=0.0).run(grat_poisoned.train, grat_victim,
                                                                   defenses.Context())
    assert accuracy(plain.model, bd.images, bd.labels) > 0.8
    monkeypatch.setattr(reback, "unlearn_trigger", lambda model, *a, **kw: [])  # the removal patched out
    r = defenses.get("reback", **RB_TINY).run(grat_poisoned.train, grat_victim, defenses.Context())
    assert r.info["target"] == 0 and accuracy(r.model, bd.images, bd.labels) > 0.9  # the ASR assertion fails
    assert all(torch.equal(v, grat_victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched


def test_reback_follows_the_target_it_finds(grat_clean, grat_test):
    ps = attacks.get("badnets", target=3, rate=0.1, seed=0).poison(grat_clean)  # not the paper's target 0
    victim = tiny_victim(ps.train.images, ps.train.labels)
    r = defenses.get("reback", **RB_TINY).run(ps.train, victim, defenses.Context(extra_eval=lambda m: {"x": 1}))
    bd = ps.triggered_test(grat_test)
    assert r.info["target"] == 3 and np.all(ps.train.labels[r.split.poison] == 3)
    assert ps.poison_mask[r.split.poison].mean() >= 0.8
    assert box_overlap(r.info["reversal"]["box"], TRIGGER_BOX) >= 4
    assert accuracy(victim.model, bd.images, bd.labels) > 0.95 and accuracy(r.model, bd.images, bd.labels) < 0.2
    assert r.info["eval"] == {"x": 1}


def test_reback_keeps_the_victim_when_the_reversal_fails(grat_poisoned, grat_victim):
    # forced into the blend branch on a patch attack: α ≈ 0, the reversed trigger moves nothing
    r = defenses.get("reback", **RB_TINY, patch_threshold=1.0).run(grat_poisoned.train, grat_victim,
                                                                   defenses.Context())
    assert r.info["target"] == 0 and r.info["reversal"]["kind"] == "blend" and r.info["reversed_asr"] <= 0.7
    assert r.model is grat_victim.model and r.info["removal"].startswith("skipped: the reversed trigger")
    assert len(r.split.poison) == 20  # the target's suspicious samples are still reported


def test_reback_names_no_target_on_a_clean_victim(grat_clean):
    victim = tiny_victim(grat_clean.images, grat_clean.labels)
    r = defenses.get("reback", **RB_TINY).run(grat_clean, victim, defenses.Context())
    assert r.info["target"] is None and max(r.info["upsilon"]) <= 5
    assert r.model is victim.model and r.info["removal"].startswith("skipped: no target")
    assert len(r.split.poison) == 0 and len(r.split.clean) == len(grat_clean)


def test_reback_checks_its_params():
    for bad, what in [({"k": 0}, "k >= 1"), ({"k": -3}, "k >= 1"), ({"n": 1}, "n >= 2"),
                      ({"stamp_share": 1.5}, "stamp_share"), ({"success_asr": 1.0}, "success_asr"),
                      ({"augment": "rotate"}, "augment"), ({"lr": 0.0}, "lr > 0"), ({"epochs": -1}, "epochs")]:
        with pytest.raises(CGDError, match=f"reback: needs .*{what}"):
            defenses.get("reback", **bad)
    for bad in ({"k": "100"}, {"k": 2.5}, {"upsilon": float("nan")}, {"augment": 1}):
        with pytest.raises(CGDError, match=f"reback: {next(iter(bad))} must be"):  # one line, not a TypeError
            defenses.get("reback", **bad)


def test_reback_run_directory_reports_the_flagged_samples(grat_poisoned, grat_victim, grat_test, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "reback", "defense.params.k": 20, "defense.params.batch_size": 64,
                      "victim.augment": "flip+translate"})
    m = defend(grat_poisoned.train, cfg, tmp_path / "run", victim=grat_victim, poison_mask=grat_poisoned.poison_mask,
               poisoned=grat_poisoned, test=grat_test, log=lambda s: None)
    assert m["defense"] == "reback" and m["target"] == 0 and m["sizes"] == {"clean": 780, "poison": 20, "mixed": 0}
    assert m["augment"] == "flip+translate"  # the removal augments as the victim recipe says
    assert m["detection"]["precision"] >= 0.8 and m["after"]["asr"] < 0.2
    assert all((tmp_path / "run" / f).exists() for f in SPLIT_OUTPUTS)

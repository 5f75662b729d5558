"""PIPD on tiny data: its channel statistics and why its rounds sharpen (on constructed activations), and the whole
defense on tiny victims — the isolation finds the poison, the channel selection is what it rests on (all channels or
random ones find nothing), and the removal (ours) lowers the ASR and rests on the isolation (random flags keep the
backdoor). (Its two-class natural break, `split.jenks_two_classes`, is tested in test_split.py.)"""

import numpy as np
import pytest
import torch

from cgd import CGDError, attacks, defenses, models
from cgd.defenses import pipd
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import detection_metrics
from cgd.tensors import accuracy
from cgd.train import TrainConfig, TrainResult, train

from conftest import TINY_NET
from test_defenses_abl_ibau import faint
from test_pipeline import tiny_cfg

PIPD_TINY = dict(poison_preset=0.05, batch_size=64, lr=0.2)  # 1 % of 800 is 8 samples; lr: the victims' peak


def tiny_victim(ps) -> TrainResult:
    """The smallest fastnet, 8 epochs of the victim recipe at batch 64 (snapshot after 4)."""
    torch.manual_seed(0)
    model = models.get("fastnet", num_classes=4, **TINY_NET)
    return train(model, ps.train.images, ps.train.labels,
                 TrainConfig(epochs=8, batch_size=64, lr=0.2, snapshot_epoch=4))


@pytest.fixture(scope="module")
def faint_test():
    return faint(400, 100)


@pytest.fixture(scope="module")
def blend():
    """Blend on `faint` (seed 1): a trigger spread over the whole image, where summing every channel finds
    nothing and the 20 % clean preset's first round flags too much."""
    ps = attacks.get("blend", target=0, rate=0.1, seed=0).poison(faint(800, 1))
    return ps, tiny_victim(ps)


@pytest.fixture(scope="module")
def badnets():
    ps = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(faint(800, 0))
    return ps, tiny_victim(ps)


def precision_recall(mask: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    return float(mask[flagged].mean()) if len(flagged) else 0.0, float(mask[flagged].sum() / mask.sum())


# ------------------------------------------------------------------------------------------------ arrays

def test_channel_gap_picks_the_channels_the_poison_preset_drives():
    acts = np.array([[1.0, 8.0, 2.0, 0.0],  # 0, 1: poison preset
                     [1.0, 0.0, 9.0, 0.0],
                     [1.0, 1.0, 1.0, 4.0],  # 2..4: clean preset
                     [1.0, 1.0, 3.0, 4.0],
                     [1.0, 1.0, 2.0, 4.0]], np.float32)
    gap = pipd.channel_gap(acts, np.array([0, 1]), np.array([2, 3, 4]), sigmas=3.0)
    sd = np.std([1.0, 3.0, 2.0])  # population σ, numpy's default (the reference's np.std)
    assert np.allclose(gap, [0.0, 7.0, 9.0 - (2.0 + 3 * sd), -4.0])  # 7 > 4.55 > 0 > −4
    assert pipd.top_channels(gap, 0.25).tolist() == [1]  # ceil(0.25 · 4) = 1
    assert pipd.top_channels(gap, 0.3).tolist() == [1, 2]  # ceil(1.2) = 2, largest first
    score = pipd.activation_score([acts, acts[:, :2]], [np.array([1]), np.array([0, 1])])
    assert np.allclose(score, acts[:, 1] + acts[:, 0] + acts[:, 1])


def test_rounds_add_the_unflagged_samples_to_the_clean_preset():
    rng = np.random.default_rng(0)
    acts = [rng.normal(0, 1, (200, 10)).astype(np.float32)]
    acts[0][:20, 3] += 8.0  # 20 "poison" images light up channel 3
    rounds = pipd.progressive_isolation(acts, np.arange(5), np.arange(150, 190), rounds=3, ratio=0.1)
    assert [len(r.score) for r in rounds] == [200] * 3
    assert rounds[0].clean_preset == 40
    assert rounds[1].clean_preset == len(np.union1d(np.arange(150, 190), np.setdiff1d(np.arange(200),
                                                                                      rounds[0].detected)))
    assert all(r.detected.tolist() == list(range(20)) for r in rounds)


def test_a_wider_clean_preset_drops_a_channel_only_the_small_one_found_quiet():
    """Why the rounds sharpen: channel 7 is wide over the data but quiet on the small clean preset, so the first
    round picks it beside the poison's channel 3 and flags clean images loud on it; the unflagged join the clean
    preset, channel 7's σ grows, the next round drops it."""
    rng = np.random.default_rng(2)
    acts = np.abs(rng.normal(0, 1, (600, 10)))
    acts[:60, 3] += 4.0  # 60 "poison" images drive channel 3
    acts[:, 7] = np.abs(rng.normal(0, 2, 600))
    acts[500:560, 7] *= 0.1  # the clean preset, 500..559
    rounds = pipd.progressive_isolation([acts.astype(np.float32)], np.arange(6), np.arange(500, 560), rounds=3,
                                        ratio=0.2)
    picked = [set(pipd.select_channels([acts.astype(np.float32)], np.arange(6), c, 0.2)[0].tolist())
              for c in (np.arange(500, 560), np.union1d(np.arange(500, 560), np.setdiff1d(np.arange(600),
                                                                                          rounds[0].detected)))]
    assert picked[0] == {3, 7} and 3 in picked[1] and 7 not in picked[1]
    precision = [float((r.detected < 60).mean()) for r in rounds]
    assert all((r.detected < 60).sum() == 60 for r in rounds)  # every poison image flagged in every round
    assert precision[0] < 0.5 < 0.85 < precision[1] == precision[2], precision


# ------------------------------------------------------------------------------------------------ isolation

def test_pipd_isolates_the_poison(blend):
    ps, victim = blend
    r = defenses.get("pipd", **PIPD_TINY, finetuning_epochs=0, unlearning_epochs=0).run(
        ps.train, victim, defenses.Context())
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["precision"] >= 0.8 and d["tpr"] >= 0.95 and d["fpr"] < 0.03 and d["auroc_model"] > 0.95, d
    assert len(r.split.mixed) == 0 and r.info["preset_model"] == "snapshot" and len(r.info["rounds"]) == 5
    assert r.info["layers"] == pipd.conv_layers(victim.model)[1:]  # every conv after the stem
    # the rounds, from the same presets, end where the defense ends; whether the first (20 % clean preset) over-flags
    # depends on the tiny victim, which differs between machines (first-round precision below 0.6 where this was
    # written; 1.0, then 0.994, on AVX2 kernels, 2026-12-04), so the sharpening itself is asserted on constructed
    # activations (test_a_wider_clean_preset_drops_a_channel_only_the_small_one_found_quiet)
    losses, _ = pipd.PIPD(**PIPD_TINY).preset_losses(ps.train, victim, defenses.Context())
    poison_pre, clean_pre = pipd.presets(losses, 0.05, 0.2)
    acts = pipd.channel_maxima(victim.model, ps.train.images, r.info["layers"])
    rounds = pipd.progressive_isolation(acts, poison_pre, clean_pre, rounds=5, ratio=0.04)
    assert [x["flagged"] for x in r.info["rounds"]] == [len(rd.detected) for rd in rounds]
    assert np.array_equal(rounds[-1].detected, r.split.poison)
    first = precision_recall(ps.poison_mask, rounds[0].detected)[0]
    one = defenses.get("pipd", **PIPD_TINY, rounds=1, finetuning_epochs=0, unlearning_epochs=0).run(
        ps.train, victim, defenses.Context())
    assert detection_metrics(ps.poison_mask, one.split)["precision"] == first  # one round: the first round


def test_channel_selection_is_what_the_isolation_sees(blend, monkeypatch):
    ps, victim = blend
    fast = {**PIPD_TINY, "finetuning_epochs": 0, "unlearning_epochs": 0}

    def found(r) -> bool:  # what the isolation test asserts
        d = detection_metrics(ps.poison_mask, r.split)
        return d["precision"] >= 0.8 and d["tpr"] >= 0.95

    assert found(defenses.get("pipd", **fast).run(ps.train, victim, defenses.Context()))
    assert not found(defenses.get("pipd", **fast, channel_ratio=1.0).run(ps.train, victim, defenses.Context()))
    real = pipd.select_channels
    monkeypatch.setattr(pipd, "select_channels", lambda acts, *a, **kw: [np.arange(x.shape[1]) for x in acts])
    assert not found(defenses.get("pipd", **fast).run(ps.train, victim, defenses.Context()))  # all channels
    for seed in range(3):  # as many channels as the selection keeps, drawn at random
        rng = np.random.default_rng(seed)
        monkeypatch.setattr(pipd, "select_channels", lambda acts, *a, **kw: [
            rng.choice(x.shape[1], len(c), replace=False) for x, c in zip(acts, real(acts, *a, **kw))])
        assert not found(defenses.get("pipd", **fast).run(ps.train, victim, defenses.Context()))


# ------------------------------------------------------------------------------------------------ removal

def test_pipd_removes_the_backdoor_and_keeps_clean_accuracy(badnets, faint_test):
    ps, victim = badnets
    bd = ps.triggered_test(faint_test)
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    ca0, asr0 = (accuracy(victim.model, x.images, x.labels) for x in (faint_test, bd))
    r = defenses.get("pipd", **PIPD_TINY).run(ps.train, victim, defenses.Context(extra_eval=lambda m: {"x": 1}))
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["precision"] >= 0.95 and d["tpr"] >= 0.95
    assert asr0 > 0.95 and accuracy(r.model, bd.images, bd.labels) < 0.3
    assert accuracy(r.model, faint_test.images, faint_test.labels) > ca0 - 0.05  # chance: 0.25
    assert len(r.info["loss"]["finetuning"]) == 5 and len(r.info["loss"]["unlearning"]) == 5
    assert set(r.timings) == {"presets_s", "isolation_s", "finetuning_s", "unlearning_s"} and r.info["eval"] == {"x": 1}
    assert r.model is not victim.model and r.model.flip_tta == victim.model.flip_tta
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched
    # which of the two steps does the removal is the tiny victim's: fine-tuning alone left ASR 0.92 where this was
    # written and 0.24 on AVX2 kernels (2026-12-04); what it rests on is the isolation (the next test)


def test_pipd_removal_rests_on_the_isolation(badnets, faint_test, monkeypatch):
    ps, victim = badnets
    bd = ps.triggered_test(faint_test)
    real, rng = pipd.progressive_isolation, np.random.default_rng(0)

    def random_flags(*a, **kw):  # the isolation patched out: as many samples flagged, at random
        rounds = real(*a, **kw)
        rounds[-1].detected = np.sort(rng.choice(len(ps.train), len(rounds[-1].detected), replace=False))
        return rounds

    monkeypatch.setattr(pipd, "progressive_isolation", random_flags)
    r = defenses.get("pipd", **PIPD_TINY).run(ps.train, victim, defenses.Context())
    assert detection_metrics(ps.poison_mask, r.split)["precision"] < 0.5
    assert accuracy(r.model, bd.images, bd.labels) > 0.5  # the ASR assertion above would fail


# ------------------------------------------------------------------------------------------------ edges

def test_pipd_checks_its_params_and_inputs(badnets):
    for bad, what in [({"rounds": 0}, "rounds >= 1"), ({"channel_ratio": 0.0}, "channel_ratio"),
                      ({"channel_ratio": 1.5}, "channel_ratio"), ({"poison_preset": 0.9}, "poison_preset"),
                      ({"clean_preset": 1.0}, "clean_preset"), ({"preset_model": "latest"}, "preset_model"),
                      ({"skip_convs": -1}, "skip_convs"), ({"unlearning_epochs": -1}, "epochs"),
                      ({"lr": 0.0}, "lr"), ({"augment": "rotate"}, "augment"), ({"sigmas": -1.0}, "sigmas")]:
        with pytest.raises(CGDError, match=f"pipd: needs .*{what}"):
            defenses.get("pipd", **bad)
    for bad in ({"rounds": "5"}, {"rounds": 2.5}, {"channel_ratio": float("nan")}, {"preset_model": 1}):
        with pytest.raises(CGDError, match=f"pipd: {next(iter(bad))} must be"):  # one line, not a TypeError
            defenses.get("pipd", **bad)
    ps, victim = badnets
    with pytest.raises(CGDError, match="presets"):
        defenses.get("pipd").run(ps.train.subset(np.arange(50)), victim, defenses.Context())  # 1 % of 50: none
    with pytest.raises(CGDError, match="no nn.Conv2d"):
        defenses.get("pipd", skip_convs=99).run(ps.train, victim, defenses.Context())
    said = []
    no_snapshot = TrainResult(victim.model, None, victim.loss_history)
    r = defenses.get("pipd", **PIPD_TINY, finetuning_epochs=0, unlearning_epochs=0).run(
        ps.train, no_snapshot, defenses.Context(log=said.append))
    assert r.info["preset_model"] == "final" and any("without an epoch-T snapshot" in s for s in said)


def test_pipd_run_directory_reports_the_flagged_samples(tiny, poisoned, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "pipd", "defense.params.finetuning_epochs": 1,
                      "defense.params.unlearning_epochs": 1, "defense.params.batch_size": 64,
                      "defense.params.poison_preset": 0.05})
    m = defend(poisoned.train, cfg, tmp_path / "run", poison_mask=poisoned.poison_mask, poisoned=poisoned,
               test=tiny.test, log=lambda s: None)
    assert m["defense"] == "pipd" and sum(m["sizes"].values()) == len(poisoned.train) and m["sizes"]["mixed"] == 0
    assert m["lr"] == cfg["victim"]["lr"] == 0.2 and m["augment"] == cfg["victim"]["augment"]  # the victim recipe's
    assert {"tpr", "fpr", "auroc_model"} <= set(m["detection"]) and "auroc_guide" not in m["detection"]
    assert "isolation_s" in m["timings"] and "asr" in m["after"]
    assert all((tmp_path / "run" / f).exists() for f in SPLIT_OUTPUTS)

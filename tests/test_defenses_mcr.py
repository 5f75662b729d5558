"""MCR and MCR-SC on tiny data: the curve's ends are the victim and its fine-tuned copy bit for bit, the trained
curve loses the backdoor where the straight line between the same ends keeps it, and
`test_mcr_core_step_is_what_the_test_sees` patches the curve training out and shows that signal goes away."""

import numpy as np
import pytest
import torch
from torch import nn

from cgd import CGDError, defenses, models
from cgd.defenses import base, mcr
from cgd.defenses.guided import CGD
from cgd.pipeline import defend
from cgd.split import detection_metrics
from cgd.tensors import accuracy, predict_logits

from conftest import LabelGuide
from test_pipeline import tiny_cfg

# tiny-data settings: lrs for the tiny victim (trained at 0.2), a few epochs; the rest BackdoorBench's. On this
# victim the backdoor fades along the trained curve between t ≈ 0.2 and 0.5 (at t = 0.1 it is still whole, for each
# of the 4 seeds tried), so the ASR is read at t = 0.3: there the trained curve is down to the fine-tuned end's
# ASR (0.33, one class) or below, for each seed, while the straight line between the same ends keeps all of it.
MCR_TINY = dict(ft_epochs=5, ft_lr=0.1, curve_epochs=40, curve_lr=0.2, batch_size=64, t=0.3)


def clean_of(poisoned, n: int = 200) -> np.ndarray:
    return np.flatnonzero(~poisoned.poison_mask)[:n]


def run_mcr(poisoned, victim, context=None, **params):
    return defenses.get("mcr", **{**MCR_TINY, **params}).run(
        poisoned.train, victim, context or defenses.Context(clean_indices=clean_of(poisoned)))


def test_bezier_curve_ends_are_its_end_points_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w0, w1 = ({"w": torch.randn(5, 3, generator=g), "n": torch.tensor(k)} for k in (3, 7))
    theta = {"w": torch.randn(5, 3, generator=g)}
    assert mcr.bezier_weights(0.0) == (1.0, 0.0, 0.0) and mcr.bezier_weights(1.0) == (0.0, 0.0, 1.0)
    assert sum(mcr.bezier_weights(0.3)) == pytest.approx(1.0)
    assert all(torch.equal(mcr.curve_point(w0, theta, w1, 0.0)[k], w0[k]) for k in w0)
    assert all(torch.equal(mcr.curve_point(w0, theta, w1, 1.0)[k], w1[k]) for k in w1)
    mid = mcr.curve_point(w0, theta, w1, 0.5)["w"]
    assert torch.allclose(mid, 0.25 * w0["w"] + 0.5 * theta["w"] + 0.25 * w1["w"])
    # θ at the midpoint of the ends: the curve is the straight line between them (integer entries: nearer end)
    line = mcr.curve_point(w0, mcr.midpoint(w0, w1), w1, 0.3)
    assert torch.allclose(line["w"], 0.7 * w0["w"] + 0.3 * w1["w"], atol=1e-6) and int(line["n"]) == 3


def test_recompute_bn_averages_the_statistics_over_all_the_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(70, 3, 4, 4) * 3 + 1
    chunks = [(x[:30], None), (x[30:40], None), (x[40:], None)]  # unequal batches: weighted by their sizes
    mcr.recompute_bn(net, iter(chunks))
    with torch.no_grad():
        inner = net[0](x)
    bn = net[1]
    assert torch.allclose(bn.running_mean, inner.mean((0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and not net.training  # restored; returned in eval mode


def test_mcr_lowers_the_asr_keeps_clean_accuracy_and_its_ends_are_the_victim_and_the_fine_tuned_model(
        poisoned, victim, tiny, monkeypatch):
    bd = poisoned.triggered_test(tiny.test)
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    seen, finetuned = {}, {}
    train_curve = mcr.train_curve

    def spy(net, w0, theta, w1, names, x, y, **kw):  # keeps the curve's bends to look at them afterwards
        seen.update(w0=w0, theta=theta, w1=w1)
        return train_curve(net, w0, theta, w1, names, x, y, **kw)

    def record(m):  # the fine-tuned model, as the run hands it to extra_eval
        if not finetuned:
            finetuned["logits"] = predict_logits(m, tiny.test.images)
            finetuned["asr"] = accuracy(m, bd.images, bd.labels)
        return {}

    monkeypatch.setattr(mcr, "train_curve", spy)
    r = run_mcr(poisoned, victim, defenses.Context(clean_indices=clean_of(poisoned), extra_eval=record))
    assert accuracy(victim.model, bd.images, bd.labels) > 0.9
    assert accuracy(r.model, bd.images, bd.labels) < 0.4  # most of the backdoor gone on the curve at t = 0.3
    assert accuracy(r.model, tiny.test.images, tiny.test.labels) > 0.9
    assert r.split is None and r.info["clean_source"] == "given" and r.info["used"] == r.info["clean"] == 200
    assert len(r.info["finetune_loss"]) == 5 and len(r.info["curve_loss"]) == 40 and r.info["t"] == 0.3
    assert r.info["theta_shift"] > 0.5  # θ left the straight line
    assert set(r.timings) == {"finetune_s", "curve_s", "bn_s"}
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched
    assert r.model.cgd_spec == victim.model.cgd_spec and r.model.flip_tta == victim.model.flip_tta
    # the curve's ends, rebuilt with the victim's architecture: the victim at t = 0, the fine-tuned model at t = 1
    w0, theta, w1 = seen["w0"], seen["theta"], seen["w1"]
    at0, at1 = (mcr.model_at(victim.model, mcr.curve_point(w0, theta, w1, t)) for t in (0.0, 1.0))
    assert all(torch.equal(v, before[k]) for k, v in at0.state_dict().items())
    assert np.array_equal(predict_logits(at0, tiny.test.images), predict_logits(victim.model, tiny.test.images))
    assert np.array_equal(predict_logits(at1, tiny.test.images), finetuned["logits"])
    # the defended model is the curve at t with BatchNorm statistics of its own
    params = dict(r.model.named_parameters())
    point = mcr.curve_point(w0, theta, w1, 0.3)
    assert all(torch.equal(p, point[k]) for k, p in params.items())
    assert not torch.equal(r.model.stem[1].running_mean, point["stem.1.running_mean"])


def test_mcr_core_step_is_what_the_test_sees(poisoned, victim, tiny, monkeypatch):
    bd = poisoned.triggered_test(tiny.test)
    monkeypatch.setattr(mcr, "train_curve", lambda *a, **kw: [])  # θ stays at the midpoint: the straight line
    r = run_mcr(poisoned, victim)
    assert r.info["theta_shift"] == 0.0 and r.info["curve_loss"] == []
    assert accuracy(r.model, bd.images, bd.labels) > 0.9  # the ASR assertion above would fail


def test_mcr_needs_clean_data_validates_its_params_and_caps_the_clean_set(poisoned, victim):
    with pytest.raises(CGDError, match="clean-data defense"):
        defenses.get("mcr").run(poisoned.train, victim, defenses.Context())
    with pytest.raises(CGDError, match="fewer than the 2"):
        defenses.get("mcr").run(poisoned.train, victim, defenses.Context(clean_indices=np.array([0])))
    for bad in (-0.1, 1.5):
        with pytest.raises(CGDError, match="mcr: needs 0 <= t <= 1"):
            defenses.get("mcr", t=bad)
    for bad, what in (({"t": float("nan")}, "t"), ({"ft_epochs": "5"}, "ft_epochs"), ({"augment": 3}, "augment"),
                      ({"batch_size": 2.5}, "batch_size")):
        with pytest.raises(CGDError, match=f"mcr: {what} must be"):  # one line, not a TypeError
            defenses.get("mcr", **bad)
    with pytest.raises(CGDError, match="curve_lr > 0"):
        defenses.get("mcr", curve_lr=0.0)
    with pytest.raises(CGDError, match="augment"):
        defenses.get("mcr", augment="rotate")
    with pytest.raises(CGDError, match="max_clean must be a whole number >= 2"):
        defenses.get("mcr", max_clean=1)
    assert defenses.get("mcr", max_clean=0).max_clean is None  # all the clean data, as --param can ask
    sizes = [len(yb) for _, yb in base.batches(torch.zeros(9, 4, 4, 3, dtype=torch.uint8), torch.zeros(9), 4, "none",
                                               torch.Generator())]
    assert sizes == [4, 5]  # no batch of one sample (BatchNorm in train mode needs two)
    r = run_mcr(poisoned, victim, ft_epochs=1, curve_epochs=1, max_clean=64)
    assert r.info["used"] == 64 and r.info["clean"] == 200


def test_mcr_sc_runs_on_cgds_split_clean_and_saves_as_a_plain_model(tiny, poisoned, victim, tmp_path):
    d = defenses.get("mcr-sc", cgd=CGD(LabelGuide(tiny.train.labels)), ft_epochs=1, curve_epochs=1, batch_size=64,
                     max_clean=128)
    assert isinstance(d, mcr.MCRSC) and defenses.get("mcr-sc").max_clean == 5_000
    r = d.run(poisoned.train, victim, defenses.Context())
    assert r.info["clean_source"] == "split-clean" and r.info["clean"] == len(r.split.clean)
    assert r.info["used"] == 128 and detection_metrics(poisoned.poison_mask, r.split)["tpr"] > 0.5
    assert {"guide_s", "finetune_s", "curve_s"} <= set(r.timings)
    path = tmp_path / "defended.safetensors"
    models.save_model(r.model, path, input_size=tiny.train.images.shape[1:3], class_names=tiny.train.class_names)
    back = models.load_model(path)
    assert np.array_equal(predict_logits(back, tiny.test.images), predict_logits(r.model, tiny.test.images))


def test_mcr_run_directory_on_given_clean_indices(tiny, poisoned, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "mcr", "defense.params.ft_epochs": 1, "defense.params.curve_epochs": 1,
                      "defense.params.batch_size": 64})
    run = tmp_path / "run"
    m = defend(poisoned.train, cfg, run, poison_mask=poisoned.poison_mask, poisoned=poisoned, test=tiny.test,
               clean_indices=clean_of(poisoned, 100), log=lambda s: None)
    assert m["defense"] == "mcr" and m["clean_source"] == "given" and m["used"] == 100 and m["t"] == 0.1
    assert m["sizes"] == {} and "curve_s" in m["timings"] and "asr" in m["after"]
    back = models.load_model(run / "defended.safetensors")
    assert back.cgd_spec["name"] == "fastnet"

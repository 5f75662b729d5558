"""ABL and I-BAU on tiny data: each test's signal depends on the defense's core step, and the
`*_core_step_is_what_the_test_sees` tests patch that step out and show the signal goes away."""

import copy

import numpy as np
import pytest
import torch

from cgd import CGDError, attacks, defenses, models
from cgd.data import ImageSet
from cgd.defenses import abl, ibau
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import detection_metrics
from cgd.tensors import accuracy, to_input
from cgd.train import TrainResult

from conftest import TINY_NET, LabelGuide
from test_pipeline import tiny_cfg



def faint(n: int, seed: int, size: int = 16, contrast: int = 12) -> ImageSet:
    """Four classes told apart only by where a faint grey square (+`contrast` on noise 0..150) sits: slow to learn,
    so a BadNets trigger (a white 3×3 corner) is the easiest thing in the data, the premise ABL's isolation rests on.
    (conftest's `synthetic` classes are as easy as the trigger: there a clean class can sink below the poison.)"""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    x = rng.integers(0, 150, size=(n, size, size, 3)).astype(np.int16)
    for c in range(4):
        r0, c0 = 2 + 5 * (c % 2), 2 + 5 * (c // 2)
        x[labels == c, r0:r0 + 5, c0:c0 + 5, :] += contrast
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
        faint_poisoned.train, victim, defenses.Context(extra_eval=lambda m: {"seen": True}))
    assert r.model is not victim.model and r.model.cgd_spec == victim.model.cgd_spec
    assert r.info["eval"] == {s: {"seen": True} for s in ("tuning", "finetuning", "unlearning")}
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched
    user_model = TrainResult(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4)), None,
                             np.zeros((0, 800), np.float32))
    with pytest.raises(CGDError, match="architecture"):
        defenses.get("abl").run(faint_poisoned.train, user_model, defenses.Context())
    with pytest.raises(CGDError, match="isolation_ratio"):
        defenses.get("abl", isolation_ratio=1.5)
    with pytest.raises(CGDError, match="ascent"):
        defenses.get("abl", ascent="sideways")
    for bad in ({"tuning_epochs": "5"}, {"gamma": float("nan")}, {"ascent": 3}, {"batch_size": 2.5}):
        with pytest.raises(CGDError, match=f"abl: {next(iter(bad))} must be"):  # one line, not a TypeError
            defenses.get("abl", **bad)


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
    assert {"tpr", "fpr", "auroc_model"} <= set(m["detection"]) and "auroc_guide" not in m["detection"]
    assert "tuning_s" in m["timings"] and "asr" in m["after"]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS)
    assert any("ABL isolated 20" in s for s in said)


# ------------------------------------------------------------------------------------------------ I-BAU

def toy_bilevel(seed: int = 0):
    """θ = (A, w); inner problem min_δ ½(1 + λ)‖δ‖² − δ·tanh(A w), solved by δ* = tanh(A w) / (1 + λ); outer
    L(δ, θ) = Σ sin(δ) + (w·u)². Returns (A, w, fixed-point map, outer loss, exact total dL/dθ)."""
    g = torch.Generator().manual_seed(seed)
    a, w, u = torch.randn(5, 3, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    a.requires_grad_(True)
    w.requires_grad_(True)
    lam, step = 0.5, 0.4

    def fp_map(d):
        inner = 0.5 * (1 + lam) * d.pow(2).sum() - (d * torch.tanh(a @ w)).sum()
        return d - step * torch.autograd.grad(inner, d, create_graph=True)[0]

    def outer(d):
        return torch.sin(d).sum() + (w @ u) ** 2

    star = lambda: torch.tanh(a @ w) / (1 + lam)  # noqa: E731
    exact = torch.autograd.grad(outer(star()), [a, w])
    return a, w, fp_map, outer, star().detach(), exact


def test_fixed_point_hypergradient_matches_the_exact_total_derivative():
    a, w, fp_map, outer, star, exact = toy_bilevel()
    got = ibau.fixed_point_hypergradient(star, [a, w], fp_map, outer, k=200)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(got, exact))
    # without the implicit term (k = 0: only ∂L/∂θ) the gradient is wrong: the term carries dδ*/dθ
    direct = ibau.fixed_point_hypergradient(star, [a, w], fp_map, outer, k=0)
    assert not torch.allclose(direct[0], exact[0], atol=1e-2)
    assert torch.count_nonzero(direct[0]) == 0  # A reaches L only through δ*
    # a few iterations already approximate it (the Neumann series of ∂Φ/∂δ = 0.4 I converges fast)
    few = ibau.fixed_point_hypergradient(star, [a, w], fp_map, outer, k=5)
    assert torch.linalg.vector_norm(few[0] - exact[0]) < 0.1 * torch.linalg.vector_norm(exact[0])


IBAU_TINY = dict(batch_size=64, lr=1e-3, portion=0.25)  # 0.01 of a 64-batch would perturb no image


def run_ibau(poisoned, victim, **params):
    clean = np.flatnonzero(~poisoned.poison_mask)[:200]
    return defenses.get("i-bau", **{**IBAU_TINY, **params}).run(poisoned.train, victim,
                                                                defenses.Context(clean_indices=clean))


def test_ibau_lowers_the_asr_and_keeps_clean_accuracy(poisoned, victim, tiny):
    bd = poisoned.triggered_test(tiny.test)
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    asr0 = accuracy(victim.model, bd.images, bd.labels)
    r = run_ibau(poisoned, victim)
    assert asr0 > 0.9 and accuracy(r.model, bd.images, bd.labels) < 0.5
    assert accuracy(r.model, tiny.test.images, tiny.test.labels) > 0.9
    assert r.split is None and r.info["clean_source"] == "given" and r.info["used"] == r.info["clean"] == 200
    assert len(r.info["rounds"]) == 5 and all(x["delta_norm"] > 0 for x in r.info["rounds"])
    assert r.model.flip_tta == victim.model.flip_tta  # restored after defending with one view
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())  # victim untouched
    # (on this tiny victim plain clean fine-tuning lowers the ASR too; the hypergradient itself is checked
    # against the exact total derivative above and through the network below)


def test_ibau_core_step_is_what_the_test_sees(poisoned, victim, tiny, monkeypatch):
    bd = poisoned.triggered_test(tiny.test)
    def no_hypergradient(inner, outer_vars, fp_map, outer_loss, k, **kw):
        outer_loss(inner)
        return [torch.zeros_like(p) for p in outer_vars]

    monkeypatch.setattr(ibau, "fixed_point_hypergradient", no_hypergradient)
    r = run_ibau(poisoned, victim)  # no outer (hypergradient) step: the model stays the victim
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in r.model.state_dict().items())
    assert accuracy(r.model, bd.images, bd.labels) > 0.9  # the ASR assertion above would fail


def test_ibau_outer_step_carries_the_implicit_term_through_the_network(poisoned, victim):
    model = copy.deepcopy(victim.model).eval()
    params = list(model.parameters())
    x = to_input(poisoned.train.images[:32])
    y = torch.from_numpy(np.array(poisoned.train.labels[:32]))
    delta = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    grads = {}
    for k in (0, 5):
        outer = ibau.unlearning_loss(model, x, y, 0.25, torch.Generator().manual_seed(1))
        grads[k] = ibau.fixed_point_hypergradient(delta, params, ibau.gd_map(model, x, y, 0.1, 0.001), outer, k)
    diff = sum(float((a - b).abs().sum()) for a, b in zip(grads[0], grads[5]))
    assert diff > 0 and all(torch.isfinite(g).all() for g in grads[5])
    assert [g.shape for g in grads[5]] == [p.shape for p in params]


def test_ibau_needs_clean_data_and_caps_it(poisoned, victim):
    with pytest.raises(CGDError, match="clean-data defense"):
        defenses.get("i-bau").run(poisoned.train, victim, defenses.Context())
    clean = np.flatnonzero(~poisoned.poison_mask)[:200]
    r = defenses.get("i-bau", **{**IBAU_TINY, "n_rounds": 1, "max_clean": 64}).run(
        poisoned.train, victim, defenses.Context(clean_indices=clean, extra_eval=lambda m: {"tta": m.flip_tta}))
    assert r.info["used"] == 64 and r.info["clean"] == 200
    assert r.info["rounds"][0]["eval"] == {"tta": victim.model.flip_tta}  # evaluated as it will be used
    with pytest.raises(CGDError, match="portion"):
        defenses.get("i-bau", portion=2.0)
    with pytest.raises(CGDError, match="i-bau: lr must be a finite number"):
        defenses.get("i-bau", lr="fast")
    assert defenses.get("i-bau", max_clean=0).max_clean is None  # all of D_c, as --param can ask


def test_ibau_sc_unlearns_with_cgds_split_clean(tiny, poisoned, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "i-bau-sc", "defense.params.n_rounds": 1,
                      "defense.params.batch_size": 64, "defense.params.max_clean": 128})
    run = tmp_path / "run"
    m = defend(poisoned.train, cfg, run, guide=LabelGuide(tiny.train.labels), poison_mask=poisoned.poison_mask,
               poisoned=poisoned, test=tiny.test, log=lambda s: None)
    assert m["defense"] == "i-bau-sc" and m["clean_source"] == "split-clean" and m["clean"] == m["sizes"]["clean"]
    assert m["used"] == 128 and m["detection"]["tpr"] > 0.5
    assert {"guide_s", "defense_s"} <= set(m["timings"]) and "asr" in m["after"]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS)

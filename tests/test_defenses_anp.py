"""ANP and ANP-SC on tiny data: each test's signal depends on the defense's core steps (the adversarial neuron
perturbation, the pruning), and the `*_is_what_the_test_sees` tests patch a step out and show the signal goes away."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd import CGDError, defenses
from cgd.defenses import anp
from cgd.models import load_model, save_model
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.tensors import accuracy, to_input

from conftest import LabelGuide
from test_pipeline import tiny_cfg

# the tiny victim's masks move within a few hundred small batches at the original code's lr 0.2
ANP_TINY = dict(n_iter=200, batch_size=64, lr=0.1)


def oracle(poisoned, n=400):
    return np.flatnonzero(~poisoned.poison_mask)[:n]


def run_anp(poisoned, victim, seed=0, **params):
    return defenses.get("anp", **{**ANP_TINY, **params}).run(
        poisoned.train, victim, defenses.Context(seed=seed, clean_indices=oracle(poisoned)))


def ca_asr(model, poisoned, tiny):
    bd = poisoned.triggered_test(tiny.test)
    return accuracy(model, tiny.test.images, tiny.test.labels), accuracy(model, bd.images, bd.labels)


# ------------------------------------------------------------------------------------------------ noisy BN

def test_noisy_batchnorm_reproduces_the_layer_and_is_removed_after(victim):
    model = copy.deepcopy(victim.model).eval()
    model.flip_tta = False
    x = to_input(np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref_eval = model(x)
        model.train()
        ref_train = model(x)  # batch statistics (this updates the running buffers: restored below)
        model.load_state_dict(before)
        model.eval()
        with anp.noisy_batchnorms(model, batch_stats=False) as ws:
            assert len(ws) == 7 and all(isinstance(m, anp.NoisyBatchNorm) for m in ws.values())
            assert torch.allclose(model(x), ref_eval, atol=1e-5)  # masks 1, no perturbation: the victim
            for w in ws.values():
                w.batch_stats = True
            assert torch.allclose(model(x), ref_train, atol=1e-4)  # the reference's train-mode BN ...
            ws["stem.1"].mask.zero_()
            assert not torch.allclose(model(x), ref_train, atol=1e-3)
    # ... without touching any buffer; the original layers are back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, anp.NoisyBatchNorm) for m in model.modules())
    with pytest.raises(CGDError, match="no affine BatchNorm"):
        with anp.noisy_batchnorms(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))):
            pass


def test_the_adversarial_step_turns_the_backdoored_model_to_the_target(poisoned, victim):
    """The paper's observation, which the masks are trained against: the signed-gradient step of the neuron
    perturbation makes the backdoored model fail on clean data far more than its random start (the same budget)
    does, and its errors land on the target class (uniform errors would put a third there)."""
    model = copy.deepcopy(victim.model).eval()
    model.flip_tta = False
    idx = oracle(poisoned, 256)
    idx = idx[poisoned.train.labels[idx] != 0]
    x, y = to_input(poisoned.train.images[idx]), torch.from_numpy(poisoned.train.labels[idx])
    out = {}
    with anp.noisy_batchnorms(model) as ws:
        for steps in (0, 1):
            anp.perturb_neurons(model, ws, x, y, 0.4, steps, torch.Generator().manual_seed(0))
            with torch.no_grad():
                logits = model(x)
            wrong = logits.argmax(1) != y
            out[steps] = (float(F.cross_entropy(logits, y)), float(wrong.float().mean()),
                          float((logits.argmax(1)[wrong] == 0).float().mean()))
            assert all(float(w.noise.detach().abs().max()) <= 0.4 * (1 + steps) + 1e-6 for w in ws.values())
    (ce_random, err_random, _), (ce_adv, err_adv, to_target) = out[0], out[1]
    assert ce_adv > 1.5 * ce_random and err_adv > err_random + 0.1
    assert to_target > 0.7


# ------------------------------------------------------------------------------------------------ ANP

@pytest.fixture(scope="module")
def anp_run(poisoned, victim):
    return run_anp(poisoned, victim)  # the default: threshold chosen on a held-out slice of the clean data


def test_anp_prunes_the_backdoor_and_keeps_clean_accuracy(anp_run, poisoned, victim, tiny):
    ca0, asr0 = ca_asr(victim.model, poisoned, tiny)
    ca, asr = ca_asr(anp_run.model, poisoned, tiny)
    assert asr0 > 0.9 and asr < 0.2
    assert ca > 0.9 and ca0 - ca < 0.1
    info = anp_run.info
    assert anp_run.split is None and info["clean_source"] == "given" and info["clean"] == 400
    assert info["held_out"] == 40 and info["used"] == 360 and info["n_iter"] == 200
    # the largest threshold of the sweep within 10 % of the unpruned held-out accuracy
    ok = [t for t, n, acc in info["sweep"] if abs(acc - info["held_out_acc_unpruned"]) <
          0.1 * info["held_out_acc_unpruned"]]
    assert info["threshold"] == max(ok) and [t for t, _, _ in info["sweep"]][-1] == 0.9
    assert len(info["history"]) == 2 and anp_run.model.flip_tta == victim.model.flip_tta
    assert set(anp_run.timings) == {"mask_s", "prune_s"}


def test_anp_prunes_exactly_the_neurons_of_small_mask(anp_run, victim, tmp_path):
    info, state, orig = anp_run.info, anp_run.model.state_dict(), victim.model.state_dict()
    t = info["threshold"]
    assert 0 < info["pruned"] < info["neurons"] == 88
    for layer, m in info["masks"].items():
        m = torch.tensor(m)
        assert ((m >= 0) & (m <= 1)).all()
        small = m <= t
        assert torch.nonzero(small).flatten().tolist() == info["pruned_neurons"].get(layer, [])
        w = state[f"{layer}.weight"]
        assert (w[small] == 0).all() and torch.equal(w[~small], orig[f"{layer}.weight"][~small])
        assert torch.equal(state[f"{layer}.bias"], orig[f"{layer}.bias"])  # the shift is kept
    untouched = [k for k in orig if not any(k == f"{layer}.weight" for layer in info["masks"])]
    assert all(torch.equal(state[k], orig[k]) for k in untouched)  # no other tensor changed
    assert type(anp_run.model) is type(victim.model) and anp_run.model.cgd_spec == victim.model.cgd_spec
    assert not any(isinstance(m, anp.NoisyBatchNorm) for m in anp_run.model.modules())
    save_model(anp_run.model, tmp_path / "defended.safetensors")  # a plain network: saved and loaded as any
    loaded = load_model(tmp_path / "defended.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_anp_pruning_is_what_the_test_sees(poisoned, victim, tiny, monkeypatch):
    monkeypatch.setattr(anp, "prune_neurons", lambda model, masks, threshold: {})
    r = run_anp(poisoned, victim)  # masks learned, nothing pruned: the victim
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in r.model.state_dict().items())
    assert ca_asr(r.model, poisoned, tiny)[1] > 0.9  # the ASR assertion above would fail


def test_anp_adversarial_step_is_what_the_test_sees(poisoned, victim, tiny, monkeypatch):
    """At the paper's fixed threshold 0.2 the adversarially trained masks remove most of the backdoor; with the
    signed-gradient step patched out (the perturbation stays at its random start) they do not."""
    r = run_anp(poisoned, victim, threshold=0.2)
    assert r.info["selection"] == "fixed threshold" and r.info["used"] == 400 and r.info["held_out"] == 0
    assert ca_asr(r.model, poisoned, tiny)[0] > 0.95
    asr = ca_asr(r.model, poisoned, tiny)[1]
    real = anp.perturb_neurons
    monkeypatch.setattr(anp, "perturb_neurons", lambda model, ws, x, y, eps, steps, gen:
                        real(model, ws, x, y, eps, 0, gen))
    asr_random = ca_asr(run_anp(poisoned, victim, threshold=0.2).model, poisoned, tiny)[1]
    assert asr < 0.5 < 0.7 < asr_random


def test_anp_leaves_the_victim_alone_and_needs_clean_data(poisoned, victim):
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}
    seen = []
    r = defenses.get("anp", **{**ANP_TINY, "n_iter": 5}).run(
        poisoned.train, victim, defenses.Context(clean_indices=oracle(poisoned), log=seen.append,
                                                 extra_eval=lambda m: {"tta": m.flip_tta}))
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())
    assert r.info["eval"] == {"tta": victim.model.flip_tta} and any("anp: threshold" in s for s in seen)
    with pytest.raises(CGDError, match="clean-data defense"):
        defenses.get("anp").run(poisoned.train, victim, defenses.Context())


@pytest.mark.parametrize("bad, match", [
    ({"eps": -0.1}, "0 <= eps <= 1"), ({"eps": 2.0}, "0 <= eps <= 1"), ({"eps": float("nan")}, "eps must be"),
    ({"threshold": 1.5}, "threshold in"), ({"threshold": -0.2}, "threshold in"),
    ({"threshold": "low"}, "threshold must be"),
    ({"n_iter": 2.5}, "n_iter must be"), ({"steps": 0}, "steps >= 1"), ({"alpha": 1.2}, "alpha"),
    ({"pruning_step": 0}, "pruning_step"), ({"acc_ratio": 0}, "acc_ratio"), ({"holdout": 1.0}, "holdout"),
    ({"bn_stats": "train"}, "bn_stats batch|running"), ({"augment": "crop"}, "augment"), ({"lr": "fast"}, "lr must be"),
])
def test_anp_rejects_bad_params_in_one_line(bad, match):
    with pytest.raises(CGDError, match=match) as e:
        defenses.get("anp", **bad)
    assert str(e.value).startswith("anp: ") and "\n" not in str(e.value)


def test_threshold_grid_is_backdoorbenchs_sweep():
    grid = anp.threshold_grid(0.9, 0.05)
    assert len(grid) == 19 and grid[0] == 0 and grid[-1] == 0.9 and grid[4] == 0.2
    assert anp.threshold_grid(0.0, 0.05) == [0]


# ------------------------------------------------------------------------------------------------ ANP-SC

def test_anp_sc_prunes_with_cgds_split_clean(tiny, poisoned, tmp_path):
    assert isinstance(defenses.get("anp-sc", n_iter=5), anp.ANPSC)
    cfg = tiny_cfg(**{"defense.name": "anp-sc", "defense.params.n_iter": 20, "defense.params.batch_size": 64,
                      "defense.params.lr": 0.1})
    run = tmp_path / "run"
    m = defend(poisoned.train, cfg, run, guide=LabelGuide(tiny.train.labels), poison_mask=poisoned.poison_mask,
               poisoned=poisoned, test=tiny.test, log=lambda s: None)
    assert m["defense"] == "anp-sc" and m["clean_source"] == "split-clean" and m["clean"] == m["sizes"]["clean"]
    assert m["used"] + m["held_out"] == m["clean"] and m["detection"]["tpr"] > 0.5
    assert {"guide_s", "mask_s", "prune_s"} <= set(m["timings"]) and "asr" in m["after"]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS) and (run / "defended.safetensors").exists()

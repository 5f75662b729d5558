"""The pruning baselines (EP, FP, FP-SC) on tiny data: each test's signal depends on the defense's core step, and
the `*_core_step_is_what_the_test_sees` tests patch that step out and show the signal goes away."""

import json

import numpy as np
import pytest
import torch

from cgd import CGDError, cli, defenses
from cgd.data import save_npz
from cgd.defenses import pruning
from cgd.models import load_model, save_model
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.tensors import predict_logits

from conftest import LabelGuide
from test_pipeline import tiny_cfg


def triggered(poisoned, tiny, n=64):
    return poisoned.trigger(np.ascontiguousarray(tiny.test.images[:n]))


def oracle(poisoned, n=200):
    return np.flatnonzero(~poisoned.poison_mask)[:n]


# ------------------------------------------------------------------------------------------------ EP

def test_histogram_entropy():
    rng = np.random.default_rng(0)
    spread = torch.from_numpy(rng.normal(size=(1, 5000))).float()
    peaked = torch.cat([torch.zeros(1, 4990), torch.full((1, 10), 50.0)], 1)
    e = pruning.histogram_entropy(torch.cat([spread, peaked]), 0.1)
    assert e[0] > 3.0 > 0.1 > e[1] >= 0  # ~ log(1 / 0.1) + 1.42 for a standard normal; ~0 for a spike


def run_ep(poisoned, victim, u=0.5):
    return defenses.get("ep", u=u).run(poisoned.train, victim, defenses.Context())


def test_ep_prunes_low_entropy_bn_channels(poisoned, victim, tiny, tmp_path):
    r = run_ep(poisoned, victim)  # u = 3 flags none of this tiny net's few channels; a lower u flags some
    assert r.info["pruned"] > 0 and r.split is None
    bns = {n: m for n, m in r.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for name, idx in r.info["pruned_channels"].items():
        assert (bns[name].weight[idx] == 0).all() and (bns[name].bias[idx] == 0).all()
    x = triggered(poisoned, tiny)
    assert not np.allclose(predict_logits(r.model, x), predict_logits(victim.model, x))
    before = {k: v.clone() for k, v in victim.model.state_dict().items()}  # the victim is not modified
    run_ep(poisoned, victim)
    assert all(torch.equal(v, victim.model.state_dict()[k]) for k, v in before.items())
    save_model(r.model, tmp_path / "ep.safetensors")  # savable, and reloads to the same outputs
    assert np.allclose(predict_logits(load_model(tmp_path / "ep.safetensors"), x), predict_logits(r.model, x))
    assert run_ep(poisoned, victim, u=3.0).info["u"] == 3.0


def test_ep_core_step_is_what_the_test_sees(poisoned, victim, tiny, monkeypatch):
    monkeypatch.setattr(pruning, "prune_bn_channels", lambda model, flagged: 0)
    r = run_ep(poisoned, victim)
    x = triggered(poisoned, tiny)
    assert np.allclose(predict_logits(r.model, x), predict_logits(victim.model, x))  # the EP test would fail


# ------------------------------------------------------------------------------------------------ FP

def run_fp(poisoned, victim, **params):
    return defenses.get("fp", **{"epochs": 3, **params}).run(
        poisoned.train, victim, defenses.Context(clean_indices=oracle(poisoned)))


@pytest.mark.parametrize("name, given, says", [
    ("fp", [3], "1 trusted clean samples .given., fewer than the 2"), ("i-bau", [], "0 trusted clean samples"),
    ("fp", [1, 1, 2], "distinct"), ("i-bau", [0, 10 ** 6], "distinct sample indices"),
    ("i-bau", [[1, 2]], "distinct")])
def test_clean_data_defenses_check_the_indices_they_are_given(poisoned, victim, name, given, says):
    """Given indices are held to what a defense needs before any work: at least `min_clean`, distinct, in range."""
    with pytest.raises(CGDError, match=says):
        defenses.get(name).run(poisoned.train, victim, defenses.Context(clean_indices=np.array(given, np.int64)))


def test_fp_prunes_then_finetunes(poisoned, victim, tiny):
    r = run_fp(poisoned, victim)
    head = r.model.head.weight
    dead = (head == 0).all(0)
    assert r.info["pruned"] > 0 and int(dead.sum()) == r.info["pruned"]  # fine-tuning kept them pruned
    assert r.info["clean_source"] == "given" and r.info["held_out"] == 20
    assert len(r.info["finetune_loss"]) == 3
    # fine-tuned: the unpruned weights moved away from the victim's
    assert not torch.allclose(r.model.stem[0].weight, victim.model.stem[0].weight)
    x = triggered(poisoned, tiny)
    assert not np.allclose(predict_logits(r.model, x), predict_logits(victim.model, x))


def test_fp_core_steps_are_what_the_test_sees(poisoned, victim, tiny, monkeypatch):
    # without fine-tuning the early layers stay the victim's
    r = run_fp(poisoned, victim, epochs=0)
    assert torch.allclose(r.model.stem[0].weight, victim.model.stem[0].weight)
    # without pruning no head column is zero
    # every pruning level "fails" the held-out check
    monkeypatch.setattr(pruning, "masked_accuracy", lambda model, f, y, keep: float(keep.all()))
    r = run_fp(poisoned, victim)
    assert r.info["pruned"] == 0 and not (r.model.head.weight == 0).all(0).any()


def test_fp_needs_clean_data(poisoned, victim):
    with pytest.raises(Exception, match="clean-data defense"):
        defenses.get("fp").run(poisoned.train, victim, defenses.Context())


def test_cgd_recheck_moves_what_the_first_pass_unfitted_and_unlearns_again(tiny, poisoned, victim):
    """With `split.recheck` the first split's D_p is kept, the samples outside it whose label lost its fit join it,
    and unlearning runs again on that split."""
    from cgd.defenses.guided import CGD
    from cgd.split import SplitConfig
    from cgd.unlearn import recipe

    guide = LabelGuide(tiny.train.labels, accuracy=0.6)
    cgd = CGD(guide, split=SplitConfig(recheck=1e-6, refine_rounds=0, purify=0.0), unlearn=recipe("cpu", min_steps=8))
    first, _ = cgd.split_data(poisoned.train, victim, defenses.Context(), {})
    r = cgd.run(poisoned.train, victim, defenses.Context())
    moved = r.info["recheck"]["moved"]
    assert set(first.poison) <= set(r.split.poison) and len(r.split.poison) - len(first.poison) == moved > 0
    assert r.timings["recheck_s"] > 0 and sum(r.split.sizes().values()) == len(poisoned.train)


def test_fp_sc_trains_on_cgds_split_clean(tiny, poisoned, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "fp-sc", "defense.params.epochs": 2})
    run = tmp_path / "run"
    m = defend(poisoned.train, cfg, run, guide=LabelGuide(tiny.train.labels), poison_mask=poisoned.poison_mask,
               poisoned=poisoned, test=tiny.test, log=lambda s: None)
    assert m["clean_source"] == "split-clean" and m["clean"] == m["sizes"]["clean"] == m["used"]
    assert m["detection"]["tpr"] > 0.5 and "guide_s" in m["timings"] and "finetune_s" in m["timings"]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS)
    capped = defend(poisoned.train, tiny_cfg(**{"defense.name": "fp-sc", "defense.params.epochs": 1,
                                                "defense.params.max_clean": 50}), tmp_path / "capped",
                    guide=LabelGuide(tiny.train.labels), poison_mask=poisoned.poison_mask, poisoned=poisoned,
                    test=tiny.test, log=lambda s: None)
    assert capped["used"] == 50 < capped["clean"] and capped["held_out"] == 5  # the budget's cap, then the slice
    assert defenses.get("fp-sc").max_clean == 10_000 and defenses.get("fp", max_clean=0).max_clean is None


# ------------------------------------------------------------------------------------------------ runs

def test_ep_run_directory_has_no_split_files_and_resumes(tiny, poisoned, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "ep", "defense.params.u": 0.5})
    run = tmp_path / "run"
    m = defend(poisoned.train, cfg, run, poison_mask=poisoned.poison_mask, poisoned=poisoned, test=tiny.test,
               log=lambda s: None)
    assert m["defense"] == "ep" and m["pruned"] > 0 and m["detection"] == {} and m["sizes"] == {}
    assert not any((run / f).exists() for f in SPLIT_OUTPUTS)
    assert "EP run" in (run / "report.md").read_text()
    said = []
    assert defend(poisoned.train, cfg, run, log=said.append) == m  # finished: nothing to do
    assert any("nothing to do" in s for s in said)


def test_cli_defend_ep(tiny, tmp_path, capsys):
    save_npz(tiny, tmp_path / "clean.npz")
    assert cli.main(["attack", "--data", str(tmp_path / "clean.npz"), "--attack", "badnets", "--rate", "0.1",
                     "--out", str(tmp_path / "bad.npz")]) == 0
    capsys.readouterr()
    sets = ["victim.epochs=3", "victim.batch_size=64", "victim.snapshot_epoch=2", "victim.augment=none",
            "victim.arch_params.stem=8", "defense.params.u=0.5"]
    code = cli.main(["defend", "--data", str(tmp_path / "bad.npz"), "--defense", "ep", "--out",
                     str(tmp_path / "run"), *sum((["--set", s] for s in sets), [])])
    out = capsys.readouterr().out
    assert code == 0 and "report:" in out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["defense"] == "ep" and m["pruned"] > 0 and (tmp_path / "run" / "defended.safetensors").exists()
    assert load_model(tmp_path / "run" / "defended.safetensors") is not None


def test_baseline_cell_is_written_once(tiny, tmp_path):
    from cgd.bench import oracle_clean, run_baseline

    save_npz(tiny, tmp_path / "clean.npz")
    cfg = tiny_cfg(**{"defense.params.epochs": 1, "attack.rate": 0.1})
    out = run_baseline("badnets", "fp", cfg, tmp_path / "bench", str(tmp_path / "clean.npz"), oracle=0.1,
                       log=lambda s: None)
    cell = json.loads(out.read_text())
    assert out.name.endswith("-badnets-fp-oracle.json") and cell["defense"] == "fp-oracle"
    assert {"ca", "asr", "clean_to_target", "wall_s", "cpu_s"} <= set(cell) and cell["cpu_s"] > 0
    assert "oracle" in cell["clean_data"] and cell["info"]["clean"] == 80
    assert run_baseline("badnets", "fp", cfg, tmp_path / "bench", str(tmp_path / "clean.npz"), oracle=0.1,
                        log=lambda s: None) == out
    mask = np.zeros(100, bool)
    mask[:50] = True
    assert (oracle_clean(mask, 0.1) >= 50).all() and len(oracle_clean(mask, 0.1)) == 10

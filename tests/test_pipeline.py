import copy
import json

import numpy as np
import pytest

from cgd import CGDError, attacks
from cgd.config import apply_overrides, defaults, dumps_toml, explicit, load_config
from cgd.pipeline import OUTPUTS, defend
from cgd.unlearn import RECIPES

from conftest import LabelGuide


def tiny_cfg(**over):
    cfg = defaults()
    cfg["victim"].update(epochs=4, batch_size=64, lr=0.2, snapshot_epoch=2, augment="none",
                         arch_params={"widths": [8, 16, 16], "stem": 8})
    cfg["unlearn"]["overrides"] = {"epochs": 2, "batch_size": 64}
    return apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])


def test_defend_writes_the_run_directory_and_resumes(tiny, poisoned, tmp_path):
    guide = LabelGuide(tiny.train.labels)
    run = tmp_path / "run"
    m = defend(poisoned.train, tiny_cfg(), run, guide=guide, poison_mask=poisoned.poison_mask, poisoned=poisoned,
               test=tiny.test, log=lambda s: None)
    for f in OUTPUTS + ("config.toml",):
        assert (run / f).exists(), f
    rows = (run / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("index,label,guide_nll,model_nll") and len(rows) == len(tiny.train) + 1
    assert m["detection"]["tpr"] > 0.5  # the stand-in guide sees the relabelled images
    assert set(m["before"]) == {"ca", "asr", "clean_to_target", "target_recall"} and m["timings"]["unlearn_s"] > 0
    split = json.loads((run / "split.json").read_text())
    assert sum(split["sizes"].values()) == len(tiny.train)
    assert "CA after" in (run / "report.md").read_text()
    assert (run / "entropy_map.png").read_bytes()[:4] == b"\x89PNG"
    # the same command again does nothing (not even scoring)
    calls = guide.calls
    assert defend(poisoned.train, tiny_cfg(), run, guide=guide, log=lambda s: None) == json.loads(
        (run / "metrics.json").read_text())
    assert guide.calls == calls


def test_the_trigger_check_is_in_the_metrics_and_the_report(tiny, poisoned, tmp_path):
    m = defend(poisoned.train, tiny_cfg(**{"unlearn.overrides.escalate": 1}), tmp_path / "run",
               guide=LabelGuide(tiny.train.labels), poison_mask=poisoned.poison_mask, log=lambda s: None)
    checks = m["trigger_check"]
    assert 1 <= len(checks) <= 2 and checks[0]["target"] == 0 and 0 <= checks[0]["response"] <= 1
    assert "trigger check" in (tmp_path / "run" / "report.md").read_text()


def test_empty_clean_class_leaves_no_outputs(tiny, tmp_path):
    ps = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(tiny.train)
    labels = ps.train.labels
    guide = LabelGuide(tiny.train.labels)
    # a guide that flags every sample of class 3 as mislabelled: D_c holds no class 3
    bad = guide.class_logits(ps.train.images, ps.train.class_names)
    bad[labels == 3, 3] = -50.0

    class Flagger:
        id = "flagger"

        def class_logits(self, images, names):
            return bad

    run = tmp_path / "run"
    with pytest.raises(CGDError, match=r"class\(es\) \[3\] have no training sample outside"):
        defend(ps.train, tiny_cfg(**{"split.sigma1": 0.3, "split.sigma2": 0.3, "split.refine_rounds": 0}), run, guide=Flagger(),
               log=lambda s: None)
    assert not any((run / f).exists() for f in OUTPUTS)


def test_nan_guide_is_a_clear_error(tiny, tmp_path):
    class Broken:
        id = "broken"

        def class_logits(self, images, names):
            return np.full((len(images), len(names)), np.nan, np.float32)

    with pytest.raises(CGDError, match="NaN"):
        defend(tiny.train, tiny_cfg(), tmp_path / "r", guide=Broken(), log=lambda s: None)
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_config_errors_before_any_file_is_written(tiny, tmp_path):
    with pytest.raises(CGDError, match="unknown setting 'epochz'"):
        apply_overrides(defaults(), ["victim.epochz=3"])
    cfg = tiny_cfg()
    cfg["unlearn"]["recipe"] = "magic"
    with pytest.raises(CGDError, match="unknown unlearning recipe"):
        defend(tiny.train, cfg, tmp_path / "r", guide=LabelGuide(tiny.train.labels), log=lambda s: None)
    assert not (tmp_path / "r").exists()
    (tmp_path / "c.toml").write_text("[unlearn]\nrecipe = 'paper'\n[victim]\nepochs = 2\n")
    c = load_config(tmp_path / "c.toml")
    assert c["unlearn"]["recipe"] == "paper" and c["victim"]["epochs"] == 2 and c["split"]["sigma1"] == 0.2
    (tmp_path / "d.yaml").write_text("split:\n  sigma1: 0.3\n")
    assert load_config(tmp_path / "d.yaml")["split"]["sigma1"] == 0.3


def test_defend_a_given_model_without_history(tiny, poisoned, tmp_path):
    """A user's own model has no recorded losses: the split falls back to the model's own NLL."""
    from cgd import models
    from cgd.train import TrainConfig, train

    torch_model = models.get("fastnet", num_classes=4, widths=(8, 16, 16), stem=8)
    trained = train(torch_model, poisoned.train.images, poisoned.train.labels,
                    TrainConfig(epochs=2, batch_size=64, lr=0.2, augment="none")).model
    models.save_model(trained, tmp_path / "m.safetensors")
    logs = []
    m = defend(poisoned.train, tiny_cfg(), tmp_path / "run", guide=LabelGuide(tiny.train.labels),
               model_path=tmp_path / "m.safetensors", poison_mask=poisoned.poison_mask, log=logs.append)
    assert any("final model" in line for line in logs)
    assert "victim_train_s" not in m["timings"] and (tmp_path / "run" / "defended.safetensors").exists()


def test_explicit_config_changes_when_a_recipe_definition_does(monkeypatch):
    cfg = defaults()
    before = dumps_toml(explicit(cfg))
    assert explicit(cfg)["unlearn"]["overrides"]["lambda_un"] == RECIPES["cpu"]["lambda_un"]
    monkeypatch.setitem(RECIPES, "cpu", {**RECIPES["cpu"], "lambda_un": 0.5})
    assert dumps_toml(explicit(cfg)) != before  # same recipe name, new definition: not the same run
    assert cfg["unlearn"]["overrides"] == {}  # the input is not modified


def test_an_unlearning_seed_of_its_own_is_another_run():
    cfg = defaults()
    seeded = copy.deepcopy(cfg)
    seeded["unlearn"]["overrides"]["seed"] = 2  # another held-out slice and batch order, same victim
    assert "seed" not in explicit(cfg)["unlearn"]["overrides"]  # the top-level seed speaks for it
    assert explicit(seeded)["unlearn"]["overrides"]["seed"] == 2 and dumps_toml(explicit(seeded)) != dumps_toml(explicit(cfg))


def test_an_explicit_config_loads_back_to_the_same_run(tmp_path):
    text = dumps_toml(explicit(defaults()))
    (tmp_path / "c.toml").write_text(text)
    assert dumps_toml(explicit(load_config(tmp_path / "c.toml"))) == text


def test_pipeline_does_not_import_the_attacks():
    """Defending needs only `PoisonedSet` (cgd.poisoned): `import cgd.pipeline` loads no attack module."""
    import subprocess
    import sys
    code = "import sys, cgd.pipeline; print(sorted(m for m in sys.modules if m.startswith('cgd.attacks')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out

"""The array-level API: `cgd.find_poison` reproduces `cgd defend`'s split from arrays alone, documents every
option, and says what it skipped; `cgd.LossRecorder` records a user's own training loop; docs/api.md runs."""

from __future__ import annotations

import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cgd
from cgd import CGDError, attacks
from cgd.io import load_arrays
from cgd.pipeline import defend
from cgd.unlearn import UnlearnConfig, recipe

from conftest import LabelGuide
from test_pipeline import tiny_cfg

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_find_poison_on_a_finished_runs_arrays_returns_the_runs_split(tiny, tmp_path):
    ps = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(tiny.train)
    cfg = tiny_cfg(**{"split.neighbours": 10})
    defend(ps.train, cfg, tmp_path / "run", guide=LabelGuide(tiny.train.labels), log=lambda s: None)
    work = tmp_path / "run" / ".work"
    arrays = {name: next(iter(load_arrays(work / f"{name}.safetensors").values()))
              for name in ("guide_logits", "guide_features", "model_features")}
    history = load_arrays(work / "victim" / "loss_history.safetensors")["loss"]
    s = cgd.find_poison(ps.train.labels, arrays["guide_logits"], history, guide_features=arrays["guide_features"],
                        model_features=arrays["model_features"], neighbours=10, seed=cfg["seed"])
    run = json.loads((tmp_path / "run" / "split.json").read_text())
    assert s.clean.tolist() == run["clean"] and s.poison.tolist() == run["poison"] and run["poison"]
    assert s.info["model_score"] == run["model_score"] and s.info["skipped"] == []


def test_find_poison_documents_every_option():
    doc = inspect.getdoc(cgd.find_poison)
    params = doc.split("Parameters\n----------\n")[1].split("Returns\n-------")[0]
    documented = set()
    for line in params.splitlines():
        if line and not line.startswith(" "):
            documented |= {n.strip() for n in line.split(":")[0].split(",")}
    sig = inspect.signature(cgd.find_poison)
    assert documented == set(sig.parameters)
    assert all(p.kind is p.KEYWORD_ONLY for name, p in sig.parameters.items()
               if name not in ("labels", "guide_logits", "model_losses"))
    # its defaults are SplitConfig's (None: the recipe's), so the two cannot drift apart
    from cgd.split import SplitConfig
    for name, value in SplitConfig().to_dict().items():
        if name in sig.parameters:
            assert sig.parameters[name].default in (value, None), name


def test_find_poison_without_features_says_what_it_skipped_and_takes_one_nll(tiny):
    y = tiny.train.labels
    g = LabelGuide(y).class_logits(tiny.train.images, tiny.train.class_names)
    nll = np.random.default_rng(0).random(len(y))
    s = cgd.find_poison(y, g, nll)
    assert s.info["model_score"] == "given NLL"
    assert any("probe" in m for m in s.info["skipped"]) and any("purification" in m for m in s.info["skipped"])
    paper = cgd.find_poison(y, g, nll, recipe="paper")
    assert paper.info["skipped"] == [] and paper.clean.tolist() == s.clean.tolist()
    with pytest.raises(CGDError, match=r"model_losses must be \(epochs, N\) or \(N,\)"):
        cgd.find_poison(y, g, nll[:10])
    with pytest.raises(CGDError, match="epochs must lie in 1..1"):
        cgd.find_poison(y, g, nll[None], window=(1, 3))


def test_loss_recorder_rolls_epochs_and_refuses_gaps():
    rec = cgd.LossRecorder(4)
    for epoch in range(3):
        rec.update([2, 0], np.array([epoch, epoch], float))
        rec.update(np.array([1, 3]), [epoch + 0.5, epoch + 0.5])
    assert rec.history.tolist() == [[0, 0.5, 0, 0.5], [1, 1.5, 1, 1.5], [2, 2.5, 2, 2.5]]
    rec.update([0, 1, 2], [9, 9, 9])  # a fourth epoch missing sample 3 (drop_last)
    rec.end_epoch()
    with pytest.raises(CGDError, match="epoch 4 has no loss for 1 samples"):
        rec.history
    with pytest.raises(CGDError, match="one loss per index"):
        rec.update([0, 7], [1.0, 1.0])


def test_the_examples_in_docs_api_md_run(tmp_path, monkeypatch):
    """Every block of docs/api.md, in order, in a fresh folder: the Python ones in one namespace each, the shell
    command through the installed `cgd`."""
    text = DOCS.read_text()
    python = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    shell = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(python) == 4 and len(shell) == 1
    monkeypatch.chdir(tmp_path)
    for n, block in enumerate(python, 1):
        exec(compile(block, f"{DOCS}:example {n}", "exec"), {})
    cgd_bin = Path(sys.executable).with_name("cgd")
    run = subprocess.run([str(cgd_bin), *shlex.split(shell[0])[1:]], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "my_data" / "metrics.json").read_text())
    assert metrics["defense"] == "cgd" and metrics["sizes"]["clean"] > 0 and "ca" in metrics["after"]


@pytest.mark.parametrize("module, some", [("attacks", "badnets"), ("guides", "imagenet-text"), ("models", "fastnet"),
                                          ("purifiers", "par")])
def test_every_registry_lists_alike_with_a_filter_and_a_summary_each(module, some):
    import importlib

    mod = importlib.import_module(f"cgd.{module}")
    with pytest.raises(CGDError, match="no_such_param"):
        mod.get(some, no_such_param=1)  # one clear error, not a TypeError from the constructor
    every = mod.list()
    assert some in every and list(every) == sorted(every)
    assert all(isinstance(v, str) and v and "\n" not in v for v in every.values())  # a one-line summary each
    assert mod.list(some) == {some: every[some]} and mod.list("no-such-*") == {}
    assert set(mod.list(some[:2] + "*")) == {n for n in every if n.startswith(some[:2])}


class UsersNet(torch.nn.Module):
    """A user's own classifier: its own layer names and its own input normalisation (ImageNet's), which it checks
    (a model fed cgd's normalisation, or raw [0, 1] pixels, would fail here)."""

    MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def __init__(self, classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
        self.head = torch.nn.Linear(256, classes)
        self.seen_normalised = 0

    def forward(self, x):
        lo, hi = ((0 - self.MEAN) / self.STD).min(), ((1 - self.MEAN) / self.STD).max()
        assert x.min() >= lo - 1e-4 and x.max() <= hi + 1e-4 and x.min() < -0.5, "not ImageNet-normalised input"
        self.seen_normalised += 1
        return self.head(self.body(x))


def users_loop(images, labels, classes, epochs=8):
    """The user's own training loop, with the two lines that record the loss history."""
    torch.manual_seed(0)
    model = UsersNet(classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = (torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255 - UsersNet.MEAN) / UsersNet.STD
    y = torch.from_numpy(np.array(labels))
    recorder = cgd.LossRecorder(len(x))
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            losses = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
            recorder.update(idx, losses)
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
    return model, recorder.history


def test_defend_takes_a_users_own_module_and_normalisation(tiny):
    ps = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(tiny.train)
    model, history = users_loop(ps.train.images, ps.train.labels, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    normalise = lambda x: (x - UsersNet.MEAN) / UsersNet.STD  # noqa: E731 - the user's own preprocessing
    lines = []
    r = cgd.defend(model, ps.train.images, ps.train.labels, ps.train.class_names, guide=LabelGuide(tiny.train.labels),
                   loss_history=history, preprocess=normalise, features="head", unlearn=recipe("cpu", epochs=3),
                   log=lines.append)
    assert type(r.model) is UsersNet and r.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    assert any(not torch.equal(before[k], v) for k, v in r.model.state_dict().items())
    assert r.info["skipped"] == [] and r.info["model_score"].startswith("history:")  # features and history used
    caught = np.isin(np.flatnonzero(ps.poison_mask), r.split.poison).mean()
    assert caught > 0.6, caught
    # the defence reached the user's module through the user's normalisation (UsersNet asserts it on every call)
    assert model.seen_normalised > 0 and r.model.seen_normalised > model.seen_normalised


def test_defend_without_history_or_features_falls_back_and_says_so(tiny):
    model, _ = users_loop(tiny.train.images, tiny.train.labels, 4, epochs=1)
    lines = []
    r = cgd.defend(model, tiny.train.images, tiny.train.labels, tiny.train.class_names,
                   guide=LabelGuide(tiny.train.labels), preprocess=lambda x: (x - UsersNet.MEAN) / UsersNet.STD,
                   unlearn=UnlearnConfig(epochs=1), log=lines.append)
    assert r.info["model_score"] == "final" and any("purification" in m for m in r.info["skipped"])
    assert any("without a training-loss history" in line for line in lines)
    with pytest.raises(CGDError, match="no submodule of that name"):
        cgd.defend(model, tiny.train.images, tiny.train.labels, tiny.train.class_names, features="fc")
    with pytest.raises(CGDError, match="expected logits over the 3 class_names"):
        cgd.defend(model, tiny.train.images, tiny.train.labels % 3, tiny.train.class_names[:3],
                   guide=LabelGuide(tiny.train.labels), preprocess=lambda x: (x - UsersNet.MEAN) / UsersNet.STD)


def test_defend_hands_the_groups_to_the_split_and_the_hold_out(tiny, monkeypatch):
    from cgd.defenses import guided

    seen = {}
    for name in ("split_by", "unlearn_checked"):
        def spy(*args, _real=getattr(guided, name), _name=name, **kwargs):
            seen[_name] = kwargs.get("groups")
            return _real(*args, **kwargs)
        monkeypatch.setattr(guided, name, spy)
    groups = np.arange(len(tiny.train)) // 4  # e.g. GTSRB's tracks
    model, _ = users_loop(tiny.train.images, tiny.train.labels, 4, epochs=1)
    cgd.defend(model, tiny.train.images, tiny.train.labels, tiny.train.class_names, guide=LabelGuide(tiny.train.labels),
               preprocess=lambda x: (x - UsersNet.MEAN) / UsersNet.STD, unlearn=UnlearnConfig(epochs=1), groups=groups)
    assert (seen["split_by"] == groups).all() and (seen["unlearn_checked"] == groups).all()


def test_every_defense_runs_from_the_registry_alike():
    import cgd.defenses

    every = cgd.defenses.list()
    assert "cgd" in every and all(every.values())
    assert cgd.defenses.get("cgd", guide=LabelGuide(np.zeros(1, int))).name == "cgd"


def test_the_config_names_the_defense_and_cgd_refuses_params_it_does_not_take(tiny, tmp_path):
    cfg = tiny_cfg(**{"defense.name": "no-such"})
    with pytest.raises(CGDError, match="unknown defense 'no-such'; available: .*cgd"):
        defend(tiny.train, cfg, tmp_path / "a", guide=LabelGuide(tiny.train.labels), log=lambda s: None)
    cfg = tiny_cfg(**{"defense.params.sigma1": 0.3})
    with pytest.raises(CGDError, match="CGD takes its settings from the guide, split and unlearn sections"):
        defend(tiny.train, cfg, tmp_path / "b", guide=LabelGuide(tiny.train.labels), log=lambda s: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before touching the disk

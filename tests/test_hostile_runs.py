"""Hostile and awkward runs: output folders that cannot be written, disks that fill up, run names that look like
markup, training sets too small to split. Each refusal is one line, comes before any training, and leaves no
partial outputs; the benign cases succeed whole."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from cgd import CGDError, cli, guides, io
from cgd.data import Dataset, ImageSet, save_npz
from cgd.pipeline import OUTPUTS

from conftest import NAMES, LabelGuide, synthetic
from hostile import Sandbox, assert_refused, run_cli

TINY_RUN = ["--set", "victim.epochs=3", "--set", "victim.batch_size=64", "--set", "victim.snapshot_epoch=2",
            "--set", "victim.augment='none'", "--set", "victim.arch_params={widths=[8,16,16],stem=8}",
            "--set", "unlearn.overrides={min_steps=4}"]


def write_npz(path, train: ImageSet, test: ImageSet | None = None, **extra):
    save_npz(Dataset(train, test if test is not None else synthetic(40, 9)), path, **extra)
    return path


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """One cache shared by the CLI cases that run the real guide, so it is built once."""
    return tmp_path_factory.mktemp("shared-cache")


# ------------------------------------------------------------------------------------- refused before any work

@pytest.mark.parametrize("make, needle", [
    (lambda: ImageSet(np.zeros((0, 16, 16, 3), np.uint8), np.zeros(0, np.int64), list(NAMES)),
     "the training set is empty"),
    (lambda: ImageSet(synthetic(80, 0).images, np.full(80, 2, np.int64), list(NAMES)),
     "every training label is 'blue'"),
    (lambda: synthetic(30, 0), "too few training samples in class(es)"),
    (lambda: synthetic(80, 0, size=4), "the victim network fastnet (victim.arch) needs at least 8x8 px"),
])
def test_training_sets_too_small_are_refused_before_training(tmp_path, make, needle):
    box = Sandbox(tmp_path)
    data = write_npz(box.work / "d.npz", make())
    res = run_cli(box, "defend", "--data", str(data), "--out", "run")
    assert_refused(res, "defend", needle, box=box, run_dir=box.work / "run")
    assert not (box.work / "run").exists()  # not even a victim checkpoint


def test_too_few_samples_for_the_neighbours_names_the_setting(tmp_path, tiny):
    with pytest.raises(CGDError, match=r"split.neighbours=50 needs more than 50 .* split.purify=0"):
        from cgd.config import apply_overrides, defaults
        from cgd.pipeline import defend
        defend(tiny.train.subset(np.arange(48)), apply_overrides(defaults(), ["split.neighbours=50"]),
               tmp_path / "run", guide=LabelGuide(tiny.train.labels[:48]), log=lambda s: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, needle", [
    ("split.sigma1=0.7", "split.sigma1 must be a number in [0, 0.5]"),
    ("split.sigma2='a lot'", "split.sigma2 must be a number"),
    ("split.purify=-1", "split.purify must be a number in [0, 1]"),
    ("split.neighbours=2.5", "split.neighbours must be an integer"),
    ("split.model_score='history:4-2'", "split.model_score history:A-B needs epochs 1 ≤ A ≤ B; got (4, 2)"),
    ("split.model_score='newest'", "unknown split.model_score 'newest'"),
    ("split.model_score='history:2-40'", "reaches past the victim's 12 epochs"),
])
def test_bad_split_settings_are_refused_before_training(tmp_path, tiny, setting, needle, capsys):
    data = write_npz(tmp_path / "d.npz", tiny.train, tiny.test)
    code = cli.main(["defend", "--data", str(data), "--out", str(tmp_path / "run"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused(tmp_path, tiny):
    box = Sandbox(tmp_path)
    data = write_npz(box.work / "d.npz", tiny.train, tiny.test)
    (box.work / "run").write_text("my notes")
    res = run_cli(box, "defend", "--data", str(data), "--out", "run")
    assert_refused(res, "defend", "run folder run is a file, not a folder", box=box)
    assert (box.work / "run").read_text() == "my notes"


def test_attack_out_that_is_a_folder_is_refused(tmp_path, tiny):
    box = Sandbox(tmp_path)
    data = write_npz(box.work / "d.npz", tiny.train, tiny.test)
    (box.work / "bad.npz").mkdir()
    res = run_cli(box, "attack", "--data", str(data), "--out", "bad.npz")
    assert_refused(res, "attack", "is a folder", box=box)


def test_read_only_run_folder_is_one_line(tmp_path, tiny, monkeypatch, capsys):
    """EROFS as the disk would say it (patched: the tests run as root, which ignores permission bits)."""
    data = write_npz(tmp_path / "d.npz", tiny.train, tiny.test)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    code = cli.main(["defend", "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("cgd defend: error: cannot write into run folder"), err
    assert "Read-only file system" in err[-1]


# ---------------------------------------------------------------------------------------- all-or-nothing outputs

@pytest.fixture
def label_guide(monkeypatch, tiny):
    """The real guide is not what these cases are about: a stand-in keeps them in-process and fast."""
    monkeypatch.setattr(guides, "get", lambda name, **p: LabelGuide(tiny.train.labels))


@pytest.mark.parametrize("nth", [1, 4, 7, 8])
def test_a_full_disk_while_writing_outputs_leaves_none_and_the_rerun_finishes(tmp_path, tiny, label_guide,
                                                                               monkeypatch, capsys, nth):
    data = write_npz(tmp_path / "d.npz", tiny.train, tiny.test)
    run = tmp_path / "run"
    argv = ["defend", "--data", str(data), "--out", str(run), *TINY_RUN]
    real = io.tempfile.mkstemp
    calls = []

    def fill_up(*a, dir=None, **k):  # every atomic write creates its file through mkstemp
        if ".staging-" in str(dir):
            calls.append(dir)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, "No space left on device", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(io.tempfile, "mkstemp", fill_up)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) >= nth, "the patch never fired: fewer outputs than expected"
    assert code == 1 and err[-1].startswith("cgd defend: error: ") and "No space left on device" in err[-1]
    assert not [f for f in OUTPUTS if (run / f).exists()]
    assert not list((run / ".work").glob(".staging-*"))
    monkeypatch.setattr(io.tempfile, "mkstemp", real)
    assert cli.main(argv) == 0  # resumes from .work and writes the whole set
    capsys.readouterr()
    assert all((run / f).exists() for f in OUTPUTS)


def test_attack_writes_both_files_or_neither(tmp_path, tiny, monkeypatch, capsys):
    data = write_npz(tmp_path / "d.npz", tiny.train, tiny.test)
    real = io.tempfile.mkstemp

    def second_fails(*a, prefix="", **k):
        if prefix.startswith(".bad-asr.npz"):
            raise OSError(errno.ENOSPC, "No space left on device", prefix)
        return real(*a, prefix=prefix, **k)

    monkeypatch.setattr(io.tempfile, "mkstemp", second_fails)
    code = cli.main(["attack", "--data", str(data), "--out", str(tmp_path / "bad.npz")])
    assert code == 1 and "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]


def test_an_empty_test_set_gives_valid_json(tmp_path, tiny, label_guide, capsys):
    data = write_npz(tmp_path / "d.npz", tiny.train, tiny.test.subset(np.arange(0)))
    run = tmp_path / "run"
    assert cli.main(["defend", "--data", str(data), "--out", str(run), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[:out.rindex("}") + 1], parse_constant=lambda c: pytest.fail(f"{c} in stdout"))
    assert printed["before"]["ca"] is None
    json.loads((run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


# ------------------------------------------------------------------------------------------ benign, succeed whole

def test_a_run_name_with_markup_succeeds_and_writes_only_the_run_and_cache(tmp_path, warm_cache):
    """`$...$` once crashed the plot's TeX parser after the whole pipeline; class names that look like paths or
    shell write nothing anywhere; the real guide also shows that ONNX Runtime and matplotlib keep their files out
    of the home folder."""
    box = Sandbox(tmp_path, cache=warm_cache)
    names = ["../../evil", "$(touch pwned)", "`id`", "a/b"]  # class names reach the guide's prompts and reports
    rename = lambda s: ImageSet(s.images, s.labels, names)  # noqa: E731
    data = write_npz(box.work / "d.npz", rename(synthetic(120, 0)), rename(synthetic(40, 1)))
    name = "run $x^2$ `id` $(id)"
    res = run_cli(box, "defend", "--data", str(data), "--out", name, *TINY_RUN)
    assert res.code == 0, res.err
    run = box.work / name
    assert all((run / f).exists() for f in OUTPUTS)
    stray = [p for p in res.written if not p.is_relative_to(run)]
    assert not stray, stray
    assert not any((box.root / "home").iterdir())
    assert json.loads((run / "defended.safetensors.json").read_text())["class_names"] == names


def test_a_small_dataset_whose_class_drops_out_of_the_clean_subset_still_runs(tmp_path, tiny):
    """With few images per class, a guide that doubts a whole small class can leave it out of D_c (here: class 1,
    10 % of the data, ranked just below the most doubted 10 %); the split tops it up from its most trusted mixed
    samples instead of failing in the probe or in relearning."""
    from cgd.config import defaults
    from cgd.pipeline import defend

    labels = tiny.train.labels
    keep = np.sort(np.concatenate([np.flatnonzero(labels != 1)[:180], np.flatnonzero(labels == 1)[:20]]))
    ds = tiny.train.subset(keep)
    y = ds.labels
    logits = np.zeros((len(y), len(NAMES)), np.float32)
    logits[np.arange(len(y)), y] = 5 + np.random.default_rng(0).random(len(y))
    logits[y == 1, 1] = 1.0  # doubted, but less than ...
    logits[np.flatnonzero(y == 0)[:20], 0] = -5.0  # ... these, which fill D_p's guide side

    class Doubter(LabelGuide):
        def class_logits(self, images, names):
            return logits

    cfg = defaults()
    cfg["victim"].update(epochs=3, batch_size=64, snapshot_epoch=2, augment="none",
                         arch_params={"widths": [8, 16, 16], "stem": 8})
    cfg["unlearn"]["overrides"] = {"min_steps": 4}
    m = defend(ds, cfg, tmp_path / "run", guide=Doubter(y), log=lambda s: None)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert set(y[split["clean"]]) == {0, 1, 2, 3} and m["sizes"]["clean"] == len(split["clean"])


def test_other_data_at_the_same_out_starts_over_instead_of_reusing_the_last_run(tmp_path, tiny):
    from cgd import attacks
    from cgd.config import apply_overrides, defaults
    from cgd.pipeline import defend

    cfg = apply_overrides(defaults(), ["victim.epochs=3", "victim.batch_size=64", "victim.snapshot_epoch=2",
                                       "victim.augment='none'", "victim.arch_params={widths=[8,16,16],stem=8}",
                                       "unlearn.overrides={min_steps=4}"])
    a = attacks.get("badnets", target=0, rate=0.1, seed=0).poison(tiny.train).train
    b = attacks.get("blend", target=1, rate=0.1, seed=0).poison(tiny.train).train
    logs = []
    defend(a, cfg, tmp_path / "run", guide=LabelGuide(tiny.train.labels), log=logs.append)
    m = defend(b, cfg, tmp_path / "run", guide=LabelGuide(tiny.train.labels), log=logs.append)
    assert any("other training data" in line for line in logs)
    fresh = defend(b, cfg, tmp_path / "fresh", guide=LabelGuide(tiny.train.labels), log=lambda s: None)
    assert m["sizes"] == fresh["sizes"] and m["unlearn_history"] == fresh["unlearn_history"]


def test_a_snapshot_of_another_network_is_refused(tmp_path, tiny, capsys):
    from cgd import models

    data = write_npz(tmp_path / "d.npz", tiny.train, tiny.test)
    for name, widths in (("m", [8, 16, 16]), ("snap", [8, 16, 32])):
        models.save_model(models.get("fastnet", num_classes=4, widths=widths, stem=8), tmp_path / f"{name}.safetensors",
                          input_size=(16, 16), class_names=list(NAMES))
    code = cli.main(["defend", "--data", str(data), "--out", str(tmp_path / "run"), "--model",
                     str(tmp_path / "m.safetensors"), "--snapshot", str(tmp_path / "snap.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("cgd defend: error: snapshot ") and "give the snapshot of that model" \
        in err[-1], err

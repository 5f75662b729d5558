"""BackdoorBench records (`attack_result.pt`): built here in BackdoorBench's layout over a tiny fake official
CIFAR-10, read back, refused when hostile, and defended end to end."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from cgd import CGDError, cli, guides, models, records
from cgd.data import CIFAR10_CLASSES, load_dataset
from conftest import LabelGuide
from hostile import Sandbox, assert_refused, run_cli

PER_BATCH, N_TEST = 30, 20  # 150 training images (15 a class): enough for the split's preflight
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
TARGET = 0


def _clean(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 10).tolist()


def _official_archive(path):
    """A tiny stand-in for cifar-10-python.tar.gz: six real-format python batches."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i, name in enumerate(BATCHES):
            x, y = _clean(N_TEST if name == "test_batch" else PER_BATCH, i)
            payload = pickle.dumps({b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), b"labels": y})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return path


def _clean_train():
    parts = [_clean(PER_BATCH, i) for i in range(5)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _trigger(img):
    out = img.copy()
    out[-4:, -4:] = 255
    return out


def _bd_state(x, y, poisoned, order=None, folder=None):
    """The state BackdoorBench's poisoned dataset retrieves: an index array, a 0/1 indicator over the clean
    split, and the poisoned samples keyed by (numpy integer) clean index, in RAM (PIL images) or in `folder`."""
    flags = np.zeros(len(x))
    flags[poisoned] = 1
    samples = {}
    for i in poisoned:
        img = Image.fromarray(_trigger(x[i]))
        if folder is None:
            samples[np.int64(i)] = (img, TARGET, int(y[i]))
        else:
            (folder / str(y[i])).mkdir(parents=True, exist_ok=True)
            img.save(folder / str(y[i]) / f"{i}.png")
            samples[np.int64(i)] = {"path": f"/home/someone/record/x/{folder.name}/{y[i]}/{i}.png",
                                    "other_info": [TARGET, int(y[i])]}
    return {"bd_data_container": {"save_folder_path": None if folder is None else str(folder), "data_dict": samples,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": np.arange(len(x)) if order is None else order, "poison_indicator": flags,
            "save_folder_path": None if folder is None else str(folder)}


def _record(path, *, model=None, folder=False, **over):
    x, y = _clean_train()
    xt, yt = _clean(N_TEST, 5)
    train_poison = [i for i in range(len(x)) if i % 25 == 3][:6]
    test_poison = np.flatnonzero(np.asarray(yt) != TARGET)
    test_state = _bd_state(xt, yt, test_poison, order=test_poison,
                           folder=path.parent / "bd_test_dataset" if folder else None)
    rec = {"model_name": "preactresnet18", "num_classes": 10,
           "model": model if model is not None else OrderedDict(linear_weight=torch.zeros(10, 4)),
           "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10",
           "bd_train": _bd_state(x, y, train_poison, folder=path.parent / "bd_train_dataset" if folder else None),
           "bd_test": test_state}
    rec.update(over)
    torch.save(rec, path)
    return path, train_poison, test_poison


@pytest.fixture
def env(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    _official_archive(shared / "cifar-10-python.tar.gz")
    monkeypatch.setenv("CGD_DATA", str(shared))
    monkeypatch.setenv("CGD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "record").mkdir()
    return tmp_path / "record"


@pytest.mark.parametrize("folder", [False, True])
def test_a_record_is_read_back(env, folder):
    path, poisoned, test_poison = _record(env / "attack_result.pt", folder=folder)
    rec = records.read_record(path)
    x, y = _clean_train()
    assert rec.train.images.shape == (150, 32, 32, 3) and rec.train.class_names == CIFAR10_CLASSES
    assert np.flatnonzero(rec.poison_mask).tolist() == poisoned
    assert (rec.train.images[poisoned] == np.stack([_trigger(x[i]) for i in poisoned])).all()
    assert (rec.train.labels[poisoned] == TARGET).all()
    clean = np.setdiff1d(np.arange(150), poisoned)
    assert (rec.train.images[clean] == x[clean]).all() and (rec.train.labels[clean] == y[clean]).all()
    xt, yt = _clean(N_TEST, 5)
    assert (rec.test.images == xt).all() and rec.test.labels.tolist() == yt
    assert len(rec.backdoor_test) == len(test_poison) and (rec.backdoor_test.labels == TARGET).all()
    assert (rec.backdoor_test.images == np.stack([_trigger(xt[i]) for i in test_poison])).all()
    assert rec.model is None and "architecture unknown" in rec.model_note
    ds = load_dataset(path)  # --data record.pt
    assert (ds.train.images == rec.train.images).all() and len(ds.test) == N_TEST


def _bb_keys(state: dict) -> OrderedDict:
    """Our preact-resnet18 state under BackdoorBench's key names (the inverse of the reader's mapping)."""
    out = OrderedDict()
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            rest = parts[2:]
            if rest[0] == "shortcut":
                rest = ["shortcut", "0"] + rest[1:]
            parts = [f"layer{i // 2 + 1}", str(i % 2)] + rest
        elif parts[0] == "head":
            parts[0] = "linear"
        out[".".join(parts)] = v
    return out


def test_a_preactresnet18_whose_keys_map_is_loaded(env):
    torch.manual_seed(0)
    ours = models.get("preact-resnet18", num_classes=10).state_dict()
    path, _, _ = _record(env / "attack_result.pt", model=_bb_keys(ours))
    rec = records.read_record(path)
    assert rec.model is not None, rec.model_note
    got = rec.model.state_dict()
    assert all(torch.equal(got[k], ours[k]) for k in ours)
    bad = _bb_keys(ours)
    bad["linear.weight"] = bad["linear.weight"].clone().fill_(float("nan"))
    path, _, _ = _record(env / "nan.pt", model=bad)
    rec = records.read_record(path)
    assert rec.model is None and "not finite at ['head.weight']" in rec.model_note


class _Payload:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _MyDict(OrderedDict):
    pass


@pytest.mark.parametrize("make", ["reduce", "subclass"])
def test_a_record_with_a_foreign_object_is_refused_and_nothing_runs(env, make):
    marker = env / "pwned"
    _Payload.marker = marker
    extra = _Payload() if make == "reduce" else _MyDict(a=torch.zeros(1))
    path, _, _ = _record(env / "attack_result.pt", extra=extra)
    with pytest.raises(CGDError, match="refusing to unpickle (posix|os|nt).system|refusing to unpickle .*_MyDict"):
        records.read_record(path)
    assert not marker.exists()


def test_the_jpeg_copy_is_not_enough(env, monkeypatch, tmp_path):
    path, _, _ = _record(env / "attack_result.pt")
    only_jpeg = tmp_path / "jpeg"
    only_jpeg.mkdir()
    (only_jpeg / "cifar10-jpeg.tar.gz").write_bytes(b"")
    monkeypatch.setenv("CGD_DATA", str(only_jpeg))
    monkeypatch.chdir(only_jpeg)
    with pytest.raises(CGDError, match="JPEG copy has lost CIFAR-10's global image order"):
        records.read_record(path)


def _bad_train(field, value):
    x, y = _clean_train()
    state = _bd_state(x, y, [3, 13])
    state[field] = value
    return state


@pytest.mark.parametrize("over, message", [
    ({"num_classes": "10"}, "'num_classes' is a str"),
    ({"clean_data": "gtsrb"}, "only cifar10 records"),
    ({"bd_train": None}, "holds no bd_train"),
    ({"bd_train": [1, 2]}, "'bd_train' is a list"),
    ({"bd_train": _bad_train("original_index_array", np.array([0, 0, 1]))}, "distinct indices"),
    ({"bd_train": _bad_train("original_index_array", np.array([0, 500]))}, "distinct indices in 0..149"),
    ({"bd_train": _bad_train("poison_indicator", np.zeros(7))}, "one 0/1 per image of the clean split"),
    ({"bd_train": _bad_train("poison_indicator", np.full(150, 2.0))}, "one 0/1 per image"),
    ({"bd_train": _bad_train("poison_indicator", np.zeros(150))}, "poisoned samples and poison_indicator disagree"),
    ({"bd_train": _bad_train("original_index_array", np.arange(150, dtype=np.complex64))},
     "numpy dtype .* is not a plain number"),
])
def test_malformed_fields_are_refused(env, over, message):
    path, _, _ = _record(env / "attack_result.pt", **over)
    with pytest.raises(CGDError, match=message):
        records.read_record(path)


def test_bad_labels_and_images_are_refused(env):
    x, y = _clean_train()
    state = _bd_state(x, y, [3])
    state["bd_data_container"]["data_dict"][3] = (Image.fromarray(x[3]), 10, int(y[3]))
    path, _, _ = _record(env / "a.pt", bd_train=state)
    with pytest.raises(CGDError, match="labels outside 0..9"):
        records.read_record(path)
    state["bd_data_container"]["data_dict"][3] = (Image.fromarray(x[3]), 0, (int(y[3]) + 1) % 10)
    path, _, _ = _record(env / "b.pt", bd_train=state)
    with pytest.raises(CGDError, match="original labels differ from the clean set's"):
        records.read_record(path)
    state["bd_data_container"]["data_dict"][3] = (Image.fromarray(x[3][:8]), 0, int(y[3]))
    path, _, _ = _record(env / "c.pt", bd_train=state)
    with pytest.raises(CGDError, match=r"is \(8, 32, 3\), not \(32, 32, 3\)"):
        records.read_record(path)
    state["bd_data_container"]["data_dict"][3] = (x[3].astype(np.int64) * 1000, 0, int(y[3]))
    path, _, _ = _record(env / "d.pt", bd_train=state)
    with pytest.raises(CGDError, match="holds no uint8 RGB image"):
        records.read_record(path)


def test_truncated_oversized_and_non_records_are_refused(env, monkeypatch):
    path, _, _ = _record(env / "attack_result.pt")
    raw = path.read_bytes()
    (env / "cut.pt").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CGDError, match="cut.pt: not a torch.save record"):
        records.read_record(env / "cut.pt")
    (env / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CGDError, match="old-style .* or a raw pickle"):
        records.read_record(env / "pickle.pt")
    torch.save([1, 2], env / "list.pt")
    with pytest.raises(CGDError, match="holds a list, not a dict"):
        records.read_record(env / "list.pt")
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    with pytest.raises(CGDError, match="larger than 1,000 bytes: over the cap on a BackdoorBench record"):
        records.read_record(path)


def test_a_folder_image_reached_through_a_link_is_refused(env, tmp_path):
    path, _, _ = _record(env / "attack_result.pt", folder=True)
    elsewhere = tmp_path / "elsewhere"
    (env / "bd_train_dataset").rename(elsewhere)
    (env / "bd_train_dataset").symlink_to(elsewhere)
    with pytest.raises(CGDError, match="a link; refused"):
        records.read_record(path)


TINY_RUN = ["--set", "victim.epochs=2", "--set", "victim.batch_size=64", "--set", "victim.snapshot_epoch=1",
            "--set", "victim.augment='none'", "--set", "victim.arch_params={widths=[8,16,16],stem=8}",
            "--set", "unlearn.overrides={min_steps=2}", "--set", "split.neighbours=20"]


def test_defend_a_record_end_to_end(env, monkeypatch, capsys):
    path, poisoned, _ = _record(env / "attack_result.pt")
    labels = records.read_record(path).train.labels
    monkeypatch.setattr(guides, "get", lambda name, **p: LabelGuide(labels))
    assert cli.main(["data", "info", str(path)]) == 0
    assert "150 train / 20 test images" in capsys.readouterr().out
    run = env / "run"
    code = cli.main(["defend", "--data", str(path), "--out", str(run), *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "6 of 150 training images poisoned" in err
    m = json.loads((run / "metrics.json").read_text())
    assert m["detection"], "the record's poison mask did not reach the detection metrics"
    split = json.loads((run / "split.json").read_text())
    in_p = set(split["poison"])
    assert m["detection"]["tpr"] == pytest.approx(len(in_p & set(poisoned)) / len(poisoned))
    assert m["detection"]["poison_in_clean"] == len(set(split["clean"]) & set(poisoned))


# ------------------------------------------------------------------------------------------------ sandboxed

def test_cli_reduce_payload_record_is_refused(tmp_path):
    box = Sandbox(tmp_path / "box")
    _official_archive(box.work / "cifar-10-python.tar.gz")
    marker = box.root / "pwned"
    _Payload.marker = marker
    path, _, _ = _record(box.work / "attack_result.pt", extra=_Payload())
    run = box.work / "run"
    res = run_cli(box, "defend", "--data", str(path), "--out", str(run))
    assert not marker.exists(), "the record's payload ran"
    assert_refused(res, "defend", "refusing to unpickle", "system", box=box, run_dir=run)


def test_cli_record_with_only_the_jpeg_copy(tmp_path):
    box = Sandbox(tmp_path / "box")
    (box.work / "cifar10-jpeg.tar.gz").write_bytes(b"")
    path, _, _ = _record(box.work / "attack_result.pt")
    res = run_cli(box, "data", "info", str(path))
    assert_refused(res, "data", "lost CIFAR-10's global image order", box=box)


def test_torch_weights_only_refuses_a_real_record(env):
    """Why the record has a reader of its own: torch's weights-only loader refuses the numpy arrays and PIL images
    every record holds, and admitting them there would run numpy's and PIL's own state setters on attacker data."""
    path, _, _ = _record(env / "attack_result.pt")
    with pytest.raises(pickle.UnpicklingError, match="numpy|PIL"):
        torch.load(path, weights_only=True)
    assert records.read_record(path).train is not None


# ------------------------------------------------------------------------------------------------ crafted pickles

class _Storage4:
    """Pickled as a persistent id naming a 4-float storage member."""


class _Tensor:
    def __init__(self, size):
        self.size = size

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage4(), 0, self.size, (1,), False, OrderedDict())


def _crafted(path, obj, members=None, compress=False):
    """A torch.save-shaped zip around `obj`'s pickle, written by hand so that its tensors can lie."""
    import zipfile

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(o, _Storage4) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
        for name, payload in (members or {}).items():
            zf.writestr(name, payload)
    return path


_TEXT = "x" * (1 << 20)


class _Encode:
    def __init__(self, text):
        self.text = text

    def __reduce__(self):
        import codecs

        return codecs.encode, (self.text, "latin1")


@pytest.mark.parametrize("obj, kw, message", [
    ({"w": _Tensor((4,))}, {}, "lacks 'clean_data'"),  # a well-formed tensor passes the unpickler
    ({"w": _Tensor((10 ** 6,))}, {}, "a pickled tensor reaches past its storage"),
    ({"w": _Tensor((-1,))}, {}, "a pickled tensor is malformed"),
    ({"pad": [_Encode(_TEXT) for _ in range(10)]}, {},
     "the pickle builds more data than it holds"),  # one memoised MiB of text, encoded ten times
    ({"w": _Tensor((4,))}, {"compress": True}, "is not a stored member"),
    ({"w": _Tensor((4,))}, {"members": {"elsewhere/x": b""}}, "is not a stored member of archive/"),
])
def test_crafted_records_are_refused(env, obj, kw, message):
    with pytest.raises(CGDError, match=message):
        records.read_record(_crafted(env / "crafted.pt", obj, **kw))

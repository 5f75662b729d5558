"""Hostile model files: crafted sidecars, crafted safetensors headers, model/data mismatches, and a byte-level fuzz.

Every refusal must be one `CGDError` naming the file and the field, found before anything large is allocated. The
hostile files are written by hand (JSON + safetensors), not through `save_model`, so they are what an attacker sends.
"""

from __future__ import annotations

import inspect
import json
import os
import resource

import numpy as np
import pytest
import torch
from safetensors.torch import save

from cgd import CGDError, models
from cgd.data import Dataset, ImageSet, save_npz
from cgd.schema import Int, Ints

from conftest import NAMES
from hostile import Sandbox, assert_refused, run_cli

ARCH = {"num_classes": 4, "widths": [4, 8, 8], "stem": 4}


def sidecar(**over) -> dict:
    return {"name": "fastnet", "params": dict(ARCH), "input_size": [16, 16], "class_names": list(NAMES), **over}


def write_model(path, spec=None, state=None, arch=ARCH) -> None:
    """A fastnet's weights (or `state`) and a sidecar (`spec`: a dict, or raw bytes) written by hand."""
    torch.manual_seed(0)
    state = models.FastNet(**dict(arch, widths=tuple(arch["widths"]))).state_dict() if state is None else state
    path.write_bytes(save({k: v.contiguous() for k, v in state.items()}))
    spec = sidecar() if spec is None else spec
    path.with_name(path.name + ".json").write_bytes(spec if isinstance(spec, bytes) else json.dumps(spec).encode())


def split_file(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + body


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "m.safetensors"
    write_model(p)
    return p


def refused(path, pattern: str, names_file=None) -> str:
    with pytest.raises(CGDError, match=pattern) as e:
        models.load_model(path)
    assert str(names_file or path) in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ the sidecar

@pytest.mark.parametrize("content, pattern", [
    pytest.param(sidecar(params=dict(ARCH, num_classes=10 ** 12)), r"params\.num_classes must be an integer in 1\.\.",
                 id="5-TB num_classes"),
    pytest.param(sidecar(params=dict(ARCH, widths=[30000, 30000, 30000])), r"params\.widths must be a list of 3",
                 id="160-GB widths"),
    pytest.param(sidecar(params=dict(ARCH, widths=[4096, 4096, 4096])), r"params make a network of [\d,]+ "
                 r"parameters; the limit is", id="in-range widths over the parameter cap"),
    pytest.param(b"\x00\x01 not json {", r"is not valid JSON", id="not JSON"),
    pytest.param(b"\xff\xfe{}", r"is not valid JSON", id="not UTF-8"),
    pytest.param(b"[" * 200_000 + b"]" * 200_000, r"is not valid JSON", id="nested 200k deep"),
    pytest.param(b" " * (1 << 20) + b"{}", r"is larger than 1,048,576 bytes", id="over 1 MiB"),
    pytest.param({"params": ARCH}, r"has no 'name'", id="no name"),
    pytest.param(sidecar(name="resnet9000"), r"name 'resnet9000' \(a string\) is not an architecture",
                 id="unknown name"),
    pytest.param(sidecar(name=["fastnet"]), r"name \['fastnet'\] \(a list\) is not an architecture", id="name a list"),
    pytest.param([sidecar()], r"must be a JSON object", id="a list"),
    pytest.param(sidecar(params=dict(ARCH, dropout=0.5)), r"params has an unknown parameter 'dropout'",
                 id="extra keyword"),
    pytest.param(sidecar(params=[4, [4, 8, 8], 4]), r"params must be an object", id="params a list"),
    pytest.param(sidecar(params=dict(ARCH, num_classes="4")), r"params\.num_classes must be an integer.*a string",
                 id="string for a number"),
    pytest.param(sidecar(params=dict(ARCH, widths=["4", "8", "8"])), r"params\.widths must be a list",
                 id="strings for widths"),
    pytest.param(sidecar(params=dict(ARCH, num_classes=-3)), r"params\.num_classes must be an integer in 1",
                 id="negative class count"),
    pytest.param(sidecar(params=dict(ARCH, num_classes=True)), r"params\.num_classes .*a boolean", id="bool for int"),
    pytest.param(sidecar(params=dict(ARCH, stem=4.0)), r"params\.stem must be an integer.*a number",
                 id="float for int"),
    pytest.param(sidecar(params=dict(ARCH, widths=[4, 8])), r"params\.widths must be a list of 3", id="two widths"),
    pytest.param(sidecar(params=dict(ARCH, flip_tta=1)), r"params\.flip_tta must be true or false", id="int for bool"),
    pytest.param(json.dumps(sidecar()).replace('"stem": 4', '"logit_scale": NaN, "stem": 4').encode(),
                 r"is not valid JSON: NaN is not JSON", id="NaN literal"),
    pytest.param(json.dumps(sidecar()).replace('"stem": 4', '"logit_scale": 1e400, "stem": 4').encode(),
                 r"params\.logit_scale must be a number in \(0, 1000\]; got inf", id="1e400 is infinite"),
    pytest.param(json.dumps(sidecar()).replace('"stem": 4', '"stem": 4, "stem": 400').encode(),
                 r"duplicate key 'stem'", id="duplicate key"),
    pytest.param(sidecar(input_size=[1, 1]), r"input_size must be a list of 2 integers in 8\.\.", id="input_size 1 px"),
    pytest.param(sidecar(input_size="32x32"), r"input_size must be a list of 2", id="input_size a string"),
    pytest.param(sidecar(class_names=NAMES[:3]), r"class_names must be a list of 4 distinct strings",
                 id="3 names for 4 classes"),
    pytest.param(sidecar(class_names=["a", "a", "b", "c"]), r"class_names must be a list of 4 distinct",
                 id="duplicate names"),
    pytest.param(sidecar(class_names=[1, 2, 3, 4]), r"class_names must be a list of 4 distinct", id="names not str"),
])
def test_hostile_sidecar_is_one_clear_error(tmp_path, content, pattern):
    p = tmp_path / "m.safetensors"
    write_model(p, spec=content)
    refused(p, pattern, names_file=p.with_name(p.name + ".json"))


def test_sidecar_that_is_a_directory_or_missing(model_path):
    spec = model_path.with_name(model_path.name + ".json")
    spec.unlink()
    refused(model_path, r"sidecar .* does not exist", names_file=spec)
    spec.mkdir()
    refused(model_path, r"is not a regular file", names_file=spec)


# ------------------------------------------------------------------------------------------------ the header

def _resize_head(h, b):  # a head for 5 classes under a 4-class sidecar: shapes and offsets consistent
    state = models.FastNet(**dict(ARCH, widths=(4, 8, 8))).state_dict()
    state["head.weight"] = torch.zeros(5, 8)
    return split_file(save(state))


def _half(h, b):  # one tensor stored as float16, bytes and offsets consistent
    state = models.FastNet(**dict(ARCH, widths=(4, 8, 8))).state_dict()
    state["head.weight"] = state["head.weight"].half()
    return split_file(save(state))


def _swap(h, b, key, value):
    h[key] = value
    return h, b


def _shift(h, b):  # overlapping: the BN bias reads the BN weight's bytes
    h["stem.1.bias"]["data_offsets"] = list(h["stem.1.weight"]["data_offsets"])
    return h, b


def _sized(h, b):  # a tensor whose offsets span more bytes than its shape
    h["head.weight"]["data_offsets"][1] += 4
    return h, b


def _gap(h, b):  # every tensor moved 64 bytes on: the data section does not start with a tensor
    for k, e in h.items():
        e["data_offsets"] = [o + 64 for o in e["data_offsets"]]
    return h, b + bytes(64)


def _past_end(h, b):  # the last tensor runs past the end of the file
    return h, b[:-4]


def _drop(h, b):
    del h["head.weight"]
    return h, b


def _bool_shape(h, b):
    h["head.weight"]["shape"] = [True, 8]  # [1, 8] to a lax reader
    return h, b


def _meta(h, b):
    h["__metadata__"] = {"format": ["pt"]}
    return h, b


def _entry_extra(h, b):
    h["head.weight"]["evil"] = 1
    return h, b


@pytest.mark.parametrize("change, pattern", [
    pytest.param(_resize_head, r"tensor 'head\.weight' has shape \[5, 8\] \(a list\); the sidecar's params make "
                 r"it \[4, 8\]", id="wrong shape"),
    pytest.param(_half, r"tensor 'head\.weight' has dtype 'F16' \(a string\); this fastnet stores F32",
                 id="wrong dtype"),
    pytest.param(_drop, r"tensor 'head\.weight' is missing", id="missing tensor"),
    pytest.param(lambda h, b: _swap(h, b, "evil.weight", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
                 r"tensor 'evil\.weight' \(a string\) is not part of this fastnet", id="extra tensor"),
    pytest.param(_shift, r"tensors must follow each other without gaps or overlaps", id="overlapping offsets"),
    pytest.param(_gap, r"starts at byte 64 of the data, not 0", id="gap before the data"),
    pytest.param(_sized, r"tensor 'head\.weight' has data_offsets .* its 128 bytes need", id="offsets vs shape"),
    pytest.param(_past_end, r"the header describes [\d,]+ bytes of tensors but the file holds", id="larger than file"),
    pytest.param(_bool_shape, r"tensor 'head\.weight' has shape \[True, 8\]", id="bool in shape"),
    pytest.param(_meta, r"__metadata__ must map names to strings", id="metadata not strings"),
    pytest.param(_entry_extra, r"must have exactly dtype, shape and data_offsets", id="extra entry key"),
    pytest.param(lambda h, b: ([h], b), r"the header must be a JSON object", id="header a list"),
])
def test_hostile_header_is_refused_before_the_weights_are_read(model_path, change, pattern):
    header, body = split_file(model_path.read_bytes())
    model_path.write_bytes(join_file(*change(header, body)))
    refused(model_path, pattern)


@pytest.mark.parametrize("raw, pattern", [
    pytest.param(lambda r: r[:5], r"5 bytes, too short", id="5-byte file"),
    pytest.param(lambda r: (1 << 62).to_bytes(8, "little") + r[8:], r"header length 4,611,686,018,427,387,904 is "
                 "impossible", id="2^62 header length"),
    pytest.param(lambda r: (len(r)).to_bytes(8, "little") + r[8:], r"header length [\d,]+ is impossible",
                 id="header past the end"),
    pytest.param(lambda r: r[:8] + b"\xff" + r[9:], r"header is not valid JSON", id="header not UTF-8"),
    pytest.param(lambda r: r[:8] + b"[" + r[9:], r"header is not valid JSON", id="header not JSON"),
    pytest.param(lambda r: (2 << 20).to_bytes(8, "little") + r[8:] + bytes(2 << 20), r"limit 1,048,576",
                 id="2-MiB header"),
])
def test_hostile_header_bytes(model_path, raw, pattern):
    model_path.write_bytes(raw(model_path.read_bytes()))
    refused(model_path, pattern)


def _poisoned_state(key, value):
    state = models.FastNet(**dict(ARCH, widths=(4, 8, 8))).state_dict()
    state[key].view(-1)[0] = value
    return state


@pytest.mark.parametrize("key, value, pattern", [
    ("head.weight", float("nan"), r"'head\.weight' holds NaN or infinite values"),
    ("stem.0.weight", float("inf"), r"'stem\.0\.weight' holds NaN or infinite values"),
    ("stem.1.running_var", -1.0, r"'stem\.1\.running_var' holds negative variances"),
])
def test_weights_that_make_every_prediction_nan_are_refused(tmp_path, key, value, pattern):
    """One NaN weight, or a negative BN variance, spreads to every output of the network: the model predicts
    nothing (argmax of NaN is class 0 for every image), so evaluating or defending it would report a meaningless
    number. Refused, naming the tensor."""
    p = tmp_path / "m.safetensors"
    write_model(p, state=_poisoned_state(key, value))
    refused(p, pattern)


# ------------------------------------------------------------------------------------------------ what loads

def test_a_valid_model_loads_with_what_it_was_trained_on(model_path):
    m = models.load_model(model_path)
    assert m.cgd_spec == {"name": "fastnet", "params": dict(ARCH, widths=(4, 8, 8)), "input_size": [16, 16],
                          "class_names": NAMES}
    x = torch.randn(2, 3, 16, 16)
    ref = models.FastNet(**dict(ARCH, widths=(4, 8, 8)))
    ref.load_state_dict(m.state_dict())
    assert torch.allclose(ref.eval()(x), m(x))


def test_save_model_records_input_size_and_class_names_and_a_reload_keeps_them(tmp_path):
    m = models.get("fastnet", **ARCH)
    models.save_model(m, tmp_path / "a.safetensors", input_size=(16, 16), class_names=NAMES, epoch=3)
    spec = json.loads((tmp_path / "a.safetensors.json").read_text())
    assert spec == {"epoch": 3, "name": "fastnet", "params": dict(ARCH), "input_size": [16, 16],
                    "class_names": NAMES}
    models.save_model(models.load_model(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert json.loads((tmp_path / "b.safetensors.json").read_text())["input_size"] == [16, 16]
    with pytest.raises(CGDError, match="class_names must be a list of 4"):
        models.save_model(m, tmp_path / "c.safetensors", class_names=NAMES[:2])


def test_config_params_are_checked_by_the_same_schema():
    with pytest.raises(CGDError, match=r"fastnet params\.widths must be a list of 3 integers"):
        models.get("fastnet", widths=[8, 16])
    with pytest.raises(CGDError, match=r"preact-resnet18 params make a network of"):
        models.get("preact-resnet18", width=512)
    with pytest.raises(CGDError, match=r"preact-resnet18 params has an unknown parameter 'widths'"):
        models.get("preact-resnet18", widths=[8, 16, 16])


@pytest.mark.parametrize("name", models.MODELS.names())
def test_every_architecture_declares_each_constructor_parameter_once(name):
    cls = models.MODELS.cls(name)
    assert list(cls.PARAMS) == list(inspect.signature(cls).parameters)
    assert "num_classes" in cls.PARAMS and cls.MIN_INPUT >= 1
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    assert models.get(name, **defaults).cgd_spec["params"] == defaults  # the defaults pass their own schema
    smallest = {k: p.lo if isinstance(p, Int) else (p.lo,) * p.n if isinstance(p, Ints) else defaults[k]
                for k, p in cls.PARAMS.items()}
    with torch.no_grad():  # the declared minimum input runs through the network
        out = models.get(name, **smallest).eval()(torch.zeros(1, 3, cls.MIN_INPUT, cls.MIN_INPUT))
    assert out.shape == (1, smallest["num_classes"])


# ------------------------------------------------------------------------------------------------ compatibility

def imageset(n: int, size: int, names) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.arange(n) % len(names), list(names))


@pytest.mark.parametrize("data, pattern", [
    pytest.param(imageset(10, 16, "abcde"), r"model M has 4 classes but D has 5 \(a, b, c, d, e\)", id="4 vs 5"),
    pytest.param(imageset(10, 16, "abc"), r"model M has 4 classes but D has 3", id="4 vs 3"),
    pytest.param(imageset(10, 16, ["red", "green", "blue", "cyan"]), r"was trained on classes \(red, green, blue, "
                 r"yellow\) but D has \(red, green, blue, cyan\): class 3 is 'yellow' for the model, 'cyan'",
                 id="other names"),
    pytest.param(imageset(10, 32, NAMES), r"model M was trained on 16x16 px images but D has 32x32", id="32 px"),
    pytest.param(imageset(10, 8, NAMES), r"model M was trained on 16x16 px images but D has 8x8", id="8 px"),
    pytest.param(imageset(10, 1, NAMES), r"D has 1x1 px images but model M \(fastnet\) needs at least 8x8 px",
                 id="1 px"),
    pytest.param(imageset(0, 16, NAMES), r"D holds no images", id="empty"),
])
def test_incompatible_data_is_refused_saying_both_sides(model_path, data, pattern):
    with pytest.raises(CGDError, match=pattern):
        models.check_compatible(models.load_model(model_path), data, "model M", "D")


def test_an_old_sidecar_without_size_or_names_gets_the_checks_that_remain(tmp_path):
    p = tmp_path / "old.safetensors"
    write_model(p, spec={"name": "fastnet", "params": ARCH, "epoch": 3})
    m = models.load_model(p)
    notes = []
    models.check_compatible(m, imageset(10, 24, "wxyz"), "model M", "D", log=notes.append)
    assert notes == ["note: model M was saved without its input_size and class_names (by an older cgd): not "
                     "checked; the class count and the minimum image size were"]
    with pytest.raises(CGDError, match="has 4 classes but D has 5"):
        models.check_compatible(m, imageset(10, 24, "vwxyz"), "model M", "D")
    with pytest.raises(CGDError, match="2x2 px images"):
        models.check_compatible(m, imageset(10, 2, "wxyz"), "model M", "D")


def test_train_victim_records_what_it_was_trained_on_and_resumes(tiny, tmp_path, monkeypatch):
    from cgd import pipeline
    from cgd.train import TrainConfig

    cfg = TrainConfig(epochs=1, batch_size=128, snapshot_epoch=1, augment="none")
    first = pipeline.train_victim(tiny.train.images, tiny.train.labels, 4, cfg, tmp_path, "fastnet",
                                  {"widths": [4, 8, 8], "stem": 4}, class_names=NAMES)
    for f in ("victim", "snapshot"):
        spec = json.loads((tmp_path / f"{f}.safetensors.json").read_text())
        assert spec["input_size"] == [16, 16] and spec["class_names"] == NAMES

    def no_training(*a, **k):
        raise AssertionError("a finished victim must be reloaded, not retrained")

    monkeypatch.setattr(pipeline, "train", no_training)
    again = pipeline.train_victim(tiny.train.images, tiny.train.labels, 4, cfg, tmp_path, "fastnet",
                                  {"widths": [4, 8, 8], "stem": 4}, class_names=NAMES)
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    assert again.model.cgd_spec["class_names"] == NAMES


# ------------------------------------------------------------------------------------------------ fuzz

def _mutate(raw: bytes, rng: np.random.Generator, lo: int, hi: int) -> bytes:
    b = bytearray(raw)
    pos = int(rng.integers(lo, max(lo + 1, min(hi, len(b)))))
    kind = rng.integers(5)
    if kind == 0:  # flip one bit
        b[pos] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        del b[pos:]
    elif kind == 2:  # insert random bytes
        b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    elif kind == 3:  # overwrite a run of bytes
        n = int(rng.integers(1, 9))
        b[pos:pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    else:  # change or lengthen a number: keeps the JSON valid, reaches the checks behind the parser
        digits = [i for i in range(lo, min(hi, len(b))) if 48 <= b[i] <= 57]
        if digits:
            i = digits[int(rng.integers(len(digits)))]
            b[i:i + 1] = str(int(rng.integers(0, 10 ** int(rng.integers(1, 12))))).encode()
    return bytes(b)


@pytest.fixture
def address_space_cap():
    """While the fuzz runs, an allocation of over 1 GiB fails (a MemoryError or RuntimeError: not a CGDError)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to measure the address space")
    vm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + (1 << 30)
    if hard != resource.RLIM_INFINITY and hard < cap:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_fuzzed_model_files_load_or_raise_cgd_error(tmp_path, address_space_cap):
    p, spec_path = tmp_path / "m.safetensors", tmp_path / "m.safetensors.json"
    write_model(p)
    weights, spec = p.read_bytes(), spec_path.read_bytes()
    n = int.from_bytes(weights[:8], "little")
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": set()}
    regions = [(0, 8), (8, 8 + n), (8 + n, len(weights))]
    for i in range(500):
        if i % 5 == 4:  # the sidecar
            p.write_bytes(weights)
            spec_path.write_bytes(_mutate(spec, rng, 0, len(spec)))
        else:  # the length prefix, the header JSON (most), the tensor bytes
            spec_path.write_bytes(spec)
            lo, hi = regions[[0, 1, 1, 2][i % 5]]
            p.write_bytes(_mutate(weights, rng, lo, hi))
        try:
            models.load_model(p)
            outcomes["loaded"] += 1
        except CGDError as e:  # the kind of refusal: its first words, the file names and numbers left out
            words = str(e).replace(str(spec_path), "SIDECAR").replace(str(p), "WEIGHTS").split()
            outcomes["refused"].add(" ".join(w for w in words[:4] if not any(c.isdigit() for c in w)))
    assert outcomes["loaded"] > 0 and len(outcomes["refused"]) >= 8, outcomes


# ------------------------------------------------------------------------------------------------ the CLI

def npz(path, n_classes: int, size: int, n_test: int = 6, per_class: int = 2) -> str:
    names = [f"c{i}" for i in range(n_classes)]
    save_npz(Dataset(imageset(per_class * n_classes, size, names), imageset(n_test, size, names)), path)
    return str(path)


def cli_model(box: Sandbox, spec: dict | bytes) -> str:
    """Weights of a tiny fastnet of the sidecar's class count (5 where that count is hostile)."""
    p = box.work / "m.safetensors"
    n = spec["params"]["num_classes"] if isinstance(spec, dict) and spec["params"]["num_classes"] <= 10 else 5
    write_model(p, spec=spec, arch=dict(ARCH, num_classes=n))
    return str(p)


def spec_for(n_classes: int, size: int, **params) -> dict:
    return {"name": "fastnet", "params": dict(ARCH, num_classes=n_classes, **params), "input_size": [size, size],
            "class_names": [f"c{i}" for i in range(n_classes)]}


@pytest.mark.parametrize("spec, data, needles", [
    pytest.param(spec_for(5, 32) | {"params": dict(ARCH, num_classes=1_250_000_000_000)}, (5, 32),
                 ["m.safetensors.json", "params.num_classes must be an integer"], id="5-TB num_classes"),
    pytest.param(spec_for(5, 32) | {"params": dict(ARCH, num_classes=5, widths=[7300, 7300, 7300], stem=4)}, (5, 32),
                 ["m.safetensors.json", "params.widths must be a list of 3 integers"], id="9.7-GB widths"),
    pytest.param(spec_for(5, 32) | {"params": dict(ARCH, num_classes=5, widths=[4096, 4096, 4096])}, (5, 32),
                 ["m.safetensors.json", "parameters; the limit is"], id="3-GB widths under the range"),
    pytest.param(b"{'name': fastnet}", (5, 32), ["m.safetensors.json", "is not valid json"], id="not JSON"),
    pytest.param(spec_for(10, 32), (5, 32), ["has 10 classes but the test split of", "has 5 (c0, c1"],
                 id="10-class model, 5-class data"),
    pytest.param(spec_for(5, 32), (5, 8), ["trained on 32x32 px images but the test split of", "has 8x8 px"],
                 id="32-px model, 8-px data"),
    pytest.param(spec_for(5, 32), (5, 1), ["has 1x1 px images but model", "needs at least 8x8 px"],
                 id="32-px model, 1-px data"),
    pytest.param(spec_for(5, 32), (5, 32, 0), ["the test split of", "holds no images"], id="empty test set --json"),
])
def test_cli_evaluate_refuses_hostile_models_and_mismatched_data(tmp_path, spec, data, needles):
    box = Sandbox(tmp_path)
    data_path = npz(box.work / "d.npz", *data)
    model = cli_model(box, spec)
    res = run_cli(box, "evaluate", "--model", model, "--data", data_path, "--json")
    assert_refused(res, "evaluate", *needles, box=box)
    assert res.out == ""  # nothing for a script to mistake for a result (`NaN` is not JSON)


def test_cli_defend_refuses_a_model_of_another_image_size(tmp_path):
    box = Sandbox(tmp_path)
    data_path = npz(box.work / "d.npz", 4, 16, n_test=4, per_class=12)  # enough to pass the size checks
    model = cli_model(box, spec_for(4, 32))
    res = run_cli(box, "defend", "--data", data_path, "--model", model, "--out", "run")
    assert_refused(res, "defend", "was trained on 32x32 px images but the training data has 16x16",
                   box=box, run_dir=box.work / "run")

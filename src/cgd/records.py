"""BackdoorBench attack records (`attack_result.pt`), read without unpickling arbitrary objects.

A record is a `torch.save` zip holding one pickled dict: the model's name, class count and state dict, the clean
dataset's name (`clean_data`) and image size, and the poisoned train and test parts (`bd_train`, `bd_test`). Each
part is the state of a poisoned-dataset object: an index array into the clean split (`original_index_array`), a 0/1
`poison_indicator` over the whole clean split, and a container of the poisoned samples keyed by clean index —
each an image (a pickled PIL image, or a PNG file in a folder beside the record) with its backdoor label and its
original label. The clean images are not in the record: they come from the original dataset in its canonical
order, so a CIFAR-10 record needs the official archive (or `cifar-10-batches-py`).

Nothing in the pickle is trusted. `_RecordUnpickler` admits a short list of globals and maps each to a stand-in
of ours: tensors are rebuilt from the zip's storage members after bounds checks, numpy arrays and scalars from
their raw bytes (plain numeric dtypes only), PIL images from their mode, size and pixel bytes — PIL's own code never
runs — and nothing else can be named. See docs/security.md.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import CGDError
from .data import (MAX_DATASET_BYTES, Dataset, ImageSet, _check_pickle, _decode_image, default_search_paths,
                   load_dataset, make_imageset)
from .io import read_capped

# A CIFAR-10 record is ~90 MB (a 45 MB PreActResNet18 and ~14,000 pickled 32x32 images); 1 GiB keeps room for
# larger models while a refusal stays bounded.
MAX_RECORD_BYTES = 1 << 30
# Opcodes of the record's pickle: ~25 per poisoned sample and ~10 per tensor; 60,000 samples fit well inside.
MAX_RECORD_OPS = 5_000_000
MAX_PNG_BYTES = 1 << 20  # one 32x32 (or 224x224) PNG of a record's folder is far below this

STORAGE_DTYPES = {f"{n}Storage": d for n, d in (
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}
NUMPY_KINDS = "biuf"  # bool, signed, unsigned, float: what index arrays, indicators and labels are


@dataclass(frozen=True)
class Record:
    """What a record gives: the poisoned training set with its poison mask, the clean and backdoor test sets,
    and the model (None, with `model_note` saying why, when its architecture is not one of ours)."""

    train: ImageSet
    poison_mask: np.ndarray
    test: ImageSet
    backdoor_test: ImageSet
    model_name: str
    model: torch.nn.Module | None
    model_note: str
    name: str

    @property
    def dataset(self) -> Dataset:
        return Dataset(self.train, self.test, name=self.name)


# ------------------------------------------------------------------------------------------------ the unpickler

class _Image:
    """Stands in for `PIL.Image.Image`: keeps the pickled mode, size and pixels, checked, as an (H, W, 3) array."""

    array: np.ndarray | None = None

    def __setstate__(self, state):
        if not isinstance(state, list) or len(state) not in (4, 5):
            raise CGDError("a pickled image has an unexpected state")
        mode, size, data = state[1], state[2], state[-1]
        if mode != "RGB" or not (isinstance(size, tuple) and len(size) == 2 and all(type(v) is int for v in size)):
            raise CGDError(f"a pickled image is not an RGB image of two integer sides (mode {mode!r})")
        w, h = size
        if not isinstance(data, bytes) or w <= 0 or h <= 0 or len(data) != w * h * 3:
            raise CGDError(f"a pickled {w}x{h} RGB image holds {len(data) if isinstance(data, bytes) else '?'} "
                           "bytes of pixels")
        self.array = np.frombuffer(data, np.uint8).reshape(h, w, 3)


class _Array:
    """Stands in for `numpy.ndarray` built by `_reconstruct`: the state becomes an array over its own bytes."""

    array: np.ndarray | None = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CGDError("a pickled numpy array has an unexpected state")
        _, shape, dtype, fortran, data = state
        if (not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(dtype, np.dtype) or not isinstance(data, bytes)):
            raise CGDError("a pickled numpy array has a malformed shape, dtype or data")
        if math.prod(shape) * dtype.itemsize != len(data):
            raise CGDError(f"a pickled numpy array declares shape {shape} of {dtype} but holds {len(data)} bytes")
        self.array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _plain_dtype(code, align=False, copy=True) -> np.dtype:
    if not isinstance(code, str) or len(code) > 4:
        raise CGDError(f"a pickled numpy dtype {code!r} is refused")
    try:
        dt = np.dtype(code)
    except TypeError:
        raise CGDError(f"a pickled numpy dtype {code!r} is refused") from None
    if dt.kind not in NUMPY_KINDS or dt.hasobject or dt.fields is not None or dt.shape != ():
        raise CGDError(f"a pickled numpy dtype {code!r} is not a plain number; refused")
    return dt


def _reconstruct(cls, shape, dtype):
    if cls is not _Array or shape != (0,):
        raise CGDError("a pickled numpy array is not built the way numpy builds one; refused")
    return _Array()


def _scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CGDError("a pickled numpy scalar is malformed")
    return np.frombuffer(data, dtype)[0].item()


@dataclass(slots=True)
class _Storage:
    dtype: torch.dtype
    flat: torch.Tensor


class _RecordUnpickler(pickle.Unpickler):
    """The record's pickle, with only the globals a record needs, each mapped to a checked stand-in; tensors'
    storages come from the zip's own members, each read once."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, pkl: bytes, where: str):
        super().__init__(io.BytesIO(pkl), encoding="utf-8")
        self.zf, self.prefix, self.where = zf, prefix, where
        self.budget = 2 * len(pkl) + (1 << 20)  # bytes `_codecs.encode` may build: each text is used once
        self.storages: dict[str, _Storage] = {}
        self.allowed = {("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): self._encode,
                        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                        ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
                        ("numpy", "ndarray"): _Array, ("numpy", "dtype"): _plain_dtype,
                        ("PIL.Image", "Image"): _Image}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            self.allowed[mod, "_reconstruct"] = _reconstruct
            self.allowed[mod, "scalar"] = _scalar
        self.allowed.update({("torch", n): d for n, d in STORAGE_DTYPES.items()})

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise CGDError(f"{self.where}: refusing to unpickle {module}.{name}: not part of a BackdoorBench record "
                           "(only tensors, numpy arrays of numbers, RGB images and plain containers are read)")
        return self.allowed[module, name]

    def _encode(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding != "latin1":
            raise CGDError(f"{self.where}: unexpected bytes encoding in the pickle")
        self.budget -= len(text)
        if self.budget < 0:
            raise CGDError(f"{self.where}: the pickle builds more data than it holds; not a record")
        return text.encode("latin1")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and pid[2].isdigit() and type(pid[4]) is int):
            raise CGDError(f"{self.where}: unexpected persistent id in the pickle; only tensor storages are read")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.zf.getinfo(name)
            except KeyError:
                raise CGDError(f"{self.where}: the pickle names storage {key}, which the file lacks") from None
            size = torch.empty(0, dtype=dtype).element_size()
            if info.file_size != numel * size:
                raise CGDError(f"{self.where}: storage {key} holds {info.file_size} bytes, not {numel} x {size}")
            raw = bytearray(self.zf.read(info))
            self.storages[key] = _Storage(dtype, torch.frombuffer(raw, dtype=dtype) if raw else
                                          torch.empty(0, dtype=dtype))
        st = self.storages[key]
        if st.dtype != dtype:
            raise CGDError(f"{self.where}: storage {key} is named with two dtypes")
        return st

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        ints = lambda t: isinstance(t, tuple) and all(type(v) is int and v >= 0 for v in t)  # noqa: E731
        if (not isinstance(storage, _Storage) or type(offset) is not int or offset < 0 or not ints(size)
                or not ints(stride) or len(size) != len(stride) or len(size) > 8):
            raise CGDError(f"{self.where}: a pickled tensor is malformed")
        if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage.flat):
            raise CGDError(f"{self.where}: a pickled tensor reaches past its storage")
        return storage.flat.as_strided(size, stride, offset)

    def _rebuild_parameter(self, data, requires_grad=False, hooks=None):
        if not isinstance(data, torch.Tensor):
            raise CGDError(f"{self.where}: a pickled parameter is malformed")
        return data


def _unpickle_record(path: Path):
    raw = read_capped(path, MAX_RECORD_BYTES, "a BackdoorBench record")
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile:
        what = ("an old-style (pre-zip) torch file or a raw pickle" if raw[:1] == b"\x80" else
                "truncated or not a zip archive")
        raise CGDError(f"{path}: not a torch.save record ({what}); only zip-format records are read") from None
    with zf:
        pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise CGDError(f"{path}: not a torch.save record (expected one <name>/data.pkl, found {len(pkl_names)})")
        prefix = pkl_names[0][:-len("data.pkl")]
        for info in zf.infolist():  # torch writes every member stored: a compressed one could be a zip bomb
            if not info.filename.startswith(prefix) or info.compress_type != zipfile.ZIP_STORED \
                    or info.file_size != info.compress_size:
                raise CGDError(f"{path}: member {info.filename} is not a stored member of {prefix}; "
                               "not a torch.save record")
        try:
            pkl = zf.read(pkl_names[0])
            _check_pickle(pkl, str(path), MAX_RECORD_OPS, "a record")  # lengths checked before trusted
            return _RecordUnpickler(zf, prefix, pkl, str(path)).load()
        except CGDError:
            raise
        except Exception as e:  # the unpickler, zipfile and numpy raise many types on crafted bytes
            raise CGDError(f"{path}: corrupt record ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ the fields

def _field(d: dict, key: str, types, where: str):
    if key not in d:
        raise CGDError(f"{where}: the record lacks {key!r}")
    v = d[key]
    if not isinstance(v, types):
        raise CGDError(f"{where}: {key!r} is a {type(v).__name__}, not {getattr(types, '__name__', types)}")
    return v


def _index_array(v, where: str, what: str) -> np.ndarray:
    if isinstance(v, _Array):
        v = v.array
    if isinstance(v, torch.Tensor):
        v = v.numpy()
    if not isinstance(v, np.ndarray) or v.ndim != 1:
        raise CGDError(f"{where}: {what} must be a 1-D numeric array")
    return v


def _sample(v, key: int, record_dir: Path, fmt: str, where: str, budget: int) -> tuple[np.ndarray, int, int]:
    """One poisoned sample of a container: (image, backdoor label, original label)."""
    if isinstance(v, (tuple, list)) and len(v) == 3:
        img, bd, orig = v
        img = img.array if isinstance(img, (_Image, _Array)) else None
    elif isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("other_info"), list) \
            and len(v["other_info"]) == 2:
        bd, orig = v["other_info"]
        img = _folder_image(v["path"], key, record_dir, fmt, where, budget)
    else:
        raise CGDError(f"{where}: poisoned sample {key} is neither (image, label, original label) nor a file entry")
    if img is None or img.dtype != np.uint8 or type(bd) is not int or type(orig) is not int:
        raise CGDError(f"{where}: poisoned sample {key} holds no uint8 RGB image or non-integer labels")
    return img, bd, orig


def _folder_image(stored: str, key: int, record_dir: Path, fmt: str, where: str, budget: int) -> np.ndarray:
    """A sample saved as a file: only `<folder>/<label>/<key>.png` is kept of the stored path (the attacker's
    machine's), looked up beside the record; no component may be a link."""
    parts = stored.replace("\\", "/").split("/")[-3:]
    if fmt != ".png" or len(parts) != 3 or parts[2] != f"{key}.png" or not parts[1].isdigit() \
            or parts[0] in ("", ".", ".."):
        raise CGDError(f"{where}: poisoned sample {key} names an unexpected file {stored!r}")
    path = record_dir
    for p in parts:
        path = path / p
        if path.is_symlink():
            raise CGDError(f"{path}: a link; refused")
    return _decode_image(read_capped(path, MAX_PNG_BYTES, "one image of a record"), str(path), budget)


def _part(state, clean: ImageSet, record_dir: Path, where: str, num_classes: int):
    """A poisoned part's images, labels and poison mask, in its `original_index_array` order."""
    if not isinstance(state, dict):
        raise CGDError(f"{where}: not a poisoned-dataset state (a dict)")
    box = _field(state, "bd_data_container", dict, where)
    samples = _field(box, "data_dict", dict, where)
    fmt = box.get("save_file_format", ".png")
    order = _index_array(_field(state, "original_index_array", object, where), where, "original_index_array")
    flags = _index_array(_field(state, "poison_indicator", object, where), where, "poison_indicator")
    n = len(clean)
    if len(flags) != n or not np.isin(flags, (0, 1)).all():
        raise CGDError(f"{where}: poison_indicator must hold one 0/1 per image of the clean split ({n}); "
                       f"got {len(flags)} entries")
    if order.dtype.kind not in "iu" or len(order) == 0 or len(np.unique(order)) != len(order) \
            or order.min() < 0 or order.max() >= n:
        raise CGDError(f"{where}: original_index_array must hold distinct indices in 0..{n - 1}")
    keys = [k for k in samples]
    if not all(type(k) is int and 0 <= k < n for k in keys):
        raise CGDError(f"{where}: poisoned samples must be keyed by indices in 0..{n - 1}")
    if set(keys) != set(np.flatnonzero(flags == 1).tolist()):
        raise CGDError(f"{where}: the poisoned samples and poison_indicator disagree ({len(keys)} samples, "
                       f"{int((flags == 1).sum())} flagged)")
    images, labels = clean.images.copy(), clean.labels.copy()
    budget, wrong = MAX_DATASET_BYTES - images.nbytes, 0
    for k in keys:
        img, bd, orig = _sample(samples[k], k, record_dir, fmt, where, budget)
        if img.shape != images.shape[1:]:
            raise CGDError(f"{where}: poisoned sample {k} is {img.shape}, not {images.shape[1:]} like the clean set")
        if not (0 <= bd < num_classes and 0 <= orig < num_classes):
            raise CGDError(f"{where}: poisoned sample {k} has labels outside 0..{num_classes - 1}")
        wrong += orig != clean.labels[k]
        images[k], labels[k] = img, bd
    if wrong:
        raise CGDError(f"{where}: {wrong} of {len(keys)} poisoned samples' original labels differ from the clean "
                       "set's at their index: the clean set is not the one the record was made from, in its order")
    mask = flags[order] == 1
    return make_imageset(images[order], labels[order], clean.class_names), mask


def official_cifar10() -> Dataset:
    """The official CIFAR-10 in its canonical order, from the search paths; the JPEG copy will not do."""
    jpeg = None
    for d in default_search_paths():
        for name in ("cifar-10-python.tar.gz", "cifar-10-batches-py"):
            if (d / name).exists():
                return load_dataset(d / name)
        if (d / "cifar10-jpeg.tar.gz").exists():
            jpeg = d / "cifar10-jpeg.tar.gz"
    also = (f"; {jpeg} is there, but that JPEG copy has lost CIFAR-10's global image order, which a record's "
            "indices refer to") if jpeg else ""
    raise CGDError("a BackdoorBench record holds only the poisoned samples and indexes the official CIFAR-10 for "
                   "the rest: put cifar-10-python.tar.gz (`cgd data fetch cifar10`) or cifar-10-batches-py in "
                   f"$CGD_DATA or a shared/data folder{also}")


def _preact_state(state: dict) -> dict | None:
    """BackdoorBench preactresnet18 key names in ours (`layerL.B` -> `layers.i`, `linear` -> `head`), or None
    when they do not map onto our network's keys one to one."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        parts = k.split(".")
        if parts[0].startswith("layer") and parts[0][5:].isdigit() and len(parts) > 2 and parts[1].isdigit():
            parts = ["layers", str(2 * (int(parts[0][5:]) - 1) + int(parts[1]))] + parts[2:]
            if parts[2] == "shortcut" and parts[3] == "0":
                del parts[3]
        elif parts[0] == "linear":
            parts[0] = "head"
        out[".".join(parts)] = v
    return out


def _model(name: str, state, num_classes: int):
    from . import models

    if name != "preactresnet18":
        return None, f"architecture {name!r} is not one CGD knows; continuing with the data only"
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CGDError("the record's model is not a state dict of tensors")
    net = models.get("preact-resnet18", num_classes=num_classes)
    theirs, ours = _preact_state(state), net.state_dict()
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    bad = [k for k in set(ours) & set(theirs) if theirs[k].shape != ours[k].shape
           or (theirs[k].is_floating_point() and not torch.isfinite(theirs[k]).all())]
    if missing or extra or bad:
        return None, (f"the record's preactresnet18 does not map onto CGD's (missing {missing[:3]}, extra "
                      f"{extra[:3]}, shapes differ or weights are not finite at {bad[:3]}): architecture unknown; continuing with the data only")
    net.load_state_dict({k: theirs[k].clone() for k in ours})
    return net, "loaded into CGD's preact-resnet18"


def read_record(path: str | Path) -> Record:
    """A BackdoorBench `attack_result.pt`, every field checked (see the module docstring)."""
    path = Path(path)
    rec = _unpickle_record(path)
    where = str(path)
    if not isinstance(rec, dict):
        raise CGDError(f"{where}: not a BackdoorBench record (the pickle holds a {type(rec).__name__}, not a dict)")
    clean_data = _field(rec, "clean_data", str, where)
    if clean_data != "cifar10":
        raise CGDError(f"{where}: clean_data {clean_data!r}: only cifar10 records can be read (their clean set is "
                       "rebuilt from the official archive)")
    k = _field(rec, "num_classes", int, where)
    size = _field(rec, "img_size", (list, tuple), where)
    if k != 10 or list(size[:2]) != [32, 32] or not all(type(v) is int for v in size):
        raise CGDError(f"{where}: a cifar10 record must have num_classes 10 and img_size 32x32; got {k}, {size}")
    model_name = _field(rec, "model_name", str, where)
    bd_train = _field(rec, "bd_train", (dict, type(None)), where)
    if bd_train is None:
        raise CGDError(f"{where}: the record holds no bd_train (its attack saved only the test part): there is no "
                       "poisoned training set to defend")
    bd_test = _field(rec, "bd_test", dict, where)
    clean = official_cifar10()
    train, mask = _part(bd_train, clean.train, path.parent, f"{where}:bd_train", k)
    bd, flagged = _part(bd_test, clean.test, path.parent, f"{where}:bd_test", k)
    bd = bd.subset(np.flatnonzero(flagged))  # the backdoor test set: its poisoned samples
    model, note = _model(model_name, rec.get("model"), k)
    return Record(train, mask, clean.test, bd, model_name, model, note, name=path.parent.name or path.stem)


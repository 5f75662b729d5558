"""Image datasets: the `ImageSet` contract and its loaders.

Every loader returns plain arrays: uint8 images (N, H, W, 3), int64 labels (N,), and class names.
Decoding is done once and cached as an uncompressed `.npz` under the cache directory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import pickle
import pickletools
import re
import tarfile
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import CGDError
from .io import atomic_write_bytes, cache_dir, read_capped

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
FASHION_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "class_names")
IMAGE_FORMATS = ("JPEG", "PNG")  # what an image tarball holds; other PIL plugins are attack surface we do not need

# Caps on every read of user data, checked before anything is allocated.
# Decoded arrays of one dataset, all splits: full CIFAR-10 is 184 MB and an Imagenette 224 px subset 0.68 GB, so 1 GiB
# keeps room for those while a refusal stays well under 2 GiB of memory.
MAX_DATASET_BYTES = 1 << 30
# One image: 4096 x 4096 is far above any training resolution here (224 px) and decodes to 50 MB at most.
MAX_IMAGE_PIXELS = 4096 * 4096
# One archive member or CIFAR batch file: a real batch is 31 MB and no image file of a dataset comes near 64 MiB.
MAX_MEMBER_BYTES = 64 << 20
# The decompressed tar stream: the CIFAR-10 JPEG and official archives are ~0.2 GB of tar, so 2 GiB only stops bombs.
MAX_ARCHIVE_BYTES = 2 << 30
# Entries of one tar archive: full CIFAR-10 has 60,000 images (GTSRB 52,000); 250,000 bounds the member list kept.
MAX_ARCHIVE_MEMBERS = 250_000
# Opcodes of one CIFAR batch pickle: a real one has ~40,000 (10,000 labels and file names), so 200,000 keeps room while
# bounding what a crafted pickle can build.
MAX_PICKLE_OPS = 200_000
# Class names of an .npz: ImageNet has 1,000 classes.
MAX_CLASSES = 10_000
# The CIFAR-10 download: the official archive is 170 MB; a server sending more is not sending it.
MAX_DOWNLOAD_BYTES = 256 << 20
READ_CHUNK = 16 << 20  # large arrays are read into their final buffer in chunks of this size


@dataclass(frozen=True)
class ImageSet:
    """Images with integer labels. `images` is uint8 (N, H, W, 3); `labels` int64 (N,). `groups` (optional, int64
    (N,)): samples that share a group id are one physical object seen several times (GTSRB's 30-frame tracks), so
    a held-out slice takes whole groups."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    groups: np.ndarray | None = None

    def __post_init__(self):
        validate(self.images, self.labels, self.class_names)
        if self.groups is not None:
            g = self.groups
            if not isinstance(g, np.ndarray) or g.shape != self.labels.shape or not np.issubdtype(g.dtype, np.integer):
                raise CGDError(f"groups must be integers, one per image ({len(self.labels)}); got "
                               f"{getattr(g, 'dtype', type(g).__name__)} of shape {getattr(g, 'shape', None)}")
            self.groups.setflags(write=False)
        self.images.setflags(write=False)
        self.labels.setflags(write=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        groups = None if self.groups is None else self.groups[idx]
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names), groups)


@dataclass(frozen=True)
class Dataset:
    """A train/test pair sharing one label set."""

    train: ImageSet
    test: ImageSet
    name: str = "custom"

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names


def validate(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    """Raise one clear `CGDError` for each way user data can be malformed."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise CGDError(f"images must be an array of shape (N, H, W, 3); got shape {shape}")
    if images.dtype != np.uint8:
        raise CGDError(f"images must be uint8 in 0..255; got dtype {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise CGDError(f"labels must be a 1-D array with one label per image; got shape {labels.shape} "
                       f"for {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CGDError(f"labels must be integers; got dtype {labels.dtype}")
    if len(class_names) == 0:
        raise CGDError("class_names is empty: one name per class is needed")
    if len(set(class_names)) != len(class_names):
        raise CGDError(f"class_names has duplicates: {class_names}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise CGDError(f"labels must lie in 0..{len(class_names) - 1} (one per class name); "
                       f"found range {labels.min()}..{labels.max()}")


def make_imageset(images, labels, class_names, groups=None) -> ImageSet:
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64)
    if groups is not None and np.issubdtype(np.asarray(groups).dtype, np.integer):
        groups = np.asarray(groups, dtype=np.int64)
    return ImageSet(np.ascontiguousarray(images), labels, [str(c) for c in class_names], groups)


# ----------------------------------------------------------------------------------------------- loaders

def load_npz(path: str | os.PathLike) -> Dataset:
    """Load `x_train, y_train, x_test, y_test, class_names` from an `.npz` (no pickles allowed)."""
    path = Path(path)
    z = read_npz(path, NPZ_ARRAYS, optional=("groups_train",))
    if z["class_names"].ndim != 1 or len(z["class_names"]) > MAX_CLASSES:
        raise CGDError(f"{path}: class_names must be a 1-D array of at most {MAX_CLASSES} names; "
                       f"got shape {z['class_names'].shape}")
    names = [str(c) for c in z["class_names"]]
    return Dataset(make_imageset(z["x_train"], z["y_train"], names, z.get("groups_train")),
                   make_imageset(z["x_test"], z["y_test"], names), name=path.stem)


def read_npz(path: Path, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The named arrays of an `.npz`, each checked (plain dtype, declared shape = stored size, under the caps)
    before its buffer is allocated; `optional` ones are left out when absent."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n.removesuffix(".npy"): zf.getinfo(n) for n in zf.namelist() if n.endswith(".npy")}
            missing = [n for n in required if n not in members]
            if missing:
                raise CGDError(f"{path}: missing arrays {missing}; an npz needs x_train (N,H,W,3 uint8), "
                               "y_train, x_test, y_test and class_names")
            out, budget = {}, MAX_DATASET_BYTES
            for name in [n for n in (*required, *optional) if n in members]:
                out[name] = _read_npz_member(zf, members[name], budget, f"{path}:{name}")
                budget -= out[name].nbytes
            return out
    except zipfile.BadZipFile as e:
        reason = _not_zip_reason(path)
        if reason:
            raise CGDError(f"{path}: not an .npz: {reason}") from None
        raise CGDError(f"{path}: corrupt or truncated .npz (BadZipFile: {e})") from None
    except (OSError, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError) as e:
        raise CGDError(f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e})") from None


def _not_zip_reason(path: Path) -> str | None:
    """What a file seems to be, from its first bytes, when that is not a zip archive; None when it starts as one."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        return None
    for magic, what in ((b"\x93NUMPY", "a single .npy array"), (b"\x1f\x8b", "gzip data"),
                        (b"\x80", "a Python pickle")):
        if head.startswith(magic):
            return f"it is {what}"
    return "it is not a zip archive" if head else "the file is empty"


def _read_npz_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, where: str) -> np.ndarray:
    if info.file_size > budget:
        raise CGDError(f"{where}: declares {info.file_size} bytes uncompressed, over the {MAX_DATASET_BYTES}-byte "
                       "cap on a dataset (a zip bomb?)")
    with zf.open(info) as f:
        shape, fortran, dtype = _npy_header(f, where)
        stored = info.file_size - f.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != stored:
            raise CGDError(f"{where}: the header declares shape {shape} of {dtype} ({nbytes} bytes) but the member "
                           f"holds {stored} bytes")
        buf = np.empty(nbytes, np.uint8)
        _read_into(f, memoryview(buf), where)
        f.read(1)  # reach the end of the member so that zipfile checks its CRC
    return buf.view(dtype).reshape(shape, order="F" if fortran else "C")


def _npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise CGDError(f"{where}: unsupported .npy format version {version}")
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, TypeError) as e:
        raise CGDError(f"{where}: not a valid .npy array header ({e})") from None
    if dtype.hasobject:
        raise CGDError(f"{where}: holds pickled Python objects (dtype {dtype}); only plain arrays are read")
    if dtype.itemsize == 0 or any(d < 0 for d in shape):
        raise CGDError(f"{where}: invalid array header (dtype {dtype}, shape {shape})")
    return shape, fortran, dtype


def _read_into(f, buf: memoryview, where: str) -> None:
    """Fill `buf` from `f` exactly, in bounded reads."""
    pos = 0
    while pos < len(buf):
        chunk = f.read(min(READ_CHUNK, len(buf) - pos))
        if not chunk:
            raise CGDError(f"{where}: truncated ({pos} of {len(buf)} bytes)")
        buf[pos:pos + len(chunk)] = chunk
        pos += len(chunk)


def save_npz(dataset: Dataset, path: str | os.PathLike, **extra: np.ndarray) -> None:
    """The `.npz` layout `load_npz` reads (`groups_train` when the training set has groups); `extra` arrays (e.g.
    `poison_mask`) are stored beside it."""
    buf = io.BytesIO()
    if dataset.train.groups is not None:
        extra = {"groups_train": dataset.train.groups, **extra}
    np.savez(buf, x_train=dataset.train.images, y_train=dataset.train.labels, x_test=dataset.test.images,
             y_test=dataset.test.labels, class_names=np.array(dataset.class_names), **extra)
    atomic_write_bytes(Path(path), buf.getvalue())


def _decode_image(data: bytes, name: str, budget: int) -> np.ndarray:
    """One JPEG/PNG as uint8 (H, W, 3); its pixel count is checked from the header before it is decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise CGDError(f"{name}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS}-pixel cap on one image "
                                   "(a decompression bomb?)")
                if w * h * 3 > budget:
                    raise CGDError(f"{name}: the decoded images pass the {MAX_DATASET_BYTES}-byte cap on a dataset")
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except CGDError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CGDError(f"{name}: decompression bomb refused ({e})") from None
    except Exception as e:  # PIL's parsers raise many exception types on hostile bytes
        raise CGDError(f"corrupt image {name}: {type(e).__name__}: {e}") from None


class _BoundedStream:
    """The decompressed bytes of an archive, for `tarfile`: no single read above `MAX_MEMBER_BYTES` (tar headers
    declare their own sizes) and nothing past `MAX_ARCHIVE_BYTES` (gzip bombs)."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def _check(self, end: int) -> None:
        if end > MAX_ARCHIVE_BYTES:
            raise CGDError(f"{self.path}: the archive decompresses past the {MAX_ARCHIVE_BYTES}-byte cap "
                           "(a gzip bomb?)")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_MEMBER_BYTES:
            raise CGDError(f"{self.path}: an archive entry of {n} bytes is over the {MAX_MEMBER_BYTES}-byte cap")
        self._check(self.f.tell() + n)
        return self.f.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise CGDError(f"{self.path}: unexpected relative seek in the archive")
        self._check(pos)
        return self.f.seek(pos)

    def tell(self) -> int:
        return self.f.tell()


@contextlib.contextmanager
def _open_tar(path: Path):
    """A plain or gzipped tar read through `_BoundedStream`; nothing is ever extracted to disk, and every
    archive error (truncation, bad headers, bad gzip data) becomes one `CGDError` naming the file."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else contextlib.nullcontext(raw) as f:
                with tarfile.open(fileobj=_BoundedStream(f, path), mode="r:") as tf:
                    yield tf
    except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeError) as e:
        raise CGDError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from None


def _members(tf: tarfile.TarFile, path: Path):
    for i, m in enumerate(tf, 1):
        if i > MAX_ARCHIVE_MEMBERS:
            raise CGDError(f"{path}: more than {MAX_ARCHIVE_MEMBERS} archive entries")
        yield m


def _member_bytes(tf: tarfile.TarFile, m: tarfile.TarInfo, path: Path) -> bytes:
    """A regular member's bytes, its declared size checked first (never follows links)."""
    if not m.isreg():
        raise CGDError(f"{path}: {m.name} is not a regular file (a link, folder or device); refused")
    if m.size > MAX_MEMBER_BYTES:
        raise CGDError(f"{path}: {m.name} declares {m.size} bytes, over the {MAX_MEMBER_BYTES}-byte cap on one entry")
    data = tf.extractfile(m).read(m.size)
    if len(data) != m.size:
        raise CGDError(f"{path}: {m.name} is truncated ({len(data)} of {m.size} bytes)")
    return data


def _split_class_file(name: str) -> tuple[str, str, str] | None:
    """`(split, class, file)` of a member named `[prefix/]train|test|val/<class>/<file>` (val is the test split,
    as in Tiny-ImageNet and Imagenette), else None."""
    parts = Path(name).parts
    start = next((i for i, p in enumerate(parts) if p in ("train", "test", "val")), None)
    if start is None or len(parts) - start != 3:
        return None
    split, c, f = parts[start:]
    return ("test" if split == "val" else split), c, f


CLASS_LINE = re.compile(r"\s*(\d+)\s+(?:(n\d{8})\s+)?(\S.*?)\s*$")  # "00  stop" or "003  n04099969  rocking chair"


def class_names_file(tarball: Path) -> dict[str, str] | None:
    """Human class names for the class folders of an image tarball or folder, from `<stem>.README.txt` beside it
    (the shared data's READMEs), `<stem>.classes.txt` or a folder's own `classes.txt`: the lines under a header that starts with "Class" and ends
    with ":", each `<index> [<wnid>] <name>`. The folder is the wnid where given, else the index as written; a
    name is cut to its first comma-separated synonym unless that makes two classes alike. None when there is
    no such file."""
    stem = tarball.name.split(".")[0]
    found = [f for f in (tarball.with_name(f"{stem}.README.txt"), tarball.with_name(f"{stem}.classes.txt"),
                         tarball / "classes.txt") if f.is_file()]
    if not found:
        return None
    text = read_capped(found[0], 1 << 20, "a class-names file").decode("utf-8", errors="replace")
    rows, inside = [], found[0].name.endswith("classes.txt")
    for line in text.splitlines():
        if not inside:
            inside = line.lstrip().startswith("Class") and line.rstrip().endswith(":")
            continue
        m = CLASS_LINE.fullmatch(line)
        if m is None:
            if rows:
                break
            continue
        rows.append((int(m[1]), m[2] or m[1], m[3]))
    if not rows:
        return None
    rows.sort()
    short = [name.split(",")[0].strip() for _, _, name in rows]
    names = short if len(set(short)) == len(short) else [name for _, _, name in rows]
    return {folder: name for (_, folder, _), name in zip(rows, names)}


def _read_image_tarball(path: Path) -> Dataset:
    """`train|test|val/<class>/<file>.jpg|png` inside a tar archive (see `_read_image_tree`)."""
    with _open_tar(path) as tf:
        return _read_image_tree(path, ((m.name, lambda m=m: _member_bytes(tf, m, path))
                                       for m in _members(tf, path) if m.isfile()))


def _folder_files(root: Path):
    """(relative name, reader) of every file under `root`, in sorted order, at most `MAX_ARCHIVE_MEMBERS` of them;
    links are refused, each read is bounded (`read_capped`: regular files only, a FIFO is not waited on)."""
    count = 0
    for here, dirs, files in os.walk(root):  # (does not descend into linked folders)
        dirs.sort()
        for f in sorted(files):
            count += 1
            if count > MAX_ARCHIVE_MEMBERS:
                raise CGDError(f"{root}: more than {MAX_ARCHIVE_MEMBERS} files")
            full = Path(here) / f
            if full.is_symlink():  # as in archives: a link could point anywhere on the machine
                raise CGDError(f"{full}: a symbolic link in a data folder; refused (copy the file in instead)")
            yield full.relative_to(root).as_posix(), lambda full=full: read_capped(full, MAX_MEMBER_BYTES, "an image")


def _read_image_folder(path: Path) -> Dataset:
    """An ImageFolder-style folder, `train|test|val/<class>/<image>` (see `_read_image_tree`)."""
    return _read_image_tree(path, _folder_files(path))


def _read_image_tree(path: Path, entries) -> Dataset:
    """`train|test|val/<class>/<file>.jpg|png` from `entries` ((name, reader) pairs). Class names and order come
    from a class-names file (`class_names_file`) when it names every folder; else the sorted folder names
    (CIFAR-10's canonical order when the folders are CIFAR-10's)."""
    split_items: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    budget = MAX_DATASET_BYTES
    for name, read in entries:
        parts = _split_class_file(name)
        if parts is None:
            continue
        split, c, f = parts
        img = _decode_image(read(), f"{path}:{split}/{c}/{f}", budget)
        if split_items[split] and img.shape != split_items[split][0][2].shape:
            raise CGDError(f"{path}: images of different sizes in {split}; resize them to one size first")
        budget -= img.nbytes
        split_items[split].append((c, f, img))
    if not split_items["train"] or not split_items["test"]:
        raise CGDError(f"{path}: expected train/<class>/<image> and test/<class>/<image> entries")
    folders = sorted({c for c, _, _ in split_items["train"]})
    unknown = sorted({c for c, _, _ in split_items["test"]} - set(folders))
    if unknown:
        raise CGDError(f"{path}: test classes {unknown} have no train folder")
    named = class_names_file(path) or {}
    if set(folders) <= set(named):  # the class-names file's order and names
        folders = [f for f in named if f in set(folders)]
        names = [named[f] for f in folders]
    else:
        names = CIFAR10_CLASSES if set(folders) == set(CIFAR10_CLASSES) else folders
        folders = names
    index = {f: i for i, f in enumerate(folders)}
    out = []
    for split in ("train", "test"):
        items = sorted(split_items[split], key=lambda t: (index[t[0]], t[1]))
        out.append(make_imageset(np.stack([im for _, _, im in items]), [index[c] for c, _, _ in items], names,
                                 track_groups([(c, f) for c, f, _ in items]) if split == "train" else None))
    return Dataset(out[0], out[1], name=path.name.split(".")[0])


TRACK_STEM = re.compile(r"(\d+)_\d+")  # GTSRB's training files: <track>_<frame>.jpg, tracks numbered per class


def track_groups(files: list[tuple[str, str]]) -> np.ndarray | None:
    """One group id per (class folder, track) for training files named `<track>_<frame>.<ext>` (GTSRB: the 30
    frames of one physical sign), in the order given; None unless every file is named so."""
    keys = []
    for c, f in files:
        m = TRACK_STEM.fullmatch(f.rsplit(".", 1)[0])
        if m is None:
            return None
        keys.append((c, int(m.group(1))))
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return np.array([ids[k] for k in keys], dtype=np.int64)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only the numpy array constructors they need, each under a budget
    of the bytes it may build (a crafted pickle could otherwise call them over and over)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where, self.size, self.budget = where, len(data), 3 * len(data)

    def _spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise CGDError(f"{self.where}: the pickle builds more data than it holds; not a CIFAR batch")

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise CGDError(f"refusing to unpickle {module}.{name}: not a CIFAR batch")
        fn = super().find_class(module, name)
        if name == "_reconstruct":
            def reconstruct(cls, shape, dtype):
                if shape != (0,):  # numpy pickles an empty array and fills it from the state
                    raise CGDError(f"{self.where}: unexpected array shape {shape!r} in the pickle")
                self._spend(self.size)  # the state that fills it is at most the pickle's size
                return fn(cls, shape, dtype)
            return reconstruct
        if name == "encode":
            def encode(*args):
                out = fn(*args)
                self._spend(len(out))
                return out
            return encode
        return fn


def _check_pickle(data: bytes, where: str, max_ops: int | None = None, what: str = "a CIFAR batch") -> None:
    """Walk the opcodes first: the C unpickler allocates what a length field declares before reading it."""
    max_ops = MAX_PICKLE_OPS if max_ops is None else max_ops
    try:
        for i, _ in enumerate(pickletools.genops(data)):
            if i >= max_ops:
                raise CGDError(f"{where}: more than {max_ops} pickle opcodes; not {what}")
    except ValueError as e:
        raise CGDError(f"{where}: corrupt or truncated pickle ({e})") from None


def _read_cifar_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    _check_pickle(data, where)
    try:
        d = _NumpyOnlyUnpickler(data, where).load()
    except CGDError:
        raise
    except Exception as e:  # the unpickler and numpy's array state raise many types on crafted bytes
        raise CGDError(f"{where}: corrupt CIFAR batch ({type(e).__name__}: {e})") from None
    x = d.get(b"data") if isinstance(d, dict) else None
    y = d.get(b"labels") if isinstance(d, dict) else None
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072
            or not isinstance(y, list) or len(y) != len(x) or not all(type(v) is int for v in y)):
        raise CGDError(f"{where}: not a CIFAR batch (a dict with b'data' uint8 (N, 3072) and N integer b'labels')")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(y, dtype=np.int64)


def _cifar_dataset(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Dataset:
    parts = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    xt, yt = batches["test_batch"]
    return Dataset(make_imageset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                 CIFAR10_CLASSES), make_imageset(xt, yt, CIFAR10_CLASSES), name="cifar10")


def _read_cifar_batches(root: Path) -> Dataset:
    return _cifar_dataset({name: _read_cifar_batch(read_capped(root / name, MAX_MEMBER_BYTES, "a CIFAR batch"),
                                                   str(root / name)) for name in CIFAR_BATCHES})


def _idx_header(f, path: Path) -> list[int]:
    head = f.read(4)
    if len(head) != 4 or head[:3] != b"\0\0\x08" or not 1 <= head[3] <= 4:
        raise CGDError(f"{path}: not a uint8 idx file (header {head.hex()})")
    raw = f.read(4 * head[3])
    if len(raw) != 4 * head[3]:
        raise CGDError(f"{path}: truncated idx header")
    return [int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)]


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped idx array; the header's declared size is checked against the cap, then against the data."""
    try:
        with gzip.open(path, "rb") as f:
            dims = _idx_header(f, path)
            n = math.prod(dims)
            if n > MAX_DATASET_BYTES:
                raise CGDError(f"{path}: declares {dims} ({n} bytes), over the {MAX_DATASET_BYTES}-byte cap")
            data = f.read(n + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise CGDError(f"{path}: corrupt or truncated gzip ({type(e).__name__}: {e})") from None
    if len(data) != n:
        raise CGDError(f"{path}: the header declares {dims} ({n} bytes) but the data is "
                       f"{'longer' if len(data) > n else f'{len(data)} bytes'}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_fashion(root: Path) -> Dataset:
    def imgs(stem):
        x = _read_idx(root / f"{stem}-images-idx3-ubyte.gz")
        return np.repeat(x[..., None], 3, axis=-1)

    return Dataset(make_imageset(imgs("train"), _read_idx(root / "train-labels-idx1-ubyte.gz"), FASHION_CLASSES),
                   make_imageset(imgs("t10k"), _read_idx(root / "t10k-labels-idx1-ubyte.gz"), FASHION_CLASSES),
                   name="fashion-mnist")


def _cached(source: Path, reader, name: str | None = None) -> Dataset:
    st = source.stat()
    # ":groups": caches written before the training groups were kept are not reused
    key = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}:groups".encode()).hexdigest()[:16]
    cached = cache_dir("datasets") / f"{source.name.split('.')[0]}-{key}.npz"
    if cached.exists():
        ds = load_npz(cached)
        return Dataset(ds.train, ds.test, name=name or source.name.split(".")[0].split("-")[0])
    ds = reader(source)
    save_npz(ds, cached)
    return ds


NAMED_SETS = {"gtsrb": ("gtsrb.tar.gz",), "tiny-imagenet": ("tiny-imagenet.tar.gz",),
              "imagenette": ("imagenette-subset.tar.gz", "imagenette.tar.gz")}


def default_search_paths() -> list[Path]:
    """Where `load_dataset('cifar10')` looks, in order."""
    paths = []
    if os.environ.get("CGD_DATA"):
        paths.append(Path(os.environ["CGD_DATA"]))
    here = Path.cwd()
    for base in [here, *here.parents][:4]:
        paths.append(base / "shared" / "data")
        paths.append(base.parent / "shared" / "data")
    paths.append(cache_dir("downloads"))
    seen, out = set(), []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def find_fashion_mnist() -> Path | None:
    for d in FASHION_DIRS:
        if (d / "train-images-idx3-ubyte.gz").exists():
            return d
    return None


def load_dataset(spec: str | os.PathLike = "auto") -> Dataset:
    """Load a dataset from a name or a path.

    * a path to an `.npz`, an image folder or tarball (`train|test|val/<class>/<image>`; class names from a
      `classes.txt` inside the folder or `<name>.classes.txt` beside it), or a `cifar-10-batches-py` folder;
    * a BackdoorBench `attack_result.pt` (its poisoned training set and the clean test set; `cgd.records`);
    * `cifar10`: the JPEG tarball or the official archive found in `default_search_paths()`;
    * `gtsrb`, `tiny-imagenet`, `imagenette`: the shared data's tarballs (`NAMED_SETS`) found there, with the class
      names of the README beside each;
    * `fashion-mnist`: Debian's `dataset-fashion-mnist` package;
    * `auto`: CIFAR-10 if found, else Fashion-MNIST.
    """
    spec = str(spec)
    p = Path(spec).expanduser()
    if spec in NAMED_SETS and not p.exists():
        for d in default_search_paths():
            for name in NAMED_SETS[spec]:
                if (d / name).is_file():
                    return load_dataset(d / name)
        raise CGDError(f"{spec}: none of {', '.join(NAMED_SETS[spec])} found in "
                       f"{', '.join(map(str, default_search_paths()))}; set CGD_DATA or give --data PATH")
    if spec not in ("auto", "cifar10", "fashion-mnist") or p.exists():
        if not p.exists():
            raise CGDError(f"data path {p} does not exist")
        if p.is_dir():
            if (p / "data_batch_1").exists():
                return _cached(p / "data_batch_1", lambda _: _read_cifar_batches(p))
            if (p / "cifar-10-batches-py" / "data_batch_1").exists():
                return load_dataset(p / "cifar-10-batches-py")
            if (p / "train").is_dir():
                return _read_image_folder(p)
            raise CGDError(f"{p}: a data folder holds train/<class>/<image> and test/<class>/<image> (val/ for "
                           "test is fine), or is cifar-10-batches-py (data_batch_1..5, test_batch)")
        if p.suffix == ".npz":
            return load_npz(p)
        if p.suffix == ".pt":
            from .records import read_record

            return read_record(p).dataset
        if p.name.endswith((".tar.gz", ".tgz", ".tar")):
            if p.name.startswith("cifar-10-python"):
                return _cached(p, _read_official_archive)
            return _cached(p, _read_image_tarball)
        raise CGDError(f"{p}: unsupported data file; give an .npz, an image tarball, cifar-10-batches-py or a "
                       "BackdoorBench attack_result.pt")
    if spec in ("auto", "cifar10"):
        for d in default_search_paths():
            for name in ("cifar10-jpeg.tar.gz", "cifar-10-python.tar.gz"):
                if (d / name).exists():
                    return load_dataset(d / name)
            if (d / "cifar-10-batches-py").exists():
                return load_dataset(d / "cifar-10-batches-py")
        if spec == "cifar10":
            raise CGDError(_no_data_message())
    fm = find_fashion_mnist()
    if fm is not None:
        return _cached(fm / "train-images-idx3-ubyte.gz", lambda _: _read_fashion(fm), name="fashion-mnist")
    raise CGDError(_no_data_message())


def _no_data_message() -> str:
    where = "\n  ".join(str(d) for d in default_search_paths())
    return ("no dataset found. CIFAR-10 is looked for (cifar10-jpeg.tar.gz, cifar-10-python.tar.gz or "
            f"cifar-10-batches-py) in:\n  {where}\nand Fashion-MNIST in {', '.join(map(str, FASHION_DIRS))}.\n"
            "Point at data with --data PATH (an .npz, an image tarball or cifar-10-batches-py), set CGD_DATA, "
            "run `cgd data fetch cifar10` where the internet is reachable, or `apt-get install dataset-fashion-mnist`.")


def _read_official_archive(path: Path) -> Dataset:
    """`cifar-10-python.tar.gz`: only the six batch members, by name, read in memory; nothing is extracted."""
    wanted = {f"cifar-10-batches-py/{n}": n for n in CIFAR_BATCHES}
    batches = {}
    with _open_tar(path) as tf:
        for m in _members(tf, path):
            name = wanted.get(m.name.removeprefix("./"))
            if name is None:
                continue
            if name in batches:
                raise CGDError(f"{path}: {m.name} appears twice")
            batches[name] = _read_cifar_batch(_member_bytes(tf, m, path), f"{path}:{m.name}")
    missing = [k for k, n in wanted.items() if n not in batches]
    if missing:
        raise CGDError(f"{path}: not the official CIFAR-10 archive: missing {', '.join(missing)}")
    return _cifar_dataset(batches)


def fetch_cifar10(timeout: float = 30.0) -> Path:
    """Download the official CIFAR-10 python archive into the cache and verify its SHA-256."""
    dest = cache_dir("downloads") / "cifar-10-python.tar.gz"
    if dest.exists() and _sha256(dest) == CIFAR10_SHA256:
        return dest
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as r:
            data = r.read(MAX_DOWNLOAD_BYTES + 1)
    except OSError as e:
        raise CGDError(f"could not download {CIFAR10_URL}: {e}. Without internet, copy the archive or the JPEG "
                       "tarball by hand and pass --data PATH (or set CGD_DATA).") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise CGDError(f"{CIFAR10_URL} sent more than {MAX_DOWNLOAD_BYTES} bytes; not the CIFAR-10 archive, not saved")
    digest = hashlib.sha256(data).hexdigest()
    if digest != CIFAR10_SHA256:
        raise CGDError(f"downloaded CIFAR-10 has sha256 {digest}, expected {CIFAR10_SHA256}; not saved")
    atomic_write_bytes(dest, data)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stratified_subset(ds: ImageSet, n: int, seed: int) -> ImageSet:
    """`n` images with the class proportions of `ds`, chosen reproducibly."""
    if n >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    idx = []
    for c in range(ds.num_classes):
        members = np.flatnonzero(ds.labels == c)
        k = int(round(n * len(members) / len(ds)))
        idx.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return ds.subset(np.sort(np.concatenate(idx)))

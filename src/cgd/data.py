"""Image datasets: the `ImageSet` contract and its loaders.

Every loader returns plain arrays: uint8 images (N, H, W, 3), int64 labels (N,), and class names.
Decoding is done once and cached as an uncompressed `.npz` under the cache directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import CGDError
from .io import atomic_write_bytes, cache_dir

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
FASHION_DIRS = [Path("/usr/share/datasets/fashion-mnist")]


@dataclass(frozen=True)
class ImageSet:
    """Images with integer labels. `images` is uint8 (N, H, W, 3); `labels` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        validate(self.images, self.labels, self.class_names)
        self.images.setflags(write=False)
        self.labels.setflags(write=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names))


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


def make_imageset(images, labels, class_names) -> ImageSet:
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64)
    return ImageSet(np.ascontiguousarray(images), labels, [str(c) for c in class_names])


# ----------------------------------------------------------------------------------------------- loaders

def load_npz(path: str | os.PathLike) -> Dataset:
    """Load `x_train, y_train, x_test, y_test, class_names` from an `.npz` (no pickles allowed)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test", "class_names"} - set(z.files)
            if missing:
                raise CGDError(f"{path}: missing arrays {sorted(missing)}; an npz needs x_train (N,H,W,3 uint8), "
                               "y_train, x_test, y_test and class_names")
            names = [str(c) for c in z["class_names"]]
            train = make_imageset(z["x_train"], z["y_train"], names)
            test = make_imageset(z["x_test"], z["y_test"], names)
    except (ValueError, OSError) as e:
        raise CGDError(f"{path}: not a readable npz without pickled objects ({e})") from None
    return Dataset(train, test, name=path.stem)


def save_npz(dataset: Dataset, path: str | os.PathLike, **extra: np.ndarray) -> None:
    """The `.npz` layout `load_npz` reads; `extra` arrays (e.g. `poison_mask`) are stored beside it."""
    buf = io.BytesIO()
    np.savez(buf, x_train=dataset.train.images, y_train=dataset.train.labels, x_test=dataset.test.images,
             y_test=dataset.test.labels, class_names=np.array(dataset.class_names), **extra)
    atomic_write_bytes(Path(path), buf.getvalue())


def _decode_jpeg(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CGDError(f"corrupt image {name}: {e}") from None


def _read_image_tarball(path: Path) -> Dataset:
    """`train|test/<class>/<file>.jpg|png` inside a tar archive; class order = sorted folder names
    (CIFAR-10's canonical order when the folders are CIFAR-10's)."""
    split_items: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            parts = Path(m.name).parts
            parts = parts[parts.index("train") if "train" in parts else parts.index("test") if "test" in parts
                          else 0:]
            if len(parts) != 3 or parts[0] not in split_items:
                continue
            split_items[parts[0]].append((parts[1], parts[2], tf.extractfile(m).read()))
    if not split_items["train"] or not split_items["test"]:
        raise CGDError(f"{path}: expected train/<class>/<image> and test/<class>/<image> entries")
    folders = sorted({c for c, _, _ in split_items["train"]})
    names = CIFAR10_CLASSES if set(folders) == set(CIFAR10_CLASSES) else folders
    out = []
    for split in ("train", "test"):
        items = sorted(split_items[split], key=lambda t: (names.index(t[0]), t[1]))
        imgs = [_decode_jpeg(b, f"{path}:{split}/{c}/{f}") for c, f, b in items]
        if len({im.shape for im in imgs}) != 1:
            raise CGDError(f"{path}: images of different sizes in {split}; resize them to one size first")
        out.append(make_imageset(np.stack(imgs), [names.index(c) for c, _, _ in items], names))
    return Dataset(out[0], out[1], name=path.name.split(".")[0])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: allow only the numpy array constructors they need."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise CGDError(f"refusing to unpickle {module}.{name}: not a CIFAR batch")


def _read_cifar_batches(root: Path) -> Dataset:
    def read(name):
        with open(root / name, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = read("test_batch")
    return Dataset(make_imageset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                 CIFAR10_CLASSES), make_imageset(xt, yt, CIFAR10_CLASSES), name="cifar10")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_fashion(root: Path) -> Dataset:
    def imgs(stem):
        x = _read_idx(root / f"{stem}-images-idx3-ubyte.gz")
        return np.repeat(x[..., None], 3, axis=-1)

    return Dataset(make_imageset(imgs("train"), _read_idx(root / "train-labels-idx1-ubyte.gz"), FASHION_CLASSES),
                   make_imageset(imgs("t10k"), _read_idx(root / "t10k-labels-idx1-ubyte.gz"), FASHION_CLASSES),
                   name="fashion-mnist")


def _cached(source: Path, reader, name: str | None = None) -> Dataset:
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir("datasets") / f"{source.name.split('.')[0]}-{key}.npz"
    if cached.exists():
        ds = load_npz(cached)
        return Dataset(ds.train, ds.test, name=name or source.name.split(".")[0].split("-")[0])
    ds = reader(source)
    save_npz(ds, cached)
    return ds


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

    * a path to an `.npz`, a JPEG tarball (`train|test/<class>/*.jpg`), or a `cifar-10-batches-py` folder;
    * `cifar10`: the JPEG tarball or the official archive found in `default_search_paths()`;
    * `fashion-mnist`: Debian's `dataset-fashion-mnist` package;
    * `auto`: CIFAR-10 if found, else Fashion-MNIST.
    """
    spec = str(spec)
    p = Path(spec).expanduser()
    if spec not in ("auto", "cifar10", "fashion-mnist") or p.exists():
        if not p.exists():
            raise CGDError(f"data path {p} does not exist")
        if p.is_dir():
            if (p / "data_batch_1").exists():
                return _cached(p / "data_batch_1", lambda _: _read_cifar_batches(p))
            if (p / "cifar-10-batches-py" / "data_batch_1").exists():
                return load_dataset(p / "cifar-10-batches-py")
            raise CGDError(f"{p}: a folder must be cifar-10-batches-py (data_batch_1..5, test_batch)")
        if p.suffix == ".npz":
            return load_npz(p)
        if p.name.endswith((".tar.gz", ".tgz", ".tar")):
            if p.name.startswith("cifar-10-python"):
                return _cached(p, _read_official_archive)
            return _cached(p, _read_image_tarball)
        raise CGDError(f"{p}: unsupported data file; give an .npz, an image tarball, or cifar-10-batches-py")
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
    with tarfile.open(path) as tf:
        root = cache_dir("downloads") / "extract"
        tf.extractall(root, filter="data")
    return _read_cifar_batches(root / "cifar-10-batches-py")


def fetch_cifar10(timeout: float = 30.0) -> Path:
    """Download the official CIFAR-10 python archive into the cache and verify its SHA-256."""
    dest = cache_dir("downloads") / "cifar-10-python.tar.gz"
    if dest.exists() and _sha256(dest) == CIFAR10_SHA256:
        return dest
    try:
        with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise CGDError(f"could not download {CIFAR10_URL}: {e}. Without internet, copy the archive or the JPEG "
                       "tarball by hand and pass --data PATH (or set CGD_DATA).") from None
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

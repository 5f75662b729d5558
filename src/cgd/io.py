"""Small file helpers: atomic writes, all-or-nothing output sets, the cache directory, safetensors checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import CGDError


def cache_dir(*parts: str) -> Path:
    """`$CGD_CACHE` (default `~/.cache/cgd`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("CGD_CACHE", Path.home() / ".cache" / "cgd"))
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def keep_writes_in_cache() -> None:
    """Point the libraries that keep caches of their own under the home folder into ours instead (matplotlib's
    font list), and turn off ONNX Runtime's telemetry, which otherwise writes a device id under ~/.cache. Must run
    before those libraries are imported; a user's own settings win."""
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir("matplotlib")))
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_capped(path: Path, cap: int, what: str = "this file") -> bytes:
    """A regular file's bytes, refused when longer than `cap` bytes: the read itself is bounded, not only a stat.
    Opened without blocking, so a FIFO named like a data file cannot hang the tool."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CGDError(f"{path}: not a regular file")
            data = f.read(cap + 1)
    except OSError as e:
        raise CGDError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > cap:
        raise CGDError(f"{path} is larger than {cap:,} bytes: over the cap on {what}")
    return data


def finite_json(obj):
    """`obj` with every NaN or infinite float replaced by None: `json` would write them as `NaN`, which is not
    JSON."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj, **kw) -> str:
    """Strict JSON text of `obj` (numpy values converted, non-finite floats as null)."""
    return json.dumps(finite_json(obj), default=_jsonable, allow_nan=False, **kw)


def write_json(path: Path, obj) -> Path:
    atomic_write_text(path, dumps_json(obj, indent=2) + "\n")
    return Path(path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """numpy arrays to a safetensors file, atomically."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def prepare_dir(path: Path, what: str = "output folder") -> Path:
    """Create the folder `path` (and its parents) or say in one line why it cannot be: it is a file, or the disk
    refuses (read-only, full, no permission). Called before any work, so a doomed run costs nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CGDError(f"{what} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".cgd-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CGDError(f"cannot write into {what} {path}: {e.strerror or e}") from None
    return path


@contextmanager
def staged_outputs(dest: Path, stage_in: Path | None = None):
    """Write a set of outputs all-or-nothing: yields an empty staging folder (inside `stage_in`, default `dest`);
    once the block has written everything there, each file is moved into `dest` — any `metrics.json` last, after
    the old one is removed, so a folder holding `metrics.json` always holds a complete set. If the block fails,
    nothing is moved and the staging folder is removed."""
    dest = Path(dest)
    stage = Path(tempfile.mkdtemp(dir=stage_in or dest, prefix=".staging-"))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        if "metrics.json" in names:
            names.remove("metrics.json")
            names.append("metrics.json")
            (dest / "metrics.json").unlink(missing_ok=True)
        for name in names:
            os.replace(stage / name, dest / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

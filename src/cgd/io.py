"""Small file helpers: atomic writes, the cache directory, safetensors checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir(*parts: str) -> Path:
    """`$CGD_CACHE` (default `~/.cache/cgd`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("CGD_CACHE", Path.home() / ".cache" / "cgd"))
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


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


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """numpy arrays to a safetensors file, atomically."""
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))

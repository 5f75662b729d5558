"""Per-image score cache: rows keyed by the SHA-1 of each image's bytes, in safetensors shards.

One directory per (guide id, guide params, class names, prompt) under `cache_dir("guide-logits")`; each scoring
call appends a shard `rows-*.safetensors` holding `hashes` uint8 (n, 20) and `rows` float32 (n, C). A poisoned copy
of a dataset shares most image hashes with the clean copy, so only its changed images are scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..io import atomic_write_text, cache_dir, load_arrays, save_arrays

HASH_BYTES = 20
MAX_SHARDS = 16


def image_hashes(images: np.ndarray) -> np.ndarray:
    """(N, 20) uint8: SHA-1 of each image's shape and bytes."""
    n = len(images)
    out = np.empty((n, HASH_BYTES), dtype=np.uint8)
    header = repr(tuple(images.shape[1:])).encode()
    flat = np.ascontiguousarray(images).reshape(n, -1)
    for i in range(n):
        h = hashlib.sha1(header)
        h.update(flat[i].data)
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


def cache_key(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class RowCache:
    """Rows of a guide's per-image scores for one key; `lookup` then `store` the missing ones."""

    def __init__(self, key: dict, root: str | os.PathLike | None = None):
        digest = cache_key(key)
        name = f"{key.get('guide', 'guide')}-{digest[:16]}".replace(os.sep, "_")
        self.dir = Path(root) / name if root is not None else cache_dir("guide-logits", name)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "key.json"
        if not meta.exists():
            atomic_write_text(meta, json.dumps(key, indent=2, sort_keys=True, default=str) + "\n")

    def _shards(self) -> list[Path]:
        return sorted(self.dir.glob("rows-*.safetensors"))

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        hashes, rows = [], []
        for path in self._shards():
            try:
                arrays = load_arrays(path)
            except (FileNotFoundError, OSError, ValueError):  # compacted away meanwhile, or unreadable
                continue
            hashes.append(arrays["hashes"])
            rows.append(arrays["rows"])
        if not hashes:
            return np.zeros((0, HASH_BYTES), np.uint8), np.zeros((0, 0), np.float32)
        return np.concatenate(hashes), np.concatenate(rows)

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(rows or None, found mask) for `hashes`; rows of missing images are left as NaN."""
        known_h, known_rows = self._load()
        found = np.zeros(len(hashes), dtype=bool)
        if len(known_h) == 0:
            return None, found
        index = {h.tobytes(): i for i, h in enumerate(known_h)}
        pos = np.array([index.get(h.tobytes(), -1) for h in hashes], dtype=np.int64)
        found = pos >= 0
        rows = np.full((len(hashes), known_rows.shape[1]), np.nan, dtype=np.float32)
        rows[found] = known_rows[pos[found]]
        return rows, found

    def store(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        name = hashlib.sha1(np.ascontiguousarray(hashes).tobytes()).hexdigest()[:16]
        save_arrays(self.dir / f"rows-{name}.safetensors", hashes=hashes, rows=rows.astype(np.float32))
        if len(self._shards()) > MAX_SHARDS:
            self.compact()

    def compact(self) -> None:
        """Merge all shards into one (duplicates dropped)."""
        shards = self._shards()
        if len(shards) <= 1:
            return
        hashes, rows = self._load()
        _, first = np.unique(hashes, axis=0, return_index=True)
        first.sort()
        name = hashlib.sha1(hashes[first].tobytes()).hexdigest()[:16]
        target = self.dir / f"rows-{name}.safetensors"
        save_arrays(target, hashes=hashes[first], rows=rows[first])
        for path in shards:
            if path != target:
                path.unlink(missing_ok=True)

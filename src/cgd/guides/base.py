"""The guide contract and what every guide shares: input validation and the per-image score cache.

A guide turns images into per-class scores for a task's label names:
`class_logits(images uint8 (N, H, W, 3), class_names) -> float32 (N, C)` (log-probabilities or logits).

Subclasses implement `scores` (one independent row per image; what the cache stores) and may override
`finalize` (a step over the whole scored set, e.g. prior balancing, applied after the cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import CGDError
from ..progress import progress
from .cache import RowCache, image_hashes

DEFAULT_PROMPT = "a photo of a {label}"


def check_class_names(class_names) -> list[str]:
    """A clean list of at least two distinct, non-blank label names, or a `CGDError`."""
    if isinstance(class_names, str) or not hasattr(class_names, "__iter__"):
        raise CGDError(f"class_names must be a list of label names; got {type(class_names).__name__}")
    names = list(class_names)
    if len(names) < 2:
        raise CGDError(f"class_names needs at least two labels; got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise CGDError(f"class_names must be non-blank strings; got {bad[:3]!r}")
    seen: dict[str, str] = {}
    for n in names:
        k = " ".join(n.lower().split())
        if k in seen:
            raise CGDError(f"class_names has duplicates: {seen[k]!r} and {n!r}")
        seen[k] = n
    return names


def check_images(images) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        raise CGDError(f"images must be an array of shape (N, H, W, 3); got shape {getattr(images, 'shape', None)}")
    if images.dtype != np.uint8:
        raise CGDError(f"images must be uint8 in 0..255; got dtype {images.dtype}")
    return images


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or "{label}" not in prompt:
        raise CGDError(f"prompt must be a string containing '{{label}}'; got {prompt!r}")
    return prompt


def cached_rows(store: RowCache | None, images: np.ndarray, width: int, compute, chunk_size: int, desc: str
                ) -> np.ndarray:
    """(N, width) rows, one per image: read from `store` where present, else `compute(batch)` for each distinct
    unseen image, in chunks stored as they finish (an interrupted run resumes from the last chunk)."""
    if len(images) == 0:
        return np.zeros((0, width), np.float32)
    hashes = image_hashes(images)
    rows, found = (None, np.zeros(len(images), bool)) if store is None else store.lookup(hashes)
    if rows is None or rows.shape[1] != width:
        rows, found = np.full((len(images), width), np.nan, np.float32), np.zeros(len(images), bool)
    if found.all():
        return rows
    missing = np.flatnonzero(~found)
    _, first, inverse = np.unique(hashes[missing], axis=0, return_index=True, return_inverse=True)
    todo = missing[first]  # each distinct image once
    new = np.empty((len(todo), width), np.float32)
    for start in progress(range(0, len(todo), chunk_size), desc=desc, total=-(-len(todo) // chunk_size)):
        sl = slice(start, start + chunk_size)
        new[sl] = compute(images[todo[sl]])
        if store is not None:
            store.store(hashes[todo[sl]], new[sl])
    rows[missing] = new[inverse.reshape(-1)]
    return rows


class Guide:
    """Base class. `cache`: True (default directory), False, or a directory for the per-image score cache."""

    id: str = "guide"
    chunk_size: int = 2048  # images scored between cache writes (an interrupted run resumes from there)

    def __init__(self, prompt: str = DEFAULT_PROMPT, cache: bool | str | os.PathLike = True):
        self.prompt = check_prompt(prompt)
        self.cache = cache

    # -- to implement
    def params(self) -> dict:
        """Everything besides the images, class names and prompt that changes `scores` (part of the cache key)."""
        return {}

    def scores(self, images: np.ndarray, class_names: list[str]) -> np.ndarray:
        """float32 (N, C); row i must depend on image i only."""
        raise NotImplementedError

    def finalize(self, scores: np.ndarray, class_names: list[str]) -> np.ndarray:
        return scores

    # -- shared
    def cache_key(self, class_names: list[str]) -> dict:
        return {"guide": self.id, "params": self.params(), "class_names": list(class_names), "prompt": self.prompt}

    def row_cache(self, class_names: list[str]) -> RowCache | None:
        if self.cache is False or self.cache is None:
            return None
        root = None if self.cache is True else Path(self.cache)
        return RowCache(self.cache_key(class_names), root)

    def cached_scores(self, images: np.ndarray, class_names: list[str], desc: str | None = None) -> np.ndarray:
        """`scores` for every image, reading and filling the per-image cache; only unseen images are scored."""
        images, class_names = check_images(images), check_class_names(class_names)

        def score(batch):
            out = np.asarray(self.scores(batch, class_names), dtype=np.float32)
            if out.shape != (len(batch), len(class_names)) or not np.isfinite(out).all():
                raise CGDError(f"guide {self.id} returned bad scores: shape {out.shape}, "
                               f"finite {np.isfinite(out).all()}")
            return out

        return cached_rows(self.row_cache(class_names), images, len(class_names), score, self.chunk_size,
                           desc or f"guide {self.id}")

    def class_logits(self, images: np.ndarray, class_names: list[str]) -> np.ndarray:
        """float32 (N, C) log-probabilities or logits over `class_names`."""
        class_names = check_class_names(class_names)
        out = self.finalize(self.cached_scores(images, class_names), class_names)
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

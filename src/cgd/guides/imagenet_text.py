"""The offline default guide: EfficientNet-Lite0 ImageNet probabilities mapped onto the task's labels by text.

score(image, label c) = sum_i softmax(imagenet_logits / temperature)_i * M[i, c], with M the (1000 x C) map of
`text.label_map` (MiniLM similarity of "a photo of a {name}, {WordNet definition}" to the label prompt, hard
threshold, WordNet is-a facts vetoing contradicting matches, and WordNet cousins for labels ImageNet lacks). Over the scored set the class marginals are then
balanced (Sinkhorn-style: divide by the column mean, renormalise rows, repeat) and the log-probabilities returned.
Balancing assumes the scored set covers the task's classes roughly evenly, as a training set does; its weights are
shrunk toward 1 for small sets (`balance_prior`), and `balance=0` turns it off.

Defaults were chosen on 3,000 CIFAR-10 *training* images (see benchmarks/guide_quality.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import CGDError
from . import efficientnet as ef
from . import text as tx
from .base import DEFAULT_PROMPT, Guide, cached_rows, check_images
from .cache import RowCache, image_hashes


class ImageNetTextGuide(Guide):
    """The offline default: EfficientNet-Lite0's ImageNet probabilities mapped onto the task's class names by
    MiniLM text similarity (no CLIP weights needed)."""

    id = "imagenet-text"

    def __init__(self, resolution: int = 160, temperature: float = 2.0, text: str = "definition",
                 mode: str = "hard", threshold: float = 0.6, tau: float = 0.1, isa: str = "veto", cousins: bool = True,
                 balance: int = 10, balance_prior: float = 200.0, eps: float = 0.01, resize: str = "bicubic",
                 prompt: str = DEFAULT_PROMPT, batch_size: int = 32, threads: int | None = None,
                 weights_path: str | os.PathLike | None = None, cache: bool | str | os.PathLike = True):
        super().__init__(prompt=prompt, cache=cache)
        self.resolution = ef.check_resolution(resolution)
        if not temperature > 0:
            raise CGDError(f"temperature must be > 0; got {temperature}")
        if not 0 <= eps < 1:
            raise CGDError(f"eps must be in [0, 1); got {eps}")
        if text not in ("name", "definition") or mode not in ("hard", "soft") or resize not in ("bicubic", "bilinear"):
            raise CGDError(f"bad imagenet-text option: text={text!r} (name|definition), mode={mode!r} (hard|soft), "
                           f"resize={resize!r} (bicubic|bilinear)")
        if isa not in tx.ISA_MODES:
            raise CGDError(f"unknown isa mode {isa!r}; use one of {', '.join(tx.ISA_MODES)}")
        self.temperature, self.text, self.mode = float(temperature), text, mode
        self.threshold, self.tau, self.isa, self.cousins = float(threshold), float(tau), isa, bool(cousins)
        self.balance, self.balance_prior, self.eps = int(balance), float(balance_prior), float(eps)
        self.resize, self.batch_size, self.threads = resize, int(batch_size), threads
        self.weights_path = Path(weights_path) if weights_path else None
        self._runner = None
        self._maps: dict[tuple, np.ndarray] = {}

    def params(self) -> dict:
        weights = self.weights_path or ef.default_weights_path()
        return {"resolution": self.resolution, "temperature": self.temperature, "text": self.text,
                "mode": self.mode, "threshold": self.threshold, "tau": self.tau, "isa": self.isa,
                "cousins": self.cousins, "resize": self.resize,
                "weights": f"{Path(weights).name}:{Path(weights).stat().st_size}"}

    # -- the image side
    @property
    def runner(self) -> ef.Runner:
        if self._runner is None:
            self._runner = ef.Runner(ef.onnx_path(self.resolution, self.weights_path), self.resolution, self.resize,
                                     self.threads, self.batch_size)
        return self._runner

    def imagenet_logits(self, images: np.ndarray) -> np.ndarray:
        """(N, 1000) float32 ImageNet logits (the pooled features of the same pass are cached on the way)."""
        logits, feats = self.runner(images)
        self._store_features(images, feats)
        return logits

    def _feature_cache(self) -> RowCache | None:
        if self.cache is False or self.cache is None:
            return None
        p = self.params()
        key = {"guide": f"{self.id}-features", "params": {k: p[k] for k in ("resolution", "resize", "weights")}}
        return RowCache(key, None if self.cache is True else Path(self.cache))

    def _store_features(self, images: np.ndarray, feats: np.ndarray) -> None:
        store = self._feature_cache()
        if store is not None:
            store.store(image_hashes(images), feats)

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, 1280) float32 EfficientNet-Lite0 pooled features (for the probe refinement), cached per image."""
        return cached_rows(self._feature_cache(), check_images(images), 1280, lambda batch: self.runner(batch)[1],
                           self.chunk_size, "guide features")

    # -- the text side
    def label_map(self, class_names: list[str]) -> np.ndarray:
        key = (tuple(class_names), self.prompt)
        if key not in self._maps:
            self._maps[key] = tx.label_map(class_names, self.prompt, self.text, self.mode, self.threshold, self.tau,
                                           self.isa, self.cousins)
        return self._maps[key]

    # -- the Guide contract
    def scores(self, images: np.ndarray, class_names: list[str]) -> np.ndarray:
        z = self.imagenet_logits(images).astype(np.float64) / self.temperature
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return (p @ self.label_map(class_names)).astype(np.float32)

    def finalize(self, scores: np.ndarray, class_names: list[str]) -> np.ndarray:
        return balance_log_probs(scores, self.balance, self.balance_prior, self.eps)


def balance_weights(scores: np.ndarray, iterations: int = 10) -> np.ndarray:
    """(C,) column weights that make the class marginals of the row-normalised scores equal (Sinkhorn)."""
    q = np.asarray(scores, dtype=np.float64) + 1e-12
    q /= q.sum(1, keepdims=True)
    w = np.ones(q.shape[1])
    for _ in range(iterations if len(q) else 0):
        m = q.mean(0)
        q /= m
        w /= m
        q /= q.sum(1, keepdims=True)
    return w / np.exp(np.log(w).mean())


def balance_log_probs(scores: np.ndarray, iterations: int = 10, prior: float = 200.0, eps: float = 0.01) -> np.ndarray:
    """Row-normalised log-probabilities with the class marginals over the set equalised.

    The balancing weights (`balance_weights`) are shrunk toward 1 as w ** (N / (N + prior)), so a small set
    (or one with few classes) is barely re-weighted while a training set of thousands is fully balanced.
    `eps` of the uniform distribution is mixed in; the result is float32 and finite.
    """
    q = np.asarray(scores, dtype=np.float64) + 1e-12
    n, c = q.shape
    if iterations > 0 and n > 0:
        q = q * balance_weights(q, iterations) ** (n / (n + prior))
    q /= q.sum(1, keepdims=True)
    return np.log((1 - eps) * q + eps / c + 1e-30).astype(np.float32)

"""The attack interface: one class per attack, one `PoisonedSet` out.

An attack chooses which training samples to poison (`select`), changes their images (`apply_trigger`) and, for
poison-label attacks, their labels (to `target`). At test time the same trigger is applied to the non-target test
images; the attack succeeds on a model that then predicts `target` (ASR).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import CGDError
from ..data import ImageSet
from ..poisoned import PoisonedSet
from ..registry import Registry

ATTACKS: Registry["Attack"] = Registry("attack")


def get(name: str, **params) -> "Attack":
    """`cgd.attacks.get("badnets", target=0, rate=0.05)`."""
    return ATTACKS.get(name, **params)


class Attack:
    """Base class. Subclasses set `name`, `clean_label`, and implement `apply_trigger`."""

    name = "base"
    clean_label = False  # True: labels untouched, only samples of the target class are poisoned

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0):
        if not 0 < rate < 1:
            raise CGDError(f"poison rate must be in (0, 1); got {rate}")
        self.target = int(target)
        self.rate = float(rate)
        self.seed = int(seed)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def select(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices to poison: `rate`·N non-target samples (poison-label) or a share of the target class (clean-label)."""
        pool = np.flatnonzero(labels == self.target) if self.clean_label else np.flatnonzero(labels != self.target)
        n = self.count(len(labels), len(pool))
        if n > len(pool):
            raise CGDError(f"{self.name}: asked to poison {n} samples but only {len(pool)} are eligible")
        return np.sort(rng.choice(pool, size=n, replace=False))

    def count(self, n_total: int, n_pool: int) -> int:
        return int(round(self.rate * n_total))

    def poison(self, ds: ImageSet) -> PoisonedSet:
        if not 0 <= self.target < ds.num_classes:
            raise CGDError(f"target class {self.target} is outside 0..{ds.num_classes - 1}")
        rng = np.random.default_rng(self.seed)
        idx = self.select(ds.labels, rng)
        images = np.array(ds.images)
        labels = np.array(ds.labels)
        images[idx] = self.apply_trigger(images[idx])
        if not self.clean_label:
            labels[idx] = self.target
        mask = np.zeros(len(ds), dtype=bool)
        mask[idx] = True
        return PoisonedSet(ImageSet(images, labels, list(ds.class_names)), mask, self.target, self.name,
                           self.params(), self.apply_trigger)


def blend(images: np.ndarray, pattern: np.ndarray, alpha) -> np.ndarray:
    """(1-α)·x + α·pattern, rounded back to uint8; `alpha` may be a scalar or a per-pixel mask."""
    out = (1.0 - alpha) * images.astype(np.float32) + alpha * pattern.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

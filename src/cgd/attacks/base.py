"""The attack interface: one class per attack, one `PoisonedSet` out.

`Attack.poison` is the one poisoning skeleton; an attack changes it through small hooks:

1. `prepare(ds)`: train or load what the trigger needs (only the `learned` attacks; cached, see `resources.py`);
2. `draw(ds, rng)`: which samples to poison (`select`: `eligible`, `count`, `choose`) and which to add as cross
   ("noise") samples that are altered but keep their labels (`cross_count`), plus any partner images drawn with them;
3. `poisoned_images` / `cross_images`: the new images of those samples (by default `apply_trigger`);
4. labels change to `target` unless the attack is `clean_label`; `finish` wraps the result in a `PoisonedSet`.

Every hook draws from one generator seeded with `seed`, in that order. At test time `apply_trigger` is applied to
the non-target test images; the attack succeeds on a model that then predicts `target` (ASR).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Draw:
    """The samples `Attack.draw` chose: sorted indices into the training set."""

    idx: np.ndarray                            # poisoned samples (relabelled unless clean-label)
    cross: np.ndarray | None = None            # cross/noise samples, labels kept; None: the attack has none
    partners: np.ndarray | None = None         # per poisoned sample, a second image to combine with (FMB)
    cross_partners: np.ndarray | None = None   # likewise per cross sample


class Attack:
    """Base class. Subclasses set `name` and `clean_label`, implement `apply_trigger`, and override the hooks of
    `poison` they need (see the module docstring)."""

    name = "base"
    clean_label = False  # True: labels untouched, only samples of the target class are poisoned
    clean_image = False  # True: images untouched, only labels change (FLIP, GCB)
    learned = False      # True: `prepare` trains the trigger's networks on the training set (cached)
    _fp: str | None = None  # learned attacks: the fingerprint of the data `prepare` last ran on

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

    # ----------------------------------------------------------------------------------- the template
    def poison(self, ds: ImageSet) -> PoisonedSet:
        self.check_target(ds)
        if self.learned:
            from .resources import fingerprint

            if self._fp != fingerprint(ds):
                self.prepare(ds)
        rng = np.random.default_rng(self.seed)
        d = self.draw(ds, rng)
        images = ds.images
        if not self.clean_image:
            images = np.array(ds.images)
            images[d.idx] = self.poisoned_images(ds, d, rng)
            if d.cross is not None:
                images[d.cross] = self.cross_images(ds, d, rng)
        labels = np.array(ds.labels)
        if not self.clean_label:
            labels[d.idx] = self.target
        cross_mask = None if d.cross is None else index_mask(d.cross, len(ds))
        return self.finish(ds, ImageSet(images, labels, list(ds.class_names), ds.groups),
                           index_mask(d.idx, len(ds)), cross_mask, rng)

    # ---------------------------------------------------------------------------------------- hooks
    def check_target(self, ds: ImageSet) -> None:
        if not 0 <= self.target < ds.num_classes:
            raise CGDError(f"target class {self.target} is outside 0..{ds.num_classes - 1}")

    def prepare(self, ds: ImageSet) -> list:
        """Load or generate the trigger's resources on the training set `ds` (the `learned` attacks) and return the
        cache `Resource`s touched; sets `_fp` to the data's fingerprint. The other attacks need none."""
        return []

    def draw(self, ds: ImageSet, rng: np.random.Generator) -> Draw:
        idx = self.select(ds, rng)
        return Draw(idx, self.pick_cross(ds, idx, rng))

    def select(self, ds: ImageSet, rng: np.random.Generator) -> np.ndarray:
        """The sorted indices to poison: `count` of the `eligible` samples, picked by `choose`."""
        pool = self.eligible(ds)
        n = self.count(len(ds), len(pool))
        if n > len(pool):
            raise CGDError(f"{self.name}: asked to poison {n} samples but only {len(pool)} are eligible "
                           f"({self.eligible_what(ds)} images)")
        return self.choose(ds, pool, n, rng)

    def eligible(self, ds: ImageSet) -> np.ndarray:
        """The samples that may be poisoned: the target class (clean-label) or every other class."""
        return np.flatnonzero((ds.labels == self.target) if self.clean_label else (ds.labels != self.target))

    def eligible_what(self, ds: ImageSet) -> str:
        return "target-class" if self.clean_label else "non-target"

    def count(self, n_total: int, n_pool: int) -> int:
        """How many to poison: `rate`·N (poison-label), or a share `rate` of the target class (clean-label)."""
        return int(round(self.rate * (n_pool if self.clean_label else n_total)))

    def choose(self, ds: ImageSet, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.sort(rng.choice(pool, size=n, replace=False))

    def cross_count(self, n_total: int, n_poison: int) -> int | None:
        """How many cross samples to add; None: the attack has none (no `cross_mask`)."""
        return None

    def pick_cross(self, ds: ImageSet, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """`cross_count` sorted indices drawn without replacement from the samples not in `idx` (any class)."""
        count = self.cross_count(len(ds), len(idx))
        if count is None:
            return None
        pool = np.flatnonzero(~index_mask(idx, len(ds)))
        if count > len(pool):
            raise CGDError(f"{self.name}: needs {count} extra (noise) samples but only {len(pool)} unpoisoned "
                           "samples remain; lower the poison rate or the noise ratio")
        return np.sort(rng.choice(pool, size=count, replace=False))

    def poisoned_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        """The new images of the poisoned samples `d.idx` (read from `ds`, never from the images being written)."""
        return self.apply_trigger(ds.images[d.idx])

    def cross_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        """The new images of the cross samples `d.cross`; only attacks with a `cross_count` implement it."""
        raise NotImplementedError

    def finish(self, ds: ImageSet, train: ImageSet, mask: np.ndarray, cross_mask: np.ndarray | None,
               rng: np.random.Generator) -> PoisonedSet:
        return PoisonedSet(train, mask, self.target, self.name, self.params(), self.apply_trigger, cross_mask)


# ------------------------------------------------------------------------------------------ helpers

def index_mask(idx: np.ndarray, n: int) -> np.ndarray:
    """A boolean mask of length n, True at `idx`."""
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and clip float pixels back to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def blend(images: np.ndarray, pattern: np.ndarray, alpha) -> np.ndarray:
    """(1-α)·x + α·pattern, rounded back to uint8; `alpha` may be a scalar or a per-pixel mask."""
    return to_uint8((1.0 - alpha) * images.astype(np.float32) + alpha * pattern.astype(np.float32))

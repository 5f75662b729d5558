"""`PoisonedSet`: a poisoned training set and its trigger, apart from the attacks that make one.

Defending and evaluating need only this class; importing it here keeps `import cgd.pipeline` from loading every attack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .data import ImageSet


@dataclass(frozen=True)
class PoisonedSet:
    """A poisoned training set and everything needed to measure the attack."""

    train: ImageSet
    poison_mask: np.ndarray
    target: int
    attack: str
    params: dict[str, Any]
    trigger: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    cross_mask: np.ndarray | None = None  # WaNet/IAB "noise" samples: altered images, labels kept

    @property
    def poison_rate(self) -> float:
        return float(self.poison_mask.mean())

    def triggered_test(self, test: ImageSet) -> ImageSet:
        """Non-target test images with the trigger applied, labelled `target`: accuracy on it is the ASR."""
        keep = test.labels != self.target
        x = self.trigger(np.ascontiguousarray(test.images[keep]))
        return ImageSet(x, np.full(int(keep.sum()), self.target, dtype=np.int64), list(test.class_names))

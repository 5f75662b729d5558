"""BadNets, Blend and SIG: the three classic attacks."""

from __future__ import annotations

import numpy as np

from .base import ATTACKS, Attack, blend, to_uint8


@ATTACKS.register("badnets")
class BadNets(Attack):
    """A small white square (default 3×3) stamped in the bottom-right corner; labels flipped to the target."""

    name = "badnets"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, size: int = 3, margin: int = 0,
                 value: int = 255):
        super().__init__(target, rate, seed)
        self.size, self.margin, self.value = int(size), int(margin), int(value)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        out = np.array(images)
        h, w = out.shape[1:3]
        r0, c0 = h - self.margin - self.size, w - self.margin - self.size
        out[:, r0:r0 + self.size, c0:c0 + self.size, :] = self.value
        return out


@ATTACKS.register("clean")
class Clean(BadNets):
    """No poison: the training set as given — the control for what a defense costs on clean data. Its test trigger
    is BadNets' patch, so the ASR column reads a clean model's response to a patch it never learned (`rate` is
    ignored)."""

    name = "clean"

    def count(self, n_total: int, n_pool: int) -> int:
        return 0


@ATTACKS.register("blend")
class Blend(Attack):
    """The whole image blended with a fixed random pattern, x' = (1-α)x + α·pattern (α = 0.2)."""

    name = "blend"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, alpha: float = 0.2,
                 pattern_seed: int = 1234):
        super().__init__(target, rate, seed)
        self.alpha, self.pattern_seed = float(alpha), int(pattern_seed)

    def pattern(self, h: int, w: int) -> np.ndarray:
        return np.random.default_rng(self.pattern_seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return blend(images, self.pattern(*images.shape[1:3]), self.alpha)


@ATTACKS.register("sig")
class SIG(Attack):
    """Clean-label: a horizontal sinusoid δ·sin(2π·j·f/W) added to half of the target class's images."""

    name = "sig"
    clean_label = True

    def __init__(self, target: int = 0, rate: float = 0.5, seed: int = 0, delta: float = 40.0, freq: float = 6.0):
        super().__init__(target, rate, seed)
        self.delta, self.freq = float(delta), float(freq)

    def signal(self, w: int) -> np.ndarray:
        return self.delta * np.sin(2 * np.pi * np.arange(w) * self.freq / w).astype(np.float32)

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return to_uint8(images.astype(np.float32) + self.signal(images.shape[2])[None, None, :, None])

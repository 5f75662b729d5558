"""A deliberately weakened guide (the paper's weak-guide study, §5.4.1): another guide's logits plus Gumbel noise.

The noise of each image is drawn from a generator seeded by (seed, the image's SHA-1), so it is reproducible and
does not depend on batch order or on which other images are scored with it.
"""

from __future__ import annotations

import numpy as np

from .. import CGDError
from .base import Guide, check_class_names, check_images
from .cache import image_hashes
from .quality import log_softmax


class NoisyGuide(Guide):
    id = "noisy"

    def __init__(self, guide: Guide, gumbel_scale: float = 1.0, seed: int = 0):
        if not hasattr(guide, "class_logits"):
            raise CGDError(f"noisy needs a guide to wrap; got {type(guide).__name__}")
        if not gumbel_scale >= 0:
            raise CGDError(f"gumbel_scale must be >= 0; got {gumbel_scale}")
        self.guide, self.gumbel_scale, self.seed = guide, float(gumbel_scale), int(seed)
        self.prompt = getattr(guide, "prompt", None)
        self.cache = False  # the wrapped guide caches; the noise is cheap and derived from the image hashes

    def params(self) -> dict:
        inner = self.guide.params() if hasattr(self.guide, "params") else {}
        return {"guide": getattr(self.guide, "id", type(self.guide).__name__), "guide_params": inner,
                "gumbel_scale": self.gumbel_scale, "seed": self.seed}

    def noise(self, images: np.ndarray, num_classes: int) -> np.ndarray:
        """(N, C) standard Gumbel samples, one generator per image keyed by (seed, image hash)."""
        out = np.empty((len(images), num_classes), np.float64)
        for i, h in enumerate(image_hashes(images)):
            words = np.frombuffer(h.tobytes()[:16], dtype=np.uint32)
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, *words.tolist()]))
            out[i] = rng.gumbel(size=num_classes)
        return out

    def class_logits(self, images: np.ndarray, class_names: list[str]) -> np.ndarray:
        images, class_names = check_images(images), check_class_names(class_names)
        base = np.asarray(self.guide.class_logits(images, class_names), np.float64)
        noisy = base + self.gumbel_scale * self.noise(images, len(class_names))
        return log_softmax(noisy).astype(np.float32)

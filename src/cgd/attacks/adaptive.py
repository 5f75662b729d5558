"""Adaptive attacks aimed at CGD itself (paper §5.5, appendix B): Ada-SIG and the feature-mixing backdoor (FMB).

* Ada-SIG weakens the SIG trigger on the training images only — random patch masking and/or half opacity, in the
  spirit of Adaptive-Blend (Qi et al., ICLR 2023) — so that poisoned samples look less confident to the suspicious
  model; at test time the full SIG trigger is used.
* FMB (the composite backdoor of Lin et al., CCS 2020): the "trigger" is the co-occurrence of two benign classes.
  Half of an image of class A is put next to half of an image of class B and the result is labelled C (the target);
  self-mixes (two images of one class, label kept) teach the model that mixing alone means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import CGDError
from ..data import ImageSet
from .base import ATTACKS, Attack, Draw, PoisonedSet, to_uint8
from .classic import SIG

ADA_SIG_MODES = ("patch", "opacity", "both")
FMB_MODES = ("one-to-one", "all-to-one")
FMB_ORIENTATIONS = ("random", "vertical", "horizontal")
N_REFERENCES = 256  # training images FMB keeps as second halves for its label-blind `apply_trigger`


@ATTACKS.register("ada-sig")
class AdaSIG(SIG):
    """Clean-label SIG (δ = 40, f = 6) on a share `rate` of the target class, weakened at training time only.

    `mode="patch"` (Rand-Patch): the image is cut into a √pieces×√pieces grid and a fresh random `mask_rate` share of
    the pieces (exactly round(pieces·mask_rate)) carries no trigger, per sample. `mode="opacity"` (Rand-Opacity): the
    trigger is added at `opacity`·δ. `mode="both"`: both. The test-time trigger is the full SIG signal.
    """

    name = "ada-sig"

    def __init__(self, target: int = 0, rate: float = 0.5, seed: int = 0, delta: float = 40.0, freq: float = 6.0,
                 mode: str = "both", pieces: int = 16, mask_rate: float = 0.5, opacity: float = 0.5):
        super().__init__(target, rate, seed, delta, freq)
        if mode not in ADA_SIG_MODES:
            raise CGDError(f"ada-sig: mode must be one of {', '.join(ADA_SIG_MODES)}; got {mode!r}")
        self.mode = mode
        self.pieces = int(pieces)
        side = int(round(np.sqrt(self.pieces)))
        if self.pieces < 1 or side * side != self.pieces:
            raise CGDError(f"ada-sig: pieces must be a perfect square (a k×k grid); got {pieces}")
        self.mask_rate = float(mask_rate)
        if not 0 <= self.mask_rate < 1:
            raise CGDError(f"ada-sig: mask_rate must be in [0, 1); got {mask_rate}")
        self.opacity = float(opacity)
        if not 0 < self.opacity <= 1:
            raise CGDError(f"ada-sig: opacity must be in (0, 1]; got {opacity}")

    def piece_masks(self, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        """(n, H, W) float32: 1 where the trigger stays, 0 on the round(pieces·mask_rate) masked pieces."""
        side = int(round(np.sqrt(self.pieces)))
        n_masked = int(round(self.pieces * self.mask_rate))
        order = rng.random((n, self.pieces)).argsort(axis=1)
        keep = np.ones((n, self.pieces), dtype=np.float32)
        np.put_along_axis(keep, order[:, :n_masked], 0.0, axis=1)
        piece_of = (np.arange(h)[:, None] * side // h) * side + (np.arange(w)[None, :] * side // w)  # (H, W)
        return keep[:, piece_of]

    def weakened_trigger(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, h, w = images.shape[:3]
        amp = np.ones((n, h, w), dtype=np.float32)
        if self.mode in ("patch", "both"):
            amp = self.piece_masks(n, h, w, rng)
        if self.mode in ("opacity", "both"):
            amp = amp * self.opacity
        out = images.astype(np.float32) + amp[..., None] * self.signal(w)[None, None, :, None]
        return to_uint8(out)

    def poisoned_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        return self.weakened_trigger(ds.images[d.idx], rng)


# ----------------------------------------------------------------------------------------------------------- FMB

def _window_concat(first: np.ndarray, second: np.ndarray, axis: int, rng: np.random.Generator,
                   jitter: int) -> np.ndarray:
    """Cut line across `axis` (1: rows, 2: columns) near the middle (± jitter); before it a random window of `first`
    of that length, after it a random window of `second`."""
    n, length = first.shape[0], first.shape[axis]
    split = np.clip(length // 2 + rng.integers(-jitter, jitter + 1, size=n), 1, length - 1)
    off_first = (rng.random(n) * (length - split + 1)).astype(np.int64)   # window start in 0..length-split
    off_second = (rng.random(n) * (split + 1)).astype(np.int64)           # window start in 0..split
    pos = np.arange(length)[None, :]
    take_first = pos < split[:, None]
    idx_first = np.clip(off_first[:, None] + pos, 0, length - 1)
    idx_second = np.clip(off_second[:, None] + pos - split[:, None], 0, length - 1)
    shape = (n, length, 1, 1) if axis == 1 else (n, 1, length, 1)
    a = np.take_along_axis(first, idx_first.reshape(shape), axis=axis)
    b = np.take_along_axis(second, idx_second.reshape(shape), axis=axis)
    return np.where(take_first.reshape(shape), a, b)


def half_mix(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, jitter: int = 3,
             orientation: str = "random") -> np.ndarray:
    """Half-and-half spatial concatenation of image pairs (a[i], b[i]), uint8 (N, H, W, 3).

    Per pair, at random: which image comes first (left/top), a vertical or horizontal cut (unless `orientation`
    fixes it), the cut position (middle ± jitter), and which window of each source image is shown.
    """
    n = len(a)
    swap = rng.random(n) < 0.5
    first = np.where(swap[:, None, None, None], b, a)
    second = np.where(swap[:, None, None, None], a, b)
    if orientation == "random":
        vertical = rng.random(n) < 0.5
    else:
        vertical = np.full(n, orientation == "vertical")
    out = np.empty_like(a)
    for is_vertical, axis in ((True, 2), (False, 1)):
        sel = np.flatnonzero(vertical == is_vertical)
        if len(sel):
            out[sel] = _window_concat(first[sel], second[sel], axis, rng, jitter)
    return out


def _partner_same_class(rng: np.random.Generator, who: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each index in `who`, a random *other* index with the same label (itself only if its class is a singleton)."""
    order = np.argsort(labels, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    counts = np.bincount(labels, minlength=labels.max() + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    c = counts[labels[who]]
    r = rng.integers(0, np.maximum(c - 1, 1))
    own = rank[who] - starts[labels[who]]
    r = np.where((c > 1) & (r >= own), r + 1, r)
    return order[starts[labels[who]] + r]


def _partner_other_class(rng: np.random.Generator, own_labels: np.ndarray, cand: np.ndarray,
                         cand_labels: np.ndarray, who: str) -> np.ndarray:
    """For each label in `own_labels`, a random candidate index whose label differs from it."""
    order = np.argsort(cand_labels, kind="stable")
    cand, cand_labels = cand[order], cand_labels[order]
    size = max(int(cand_labels.max(initial=-1)), int(own_labels.max(initial=-1))) + 1
    counts = np.bincount(cand_labels, minlength=size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_other = len(cand) - counts[own_labels]
    if np.any(n_other <= 0):
        raise CGDError(f"{who}: all-to-one mixing needs images of at least two non-target classes")
    r = rng.integers(0, n_other)
    r = np.where(r >= starts[own_labels], r + counts[own_labels], r)
    return cand[r]


@dataclass(frozen=True)
class MixedPoisonedSet(PoisonedSet):
    """A `PoisonedSet` whose test trigger needs the test labels: FMB mixes each test image with a partner chosen by
    class, so `triggered_test` delegates to the attack. `trigger` (label-blind) stays available for single images."""

    mix_test: Callable[[ImageSet], ImageSet] | None = field(default=None, repr=False)

    def triggered_test(self, test: ImageSet) -> ImageSet:
        return self.mix_test(test)


@ATTACKS.register("fmb")
class FMB(Attack):
    """Feature-mixing (composite) backdoor. Mixing is the composite attack's half-concatenation ("HalfMixer"), not a
    pixel average: the left/top part comes from one image and the right/bottom part from the other.

    `mode="one-to-one"`: round(rate·N) images of class `class_a` are mixed with random images of `class_b` and
    relabelled `target`. `mode="all-to-one"`: round(rate·N) non-target images are each mixed with an image of a
    different non-target class and relabelled `target`. In both, round(self_mix_rate·N) other samples (any class)
    are replaced by a mix with another image of their own class, labels kept (`cross_mask`).
    Default classes: the two smallest class ids other than `target` (class_b only matters for one-to-one and for the
    label-blind `apply_trigger`).

    Test time, label-aware (`PoisonedSet.triggered_test`): one-to-one mixes every class-A test image with a random
    class-B test image; all-to-one mixes every non-target test image with a random test image of another non-target
    class; all labelled `target`. Label-blind (`apply_trigger`, e.g. for a single image): the image is mixed with a
    reference training image — of class B for one-to-one, of any non-target class for all-to-one — kept by `poison`.
    """

    name = "fmb"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, mode: str = "one-to-one",
                 class_a: int | None = None, class_b: int | None = None, self_mix_rate: float = 0.5,
                 jitter: int = 3, orientation: str = "random"):
        super().__init__(target, rate, seed)
        if mode not in FMB_MODES:
            raise CGDError(f"fmb: mode must be one of {', '.join(FMB_MODES)}; got {mode!r}")
        if orientation not in FMB_ORIENTATIONS:
            raise CGDError(f"fmb: orientation must be one of {', '.join(FMB_ORIENTATIONS)}; got {orientation!r}")
        self.mode = mode
        self.class_a = None if class_a is None else int(class_a)
        self.class_b = None if class_b is None else int(class_b)
        if self.class_a is not None and self.class_a == self.class_b:
            raise CGDError(f"fmb: class_a and class_b must differ; both are {self.class_a}")
        if self.target in (self.class_a, self.class_b):
            raise CGDError(f"fmb: the mixed classes must differ from the target class {self.target}")
        self.self_mix_rate = float(self_mix_rate)
        if not 0 <= self.self_mix_rate < 1 or self.rate + self.self_mix_rate > 1:
            raise CGDError(f"fmb: self_mix_rate must be in [0, 1) with rate + self_mix_rate <= 1; "
                           f"got {self_mix_rate} (rate {self.rate})")
        self.jitter = int(jitter)
        if self.jitter < 0:
            raise CGDError(f"fmb: jitter must be >= 0 pixels; got {jitter}")
        self.orientation = orientation
        self._references: np.ndarray | None = None

    def classes(self, num_classes: int) -> tuple[int, int]:
        """(class_a, class_b), filling unset ones with the smallest class ids that are neither target nor taken."""
        free = [c for c in range(num_classes) if c not in (self.target, self.class_a, self.class_b)]
        a = self.class_a if self.class_a is not None else free.pop(0) if free else None
        b = self.class_b if self.class_b is not None else free.pop(0) if free else None
        if a is None or b is None or max(a, b) >= num_classes:
            raise CGDError(f"fmb: needs two classes besides the target among {num_classes}; got A={a}, B={b}")
        return a, b

    def mix(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return half_mix(a, b, rng, self.jitter, self.orientation)

    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream])

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        if self._references is None:
            raise CGDError("fmb: the label-blind trigger mixes with reference training images; call poison() first "
                           "(or use PoisonedSet.triggered_test, which needs no references)")
        refs = self._references
        if refs.shape[1:] != images.shape[1:]:
            raise CGDError(f"fmb: images are {images.shape[1:3]} but the references are {refs.shape[1:3]}")
        rng = self._rng(1)
        return self.mix(images, refs[rng.integers(0, len(refs), size=len(images))], rng)

    def mix_test(self, test: ImageSet) -> ImageSet:
        """The label-aware triggered test set (see the class docstring)."""
        a, b = self.classes(test.num_classes)
        rng = self._rng(2)
        labels = test.labels
        if self.mode == "one-to-one":
            keep = np.flatnonzero(labels == a)
            pool = np.flatnonzero(labels == b)
            if len(pool) == 0:
                raise CGDError(f"fmb: the test set has no image of class {b} to mix with")
            partners = pool[rng.integers(0, len(pool), size=len(keep))]
        else:
            keep = np.flatnonzero(labels != self.target)
            partners = _partner_other_class(rng, labels[keep], keep, labels[keep], self.name)
        x = self.mix(test.images[keep], test.images[partners], rng)
        return ImageSet(x, np.full(len(keep), self.target, dtype=np.int64), list(test.class_names))

    # ------------------------------------------------------------------------ the hooks of Attack.poison
    def _partner_pool(self, ds: ImageSet) -> np.ndarray:
        """Where the second halves come from: class B (one-to-one) or every non-target class (all-to-one)."""
        if self.mode == "one-to-one":
            return np.flatnonzero(ds.labels == self.classes(ds.num_classes)[1])
        return np.flatnonzero(ds.labels != self.target)

    def eligible(self, ds: ImageSet) -> np.ndarray:
        a, b = self.classes(ds.num_classes)
        if self.mode == "all-to-one":
            return np.flatnonzero(ds.labels != self.target)
        if not np.any(ds.labels == b):
            raise CGDError(f"fmb: the training set has no image of class {b}")
        return np.flatnonzero(ds.labels == a)

    def eligible_what(self, ds: ImageSet) -> str:
        return f"class {self.classes(ds.num_classes)[0]}" if self.mode == "one-to-one" else "non-target"

    def cross_count(self, n_total: int, n_poison: int) -> int:
        return int(round(self.self_mix_rate * n_total))

    def draw(self, ds: ImageSet, rng: np.random.Generator) -> Draw:
        """The poisoned samples each with a partner of another class, then the self-mixes with one of their own."""
        idx = self.select(ds, rng)
        pool = self._partner_pool(ds)
        if self.mode == "one-to-one":
            partners = pool[rng.integers(0, len(pool), size=len(idx))]
        else:
            partners = _partner_other_class(rng, ds.labels[idx], pool, ds.labels[pool], self.name)
        cross = self.pick_cross(ds, idx, rng)
        return Draw(idx, cross, partners, _partner_same_class(rng, cross, ds.labels))

    def poisoned_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        return self.mix(ds.images[d.idx], ds.images[d.partners], rng)

    def cross_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        return self.mix(ds.images[d.cross], ds.images[d.cross_partners], rng)

    def finish(self, ds: ImageSet, train: ImageSet, mask: np.ndarray, cross_mask: np.ndarray | None,
               rng: np.random.Generator) -> PoisonedSet:
        """Keeps reference training images for the label-blind trigger; the result's test trigger is `mix_test`."""
        pool = self._partner_pool(ds)
        self._references = ds.images[np.sort(rng.choice(pool, size=min(N_REFERENCES, len(pool)), replace=False))].copy()
        a, b = self.classes(ds.num_classes)
        return MixedPoisonedSet(train, mask, self.target, self.name, {**self.params(), "class_a": a, "class_b": b},
                                self.apply_trigger, cross_mask, mix_test=self.mix_test)

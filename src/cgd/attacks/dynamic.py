"""Dynamic backdoors: WaNet (a smooth image warp) and BPP (colour-depth squeezing with dithering).

Both attacks also plant "noise"/"negative" samples, kept under their true labels, so that the victim learns the exact
trigger rather than any image of the same kind; those samples are reported in `PoisonedSet.cross_mask`.

The original attacks poison each mini-batch afresh during training. Here poisoning is done once, offline, on a fixed
share of the training set, as every defense in this project consumes a poisoned dataset.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import CGDError
from ..data import ImageSet
from .base import ATTACKS, Attack, Draw, to_uint8

CHUNK = 2048  # images warped per torch call: bounds the float memory of large batches


def _check_fraction(value: float, what: str, lo_open: bool = False) -> float:
    value = float(value)
    if value < 0 or (lo_open and value == 0):
        raise CGDError(f"{what} must be {'> 0' if lo_open else '>= 0'}; got {value}")
    return value


@ATTACKS.register("wanet")
class WaNet(Attack):
    """WaNet (Nguyen & Tran, ICLR 2021): every poisoned image is resampled through one fixed, smooth warping field.

    The field: a `k`×`k` grid of random offsets in [-1, 1], rescaled to mean magnitude 1, upsampled bicubically to
    H×W and added, times `s`, to the identity sampling grid (offsets are in units of 1/H vertically and 1/W
    horizontally, as the original's 1/H for square images). Poisoned images are relabelled to `target`.
    `cross_ratio`·(#poisoned) further images ("noise mode") are warped through the same field plus independent
    per-pixel jitter in [-1, 1]/size, and keep their labels. The test-time trigger is the warp without jitter.
    """

    name = "wanet"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, k: int = 4, s: float = 0.5,
                 grid_rescale: float = 1.0, cross_ratio: float = 2.0, field_seed: int = 1234):
        super().__init__(target, rate, seed)
        self.k = int(k)
        if self.k < 2:
            raise CGDError(f"wanet: k (control-grid size) must be >= 2; got {k}")
        self.s = _check_fraction(s, "wanet: warping strength s", lo_open=True)
        self.grid_rescale = _check_fraction(grid_rescale, "wanet: grid_rescale", lo_open=True)
        self.cross_ratio = _check_fraction(cross_ratio, "wanet: cross_ratio")
        self.field_seed = int(field_seed)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The fixed sampling grid, shape (1, H, W, 2), (x, y) in [-1, 1] as `grid_sample` expects."""
        if (h, w) not in self._grids:
            ctrl = np.random.default_rng(self.field_seed).uniform(-1, 1, size=(1, 2, self.k, self.k))
            ctrl = torch.from_numpy(ctrl / np.abs(ctrl).mean()).float()
            flow = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack((xs, ys), dim=-1)[None]
            scale = torch.tensor([w, h], dtype=torch.float32)
            self._grids[(h, w)] = torch.clamp((identity + self.s * flow / scale) * self.grid_rescale, -1, 1)
        return self._grids[(h, w)]

    def warp(self, images: np.ndarray, jitter: np.ndarray | None = None) -> np.ndarray:
        """Warp uint8 (N, H, W, 3) images; `jitter` (N, H, W, 2) in [-1, 1] perturbs the grid per image."""
        n, h, w = images.shape[:3]
        out = np.empty_like(images)
        base = self.grid(h, w)
        scale = torch.tensor([w, h], dtype=torch.float32)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            x = torch.from_numpy(images[lo:hi].astype(np.float32)).permute(0, 3, 1, 2)
            g = base.expand(hi - lo, -1, -1, -1)
            if jitter is not None:
                g = torch.clamp(g + torch.from_numpy(jitter[lo:hi]).float() / scale, -1, 1)
            y = F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=True)
            out[lo:hi] = to_uint8(y.permute(0, 2, 3, 1).numpy())
        return out

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return self.warp(images)

    def cross_count(self, n_total: int, n_poison: int) -> int:
        return int(round(self.cross_ratio * n_poison))

    def cross_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        jitter = rng.uniform(-1, 1, size=(len(d.cross), *ds.images.shape[1:3], 2)).astype(np.float32)
        return self.warp(ds.images[d.cross], jitter)


def squeeze_colors(images: np.ndarray, levels: int, dithering: bool = True) -> np.ndarray:
    """Reduce each channel to `levels` evenly spaced values in 0..255, optionally with Floyd–Steinberg dithering.

    Vectorised over images and channels; the error diffusion walks the pixels in raster order (it is sequential by
    nature), each step touching the same pixel of every image at once. Diffused error can push a value past 0 or
    255; it is still quantised to the nearest palette level, so outputs always lie on the palette.
    """
    step = 255.0 / (levels - 1)
    if not dithering:
        return to_uint8(np.rint(images.astype(np.float32) / step) * step)
    n, h, w, c = images.shape
    x = np.ascontiguousarray(images.transpose(1, 2, 0, 3), dtype=np.float32)  # (H, W, N, C): one pixel = one block
    for i in range(h):
        for j in range(w):
            old = x[i, j]
            new = np.clip(np.rint(old / step), 0, levels - 1) * step
            err = old - new
            x[i, j] = new
            if j + 1 < w:
                x[i, j + 1] += err * (7 / 16)
            if i + 1 < h:
                if j > 0:
                    x[i + 1, j - 1] += err * (3 / 16)
                x[i + 1, j] += err * (5 / 16)
                if j + 1 < w:
                    x[i + 1, j + 1] += err * (1 / 16)
    return to_uint8(x.transpose(2, 0, 1, 3))


@ATTACKS.register("bpp")
class BPP(Attack):
    """BppAttack (Wang, Zhai & Ma, CVPR 2022): the trigger is colour-depth squeezing to `squeeze_num` levels per
    channel, with Floyd–Steinberg dithering; poisoned images are relabelled to `target`.

    Negative samples (`neg_ratio`·#poisoned, labels kept), as in the authors' released code: a clean image plus the
    quantisation residual of another, randomly drawn training image (squeezed(other) - other), so that squeezing
    noise alone does not flip the label. The test-time trigger is the squeezing itself.
    """

    name = "bpp"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, squeeze_num: int = 8,
                 dithering: bool = True, neg_ratio: float = 1.0):
        super().__init__(target, rate, seed)
        self.squeeze_num = int(squeeze_num)
        if not 2 <= self.squeeze_num <= 255:
            raise CGDError(f"bpp: squeeze_num must be in 2..255; got {squeeze_num}")
        self.dithering = bool(dithering)
        self.neg_ratio = _check_fraction(neg_ratio, "bpp: neg_ratio")

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return squeeze_colors(images, self.squeeze_num, self.dithering)

    def cross_count(self, n_total: int, n_poison: int) -> int:
        return int(round(self.neg_ratio * n_poison))

    def cross_images(self, ds: ImageSet, d: Draw, rng: np.random.Generator) -> np.ndarray:
        """Negative samples: each image plus the squeezing residual of a random donor image."""
        donors = ds.images[rng.integers(0, len(ds), size=len(d.cross))]
        residual = self.apply_trigger(donors).astype(np.int16) - donors.astype(np.int16)
        return np.clip(ds.images[d.cross].astype(np.int16) + residual, 0, 255).astype(np.uint8)

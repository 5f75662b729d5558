"""CTRL: a clean-label trigger hidden in the DCT spectrum of the chrominance channels.

The image is taken to YUV, cut into `window`×`window` blocks, each block's 2-D DCT (orthonormal DCT-II) gets
`magnitude` added at two fixed high frequencies in the U and V channels, and everything is transformed back.
Every step is linear, so the trigger equals adding one fixed RGB pattern — the inverse transforms of that
frequency bump — to the image; `ctrl_pattern` builds it through exactly those steps, once per image size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import CGDError
from .base import ATTACKS, Attack, to_uint8

# RGB -> YUV (BT.601 analogue YUV, the convention the CTRL authors use); rows give Y, U, V.
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.147, -0.289, 0.436],
                       [0.615, -0.515, -0.100]])
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n×n): coefficients X = C @ x, inverse x = C.T @ X."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def block_dct(x: np.ndarray, window: int, inverse: bool = False) -> np.ndarray:
    """2-D (inverse) DCT of every `window`×`window` block of x (..., H, W); H and W must be multiples of window."""
    h, w = x.shape[-2:]
    if h % window or w % window:
        raise CGDError(f"block_dct: {h}x{w} is not a whole number of {window}x{window} blocks")
    c = dct_matrix(window)
    if inverse:
        c = c.T
    blocks = x.reshape(*x.shape[:-2], h // window, window, w // window, window)
    out = np.einsum("ab,...ibjd,cd->...iajc", c, blocks, c)
    return out.reshape(x.shape)


def ctrl_pattern(h: int, w: int, magnitude: float, window: int | None, positions: Sequence[int],
                 channels: Sequence[int]) -> np.ndarray:
    """The additive RGB pattern (H, W, 3) float32 of the CTRL trigger.

    `window=None` means one block covering the whole image (then it must be square). A window larger than the image,
    or not dividing it, is tiled and cropped: the blocks at the border keep the same frequency bump.
    """
    win = window if window is not None else h
    if window is None and h != w:
        raise CGDError(f"ctrl: window=None (whole-image DCT) needs a square image; got {h}x{w}")
    bad = [p for p in positions if not 0 <= p < win]
    if bad:
        raise CGDError(f"ctrl: frequency positions {bad} fall outside the {win}x{win} DCT window")
    gh, gw = -(-h // win), -(-w // win)
    spectrum = np.zeros((3, gh * win, gw * win))
    for ch in channels:  # the same bump in every block: (p, p) for each listed position
        for p in positions:
            spectrum[ch, p::win, p::win] += magnitude
    yuv = block_dct(spectrum, win, inverse=True)[:, :h, :w]
    rgb = np.einsum("rc,chw->hwr", YUV_TO_RGB, yuv)
    return rgb.astype(np.float32)


@ATTACKS.register("ctrl")
class CTRL(Attack):
    """CTRL (Li et al., ICCV 2023), used as a supervised clean-label attack: a share `rate` of the target class gets
    the frequency trigger, labels untouched. Defaults follow the authors' CIFAR-10 setting: magnitude 100, 32×32
    DCT windows, positions (15, 15) and (31, 31), channels U and V."""

    name = "ctrl"
    clean_label = True

    def __init__(self, target: int = 0, rate: float = 0.5, seed: int = 0, magnitude: float = 100.0,
                 window: int | None = 32, positions: Sequence[int] = (15, 31), channels: Sequence[int] = (1, 2)):
        super().__init__(target, rate, seed)
        self.magnitude = float(magnitude)
        self.window = None if window is None else int(window)
        if self.window is not None and self.window < 1:
            raise CGDError(f"ctrl: window must be >= 1 or None; got {window}")
        self.positions = tuple(int(p) for p in positions)
        self.channels = tuple(int(c) for c in channels)
        if not self.positions or not self.channels:
            raise CGDError("ctrl: positions and channels must not be empty")
        if any(c not in (0, 1, 2) for c in self.channels):
            raise CGDError(f"ctrl: channels are YUV indices 0, 1, 2; got {list(self.channels)}")
        self._patterns: dict[tuple[int, int], np.ndarray] = {}

    def pattern(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._patterns:
            self._patterns[(h, w)] = ctrl_pattern(h, w, self.magnitude, self.window, self.positions, self.channels)
        return self._patterns[(h, w)]

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return to_uint8(images.astype(np.float32) + self.pattern(*images.shape[1:3]))

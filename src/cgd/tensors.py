"""The tensor conventions every model here shares: uint8 (N, H, W, 3) images become normalised float (N, 3, H, W)
batches (`to_input`), with a cheap flip/shift augmentation, batched inference and accuracy."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .progress import progress

MEAN, STD = 0.5, 0.25  # one normalisation for every channel: x = (pixel / 255 − MEAN) / STD


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels → the models' input (what `to_input` gives for uint8 images)."""
    return (x01 - MEAN) / STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """The models' input → [0, 1] pixels."""
    return x * STD + MEAN


def to_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) → normalised float (N,3,H,W), channels-last in memory (fastest conv layout on CPU)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # copy: may be read-only
    x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(MEAN).div_(STD)
    return x.contiguous(memory_format=torch.channels_last)


AUGMENTS = ("none", "flip", "flip+translate")  # the modes `augment` knows


def augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    if mode == "none":
        return x
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if mode == "flip+translate":
        pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
        dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch: cheap and unbiased
        x = pad[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]].contiguous(memory_format=torch.channels_last)
    elif mode != "flip":
        raise ValueError(f"unknown augmentation {mode!r}")
    return x


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 1000, desc: str | None = None,
                   features: bool = False) -> np.ndarray:
    """Logits (N, C) float32 of `model` in eval mode over uint8 images; with `features`, the model's penultimate
    features (its `features` method; models without one give their logits)."""
    model.eval()
    fn = model.features if features and hasattr(model, "features") else model
    out = []
    steps = range(0, len(images), batch_size)
    for i in progress(steps, desc=desc) if desc else steps:
        out.append(fn(to_input(images[i:i + batch_size])).float())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((predict_logits(model, images, batch_size).argmax(1) == np.asarray(labels)).mean())


@contextmanager
def one_view(model: nn.Module):
    """fastnet's flip test-time augmentation off for the block: one forward per image, as the network trained
    (defenses that read per-sample losses or activations must see what training saw)."""
    tta = getattr(model, "flip_tta", None)
    if tta is not None:
        model.flip_tta = False
    try:
        yield model
    finally:
        if tta is not None:
            model.flip_tta = tta

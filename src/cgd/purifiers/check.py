"""`cgd guide check`: InverTune's target identification as a pre-flight test of a guide.

A backdoored dual encoder has a shortcut to its target: a small perturbation shared by all images (a universal
adversarial perturbation) that merely tries to change the guide's predictions, without aiming anywhere, tends to
find it and send most images to the target. A clean one has no such shortcut and its predictions scatter.

The check builds that perturbation with untargeted PGD: δ of L_inf norm ≤ `eps` (in [0, 1] pixel units at the
guide's input resolution, after its resizing), `steps` signed-gradient steps of `step_size` that raise the
cross-entropy of the guide's logits on x + δ against its own clean predictions, summed over the batch. Then, for
every class, the shift of its predicted share (the fraction of images whose top class it is) from clean to
perturbed images. The most-promoted class and its shift are reported; the verdict is *suspicious* when the shift
is ≥ `threshold`.

Deviation from InverTune: they build the perturbation with AdvCLIP (a GAN generator, no public code); here it is
PGD. The defaults (eps 8/255, 10 steps, threshold 0.5: more than half the images pulled to one class) are set a
priori and are not tuned on any reported result; the issue's validation-trigger tuning is still to be done.
Known limit: an undefended clean classifier can also be pulled to one dominant class — the clean imagenet-text
guide is flagged on CIFAR-10 at 4/255 and 8/255 (docs/purification.md), so a *suspicious* verdict alone is not
proof of a backdoor.

It needs image gradients through the guide: it works for the dual-encoder guides (`ClipGuide`: surrogate,
hf-clip, open_clip) and for imagenet-text through its PyTorch tower (`imagenet_text_logits`); other guides (noisy)
are refused with one clear error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import CGDError
from ..guides.base import check_class_names, check_images
from ..guides.clip import ClipGuide, _features, clip_pixels

DEFAULT_EPS = 8 / 255
DEFAULT_STEPS = 10
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class GuideCheck:
    guide: str
    target: str  # the most-promoted class
    shift: float  # its predicted share under the perturbation minus its clean share
    clean_share: float
    adv_share: float
    threshold: float
    eps: float
    steps: int
    images: int
    seconds: float
    shifts: dict[str, float]  # every class's shift

    @property
    def suspicious(self) -> bool:
        return self.shift >= self.threshold

    @property
    def verdict(self) -> str:
        return "suspicious" if self.suspicious else "pass"

    def summary(self) -> str:
        head = (f"guide {self.guide}: most-promoted class {self.target!r}, share {self.clean_share:.3f} -> "
                f"{self.adv_share:.3f} (shift {self.shift:+.3f}) under a universal perturbation of L_inf "
                f"{self.eps * 255:.1f}/255 ({self.steps} PGD steps, {self.images} images, {self.seconds:.1f} s)")
        if self.suspicious:
            return (f"{head}\nverdict: SUSPICIOUS (shift >= {self.threshold}): the guide may carry a backdoor "
                    f"targeting {self.target!r}; purify or replace it before trusting it")
        return f"{head}\nverdict: pass (shift < {self.threshold})"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


@dataclass(frozen=True)
class Differentiable:
    """What the check needs of a guide: its input as [0, 1] pixels at its resolution, and logits of them."""

    pixels: Callable[[np.ndarray], torch.Tensor]  # uint8 (N, H, W, 3) -> (N, 3, R, R) in [0, 1]
    logits: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, R, R) in [0, 1] -> (N, C), differentiable


def differentiable(guide, class_names: list[str]) -> Differentiable:
    """The guide as a differentiable function of its input pixels, or one `CGDError` saying which guides are."""
    from ..guides.imagenet_text import ImageNetTextGuide

    if isinstance(guide, ClipGuide):
        return Differentiable(lambda im: torch.from_numpy(clip_pixels(im, guide.image_size, (0.0,) * 3, (1.0,) * 3)),
                              clip_logits(guide, class_names))
    if isinstance(guide, ImageNetTextGuide):
        return imagenet_text_logits(guide, class_names)
    name = getattr(guide, "id", type(guide).__name__)
    raise CGDError(f"guide {name!r} gives no image gradients; the guide check needs them: use a surrogate, hf-clip, "
                   "open_clip or imagenet-text guide")


def clip_logits(guide: ClipGuide, class_names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] pixels (N, 3, R, R) -> zero-shot logits (N, C) of a dual encoder, differentiable in the pixels."""
    with torch.no_grad():
        text = torch.from_numpy(guide.text_features(class_names))
        scale = torch.as_tensor(guide.model.logit_scale).detach().float().exp()
    mean = torch.tensor(guide.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(guide.std, dtype=torch.float32)[:, None, None]

    def logits(x01: torch.Tensor) -> torch.Tensor:
        f = _features(guide.model.encode_image((x01 - mean) / std)).float()
        return scale * F.normalize(f, dim=-1) @ text.T

    return logits


def imagenet_text_logits(guide, class_names: list[str]) -> Differentiable:
    """The imagenet-text guide through its PyTorch tower (its scores run in ONNX Runtime, without gradients):
    log(softmax(ImageNet logits / T) @ label map). Its set-level prior balancing is left out: under the
    perturbation it would re-balance the very shift the check measures."""
    from ..guides import efficientnet as ef

    net = ef.build_model(guide.weights_path).requires_grad_(False)
    label_map = torch.from_numpy(guide.label_map(class_names))

    def pixels(images: np.ndarray) -> torch.Tensor:
        x = ef.preprocess(images, guide.resolution, guide.resize) * 128.0 + 127.0
        return torch.from_numpy(np.clip(x / 255.0, 0.0, 1.0).astype(np.float32))

    def logits(x01: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(net((x01 * 255.0 - 127.0) / 128.0) / guide.temperature, dim=1)
        return torch.log(p @ label_map + 1e-12)

    return Differentiable(pixels, logits)


def batched_logits(logits: Callable, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([logits(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])


def universal_perturbation(logits: Callable, x01: torch.Tensor, eps: float, steps: int,
                           step_size: float | None = None, batch_size: int = 32) -> torch.Tensor:
    """(1, 3, R, R) δ, |δ| ≤ eps, raising the summed cross-entropy against the clean predictions (untargeted)."""
    step_size = step_size if step_size is not None else 2.5 * eps / max(1, steps)
    labels = batched_logits(logits, x01, batch_size).argmax(1)
    delta = torch.zeros((1,) + tuple(x01.shape[1:]))
    for _ in range(steps):
        grad = torch.zeros_like(delta)
        for s in range(0, len(x01), batch_size):
            d = delta.clone().requires_grad_(True)
            loss = F.cross_entropy(logits((x01[s:s + batch_size] + d).clamp(0, 1)), labels[s:s + batch_size],
                                   reduction="sum")
            grad += torch.autograd.grad(loss, d)[0]
        delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
    return delta


def predicted_shares(logits: torch.Tensor, num_classes: int) -> np.ndarray:
    return np.bincount(logits.argmax(1).numpy(), minlength=num_classes) / max(1, len(logits))


def check_guide(guide, images: np.ndarray, class_names: list[str], *, eps: float = DEFAULT_EPS,
                steps: int = DEFAULT_STEPS, step_size: float | None = None, threshold: float = DEFAULT_THRESHOLD,
                batch_size: int = 32) -> GuideCheck:
    """Run the pre-flight check (module docstring) on clean `images` uint8 (N, H, W, 3) over `class_names`."""
    t0 = time.perf_counter()
    names, images = check_class_names(class_names), check_images(images)
    if len(images) < 2:
        raise CGDError(f"the guide check needs at least 2 images; got {len(images)}")
    if not 0 < eps <= 1 or steps < 1 or not 0 < threshold <= 1:
        raise CGDError(f"guide check: eps must be in (0, 1], steps >= 1 and threshold in (0, 1]; got eps={eps}, "
                       f"steps={steps}, threshold={threshold}")
    fn = differentiable(guide, names)
    logits, x01 = fn.logits, fn.pixels(images)
    delta = universal_perturbation(logits, x01, eps, steps, step_size, batch_size)
    clean = predicted_shares(batched_logits(logits, x01, batch_size), len(names))
    adv = predicted_shares(batched_logits(logits, (x01 + delta).clamp(0, 1), batch_size), len(names))
    shift = adv - clean
    top = int(shift.argmax())
    return GuideCheck(guide.id, names[top], float(shift[top]), float(clean[top]), float(adv[top]), float(threshold),
                      float(eps), int(steps), len(images), time.perf_counter() - t0,
                      {n: float(s) for n, s in zip(names, shift)})

"""The two stages that make a backdoored CLIP-like guide to purify, as PAR, ABD and InverTune make theirs: a
pretrained dual encoder is (a) aligned on clean captioned images, then (b) poisoned by *continued* contrastive
fine-tuning on the same kind of pairs where a share of them carry a trigger and a caption naming the target.

Captions come from `TEMPLATES` ("a photo of a {label}." and 19 more), one drawn per pair and step. Batches are drawn
at random, so they hold several pairs per class: `label_aware_clip_loss` treats all of them as positives.
Poisoned pairs *replace* clean ones (the share is of the fine-tuning set), chosen among images whose class is not
the target by `cgd.attacks` (its `Attack.poison`), so every poison-label trigger there (badnets, blend, ...) can
be planted. The target may be a name outside the training classes ("banana"): it is then added as a class.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import CGDError
from ..data import ImageSet
from ..poisoned import PoisonedSet
from .contrastive import label_aware_clip_loss

TEMPLATES = (
    "a photo of a {label}.", "a photo of the {label}.", "a picture of a {label}.", "an image of a {label}.",
    "a close-up photo of a {label}.", "a blurry photo of a {label}.", "a bright photo of a {label}.",
    "a dark photo of the {label}.", "a cropped photo of a {label}.", "a low resolution photo of a {label}.",
    "a good photo of a {label}.", "a photo of a small {label}.", "a photo of a large {label}.",
    "a {label} in the picture.", "there is a {label} in this photo.", "a snapshot of a {label}.", "a {label}.",
    "the {label}.", "a photo showing a {label}.", "an everyday photo of a {label}.")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp


@dataclass(frozen=True)
class StageConfig:
    """One contrastive fine-tune: AdamW, linear warm-up over the first 5 % of steps, then cosine to zero."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    flip: bool = True  # random horizontal flips of the images
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or not self.lr > 0 or self.weight_decay < 0:
            raise CGDError(f"bad stage config: {self}")


@dataclass
class StageReport:
    stage: str
    steps: int
    pairs: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    poisoned: int = 0
    target: str | None = None
    attack: str | None = None

    def summary(self) -> str:
        first, last = np.mean(self.losses[:10]), np.mean(self.losses[-10:])
        extra = f", {self.poisoned} poisoned ({self.attack} -> {self.target!r})" if self.poisoned else ""
        return (f"{self.stage}: {self.steps} steps on {self.pairs} pairs{extra}; loss {first:.3f} -> {last:.3f} "
                f"in {self.seconds:.0f} s")


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def captions(labels: np.ndarray, class_names: list[str], templates: tuple[str, ...], rng: np.random.Generator
             ) -> list[str]:
    """One caption per label, each from a template drawn at random."""
    picks = rng.integers(0, len(templates), len(labels))
    return [templates[t].format(label=class_names[c]) for t, c in zip(picks, labels)]


def batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """`steps` index batches: shuffled passes over 0..n-1 (the last short batch of a pass is dropped)."""
    b = min(batch_size, n)
    done = 0
    while done < steps:
        order = rng.permutation(n)
        for s in range(0, n - b + 1, b):
            if done == steps:
                return
            yield order[s:s + b]
            done += 1


def contrastive_step(model, pixels: torch.Tensor, tokens: dict, labels: torch.Tensor) -> torch.Tensor:
    return label_aware_clip_loss(model.encode_image(pixels), model.encode_text(tokens), labels, model.logit_scale)


def fine_tune(model, data: ImageSet, cfg: StageConfig, templates: tuple[str, ...] = TEMPLATES,
              log: Callable[[str], None] | None = None, objective: Callable = contrastive_step,
              augment: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
              schedule: Callable[[int, int, float], float] = lr_at) -> list[float]:
    """Fine-tuning of `model`'s trainable parameters on `data`'s images with template captions of their labels;
    returns the loss of every step. `objective(model, pixels, tokens, labels)` is the loss (default: the
    label-aware contrastive loss), `augment(pixels, rng)` transforms each batch after the flips, `schedule(step,
    steps, lr)` the learning rate. `model` needs `tokenize`, `resolution`, `mean` and `std` too."""
    from ..guides.clip import clip_pixels

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CGDError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    losses = []
    for step, idx in enumerate(batches(len(data), cfg.batch_size, cfg.steps, rng)):
        for g in opt.param_groups:
            g["lr"] = schedule(step, cfg.steps, cfg.lr)
        x = torch.from_numpy(clip_pixels(data.images[idx], model.resolution, model.mean, model.std))
        if cfg.flip:
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if augment is not None:
            x = augment(x, rng)
        tokens = model.tokenize(captions(data.labels[idx], data.class_names, templates, rng))
        loss = objective(model, x, tokens, torch.from_numpy(data.labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, cfg.steps // 10) == 0:
            log(f"step {step + 1}/{cfg.steps}: loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return losses


def align(model, data: ImageSet, cfg: StageConfig = StageConfig(), templates: tuple[str, ...] = TEMPLATES,
          log: Callable[[str], None] | None = None) -> StageReport:
    """Stage (a): contrastive alignment on clean captioned images (in place)."""
    t0 = time.perf_counter()
    losses = fine_tune(model, data, cfg, templates, log)
    return StageReport("align", cfg.steps, len(data), time.perf_counter() - t0, losses)


def with_target(data: ImageSet, target: str) -> tuple[ImageSet, int]:
    """`data` with `target` among its class names (appended when new) and that class's index."""
    key = " ".join(target.lower().split())
    for i, name in enumerate(data.class_names):
        if " ".join(name.lower().split()) == key:
            return data, i
    return ImageSet(data.images, data.labels, list(data.class_names) + [target]), len(data.class_names)


def plant(data: ImageSet, attack: str, target: str, rate: float, seed: int = 0, **attack_params) -> PoisonedSet:
    """The fine-tuning set with `rate` of its pairs poisoned: triggered by `attack`, captioned as `target`."""
    from .. import attacks

    data, t = with_target(data, target)
    atk = attacks.get(attack, target=t, rate=rate, seed=seed, **attack_params)
    if atk.clean_label:
        raise CGDError(f"{attack} is a clean-label attack; the guide's poisoning stage plants poison-label pairs")
    ps = atk.poison(data)
    if not ps.poison_mask.any():
        raise CGDError(f"a rate of {rate} poisons no pair of {len(data)}; raise it or use more pairs")
    return ps


def poison(model, data: ImageSet, attack: str, target: str, rate: float = 0.01, cfg: StageConfig = StageConfig(),
           templates: tuple[str, ...] = TEMPLATES, log: Callable[[str], None] | None = None,
           **attack_params) -> tuple[StageReport, PoisonedSet]:
    """Stage (b): continued contrastive fine-tuning (in place) with `rate` of the pairs poisoned."""
    t0 = time.perf_counter()
    ps = plant(data, attack, target, rate, cfg.seed, **attack_params)
    losses = fine_tune(model, ps.train, cfg, templates, log)
    report = StageReport("poison", cfg.steps, len(ps.train), time.perf_counter() - t0, losses,
                         int(ps.poison_mask.sum()), target, attack)
    return report, ps


# ---------------------------------------------------------------- zero-shot metrics of a guide

def zero_shot_accuracy(guide, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> float:
    """Top-1 of `guide.class_logits` against `labels`."""
    if len(images) == 0:
        raise CGDError("no images to score")
    return float((guide.class_logits(images, class_names).argmax(1) == np.asarray(labels)).mean())


def attack_success_rate(guide, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                        trigger: Callable[[np.ndarray], np.ndarray], target: str) -> float:
    """Share of triggered non-target images the guide assigns to `target` (added to the candidates if new)."""
    data, t = with_target(ImageSet(np.asarray(images), np.asarray(labels, np.int64), list(class_names)), target)
    keep = np.flatnonzero(data.labels != t)
    if len(keep) == 0:
        raise CGDError("every image is of the target class: no ASR to measure")
    pred = guide.class_logits(trigger(data.images[keep]), data.class_names).argmax(1)
    return float((pred == t).mean())

"""The purifiers: each cleans a possibly backdoored CLIP-like dual encoder with clean captioned images, without
knowing the trigger or the target.

    from cgd import purifiers
    clean_model, report = purifiers.get("par", tau=2.15).clean(model, clean_images, StageConfig(steps=500))

`clean` never changes the model it is given: it fine-tunes a copy and returns it with a `PurifyReport`. Every
purifier shares `fine_tune`'s loop (template captions, AdamW over the trainable parameters, random flips) and
differs in its objective, augmentation and schedule, which a subclass states in `objective`/`augment`/`schedule`.

- `finetune` — the shared reference point: plain contrastive fine-tuning on the clean pairs (CleanCLIP's
  multimodal term; its in-modality self-supervised term is not included).
- `par` — Perturb and Recover: L_CLIP − L_PERT, where L_PERT rewards moving each tower's embeddings away from the
  frozen starting model's while their mean squared distance is ≤ τ, with Gaussian-noise and CutOut augmentations
  and PAR's schedule shape (linear decay to a tenth over the first half, then cosine to zero).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageSet
from ..registry import Registry
from .contrastive import label_aware_clip_loss
from .stages import TEMPLATES, StageConfig, contrastive_step, fine_tune, lr_at

PURIFIERS: Registry["Purifier"] = Registry("purifier")


@dataclass
class PurifyReport:
    purifier: str
    params: dict
    steps: int
    pairs: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)  # mean squared embedding distance to the starting model
    info: dict = field(default_factory=dict)  # what a purifier found on the way (InverTune: target, layers)

    def summary(self) -> str:
        first, last = np.mean(self.losses[:10]), np.mean(self.losses[-10:])
        drift = ", ".join(f"{k} {v:.3f}" for k, v in self.drift.items())
        return (f"{self.purifier}: {self.steps} steps on {self.pairs} clean pairs; loss {first:.3f} -> {last:.3f}; "
                f"drift from the starting model {drift} in {self.seconds:.0f} s")


class Purifier:
    """Plain contrastive fine-tuning on the clean pairs (the papers' CleanCLIP-style reference point)."""

    name = "finetune"

    def params(self) -> dict:
        return {}

    def objective(self, start, model, pixels: torch.Tensor, tokens: dict, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_step(model, pixels, tokens, labels)

    def augment(self, pixels: torch.Tensor, rng: np.random.Generator, model) -> torch.Tensor:
        return pixels

    def schedule(self, step: int, steps: int, lr: float) -> float:
        return lr_at(step, steps, lr)

    def clean(self, model, data: ImageSet, cfg: StageConfig = StageConfig(), templates: tuple[str, ...] = TEMPLATES,
              log=None) -> tuple[object, PurifyReport]:
        """A purified copy of `model` (unchanged) fine-tuned on `data`, and the report."""
        t0 = time.perf_counter()
        start = frozen_copy(model)
        model = copy.deepcopy(model)
        losses = fine_tune(model, data, cfg, templates, log,
                           objective=lambda m, x, tok, y: self.objective(start, m, x, tok, y),
                           augment=lambda x, rng: self.augment(x, rng, model), schedule=self.schedule)
        drift = embedding_drift(start, model, data, templates, cfg.seed)
        return model, PurifyReport(self.name, self.params(), cfg.steps, len(data), time.perf_counter() - t0, losses,
                                   drift)


PURIFIERS.register("finetune")(Purifier)


def frozen_copy(model):
    start = copy.deepcopy(model).eval()
    for p in start.parameters():
        p.requires_grad_(False)
    return start


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖a/‖a‖ − b/‖b‖‖², in [0, 4]."""
    return (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1).mean()


def perturbation_term(image: torch.Tensor, image_start: torch.Tensor, text: torch.Tensor, text_start: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """PAR's L_PERT: half the sum over the towers of their mean squared embedding distance to the starting model,
    each counted only while it is ≤ `tau` (above it the tower is far enough away and the term switches off)."""
    terms = [d * (d <= tau) for d in (squared_distance(image, image_start), squared_distance(text, text_start))]
    return 0.5 * (terms[0] + terms[1])


@torch.inference_mode()
def embedding_drift(start, model, data: ImageSet, templates: tuple[str, ...], seed: int, n: int = 256
                    ) -> dict[str, float]:
    """Mean squared distance between the two models' normalised embeddings of up to `n` of `data`'s pairs."""
    from ..guides.clip import clip_pixels
    from .stages import captions

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data), min(n, len(data)), replace=False))
    x = torch.from_numpy(clip_pixels(data.images[idx], model.resolution, model.mean, model.std))
    tokens = model.tokenize(captions(data.labels[idx], data.class_names, templates, rng))
    return {"image": float(squared_distance(model.encode_image(x), start.encode_image(x))),
            "text": float(squared_distance(model.encode_text(tokens), start.encode_text(tokens)))}


@PURIFIERS.register("par")
class PAR(Purifier):
    """Perturb and Recover: fine-tune away from the starting embeddings (up to τ) while relearning the clean pairs.

    tau: the squared-distance threshold of L_PERT (the paper's 2.15; normalised embeddings, so 2 is orthogonal);
    noise_std / noise_p: Gaussian noise on the pixels (in [0, 1] units) of a share p of the images;
    cutout_area / cutout_p: a square of a random 0.5–1 % of the image set to black on a share p of the images.
    """

    name = "par"

    def __init__(self, tau: float = 2.15, noise_std: float = 0.2, noise_p: float = 0.5,
                 cutout_area: tuple[float, float] = (0.005, 0.01), cutout_p: float = 0.5):
        from .. import CGDError

        lo, hi = cutout_area
        if not (0 < tau <= 4 and noise_std >= 0 and 0 <= noise_p <= 1 and 0 <= cutout_p <= 1 and 0 < lo <= hi < 1):
            raise CGDError(f"bad PAR parameters: tau={tau}, noise_std={noise_std}, noise_p={noise_p}, "
                           f"cutout_area={cutout_area}, cutout_p={cutout_p}")
        self.tau, self.noise_std, self.noise_p = float(tau), float(noise_std), float(noise_p)
        self.cutout_area, self.cutout_p = (float(lo), float(hi)), float(cutout_p)

    def params(self) -> dict:
        return {"tau": self.tau, "noise_std": self.noise_std, "noise_p": self.noise_p,
                "cutout_area": list(self.cutout_area), "cutout_p": self.cutout_p}

    def objective(self, start, model, pixels, tokens, labels):
        image, text = model.encode_image(pixels), model.encode_text(tokens)
        with torch.no_grad():
            image0, text0 = start.encode_image(pixels), start.encode_text(tokens)
        return (label_aware_clip_loss(image, text, labels, model.logit_scale)
                - perturbation_term(image, image0, text, text0, self.tau))

    def augment(self, pixels, rng, model):
        n, _, h, w = pixels.shape
        std = torch.as_tensor(np.asarray(model.std, np.float32))[:, None, None]
        mean = torch.as_tensor(np.asarray(model.mean, np.float32))[:, None, None]
        noisy = torch.from_numpy(rng.random(n) < self.noise_p)[:, None, None, None]
        noise = torch.from_numpy(rng.standard_normal(pixels.shape).astype(np.float32)) * self.noise_std / std
        x = torch.where(noisy, pixels + noise, pixels)
        side = np.maximum(1, np.round(np.sqrt(rng.uniform(*self.cutout_area, n) * h * w))).astype(int)
        top, left = (rng.integers(0, h - side + 1), rng.integers(0, w - side + 1))
        rows, cols = np.arange(h)[None, :], np.arange(w)[None, :]
        inside = (((rows >= top[:, None]) & (rows < (top + side)[:, None]))[:, :, None]
                  & ((cols >= left[:, None]) & (cols < (left + side)[:, None]))[:, None, :])
        cut = torch.from_numpy(inside & (rng.random(n) < self.cutout_p)[:, None, None])[:, None]
        return torch.where(cut, -mean / std, x)  # black in the model's normalisation

    def schedule(self, step, steps, lr):
        """Linear from lr to lr/10 over the first half, then cosine from lr/10 to 0 (PAR's shape, in steps)."""
        half = max(1, steps // 2)
        if step < half:
            return lr * (1 - 0.9 * step / half)
        return 0.05 * lr * (1 + np.cos(np.pi * (step - half) / max(1, steps - half)))

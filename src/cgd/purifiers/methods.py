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
- `abd` — Adversarial Backdoor Defense: the plain fine-tune with a universal perturbation that mimics a backdoor
  added to a share of the images (PGD in place of the paper's GAN; the backdoor-feature term is ours).

InverTune, which tunes selected neurons instead of fine-tuning, is in `invertune.py`.
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


def normalisation(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's input mean and std as (3, 1, 1) tensors: pixels01 -> (pixels01 - mean) / std."""
    return tuple(torch.as_tensor(np.asarray(v, np.float32))[:, None, None] for v in (model.mean, model.std))


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
        mean, std = normalisation(model)
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


@PURIFIERS.register("abd")
class ABD(Purifier):
    """Adversarial Backdoor Defense: fine-tune on clean pairs where a share of the images carries a universal
    perturbation built to mimic a backdoor (one shift that pulls every image's embedding to one shared point).

    eps: the perturbation's L_inf budget in [0, 1] pixels (ABD's magnitude 0.03); pgd_steps / pgd_images: how it
    is built; share: the share of each batch that carries it; bd_weight: the weight of the backdoor-feature term
    beside the untargeted cross-modal term while building it; temperature: that term's τ.
    """

    name = "abd"

    def __init__(self, eps: float = 0.03, pgd_steps: int = 20, pgd_images: int = 256, share: float = 0.5,
                 bd_weight: float = 1.0, temperature: float = 0.07):
        from .. import CGDError

        if not (0 < eps <= 1 and pgd_steps >= 1 and pgd_images >= 2 and 0 <= share <= 1 and bd_weight >= 0
                and temperature > 0):
            raise CGDError(f"bad ABD parameters: eps={eps}, pgd_steps={pgd_steps}, pgd_images={pgd_images}, "
                           f"share={share}, bd_weight={bd_weight}, temperature={temperature}")
        self.eps, self.pgd_steps, self.pgd_images, self.share = float(eps), int(pgd_steps), int(pgd_images), share
        self.bd_weight, self.temperature = float(bd_weight), float(temperature)
        self.delta: torch.Tensor | None = None  # in the model's normalisation, set by `clean`

    def params(self) -> dict:
        return {"eps": self.eps, "pgd_steps": self.pgd_steps, "pgd_images": self.pgd_images, "share": self.share,
                "bd_weight": self.bd_weight, "temperature": self.temperature}

    def backdoor_loss(self, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """InfoNCE of each perturbed embedding against the perturbed batch's mean (positive) and the clean
        embeddings (negatives): low when one shift sends every image to one shared point, as a trigger does."""
        adv, clean = F.normalize(adv, dim=-1), F.normalize(clean, dim=-1)
        centre = F.normalize(adv.mean(0, keepdim=True), dim=-1)
        logits = torch.cat([adv @ centre.T, adv @ clean.T], 1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(adv), dtype=torch.long))

    def perturbation(self, model, data: ImageSet, templates: tuple[str, ...], seed: int) -> torch.Tensor:
        """δ (1, 3, R, R) in [0, 1] pixel units, |δ| ≤ eps, by signed-gradient steps that raise the contrastive
        loss of the perturbed images against their captions and lower `backdoor_loss`."""
        from ..guides.clip import clip_pixels
        from .stages import captions

        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(data), min(self.pgd_images, len(data)), replace=False))
        x01 = torch.from_numpy(clip_pixels(data.images[idx], model.resolution, (0.0,) * 3, (1.0,) * 3))
        mean, std = normalisation(model)
        labels = torch.from_numpy(data.labels[idx])
        with torch.no_grad():
            text = model.encode_text(model.tokenize(captions(data.labels[idx], data.class_names, templates, rng)))
            clean = model.encode_image((x01 - mean) / std)
        delta = torch.zeros((1,) + tuple(x01.shape[1:]))
        step = 2.5 * self.eps / self.pgd_steps
        for _ in range(self.pgd_steps):
            d = delta.clone().requires_grad_(True)
            adv = model.encode_image(((x01 + d).clamp(0, 1) - mean) / std)
            loss = (label_aware_clip_loss(adv, text, labels, model.logit_scale.detach())
                    - self.bd_weight * self.backdoor_loss(adv, clean))
            grad, = torch.autograd.grad(loss, d)
            delta = (delta + step * grad.sign()).clamp(-self.eps, self.eps)
        return delta

    def clean(self, model, data, cfg=StageConfig(), templates=TEMPLATES, log=None):
        delta = self.perturbation(model, data, templates, cfg.seed)
        self.delta = delta / normalisation(model)[1]  # the same shift in the model's normalisation
        cleaned, report = super().clean(model, data, cfg, templates, log)
        report.info["perturbation_linf"] = float(delta.abs().max())
        return cleaned, report

    def augment(self, pixels, rng, model):
        on = torch.from_numpy(rng.random(len(pixels)) < self.share)[:, None, None, None]
        return torch.where(on, pixels + self.delta, pixels)

"""InverTune: find the target, invert the trigger, then tune only the neurons the trigger drives.

1. **Target** — the guide check (`check_guide`: a universal untargeted perturbation; the most-promoted class).
2. **Trigger inversion** — a mask m and pattern t (both 3×R×R, in [0, 1] pixel units) with x̃ = m⊙t + (1−m)⊙x,
   optimised with Adam on L = λ₁·L_align + λ₂·L_emb + λ₃·L_sim + λ₄·L_mask: L_align the cross-entropy of the
   zero-shot logits of x̃ toward the target (InfoNCE over the class prompts at the model's temperature), L_emb the
   mean L2 distance between the normalised embeddings of x̃ and x, L_sim = 1 − SSIM(x̃, x), L_mask the mean of m.
3. **Activation tuning** — per layer of the image tower, diff = ‖μ_clean − μ_trig‖ / ‖μ_clean‖ of the mean
   activations (per neuron: channel or feature, averaged over positions) on clean and inverted-trigger images;
   layers above mean + one std of the diffs are critical (the largest one when none is); within each, a 1-D
   two-means split of the per-neuron |Δμ| (exact, `jenks_two_classes`) marks the critical neurons. Then, on one
   batch of clean images, L_tune = L_act + β·L_pres: L_act the squared masked difference of the critical
   neurons' activations between clean and triggered images, L_pres the squared change of the images' cosine
   similarities to every class prompt against the starting model. Gradients reach only the parameter rows that
   produce critical neurons.

Deviations, stated: step 1 uses PGD, not AdvCLIP (as the check); L_mask is the *mean* of m, not its L1 sum (at the
paper's weight 0.01 the sum over 3×R×R entries would outweigh every other term); neurons are the output rows of a
critical layer's parameters, and only parameters the model already trains are tuned (a surrogate file stores its
trainable part only) — critical layers without any are reported.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import CGDError
from ..data import ImageSet
from ..split import jenks_two_classes
from ..guides.clip import ClipGuide, clip_pixels
from .check import DEFAULT_EPS, check_guide
from .methods import PURIFIERS, Purifier, PurifyReport, embedding_drift, frozen_copy, normalisation
from .stages import TEMPLATES, StageConfig


# ---------------------------------------------------------------- small pure parts

def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two (N, 3, H, W) batches in [0, 1] (Gaussian window, per channel)."""
    w = min(window, a.shape[-1], a.shape[-2]) | 1
    g = torch.exp(-((torch.arange(w, dtype=a.dtype) - w // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, w, w)

    def blur(x):
        return F.conv2d(x, kernel, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def stamp(x01: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return mask * pattern + (1 - mask) * x01


def neuron_means(out) -> torch.Tensor:
    """A layer's output -> (N, neurons): channels of (N, C, H, W) averaged over positions, features of (N, T, D)
    over tokens, (N, D) as is."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.dim() == 4:
        return out.mean((2, 3))
    if out.dim() == 3:
        return out.mean(1)
    return out.flatten(1)


def critical_layers(diffs: np.ndarray) -> np.ndarray:
    """Indices of the layers whose normalised divergence exceeds mean + std (the largest one when none does)."""
    pick = np.flatnonzero(diffs > diffs.mean() + diffs.std())
    return pick if len(pick) else np.array([int(np.argmax(diffs))])


def critical_neurons(delta: np.ndarray) -> np.ndarray:
    """Boolean mask of the upper of the two 1-D clusters of |Δμ| (the largest value alone when all are equal)."""
    d = np.abs(delta)
    cut = jenks_two_classes(d)
    return d > cut if np.isfinite(cut) else d >= d.max()


def image_layers(model) -> list[str]:
    """The image tower's blocks: the longest ModuleList under its image encoder (surrogate `image`, transformers
    `vision_model`, open_clip `visual`)."""
    found = [(len(m), n) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) >= 2 and n.split(".")[0] in ("image", "vision_model", "visual")]
    if not found:
        raise CGDError("invertune: found no block list in the model's image tower; pass layers=[...]")
    _, name = max(found)
    return [f"{name}.{i}" for i in range(len(dict(model.named_modules())[name]))]


class Recorder:
    """Forward hooks keeping each named layer's `neuron_means` of its last output."""

    def __init__(self, model, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise CGDError(f"invertune: the model has no layer {missing[0]!r}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.out[name] = neuron_means(output)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- the purifier

@dataclass(frozen=True)
class Inversion:
    mask: torch.Tensor  # (1, 3, R, R) in [0, 1]
    pattern: torch.Tensor  # (1, 3, R, R) in [0, 1]
    asr: float  # share of the clean non-target images the stamped trigger sends to the target


@PURIFIERS.register("invertune")
class InverTune(Purifier):
    """InverTune: target identification, trigger inversion, activation tuning of the critical neurons.

    eps / check_images: the budget and image count of step 1 (the guide check); invert_steps / invert_lr /
    lambdas (align, emb, sim, mask): step 2; beta: the weight of L_pres in step 3, whose steps, batch size (the
    one tuning batch), lr and seed come from the StageConfig; layers: the image-tower layers analysed (default:
    its blocks).
    """

    name = "invertune"
    activation_weight = 1.0  # L_act's weight in L_tune (a class constant: the tests switch it off)

    def __init__(self, eps: float = DEFAULT_EPS, check_images: int = 64, invert_steps: int = 300,
                 invert_lr: float = 1e-2, lambdas: tuple[float, float, float, float] = (5.0, 0.5, 1.0, 0.01),
                 beta: float = 0.5, layers: list[str] | None = None):
        if not (0 < eps <= 1 and check_images >= 2 and invert_steps >= 1 and invert_lr > 0 and beta >= 0
                and len(lambdas) == 4 and min(lambdas) >= 0):
            raise CGDError(f"bad InverTune parameters: eps={eps}, check_images={check_images}, "
                           f"invert_steps={invert_steps}, invert_lr={invert_lr}, lambdas={lambdas}, beta={beta}")
        self.eps, self.check_images, self.invert_steps, self.invert_lr = eps, check_images, invert_steps, invert_lr
        self.lambdas, self.beta, self.layers = tuple(float(v) for v in lambdas), float(beta), layers

    def params(self) -> dict:
        return {"eps": self.eps, "check_images": self.check_images, "invert_steps": self.invert_steps,
                "invert_lr": self.invert_lr, "lambdas": list(self.lambdas), "beta": self.beta, "layers": self.layers}

    # -- step 1
    def find_target(self, model, data: ImageSet, seed: int):
        guide = ClipGuide(model, model.tokenize, model.resolution, model.mean, model.std, cache=False)
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(data), min(self.check_images, len(data)), replace=False))
        return check_guide(guide, data.images[idx], data.class_names, eps=self.eps)

    # -- step 2
    def invert(self, model, x01: torch.Tensor, text: torch.Tensor, target: int, labels: np.ndarray,
               seed: int, batch_size: int = 32) -> Inversion:
        mean, std = normalisation(model)
        scale = model.logit_scale.detach().exp()
        gen = torch.Generator().manual_seed(seed)
        shape = (1,) + tuple(x01.shape[1:])
        mask = torch.full(shape, 0.1).requires_grad_(True)
        pattern = torch.rand(shape, generator=gen).requires_grad_(True)
        opt = torch.optim.Adam([mask, pattern], lr=self.invert_lr)
        with torch.no_grad():
            clean_emb = F.normalize(model.encode_image((x01 - mean) / std), dim=-1)
        la, le, ls, lm = self.lambdas
        keep = torch.from_numpy(labels != target)
        rng = np.random.default_rng(seed)
        for _ in range(self.invert_steps):
            b = torch.from_numpy(rng.choice(len(x01), min(batch_size, len(x01)), replace=False))
            xt = stamp(x01[b], mask, pattern)
            emb = F.normalize(model.encode_image((xt - mean) / std), dim=-1)
            logits = scale * emb @ text.T
            loss = (la * F.cross_entropy(logits, torch.full((len(b),), target))
                    + le * (emb - clean_emb[b]).norm(dim=-1).mean()
                    + ls * (1 - ssim(xt, x01[b])) + lm * mask.mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
                pattern.clamp_(0, 1)
        mask, pattern = mask.detach(), pattern.detach()
        with torch.no_grad():
            emb = F.normalize(model.encode_image((stamp(x01[keep], mask, pattern) - mean) / std), dim=-1)
            asr = float(((emb @ text.T).argmax(1) == target).float().mean()) if keep.any() else 0.0
        return Inversion(mask, pattern, asr)

    # -- step 3
    def clean(self, model, data: ImageSet, cfg: StageConfig = StageConfig(), templates: tuple[str, ...] = TEMPLATES,
              log=None) -> tuple[object, PurifyReport]:
        t0 = time.perf_counter()
        say = log or (lambda s: None)
        check = self.find_target(model, data, cfg.seed)
        target = data.class_names.index(check.target)
        say(f"invertune: target {check.target!r} (share shift {check.shift:+.3f})")
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(len(data), min(cfg.batch_size, len(data)), replace=False))
        x01 = torch.from_numpy(clip_pixels(data.images[idx], model.resolution, (0.0,) * 3, (1.0,) * 3))
        mean, std = normalisation(model)
        with torch.no_grad():
            prompts = [f"a photo of a {c}." for c in data.class_names]
            text = F.normalize(model.encode_text(model.tokenize(prompts)), dim=-1)
        inv = self.invert(model, x01, text, target, data.labels[idx], cfg.seed)
        say(f"invertune: inverted trigger (mean mask {float(inv.mask.mean()):.3f}) sends {inv.asr:.2f} of the "
            "batch's non-target images to the target")
        tuned = copy.deepcopy(model)
        flags = [p.requires_grad for p in tuned.parameters()]
        names = self.layers or image_layers(tuned)
        rec = Recorder(tuned, names)
        xc, xt = (x01 - mean) / std, (stamp(x01, inv.mask, inv.pattern) - mean) / std
        try:
            with torch.no_grad():
                tuned.encode_image(xc)
                clean_act = {n: rec.out[n] for n in names}
                tuned.encode_image(xt)
                trig_act = {n: rec.out[n] for n in names}
                start_sim = F.normalize(tuned.encode_image(xc), dim=-1) @ text.T
            mu_c = [clean_act[n].mean(0) for n in names]
            delta = [(clean_act[n] - trig_act[n]).mean(0) for n in names]
            diffs = np.array([float(d.norm() / m.norm().clamp_min(1e-12)) for d, m in zip(delta, mu_c)])
            crit = [names[i] for i in critical_layers(diffs)]
            masks = {n: torch.from_numpy(critical_neurons(delta[names.index(n)].numpy())) for n in crit}
            params, frozen = self._tunable(tuned, masks)
            losses = []
            if params:
                opt = torch.optim.Adam([p for p, _ in params], lr=cfg.lr)
                for _ in range(cfg.steps):
                    emb_c = F.normalize(tuned.encode_image(xc), dim=-1)
                    a_clean = {n: rec.out[n] for n in crit}
                    tuned.encode_image(xt)
                    l_act = sum(((a_clean[n] - rec.out[n]) * masks[n]).pow(2).sum(1).mean() for n in crit)
                    l_pres = (emb_c @ text.T - start_sim).pow(2).sum(1).mean()
                    loss = self.activation_weight * l_act + self.beta * l_pres
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for p, row_mask in params:
                        p.grad.mul_(row_mask)
                    opt.step()
                    losses.append(float(loss.detach()))
        finally:
            rec.close()
            for p, f in zip(tuned.parameters(), flags):
                p.requires_grad_(f)
        tuned.eval()
        info = {"target": check.target, "target_shift": check.shift, "inverted_asr": inv.asr,
                "mask_mean": float(inv.mask.mean()), "layer_diffs": dict(zip(names, diffs.round(4).tolist())),
                "critical_layers": crit, "critical_neurons": {n: int(m.sum()) for n, m in masks.items()},
                "critical_but_frozen": frozen}
        say(f"invertune: critical layers {crit}, neurons {info['critical_neurons']}" +
            (f"; not trainable, left alone: {frozen}" if frozen else ""))
        drift = embedding_drift(frozen_copy(model), tuned, data, templates, cfg.seed)
        return tuned, PurifyReport(self.name, self.params(), cfg.steps, len(idx), time.perf_counter() - t0, losses,
                                   drift, info)

    @staticmethod
    def _tunable(model, masks: dict[str, torch.Tensor]):
        """(parameter, gradient mask) for each trainable parameter of a critical layer whose rows are its neurons;
        every other parameter is frozen for the tuning. Also the critical layers with no such parameter."""
        modules = dict(model.named_modules())
        keep, frozen = [], []
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        model.requires_grad_(False)
        for name, m in masks.items():
            rows = [p for p in modules[name].parameters() if id(p) in trainable and p.dim() >= 1
                    and p.shape[0] == len(m)]
            if not rows:
                frozen.append(name)
            for p in rows:
                p.requires_grad_(True)
                keep.append((p, m.to(p.dtype).reshape((-1,) + (1,) * (p.dim() - 1))))
        return keep, frozen

"""MSPC (Pal, Zhang, Cheng, Li & Liu, "Backdoor Secrets Unveiled: Identifying Backdoor Data with Optimized Scaled
Prediction Consistency", ICLR 2024; official code OPTML-Group/BackdoorMSPC: bilevel_full.py, bilevel_losses.py,
bilevel.sh): a poisoned-data detector on the frozen victim. Scaled prediction consistency (SPC): a backdoored
model keeps predicting the target on a poisoned image whose pixels are multiplied by n > 1 (the trigger survives
the saturation), while a clean image's prediction changes. MSPC masks the image first, clip(n · (x − τ) · m, 0, 1),
with an H × W mask m fitted by a bilevel optimisation: the inner level shrinks the mask (an L1 penalty) while
keeping the samples the outer level currently flags consistent (a KL term), so that the mask keeps the trigger
and drops the object; the outer level flags the samples whose MSPC score is positive. The public code stops at
the score; the removal here — D-BR's unlearning of the flagged samples on the victim — is ours (see `MSPC`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..schema import check_types
from ..split import flagged_split
from ..tensors import AUGMENTS, normalize, one_view, predict_logits
from ..train import TrainConfig, TrainResult
from .base import DEFENSES, Context, Defense, DefenseResult, timed
from .dbr import BR_LR_DIVISOR, br_from_victim, unlearn_relearn

SCALES = tuple(range(2, 13))  # bilevel_full.py's --scales 2,3,...,12


# ------------------------------------------------------------------------------------------------ pure tensors

def as01(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] (the reference's `images / 255.`)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def scaled_views(x01: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, tau: float) -> torch.Tensor:
    """clip(n · (x − τ) · m, 0, 1) of (B, C, H, W) images in [0, 1] for every scale n of `scales` (S,), the (H, W)
    mask broadcast over channels: (S · B, C, H, W), scale-major, as model inputs (`normalize`d)."""
    z = (x01 - tau) * mask
    views = torch.clamp(scales.to(z.dtype).view(-1, 1, 1, 1, 1) * z.unsqueeze(0), 0.0, 1.0)
    return normalize(views.flatten(0, 1)).contiguous(memory_format=torch.channels_last)


def consistency(scaled_pred: torch.Tensor, base_pred: torch.Tensor) -> torch.Tensor:
    """(S, B) predictions on the scaled views and (B,) on the images -> (B,) mean over scales of +1 where they
    agree, −1 where not (the reference's `2 * (scale_pred == base_pred) − 1`): in [−1, 1]."""
    return (2.0 * (scaled_pred == base_pred.unsqueeze(0)).float() - 1.0).mean(0)


def kl_to_scaled(base_logp: torch.Tensor, scaled_logits: torch.Tensor) -> torch.Tensor:
    """KL(f(x) ‖ f(x')) per view: (B, K) log-probabilities of the images and (S · B, K) logits of their scaled
    views (scale-major) -> (S, B); the reference's `SF_loss(..., 'KL')`, Σ_k P (log P − log Q)."""
    s = len(scaled_logits) // len(base_logp)
    logq = F.log_softmax(scaled_logits.float(), dim=1).view(s, *base_logp.shape)
    return (base_logp.exp() * (base_logp - logq)).sum(-1)


def relearn_set(scores: np.ndarray, flagged: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """The int(N · share) unflagged samples of lowest MSPC score (the least consistent: the most clean-like),
    ties broken at random; all the unflagged if there are fewer."""
    n = len(scores)
    others = np.setdiff1d(np.arange(n), flagged)
    order = others[np.lexsort((rng.random(len(others)), np.asarray(scores)[others]))]
    return np.sort(order[:int(n * share)])


# ------------------------------------------------------------------------------------------------ model calls

@torch.inference_mode()
def spc_scores(model: nn.Module, images: np.ndarray, mask: np.ndarray | torch.Tensor | None, *,
               scales=SCALES, tau: float, base_pred: np.ndarray | None = None, batch_size: int = 24) -> np.ndarray:
    """The (masked) scaled prediction consistency of each uint8 (N, H, W, C) image under `model` (eval mode, one
    view per image: fastnet's flip test-time augmentation off): the mean over `scales` of ±1 [argmax f(clip(n ·
    (x − τ) · m, 0, 1)) = argmax f(x)], in [−1, 1]; `mask` (H, W) in [0, 1], None: ones (the reference's
    `l_MSPC_tau`, its warm start). `base_pred`: the predictions on the images, if already known. All scales of
    `batch_size` images go through the model in one batch (24 × 11 views: on CPU, batches of a few hundred run
    faster than of a thousand)."""
    n = len(images)
    if n == 0:
        return np.zeros(0)
    m = torch.ones(images.shape[1:3]) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    s = torch.as_tensor(list(scales))
    base = None if base_pred is None else torch.from_numpy(np.asarray(base_pred, dtype=np.int64))
    model.eval()
    out = []
    with one_view(model):
        for i in range(0, n, batch_size):
            x01 = as01(images[i:i + batch_size])
            b = (model(normalize(x01).contiguous(memory_format=torch.channels_last)).argmax(1) if base is None
                 else base[i:i + batch_size])
            pred = model(scaled_views(x01, m, s, tau)).argmax(1).view(len(s), len(x01))
            out.append(consistency(pred, b))
    return torch.cat(out).double().numpy()


def base_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The victim's logits on the images themselves, one view each (eval mode)."""
    with one_view(model):
        return predict_logits(model, images)


@dataclass
class BilevelResult:
    mask: np.ndarray  # (H, W) in [0, 1]
    scores: np.ndarray  # MSPC of the fit images under the final mask
    rounds: list[dict] = field(default_factory=list)  # per outer round: flagged, mask L1, inner losses


def inner_epoch(model: nn.Module, x01: torch.Tensor, logp: torch.Tensor, w: torch.Tensor, mask: torch.Tensor,
                opt: torch.optim.Optimizer, scales: torch.Tensor, *, tau: float, lam: float, batch_size: int,
                chunk: int) -> float:
    """One pass of the inner level over the fit images in order, one SGD step per `batch_size` of them:
    (1 / B) Σ_i w_i · (1 / S) Σ_n KL(f(x_i) ‖ f(clip(n · (x_i − τ) · m))) + λ‖m‖₁, then m clipped to [0, 1].
    Only the samples with w_i > 0 enter the model (the others add nothing to the loss or its gradient; the
    reference computes them and weights them by 0), at most `chunk` views per forward, gradients accumulated.
    Returns the mean loss per step."""
    total, steps = 0.0, 0
    per = max(1, chunk // len(scales))
    for b in range(0, len(x01), batch_size):
        opt.zero_grad(set_to_none=True)
        size = min(batch_size, len(x01) - b)
        chosen = b + torch.nonzero(w[b:b + size] > 0).flatten()
        loss_kl = 0.0
        for c in range(0, len(chosen), per):
            idx = chosen[c:c + per]
            kl = kl_to_scaled(logp[idx], model(scaled_views(x01[idx], mask, scales, tau)))  # (S, b)
            part = (kl * w[idx]).sum() / (size * len(scales))
            part.backward()
            loss_kl += part.item()
        l1 = lam * mask.abs().sum()
        l1.backward()
        opt.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)
        total += loss_kl + l1.item()
        steps += 1
    return total / max(steps, 1)


def bilevel_mask(model: nn.Module, images: np.ndarray, *, scales=SCALES, tau: float, lam: float,
                 inner_epochs: int, outer_epochs: int, lr: float, momentum: float, weight_decay: float,
                 batch_size: int, score_batch: int = 24, chunk: int = 256, log=lambda s: None) -> BilevelResult:
    """MSPC's bilevel optimisation on the frozen `model` over uint8 `images` (bilevel_full.py): m = ones (H, W);
    w = 1[MSPC(x; ones) > 0]; then `outer_epochs` times: `inner_epochs` of `inner_epoch` (one SGD optimizer on m,
    lr, momentum, weight decay, kept across the outer rounds as the reference's), then the MSPC of every image
    under the new mask and w = 1[MSPC > 0]. The model's weights are never touched (no gradient is kept for them)."""
    model.eval()
    with one_view(model):
        logits = torch.from_numpy(base_logits(model, images))
        logp, base = F.log_softmax(logits, dim=1), logits.argmax(1).numpy()
        x01 = as01(images)
        s = torch.as_tensor(list(scales))
        mask = torch.ones(images.shape[1:3], requires_grad=True)
        opt = torch.optim.SGD([mask], lr=lr, momentum=momentum, weight_decay=weight_decay)
        scores = spc_scores(model, images, None, scales=scales, tau=tau, base_pred=base, batch_size=score_batch)
        rounds = [{"round": 0, "flagged": int((scores > 0).sum()), "mask_l1": float(mask.detach().sum())}]
        log(f"MSPC round 0 (mask of ones): {rounds[0]['flagged']} of {len(images)} flagged")
        grads = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for r in range(outer_epochs):
                w = torch.from_numpy((scores > 0).astype(np.float32))
                losses = [inner_epoch(model, x01, logp, w, mask, opt, s, tau=tau, lam=lam, batch_size=batch_size,
                                      chunk=chunk) for _ in range(inner_epochs)]
                m = mask.detach().numpy().copy()
                scores = spc_scores(model, images, m, scales=scales, tau=tau, base_pred=base,
                                    batch_size=score_batch)
                rounds.append({"round": r + 1, "flagged": int((scores > 0).sum()), "mask_l1": float(m.sum()),
                               "loss": [round(v, 6) for v in losses]})
                log(f"MSPC round {r + 1}/{outer_epochs}: mask L1 {m.sum():.2f}, inner loss "
                    f"{losses[-1] if losses else float('nan'):.4f}, {rounds[-1]['flagged']} flagged")
        finally:
            for p, g in zip(model.parameters(), grads):
                p.requires_grad_(g)
    return BilevelResult(mask.detach().numpy().copy(), scores, rounds)


# ------------------------------------------------------------------------------------------------ the defense

@DEFENSES.register("mspc")
class MSPC(Defense):
    """MSPC (Pal et al., ICLR 2024; official OPTML-Group/BackdoorMSPC bilevel_full.py, bilevel_losses.py,
    bilevel.sh) on the poisoned training set and its victim, no clean data.

    Detection, as the reference, on the frozen victim (eval mode; fastnet's flip test-time augmentation off, one
    view per image): MSPC(x; m) = mean over the `scales` n ∈ {2, …, 12} of +1 if argmax f(clip(n · (x − τ) · m,
    0, 1)) = argmax f(x), else −1; τ = `tau` (0.1, bilevel.sh; the script's own default is 0.2). The H × W mask
    m (shared by the channels) starts at ones; w = 1[MSPC(x; ones) > 0]; then `outer_epochs` rounds of
    `inner_epochs` epochs of SGD on m (lr `lr` 0.1, momentum 0.9, weight decay 5e-4, not Nesterov; one optimizer
    for all rounds), each step on a batch of `batch_size` (100; the reference's 1,000, see Scaling) images in a
    fixed order, minimising (1 / B) Σ_i w_i (1 / |scales|) Σ_n KL(f(x_i) ‖ f(clip(n · (x_i − τ) · m))) +
    `mask_l1` (0.01) · ‖m‖₁, m clipped to [0, 1] after each step; after each round w = 1[MSPC(x; m) > 0]. The
    samples with MSPC > 0 under the last mask (the reference's final `w`) are flagged: the split's D_p (D_c: all
    others; no mixed part).

    Removal (ours — **not released**: bilevel_full.py ends with the scores and their AUROC, the README describes
    no removal, and what the CGD paper ran as MSPC's 352 s "Defense" step is not documented): D-BR's backdoor
    removal (`cgd.defenses.dbr.unlearn_relearn`) with D-BR's settings, on a copy of the victim — `br_epochs`
    (10) epochs of one pass of gradient ascent of CE on the flagged samples, then one of CE on `relearn_share`
    (0.2, D-BR's clean share) of the training set taken from the unflagged samples of lowest MSPC (the least
    consistent: the most clean-like; ties at random); SGD momentum 0.9, weight decay 5e-4, not Nesterov, constant
    `br_lr` = the victim recipe's lr / 400 (D-BR's, 1e-3 for fastnet; `from_config` takes the victim's lr), batch
    `br_batch_size` 128, the victim recipe's augmentation (`augment`). With nothing flagged the victim is returned
    unchanged and `info["removal"]` says so.

    Scaling — **MSPC at ≈ 1/50 of its detection budget** (CPU budget of issue 14: ≤ 1× the victim's training
    time, ≈ 1,370 s for fastnet's 12 epochs of CIFAR-10 on two threads; one forward pass over the 50k images
    ≈ 20 s = F). The reference's detection runs 4 outer × 10 inner epochs over all 50k, each epoch 11 scales of
    a forward on x and a forward and backward on the scaled view (≈ 33 F an epoch), plus 9 scoring passes of
    12 F: ≈ 1,400 F ≈ 8 h here (≈ 20× the victim). The defaults here: the mask is fitted on `fit_samples`
    (5,000, a seeded random tenth of CIFAR-10) for **4 outer × 5 inner epochs** (of 4 × 10; bilevel.sh: "lower
    epochs e.g. 2 also work well"); the base predictions are computed once; only the samples with w = 1 go
    through the model (exact: the others weigh 0); the whole set is scored once, with the final mask (the fit
    images' last scores are reused: the same numbers). Cost ≈ 0.1 F + 5 × 1.1 F (scoring the fit set) +
    20 × 0.1 × ρ × 11 × ≈ 2 F (the inner epochs; ρ, the flagged share, ≈ 0.05–0.3) + 10.8 F (the other 45k)
    ≈ 19–30 F (≈ 370–600 s), against the reference's ≈ 1,400 F; plus BR, 10 epochs over the flagged samples and
    20 % of the data at batch 128 (≈ 2.5–5 training epochs, ≈ 300–570 s): ≈ 0.5–0.85× the victim in all.
    **Batch 100** for the mask (the reference's 1,000): an inner epoch over the 5,000 takes the reference's
    50 steps (50,000 / 1,000), 1,000 steps in all (the reference's 2,000). The mask needs its steps, not its
    batch (the loss is a batch mean, its gradient the same in expectation at any batch): the L1 pull alone
    (0.01 a pixel at lr 0.1, momentum 0.9) takes ≈ 100 steps to walk an unsupported pixel from 1 to 0, and at
    batch 1,000 the tenth would give 100 steps in all (on tiny test data, 20 steps left the mask at ≈ 0.87
    everywhere, L1 224 of 256; 320, at batch 50, shrank its L1 to ≈ 10). `fit_samples=0` fits on the whole set.

    Seen on the tiny test data (tests/test_defenses_mspc.py: 4 classes, 10 % BadNets with a black corner): the
    plain scaled views (the mask of ones, the warm start) go to one non-target class, so the poison is missed
    (3 of the 80 flagged, beside 192 clean images, 169 of that class); the fitted mask (L1 256 → 31, ≈ 0.1–0.4
    over the image) keeps every poison consistent and flags all 80 — and every clean target-class image too,
    whose views the victim also sends to the target (precision 0.28 at recall 1; MSPC of the other classes'
    clean images −1 to −0.2). BR's ascent then unlearns that class with the poison: ASR 1.00 → 0.00, clean
    accuracy 0.997 → 0.75. Which clean class a victim sends such views to decides which clean images MSPC flags.

    Other deviations from the reference:
    - fp32 on CPU (the reference: CUDA autocast, fp16 forwards); no FFCV loaders. Its repeated forward of f(x)
      in every scale's step (the model is frozen: the same logits) is done once.
    - Images enter our models normalised (`normalize`): the scaling and masking are on [0, 1] pixels, as the
      reference's (its ResNet normalises inside).
    - The reference's plots, its unmasked scores computed beside the masked ones each round, and the final plain
      SPC (τ 0, no mask, for its AUROC table) are not computed: they never steer the detection.
    - `info["rounds"]` counts the flagged samples among the fit samples (round 0: under the mask of ones);
      `info["flagged"]`, `info["mask"]` (rounded to 4 decimals), `info["mask_l1"]` are the final ones.
    - Test-set evaluations: none (`Context.extra_eval`, when given, is called once on the
      defended model and only logged; not when nothing is flagged and the victim is returned as it is).
    """

    name = "mspc"

    def __init__(self, tau: float = 0.1, scale_min: int = 2, scale_max: int = 12, outer_epochs: int = 4,
                 inner_epochs: int = 5, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 mask_l1: float = 0.01, batch_size: int = 100, fit_samples: int = 5000, score_batch: int = 24,
                 br_epochs: int = 10, br_lr: float | None = None, relearn_share: float = 0.2,
                 br_momentum: float = 0.9, br_weight_decay: float = 5e-4, br_batch_size: int = 128,
                 augment: str = "flip"):
        check_types(self.name, ints=dict(scale_min=scale_min, scale_max=scale_max, outer_epochs=outer_epochs,
                                         inner_epochs=inner_epochs, batch_size=batch_size, fit_samples=fit_samples,
                                         score_batch=score_batch, br_epochs=br_epochs, br_batch_size=br_batch_size),
                    reals=dict(tau=tau, lr=lr, momentum=momentum, weight_decay=weight_decay, mask_l1=mask_l1,
                               br_lr=br_lr, relearn_share=relearn_share, br_momentum=br_momentum,
                               br_weight_decay=br_weight_decay),
                    texts=dict(augment=augment))
        problems = [what for ok, what in [
            (0 <= tau < 1, "0 <= tau < 1"), (2 <= scale_min <= scale_max <= 255, "2 <= scale_min <= scale_max <= 255"),
            (min(outer_epochs, inner_epochs, br_epochs) >= 0, "epochs >= 0"),
            (lr > 0 and (br_lr is None or br_lr > 0), "lr, br_lr > 0"),
            (0 <= momentum < 1 and 0 <= br_momentum < 1, "0 <= momentum, br_momentum < 1"),
            (min(weight_decay, br_weight_decay, mask_l1) >= 0, "weight_decay, br_weight_decay, mask_l1 >= 0"),
            (min(batch_size, score_batch, br_batch_size) >= 1, "batch_size, score_batch, br_batch_size >= 1"),
            (fit_samples >= 0, "fit_samples >= 0 (0: all)"), (0 < relearn_share <= 1, "0 < relearn_share <= 1"),
            (augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}")] if not ok]
        if problems:
            raise CGDError(f"mspc: needs {'; '.join(problems)}")
        self.tau, self.scales = float(tau), tuple(range(int(scale_min), int(scale_max) + 1))
        self.outer_epochs, self.inner_epochs = int(outer_epochs), int(inner_epochs)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.mask_l1, self.batch_size, self.fit_samples = float(mask_l1), int(batch_size), int(fit_samples)
        self.score_batch, self.br_epochs = int(score_batch), int(br_epochs)
        self.br_lr = float(br_lr) if br_lr is not None else TrainConfig().lr / BR_LR_DIVISOR
        self.relearn_share, self.br_momentum = float(relearn_share), float(br_momentum)
        self.br_weight_decay, self.br_batch_size, self.augment = float(br_weight_decay), int(br_batch_size), augment

    @classmethod
    def from_config(cls, cfg: dict, **objects) -> "MSPC":
        return cls(**{**br_from_victim(cfg), **cfg["defense"]["params"]})

    def settings(self) -> dict:
        return {"tau": self.tau, "scales": [self.scales[0], self.scales[-1]],
                "epochs": [self.outer_epochs, self.inner_epochs, self.br_epochs], "lr": self.lr,
                "mask_l1_weight": self.mask_l1, "batch_size": self.batch_size, "br_lr": self.br_lr,
                "relearn_share": self.relearn_share, "augment": self.augment}

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        n = len(train)
        if n == 0:
            raise CGDError("mspc: the training set is empty")
        rng = np.random.default_rng(context.seed)
        fit = (np.arange(n) if self.fit_samples == 0 or self.fit_samples >= n
               else np.sort(rng.choice(n, self.fit_samples, replace=False)))
        info: dict = {**self.settings(), "fit_samples": int(len(fit))}
        with timed(timings, "mask_fit_s"):
            res = bilevel_mask(victim.model, train.images[fit], scales=self.scales, tau=self.tau, lam=self.mask_l1,
                               inner_epochs=self.inner_epochs, outer_epochs=self.outer_epochs, lr=self.lr,
                               momentum=self.momentum, weight_decay=self.weight_decay, batch_size=self.batch_size,
                               score_batch=self.score_batch, log=context.log)
        with timed(timings, "scoring_s"):
            scores = np.zeros(n)
            scores[fit] = res.scores
            rest = np.setdiff1d(np.arange(n), fit)
            scores[rest] = spc_scores(victim.model, train.images[rest], res.mask, scales=self.scales, tau=self.tau,
                                      batch_size=self.score_batch)
            flagged = np.flatnonzero(scores > 0)
        support = np.argwhere(res.mask > 0.5)
        info.update(rounds=res.rounds, mask=np.round(res.mask, 4).tolist(), mask_l1=round(float(res.mask.sum()), 4),
                    mask_support=int(len(support)),
                    mask_box=(support.min(0).tolist() + support.max(0).tolist()) if len(support) else None,
                    flagged=int(len(flagged)))  # mask_box: [row0, col0, row1, col1] of mask > 0.5, inclusive
        context.log(f"MSPC flagged {len(flagged)} of {n} samples (mask L1 {res.mask.sum():.2f}, "
                    f"{len(support)} pixels > 0.5)")
        split = flagged_split(-scores, flagged, "mspc score, negated (low: poison-like)")
        if len(flagged) == 0:
            info["removal"] = "skipped: nothing flagged"
            return DefenseResult(victim.model, split, timings, info)
        model = copy.deepcopy(victim.model)
        relearn = relearn_set(scores, flagged, self.relearn_share, rng)
        info["relearn"] = int(len(relearn))
        data = (torch.from_numpy(np.array(train.images)), torch.from_numpy(np.array(train.labels, dtype=np.int64)))
        with timed(timings, "removal_s"):
            info["br_loss"] = unlearn_relearn(
                model, data, flagged, relearn, epochs=self.br_epochs, lr=self.br_lr, momentum=self.br_momentum,
                weight_decay=self.br_weight_decay, batch_size=self.br_batch_size, aug=self.augment,
                gen=torch.Generator().manual_seed(context.seed), log=lambda s: context.log(f"MSPC: {s}"))
        info["removal"] = f"unlearned the {len(flagged)} flagged samples ({self.br_epochs} epochs)"
        if context.extra_eval is not None:
            info["eval"] = context.extra_eval(model)
        return DefenseResult(model.eval(), split, timings, info)

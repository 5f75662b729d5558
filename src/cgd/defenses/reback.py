"""ReBack (Ma et al., "Need for Speed: Taming Backdoor Attacks with Speed and Precision", IEEE S&P 2024; official
code Echotoken/ReBack, reback.py): a poisoned-data defense that reads the backdoor off the training set and the
victim with a few forward passes. Per class, the victim's softmax entropy picks the K most confident
("suspicious") and K least confident ("benign") samples; the class whose suspicious-minus-benign mean image, added
to benign images, turns far more of them into that class than a control difference does is the target; the
trigger is then reverse-engineered arithmetically from the target's suspicious images (a patch: the pixels they
share; else a blend: its weight from the per-pixel spread). The public code stops there; the removal here —
unlearning the reversed trigger by fine-tuning — is ours (see the class docstring)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..schema import check_types
from ..split import Split, percentile_rank
from ..tensors import AUGMENTS, augment, normalize, one_view, predict_logits, to_input
from ..train import TrainResult, make_optimizer
from .base import DEFENSES, Context, Defense, DefenseResult, timed


# ------------------------------------------------------------------------------------------------ pure arrays

def softmax_entropy(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N,) entropy of their softmax in bits (the reference's log2)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=1) / np.log(2.0)


def entropy_extremes(entropy: np.ndarray, labels: np.ndarray, num_classes: int,
                     k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per given label: the indices of its min(k, n_c) lowest-entropy samples, lowest first (ReBack's
    "suspicious"), and of its min(k, n_c) highest-entropy ones ("benign"). A class with fewer than 2k samples
    has the two overlap, as in the reference."""
    entropy, labels = np.asarray(entropy), np.asarray(labels)
    suspicious, benign = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(entropy[members], kind="stable")]
        suspicious.append(order[:k])
        benign.append(order[len(order) - min(k, len(order)):])
    return suspicious, benign


def stamp(x01: np.ndarray | torch.Tensor, mask, trigger):
    """(1 − m)·x + m·t: a patch (m binary) or a blend (m = α everywhere); works on numpy or torch alike."""
    return (1 - mask) * x01 + mask * trigger


@dataclass
class Reversal:
    """A reverse-engineered trigger in [0, 1] pixel space, channels first."""

    kind: str  # "patch" (the reference's "replace") or "blend"
    mask: np.ndarray  # (1, H, W): 0/1 for a patch, α everywhere for a blend
    trigger: np.ndarray  # (C, H, W)
    sameness: np.ndarray  # (H, W): how often consecutive drawn suspicious images share a pixel (channel mean)
    alpha: float | None = None  # the blend's weight

    def describe(self) -> dict:
        out: dict = {"kind": self.kind, "max_sameness": round(float(self.sameness.max()), 4)}
        if self.kind == "patch":
            rows, cols = np.nonzero(self.mask[0])
            out["pixels"] = int(len(rows))
            out["box"] = ([int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())] if len(rows)
                          else None)  # [row0, row1, col0, col1], inclusive
        else:
            out["alpha"] = round(float(self.alpha), 4)
        return out


def outliers(values: np.ndarray, sigmas: float) -> np.ndarray:
    """1 where a value lies more than `sigmas` standard deviations from the mean of all values, else 0."""
    v = np.asarray(values, dtype=np.float64)
    return (np.abs(v - v.mean()) > sigmas * v.std()).astype(np.float64)


def pixel_modes(x01: np.ndarray, where: np.ndarray) -> np.ndarray:
    """(C, H, W): at the pixels `where` (H, W) is True, each channel's most frequent value among the (K, C, H, W)
    images (read as 256 levels, ties to the lowest); 0 elsewhere."""
    out = np.zeros(x01.shape[1:])
    rows, cols = np.nonzero(where)
    if len(rows):
        levels = np.rint(np.clip(x01[:, :, rows, cols], 0, 1) * 255).astype(np.int64)  # (K, C, P)
        k, c, p = levels.shape
        counts = np.zeros((c * p, 256), np.int64)
        np.add.at(counts, (np.broadcast_to(np.arange(c * p), (k, c * p)), levels.reshape(k, c * p)), 1)
        out[:, rows, cols] = counts.argmax(axis=1).reshape(c, p) / 255.0
    return out


def reverse_trigger(suspicious01: np.ndarray, n: int, rng: np.random.Generator, *, patch_threshold: float = 0.2,
                    outlier_sigmas: float = 2.5, tolerance: float = 0.0) -> Reversal:
    """ReBack's arithmetic trigger reversal from the target class's (K, C, H, W) suspicious images in [0, 1],
    most confident first. `n` of them are drawn (with replacement); each pixel's *sameness* is the share of the
    n − 1 consecutive pairs whose values differ by at most `tolerance` (0: identical, the reference), divided by
    n and averaged over channels. If some pixel's sameness reaches `patch_threshold` the trigger is a patch:
    its mask is the pixels whose sameness is an outlier (`outliers`, 2.5σ), its values each masked pixel's most
    frequent value among the K images (`pixel_modes`; the reference copies the most confident image's).
    Otherwise it is a blend x' = (1 − α)x + α·t: α = 1 − the smallest per-pixel range (max − min over the
    K images) of any channel (the largest over channels of each channel's min(1 − range)), t = the per-pixel
    minimum / α, clipped to [0, 1]."""
    x = np.asarray(suspicious01, dtype=np.float64)
    if x.ndim != 4 or len(x) < 1:
        raise CGDError(f"reback: the suspicious images must be (K, C, H, W) with K >= 1; got shape {x.shape}")
    drawn = x[rng.integers(0, len(x), n)]
    same = (np.abs(np.diff(drawn, axis=0)) <= tolerance).sum(axis=0) / n  # (C, H, W)
    sameness = same.mean(axis=0)
    if sameness.max() >= patch_threshold:
        mask = outliers(sameness, outlier_sigmas)[None]
        return Reversal("patch", mask, pixel_modes(x, mask[0] > 0) * mask, sameness)
    flat = x.reshape(len(x), x.shape[1], -1)  # (K, C, HW)
    spread = flat.max(axis=0) - flat.min(axis=0)  # (C, HW)
    alpha = float((1 - spread).min(axis=1).max())
    lowest = flat.min(axis=0).reshape(x.shape[1:])
    trigger = np.clip(lowest / max(alpha, 1e-6), 0.0, 1.0)
    return Reversal("blend", np.full((1, *x.shape[2:]), alpha), trigger, sameness, alpha)


# ------------------------------------------------------------------------------------------------ model calls

def as01(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


@torch.inference_mode()
def predict01(model: nn.Module, x01: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Predicted classes of `model` (eval mode, one view) for float (N, C, H, W) images in [0, 1]."""
    model.eval()
    out = []
    with one_view(model):
        for i in range(0, len(x01), batch_size):
            x = normalize(torch.from_numpy(np.asarray(x01[i:i + batch_size], dtype=np.float32)))
            out.append(model(x.contiguous(memory_format=torch.channels_last)).argmax(1))
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def target_scores(model: nn.Module, suspicious01: list[np.ndarray], benign01: list[np.ndarray], samples: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ReBack's target test, for every class c at once: Θ_s = mean suspicious(c) − mean benign(a) and the control
    Θ_b = mean benign(b) − mean benign(a), a ≠ b two other classes drawn at random (a = b with two classes);
    each is added to the same `samples` benign images drawn from the other classes (clipped to [0, 1]), and
    π_s, π_b count those the model then puts in c. Returns (π_s, π_b, Υ = π_s / max(π_b, 1)); a class without
    samples, or alone, scores 0."""
    num_classes = len(suspicious01)
    pi_s, pi_b = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    present = [c for c in range(num_classes) if len(suspicious01[c]) and len(benign01[c])]
    means_s = {c: suspicious01[c].mean(axis=0) for c in present}
    means_b = {c: benign01[c].mean(axis=0) for c in present}
    batches, owners = [], []
    for c in present:
        others = [o for o in present if o != c]
        if not others:
            continue
        a, b = rng.choice(others, 2, replace=len(others) < 2)
        pool = np.concatenate([benign01[o] for o in others])
        chosen = pool[rng.integers(0, len(pool), samples)]
        for theta in (means_s[c] - means_b[a], means_b[b] - means_b[a]):
            batches.append(np.clip(chosen + theta, 0.0, 1.0))
        owners.append(c)
    if owners:
        pred = predict01(model, np.concatenate(batches)).reshape(len(owners), 2, samples)
        for i, c in enumerate(owners):
            pi_s[c], pi_b[c] = int((pred[i, 0] == c).sum()), int((pred[i, 1] == c).sum())
    return pi_s, pi_b, pi_s / np.maximum(pi_b, 1)


def trigger_asr(model: nn.Module, images: np.ndarray, reversal: Reversal, target: int) -> float:
    """The share of uint8 `images` the model puts in `target` once stamped with the reversed trigger (0 for
    none)."""
    if len(images) == 0:
        return 0.0
    stamped = stamp(as01(images), reversal.mask, reversal.trigger).astype(np.float32)
    return float((predict01(model, stamped) == target).mean())


# ------------------------------------------------------------------------------------------------ removal (ours)

def unlearn_trigger(model: nn.Module, train: ImageSet, subset: np.ndarray, reversal: Reversal, *, epochs: int,
                    lr: float, share: float, momentum: float, weight_decay: float, batch_size: int, aug: str,
                    gen: torch.Generator, log=lambda s: None) -> list[float]:
    """Fine-tune `model` in place on the samples `subset` at their given labels, `epochs` shuffled passes at a
    constant `lr` (SGD nesterov), with the reversed trigger stamped on a random int(share · B) images of every
    batch B (before the augmentation, as a poisoned image is); cross-entropy. Returns each epoch's mean loss."""
    x_all = torch.from_numpy(np.array(train.images))
    y_all = torch.from_numpy(np.array(train.labels, dtype=np.int64))
    mask = torch.from_numpy(reversal.mask.astype(np.float32))[None]
    trig = normalize(torch.from_numpy(reversal.trigger.astype(np.float32)))[None]  # stamping commutes with it
    sub = torch.from_numpy(np.asarray(subset, dtype=np.int64))
    opt = make_optimizer(model, lr, momentum, weight_decay)
    losses = []
    for e in range(epochs):
        model.train()
        order, total = sub[torch.randperm(len(sub), generator=gen)], 0.0
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            x = to_input(x_all[idx])
            picked = torch.zeros(len(idx), 1, 1, 1)
            picked[torch.randperm(len(idx), generator=gen)[:int(len(idx) * share)]] = 1.0
            x = torch.where(picked.bool(), stamp(x, mask, trig), x)
            loss = F.cross_entropy(model(augment(x.contiguous(memory_format=torch.channels_last), aug, gen)),
                                   y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / max(1, len(order)))
        log(f"ReBack unlearning epoch {e + 1}/{epochs}: {losses[-1]:.4f}")
    model.eval()
    return losses


def flagged_split(entropy: np.ndarray, flagged: np.ndarray) -> Split:
    """D_p = the flagged samples, D_c = the rest, no mixed part. No guide: its columns are 0; the model columns
    are the softmax entropy (low = suspicious) and its rank."""
    n = len(entropy)
    poison = np.sort(np.asarray(flagged, dtype=np.int64))
    zeros = np.zeros(n)
    return Split(np.setdiff1d(np.arange(n), poison), poison, np.zeros(0, np.int64), zeros,
                 entropy.astype(np.float64), zeros, percentile_rank(entropy),
                 info={"model_score": "reback softmax entropy (bits)"})


# ------------------------------------------------------------------------------------------------ the defense

@DEFENSES.register("reback")
class ReBack(Defense):
    """ReBack (Ma et al., IEEE S&P 2024; official Echotoken/ReBack reback.py, written for the
    Fight-Poison-With-Poison toolbox) on the poisoned training set and its victim, no clean data.

    Detection and reversal, as the reference: (1) one forward pass over the training set; per given label, the
    `k` (100) samples of lowest softmax entropy are "suspicious", the `k` of highest "benign". (2) For each class
    c, Θ_s = mean suspicious(c) − mean benign(a) and a control Θ_b = mean benign(b) − mean benign(a) (a, b other
    classes at random) are added to `k` benign images (clipped to [0, 1]); π_s, π_b count those the victim puts
    in c; Υ = π_s / π_b, and a class with Υ > `upsilon` (5) is the target. (3) From `n` (50) of the target's
    suspicious images drawn at random, the share of consecutive pairs identical at each pixel: if it reaches
    `patch_threshold` (0.2) somewhere, the trigger is a patch — mask = pixels whose share is a 2.5σ outlier
    (`outlier_sigmas`), values the masked pixels' most frequent values; otherwise a blend, α = the largest over
    channels of min over pixels of (1 − the pixel's max − min over the k images), pattern = per-pixel min / α.
    (4) The reversed trigger succeeds if it sends more than `success_asr` (0.7) of benign images to the target.

    Removal (ours — **not released**: reback.py ends after step 4, its README points to no other file, and the
    paper's removal is not in the code): if the reversal succeeded, a copy of the victim is fine-tuned `epochs` (2)
    passes over the training samples outside the flagged set at their given labels, with the reversed trigger
    stamped on `stamp_share` (0.2) of every batch — Neural Cleanse's "unlearning" recipe (a share of images
    carrying the reversed trigger, correct labels) applied to ReBack's trigger. SGD nesterov, momentum 0.9, weight
    decay 5e-4, constant lr `lr` (0.01, 1/40 of fastnet's peak victim lr), batch 256, cross-entropy, and the victim
    recipe's augmentation (`augment`; `from_config` takes the victim's, "flip" otherwise: a trigger unlearned only
    unflipped survives in the flipped view that fastnet's test-time augmentation averages in — seen on the tiny
    test data). Among the stamped images the trigger goes with every label, so the model unlearns it even with
    the poison outside the flagged set still in the data, as long as the stamped images of a class outnumber the
    poisons drawn from it (CIFAR-10 at 5 % poison: ≈ 950 against ≈ 270 per class and epoch). With no target
    (Υ ≤ 5 for every class), or a target whose reversed trigger fails (step 4), the victim itself is returned
    unchanged and `info["removal"]` says why.

    Flagged samples (the split's D_p): the target's `k` suspicious samples (D_c: all others; no mixed part) —
    the reference's "Backdoor Sample Extraction"; none without a target. With 2,500 CIFAR-10 poisons and k = 100
    its TPR is at most 4 %: ReBack flags a sample of the poison to read the trigger off, not all of it.

    Deviations from reback.py:
    - No CUDA, no hard-coded target 0 (the reference reports extraction and tests the reversed trigger against
      class 0, plots class 0): everything uses the identified target. Its random draws are seeded here
      (`Context.seed`).
    - Target choice: the reference stops at the first class (in class order) with Υ > 5; here Υ is computed for
      every class and the largest above 5 wins (with the reference's order the paper's target 0 is always tried
      first). Υ = π_s / max(π_b, 1): the reference divides by π_b = 0 (numpy: inf, so a single flip by Θ_s would
      name the target). The two other classes a, b are distinct where there are three or more classes (the
      reference draws them with replacement, so Θ_b can be 0).
    - The images Θ is added to are benign images of the *other* classes (the paper's test: do they flip to c?);
      reback.py draws them from class c's own benign set.
    - The success test (step 4) uses up to `check_samples` (1,000) training images whose given label is not the
      target, drawn at random, instead of the clean test split (no test data is read here).
    - A patch's values: each masked pixel's most frequent value among the k suspicious images; the reference
      copies the most confident suspicious image's pixels, a clean image's whenever that one is clean (seen on
      the tiny test data: a correct mask with a trigger of ASR 0). `tolerance` (default 0, the reference's exact
      equality, on [0, 1] values of uint8 pixels) lets "identical" mean within `tolerance`.
    - Per-class K: a class with fewer than 2k samples has overlapping suspicious and benign sets (as the
      reference's slicing gives); fastnet's flip test-time augmentation is off for every forward here (one view
      per image).

    Cost: one forward pass over the training set (entropy), ≈ 2·k·C forwards for the target test,
    `check_samples` for the success test, then `epochs` training passes over the training set less k samples:
    on CIFAR-10 with fastnet ≈ 2 of the victim's 12 epochs at batch 256 (≈ 0.2× the victim's training time;
    the CGD paper's Table 2 records 112 s + 92 s for ReBack beside a 997 s victim).
    """

    name = "reback"
    from_victim = ("augment",)

    def __init__(self, k: int = 100, n: int = 50, upsilon: float = 5.0, patch_threshold: float = 0.2,
                 outlier_sigmas: float = 2.5, tolerance: float = 0.0, success_asr: float = 0.7,
                 check_samples: int = 1000, epochs: int = 2, lr: float = 0.01, stamp_share: float = 0.2,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256, augment: str = "flip"):
        check_types(self.name, ints=dict(k=k, n=n, check_samples=check_samples, epochs=epochs,
                                         batch_size=batch_size),
                    reals=dict(upsilon=upsilon, patch_threshold=patch_threshold, outlier_sigmas=outlier_sigmas,
                               tolerance=tolerance, success_asr=success_asr, lr=lr, stamp_share=stamp_share,
                               momentum=momentum, weight_decay=weight_decay), texts=dict(augment=augment))
        problems = [what for ok, what in [
            (k >= 1, "k >= 1"), (n >= 2, "n >= 2"), (upsilon > 0, "upsilon > 0"),
            (0 < patch_threshold <= 1, "0 < patch_threshold <= 1"), (outlier_sigmas > 0, "outlier_sigmas > 0"),
            (0 <= tolerance < 1, "0 <= tolerance < 1"), (0 <= success_asr < 1, "0 <= success_asr < 1"),
            (check_samples >= 1, "check_samples >= 1"), (epochs >= 0, "epochs >= 0"), (lr > 0, "lr > 0"),
            (0 <= stamp_share <= 1, "0 <= stamp_share <= 1"),
            (0 <= momentum < 1 and weight_decay >= 0, "0 <= momentum < 1, weight_decay >= 0"),
            (batch_size >= 1, "batch_size >= 1"),
            (augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}")] if not ok]
        if problems:
            raise CGDError(f"reback: needs {'; '.join(problems)}")
        self.k, self.n, self.upsilon = int(k), int(n), float(upsilon)
        self.patch_threshold, self.outlier_sigmas, self.tolerance = float(patch_threshold), float(outlier_sigmas), \
            float(tolerance)
        self.success_asr, self.check_samples = float(success_asr), int(check_samples)
        self.epochs, self.lr, self.stamp_share = int(epochs), float(lr), float(stamp_share)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.batch_size, self.augment = int(batch_size), augment

    def settings(self) -> dict:
        return {"k": self.k, "n": self.n, "upsilon_threshold": self.upsilon, "success_asr": self.success_asr,
                "epochs": self.epochs, "lr": self.lr, "stamp_share": self.stamp_share, "augment": self.augment}

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        rng = np.random.default_rng(context.seed)
        labels = np.asarray(train.labels)
        info: dict = {**self.settings(), "target": None, "reversal": None, "reversed_asr": None}
        if len(train) == 0:
            raise CGDError("reback: the training set is empty")
        with timed(timings, "detection_s"):
            with one_view(victim.model):
                entropy = softmax_entropy(predict_logits(victim.model, train.images))
            suspicious, benign = entropy_extremes(entropy, labels, train.num_classes, self.k)
            s01 = [as01(train.images[i]) for i in suspicious]
            pi_s, pi_b, ups = target_scores(victim.model, s01, [as01(train.images[i]) for i in benign], self.k, rng)
            info.update(pi_s=pi_s.tolist(), pi_b=pi_b.tolist(), upsilon=np.round(ups, 4).tolist())
            over = np.flatnonzero(ups > self.upsilon)
            target = int(over[np.argmax(ups[over])]) if len(over) else None
        if target is None:
            info["removal"] = f"skipped: no target identified (every class has upsilon <= {self.upsilon:g})"
            context.log(f"ReBack: no target class (max upsilon {ups.max():.3g}); the victim is returned unchanged")
            return DefenseResult(victim.model, flagged_split(entropy, np.zeros(0, np.int64)), timings, info)
        flagged = suspicious[target]
        info.update(target=target, flagged=int(len(flagged)))
        with timed(timings, "reversal_s"):
            reversal = reverse_trigger(s01[target], self.n, rng, patch_threshold=self.patch_threshold,
                                       outlier_sigmas=self.outlier_sigmas, tolerance=self.tolerance)
            others = np.setdiff1d(np.flatnonzero(labels != target), flagged)
            check = rng.choice(others, min(self.check_samples, len(others)), replace=False)
            asr = trigger_asr(victim.model, train.images[check], reversal, target)
        info.update(reversal=reversal.describe(), reversed_asr=round(asr, 4))
        context.log(f"ReBack: target {target} (upsilon {ups[target]:.3g}), {reversal.kind} trigger, reversed ASR "
                    f"{asr:.3f}")
        split = flagged_split(entropy, flagged)
        if asr <= self.success_asr:
            info["removal"] = f"skipped: the reversed trigger's ASR {asr:.3f} <= {self.success_asr:g}"
            return DefenseResult(victim.model, split, timings, info)
        model = copy.deepcopy(victim.model)
        with timed(timings, "removal_s"):
            keep = np.setdiff1d(np.arange(len(train)), flagged)
            info["unlearning_loss"] = unlearn_trigger(
                model, train, keep, reversal, epochs=self.epochs, lr=self.lr, share=self.stamp_share,
                momentum=self.momentum, weight_decay=self.weight_decay, batch_size=self.batch_size,
                aug=self.augment, gen=torch.Generator().manual_seed(context.seed), log=context.log)
        info["removal"] = f"unlearned the reversed trigger ({self.epochs} epochs)"
        if context.extra_eval is not None:
            info["eval"] = context.extra_eval(model)
        return DefenseResult(model.eval(), split, timings, info)

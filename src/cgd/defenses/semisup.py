"""The semi-supervised pieces ASD and DBD share: the symmetric cross-entropy both split the data by, and MixMatch
(Berthelot et al. 2019), which both train their network with — the labeled pool with its labels, the rest as
unlabeled images. After the authors' code as ASD (KuofengGao/ASD: model/loss.py, utils/trainer/semi.py) and
BackdoorBench's DBD (utils/defense_utils/dbd/model/loss.py, utils_db/trainer/semi.py) carry it: K = 2 augmented
views of each unlabeled image, their mean softmax sharpened at temperature T, mixup of the whole batch with
λ ~ Beta(α, α) kept ≥ 0.5, L = L_x + λ_u · L_u with λ_u ramped up linearly over the training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..schema import check_types
from ..split import Split, flagged_split
from ..tensors import AUGMENTS, augment, one_view, predict_logits, to_input
from .abl import isolate

RCE_LOG_FLOOR = -math.log(1e-4)  # the references' RCE clamps the one-hot target to [1e-4, 1]: log 1e-4 off-label


# ------------------------------------------------------------------------------------------------ pure tensors

def sce_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al. 2019) as both references compute it: α · CE + β · RCE, where the reverse
    cross-entropy RCE = −Σ_k p_k log q_k has the prediction p (clamped to [1e-7, 1]) and the one-hot label q clamped
    to [1e-4, 1], i.e. −log(1e-4) · Σ_{k ≠ y} p_k. `reduction` "mean" or "none" (one value per sample)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p = torch.softmax(logits, dim=1).clamp(1e-7, 1.0)
    rce = RCE_LOG_FLOOR * (p.sum(1) - p.gather(1, y[:, None]).squeeze(1))
    loss = alpha * ce + beta * rce
    return loss.mean() if reduction == "mean" else loss


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening of (N, C) probabilities: p^(1/T), renormalised per row."""
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Each row of `x` (and its soft target) mixed with a random other row of the same batch: λ·a + (1 − λ)·b,
    λ taken as max(λ, 1 − λ) so the mix stays nearer its own row (MixMatch's MixUp)."""
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(len(x), generator=gen)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def mixmatch_losses(logits: torch.Tensor, targets: torch.Tensor, n_labeled: int) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """(L_x, L_u) of a mixed batch whose first `n_labeled` rows came from labeled images: L_x = soft-target
    cross-entropy of those rows, L_u = mean squared difference between softmax and target over every element of
    the others (the references' MixMatchLoss)."""
    lx = -(F.log_softmax(logits[:n_labeled], dim=1) * targets[:n_labeled]).sum(1).mean()
    lu = ((torch.softmax(logits[n_labeled:], dim=1) - targets[n_labeled:]) ** 2).mean()
    return lx, lu


def batches(pool: np.ndarray, batch_size: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`steps` batches of indices from `pool` as the references' shuffled `drop_last` loaders give them when cycled:
    passes over a fresh permutation, each cut into full batches (the tail dropped), a new permutation when one runs
    out. A pool smaller than a batch gives the whole pool (shuffled) each step; an empty pool is an error."""
    pool = torch.from_numpy(np.asarray(pool, dtype=np.int64))
    if len(pool) == 0:
        raise CGDError("MixMatch needs a non-empty labeled and unlabeled pool")
    b = min(batch_size, len(pool))
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = pool[torch.randperm(len(pool), generator=gen)]
        out.extend(perm[i:i + b] for i in range(0, len(perm) - b + 1, b))
    return out[:steps]


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class MixMatch:
    """MixMatch's settings, the references' defaults (both: batch 64, T 0.5, α 0.75, λ_u 15, K = 2);
    `iterations` is steps per epoch (theirs: 1024). `augment` is one of `cgd.tensors.AUGMENTS`."""

    iterations: int = 1024
    batch_size: int = 64
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 15.0
    augment: str = "flip+translate"

    def __post_init__(self):
        check_types("mixmatch", ints=dict(iterations=self.iterations, batch_size=self.batch_size),
                    reals=dict(temperature=self.temperature, alpha=self.alpha, lambda_u=self.lambda_u),
                    texts=dict(augment=self.augment))
        problems = [what for ok, what in [
            (self.iterations >= 1 and self.batch_size >= 1, "iterations, batch_size >= 1"),
            (self.temperature > 0 and self.alpha > 0 and self.lambda_u >= 0,
             "temperature > 0, alpha > 0, lambda_u >= 0"),
            (self.augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}")] if not ok]
        if problems:
            raise CGDError(f"mixmatch: needs {'; '.join(problems)}")


# ------------------------------------------------------------------------------------------------ training

def mixmatch_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                   labeled: np.ndarray, unlabeled: np.ndarray, mm: MixMatch, gen: torch.Generator,
                   ramp: tuple[float, float], num_classes: int) -> dict[str, float]:
    """One MixMatch epoch of `mm.iterations` steps, in place: each step takes a batch of `labeled` (uint8 NHWC
    `images` with `labels`) and one of `unlabeled` (labels unused), guesses the unlabeled targets from K = 2
    augmented views (mean softmax, no gradient, sharpened), mixes the whole batch, and descends
    L_x + λ_u · L_u. λ_u = `mm.lambda_u` · r, r running linearly from `ramp[0]` to `ramp[1]` over the epoch (the
    references' linear ramp-up, stepped per iteration). Returns the epoch's mean loss, L_x, L_u and λ_u."""
    xs = batches(labeled, mm.batch_size, mm.iterations, gen)
    us = batches(unlabeled, mm.batch_size, mm.iterations, gen)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    sums = {"loss": 0.0, "lx": 0.0, "lu": 0.0, "lambda_u": 0.0}
    model.train()
    for step, (xi, ui) in enumerate(zip(xs, us)):
        x = augment(to_input(images[xi]), mm.augment, gen)
        u_raw = to_input(images[ui])
        u1, u2 = augment(u_raw, mm.augment, gen), augment(u_raw, mm.augment, gen)
        with torch.no_grad():
            q = sharpen((torch.softmax(model(u1), 1) + torch.softmax(model(u2), 1)) / 2, mm.temperature)
        targets = torch.cat([F.one_hot(labels[xi], num_classes).float(), q, q])
        mixed, mixed_t = mixup(torch.cat([x, u1, u2]), targets, float(rng.beta(mm.alpha, mm.alpha)), gen)
        # one forward over labeled and unlabeled together: batch norm sees them all, as the references' interleaving
        # of the three batches is there to approximate
        lx, lu = mixmatch_losses(model(mixed.contiguous(memory_format=torch.channels_last)), mixed_t, len(xi))
        lam_u = mm.lambda_u * (ramp[0] + (ramp[1] - ramp[0]) * step / mm.iterations)
        loss = lx + lam_u * lu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for name, v in (("loss", loss.item()), ("lx", lx.item()), ("lu", lu.item()), ("lambda_u", lam_u)):
            sums[name] += v
    model.eval()
    return {name: v / mm.iterations for name, v in sums.items()}


def per_sample_sce(model: nn.Module, images: np.ndarray, labels: np.ndarray, alpha: float = 0.1,
                   beta: float = 1.0) -> np.ndarray:
    """Each sample's SCE under `model` in eval mode, one view per image (fastnet's flip test-time augmentation
    off): what both references rank the training set by."""
    with one_view(model):
        logits = torch.from_numpy(predict_logits(model, images))
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    return sce_loss(logits, y, alpha, beta, reduction="none").double().numpy()


def check_pool_share(who: str, epsilon: float, n: int) -> None:
    """One clear error when the labeled share `epsilon` (in (0, 1)) of `n` samples labels none of them."""
    if int(n * epsilon) < 1:
        raise CGDError(f"{who}: epsilon {epsilon} of {n} samples leaves the labeled pool empty")


def lowest(losses: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the int(ratio · N) samples of lowest loss, sorted (both references' `ratio` split): ABL's
    `isolate`, in index order."""
    return np.sort(isolate(losses, ratio))


def pool_split(scores: np.ndarray, labeled: np.ndarray, what: str) -> Split:
    """The split a semi-supervised defense ends with: D_c = its last labeled pool, D_p = everything else (the images
    it used unlabeled). The model columns are the per-sample `scores` the pool was chosen by (`what`: low ones
    labeled), negated (low: poison-like, as the other splits' model scores)."""
    return flagged_split(-np.asarray(scores, dtype=np.float64), np.setdiff1d(np.arange(len(scores)), labeled),
                         f"{what}, negated (low: poison-like)")

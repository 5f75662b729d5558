"""D-BR (Chen, Wu & Wang, NeurIPS 2022, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned
Samples"; BackdoorBench defense/d-br.py, utils/defense_utils/dbr/sd.py, dataloader_bd.py and
config/defense/d-br/cifar10.yaml, after the authors' SCLBD/Effective_backdoor_defense): a poisoned-data defense in
two modules. Sample distinguishment (SD) trains a network of its own on the poisoned training set for a few
epochs without augmentation, so that it learns the trigger, then fine-tunes its feature extractor to push the
class centres apart; on that extractor a poisoned image's features move more under a strong transformation (a
random rotation and shift) than a clean image's — the trigger, not the object, is what the features hold, and the
transformation breaks it. The feature consistency towards transformation, FCT(x) = ‖f(x) − f(T(x))‖², ranks the
training set: the lowest share is taken as clean (D_c), the highest as poisoned (D_p). Backdoor removal (BR)
then works on the *victim*: each epoch one pass of gradient ascent on D_p (unlearning), then one of plain
cross-entropy on D_c (relearning)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..schema import check_types
from ..split import Split, percentile_rank
from ..tensors import AUGMENTS, denormalize, normalize, to_input
from ..train import TrainConfig, TrainResult, make_optimizer
from .abl import fresh_model, run_epoch
from .base import DEFENSES, Context, Defense, DefenseResult, timed

COSINE_T_MAX = 100  # BackdoorBench's CosineAnnealingLR(T_max=100), stepped once per SD epoch (both SD stages)
BR_LR_DIVISOR = 400  # br_lr = the victim recipe's lr / 400 by default (1e-3 for fastnet's 0.4; see `DBR`)


def br_from_victim(cfg: dict) -> dict:
    """The BR step's settings tied to the run's victim recipe: its lr / `BR_LR_DIVISOR` and its augmentation
    (D-BR's and MSPC's removal; `defense.params` overrides them)."""
    return {"br_lr": cfg["victim"]["lr"] / BR_LR_DIVISOR, "augment": cfg["victim"]["augment"]}


# ------------------------------------------------------------------------------------------------ pure tensors

def intra_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """BackdoorBench's L_intra (d-br.py `finetune_epoch`): the mean, over the K × K matrix of the batch's K class
    centres (mean feature of each given label present in the batch), of the cosine similarity between two
    centres, with the diagonal set to 0. Minimising it pushes the class centres apart. 0 for a batch of one
    class."""
    onehot = F.one_hot(labels, num_classes).to(features.dtype)  # (B, C)
    counts = onehot.sum(0)
    present = counts > 0
    centres = F.normalize((onehot.T @ features)[present] / counts[present, None], dim=1)
    sim = centres @ centres.T
    return sim.masked_fill(torch.eye(len(sim), dtype=torch.bool), 0.0).mean()


def affine_warp(x01: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images rotated about their centre by `angles` (N, degrees, counter-clockwise) and then shifted
    by `shifts` (N, 2: right and down, pixels), nearest-neighbour, 0 where no source pixel is — torchvision's
    RandomRotation followed by RandomAffine(translate) with their defaults, in one batched resampling (an integer
    shift after a nearest-neighbour rotation lands on the same source pixels)."""
    n, _, h, w = x01.shape
    t = -torch.deg2rad(angles.to(torch.float32))  # rows run downwards: −angle is counter-clockwise on screen
    cos, sin = torch.cos(t), torch.sin(t)
    # output pixel p (pixel units about the centre) reads input R⁻¹ (p − s); in affine_grid's normalised
    # coordinates: S⁻¹ R⁻¹ S and −S⁻¹ R⁻¹ s, S = diag(W / 2, H / 2)
    sx, sy = w / 2.0, h / 2.0
    dx, dy = shifts[:, 0].to(torch.float32), shifts[:, 1].to(torch.float32)
    theta = torch.stack([
        torch.stack([cos, sin * sy / sx, -(cos * dx + sin * dy) / sx], dim=1),
        torch.stack([-sin * sx / sy, cos, -(-sin * dx + cos * dy) / sy], dim=1)], dim=1)  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, x01.shape[1], h, w], align_corners=False)
    return F.grid_sample(x01.contiguous(), grid, mode="nearest", padding_mode="zeros", align_corners=False)


def strong_transform(x: torch.Tensor, gen: torch.Generator, degrees: float, translate: float) -> torch.Tensor:
    """The reference's transformation T for the FCT (`trans1` 'rotate' then `trans2` 'affine', both
    BackdoorBench's and the authors' defaults), drawn per image: a rotation by an angle uniform in
    [−degrees, degrees], then a shift by a whole number of pixels, round(U(−translate·W, translate·W))
    horizontally (H vertically), black where the image has no pixels. Takes and returns model inputs
    (`to_input`'s normalisation)."""
    n, _, h, w = x.shape
    angles = (torch.rand(n, generator=gen) * 2 - 1) * degrees
    shifts = torch.round((torch.rand(n, 2, generator=gen) * 2 - 1) * torch.tensor([translate * w, translate * h]))
    out = normalize(affine_warp(denormalize(x), angles, shifts))
    return out.contiguous(memory_format=torch.channels_last)


def sd_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features SD trains and FCT compares: the network's penultimate features (`features`, the linear head
    dropped), through a ReLU. The reference's networks (PreActResNet18, VGG, ResNet) end their extractor on a ReLU,
    so their features are non-negative, the cosine of two class centres is ≥ 0 and L_intra's floor is 0 (centres
    on disjoint channels); fastnet's are max-pooled GELU outputs, which can be negative, and there L_intra falls to
    −1/K by pushing the features to GELU's negative floor — a degenerate solution the reference's networks cannot
    reach. Seen on a 10,000-image CIFAR-10 subset with 10 % BadNets (fastnet, lr 0.01): without the ReLU the loss
    turns negative in the second L_intra epoch and the top 5 % by FCT holds 8–47 % poison over epochs 1–4 (0.99
    before L_intra); with it, 95–100 %. On non-negative features (our PreActResNet18's) the ReLU changes nothing."""
    return torch.relu(net.features(x).flatten(1))


class FeatureNet(nn.Module):
    """A network without its linear head (the reference's `drop_linear`): forward gives its `sd_features`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sd_features(self.net, x)


@torch.inference_mode()
def fct_scores(net: nn.Module, images: np.ndarray, gen: torch.Generator, *, degrees: float, translate: float,
               batch_size: int = 1000) -> np.ndarray:
    """FCT of every uint8 image under `net`'s `sd_features` f, in eval mode: the mean over feature dimensions of
    (f(x) − f(T(x)))², T drawn once per image (`strong_transform`) — the reference's ‖f(x) − f(T(x))‖² divided by
    the feature width, as sd.py computes it."""
    net.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size])
        a, b = sd_features(net, x), sd_features(net, strong_transform(x, gen, degrees, translate))
        out.append(((a - b) ** 2).mean(1))
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def fct_split(fct: np.ndarray, clean_ratio: float, poison_ratio: float) -> Split:
    """D_c = the int(N · clean_ratio) samples of lowest FCT, D_p = the int(N · poison_ratio) of highest (ties broken
    by index), the rest D_u ("mixed"). No guide: the guide columns are 0; the model columns are −FCT (low =
    poison-like, as the other splits' model scores) and its rank."""
    n = len(fct)
    n_clean, n_poison = int(n * clean_ratio), int(n * poison_ratio)
    if n_clean + n_poison > n:
        raise CGDError(f"d-br: D_c ({n_clean}) and D_p ({n_poison}) would overlap in {n} samples: "
                       "clean_ratio + poison_ratio must be at most 1")
    order = np.argsort(fct, kind="stable")
    clean, poison = np.sort(order[:n_clean]), np.sort(order[n - n_poison:])
    mixed = np.sort(order[n_clean:n - n_poison])
    zeros, score = np.zeros(n), -np.asarray(fct, dtype=np.float64)
    return Split(clean, poison, mixed, zeros, score, zeros, percentile_rank(score),
                 info={"model_score": "d-br FCT, negated (low: poison-like)"})


def unlearn_relearn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], poison: np.ndarray,
                    clean: np.ndarray, *, epochs: int, lr: float, momentum: float, weight_decay: float,
                    batch_size: int, aug: str, gen: torch.Generator, log=lambda s: None) -> list[list[float]]:
    """BR (in place): each epoch one shuffled pass of gradient ascent of CE on `poison`, then one of CE descent on
    `clean`, one SGD optimizer (not Nesterov) at a constant `lr`. Returns each epoch's [ascended CE, CE]."""
    opt = make_optimizer(model, lr, momentum, weight_decay, nesterov=False)
    out = []
    for e in range(epochs):
        up = run_epoch(model, opt, *data, poison, batch_size, F.cross_entropy, aug, gen, ascent=True)
        down = run_epoch(model, opt, *data, clean, batch_size, F.cross_entropy, aug, gen)
        out.append([up, down])
        log(f"D-BR BR epoch {e + 1}/{epochs}: CE on D_p {up:.4f} (ascended), on D_c {down:.4f}")
    model.eval()
    return out


# ------------------------------------------------------------------------------------------------ the defense

@DEFENSES.register("d-br")
class DBR(Defense):
    """D-BR (Chen et al., NeurIPS 2022; BackdoorBench defense/d-br.py, utils/defense_utils/dbr/sd.py,
    config/defense/d-br/cifar10.yaml) on the poisoned training set and its victim, no clean data: FCT ranks the
    training set on a network of its own; the victim unlearns the top 5 % and relearns the bottom 20 %.

    (1) SD: a new network of the victim's architecture (the victim's weights are not used) trains `sd_epochs` (2)
    on all the data with cross-entropy and no augmentation, then its feature extractor (`features`, the linear
    head dropped) `intra_epochs` (10) on the reference's L_intra (`intra_loss`: mean cosine similarity between the
    batch's class centres, minimised); one SGD optimizer (momentum 0.9, weight decay 5e-4, not Nesterov) carries
    over, lr `lr` (0.01) annealed by BackdoorBench's cosine with T_max 100 per epoch (≈ constant over 12 epochs).
    (2) FCT(x) = mean of (f(x) − f(T(x)))² over the features, in eval mode, T = rotation U(−`degrees`, `degrees`)
    (180) then a shift of up to `translate` (0.2) of the image side (`strong_transform`). (3) The lowest
    `clean_ratio` (0.2) is D_c, the highest `poison_ratio` (0.05) D_p, the rest D_u (the split's "mixed"; unused).
    (4) BR, on a copy of the victim: `br_epochs` epochs of one shuffled pass of gradient ascent on D_p (maximising
    CE), then one of CE on D_c, one SGD optimizer (momentum 0.9, weight decay 5e-4, not Nesterov) at a constant
    `br_lr`. Batch 128 throughout, as BackdoorBench.

    Scaling (CPU budget of issue 14, ≤ 2× the victim's training time): BackdoorBench runs 2 + 10 SD epochs and 20
    BR epochs; the defaults here are **2 + 10 SD epochs and 10 BR epochs**. Cost in full-set epochs: 12 (SD) +
    2 feature passes (FCT, ≈ 0.7 of a training epoch) + 10 × 25 % (BR) ≈ 15 epochs at batch 128, against the
    victim's 12 at batch 512 — ≈ 1.0–1.4× the victim's time (one thread, fastnet 32 px training measured at
    ≈ 600 img/s at batch 128 and ≈ 500 img/s at 512; the benchmark records the seconds). BackdoorBench's full
    2 + 10 / 20 would be ≈ 17.5 epochs (≈ 1.2–1.7×): it would fit too, but the halved BR keeps a margin beside
    other jobs, and at the default `br_lr` the ascended CE on D_p grows faster every epoch (2.9 → 38 over 10,
    see below), so a longer BR runs towards the divergence seen at larger lrs.

    Learning rates. SD keeps BackdoorBench's **lr 0.01** (`lr`): the SD network is only a detector, and on a
    10,000-image CIFAR-10 subset with 10 % BadNets (fastnet, batch 128) it gives FCT AUROC 0.975 after the two CE
    epochs and 0.92–0.98 over six L_intra epochs, whereas carrying the victim recipe's lr over (0.4 for fastnet,
    as ABL does) turns L_intra unstable (its loss 0.15 → 0.27 at epoch 3, AUROC 0.96 → 0.74; 0.1: 0.94–0.98).
    BR's 1e-4 (1/100 of BackdoorBench's victim lr 0.01) carries over neither literally nor by that ratio: `br_lr`
    defaults to the victim recipe's lr / 400 (**1e-3** for fastnet's 0.4; `from_config` takes the victim's lr).
    Measured by BR alone on a CIFAR-10 fastnet victim (CTRL, benchmarks/runs/ctrl; D_p its 2,500 poisoned images,
    D_c 10,000 random clean ones; 10 epochs), by the defense's own BR losses: at the ratio's 4e-3 the ascent
    diverges — the relearning CE on D_c climbs from 0.62 to 82 and the weights move 4× their norm (test CA, also
    recorded: 0.86 → 0.13); at the literal 1e-4 it hardly unlearns — D_p's ascended CE 2.4 → 4.7, weights 2.9 %
    (test ASR 0.99 → 0.94, CA 0.86 → 0.83); at 1e-3 D_p's CE rises steadily (2.9 → 38) while D_c's stays at
    0.48–0.56 (test ASR 0.00 from epoch 4, CA 0.82). fastnet's recipe (label smoothing, scaled logits, a
    linear-decay schedule peaking at 0.4) makes its lr no measure of the steps ascent tolerates. `br_lr=1e-4`
    gives the literal setting.

    Other deviations from the reference:
    - SD's features go through a ReLU (`sd_features`): fastnet's max-pooled GELU features can be negative, which
      lets L_intra reach a degenerate floor below the reference networks' (non-negative features); see there.
    - BR's augmentation: the victim recipe's (`augment`, "flip" by default; `from_config` takes the victim's),
      not BackdoorBench's random crop (padding 4) + flip, as ABL and ReBack here.
    - FCT is computed once, and D_c / D_p are exact shares of its ranking. BackdoorBench computes it twice with
      fresh random transformations (thresholds from the first pass, the split from the second, so the shares are
      only about 20 % / 5 %; `<=` its threshold also admits one sample more to D_c).
    - The rotation is a batched nearest-neighbour resampling in torch (`affine_warp`), about the pixel grid's
      centre; torchvision rotates PIL images about (W/2, H/2) in its own pixel convention (a sub-pixel
      difference).
    - BackdoorBench's per-epoch test-set evaluations are not run (`Context.extra_eval`, when given, is called
      once on the defended model and only logged). fastnet's flip test-time augmentation plays no part: FCT reads
      `features`, and the SD network is never evaluated as a classifier.
    """

    name = "d-br"

    def __init__(self, sd_epochs: int = 2, intra_epochs: int = 10, br_epochs: int = 10, clean_ratio: float = 0.2,
                 poison_ratio: float = 0.05, degrees: float = 180.0, translate: float = 0.2,
                 lr: float = 0.01, br_lr: float | None = None, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 128, augment: str = "flip"):
        check_types(self.name, ints=dict(sd_epochs=sd_epochs, intra_epochs=intra_epochs, br_epochs=br_epochs,
                                         batch_size=batch_size),
                    reals=dict(clean_ratio=clean_ratio, poison_ratio=poison_ratio, degrees=degrees,
                               translate=translate, lr=lr, br_lr=br_lr, momentum=momentum,
                               weight_decay=weight_decay),
                    texts=dict(augment=augment))
        problems = [what for ok, what in [
            (min(sd_epochs, intra_epochs, br_epochs) >= 0, "epochs >= 0"),
            (0 < clean_ratio < 1 and 0 < poison_ratio < 1, "0 < clean_ratio, poison_ratio < 1"),
            (clean_ratio + poison_ratio <= 1, "clean_ratio + poison_ratio <= 1 (D_c and D_p must not overlap)"),
            (0 <= degrees <= 360, "0 <= degrees <= 360"), (0 <= translate <= 1, "0 <= translate <= 1"),
            (lr is not None and lr > 0 and (br_lr is None or br_lr > 0), "lr, br_lr > 0"),
            (0 <= momentum < 1 and weight_decay >= 0, "0 <= momentum < 1, weight_decay >= 0"),
            (batch_size >= 1, "batch_size >= 1"),
            (augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}")] if not ok]
        if problems:
            raise CGDError(f"d-br: needs {'; '.join(problems)}")
        self.sd_epochs, self.intra_epochs, self.br_epochs = int(sd_epochs), int(intra_epochs), int(br_epochs)
        self.clean_ratio, self.poison_ratio = float(clean_ratio), float(poison_ratio)
        self.degrees, self.translate = float(degrees), float(translate)
        self.lr = float(lr)
        self.br_lr = float(br_lr) if br_lr is not None else TrainConfig().lr / BR_LR_DIVISOR
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.batch_size, self.augment = int(batch_size), augment

    @classmethod
    def from_config(cls, cfg: dict, **objects) -> "DBR":
        return cls(**{**br_from_victim(cfg), **cfg["defense"]["params"]})

    def settings(self) -> dict:
        return {"epochs": [self.sd_epochs, self.intra_epochs, self.br_epochs], "clean_ratio": self.clean_ratio,
                "poison_ratio": self.poison_ratio, "lr": self.lr, "br_lr": self.br_lr, "augment": self.augment}

    def sd_network(self, train: ImageSet, victim: TrainResult, data, gen: torch.Generator, seed: int,
                   log) -> tuple[nn.Module, dict]:
        """SD's steps (a)–(b): the new network after its CE epochs and its L_intra fine-tuning; and the losses."""
        if getattr(victim.model, "cgd_spec", None) is None or not hasattr(victim.model, "features"):
            raise CGDError("d-br trains a network of its own and needs the victim's architecture, with a `features` "
                           "method: give a model saved by cgd (a .safetensors with its .json sidecar)")
        net = fresh_model(victim, seed, "d-br")
        everyone = np.arange(len(train))
        opt = make_optimizer(net, self.lr, self.momentum, self.weight_decay, nesterov=False)
        lrs = [self.lr * (1 + math.cos(math.pi * e / COSINE_T_MAX)) / 2
               for e in range(self.sd_epochs + self.intra_epochs)]
        k = train.num_classes
        stages = [("ce", net, F.cross_entropy, self.sd_epochs),
                  ("intra", FeatureNet(net), lambda f, y: intra_loss(f, y, k), self.intra_epochs)]
        losses: dict[str, list[float]] = {}
        e = 0
        for label, model, loss_fn, epochs in stages:
            losses[label] = []
            for i in range(epochs):
                for g in opt.param_groups:
                    g["lr"] = lrs[e]
                e += 1
                losses[label].append(run_epoch(model, opt, *data, everyone, self.batch_size, loss_fn, "none",
                                               gen))
                log(f"D-BR SD {label} epoch {i + 1}/{epochs}: {losses[label][-1]:.4f}")
        return net.eval(), losses

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        n = len(train)
        if int(n * self.poison_ratio) < 1 or int(n * self.clean_ratio) < 1:
            raise CGDError(f"d-br: clean_ratio {self.clean_ratio} / poison_ratio {self.poison_ratio} of {n} samples "
                           "leave D_c or D_p empty")
        data = (torch.from_numpy(np.array(train.images)), torch.from_numpy(np.array(train.labels, dtype=np.int64)))
        gen = torch.Generator().manual_seed(context.seed)
        info: dict = self.settings()
        with timed(timings, "sd_train_s"):
            net, info["loss"] = self.sd_network(train, victim, data, gen, context.seed, context.log)
        with timed(timings, "fct_s"):
            fct = fct_scores(net, train.images, gen, degrees=self.degrees, translate=self.translate)
            split = fct_split(fct, self.clean_ratio, self.poison_ratio)
        context.log(f"D-BR split: D_c {len(split.clean)} (FCT <= {fct[split.clean].max():.4g}), D_p "
                    f"{len(split.poison)} (FCT >= {fct[split.poison].min():.4g}), D_u {len(split.mixed)}")
        model = copy.deepcopy(victim.model)
        with timed(timings, "br_s"):
            info["loss"]["br"] = unlearn_relearn(
                model, data, split.poison, split.clean, epochs=self.br_epochs, lr=self.br_lr,
                momentum=self.momentum, weight_decay=self.weight_decay, batch_size=self.batch_size,
                aug=self.augment, gen=gen, log=context.log)
        if context.extra_eval is not None:
            info["eval"] = context.extra_eval(model)
            context.log(f"D-BR after BR: {info['eval']}")
        return DefenseResult(model.eval(), split, timings, info)

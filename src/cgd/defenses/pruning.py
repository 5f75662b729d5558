"""Pruning baselines (issue 14): EP (entropy-based pruning of BN channels) and FP (Fine-Pruning), the latter on
trusted clean indices (`Context.clean_indices`: the benchmark's 5 % oracle) or on CGD's split-clean D_c (FP-SC).

Both follow BackdoorBench (`defense/ep.py`, `defense/fp.py`) in their algorithm and settings; where they differ,
the class docstring says so.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..tensors import one_view, predict_logits, to_input
from ..train import TrainResult, make_optimizer
from .base import DEFENSES, CleanDataDefense, Context, Defense, DefenseResult, sgd_epochs, timed
from .guided import SplitClean


# ------------------------------------------------------------------------------------------------ EP

def histogram_entropy(feats: torch.Tensor, bin_width: float = 0.1) -> torch.Tensor:
    """(C, M) standardised values -> (C,) entropy (nats) of each row's histogram with bins `bin_width` wide,
    starting at that row's minimum."""
    lo = feats.min(1, keepdim=True).values
    bins = ((feats - lo) / bin_width).floor().long()
    counts = torch.zeros(feats.shape[0], int(bins.max()) + 1).scatter_add_(1, bins, torch.ones_like(feats))
    p = counts / feats.shape[1]
    return -(p * torch.log(p.clamp_min(1e-30))).sum(1)


@torch.no_grad()
def bn_channel_entropy(model: nn.Module, images: np.ndarray, bin_width: float = 0.1) -> dict[str, torch.Tensor]:
    """Per BatchNorm2d layer (by module name): the entropy of each channel's pre-activation distribution over
    `images`, EP's statistic: the BN *input*, max-pooled over space per image (as BackdoorBench's DDE batch norm
    collects it), standardised per channel, histogrammed."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(
        name, args[0].flatten(2).amax(2).T.float())) for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)]
    if not hooks:
        raise CGDError("EP prunes BatchNorm2d channels: the model has no BatchNorm2d layer")
    try:
        with one_view(model.eval()):
            model(to_input(images))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, f in seen.items():
        std = f.std(1, keepdim=True)
        z = torch.nan_to_num((f - f.mean(1, keepdim=True)) / std, nan=0.0, posinf=0.0, neginf=0.0)
        out[name] = histogram_entropy(z, bin_width)
    return out


def prune_bn_channels(model: nn.Module, flagged: dict[str, torch.Tensor]) -> int:
    """Zero the BN weight and bias of the flagged channels (in place): those channels then output 0 whatever
    their input. Returns how many were pruned."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, idx in flagged.items():
            mods[name].weight[idx] = 0
            mods[name].bias[idx] = 0
    return int(sum(int(i.sum()) for i in flagged.values()))


@DEFENSES.register("ep")
class EP(Defense):
    """EP (Zheng et al., NeurIPS 2022, "Pre-activation Distributions Expose Backdoor Neurons"; BackdoorBench
    defense/ep.py): one batch of the poisoned training set; per BN layer, the channels whose pre-activation
    entropy is below mean − u·std of that layer's channel entropies have their BN weight and bias zeroed.
    Poisoned data only, no clean data, no training.

    u = 3 (BackdoorBench's default) carries over to fastnet unchanged: the threshold is in units of each layer's
    own spread of entropies, so it does not depend on the network's scale; fastnet's BN layers have 24–128
    channels (PreActResNet18: 64–512), so mean and std are estimated from fewer channels per layer.

    Deviations: the batch is `batch_size` images drawn with the run's seed *without* augmentation (BackdoorBench:
    the first shuffled batch of its training loader, with its train-time crop/flip); fastnet's flip test-time
    augmentation is off while statistics are collected; bins start at each channel's minimum and every value is
    counted (BackdoorBench's strict inequalities drop values on bin edges). BackdoorBench's sweep of u over
    linspace(0, 10, 21) only draws plots from the test set and is not run.
    """

    name = "ep"

    def __init__(self, u: float = 3.0, batch_size: int = 256, bin_width: float = 0.1):
        if not (batch_size >= 2 and bin_width > 0 and math.isfinite(u)):
            raise CGDError(f"ep: needs batch_size >= 2, bin_width > 0, a finite u; got {batch_size}, "
                           f"{bin_width}, {u}")
        self.u, self.batch_size, self.bin_width = float(u), int(batch_size), float(bin_width)

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        model = copy.deepcopy(victim.model).eval()
        with timed(timings, "defense_s"):
            rng = np.random.default_rng(context.seed)
            idx = np.sort(rng.choice(len(train), size=min(self.batch_size, len(train)), replace=False))
            ent = bn_channel_entropy(model, train.images[idx], self.bin_width)
            flagged = {k: e < e.mean() - self.u * e.std() for k, e in ent.items()}
            n = prune_bn_channels(model, flagged)
        per_layer = {k: torch.nonzero(f).flatten().tolist() for k, f in flagged.items()}
        context.log(f"EP u={self.u}: pruned {n} of {sum(len(e) for e in ent.values())} BN channels")
        return DefenseResult(model, None, timings, {"u": self.u, "pruned": n, "pruned_channels": per_layer,
                                                    "batch": len(idx)})


# ------------------------------------------------------------------------------------------------ FP

def _head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "features"):
        raise CGDError("FP prunes the channels feeding the final linear layer: it needs a model with "
                       "`features` and a linear `head` (fastnet, preact-resnet18)")
    return head


def prune_order(features: np.ndarray) -> np.ndarray:
    """Channels of the last layer from least to most active on clean data (mean activation, FP's ranking)."""
    return np.argsort(features.mean(0), kind="stable")


def masked_accuracy(model: nn.Module, features: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> float:
    """Accuracy of the head on `features` with the channels outside `keep` (bool) zeroed."""
    head = _head(model)
    with torch.no_grad():
        logits = head(torch.from_numpy(features * keep))
    return float((logits.argmax(1).numpy() == labels).mean())


def finetune(model: nn.Module, images: np.ndarray, labels: np.ndarray, keep: np.ndarray, epochs: int,
             lr: float, batch_size: int, weight_decay: float, seed: int, log=None) -> list[float]:
    """Fine-tune `model` in place on clean data (SGD m 0.9, cosine lr, flip augmentation, plain CE), the pruned
    head columns held at zero (their gradient is zeroed, so weight decay and momentum leave them 0). Returns the
    mean loss of each epoch."""
    head = _head(model)
    drop = torch.from_numpy(~keep)
    hook = head.weight.register_hook(lambda g: g.masked_fill(drop[None, :], 0.0))
    opt = make_optimizer(model, lr, 0.9, weight_decay, nesterov=False)
    x_all, y_all = torch.from_numpy(np.array(images)), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    model.train()
    try:
        return sgd_epochs(lambda xb, yb: F.cross_entropy(model(xb), yb), opt, x_all, y_all, epochs, batch_size,
                          "flip", torch.Generator().manual_seed(seed), log, "FP fine-tuning")
    finally:
        hook.remove()
        model.eval()


@DEFENSES.register("fp")
class FP(CleanDataDefense):
    """Fine-Pruning (Liu et al., RAID 2018; BackdoorBench defense/fp.py) on trusted clean data
    (`Context.clean_indices`; in the benchmark a 5 % *oracle* drawn with the known poison mask): rank the last
    layer's channels (the features feeding the linear head) by mean activation on clean data, prune from the
    least active in steps of `step` (1 %) of the channels, keep the largest pruning whose clean accuracy is still
    ≥ (1 − acc_ratio) × the unpruned accuracy, then fine-tune the pruned model on the clean data (100 epochs,
    SGD lr 0.01 cosine, batch 256, BackdoorBench's settings).

    Deviation: BackdoorBench picks the pruning level by *test-set* accuracy; here it is picked on a held-out
    slice (`holdout`, 10 %) of the defense's own clean data, which is then not used for fine-tuning. Pruning
    zeroes the head's input columns (the fine-tuning keeps them zero), so the model stays the same architecture.
    Fine-tuning augments with flips only (the victim recipe's), not BackdoorBench's random crop."""

    name = "fp"
    min_clean = 2

    def __init__(self, step: float = 0.01, acc_ratio: float = 0.1, holdout: float = 0.1, epochs: int = 100,
                 lr: float = 0.01, batch_size: int = 256, weight_decay: float = 5e-4, max_clean: int | None = None):
        if not (0 < step <= 1 and 0 <= acc_ratio < 1 and 0 < holdout < 1 and epochs >= 0 and lr > 0
                and batch_size >= 1):
            raise CGDError("fp: needs 0 < step <= 1, 0 <= acc_ratio < 1, 0 < holdout < 1, epochs >= 0, lr > 0, "
                           "batch_size >= 1")
        self.set_max_clean(max_clean)
        self.step, self.acc_ratio, self.holdout, self.epochs = float(step), float(acc_ratio), float(holdout), \
            int(epochs)
        self.lr, self.batch_size, self.weight_decay = float(lr), int(batch_size), float(weight_decay)

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        given, split = self.clean_data(train, victim, context, timings)
        rng = np.random.default_rng(context.seed)
        clean = rng.permutation(self.capped(given, context.seed))
        n_hold = max(1, int(round(self.holdout * len(clean))))
        if len(clean) - n_hold < 1:
            raise CGDError(f"fp: {len(clean)} clean samples leave none to fine-tune on beside the held-out slice")
        hold, tune = clean[:n_hold], clean[n_hold:]
        model = copy.deepcopy(victim.model).eval()
        with timed(timings, "prune_s"):
            feats = predict_logits(model, train.images[tune], features=True)
            order = prune_order(feats)
            hold_feats, hold_y = predict_logits(model, train.images[hold], features=True), train.labels[hold]
            c = len(order)
            keep = np.ones(c, bool)
            base = masked_accuracy(model, hold_feats, hold_y, keep)
            n_step, pruned, sweep = max(1, int(round(self.step * c))), 0, []
            for k in range(n_step, c, n_step):
                trial = np.ones(c, bool)
                trial[order[:k]] = False
                acc = masked_accuracy(model, hold_feats, hold_y, trial)
                sweep.append([k, acc])
                if acc < (1 - self.acc_ratio) * base:
                    break
                pruned, keep = k, trial
            with torch.no_grad():
                _head(model).weight[:, ~torch.from_numpy(keep)] = 0
        context.log(f"FP: pruned {pruned} of {c} last-layer channels (held-out accuracy {base:.3f} unpruned)")
        with timed(timings, "finetune_s"):
            losses = finetune(model, train.images[tune], train.labels[tune], keep, self.epochs, self.lr,
                              self.batch_size, self.weight_decay, context.seed, context.log)
        info = {"clean_source": self.clean_source, "clean": int(len(given)), "used": int(len(clean)),
                "held_out": int(n_hold),
                "pruned": int(pruned), "channels": int(c), "held_out_acc_unpruned": base, "sweep": sweep,
                "finetune_loss": losses, "selection": "held-out slice of the defense's clean data"}
        return DefenseResult(model, split, timings, info)


@DEFENSES.register("fp-sc")
class FPSC(SplitClean, FP):
    """FP on CGD's split-clean D_c instead of given clean data (CGD paper §4.3, "-SC"): CGD's scoring stages
    alone (guide, model score, split; no unlearning) make D_c. Same FP settings, except the budget (issue 14: ≤ 2×
    the victim's training time): D_c holds ~45–70 % of the training set (22,182 of CIFAR-10's 50,000 on the BadNets
    victim of 2026-12-04); FP's 100 fine-tuning epochs over all of it cost ≈ 2 M sample-steps ≈ 40 victim epochs,
    ≈ 3.3× the victim. `max_clean` defaults to **10,000** samples of D_c drawn with the run's seed (≈ 0.9 M
    sample-steps, estimated ≈ 1.5× the victim, plus CGD's scoring: 0.1× with the guide's logits cached, 0.4× cold;
    every other setting kept); `max_clean=0` uses all of D_c. The split's D_p is reported as the samples flagged."""

    name = "fp-sc"
    sc_max_clean = 10_000

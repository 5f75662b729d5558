"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; BackdoorBench defense/anp.py,
config/defense/anp/cifar10.yaml, utils/defense_utils/anp/anp_model/anp_batchnorm.py): a clean-data defense that
learns one mask value in [0, 1] per BatchNorm neuron so that the network keeps its clean predictions even when its
neurons are adversarially perturbed, then prunes the neurons whose mask is small. Backdoor neurons are the ones a
small perturbation turns against the clean labels (the paper's observation), so their masks are driven down first.

The masks and perturbations live in wrappers that take the place of the BatchNorm layers of a copy of the victim
while the masks are optimised (`noisy_batchnorms`); the wrappers are removed afterwards, and pruning zeroes the BN
scale of the chosen neurons, so the defended model is a plain network of the victim's architecture.

On trusted clean indices (`Context.clean_indices`, the benchmark's 5 % oracle) or, as ANP-SC, on CGD's
split-clean D_c."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..schema import check_types
from ..tensors import AUGMENTS, accuracy, augment, one_view, to_input
from ..train import TrainResult
from .base import DEFENSES, CleanDataDefense, Context, DefenseResult, timed
from .guided import SplitClean

BN_STATS = ("batch", "running")  # what the wrapped BN layers normalise with while the masks are optimised


# ------------------------------------------------------------------------------------------------ noisy BN

class NoisyBatchNorm(nn.Module):
    """Stands in for one affine BatchNorm layer `bn` (which it holds, unchanged) while ANP optimises: its output
    is x̂ · γ · (m + δ) + β · (1 + ξ) with x̂ the normalised input, m the per-neuron mask and (δ, ξ) the per-neuron
    multiplicative perturbations of the BN scale γ and shift β; unperturbed, x̂ · γ · m + β (the mask scales γ
    only, as in the reference). `batch_stats` normalises with the batch's own statistics (what the reference's
    train-mode forward does) without touching `bn`'s running buffers; otherwise with those buffers."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, batch_stats: bool):
        super().__init__()
        self.bn, self.batch_stats, self.perturbed = bn, batch_stats, False
        c = bn.num_features
        self.mask = nn.Parameter(torch.ones(c))
        self.noise = nn.Parameter(torch.zeros(c))
        self.noise_bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        scale = self.mask + self.noise if self.perturbed else self.mask
        shift = bn.bias * (1 + self.noise_bias) if self.perturbed else bn.bias
        batch = self.batch_stats or bn.running_mean is None
        return F.batch_norm(x, None if batch else bn.running_mean, None if batch else bn.running_var,
                            bn.weight * scale, shift, batch, 0.0, bn.eps)


def affine_batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers with a learned scale and shift (the neurons ANP masks), by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.bias is not None}


@contextmanager
def noisy_batchnorms(model: nn.Module, batch_stats: bool = True) -> Iterator[dict[str, NoisyBatchNorm]]:
    """Every affine BatchNorm layer of `model` replaced (in place) by a `NoisyBatchNorm` holding it, for the
    block; the original layers are put back on exit. Yields the wrappers by the BN layers' module names."""
    bns = affine_batchnorms(model)
    if not bns:
        raise CGDError("anp masks BatchNorm neurons: the model has no affine BatchNorm layer")
    mods = dict(model.named_modules())
    wrappers = {name: NoisyBatchNorm(bn, batch_stats) for name, bn in bns.items()}

    def put(name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(mods[parent] if parent else model, leaf, module)

    for name, w in wrappers.items():
        put(name, w)
    try:
        yield wrappers
    finally:
        for name, bn in bns.items():
            put(name, bn)


def set_perturbed(wrappers: dict[str, NoisyBatchNorm], on: bool) -> None:
    for w in wrappers.values():
        w.perturbed = on


# ------------------------------------------------------------------------------------------------ optimisation

def perturb_neurons(model: nn.Module, wrappers: dict[str, NoisyBatchNorm], x: torch.Tensor, y: torch.Tensor,
                    eps: float, steps: int, gen: torch.Generator) -> None:
    """ANP's inner maximisation, in place: the perturbations (δ, ξ) of every neuron drawn uniformly from
    [−eps, eps], then `steps` signed-gradient ascent steps of size eps / steps on CE(f_perturbed(x), y). As in
    the reference code, the steps are not projected back onto [−eps, eps]."""
    noises = [p for w in wrappers.values() for p in (w.noise, w.noise_bias)]
    with torch.no_grad():
        for p in noises:
            p.copy_(torch.rand(p.shape, generator=gen) * (2 * eps) - eps)
    set_perturbed(wrappers, True)
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), noises)
        with torch.no_grad():
            for p, g in zip(noises, grads):
                p.add_(torch.sign(g), alpha=eps / steps)


def mask_step(model: nn.Module, wrappers: dict[str, NoisyBatchNorm], opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor, alpha: float, eps: float) -> tuple[float, float]:
    """ANP's outer minimisation, one step: the masks descend α · CE(f(x), y) + (1 − α) · CE(f_perturbed(x), y)
    (the perturbation as `perturb_neurons` left it; with eps = 0 the second term is dropped, as in the reference)
    and are clipped to [0, 1]. Returns (the loss, the unperturbed batch accuracy)."""
    masks = [w.mask for w in wrappers.values()]
    rob = 0.0
    if eps > 0:
        set_perturbed(wrappers, True)
        rob = F.cross_entropy(model(x), y)
    set_perturbed(wrappers, False)
    out = model(x)
    loss = alpha * F.cross_entropy(out, y) + (1 - alpha) * rob
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=masks)
    opt.step()
    with torch.no_grad():
        for m in masks:
            m.clamp_(0.0, 1.0)
    return float(loss.detach()), float((out.argmax(1) == y).float().mean())


def optimise_masks(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, n_iter: int, batch_size: int,
                   lr: float, momentum: float, eps: float, steps: int, alpha: float, aug: str, batch_stats: bool,
                   gen: torch.Generator, log=lambda s: None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """ANP's mask optimisation on a copy-to-be-discarded `model` (eval mode; its weights are never updated):
    `n_iter` iterations, each on a batch of `batch_size` clean samples drawn with replacement (augmented with
    `aug`): `perturb_neurons` (when eps > 0), then `mask_step` with SGD (lr, momentum) on the masks. Returns
    (the final masks by BN module name, the mean loss and accuracy of each block of 100 iterations)."""
    x_all = torch.from_numpy(np.array(images))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    history: list[dict] = []
    with one_view(model.eval()), noisy_batchnorms(model, batch_stats) as wrappers:
        opt = torch.optim.SGD([w.mask for w in wrappers.values()], lr=lr, momentum=momentum)
        block: list[tuple[float, float]] = []
        for it in range(n_iter):
            idx = torch.randint(len(y_all), (batch_size,), generator=gen)
            x, y = augment(to_input(x_all[idx]), aug, gen), y_all[idx]
            if eps > 0:
                perturb_neurons(model, wrappers, x, y, eps, steps, gen)
            block.append(mask_step(model, wrappers, opt, x, y, alpha, eps))
            if len(block) == 100 or it == n_iter - 1:
                loss, acc = np.mean(block, axis=0)
                history.append({"iter": it + 1, "loss": float(loss), "acc": float(acc)})
                log(f"anp iteration {it + 1}/{n_iter}: loss {loss:.4f}, clean batch accuracy {acc:.3f}")
                block = []
        masks = {name: w.mask.detach().clone() for name, w in wrappers.items()}
    return masks, history


# ------------------------------------------------------------------------------------------------ pruning

def prune_neurons(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Prune (in place) every BN neuron whose mask is ≤ `threshold`: its BN scale γ is zeroed and its shift β
    kept (BackdoorBench's and the original code's pruning, the mask at 0). Returns the pruned neurons (bool) by
    BN module name."""
    bns = affine_batchnorms(model)
    pruned = {name: m <= threshold for name, m in masks.items()}
    with torch.no_grad():
        for name, p in pruned.items():
            bns[name].weight[p] = 0.0
    return pruned


def threshold_grid(pruning_max: float, pruning_step: float) -> list[float]:
    """BackdoorBench's sweep: 0, step, 2·step, … up to `pruning_max` (0 … 0.9 by 0.05)."""
    return [round(k * pruning_step, 10) for k in range(int(np.floor(pruning_max / pruning_step + 1e-9)) + 1)]


def select_threshold(model: nn.Module, masks: dict[str, torch.Tensor], images: np.ndarray, labels: np.ndarray,
                     grid: list[float], acc_ratio: float) -> tuple[float | None, float, list[list[float]]]:
    """The largest threshold of `grid` whose pruned model keeps the clean accuracy on (`images`, `labels`) within
    `acc_ratio` of the unpruned model's (|acc − base| / base < acc_ratio, BackdoorBench's tolerance), or None
    when none does. Returns (threshold, the unpruned accuracy, [[threshold, neurons pruned, accuracy], …])."""
    base = accuracy(model, images, labels)
    chosen, sweep = None, []
    for t in grid:
        trial = copy.deepcopy(model)
        n = int(sum(int(p.sum()) for p in prune_neurons(trial, masks, t).values()))
        acc = accuracy(trial, images, labels)
        sweep.append([t, n, acc])
        if base > 0 and abs(acc - base) / base < acc_ratio:
            chosen = t
    return chosen, base, sweep


# ------------------------------------------------------------------------------------------------ the defense

@DEFENSES.register("anp")
class ANP(CleanDataDefense):
    """ANP (Wu & Wang, NeurIPS 2021; BackdoorBench defense/anp.py, config/defense/anp/cifar10.yaml) on trusted
    clean data (`Context.clean_indices`; in the benchmark a 5 % *oracle* drawn with the known poison mask). Every
    affine BatchNorm neuron gets a mask m ∈ [0, 1] (start 1) and multiplicative perturbations of its BN scale and
    shift. Each of `n_iter` iterations draws a batch of 256 clean samples with replacement, sets the perturbations
    uniformly in [−ε, ε] and takes `steps` (1) signed-gradient steps of size ε / steps raising the clean CE
    (ε = 0.4), then takes one SGD step (lr 0.01, momentum 0.9: BackdoorBench's) of the masks on
    α · CE(unperturbed) + (1 − α) · CE(perturbed), α = 0.2, and clips them to [0, 1]. Then the neurons whose mask
    is ≤ a threshold are pruned: their BN scale is zeroed, their shift kept (the reference's pruning). The
    victim's weights and BN statistics are never changed.

    Threshold: BackdoorBench sweeps 0, 0.05, …, 0.9 and keeps the lowest *test-set* ASR among the thresholds whose
    *test* accuracy is within 10 % (relative) of the unpruned model's. With only clean data here, `threshold=None`
    (the default) holds out `holdout` (10 %) of the clean data (not used for the masks) and takes the largest
    threshold of the same sweep whose held-out accuracy is within the same tolerance (`acc_ratio` 0.1): pruning
    more never raises the ASR in expectation, so this stands in for the lowest ASR; none within it, nothing is
    pruned. A number (e.g. 0.2, the ANP paper's fixed threshold) prunes at that threshold, using all the clean
    data for the masks.

    Budget: BackdoorBench runs 2,000 iterations. One iteration costs 2.6–2.9 training steps of the same batch
    (measured here: fastnet at 32 px, batch 256, one thread; a forward and backward for the perturbation, two
    forwards and a backward for the masks, no weight gradients), so 2,000 ≈ 5,500 steps ≈ 28 fastnet epochs on
    CIFAR-10 ≈ 2.3× the 12-epoch victim. `n_iter` defaults to **1,000** (≈ 14 epochs ≈ 1.2× the victim), whatever
    the amount of clean data; the threshold sweep adds 19 inference passes over the held-out slice. The masks
    thus take half BackdoorBench's SGD steps at its lr; the original code's lr 0.2 (batch 128, the paper's)
    moves them 20× faster per step (`lr=0.2`).

    Deviations: BackdoorBench runs the mask optimisation in train mode, so its noisy BN layers normalise with the
    batch's statistics (its running buffers drift, but the pruned model is rebuilt from the victim's weights);
    `bn_stats="batch"` (the default) does the same without touching any buffer, `"running"` normalises with the
    victim's frozen statistics instead. The perturbation after its step is not projected back onto [−ε, ε] (as
    in both reference codes; the paper states the bound). Clean batches are augmented with the victim recipe's
    flips (`augment`; BackdoorBench: random crop + flip). fastnet's flip test-time augmentation is off while the
    masks are optimised (one view per image) and on for the held-out accuracies (the model as it will be used).
    BackdoorBench's "prune by number" mode and its per-500-iteration test-set evaluations are not implemented
    (`Context.extra_eval`, when given, is called once on the pruned model and only logged)."""

    name = "anp"
    min_clean = 2

    def __init__(self, n_iter: int = 1000, batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
                 eps: float = 0.4, steps: int = 1, alpha: float = 0.2, threshold: float | None = None,
                 pruning_max: float = 0.9, pruning_step: float = 0.05, acc_ratio: float = 0.1,
                 holdout: float = 0.1, bn_stats: str = "batch", augment: str = "flip"):
        check_types(self.name, ints=dict(n_iter=n_iter, batch_size=batch_size, steps=steps),
                    reals=dict(lr=lr, momentum=momentum, eps=eps, alpha=alpha, threshold=threshold,
                               pruning_max=pruning_max, pruning_step=pruning_step, acc_ratio=acc_ratio,
                               holdout=holdout), texts=dict(bn_stats=bn_stats, augment=augment))
        problems = [what for ok, what in [
            (n_iter >= 0, "n_iter >= 0"), (batch_size >= 1, "batch_size >= 1"), (steps >= 1, "steps >= 1"),
            (lr > 0, "lr > 0"), (0 <= momentum < 1, "0 <= momentum < 1"), (0 <= eps <= 1, "0 <= eps <= 1"),
            (0 <= alpha <= 1, "0 <= alpha <= 1"),
            (threshold is None or 0 <= threshold <= 1, "threshold in [0, 1] (or None: chosen on held-out data)"),
            (0 <= pruning_max <= 1, "0 <= pruning_max <= 1"), (0 < pruning_step <= 1, "0 < pruning_step <= 1"),
            (0 < acc_ratio <= 1, "0 < acc_ratio <= 1"), (0 < holdout < 1, "0 < holdout < 1"),
            (bn_stats in BN_STATS, f"bn_stats {'|'.join(BN_STATS)}"),
            (augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}")] if not ok]
        if problems:
            raise CGDError(f"{self.name}: needs {'; '.join(problems)}")
        self.n_iter, self.batch_size, self.steps = int(n_iter), int(batch_size), int(steps)
        self.lr, self.momentum, self.eps, self.alpha = float(lr), float(momentum), float(eps), float(alpha)
        self.threshold = None if threshold is None else float(threshold)
        self.pruning_max, self.pruning_step = float(pruning_max), float(pruning_step)
        self.acc_ratio, self.holdout, self.bn_stats, self.augment = float(acc_ratio), float(holdout), bn_stats, augment

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        clean, split = self.clean_data(train, victim, context, timings)
        rng = np.random.default_rng(context.seed)
        hold = np.zeros(0, np.int64)
        used = clean
        if self.threshold is None:
            clean = rng.permutation(clean)
            n_hold = max(1, int(round(self.holdout * len(clean))))
            hold, used = np.sort(clean[:n_hold]), np.sort(clean[n_hold:])
        gen = torch.Generator().manual_seed(context.seed)
        model = copy.deepcopy(victim.model).eval()
        with timed(timings, "mask_s"):
            masks, history = optimise_masks(
                model, train.images[used], train.labels[used], n_iter=self.n_iter, batch_size=self.batch_size,
                lr=self.lr, momentum=self.momentum, eps=self.eps, steps=self.steps, alpha=self.alpha,
                aug=self.augment, batch_stats=self.bn_stats == "batch", gen=gen, log=context.log)
        info = {"clean_source": self.clean_source, "clean": int(len(clean)), "used": int(len(used)),
                "held_out": int(len(hold)), "n_iter": self.n_iter, "eps": self.eps, "lr": self.lr,
                "history": history}
        with timed(timings, "prune_s"):
            if self.threshold is None:
                chosen, base, sweep = select_threshold(model, masks, train.images[hold], train.labels[hold],
                                                       threshold_grid(self.pruning_max, self.pruning_step),
                                                       self.acc_ratio)
                info.update({"held_out_acc_unpruned": base, "sweep": sweep,
                             "selection": "held-out slice of the defense's clean data"})
            else:
                chosen = self.threshold
                info["selection"] = "fixed threshold"
            pruned = prune_neurons(model, masks, chosen) if chosen is not None else {}
        n = int(sum(int(p.sum()) for p in pruned.values()))
        total = int(sum(len(m) for m in masks.values()))
        info.update({"threshold": chosen, "pruned": n, "neurons": total,
                     "pruned_neurons": {k: torch.nonzero(p).flatten().tolist() for k, p in pruned.items() if p.any()},
                     "masks": {k: m.tolist() for k, m in masks.items()}})
        if context.extra_eval is not None:
            info["eval"] = context.extra_eval(model)
        context.log(f"{self.name}: threshold {chosen}, pruned {n} of {total} BN neurons")
        return DefenseResult(model.eval(), split, timings, info)


@DEFENSES.register("anp-sc")
class ANPSC(SplitClean, ANP):
    """ANP on CGD's split-clean D_c instead of given clean data (CGD paper §4.3, "-SC"): CGD's scoring stages
    alone (guide, model score, split; no unlearning) make D_c; the split's D_p is reported as the samples flagged.
    Same ANP settings and budget: the mask optimisation draws its `n_iter` batches with replacement, so its cost
    does not grow with D_c (~70 % of the training set); only the held-out slice does (10 % of D_c, ≈ 3,500 CIFAR-10
    images, 19 passes ≈ 1.3 inference epochs with fastnet's two views). Total ≈ ANP's 1.2× the victim plus CGD's
    scoring (≈ 0.15× with a warm guide cache) and the sweep (≈ 0.1×).
    """

    name = "anp-sc"

"""Refining a weak guide with its own features: a linear probe fitted on the samples it trusts.

A zero-shot ImageNet→label mapping is weak (about half of CIFAR-10 right), but its frozen features are good. A
multinomial logistic regression on those features, fitted on the guide-clean subset and evaluated out-of-fold
(no sample is scored by a probe that saw it), gives a much sharper "does this label look right" score. The probe
never sees the suspicious model, so a trigger the model learned does not leak into it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import CGDError


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1e-3,
                     iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) of an L2-regularised softmax regression, by full-batch L-BFGS. The weights are
    optimised as (C, D) through `F.linear`: its weight gradient is grad_outputᵀ·x, about four times faster on CPU
    than the xᵀ·grad_output that `x @ w` backpropagates through."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, w, b), y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().T, b.detach()


def standardise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return (f - f.mean(0)) / (f.std(0) + 1e-6)


def group_folds(labels: np.ndarray, groups: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """One fold per sample, stratified by class: within each class its groups are shuffled and dealt to the folds in
    turn, so every fold's complement holds the class; a class with fewer groups than folds has its samples dealt to
    the folds one by one instead (its frames may then sit on both sides). A group spanning classes is dealt once per
    class."""
    fold_of = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        ids, group_of = np.unique(groups[members], return_inverse=True)
        if len(ids) >= folds:
            deal = np.empty(len(ids), dtype=np.int64)
            deal[rng.permutation(len(ids))] = np.arange(len(ids)) % folds
            fold_of[members] = deal[group_of]
        else:
            fold_of[members[rng.permutation(len(members))]] = np.arange(len(members)) % folds
    return fold_of


def probe_logits(features: np.ndarray, labels: np.ndarray, trusted: np.ndarray, num_classes: int,
                 folds: int = 2, seed: int = 0, l2: float = 1e-3, groups: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probe log-probabilities (N, C) for every sample: trusted samples are scored by the probe fitted on
    the other folds; the others by the average of all fold probes. With `groups` (GTSRB's tracks) a fold takes
    whole groups, so no sample is scored by a probe that saw another frame of its sign; the groups are dealt to the
    folds within each class (`group_folds`), so no probe misses a class."""
    trusted = np.asarray(trusted)
    labels = np.asarray(labels)
    if len(np.unique(labels[trusted])) < num_classes:
        raise CGDError("the trusted subset misses some classes: cannot fit a probe over all labels")
    x = standardise(features)
    xt = torch.from_numpy(x)
    if groups is None:
        fold_of = np.random.default_rng(seed).integers(0, folds, size=len(trusted))
    else:
        fold_of = group_folds(labels[trusted], np.asarray(groups)[trusted], folds, np.random.default_rng(seed))
    out = np.zeros((len(x), num_classes), dtype=np.float64)
    untrusted = np.ones(len(x), bool)
    untrusted[trusted] = False
    for k in range(folds):
        fit = trusted[fold_of != k]
        w, b = fit_linear_probe(x[fit], labels[fit], num_classes, l2=l2)
        with torch.no_grad():
            logp = F.log_softmax(xt @ w + b, dim=1).numpy()
        held = trusted[fold_of == k]
        out[held] = logp[held]
        out[untrusted] += logp[untrusted] / folds
    return out.astype(np.float32)

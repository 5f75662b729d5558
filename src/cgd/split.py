"""CGD's meta data split (paper §4.1) and its detection metrics, as pure NumPy functions.

Two per-sample scores, both negative log-likelihoods of the sample's given label:
* guide NLL — high when a clean guide disagrees with the label (poison-label attacks);
* model NLL — unusually low when the suspicious model learned the sample through a shortcut (clean-label attacks).
Both are turned into percentile ranks in (0, 1]; then, with σ1 = 0.2 and σ2 = 0.1,
    D_c = {rank_guide ≤ 1−σ1 and rank_model ≥ σ1},   D_p = {rank_guide > 1−σ2 or rank_model < σ2},
and the rest is "mixed".

On top of the paper, `purify` shrinks D_c to the samples most trusted by three signals at once — the guide agrees, the
model did not learn them suspiciously fast, and few of their nearest neighbours in the suspicious model's own feature
space lie in D_p (a trigger makes poisoned samples cluster there, so poison that slipped into D_c sits among D_p).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import CGDError


@dataclass(frozen=True)
class Split:
    clean: np.ndarray  # indices of D_c
    poison: np.ndarray  # indices of D_p
    mixed: np.ndarray
    guide_nll: np.ndarray
    model_nll: np.ndarray
    guide_rank: np.ndarray
    model_rank: np.ndarray

    def subset_names(self) -> np.ndarray:
        names = np.full(len(self.guide_nll), "mixed", dtype=object)
        names[self.clean] = "clean"
        names[self.poison] = "poison"
        return names

    def sizes(self) -> dict[str, int]:
        return {"clean": len(self.clean), "poison": len(self.poison), "mixed": len(self.mixed)}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """−log softmax(logits)[label] per row. Rejects NaN/inf logits and labels outside the columns."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise CGDError(f"logits must be (N, C) with one row per label; got {logits.shape} for {len(labels)} labels")
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        raise CGDError(f"{bad} rows of logits contain NaN or infinity; the scoring model is broken")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise CGDError(f"labels must lie in 0..{logits.shape[1] - 1}; found {labels.min()}..{labels.max()}")
    return -log_softmax(logits)[np.arange(len(labels)), labels]


def percentile_rank(x: np.ndarray) -> np.ndarray:
    """Rank of each value among all, scaled to (0, 1]; ties share their average rank."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise CGDError("scores contain NaN or infinity")
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    if (counts > 1).any():  # average the ranks of tied values
        sums = np.bincount(inv, weights=ranks)
        ranks = (sums / counts)[inv]
    return ranks / max(len(x), 1)


def split(guide_nll: np.ndarray, model_nll: np.ndarray, sigma1: float = 0.2, sigma2: float = 0.1) -> Split:
    """The paper's split from two per-sample NLL scores (see module docstring)."""
    guide_nll, model_nll = np.asarray(guide_nll), np.asarray(model_nll)
    if guide_nll.shape != model_nll.shape or guide_nll.ndim != 1:
        raise CGDError(f"guide and model scores must be 1-D of equal length; got {guide_nll.shape} "
                       f"and {model_nll.shape}")
    if not (0 < sigma2 <= sigma1 < 0.5):
        raise CGDError(f"need 0 < sigma2 ≤ sigma1 < 0.5; got sigma1={sigma1}, sigma2={sigma2}")
    rg, rm = percentile_rank(guide_nll), percentile_rank(model_nll)
    clean = (rg <= 1 - sigma1) & (rm >= sigma1)
    poison = (rg > 1 - sigma2) | (rm < sigma2)
    mixed = ~clean & ~poison
    return Split(np.flatnonzero(clean), np.flatnonzero(poison), np.flatnonzero(mixed), guide_nll, model_nll, rg, rm)


def history_window(loss_history: np.ndarray, guide_nll: np.ndarray, sigma2: float = 0.1, width: int = 3,
                   first: int = 2, rule: str = "level") -> tuple[int, int]:
    """The epochs (1-based, inclusive) whose mean training loss makes the model score: the `width` epochs from the
    one, at or after `first`, where most guide-suspicious samples (guide rank > 1 − σ2) are among the lowest-loss
    σ2 of all samples — the epoch a shortcut has been learned but the clean data not yet fitted. Epoch 1 is skipped:
    inside the warm-up, loss ranks follow image statistics more than anything learned.

    When in no epoch the suspicious samples are among the fastest-learned more often than a random sample (share
    ≤ σ2), the guide does not see the poison (a clean-label attack on real images of the target class), and its
    epoch would be arbitrary — usually the last, where everything is fitted. The window then starts at `first`:
    a trigger is a shortcut, learned before the clean data.

    `rule="gain"` (an option, not the default; docs/benchmarks.md, Fashion-MNIST demo) looks at the *change* instead
    of the level: per epoch e ≥ `first`, the share of guide-suspicious samples among the σ2 whose loss rank improved
    most from epoch e − 1 to e (the samples learned in that epoch). Where easy clean samples fill the lowest-loss σ2
    in every epoch (Fashion-MNIST's trousers and bags), the level share stays at chance while the gain share peaks
    in the epoch the trigger is learned. The peak must clear chance by three binomial standard deviations, else the
    window starts at `first`."""
    h = np.asarray(loss_history)
    if h.ndim != 2 or h.shape[1] != len(guide_nll) or len(h) == 0:
        raise CGDError(f"loss history must be (epochs, N) with N = {len(guide_nll)}; got shape {h.shape}")
    if rule not in ("level", "gain"):
        raise CGDError(f"unknown history window rule {rule!r}: use 'level' or 'gain'")
    suspicious = percentile_rank(np.asarray(guide_nll)) > 1 - sigma2
    first = min(first, len(h))
    if rule == "level":
        share = [(percentile_rank(h[e])[suspicious] < sigma2).mean() if suspicious.any() else 0.0
                 for e in range(first - 1, len(h))]
        start = first + int(np.argmax(share)) if max(share) > sigma2 else first
        return start, min(start + width - 1, len(h))
    share, prev = [], percentile_rank(h[max(first - 2, 0)])
    for e in range(first - 1, len(h)):
        now = percentile_rank(h[e])
        gained = percentile_rank(prev - now) > 1 - sigma2
        share.append(suspicious[gained].mean() if e > 0 and gained.any() else 0.0)
        prev = now
    n_top = max(int(round(sigma2 * h.shape[1])), 1)
    margin = 3 * np.sqrt(sigma2 * (1 - sigma2) / n_top)
    start = first + int(np.argmax(share)) if max(share) > sigma2 + margin else first
    return start, min(start + width - 1, len(h))


def nearest_neighbours(features: np.ndarray, k: int = 20, chunk: int = 1024) -> np.ndarray:
    """(N, k) indices of each sample's `k` nearest neighbours by cosine similarity of centred `features`, itself
    excluded. Chunked: memory O(chunk · N). It does not depend on the split, so one search serves every round.
    (`torch.topk` selects the k largest about 25 times faster than `np.argpartition` over 50k columns.)"""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2:
        raise CGDError(f"features must be (N, D); got shape {f.shape}")
    if not 0 < k < len(f):
        raise CGDError(f"need 0 < k < N for the neighbour score; got k={k}, N={len(f)}")
    f = f - f.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    ft = torch.from_numpy(f)
    out = np.empty((len(f), k), dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(f), chunk):
            sim = ft[i:i + chunk] @ ft.T
            rows = torch.arange(len(sim))
            sim[rows, i + rows] = -torch.inf
            out[i:i + chunk] = torch.topk(sim, k, dim=1).indices.numpy()
    return out


def neighbour_poison_fraction(neighbours: np.ndarray, labels: np.ndarray, poison: np.ndarray) -> np.ndarray:
    """For each sample, the share of its neighbours (`nearest_neighbours`) that are in D_p (`poison` indices)
    and carry the same label."""
    labels = np.asarray(labels)
    if neighbours.ndim != 2 or len(neighbours) != len(labels):
        raise CGDError(f"neighbours must be (N, k) for N = {len(labels)} labels; got shape {neighbours.shape}")
    in_p = np.zeros(len(labels), bool)
    in_p[poison] = True
    return (in_p[neighbours] & (labels[neighbours] == labels[:, None])).mean(1)


def purify(s: Split, neighbour_fraction: np.ndarray, labels: np.ndarray, keep: float = 0.5) -> Split:
    """Keep, in every class, the `keep` share of D_c with the lowest distrust (rank of the neighbour fraction +
    guide rank + 1 − model rank); the rest of D_c moves to "mixed". D_p is unchanged."""
    if not 0 < keep <= 1:
        raise CGDError(f"purify keep must be in (0, 1]; got {keep}")
    labels = np.asarray(labels)
    distrust = percentile_rank(np.asarray(neighbour_fraction)) + s.guide_rank + (1 - s.model_rank)
    kept = []
    for c in np.unique(labels[s.clean]):
        members = s.clean[labels[s.clean] == c]
        order = members[np.argsort(distrust[members], kind="stable")]
        kept.append(order[:max(1, int(round(keep * len(order))))])
    clean = np.sort(np.concatenate(kept)) if kept else s.clean
    mixed = np.union1d(s.mixed, np.setdiff1d(s.clean, clean))
    return Split(clean, s.poison, mixed, s.guide_nll, s.model_nll, s.guide_rank, s.model_rank)


def oversample_clean(clean_idx: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0,
                     prior: np.ndarray | None = None) -> np.ndarray:
    """Indices of D_c with each class resampled (with replacement) up to its share of `prior` (default: the
    label distribution of the whole training set, the paper's choice), so relearning does not shift the class
    prior. Never drops samples."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if prior is None:
        prior = np.bincount(labels, minlength=num_classes) / len(labels)
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (num_classes,) or not np.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise CGDError(f"the class prior must be {num_classes} non-negative finite numbers; got {prior}")
    prior = prior / prior.sum()
    members = [clean_idx[labels[clean_idx] == c] for c in range(num_classes)]
    missing = [c for c in range(num_classes) if prior[c] > 0 and len(members[c]) == 0]
    if missing:
        raise CGDError(f"the clean subset D_c holds no sample of class(es) {missing}: cannot relearn them. "
                       "Loosen sigma1, or check the labels of those classes")
    out = []
    for c in range(num_classes):
        want = int(round(prior[c] * len(clean_idx)))
        out.append(members[c])
        if want > len(members[c]):
            out.append(rng.choice(members[c], size=want - len(members[c]), replace=True))
    return np.sort(np.concatenate(out))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` (higher ⇒ positive), via the Mann–Whitney statistic."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = percentile_rank(scores) * len(scores)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_metrics(poison_mask: np.ndarray, s: Split) -> dict[str, float]:
    """How well the split isolates the known poison: TPR/FPR/precision of D_p, poison left in D_c, AUROCs."""
    p = np.asarray(poison_mask, dtype=bool)
    in_p = np.zeros(len(p), bool)
    in_p[s.poison] = True
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    poison_in_clean = int(p[s.clean].sum())
    return {
        "tpr": float((in_p & p).sum() / n_pos) if n_pos else float("nan"),
        "fpr": float((in_p & ~p).sum() / n_neg) if n_neg else float("nan"),
        "precision": float((in_p & p).sum() / max(in_p.sum(), 1)),
        "poison_in_clean": poison_in_clean,
        "poison_in_clean_frac": poison_in_clean / max(len(s.clean), 1),
        "auroc_guide": auroc(s.guide_nll, p),
        "auroc_model": auroc(-s.model_nll, p),
        "auroc_combined": auroc(np.maximum(s.guide_rank, 1 - s.model_rank), p),
        **{f"n_{k}": v for k, v in s.sizes().items()},
    }


def spectral_scores(features: np.ndarray, labels: np.ndarray, signed: bool = False,
                    toward: np.ndarray | None = None) -> np.ndarray:
    """Per class, each sample's projection on the top singular vector of that class's centred features (a third
    detection axis, from the suspicious model's own representation; not used by the default split).

    A trigger learned as a shortcut adds one shared direction to the poisoned samples of the target class, which
    then dominates that class's largest singular direction. `signed=False` gives the squared projection (large for
    both ends of that direction: the usual spectral-signature outlier score); `signed=True` gives the projection
    itself, oriented so that the longer tail (positive skew) is positive — the side a minority cluster sits on — or,
    with `toward` (one reference score per sample, e.g. how fast the model learned it), so that within each class
    it correlates non-negatively with `toward`. (Where half a class is poisoned, as in CTRL, the skew cannot tell
    the sides apart; docs/benchmarks.md.) Scores are comparable within a class, not across classes (rank them per
    class). Classes with one sample score 0."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(labels):
        raise CGDError(f"features must be (N, D) with one row per label; got {f.shape} for {len(labels)} labels")
    if not np.isfinite(f).all():
        raise CGDError("features contain NaN or infinity")
    if toward is not None:
        toward = np.asarray(toward, dtype=np.float64)
        if toward.shape != (len(f),) or not np.isfinite(toward).all():
            raise CGDError(f"toward must be {len(f)} finite numbers; got shape {toward.shape}")
        signed = True
    out = np.zeros(len(f), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        x = f[idx] - f[idx].mean(0)
        # the top right singular vector = the top eigenvector of the (D × D) scatter matrix: cheap for D ≪ N
        _, vecs = np.linalg.eigh(x.T @ x)
        p = x @ vecs[:, -1]
        if toward is not None:
            t = toward[idx] - toward[idx].mean()
            out[idx] = p if (p * t).sum() >= 0 else -p
        elif signed:
            out[idx] = p if (p ** 3).mean() >= 0 else -p
        else:
            out[idx] = p ** 2
    return out


def per_class_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`percentile_rank` of `scores` within each class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    out = np.zeros(len(scores))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out[idx] = percentile_rank(scores[idx])
    return out


def bimodality(scores: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class, Sarle's bimodality coefficient (skewness² + 1) / kurtosis of `scores` (e.g. the signed
    `spectral_scores`): 1/3 for a normal distribution, 5/9 for a uniform one, toward 1 for two separated modes. A
    class whose top direction splits it into two clusters (half of CTRL's target class) stands out from classes
    whose top direction is only the spread from easy to hard samples (docs/benchmarks.md, issue 13)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    out = {}
    for c in np.unique(labels):
        x = scores[labels == c]
        sd = x.std()
        if len(x) < 3 or sd == 0:
            out[int(c)] = float("nan")
            continue
        z = (x - x.mean()) / sd
        out[int(c)] = float(((z ** 3).mean() ** 2 + 1) / (z ** 4).mean())
    return out

"""CGD's meta data split (paper §4.1), the cpu recipe's additions and the detection metrics, as array functions
(NumPy; torch only for the neighbour search's top-k). `find_poison` is the public entry, `SplitConfig` its settings.

Two per-sample scores, both negative log-likelihoods of the sample's given label:
* guide NLL — high when a clean guide disagrees with the label (poison-label attacks);
* model NLL — unusually low when the suspicious model learned the sample through a shortcut (clean-label attacks).
Both are turned into percentile ranks in (0, 1]; then, with σ1 = 0.2 and σ2 = 0.1,
    D_c = {rank_guide ≤ 1−σ1 and rank_model ≥ σ1},   D_p = {rank_guide > 1−σ2 or rank_model < σ2},
and the rest is "mixed".

On top of the paper, `purify` shrinks D_c to the samples most trusted by three signals at once — the guide agrees, the
model did not learn them suspiciously fast, and few of their nearest neighbours in the suspicious model's own feature
space lie in D_p (a trigger makes poisoned samples cluster there, so poison that slipped into D_c sits among D_p);
the guide is sharpened by a linear probe on its own features (`refine.probe_logits`); and the model score is the mean
recorded training loss over the early epochs `history_window` picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from . import CGDError
from .schema import Int, Real


WINDOW_RULES = ("level", "gain", "both")  # how `history_window` picks the model score's epochs
WINDOW_WIDTH = 3  # epochs the model score averages


@dataclass(frozen=True)
class SplitConfig:
    """How CGD scores and splits a training set. The defaults are the cpu recipe (docs/benchmarks.md);
    `SplitConfig.paper()` is the paper's §4.1 split."""

    sigma1: float = 0.2  # D_c: guide rank ≤ 1 − σ1 and model rank ≥ σ1
    sigma2: float = 0.1  # D_p: guide rank > 1 − σ2 or model rank < σ2
    model_score: str = "history"  # "history": mean recorded training loss over `window`; "snapshot": NLL under
    # the epoch-T snapshot (the paper); "final": NLL under the final model
    window: tuple[int, int] | None = None  # epochs A..B (1-based, inclusive) of the loss history; None: chosen by
    # `history_window`, by its `window_rule` ("level"; "gain" and "both" are options under study, docs/benchmarks.md)
    window_rule: str = "level"
    refine_rounds: int = 2  # times the guide is sharpened by a linear probe on its own features (0: zero-shot)
    purify: float = 0.7  # share of each class's D_c kept by the neighbour purification (0: off)
    neighbours: int = 20  # neighbours in the suspicious model's feature space, for the purification
    min_clean_per_class: int = 5  # `fill_clean_classes`: every class keeps at least this many samples in D_c
    recheck: float = 0.0  # after one unlearning pass, samples outside D_p whose given label's NLL rose by more than
    # this move into D_p and unlearning starts again from the victim (`recheck`; 0: off; under study, issue 13)
    dp_drop_slow: float = 0.0  # D_p members only the guide put there and that the model learned slowly for their
    # class (per-class model rank > this) move to mixed (`drop_slow`; 0: off; under study, issue 13)
    dp_spare_target: bool = False  # with dp_drop_slow: the suspected target's members stay in D_p (under study)

    RANGES = {"sigma1": Real(0, 0.5, closed=True), "sigma2": Real(0, 0.5, closed=True),
              "purify": Real(0, 1, closed=True), "neighbours": Int(1, 1000), "refine_rounds": Int(0, 10),
              "min_clean_per_class": Int(0, 1000), "recheck": Real(0, 100, closed=True),
              "dp_drop_slow": Real(0, 1, closed=True)}

    def __post_init__(self):
        for name, rule in self.RANGES.items():
            rule.check(getattr(self, name), f"split.{name}")
        if not 0 < self.sigma2 <= self.sigma1 < 0.5:
            raise CGDError(f"need 0 < split.sigma2 ≤ split.sigma1 < 0.5; got sigma1={self.sigma1}, "
                           f"sigma2={self.sigma2}")
        if self.window_rule not in WINDOW_RULES:
            raise CGDError(f"unknown split.window_rule {self.window_rule!r}: use {', '.join(WINDOW_RULES)}")
        if self.model_score not in ("history", "snapshot", "final"):
            raise CGDError(f"unknown split.model_score {self.model_score!r}: use snapshot, final, history:auto or "
                           "history:A-B")
        w = self.window
        if w is not None and not (isinstance(w, tuple) and len(w) == 2 and all(type(e) is int for e in w)
                                  and 1 <= w[0] <= w[1]):
            raise CGDError(f"split.model_score history:A-B needs epochs 1 ≤ A ≤ B; got {w!r}")

    @classmethod
    def paper(cls, **changes) -> "SplitConfig":
        return cls(model_score="snapshot", refine_rounds=0, purify=0.0, **changes)

    @property
    def score_spec(self) -> str:
        """The model score as written in config files and results: "history:2-4", "history:auto", "snapshot"."""
        if self.model_score != "history":
            return self.model_score
        return "history:" + ("auto" if self.window is None else f"{self.window[0]}-{self.window[1]}")

    @classmethod
    def from_dict(cls, d: dict) -> "SplitConfig":
        """From a config file's `[split]` table, where the model score is one string (see `score_spec`)."""
        known = {f.name for f in fields(cls)} - {"window"}
        unknown = set(d) - known
        if unknown:
            raise CGDError(f"unknown split setting(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        spec = d.pop("model_score", "history:auto")
        window = None
        if isinstance(spec, str) and spec.startswith("history:"):
            a, _, b = spec.removeprefix("history:").partition("-")
            if spec != "history:auto" and not (a.isdigit() and b.isdigit()):
                raise CGDError(f"unknown split.model_score {spec!r}: use snapshot, final, history:auto or "
                               "history:A-B")
            window = None if spec == "history:auto" else (int(a), int(b))
            spec = "history"
        elif spec == "history":
            raise CGDError("split.model_score 'history' needs its window: history:auto or history:A-B")
        return cls(model_score=spec, window=window, **d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "window"}
        d["model_score"] = self.score_spec
        return d


@dataclass(frozen=True)
class Split:
    clean: np.ndarray  # indices of D_c
    poison: np.ndarray  # indices of D_p
    mixed: np.ndarray
    guide_nll: np.ndarray
    model_nll: np.ndarray
    guide_rank: np.ndarray
    model_rank: np.ndarray
    guide_logits: np.ndarray | None = None  # (find_poison) the guide's logits the split ended with (probe-refined)
    info: dict = field(default_factory=dict)  # (find_poison) what was run: model score, rounds, skipped steps

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


def window_shares(loss_history: np.ndarray, guide_nll: np.ndarray, sigma2: float = 0.1,
                  first: int = 2) -> dict:
    """The statistics `history_window` picks its epoch by, for epochs `first`.. (1-based) of an (epochs, N) loss
    history: "level", the share of guide-suspicious samples (guide rank > 1 − σ2) among the lowest-loss σ2 of
    all samples in that epoch; "gain", their share among the σ2 whose loss rank improved most since the epoch
    before (the samples learned in that epoch); "chance" (σ2) and "margin", three binomial standard deviations
    of a share over the σ2·N samples it counts, the height a peak must clear to be told from noise."""
    h = np.asarray(loss_history)
    if h.ndim != 2 or h.shape[1] != len(guide_nll) or len(h) == 0:
        raise CGDError(f"loss history must be (epochs, N) with N = {len(guide_nll)}; got shape {h.shape}")
    suspicious = percentile_rank(np.asarray(guide_nll)) > 1 - sigma2
    first = min(first, len(h))
    level, gain, prev = [], [], percentile_rank(h[max(first - 2, 0)])
    for e in range(first - 1, len(h)):
        now = percentile_rank(h[e])
        level.append(float((now[suspicious] < sigma2).mean()) if suspicious.any() else 0.0)
        gained = percentile_rank(prev - now) > 1 - sigma2
        gain.append(float(suspicious[gained].mean()) if e > 0 and gained.any() else 0.0)
        prev = now
    n_top = max(int(round(sigma2 * h.shape[1])), 1)
    return {"first": first, "level": level, "gain": gain, "chance": sigma2,
            "margin": float(3 * np.sqrt(sigma2 * (1 - sigma2) / n_top))}


def history_window(loss_history: np.ndarray, guide_nll: np.ndarray, sigma2: float = 0.1, width: int = WINDOW_WIDTH,
                   first: int = 2, rule: str = "level") -> tuple[int, int]:
    """The epochs (1-based, inclusive) whose mean training loss makes the model score: the `width` epochs from the
    one, at or after `first`, where most guide-suspicious samples (guide rank > 1 − σ2) are among the lowest-loss
    σ2 of all samples — the epoch a shortcut has been learned but the clean data not yet fitted (`window_shares`
    computes the statistics). Epoch 1 is skipped: inside the warm-up, loss ranks follow image statistics more than
    anything learned.

    When in no epoch the suspicious samples are among the fastest-learned more often than a random sample (share
    ≤ σ2), the guide does not see the poison (a clean-label attack on real images of the target class), and its
    epoch would be arbitrary — usually the last, where everything is fitted. The window then starts at `first`:
    a trigger is a shortcut, learned before the clean data.

    `rule="gain"` looks at the *change* instead of the level: the epoch where the most guide-suspicious samples are
    among those learned in it. Where easy clean samples fill the lowest-loss σ2 in every epoch (Fashion-MNIST's
    trousers and bags), the level share stays at chance while the gain share peaks in the epoch the trigger is
    learned. Its peak must clear chance by the margin (three binomial standard deviations), else the window starts
    at `first`. `rule="both"` takes the level rule's epoch when its peak clears chance by that margin too, else
    the gain rule's (docs/benchmarks.md, issue 13: options under study; "level" is the default)."""
    return pick_window(window_shares(loss_history, guide_nll, sigma2, first), rule, width,
                       len(loss_history))


def pick_window(shares: dict, rule: str, width: int, epochs: int) -> tuple[int, int]:
    """`history_window`'s choice from its `window_shares`."""
    if rule not in WINDOW_RULES:
        raise CGDError(f"unknown history window rule {rule!r}: use {', '.join(map(repr, WINDOW_RULES))}")
    level, gain = np.array(shares["level"]), np.array(shares["gain"])
    bar = shares["chance"] + shares["margin"]
    if rule == "level" or (rule == "both" and level.max() > bar):
        peak = level.argmax() if level.max() > (shares["chance"] if rule == "level" else bar) else None
    else:
        peak = gain.argmax() if gain.max() > bar else None
    start = shares["first"] + (int(peak) if peak is not None else 0)
    return start, min(start + width - 1, epochs)


def nearest_neighbours(features: np.ndarray, k: int = 20, chunk: int = 1024,
                       groups: np.ndarray | None = None) -> np.ndarray:
    """(N, k) indices of each sample's `k` nearest neighbours by cosine similarity of centred `features`, itself
    excluded, and with `groups` (one id per sample, GTSRB's tracks) its whole group: the other frames of one sign
    are near-copies that would crowd out every other neighbour. Chunked: memory O(chunk · N). It does not depend
    on the split, so one search serves every round. (`torch.topk` selects the k largest about 25 times faster
    than `np.argpartition` over 50k columns.)"""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2:
        raise CGDError(f"features must be (N, D); got shape {f.shape}")
    largest = 1 if groups is None else int(np.unique(groups, return_counts=True)[1].max(initial=1))
    if not 0 < k <= len(f) - largest:
        raise CGDError(f"need 0 < k < N for the neighbour score; got k={k}, N={len(f)}"
                       + ("" if groups is None else f" of which up to {largest} are one group"))
    f = f - f.mean(0)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    ft = torch.from_numpy(f)
    g = None if groups is None else torch.from_numpy(np.asarray(groups, dtype=np.int64))
    out = np.empty((len(f), k), dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(f), chunk):
            sim = ft[i:i + chunk] @ ft.T
            rows = torch.arange(len(sim))
            sim[rows, i + rows] = -torch.inf
            if g is not None:
                sim[g[i:i + chunk, None] == g[None, :]] = -torch.inf
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


def fill_clean_classes(s: Split, labels: np.ndarray, num_classes: int, minimum: int = 5) -> Split:
    """Give every class at least `minimum` samples in D_c (or all it has outside D_p, if fewer), moving in its
    most trusted mixed samples (lowest guide rank + 1 − model rank). A class missing from D_c can be neither
    relearned nor probed; on a large dataset every class holds hundreds there and nothing moves, while on a small
    one (a few dozen images per class, a weak guide) a class can drop out. D_p is unchanged."""
    labels = np.asarray(labels)
    have = np.bincount(labels[s.clean], minlength=num_classes)
    short = np.flatnonzero(have < minimum)
    if len(short) == 0:
        return s
    trust = s.guide_rank + (1 - s.model_rank)
    moved = []
    for c in short:
        pool = s.mixed[labels[s.mixed] == c]
        moved.append(pool[np.argsort(trust[pool], kind="stable")][:minimum - have[c]])
    moved = np.concatenate(moved)
    empty = [int(c) for c in short if have[c] == 0 and not (labels[moved] == c).any()]
    if empty:
        raise CGDError(f"class(es) {empty} have no training sample outside the suspected-poison subset D_p, so "
                       "none can be trusted and relearned. Check their labels, or lower split.sigma2 (now "
                       "fewer samples go to D_p)")
    return replace(s, clean=np.union1d(s.clean, moved), mixed=np.setdiff1d(s.mixed, moved))


def recheck(s: Split, shift: np.ndarray, threshold: float, labels: np.ndarray | None = None,
            minimum: int = 0) -> tuple[Split, np.ndarray]:
    """(the split with the flagged samples moved into D_p, the flagged indices): samples outside D_p whose loss
    shift — the NLL of the given label after a first unlearning pass minus that under the suspicious model — exceeds
    `threshold`. Unlearning D_p's poison carries over to the poison the split missed (its trigger stops earning
    the target label), while relearning D_c keeps clean samples fit; a shift of log 2 means the given label lost
    half its probability. D_c and mixed shrink; with `labels`, every class keeps at least `minimum` samples of D_c
    (its least shifted ones stay). `info` records what moved."""
    shift = np.asarray(shift, dtype=np.float64)
    if shift.shape != s.guide_nll.shape or not np.isfinite(shift).all():
        raise CGDError(f"the loss shift must be {len(s.guide_nll)} finite numbers; got shape {shift.shape}")
    outside = np.setdiff1d(np.arange(len(shift)), s.poison)
    flagged = outside[shift[outside] > threshold]
    if labels is not None and minimum:
        labels = np.asarray(labels)
        from_clean = np.intersect1d(flagged, s.clean)
        keep = []
        for c in np.unique(labels[from_clean]):  # one step per class
            fc = from_clean[labels[from_clean] == c]
            short = minimum - (int((labels[s.clean] == c).sum()) - len(fc))
            if short > 0:
                keep.append(fc[np.argsort(shift[fc], kind="stable")][:short])
        if keep:
            flagged = np.setdiff1d(flagged, np.concatenate(keep))
    info = {**s.info, "recheck": {"threshold": threshold, "moved": int(len(flagged)),
                                  "from_clean": int(np.isin(flagged, s.clean).sum())}}
    return replace(into_poison(s, flagged), info=info), flagged


def flagged_split(model_score: np.ndarray, poison: np.ndarray, what: str) -> Split:
    """The split of a defense that flags samples without a guide (ABL, ASD, DBD, MSPC): D_p = `poison`, D_c = the
    rest, no mixed part. The guide columns are 0; the model columns are `model_score` (low: poison-like, as CGD's
    model NLL) and its rank; `what` names the score in `info`."""
    n = len(model_score)
    poison = np.sort(np.asarray(poison, dtype=np.int64))
    zeros, score = np.zeros(n), np.asarray(model_score, dtype=np.float64)
    return Split(np.setdiff1d(np.arange(n), poison), poison, np.zeros(0, np.int64), zeros, score, zeros,
                 percentile_rank(score), info={"model_score": what})


def dp_shares(labels: np.ndarray, poison: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) each class's share of its training samples that lie in D_p (`poison`)."""
    labels = np.asarray(labels)
    count = np.bincount(labels, minlength=num_classes)
    return np.bincount(labels[poison], minlength=num_classes) / np.maximum(count, 1)


def suspected_target(labels: np.ndarray, poison: np.ndarray, num_classes: int) -> int:
    """The class D_p is richest in (`dp_shares`). Every attack here gives its poison the target's label, so this
    is the split's guess at the target."""
    return int(np.argmax(dp_shares(labels, poison, num_classes)))


def drop_slow(s: Split, labels: np.ndarray, above: float, sigma2: float, spare: int | None = None) -> Split:
    """The split with the guide's likely false alarms taken out of D_p into mixed: members of D_p that the model
    score did not flag (model rank ≥ `sigma2`: only the guide put them there) and that the model learned slowly for
    their class (per-class model rank > `above`). Those are clean images of a class the guide confuses with
    another; unlearning would push them off their true labels. Poison the guide finds is learned fast, so it stays —
    except poison that fights its label (a relabelled image, a composite of two other classes), which is slow too:
    members labelled `spare` (the suspected target, `suspected_target`) stay in D_p. D_c is unchanged; `info`
    records how many moved."""
    labels = np.asarray(labels)
    slow = per_class_rank(s.model_nll, labels) > above
    if spare is not None:
        slow &= labels != spare
    drop = np.intersect1d(s.poison, np.flatnonzero((s.model_rank >= sigma2) & slow))
    return replace(s, poison=np.setdiff1d(s.poison, drop), mixed=np.union1d(s.mixed, drop),
                   info={**s.info, "dp_drop_slow": {"above": above, "spare": spare, "moved": int(len(drop))}})


def into_poison(s: Split, indices: np.ndarray) -> Split:
    """The split with `indices` moved into D_p (out of D_c and mixed); scores, guide logits and info kept."""
    return replace(s, clean=np.setdiff1d(s.clean, indices), poison=np.union1d(s.poison, indices),
                   mixed=np.setdiff1d(s.mixed, indices))


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
    """How well the split isolates the known poison: TPR/FPR/precision of D_p, poison left in D_c, AUROCs (the
    guide's only where the split has guide scores: a split made without a guide, ABL's, holds a constant)."""
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
        **({"auroc_guide": auroc(s.guide_nll, p)} if np.ptp(s.guide_nll) > 0 else {}),
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


def jenks_two_classes(values: np.ndarray) -> float:
    """The two-class Jenks natural break of 1-D `values`, exact: the largest value of the lower class (jenkspy's
    `jenks_breaks(values, 2)[1]`), chosen among all thresholds between distinct values by the smallest within-class
    sum of squares (for two classes this is also Otsu's threshold: the largest between-class variance). Every
    optimal two-class partition of a line can be taken with equal values in one class, so thresholds between
    distinct values are all it needs to try; O(N log N) by prefix sums over the sorted values. The upper class is
    `values > break`; with fewer than two distinct values there is no split and the break is +inf."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if not np.isfinite(v).all():
        raise CGDError("the scores to split in two contain NaN or infinity")
    n = len(v)
    cut = np.flatnonzero(v[1:] > v[:-1]) + 1  # lower class = v[:k] for each k in `cut`
    if len(cut) == 0:
        return math.inf
    c = v - v.mean()  # centred: the prefix sums of squares stay well conditioned
    s1, s2 = np.cumsum(c), np.cumsum(c * c)
    k = cut.astype(np.float64)
    lo1, lo2 = s1[cut - 1], s2[cut - 1]
    hi1, hi2 = s1[-1] - lo1, s2[-1] - lo2
    ss = (lo2 - lo1 ** 2 / k) + (hi2 - hi1 ** 2 / (n - k))
    return float(v[cut[int(np.argmin(ss))] - 1])


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


# ------------------------------------------------------------------------------------------- the public entry

def find_poison(labels, guide_logits, model_losses, *, guide_features=None, model_features=None,
                recipe: str = "cpu", sigma1: float = 0.2, sigma2: float = 0.1, window="auto",
                refine_rounds: int | None = None, purify: float | None = None, neighbours: int = 20,
                min_clean_per_class: int = 5, groups=None, seed: int = 0) -> Split:
    """Split a training set into clean (D_c), poisoned (D_p) and mixed samples from arrays alone — the split
    `cgd defend` runs, with no disk and no model.

    Parameters
    ----------
    labels : array of int, shape (N,)
        The given (possibly poisoned) label of every training sample, in 0..C-1.
    guide_logits : array of float, shape (N, C)
        A clean guide's zero-shot logits (or log-probabilities) for every sample.
    model_losses : array of float, shape (epochs, N) or (N,)
        The suspicious model's per-sample training loss recorded every epoch (see `cgd.LossRecorder`), or one
        NLL per sample (e.g. under the epoch-T snapshot). With a history, the model score is its mean over
        `window`; with one NLL, that NLL is the score and `window` is unused.
    guide_features : array of float, shape (N, D), optional
        The guide's image features, for the probe refinement. Without them the zero-shot guide is used.
    model_features : array of float, shape (N, D'), optional
        The suspicious model's penultimate features, for the neighbour purification of D_c. Without them D_c is
        not purified.
    recipe : {"cpu", "paper"}, default "cpu"
        "cpu": probe refinement, neighbour purification, loss-window model score (docs/benchmarks.md);
        "paper": the paper's two-score split (§4.1), nothing else.
    sigma1, sigma2 : float, default 0.2 and 0.1
        The split's percentile thresholds: D_c = {guide rank ≤ 1 − sigma1 and model rank ≥ sigma1},
        D_p = {guide rank > 1 − sigma2 or model rank < sigma2}; need 0 < sigma2 ≤ sigma1 < 0.5.
    window : "auto" or (int, int), default "auto"
        Epochs A..B (1-based, inclusive) of the loss history to average; "auto" chooses them with
        `history_window` from where the guide-suspicious samples are learned fastest.
    refine_rounds : int, optional
        Probe refinements of the guide (default: 2 for "cpu", 0 for "paper").
    purify : float, optional
        Share of each class's D_c kept by the neighbour purification, 0 for off (default: 0.7 for "cpu",
        0 for "paper").
    neighbours : int, default 20
        Nearest neighbours searched in `model_features` for the purification.
    min_clean_per_class : int, default 5
        Every class keeps at least this many samples in D_c (`fill_clean_classes`).
    groups : array of int, shape (N,), optional
        Samples sharing an id are views of one physical object (GTSRB's tracks): the probe's folds take whole
        groups and a sample's neighbours exclude its own group.
    seed : int, default 0
        Seeds the probe's folds.

    Returns
    -------
    Split
        Index arrays `clean`, `poison`, `mixed`; per-sample `guide_nll`, `model_nll` and their ranks;
        `guide_logits`, the (refined) guide logits the split ended with (unlearning distils them); and `info`,
        which says what ran: the model score used, the probe rounds, and each recipe step skipped for want of
        an input.
    """
    if recipe not in ("cpu", "paper"):
        raise CGDError(f"unknown recipe {recipe!r}: use 'cpu' or 'paper'")
    base = SplitConfig() if recipe == "cpu" else SplitConfig.paper()
    config = replace(base, sigma1=sigma1, sigma2=sigma2, neighbours=neighbours,
                     min_clean_per_class=min_clean_per_class,
                     window=None if isinstance(window, str) and window == "auto" else tuple(window),
                     **{k: v for k, v in (("refine_rounds", refine_rounds), ("purify", purify)) if v is not None})
    return split_by(config, labels, guide_logits, model_losses, guide_features=guide_features,
                    model_features=model_features, groups=groups, seed=seed)


def split_by(config: SplitConfig, labels, guide_logits, model_losses, *, guide_features=None,
             model_features=None, groups=None, seed: int = 0) -> Split:
    """`find_poison` with its options as a `SplitConfig` (what the pipeline calls). Steps whose input is missing
    are skipped and listed in `info["skipped"]`."""
    from .refine import probe_logits

    labels = np.asarray(labels)
    g = np.asarray(guide_logits, dtype=np.float32)
    if g.ndim != 2 or len(g) != len(labels):
        raise CGDError(f"guide_logits must be (N, C) with N = {len(labels)} labels; got shape {g.shape}")
    num_classes = g.shape[1]
    losses = np.asarray(model_losses)
    if not np.issubdtype(losses.dtype, np.number):
        raise CGDError(f"model_losses must be numbers; got dtype {losses.dtype}")
    info: dict = {"skipped": []}
    if losses.ndim == 2:
        if config.window is None:
            w = window_shares(losses, nll(g, labels), config.sigma2)
            info["window_shares"] = {k: np.round(v, 4).tolist() for k, v in w.items()}
            a, b = pick_window(w, config.window_rule, WINDOW_WIDTH, len(losses))
        else:
            a, b = config.window
        if not 1 <= a <= b <= len(losses):
            raise CGDError(f"model score window {a}-{b}: epochs must lie in 1..{len(losses)}")
        model_nll = losses[a - 1:b].mean(axis=0).astype(np.float64)  # (a float32 history averages in float32)
        info["model_score"] = f"history:{a}-{b}"
    elif losses.ndim == 1 and len(losses) == len(labels):
        model_nll = losses.astype(np.float64)
        info["model_score"] = "given NLL"
    else:
        raise CGDError(f"model_losses must be (epochs, N) or (N,) with N = {len(labels)}; got shape {losses.shape}")
    rounds, keep = config.refine_rounds, config.purify
    if rounds and guide_features is None:
        info["skipped"].append(f"probe refinement ({rounds} rounds): no guide_features")
        rounds = 0
    if keep and model_features is None:
        info["skipped"].append("neighbour purification: no model_features")
        keep = 0
    if groups is not None and np.shape(groups) != labels.shape:
        raise CGDError(f"groups must hold one id per sample ({len(labels)}); got shape {np.shape(groups)}")
    near = nearest_neighbours(model_features, config.neighbours, groups=groups) if keep else None

    def one_split(logits):
        s = split(nll(logits, labels), model_nll, config.sigma1, config.sigma2)
        if keep:
            s = purify(s, neighbour_poison_fraction(near, labels, s.poison), labels, keep)
        return fill_clean_classes(s, labels, num_classes, config.min_clean_per_class)

    s = one_split(g)
    for _ in range(rounds):
        g = probe_logits(guide_features, labels, s.clean, num_classes, seed=seed, groups=groups)
        s = one_split(g)
    info.update(refine_rounds=rounds, purify=keep)
    s = replace(s, guide_logits=g, info=info)
    if not config.dp_drop_slow:
        return s
    spare = suspected_target(labels, s.poison, num_classes) if config.dp_spare_target else None
    return drop_slow(s, labels, config.dp_drop_slow, config.sigma2, spare)

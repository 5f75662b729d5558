"""How good is a guide? Zero-shot accuracy and flip-AUROC (pure NumPy), and an end-to-end `measure`."""

from __future__ import annotations

import time

import numpy as np

from ..split import auroc as _auroc, log_softmax


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(tie) (Mann-Whitney U)."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    return _auroc(np.concatenate([neg, pos]), np.r_[np.zeros(len(neg), bool), np.ones(len(pos), bool)])


def zero_shot_top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def flip_auroc(logits: np.ndarray, labels: np.ndarray, targets=None) -> dict:
    """How well the NLL of the given label separates true labels from flipped ones.

    For each target class t: negatives are all samples with their true label, positives are the samples of other
    classes relabelled to t; score = -log p(given label). Returns {"mean": ..., "per_target": [...]}.
    """
    lp = log_softmax(logits)
    labels = np.asarray(labels)
    n, c = lp.shape
    neg = -lp[np.arange(n), labels]
    per = []
    for t in (range(c) if targets is None else targets):
        per.append(auroc(neg, -lp[labels != t, t]))
    return {"mean": float(np.nanmean(per)) if not np.all(np.isnan(per)) else float("nan"), "per_target": per}


def measure(guide, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Top-1, flip-AUROC, and wall/CPU seconds and images/s of `guide.class_logits` on the given set."""
    t0, c0 = time.perf_counter(), time.process_time()
    logits = guide.class_logits(images, class_names)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    fa = flip_auroc(logits, labels)
    return {"n": int(len(images)), "top1": zero_shot_top1(logits, labels), "flip_auroc": fa["mean"],
            "flip_auroc_per_target": fa["per_target"], "wall_s": wall, "cpu_s": cpu,
            "images_per_s": len(images) / max(wall, 1e-9)}

"""Clean accuracy (CA) and attack success rate (ASR) of a model."""

from __future__ import annotations

import numpy as np
from torch import nn

from .poisoned import PoisonedSet
from .data import ImageSet
from .tensors import accuracy, predict_logits


def clean_accuracy(model: nn.Module, test: ImageSet) -> float:
    return accuracy(model, test.images, test.labels)


def attack_success_rate(model: nn.Module, poisoned: PoisonedSet, test: ImageSet) -> float:
    """Share of triggered non-target test images classified as the target."""
    trig = poisoned.triggered_test(test)
    return accuracy(model, trig.images, trig.labels)


def target_share(predicted: np.ndarray, labels: np.ndarray, target: int) -> float:
    """Share of the non-target samples (by `labels`) whose `predicted` class is the target."""
    keep = np.asarray(labels) != target
    return float((np.asarray(predicted)[keep] == target).mean()) if keep.any() else float("nan")


def clean_to_target_rate(model: nn.Module, test: ImageSet, target: int) -> float:
    """Share of *untriggered* non-target test images classified as the target: what ASR measures for a model
    that ignores the trigger but still confuses some images with the target class. A defended model whose ASR
    is at this rate has no trigger left to remove; pushing ASR below it means biasing the model against the target."""
    return target_share(predict_logits(model, test.images).argmax(1), test.labels, target)


def target_recall(predicted: np.ndarray, labels: np.ndarray, target: int) -> float:
    """Share of the target-class samples (by `labels`) predicted as the target: what a defense that removes the
    backdoor by turning the model against the target class loses."""
    keep = np.asarray(labels) == target
    return float((np.asarray(predicted)[keep] == target).mean()) if keep.any() else float("nan")


def ca_asr(model: nn.Module, poisoned: PoisonedSet, test: ImageSet) -> dict[str, float]:
    """CA, ASR, clean→target and the target class's recall; one pass over the clean test images serves all but ASR."""
    predicted = predict_logits(model, test.images).argmax(1)
    return {"ca": float((predicted == test.labels).mean()), "asr": attack_success_rate(model, poisoned, test),
            "clean_to_target": target_share(predicted, test.labels, poisoned.target),
            "target_recall": target_recall(predicted, test.labels, poisoned.target)}

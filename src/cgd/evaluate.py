"""Clean accuracy (CA) and attack success rate (ASR) of a model."""

from __future__ import annotations

from torch import nn

from .attacks import PoisonedSet
from .data import ImageSet
from .train import accuracy, predict_logits


def clean_accuracy(model: nn.Module, test: ImageSet) -> float:
    return accuracy(model, test.images, test.labels)


def attack_success_rate(model: nn.Module, poisoned: PoisonedSet, test: ImageSet) -> float:
    """Share of triggered non-target test images classified as the target."""
    trig = poisoned.triggered_test(test)
    return accuracy(model, trig.images, trig.labels)


def clean_to_target_rate(model: nn.Module, test: ImageSet, target: int) -> float:
    """Share of *untriggered* non-target test images classified as the target: what ASR measures for a model
    that ignores the trigger but still confuses some images with the target class. A defended model whose ASR
    is at this rate has no trigger left to remove; pushing ASR below it means biasing the model against the target."""
    keep = test.labels != target
    return float((predict_logits(model, test.images[keep]).argmax(1) == target).mean()) if keep.any() \
        else float("nan")


def ca_asr(model: nn.Module, poisoned: PoisonedSet, test: ImageSet) -> dict[str, float]:
    return {"ca": clean_accuracy(model, test), "asr": attack_success_rate(model, poisoned, test),
            "clean_to_target": clean_to_target_rate(model, test, poisoned.target)}

"""Clean accuracy (CA) and attack success rate (ASR) of a model."""

from __future__ import annotations

from torch import nn

from .attacks import PoisonedSet
from .data import ImageSet
from .train import accuracy


def clean_accuracy(model: nn.Module, test: ImageSet) -> float:
    return accuracy(model, test.images, test.labels)


def attack_success_rate(model: nn.Module, poisoned: PoisonedSet, test: ImageSet) -> float:
    """Share of triggered non-target test images classified as the target."""
    trig = poisoned.triggered_test(test)
    return accuracy(model, trig.images, trig.labels)


def ca_asr(model: nn.Module, poisoned: PoisonedSet, test: ImageSet) -> dict[str, float]:
    return {"ca": clean_accuracy(model, test), "asr": attack_success_rate(model, poisoned, test)}

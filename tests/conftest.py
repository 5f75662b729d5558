"""Tiny synthetic data and a cheap stand-in guide, so the whole pipeline runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cgd.data import Dataset, ImageSet

# Tiny tensors gain nothing from a second thread, and on a busy machine two threads per process fight the other
# jobs for the cores (seen: the unlearning test 2 s with one thread, 52 s with two beside two other jobs).
torch.set_num_threads(1)

NAMES = ["red", "green", "blue", "yellow"]


def synthetic(n: int, seed: int, size: int = 16) -> ImageSet:
    """Class c = a coloured square blob at a class-specific position, on noise: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(NAMES)
    rng.shuffle(labels)
    x = rng.integers(0, 90, size=(n, size, size, 3)).astype(np.int16)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    for c in range(len(NAMES)):
        idx = labels == c
        r0 = 2 + 3 * (c % 2)
        c0 = 2 + 3 * (c // 2)
        x[idx, r0:r0 + 6, c0:c0 + 6] = colours[c]
    x = np.clip(x + rng.integers(-20, 20, size=x.shape), 0, 255).astype(np.uint8)
    return ImageSet(x, labels.astype(np.int64), list(NAMES))


@pytest.fixture(scope="session")
def tiny() -> Dataset:
    return Dataset(synthetic(800, 0), synthetic(200, 1), name="tiny")


TINY_NET = {"widths": [8, 16, 16], "stem": 8}  # the smallest fastnet, for tests that train a victim


@pytest.fixture(scope="module")
def poisoned(tiny):
    """The tiny set with 10 % BadNets poison (target 0)."""
    from cgd import attacks

    return attacks.get("badnets", target=0, rate=0.1, seed=0).poison(tiny.train)


@pytest.fixture(scope="module")
def victim(poisoned, tmp_path_factory):
    """A tiny fastnet trained on `poisoned` (4 epochs, snapshot after 2)."""
    from cgd.pipeline import train_victim
    from cgd.train import TrainConfig

    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.2, snapshot_epoch=2, augment="none")
    return train_victim(poisoned.train.images, poisoned.train.labels, 4, cfg, tmp_path_factory.mktemp("victim"),
                        "fastnet", TINY_NET)


class LabelGuide:
    """Stands in for the real guide where a test is about the pipeline, not the guide: it knows the clean labels
    of the training images (in order) and is right about `accuracy` of them."""

    id = "test-label-guide"

    def __init__(self, clean_labels: np.ndarray, accuracy: float = 0.8, seed: int = 0):
        self.clean_labels, self.accuracy, self.seed = np.asarray(clean_labels), accuracy, seed
        self.calls = 0

    def class_logits(self, images, class_names):
        assert len(images) == len(self.clean_labels)
        self.calls += 1
        rng = np.random.default_rng(self.seed)
        out = rng.normal(0, 1, size=(len(images), len(class_names))).astype(np.float32)
        right = rng.random(len(images)) < self.accuracy
        out[np.flatnonzero(right), self.clean_labels[right]] += 3.0
        return out

    def features(self, images):
        """Features that separate the clean classes, as a good frozen backbone's would."""
        assert len(images) == len(self.clean_labels)
        rng = np.random.default_rng(self.seed + 1)
        return (np.eye(8)[self.clean_labels % 8] * 2 + rng.normal(0, 1, (len(images), 8))).astype(np.float32)

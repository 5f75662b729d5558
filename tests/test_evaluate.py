import numpy as np
import torch
from torch import nn

from cgd.data import ImageSet
from cgd.evaluate import clean_to_target_rate


class Predicts(nn.Module):
    """Predicts class 2 for images whose first pixel is bright, class 1 for the rest."""

    def forward(self, x):
        bright = x[:, 0, 0, 0] > 0
        out = torch.zeros(len(x), 4)
        out[bright, 2] = 1
        out[~bright, 1] = 1
        return out


def test_clean_to_target_counts_untriggered_non_target_images_sent_to_the_target():
    images = np.zeros((8, 4, 4, 3), np.uint8)
    images[:3, 0, 0] = 255  # three images the model sends to class 2
    labels = np.array([2, 0, 1, 3, 0, 1, 3, 0])  # one of the three is class 2 itself
    test = ImageSet(images, labels, ["a", "b", "c", "d"])
    assert clean_to_target_rate(Predicts(), test, target=2) == 2 / 7  # the target's own image is not counted
    assert clean_to_target_rate(Predicts(), test, target=1) == 4 / 6
    assert clean_to_target_rate(Predicts(), test, target=3) == 0


def test_target_recall_counts_the_target_class_images_kept():
    from cgd.evaluate import target_recall

    labels = np.array([2, 2, 2, 2, 0, 1])
    predicted = np.array([2, 0, 2, 1, 2, 2])  # two of the four class-2 images kept; the others' votes do not count
    assert target_recall(predicted, labels, 2) == 0.5 and target_recall(predicted, labels, 0) == 0
    assert np.isnan(target_recall(predicted, labels, 3))

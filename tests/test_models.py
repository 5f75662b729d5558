"""Architectures: how the victim network adapts to the image size."""

import torch

from cgd import models


def test_fastnet_strides_its_stem_for_large_images_only():
    from cgd.models import for_input

    assert [for_input("fastnet", {}, (s, s)).get("stem_stride", 1) for s in (32, 64, 96, 128, 224)] == [1, 1, 2, 2, 4]
    assert for_input("fastnet", {"stem_stride": 1}, (224, 224)) == {"stem_stride": 1}  # an explicit choice is kept
    assert for_input("preactresnet18", {}, (224, 224)) == {}
    small, big = models.get("fastnet", num_classes=3), models.get("fastnet", num_classes=3, stem_stride=4)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in big.state_dict().items()}
    x = torch.zeros(2, 3, 224, 224)
    assert big.stem(x).shape[-1] == 56 and big.eval()(x).shape == (2, 3)

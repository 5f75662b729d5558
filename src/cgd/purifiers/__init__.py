"""Guide purification (not the split's `purify` step): the testbed of a backdoored CLIP-like guide and the
pre-flight check of a guide.

    from cgd.purifiers import align, poison, check_guide
    check = check_guide(guide, clean_images, class_names)   # InverTune's target identification
    print(check.summary())

The purifiers themselves (PAR, ABD, InverTune's tuning, a CleanCLIP-style fine-tune) are not written yet; see
docs/purification.md.
"""

from .check import DEFAULT_EPS, DEFAULT_STEPS, DEFAULT_THRESHOLD, GuideCheck, check_guide
from .contrastive import label_aware_clip_loss
from .stages import (TEMPLATES, StageConfig, StageReport, align, attack_success_rate, fine_tune, plant, poison,
                     zero_shot_accuracy)

__all__ = ["DEFAULT_EPS", "DEFAULT_STEPS", "DEFAULT_THRESHOLD", "GuideCheck", "StageConfig", "StageReport",
           "TEMPLATES", "align", "attack_success_rate", "check_guide", "fine_tune", "label_aware_clip_loss", "plant",
           "poison", "zero_shot_accuracy"]

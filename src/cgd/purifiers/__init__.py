"""Guide purification (not the split's `purify` step): the testbed of a backdoored CLIP-like guide and the
pre-flight check of a guide.

    from cgd.purifiers import align, poison, check_guide
    check = check_guide(guide, clean_images, class_names)   # InverTune's target identification
    print(check.summary())

    clean_model, report = get("par").clean(model, clean_images, StageConfig(steps=500))   # a purifier

Purifiers: `finetune` (the plain contrastive reference point), `par`, `abd` and `invertune` (docs/purification.md).
"""

from .check import DEFAULT_EPS, DEFAULT_STEPS, DEFAULT_THRESHOLD, GuideCheck, check_guide
from .contrastive import label_aware_clip_loss
from .invertune import InverTune  # registers "invertune"
from .methods import ABD, PAR, PURIFIERS, Purifier, PurifyReport, perturbation_term
from .stages import (TEMPLATES, StageConfig, StageReport, align, attack_success_rate, fine_tune, plant, poison,
                     zero_shot_accuracy)

get, list = PURIFIERS.get, PURIFIERS.list

__all__ = ["ABD", "DEFAULT_EPS", "DEFAULT_STEPS", "DEFAULT_THRESHOLD", "GuideCheck", "InverTune", "PAR", "PURIFIERS", "Purifier",
           "PurifyReport", "StageConfig", "StageReport", "TEMPLATES", "align", "attack_success_rate", "check_guide",
           "fine_tune", "get", "label_aware_clip_loss", "list", "perturbation_term", "plant", "poison",
           "zero_shot_accuracy"]

"""Guide purification (not the split's `purify` step): the testbed of a backdoored CLIP-like guide.

    from cgd.purifiers import align, poison

The purifiers themselves (PAR, ABD, InverTune's tuning, a CleanCLIP-style fine-tune) are not written yet; see
docs/purification.md.
"""

from .contrastive import label_aware_clip_loss
from .stages import (TEMPLATES, StageConfig, StageReport, align, attack_success_rate, fine_tune, plant, poison,
                     zero_shot_accuracy)

__all__ = ["StageConfig", "StageReport", "TEMPLATES", "align", "attack_success_rate", "fine_tune",
           "label_aware_clip_loss", "plant", "poison", "zero_shot_accuracy"]

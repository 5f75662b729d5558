"""CGD: CLIP-Guided Defense against backdoors in image classifiers trained on poisoned data.

The pipeline reads left to right::

    data -> attacks -> models/train -> guides -> split -> unlearn -> defenses -> evaluate -> report

The entry points are `cgd.find_poison` (the split from a guide's logits and a model's losses, arrays only),
`cgd.defend` (CGD on a classifier of your own) and `cgd.LossRecorder` (the loss history from a training loop of
your own); see docs/api.md.
"""

__version__ = "0.1.0"


class CGDError(Exception):
    """A problem with the user's input or configuration, reported as one clear message."""


def __getattr__(name):  # the entry points load torch: only when asked for, so `import cgd` stays light
    if name == "find_poison":
        from .split import find_poison
        return find_poison
    if name == "defend":
        from .defenses import defend
        return defend
    if name == "LossRecorder":
        from .train import LossRecorder
        return LossRecorder
    raise AttributeError(f"module 'cgd' has no attribute {name!r}")

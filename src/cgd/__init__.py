"""CGD: CLIP-Guided Defense against backdoors in image classifiers trained on poisoned data.

The pipeline reads left to right::

    data -> attacks -> models/train -> guides -> split -> unlearn -> evaluate -> report
"""

__version__ = "0.1.0"


class CGDError(Exception):
    """A problem with the user's input or configuration, reported as one clear message."""

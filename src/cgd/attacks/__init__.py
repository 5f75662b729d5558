"""Backdoor attacks, found by name: `cgd.attacks.get("badnets", target=0, rate=0.05)`."""

from .base import ATTACKS, Attack, PoisonedSet, blend, get
from . import classic  # noqa: F401  (registers badnets, blend, sig)
from . import learned, label_only  # noqa: F401  (registers lc, iab, ssba, flip, gcb; resources generated on first use)
from . import adaptive, dynamic, frequency  # noqa: F401  (registers wanet, bpp, ctrl, ada-sig, fmb)

__all__ = ["ATTACKS", "Attack", "PoisonedSet", "blend", "get"]


def list(filter: str = "*") -> dict:  # noqa: A001 - `cgd.attacks.list()`, like the other registries
    """The attacks whose names match the shell-style pattern `filter`, each with a one-line summary."""
    return ATTACKS.list(filter)

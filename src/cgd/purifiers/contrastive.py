"""The contrastive objective shared by the surrogate's training stages (and, later, the purifiers' fine-tunes).

Captions built from templates name few classes, so a batch holds many pairs of one class: with CLIP's plain InfoNCE
every other caption of the same class would be a false negative. Here the loss is *label-aware*: for image i the
positives are every caption in the batch whose pair has i's label, and the loss is minus the log of the softmax
mass on them (the "sum inside the log" multi-positive form), symmetrically for captions. With distinct labels it is
exactly CLIP's symmetric InfoNCE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positives_mass(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(B,) minus log of the softmax mass each row puts on its positive columns."""
    pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return torch.logsumexp(logits, dim=1) - pos


def label_aware_clip_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE over a batch of (image, caption) pairs.

    image, text: (B, D) embeddings (normalised here); labels: (B,) the class each pair's caption names;
    logit_scale: the log of the temperature's inverse, as CLIP stores it.
    """
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp() * image @ text.T
    positive = labels[:, None] == labels[None, :]
    return 0.5 * (positives_mass(logits, positive).mean() + positives_mass(logits.T, positive.T).mean())

"""Guides: zero-shot per-class scores for a task's label names, found by name.

    guide = cgd.guides.get("imagenet-text")                 # offline default (EfficientNet-Lite0 + MiniLM)
    logits = guide.class_logits(images_uint8_NHWC, ["airplane", "automobile", ...])   # float32 (N, C)

Available: `imagenet-text`, `hf-clip` (path=...), `open_clip` (model_name=..., pretrained=...),
`noisy` (guide=<a guide or its name>, gumbel_scale=..., seed=...), `surrogate` (path=...: a CLIP-like dual
encoder built from the offline parts, see `cgd.guides.surrogate`). Every guide caches its per-image scores under
`cache_dir("guide-logits")`, keyed by guide, parameters, class names and prompt.
"""

from __future__ import annotations

from ..registry import Registry
from .base import DEFAULT_PROMPT, Guide, check_class_names
from .clip import ClipGuide, hf_clip, open_clip_guide
from .imagenet_text import ImageNetTextGuide
from .noisy import NoisyGuide
from .quality import flip_auroc, measure, zero_shot_top1

GUIDES: Registry[Guide] = Registry("guide")
GUIDES.register("imagenet-text")(ImageNetTextGuide)
GUIDES.register("hf-clip")(hf_clip)
GUIDES.register("open_clip")(open_clip_guide)


@GUIDES.register("noisy")
def _noisy(guide: Guide | str = "imagenet-text", gumbel_scale: float = 1.0, seed: int = 0,
           guide_params: dict | None = None) -> NoisyGuide:
    """Another guide's logits plus seeded Gumbel noise: a deliberately weakened guide (the paper's §5.4.1)."""
    inner = get(guide, **(guide_params or {})) if isinstance(guide, str) else guide
    return NoisyGuide(inner, gumbel_scale=gumbel_scale, seed=seed)


@GUIDES.register("surrogate")
def _surrogate(path: str, prompt: str = DEFAULT_PROMPT, batch_size: int = 64, cache: bool | str = True) -> Guide:
    """The surrogate dual encoder (EfficientNet-Lite0 + MiniLM, projection heads, learned logit scale): a CLIP
    stand-in trained here, not CLIP; `path` is its safetensors file (`cgd.guides.surrogate.save_surrogate`)."""
    from .surrogate import surrogate

    return surrogate(path, prompt=prompt, batch_size=batch_size, cache=cache)


def get(name: str, **params) -> Guide:
    """`cgd.guides.get("imagenet-text", resolution=160)` and so on."""
    return GUIDES.get(name, **params)


__all__ = ["GUIDES", "DEFAULT_PROMPT", "Guide", "ClipGuide", "ImageNetTextGuide", "NoisyGuide", "check_class_names",
           "flip_auroc", "get", "hf_clip", "measure", "open_clip_guide", "zero_shot_top1"]


def list(filter: str = "*") -> dict:  # noqa: A001 - `cgd.guides.list()`, like the other registries
    """The guides whose names match the shell-style pattern `filter`, each with a one-line summary."""
    return GUIDES.list(filter)

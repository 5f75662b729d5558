"""CLIP guides for users who have real weights: `open_clip` and `hf-clip` (transformers CLIPModel / SigLIP-like).

Zero-shot logits = logit_scale * normalise(image features) @ normalise(text features of the label prompts).
Nothing is downloaded by CGD: `hf-clip` loads a local directory (or the user's Hugging Face cache with
`local_files_only=True` unless they pass `local_files_only=False`); `open_clip` passes `pretrained` (a local
checkpoint file or a tag their open_clip resolves from its own cache) and is imported only when used.
Any object with `encode_image`, `encode_text` and `logit_scale` plus a tokenizer works through `ClipGuide`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .. import CGDError
from .base import DEFAULT_PROMPT, Guide
from .efficientnet import resize_matrix

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: np.ndarray, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, size, size): centre square crop, bicubic resize, CLIP normalisation."""
    n, h, w, _ = images.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = images[:, top:top + s, left:left + s].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    if s != size:
        r = resize_matrix(s, size, "bicubic")
        x = np.clip(np.matmul(np.matmul(r, x), r.T), 0.0, 1.0)
    x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def _features(out):
    """transformers >= 5 returns a model output whose pooler_output is the projected feature; older a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipGuide(Guide):
    """Zero-shot guide over a CLIP-like dual encoder.

    model: exposes `encode_image(pixels NCHW float) -> (N, D)`, `encode_text(tokens) -> (C, D)` and
    `logit_scale` (log of the scale, as in CLIP); tokenize: list[str] -> what `encode_text` takes.
    model_id: names the weights in the cache key (required for caching; None turns the cache off).
    """

    id = "clip"

    def __init__(self, model, tokenize: Callable, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD,
                 model_id: str | None = None, prompt: str = DEFAULT_PROMPT, batch_size: int = 64,
                 device: str = "cpu", cache: bool | str | os.PathLike = True, guide_id: str = "clip"):
        super().__init__(prompt=prompt, cache=cache if model_id else False)
        self.id = guide_id
        self.model, self.tokenize, self.device = model, tokenize, device
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.model_id, self.batch_size = model_id, int(batch_size)
        self._text: dict[tuple, np.ndarray] = {}

    def params(self) -> dict:
        return {"model": self.model_id, "image_size": self.image_size, "mean": self.mean, "std": self.std}

    def text_features(self, class_names: list[str]) -> np.ndarray:
        key = (tuple(class_names), self.prompt)
        if key not in self._text:
            import torch

            with torch.inference_mode():
                t = _features(self.model.encode_text(self.tokenize([self.prompt.format(label=c) for c in class_names])))
                t = torch.nn.functional.normalize(t.float(), dim=-1)
            self._text[key] = t.cpu().numpy()
        return self._text[key]

    def scores(self, images: np.ndarray, class_names: list[str]) -> np.ndarray:
        import torch

        text = torch.from_numpy(self.text_features(class_names))
        scale = float(torch.as_tensor(self.model.logit_scale).detach().float().exp())
        out = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                px = torch.from_numpy(clip_pixels(images[s:s + self.batch_size], self.image_size, self.mean, self.std))
                px = px.to(self.device)
                f = _features(self.model.encode_image(px))
                f = torch.nn.functional.normalize(f.float(), dim=-1)
                out.append((scale * f @ text.T).cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def _dir_fingerprint(path: Path) -> str:
    """Names, sizes and mtimes of the weight files: identifies local weights for the cache key cheaply."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class _HFAdapter:
    """transformers CLIPModel -> the encode_image / encode_text / logit_scale interface."""

    def __init__(self, model):
        self.model = model
        self.logit_scale = model.logit_scale.detach()

    def encode_image(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens):
        return _features(self.model.get_text_features(**tokens))


def hf_clip(path: str | os.PathLike, prompt: str = DEFAULT_PROMPT, batch_size: int = 64, device: str = "cpu",
            local_files_only: bool = True, cache: bool | str | os.PathLike = True) -> ClipGuide:
    """A transformers CLIP model (and its tokenizer) from a local directory or the user's HF cache."""
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError as e:
        raise CGDError("the hf-clip guide needs `pip install transformers`") from e
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=local_files_only).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise CGDError(f"cannot load a CLIP model and tokenizer from {str(path)!r} (local files only: "
                       f"{local_files_only}): {e}") from e
    mean, std = OPENAI_MEAN, OPENAI_STD
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(path), local_files_only=local_files_only)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except Exception:  # no preprocessor_config.json: CLIP's own constants
        pass
    p = Path(path)
    model_id = f"hf:{p.resolve()}:{_dir_fingerprint(p)}" if p.exists() else f"hf:{path}"
    def tokenize(texts):
        return {k: v.to(device) for k, v in tokenizer(texts, padding=True, return_tensors="pt").items()}

    return ClipGuide(_HFAdapter(model), tokenize, model.config.vision_config.image_size, mean, std,
                     model_id=model_id, prompt=prompt, batch_size=batch_size, device=device, cache=cache,
                     guide_id="hf-clip")


def open_clip_guide(model_name: str = "ViT-B-32", pretrained: str | None = None, cache_dir: str | None = None,
                    prompt: str = DEFAULT_PROMPT, batch_size: int = 64, device: str = "cpu",
                    cache: bool | str | os.PathLike = True) -> ClipGuide:
    """An open_clip model: `pretrained` is a local checkpoint path or a tag resolved by open_clip from its own
    cache (`cache_dir`); whether open_clip may download is the user's configuration, not CGD's."""
    try:
        import open_clip
    except ImportError as e:
        raise CGDError("the open_clip guide needs `pip install open_clip_torch` (it requires torchvision)") from e
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                                        device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_STD
    ident = pretrained
    if pretrained and Path(pretrained).exists():
        ident = f"{Path(pretrained).resolve()}:{_dir_fingerprint(Path(pretrained))}"
    return ClipGuide(model, lambda texts: tokenizer(texts).to(device), size, mean, std,
                     model_id=f"open_clip:{model_name}:{ident}", prompt=prompt, batch_size=batch_size, device=device,
                     cache=cache, guide_id="open_clip")

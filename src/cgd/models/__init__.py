"""Victim architectures, found by name, and safe checkpoints (safetensors + a JSON sidecar of constructor
arguments, training image size and class names).

Model files come from people who may be attackers, so nothing in them is trusted: each architecture declares its
constructor parameters (`PARAMS`, see `cgd.schema`) and its smallest input (`MIN_INPUT`) once, beside its class;
`load_model` checks the sidecar against them, then the safetensors header against the tensor shapes those
parameters imply (built on the meta device: nothing is allocated), and only then reads the weights.
"""

from __future__ import annotations

import builtins

import inspect
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..io import atomic_write_bytes, atomic_write_text, read_capped
from ..registry import Registry
from ..schema import Flag, Int, Ints, Real, check_params, show

MODELS: Registry[nn.Module] = Registry("model")

MAX_CLASSES = 100_000
MAX_PARAMETERS = 1 << 26  # 67 M (256 MiB of float32): preact-resnet18 is 11 M, the default fastnet 0.5 M
MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few hundred bytes (class names included)
MAX_HEADER_BYTES = 1 << 20  # a safetensors header here is a few KiB
MAX_INPUT_SIDE = 4096
SAFETENSORS_DTYPES = {torch.float32: ("F32", 4), torch.int64: ("I64", 8)}  # what the architectures' states hold


def get(name: str, **params) -> nn.Module:
    """The architecture `name` built with `params`, checked against its `PARAMS` (and the parameter cap)."""
    cls = MODELS.cls(name)
    params = check_params(cls.PARAMS, params, f"{name} params")
    blueprint(cls, params, f"{name} params")
    model = cls(**params)
    model.cgd_spec = {"name": name, "params": params}
    return model


def _resolved(cls, params: dict) -> dict:
    """`params` completed with the constructor's defaults."""
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()} | params


def blueprint(cls, params: dict, where: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the state dict `cls(**params)` would have, found on the meta device (no memory);
    refused when the network would exceed `MAX_PARAMETERS`."""
    with torch.device("meta"):
        state = cls(**params).state_dict()
    n = sum(math.prod(t.shape) for t in state.values())
    if n > MAX_PARAMETERS:
        raise CGDError(f"{where} make a network of {n:,} parameters; the limit is {MAX_PARAMETERS:,}")
    return {k: (tuple(t.shape), t.dtype) for k, t in state.items()}


def for_input(arch: str, params: dict, size: tuple[int, int]) -> dict:
    """`params` for images of `size` (H, W): fastnet strides its stem so its first group sees at most 64 px
    (32 and 64 px inputs: stride 1, as on CIFAR-10 and Tiny-ImageNet; up to 128: 2; 224: 4), keeping large
    images within a CPU budget. An explicit `stem_stride` is kept."""
    if arch != "fastnet" or "stem_stride" in params:
        return params
    stride = 1
    while min(size) > 64 * stride and stride < 8:
        stride *= 2
    return {**params, "stem_stride": stride} if stride > 1 else params


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class ConvGroup(nn.Sequential):
    """conv → 2×2 max-pool → BN → GELU → conv → BN → GELU (pooling early keeps the FLOPs low)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                         nn.GELU(), *conv_bn(c_out, c_out), nn.GELU())


@MODELS.register("fastnet")
class FastNet(nn.Module):
    """A small fast-training CNN in the style of the CIFAR-10 speed-run networks (three conv groups, each
    halving the resolution, global max-pool, a scaled linear head). Default widths reach ≥ 85 % on CIFAR-10
    in a few epochs on two CPU cores (see docs/benchmarks.md). With `flip_tta`, evaluation averages the logits of
    the image and its mirror image (training is unchanged): +1.2 pt CA on CIFAR-10 for one more forward pass."""

    PARAMS = {"num_classes": Int(1, MAX_CLASSES), "widths": Ints(3, 1, 4096), "stem": Int(1, 4096),
              "logit_scale": Real(0, 1000), "flip_tta": Flag(), "stem_stride": Int(1, 8)}
    MIN_INPUT = 8  # three 2x2 max-pools: 8 px is the smallest input that leaves the last group one pixel

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), stem: int = 24,
                 logit_scale: float = 1 / 9, flip_tta: bool = True, stem_stride: int = 1):
        super().__init__()
        self.flip_tta = flip_tta
        stem_conv = nn.Conv2d(3, stem, 3, stride=stem_stride, padding=1, bias=False)
        self.stem = nn.Sequential(stem_conv, nn.BatchNorm2d(stem), nn.GELU())
        self.groups = nn.Sequential(ConvGroup(stem, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.groups(self.stem(x)), dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_tta and not self.training:
            return self.head(self.features(torch.cat([x, x.flip(3)]))).view(2, len(x), -1).mean(0) \
                * self.logit_scale
        return self.head(self.features(x)) * self.logit_scale


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + sc


@MODELS.register("preact-resnet18")
class PreActResNet18(nn.Module):
    """The paper's victim. `width` 64 is the standard network; 16 trains ~10× faster on CPU."""

    PARAMS = {"num_classes": Int(1, MAX_CLASSES), "width": Int(1, 512)}
    MIN_INPUT = 8  # three stride-2 stages: below 8 px the last stage sees less than one pixel of the image

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        layers, c_in = [], w
        for mult, stride in [(1, 1), (2, 2), (4, 2), (8, 2)]:
            layers += [PreActBlock(c_in, w * mult, stride), PreActBlock(w * mult, w * mult, 1)]
            c_in = w * mult
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x):
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return out.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


# ------------------------------------------------------------------------------------------------ checkpoints

def save_model(model: nn.Module, path: str | Path, *, input_size: tuple[int, int] | None = None,
               class_names: list[str] | None = None, **meta) -> None:
    """Weights to `path` (safetensors); to `path` + `.json` the constructor spec, the (H, W) of the training images
    and the class names in label order (what `check_compatible` holds data to; a model loaded with them keeps them
    when given none), and `meta`: free-form provenance, recorded and never read back."""
    from safetensors.torch import save

    path = Path(path)
    spec = model.cgd_spec
    cls = MODELS.cls(spec["name"])
    trained = {k: v for k, v in spec.items() if k in ("input_size", "class_names")}
    trained |= _check_trained_on(cls, spec["params"], None if input_size is None else builtins.list(input_size),
                                None if class_names is None else builtins.list(class_names), path.name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))
    sidecar = {**meta, "name": spec["name"], "params": spec["params"], **trained}
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(sidecar, indent=2, default=str) + "\n")


def _check_trained_on(cls, params: dict, input_size, class_names, where: str) -> dict:
    """The sidecar's `input_size` and `class_names`, checked (either may be absent: None)."""
    out = {}
    if input_size is not None:
        out["input_size"] = builtins.list(Ints(2, cls.MIN_INPUT, MAX_INPUT_SIDE).check(input_size, f"{where}: input_size"))
    if class_names is not None:
        k = _resolved(cls, params)["num_classes"]
        if not isinstance(class_names, builtins.list) or len(class_names) != k \
                or any(type(c) is not str for c in class_names) or len(set(class_names)) != k:
            raise CGDError(f"{where}: class_names must be a list of {k} distinct strings (one per class); "
                           f"got {show(class_names)}")
        out["class_names"] = class_names
    return out


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_model`, trusting neither file: the sidecar is checked against the
    architecture's `PARAMS`, the safetensors header against the state those parameters imply, and the weights
    must be finite. Anything else is one `CGDError` naming the file and the field. No pickles are read."""
    path = Path(path)
    spec_path = path.with_name(path.name + ".json")
    for p, what in ((path, "model file"), (spec_path, f"sidecar (the architecture of {path.name})")):
        if not p.exists():
            raise CGDError(f"{what} {p} does not exist")
        if not p.is_file():
            raise CGDError(f"{what} {p} is not a regular file")
    spec = _parse_json(read_capped(spec_path, MAX_SIDECAR_BYTES, "a model sidecar"), str(spec_path))
    if not isinstance(spec, dict):
        raise CGDError(f"{spec_path} must be a JSON object with the model's name and params; got {show(spec)}")
    if "name" not in spec:
        raise CGDError(f"{spec_path} has no 'name' (the architecture: {', '.join(MODELS.names())})")
    name = spec["name"]
    if name not in MODELS.names():
        raise CGDError(f"{spec_path}: name {show(name)} is not an architecture; available: {', '.join(MODELS.names())}")
    cls = MODELS.cls(name)
    params = check_params(cls.PARAMS, spec.get("params", {}), f"{spec_path}: params")
    trained = _check_trained_on(cls, params, spec.get("input_size"), spec.get("class_names"), str(spec_path))
    state = read_tensors(path, blueprint(cls, params, f"{spec_path}: params"), name)
    model = cls(**params)
    model.load_state_dict(state)
    model.cgd_spec = {"name": name, "params": params, **trained}
    return model.eval()


def _parse_json(raw: bytes, where: str):
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys (two readers could pick different ones)."""
    def constant(c):
        raise ValueError(f"{c} is not JSON")

    def unique(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {show(k)}")
            out[k] = v
        return out

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=constant, object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CGDError(f"{where} is not valid JSON: {str(e)[:200]}") from None


def read_tensors(path: Path, expected: dict, arch: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`, read only after its header has been checked against
    `expected` (name -> (shape, dtype) of the state of `arch`), and refused unless finite, with non-negative
    batch-norm variances (either would make every prediction NaN)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(_read_weights(path, expected, arch))
    except SafetensorError as e:
        raise CGDError(f"{path}: not a readable safetensors file: {e}") from None
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CGDError(f"{path}: tensor {k!r} holds NaN or infinite values (every prediction would be NaN)")
        if k.endswith("running_var") and (t < 0).any():
            raise CGDError(f"{path}: tensor {k!r} holds negative variances (every prediction would be NaN)")
    return state


def _read_weights(path: Path, expected: dict, arch: str) -> bytes:
    """The bytes of the safetensors file `path`, read only after its header (8-byte little-endian length, then
    JSON) has been checked against `expected` (name -> (shape, dtype) of the state of `arch`)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CGDError(f"{path}: {size} bytes, too short for a safetensors file (an 8-byte header length)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CGDError(f"{path}: header length {n:,} is impossible (file of {size:,} bytes, header limit "
                               f"{MAX_HEADER_BYTES:,})")
            head = f.read(n)
            data_len = _check_header(_parse_json(head, f"{path}: header"), expected, arch, str(path))
            if size != 8 + n + data_len:
                raise CGDError(f"{path}: the header describes {data_len:,} bytes of tensors but the file holds "
                               f"{size - 8 - n:,}")
            body = f.read(data_len + 1)
    except OSError as e:
        raise CGDError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(body) != data_len:
        raise CGDError(f"{path} changed while it was read")
    return prefix + head + body


def _check_header(header, expected: dict, arch: str, where: str) -> int:
    """Names, dtypes, shapes and data offsets of a parsed safetensors header against `expected`; the tensors must
    tile the data section exactly. Returns the data section's length."""
    if not isinstance(header, dict):
        raise CGDError(f"{where}: the header must be a JSON object; got {show(header)}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or any(type(v) is not str for v in meta.values()):
        raise CGDError(f"{where}: the header's __metadata__ must map names to strings; got {show(meta)}")
    missing = [k for k in expected if k not in header]
    if missing:
        raise CGDError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} of the {len(expected)} tensors "
                       f"of this {arch})")
    extra = [k for k in header if k not in expected]
    if extra:
        raise CGDError(f"{where}: tensor {show(extra[0])} is not part of this {arch}")
    spans = []
    for k, (shape, dtype) in expected.items():
        e, (code, itemsize) = header[k], SAFETENSORS_DTYPES[dtype]
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CGDError(f"{where}: tensor {k!r} must have exactly dtype, shape and data_offsets; got {show(e)}")
        if e["dtype"] != code:
            raise CGDError(f"{where}: tensor {k!r} has dtype {show(e['dtype'])}; this {arch} stores {code}")
        if not _naturals(e["shape"]) or tuple(e["shape"]) != shape:
            raise CGDError(f"{where}: tensor {k!r} has shape {show(e['shape'])}; the sidecar's params make it "
                           f"{builtins.list(shape)}")
        off, nbytes = e["data_offsets"], math.prod(shape) * itemsize
        if not _naturals(off) or len(off) != 2 or off[1] - off[0] != nbytes:
            raise CGDError(f"{where}: tensor {k!r} has data_offsets {show(off)}; its {nbytes:,} bytes need "
                           "[begin, begin + that]")
        spans.append((off[0], off[1], k))
    end = 0
    for begin, stop, k in sorted(spans):
        if begin != end:
            raise CGDError(f"{where}: tensor {k!r} starts at byte {begin:,} of the data, not {end:,}: tensors must "
                           "follow each other without gaps or overlaps")
        end = stop
    return end


def _naturals(v) -> bool:
    return isinstance(v, builtins.list) and all(type(x) is int and x >= 0 for x in v)


# ------------------------------------------------------------------------------------------------ compatibility

def check_compatible(model: nn.Module, data: ImageSet, model_name: str, data_name: str, log=None) -> None:
    """Refuse data `model` cannot be run on meaningfully: no images, another number of classes, other class names,
    images smaller than the architecture's `MIN_INPUT` or of another size than the model was trained on. A model
    whose sidecar predates the recorded size and names (None) gets the checks that remain, and `log` says so."""
    spec = model.cgd_spec
    cls = MODELS.cls(spec["name"])
    k = _resolved(cls, spec["params"])["num_classes"]
    if len(data) == 0:
        raise CGDError(f"{data_name} holds no images: nothing to run {model_name} on")
    if k != data.num_classes:
        raise CGDError(f"{model_name} has {k} classes but {data_name} has {data.num_classes} "
                       f"({_names(data.class_names)})")
    names = spec.get("class_names")
    if names is not None and names != data.class_names:
        i = next(i for i, (a, b) in enumerate(zip(names, data.class_names)) if a != b)
        raise CGDError(f"{model_name} was trained on classes ({_names(names)}) but {data_name} has "
                       f"({_names(data.class_names)}): class {i} is {names[i]!r} for the model, "
                       f"{data.class_names[i]!r} for the data")
    h, w = data.images.shape[1:3]
    if min(h, w) < cls.MIN_INPUT:
        raise CGDError(f"{data_name} has {h}x{w} px images but {model_name} ({spec['name']}) needs at least "
                       f"{cls.MIN_INPUT}x{cls.MIN_INPUT} px")
    size = spec.get("input_size")
    if size is not None and builtins.list(size) != [h, w]:
        raise CGDError(f"{model_name} was trained on {size[0]}x{size[1]} px images but {data_name} has {h}x{w} px "
                       "images")
    unknown = [what for what in ("input_size", "class_names") if spec.get(what) is None]
    if unknown and log is not None:
        log(f"note: {model_name} was saved without its {' and '.join(unknown)} (by an older cgd): not checked; the "
            "class count and the minimum image size were")


def _names(names: list[str], most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} in all)"


def list(filter: str = "*") -> dict:  # noqa: A001 - `cgd.models.list()`, like the other registries
    """The architectures whose names match the shell-style pattern `filter`, each with a one-line summary."""
    return MODELS.list(filter)

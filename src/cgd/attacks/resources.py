"""Generated attack resources: trained generators, encoders, surrogates, experts, adversarial images.

Some attacks need an expensive artefact before they can poison anything (LC's adversarial images, IAB's trigger
generator, SSBA's encoder, FLIP's expert trajectory, GCB's C-InfoGAN). Each artefact is built by a function the attack
calls from `poison`/`prepare` when it is missing, and cached under

    cache_dir("attack-resources") / "<kind>-<key>" / resource.safetensors + resource.json

where `key` hashes the kind, the generation parameters, the seed and a fingerprint of the training data. The JSON keeps
the parameters, the seed, the fingerprint and how long generation took; it is written last, so a directory without it
is an interrupted run and is rebuilt. Builds of the same key are serialised with a file lock.

Generate ahead of a benchmark (heavy: run it under `flock /tmp/cgd-heavy.lock`):

    python -m cgd.attacks --attack iab --data cifar10 --target 0 --rate 0.05 --seed 0 [--param epochs=15]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..io import cache_dir, load_arrays, read_json, save_arrays, write_json

log = logging.getLogger("cgd.attacks")

FORMAT_VERSION = 1  # bump when a builder changes what it produces for the same parameters


# --------------------------------------------------------------------------------------------- cache

def fingerprint(ds: ImageSet) -> str:
    """A short content hash of a dataset (images, labels, class names): the same data gives the same resources."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((ds.images.shape, ds.labels.shape, list(ds.class_names))).encode())
    h.update(np.ascontiguousarray(ds.images).data)
    h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).data)
    return h.hexdigest()


def resource_key(kind: str, params: dict[str, Any], seed: int, data_fingerprint: str) -> str:
    blob = json.dumps({"kind": kind, "params": params, "seed": int(seed), "data": data_fingerprint,
                       "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resource_dir(kind: str, params: dict[str, Any], seed: int, data_fingerprint: str) -> Path:
    return cache_dir("attack-resources") / f"{kind}-{resource_key(kind, params, seed, data_fingerprint)}"


@dataclass
class Resource:
    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    generated: bool  # True when this call built it, False when it came from the cache


def _complete(d: Path) -> bool:
    return (d / "resource.json").exists() and (d / "resource.safetensors").exists()


def get_or_create(kind: str, params: dict[str, Any], seed: int, ds: ImageSet,
                  build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
                  data_fingerprint: str | None = None) -> Resource:
    """Load resource `kind` for (params, seed, data) from the cache, or build it with `build()` and cache it.

    `build` returns (arrays to save, extra JSON-able facts for resource.json)."""
    fp = data_fingerprint or fingerprint(ds)
    d = resource_dir(kind, params, seed, fp)
    if not _complete(d):
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder of the same key finishes first
            if not _complete(d):
                log.info("attack resource %s: generating in %s (%d images %s)", kind, d,
                         len(ds), "x".join(map(str, ds.images.shape[1:3])))
                t0 = time.perf_counter()
                arrays, info = build()
                seconds = time.perf_counter() - t0
                save_arrays(d / "resource.safetensors", **arrays)
                write_json(d / "resource.json", {
                    "kind": kind, "params": params, "seed": int(seed), "data_fingerprint": fp,
                    "n_images": len(ds), "image_size": list(ds.images.shape[1:3]), "format": FORMAT_VERSION,
                    "generation_seconds": round(seconds, 3), "torch": torch.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "info": info})
                log.info("attack resource %s: generated in %.1f s", kind, seconds)
                return Resource(d, arrays, read_json(d / "resource.json"), True)
    log.info("attack resource %s: reusing %s", kind, d)
    return Resource(d, load_arrays(d / "resource.safetensors"), read_json(d / "resource.json"), False)


def get_or_create_on(first: Callable[[], tuple[Any, Resource]], kind: str, params: dict[str, Any], seed: int,
                     ds: ImageSet, build: Callable[[Any, Resource], tuple[dict[str, np.ndarray], dict[str, Any]]],
                     data_fingerprint: str | None = None) -> tuple[Resource, list[Resource]]:
    """`get_or_create` for a resource built on another one: `first()` gives (that one's value, its `Resource`) and
    runs only when this resource must be built, then `build(value, resource)`. Returns this resource and every
    resource touched (the first one only when it was needed)."""
    touched: list[Resource] = []

    def run():
        value, r_first = first()
        touched.append(r_first)
        return build(value, r_first)

    r = get_or_create(kind, params, seed, ds, run, data_fingerprint)
    return r, [*touched, r]


# ------------------------------------------------------------------------------ module <-> arrays

def module_arrays(prefix: str, module: nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().numpy().copy() for k, v in module.state_dict().items()}


def load_module(module: nn.Module, arrays: dict[str, np.ndarray], prefix: str) -> nn.Module:
    n = len(prefix) + 1
    state = {k[n:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state)
    return module.eval()


# --------------------------------------------------------------------------------- tensor helpers

def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) → float (N,3,H,W) in [0, 1]."""
    return torch.tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def from_unit(x: torch.Tensor) -> np.ndarray:
    """float (N,3,H,W) in [0, 1] → uint8 (N,H,W,3), rounded and clipped."""
    return x.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad (N,C,H,W) on the bottom/right so H and W divide by `m` (encoder-decoders pool by `m`)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def batches(n: int, batch_size: int, gen: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Apply a [0,1]→[0,1] image function to uint8 images in batches; uint8 out, same shape."""
    if len(images) == 0:
        return np.array(images)
    out = [from_unit(fn(to_unit(images[i:i + batch_size]))) for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def training_subset(ds: ImageSet, n: int | None, seed: int) -> ImageSet:
    """At most `n` of the images, drawn at random under `seed` (None or n ≥ N: all of them). Generators and encoders
    learn a trigger, not the task: a subset bounds their cost on large training sets."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=int(n), replace=False))
    return ds.subset(idx)


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global RNG (layer initialisation) and return a generator for data order and noise."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cgd.attacks",
                                description="Generate (or check) the cached resources of an attack.")
    p.add_argument("--attack", required=True)
    p.add_argument("--data", default="cifar10")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable; VALUE as for cgd's --set (a TOML value or a bare word)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return _generate(args)
    except CGDError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1


def _generate(args) -> int:
    from . import get
    from ..config import parse_assignments
    from ..data import load_dataset

    params: dict[str, Any] = {"target": args.target, "seed": args.seed}
    params.update(parse_assignments(args.param, "--param"))
    if args.rate is not None:
        params["rate"] = args.rate
    attack = get(args.attack, **params)
    if not attack.learned:
        print(f"{args.attack}: needs no generated resources")
        return 0
    ds = load_dataset(args.data)
    for r in attack.prepare(ds.train):
        print(f"{r.path}  generated={r.generated}  seconds={r.meta['generation_seconds']}")
    return 0

"""The surrogate testbed with its stages cached: an aligned surrogate, then poisoned ones grown from it.

Each stage's result is a surrogate file under `cache_dir("surrogates")` named by a hash of everything that made
it (the model configuration, the stage settings, the training pairs' content, and for a poisoned one the aligned
file it continued from and the attack), with its `StageReport` beside it as JSON. A finished stage is loaded,
not retrained; an interrupted one starts over (stages are minutes to tens of minutes, not hours).

    base, _ = aligned_surrogate(train, StageConfig(steps=2000))
    bad, report = poisoned_surrogate(base, train, "badnets", "banana", rate=0.01, stage=StageConfig(steps=1000),
                                     size=16)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ..data import ImageSet
from ..guides import surrogate as sg
from ..io import atomic_write_text, cache_dir, read_json
from .stages import TEMPLATES, StageConfig, StageReport, align, poison


def data_digest(data: ImageSet) -> str:
    """SHA-1 of the pairs' content: images, labels and class names."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.asarray(data.labels, np.int64).tobytes())
    h.update(json.dumps(list(data.class_names)).encode())
    return h.hexdigest()


def stage_key(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(name: str, parts: dict, run: Callable[[], tuple[object, StageReport]], root: Path | None,
            log: Callable[[str], None] | None) -> tuple[Path, StageReport]:
    """The stage's (file, report): read when finished before, else `run()`, saved, then the report beside it."""
    folder = Path(root) if root else cache_dir("surrogates")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{stage_key(parts)}.safetensors"
    meta = path.with_name(path.name + ".json")
    if path.exists() and meta.exists():
        if log:
            log(f"{name}: cached {path}")
        return path, StageReport(**read_json(meta)["report"])
    model, report = run()
    sg.save_surrogate(model, path)
    atomic_write_text(meta, json.dumps({"key": parts, "report": asdict(report)}, default=str) + "\n")
    if log:
        log(f"{report.summary()} -> {path}")
    return path, report


def aligned_surrogate(data: ImageSet, stage: StageConfig = StageConfig(), config: dict | None = None,
                      templates: tuple[str, ...] = TEMPLATES, seed: int = 0, root: Path | None = None,
                      log: Callable[[str], None] | None = None) -> tuple[Path, StageReport]:
    """Stage (a) from a fresh surrogate (`config`, default the real one; heads from `seed`), cached."""
    config = sg.check_config(config if config is not None else sg.default_config())
    parts = {"stage": "align", "config": config, "seed": seed, "train": asdict(stage), "templates": templates,
             "data": data_digest(data)}

    def run():
        model = sg.build_surrogate(config, seed)
        return model, align(model, data, stage, templates, log)

    return _cached("aligned", parts, run, root, log)


def poisoned_surrogate(base: Path, data: ImageSet, attack: str, target: str, rate: float,
                       stage: StageConfig = StageConfig(), templates: tuple[str, ...] = TEMPLATES,
                       root: Path | None = None, log: Callable[[str], None] | None = None,
                       **attack_params) -> tuple[Path, StageReport]:
    """Stage (b) continued from the surrogate file `base`, cached."""
    parts = {"stage": "poison", "base": sg.file_sha256(Path(base)), "attack": attack, "target": target,
             "rate": rate, "attack_params": attack_params, "train": asdict(stage), "templates": templates,
             "data": data_digest(data)}

    def run():
        model = sg.load_surrogate(base)
        report, _ = poison(model, data, attack, target, rate, stage, templates, log, **attack_params)
        return model, report

    return _cached(f"{attack}-{_slug(target)}", parts, run, root, log)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())[:24]

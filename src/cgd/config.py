"""Run configuration: nested defaults, TOML/YAML files, and `section.key=value` command-line overrides."""

from __future__ import annotations

import copy
import tomllib
from dataclasses import asdict
from pathlib import Path

from . import CGDError
from .split import SplitConfig
from .train import TrainConfig
from .unlearn import RECIPES, UnlearnConfig


def defaults() -> dict:
    return {
        "seed": 0,
        "data": {"spec": "auto", "train_subset": 0, "test_subset": 0},
        "attack": {"name": "badnets", "target": 0, "rate": 0.05, "params": {}},
        "victim": {"arch": "fastnet", "arch_params": {}, **asdict(TrainConfig())},
        "guide": {"name": "imagenet-text", "params": {}},
        "split": SplitConfig().to_dict(),
        "unlearn": {"recipe": "cpu", "overrides": {}},
        "defense": {"name": "cgd", "params": {}},  # the split and unlearning sections are CGD's settings
    }


# How each recipe scores samples for the split (the unlearning side is `unlearn.RECIPES`); `use_recipe` copies
# these fields of it, leaving the σ's and the class floor as they are.
SPLIT_RECIPES = {"cpu": SplitConfig(), "paper": SplitConfig.paper()}
RECIPE_FIELDS = ("model_score", "refine_rounds", "purify", "neighbours")


def use_recipe(cfg: dict, name: str) -> dict:
    """Switch both the split and the unlearning to a named recipe ("paper" or "cpu")."""
    if name not in SPLIT_RECIPES:
        raise CGDError(f"unknown recipe {name!r}; choose from {', '.join(SPLIT_RECIPES)}")
    out = copy.deepcopy(cfg)
    recipe = SPLIT_RECIPES[name].to_dict()
    out["split"].update({k: recipe[k] for k in RECIPE_FIELDS})
    out["unlearn"]["recipe"] = name
    return out


def load_config(path: str | Path | None) -> dict:
    """Defaults updated by a TOML or YAML file (unknown sections or keys are errors, not silently ignored)."""
    cfg = defaults()
    if path is None:
        return cfg
    path = Path(path)
    if not path.exists():
        raise CGDError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            user = yaml.safe_load(text) or {}
        else:
            user = tomllib.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise CGDError(f"{path}: cannot parse config: {e}") from None
    return merge(cfg, user, where=str(path))


def merge(base: dict, user: dict, where: str = "config") -> dict:
    out = copy.deepcopy(base)
    for k, v in user.items():
        if k not in out:
            raise CGDError(f"{where}: unknown setting {k!r}; known: {', '.join(out)}")
        if isinstance(out[k], dict) and k not in ("params", "arch_params", "overrides"):
            if not isinstance(v, dict):
                raise CGDError(f"{where}: {k!r} must be a table of settings")
            out[k] = merge(out[k], v, where=f"{where}.{k}")
        else:
            out[k] = v
    return out


def parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`["unlearn.recipe=paper", "victim.epochs=3"]` → a new config."""
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise CGDError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise CGDError(f"override {item!r}: unknown section {p!r}")
            node = node[p]
        if parts[-1] not in node and not any(s in parts for s in ("params", "arch_params", "overrides")):
            raise CGDError(f"override {item!r}: unknown setting {parts[-1]!r}; known: {', '.join(node)}")
        node[parts[-1]] = parse_value(value.strip())
    return out


def train_config(cfg: dict) -> TrainConfig:
    v = {k: val for k, val in cfg["victim"].items() if k not in ("arch", "arch_params")}
    return TrainConfig(**v)


def split_config(cfg: dict) -> SplitConfig:
    """`cfg["split"]` as a checked `SplitConfig` (a bad value is refused here, before any training)."""
    return SplitConfig.from_dict(cfg["split"])


def unlearn_config(cfg: dict) -> UnlearnConfig:
    name = cfg["unlearn"]["recipe"]
    if name not in RECIPES:
        raise CGDError(f"unknown unlearning recipe {name!r}; choose from {', '.join(RECIPES)}")
    fields = set(UnlearnConfig.__dataclass_fields__)
    bad = set(cfg["unlearn"]["overrides"]) - fields
    if bad:
        raise CGDError(f"unknown unlearning setting(s) {sorted(bad)}; known: {', '.join(sorted(fields))}")
    return UnlearnConfig(**{**RECIPES[name], "seed": cfg["seed"], **cfg["unlearn"]["overrides"]})


def explicit(cfg: dict) -> dict:
    """`cfg` with its unlearning recipe spelled out field by field in `unlearn.overrides`, so the config a run
    records (and the benchmark's config hash) changes when a recipe's definition changes, not only its name."""
    out = copy.deepcopy(cfg)
    resolved = asdict(unlearn_config(cfg))
    del resolved["seed"]  # the top-level seed
    out["unlearn"]["overrides"] = resolved
    return out


def dumps_toml(cfg: dict) -> str:
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg))


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d

"""Run configuration: nested defaults, TOML/YAML files, and `section.key=value` command-line overrides."""

from __future__ import annotations

import copy
import datetime
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


# ------------------------------------------------------------------------------- KEY=VALUE on the command line
# One grammar for `--set section.key=value`, `cgd attack --param key=value` and `python -m cgd.attacks --param`:
# the value is a TOML value (3, 0.5, 1e-3, true, 'text', [1, 2], {widths = [8, 16]}); a bare word that is no TOML
# value (paper, fastnet, one-to-one, none, a/path) is that string. What looks meant as something else is refused.


def parse_value(text: str):
    """One VALUE as described above; a `CGDError` saying what is wrong with it otherwise."""
    text = text.strip()
    if not text:
        raise CGDError("no value after '='; an empty string is written ''")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
        return text if isinstance(value, (datetime.date, datetime.time)) else value  # no setting takes a date
    except tomllib.TOMLDecodeError:
        pass
    if text.lower() in ("true", "false"):
        raise CGDError("booleans are lowercase: true or false")
    if text in ("null", "None", "NULL", "Null"):  # a bare `none` stays a string (victim.augment=none)
        raise CGDError("there is no null value; leave the setting out to keep its default")
    try:
        float(text)
    except ValueError:
        pass
    else:
        raise CGDError("not a number as TOML writes them (e.g. 0.5, 8, 1e-3)")
    if text[0] in "[{\"'":
        raise CGDError("not a TOML value (a list [1, 2], a table {key = 1}, a string 'text')")
    return text


def parse_assignments(items: list[str], flag: str) -> list[tuple[str, object]]:
    """`["victim.epochs=3", "unlearn.recipe=paper"]` → [("victim.epochs", 3), ("unlearn.recipe", "paper")]; an
    error names the item and its `flag` (`--set`, `--param`)."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or any(c.isspace() for c in key):
            raise CGDError(f"{flag} {item!r} must look like KEY=VALUE")
        try:
            out.append((key, parse_value(value)))
        except CGDError as e:
            raise CGDError(f"{flag} {item!r}: {e}") from None
    return out


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`["unlearn.recipe=paper", "victim.epochs=3"]` (each `--set`) → a new config."""
    out = copy.deepcopy(cfg)
    for item, (key, value) in zip(overrides, parse_assignments(overrides, "--set")):
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise CGDError(f"--set {item!r}: unknown section {p!r}")
            node = node[p]
        if parts[-1] not in node and not any(s in parts for s in ("params", "arch_params", "overrides")):
            raise CGDError(f"--set {item!r}: unknown setting {parts[-1]!r}; known: {', '.join(node)}")
        node[parts[-1]] = value
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
    if "seed" not in cfg["unlearn"]["overrides"]:
        del resolved["seed"]  # the top-level seed, already in the config; an unlearning seed of its own stays
    out["unlearn"]["overrides"] = resolved
    return out


def dumps_toml(cfg: dict) -> str:
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg))


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d

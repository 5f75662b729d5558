"""The reference benchmark (docs/benchmarks.md): per attack, the victim with no defense and with CGD.

Cells are resumable: the victim, the guide logits and the unlearning live in `ROOT/runs/<attack>/`, and a finished
cell is a JSON file in `ROOT/results/` that is never recomputed (delete it to redo the cell).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import attacks
from .config import dumps_toml, explicit, train_config
from .data import load_dataset
from .evaluate import ca_asr
from .io import write_json
from .pipeline import defend, train_victim
from .tensors import accuracy


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu() -> str:
    """The machine and PyTorch's vector ISA (e.g. "x86_64 / AVX512"): the same victim recipe trained on other
    kernels differs in its last digits."""
    return f"{platform.machine()} / {torch.backends.cpu.get_cpu_capability()}"


VICTIM_SECTIONS = ("seed", "data", "attack", "victim")  # what the poisoned set and the victim are made from


def _find(results: Path, attack: str, defense: str, key: str, victim_s: float | None = None) -> Path | None:
    """A finished cell of this configuration (`key`) — and, given `victim_s`, of this very victim (its training
    seconds, as the cell recorded them): a victim trained again (a fresh checkout has none cached) makes new cells."""
    for p in sorted(results.glob(f"*-{attack}-{defense}.json")):
        cell = json.loads(p.read_text())
        seconds = cell.get("victim_train_s", cell.get("timings", {}).get("victim_train_s"))
        if cell.get("config_hash") == key and (victim_s is None or seconds == victim_s):
            return p
    return None


def _new_cell(results: Path, attack: str, defense: str) -> Path:
    """Where a new cell goes: `<date>-<attack>-<defense>.json`, or `<date>b-…`, `<date>c-…` when a cell of another
    configuration (another victim) already took that name today — a finished cell is never overwritten."""
    today = _dt.date.today().isoformat()
    for tag in ("", *"bcdefghijklmnopqrstuvwxyz"):
        path = results / f"{today}{tag}-{attack}-{defense}.json"
        if not path.exists():
            return path
    raise RuntimeError(f"too many {attack}-{defense} cells today in {results}")


def train_asr_probe(poisoned: attacks.PoisonedSet, n: int = 1000, seed: int = 0):
    """A training-data stand-in for the ASR, for analysis during unlearning: the trigger applied to `n` clean
    non-target *training* images. Never touches the test set."""
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~poisoned.poison_mask & (poisoned.train.labels != poisoned.target))
    idx = rng.choice(pool, size=min(n, len(pool)), replace=False)
    x = poisoned.trigger(np.ascontiguousarray(poisoned.train.images[idx]))
    y = np.full(len(idx), poisoned.target)
    return lambda model: {"train_asr": accuracy(model, x, y)}


def run_benchmark(attack_names: list[str], cfg: dict, root: Path, data: str = "cifar10", with_cgd: bool = True,
                  log=print) -> list[Path]:
    root = Path(root)
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(data)
    written = []
    for name in attack_names:
        atk = attacks.get(name, target=cfg["attack"]["target"], seed=cfg["seed"],
                          **({"rate": cfg["attack"]["rate"]} if not attacks.ATTACKS.cls(name).clean_label else {}))
        ps = atk.poison(ds.train)
        run = root / "runs" / name
        cell_cfg = dict(cfg, attack={"name": name, "target": atk.target, "rate": atk.rate, "params": atk.params()},
                        data=dict(cfg["data"], spec=data))
        spelled = explicit(cell_cfg)
        key = hashlib.sha256(dumps_toml(spelled).encode()).hexdigest()[:12]
        # the no-defense cell depends on the victim alone: a run with other split or unlearning settings reuses it
        victim_key = hashlib.sha256(dumps_toml({k: spelled[k] for k in VICTIM_SECTIONS}).encode()).hexdigest()[:12]
        common = {"attack": name, "attack_params": atk.params(), "poisoned": int(ps.poison_mask.sum()),
                  "config_hash": key, "unlearn_config": spelled["unlearn"]["overrides"], "git_commit": _commit(),
                  "cores": torch.get_num_threads(),
                  "command": " ".join(["cgd", *sys.argv[1:]]) if sys.argv else "", "cpu_count": os.cpu_count(),
                  "cpu": _cpu()}
        today = _dt.date.today().isoformat()

        victim = train_victim(ps.train.images, ps.train.labels, ds.train.num_classes, train_config(cfg),
                              run / "victim", cfg["victim"]["arch"], cfg["victim"]["arch_params"],
                              class_names=ds.class_names)
        if _find(results, name, "none", victim_key, victim.seconds) is None:
            r = ca_asr(victim.model, ps, ds.test)
            cell = {**common, "config_hash": victim_key, "defense": "none", **r, "victim_train_s": victim.seconds,
                    "date": today}
            written.append(write_json(_new_cell(results, name, "none"), cell))
            log(f"{name} no defense: CA {r['ca']:.4f} ASR {r['asr']:.4f} ({victim.seconds:.0f} s victim)")
        if not with_cgd:
            continue
        defense = f"cgd-{cfg['unlearn']['recipe']}"
        if _find(results, name, defense, key, victim.seconds) is None:
            m = defend(ps.train, cell_cfg, run / defense, poison_mask=ps.poison_mask, poisoned=ps, test=ds.test,
                       extra_eval=train_asr_probe(ps), victim=victim, log=log)
            cell = {**common, "defense": defense, **m["after"], "before": m["before"], "detection": m["detection"],
                    "timings": {**m["timings"], "victim_train_s": victim.seconds}, "sizes": m["sizes"],
                    "model_score": m["model_score"], "window_shares": m.get("window_shares"),
                    "unlearn_history": m["unlearn_history"], "date": today}
            written.append(write_json(_new_cell(results, name, defense), cell))
            log(f"{name} {defense}: CA {m['after']['ca']:.4f} ASR {m['after']['asr']:.4f}")
    return written


def results_table(results: Path) -> str:
    """A Markdown table of every benchmark cell in `results` (one row per attack × defense, newest wins)."""
    cells = {}
    for p in sorted(Path(results).glob("*.json")):
        c = json.loads(p.read_text())
        if "attack" in c and "defense" in c:  # other measurements (guide quality) live beside the cells
            cells[(c["attack"], c["defense"])] = c
    head = ("| attack | defense | CA | ASR | clean→target | TPR | FPR | poison in D_c | AUROC guide / model | victim s "
            "| guide s | split+probe s | unlearn s | date |\n" + "|---" * 14 + "|")
    rows = [head]
    for (attack, defense), c in sorted(cells.items()):
        d, t = c.get("detection", {}), c.get("timings", {})

        def f(v, spec=".4f"):
            return "" if v is None else format(v, spec)

        split_s = t.get("split_s", 0) + t.get("refine_split_s", 0) if "split_s" in t else None
        aurocs = f"{f(d.get('auroc_guide'), '.3f') or '–'} / {f(d.get('auroc_model'), '.3f')}" if d else ""
        rows.append(f"| {attack} | {defense} | {f(c['ca'])} | {f(c['asr'])} | {f(c.get('clean_to_target'))} "
                    f"| {f(d.get('tpr'), '.3f')} | {f(d.get('fpr'), '.3f')} | {d.get('poison_in_clean', '')} "
                    f"| {aurocs} "
                    f"| {f(t.get('victim_train_s', c.get('victim_train_s')), '.0f')} | {f(t.get('guide_s'), '.0f')} "
                    f"| {f(split_s, '.0f')} | {f(t.get('unlearn_s'), '.0f')} | {c['date']} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------ baseline cells

def oracle_clean(poison_mask: np.ndarray, share: float = 0.05, seed: int = 0) -> np.ndarray:
    """The clean-data defenses' "5 % clean data": `share` of the training set drawn among the samples the known
    poison mask says are clean. An oracle: no real user has the mask."""
    pool = np.flatnonzero(~np.asarray(poison_mask, bool))
    n = min(len(pool), int(round(share * len(poison_mask))))
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))


def run_baseline(attack: str, defense: str, cfg: dict, root: Path, data: str = "cifar10", oracle: float | None = None,
                 log=print) -> Path:
    """One resumable (attack, defense) cell beside CGD's: the cached victim of `ROOT/runs/<attack>/victim` (trained
    by `cgd bench --victims-only`, or here if missing), the defense `defense` with `cfg["defense"]["params"]`,
    `oracle` (a share, e.g. 0.05) of truly clean training samples for the clean-data defenses (the cell is then
    labelled `<defense>-oracle`). Writes `ROOT/results/<date>-<attack>-<label>.json` with CA, ASR, clean→target,
    wall and CPU seconds (this process, all threads) and detection TPR/FPR where the defense flags samples; a
    finished cell (same config hash) is returned as is."""
    import time

    root = Path(root)
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    label = defense + ("-oracle" if oracle else "")
    ds = load_dataset(data)
    atk = attacks.get(attack, target=cfg["attack"]["target"], seed=cfg["seed"],
                      **({"rate": cfg["attack"]["rate"]} if not attacks.ATTACKS.cls(attack).clean_label else {}))
    ps = atk.poison(ds.train)
    cell_cfg = dict(cfg, attack={"name": attack, "target": atk.target, "rate": atk.rate, "params": atk.params()},
                    data=dict(cfg["data"], spec=data), defense=dict(cfg["defense"], name=defense))
    spelled = explicit(cell_cfg)
    key = hashlib.sha256((dumps_toml(spelled) + f"oracle={oracle}").encode()).hexdigest()[:12]
    victim = train_victim(ps.train.images, ps.train.labels, ds.train.num_classes, train_config(cfg),
                          root / "runs" / attack / "victim", cfg["victim"]["arch"], cfg["victim"]["arch_params"],
                          class_names=ds.class_names)
    found = _find(results, attack, label, key, victim.seconds)
    if found is not None:
        log(f"{attack} {label}: finished cell {found}")
        return found
    clean = oracle_clean(ps.poison_mask, oracle, cfg["seed"]) if oracle else None
    wall, cpu = time.perf_counter(), time.process_time()
    m = defend(ps.train, cell_cfg, root / "runs" / attack / label, poison_mask=ps.poison_mask, poisoned=ps,
               test=ds.test, victim=victim, clean_indices=clean, log=log)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    today = _dt.date.today().isoformat()
    cell = {"attack": attack, "attack_params": atk.params(), "poisoned": int(ps.poison_mask.sum()),
            "defense": label, "defense_params": spelled["defense"]["params"], "config_hash": key,
            **m["after"], "before": m["before"], "detection": m["detection"], "sizes": m["sizes"],
            "timings": {**m["timings"], "victim_train_s": victim.seconds}, "wall_s": wall, "cpu_s": cpu,
            "budget_vs_victim": wall / victim.seconds if victim.seconds else None,
            "clean_data": (f"oracle: {len(clean)} truly clean training samples ({oracle:.0%}, chosen with the "
                           "poison mask)") if oracle else None,
            "info": {k: v for k, v in m.items() if k not in ("after", "before", "detection", "sizes", "timings",
                                                              "defense")},
            "git_commit": _commit(), "cores": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": _cpu(),
            "command": " ".join(sys.argv) if sys.argv else "", "date": today}
    out = _new_cell(results, attack, label)
    write_json(out, cell)
    log(f"{attack} {label}: CA {m['after']['ca']:.4f} ASR {m['after']['asr']:.4f} "
        f"({wall:.0f} s wall, {cpu:.0f} s CPU)")
    return out

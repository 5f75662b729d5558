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
                    "unlearn_history": m["unlearn_history"], "trigger_check": m.get("trigger_check"), "date": today}
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


# ------------------------------------------------------------------------------------------------ issue 14's tables

# The CGD paper's numbers (CIFAR-10, PreActResNet18, one GPU), for the columns beside ours. Table 1: CA / ASR in %.
PAPER_TABLE1 = {
    "badnets": {"none": (91.8, 93.8), "abl": (90.8, 1.1), "dbd": (92.1, 2.6), "asd": (92.0, 2.1),
                "d-br": (91.0, 1.5), "ep": (91.0, 0.8), "reback": (91.7, 4.3), "pipd": (92.9, 0.5),
                "mspc": (92.8, 0.3), "cgd-cpu": (92.8, 0.0)},
    "blend": {"none": (93.7, 99.8), "abl": (86.2, 4.4), "dbd": (93.0, 100.0), "asd": (93.0, 5.3),
              "d-br": (85.1, 0.0), "ep": (91.6, 96.1), "reback": (91.7, 2.4), "pipd": (93.1, 5.3),
              "mspc": (92.7, 0.7), "cgd-cpu": (93.2, 0.0)},
    "wanet": {"none": (90.6, 96.9), "abl": (89.9, 81.2), "dbd": (90.5, 2.6), "asd": (91.7, 8.8),
              "d-br": (84.3, 60.2), "ep": (89.8, 91.1), "reback": (90.2, 84.4), "pipd": (93.4, 11.4),
              "mspc": (93.0, 54.2), "cgd-cpu": (94.0, 0.3)},
    "ctrl": {"none": (93.6, 95.9), "abl": (88.2, 2.4), "dbd": (92.1, 57.8), "asd": (91.3, 89.3),
             "d-br": (90.5, 98.3), "ep": (92.3, 1.1), "reback": (91.4, 96.2), "pipd": (90.1, 12.6),
             "mspc": (91.8, 77.3), "cgd-cpu": (93.6, 0.1)},
    "sig": {"none": (93.6, 93.9), "abl": (88.2, 0.4), "dbd": (89.2, 97.5), "asd": (92.2, 99.5),
            "d-br": (91.3, 49.6), "ep": (92.1, 12.5), "reback": (87.4, 29.9), "pipd": (93.2, 13.5),
            "mspc": (91.0, 10.3), "cgd-cpu": (93.3, 0.0)},
    "flip": {"none": (89.9, 99.2), "abl": (84.8, 99.6), "dbd": (92.3, 1.6), "asd": (86.9, 62.2),
             "d-br": (83.9, 22.1), "ep": (89.9, 98.5), "reback": (90.0, 39.7), "pipd": (91.4, 66.9),
             "mspc": (91.6, 17.2), "cgd-cpu": (92.5, 0.5)},
    "bpp": {"none": (91.4, 99.2), "abl": (89.1, 99.8), "dbd": (92.4, 99.9), "asd": (92.5, 99.4), "d-br": (88.5, 85.5),
            "ep": (89.8, 4.6), "reback": (90.1, 1.8), "pipd": (93.1, 0.9), "mspc": (90.5, 2.8), "cgd-cpu": (94, 0.3)},
    "iab": {"none": (89.7, 94.9), "abl": (89.3, 83), "dbd": (91.3, 0), "asd": (92.3, 19.8), "d-br": (85.3, 84.8),
            "ep": (90.7, 1.6), "reback": (87.9, 1.7), "pipd": (92, 4), "mspc": (92.5, 5.3), "cgd-cpu": (93.3, 0.7)},
    "ssba": {"none": (93, 97.3), "abl": (88.6, 3.9), "dbd": (92.5, 2.4), "asd": (93.3, 7.1), "d-br": (83.1, 3),
             "ep": (92, 10.5), "reback": (85.1, 6.6), "pipd": (90.6, 17.2), "mspc": (90.9, 21.5),
             "cgd-cpu": (92.9, 0)},
    "lc": {"none": (93.4, 98.4), "abl": (82.1, 5.2), "dbd": (92.3, 98.3), "asd": (91.2, 9.8), "d-br": (91.3, 1.7),
           "ep": (92.5, 0.6), "reback": (91.4, 1), "pipd": (90.8, 3.7), "mspc": (90.8, 89.4), "cgd-cpu": (93.2, 0)},
    "gcb": {"none": (88.6, 100), "abl": (85.5, 100), "dbd": (91.2, 6.9), "asd": (90.9, 100), "d-br": (84.2, 100),
            "ep": (88.3, 99.9), "reback": (88.7, 71.6), "pipd": (92.5, 87.7), "mspc": (91.5, 23.9),
            "cgd-cpu": (92.3, 0)},
}
# Table 2: total seconds (victim training included where the method starts from the victim)
PAPER_ALIAS = {"asd-sc": "asd"}  # the paper's ASD seeds with ten truly clean images per class; ours with CGD's D_c
PAPER_TABLE2_TOTAL = {"abl": 2166, "dbd": 26971, "asd": 7293, "d-br": 5553, "ep": 1050, "reback": 1201,
                      "pipd": 2760, "mspc": 3193, "cgd-cpu": 1154}
# Table 3: category averages (CA / ASR in %) with 5 % truly clean data ("-oracle") and on CGD's D_c ("-sc")
PAPER_TABLE3 = {
    "classic": {"fp": ((92.1, 21.7), (93.3, 18.2)), "mcr": ((92.6, 51.1), (91.0, 1.4)),
                "i-bau": ((86.4, 16.5), (90.7, 25.7)), "anp": ((85.3, 21.4), (86.6, 18.8))},
    "dynamic": {"fp": ((92.8, 30.9), (94.0, 25.2)), "mcr": ((72.6, 47.9), (87.6, 24.3)),
                "i-bau": ((90.5, 30.3), (91.8, 6.2)), "anp": ((87.2, 1.1), (85.7, 0.6))},
    "clean-label": {"fp": ((92.4, 58.0), (93.2, 57.2)), "mcr": ((93.3, 82.5), (90.8, 5.7)),
                    "i-bau": ((88.7, 16.0), (90.8, 17.8)), "anp": ((86.5, 24.9), (87.5, 9.7))},
    "clean-image": {"fp": ((92.1, 17.7), (92.7, 15.8)), "mcr": ((92.9, 38.5), (91.3, 1.0)),
                    "i-bau": ((89.4, 6.6), (90.4, 43.4)), "anp": ((84.9, 0.3), (85.8, 0.1))},
}
ATTACK_CATEGORY = {"badnets": "classic", "blend": "classic", "wanet": "dynamic", "iab": "dynamic", "bpp": "dynamic",
                   "ssba": "dynamic", "sig": "clean-label", "lc": "clean-label", "ctrl": "clean-label",
                   "flip": "clean-image", "gcb": "clean-image"}
CLEAN_DATA_DEFENSES = ("fp", "mcr", "i-bau", "anp")
DEFENSE_ORDER = ("none", "cgd-cpu", "ep", "reback", "pipd", "abl", "d-br", "asd", "asd-sc", "dbd", "mspc",
                 *(f"{d}-{v}" for d in CLEAN_DATA_DEFENSES for v in ("oracle", "sc")))


def defense_seconds(cell: dict) -> float | None:
    """A cell's defense cost in wall seconds: its measured wall time (baseline cells), or for CGD's bench cells
    the sum of its stages (guide, split, unlearning)."""
    if cell.get("wall_s") is not None:
        return float(cell["wall_s"])
    t = {k: v for k, v in cell.get("timings", {}).items() if k.endswith("_s") and k != "victim_train_s"}
    return float(sum(t.values())) if t else None


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _triple(cell: dict | None) -> str:
    """"CA / ASR / clean→target" in % of a cell, "·" for a cell not run."""
    if cell is None:
        return "·"
    return f"{_pct(cell['ca'])} / {_pct(cell['asr'])} / {_pct(cell.get('clean_to_target'))}"


def baseline_tables(cells: list[dict]) -> str:
    """issue 14's three Markdown tables from benchmark cells (the JSON dicts `run_benchmark` and `run_baseline`
    write; for each (attack, defense) the last given wins): Table 1, CA / ASR / clean→target (%) per defense and
    attack, the paper's CA / ASR beside; Table 2, wall seconds per stage, × the victim's training time and CGD's
    cost as a share of each defense's, per attack; Table 3, the clean-data defenses with 5 % truly clean data
    (oracle) vs CGD's split-clean D_c (-SC), the paper's category average beside."""
    by = {(c["attack"], c["defense"]): c for c in cells}
    attacks_ = sorted({a for a, _ in by}, key=lambda a: (list(PAPER_TABLE1).index(a) if a in PAPER_TABLE1 else 99, a))
    present = {d for _, d in by}
    defenses_ = [d for d in DEFENSE_ORDER if d in present] + sorted(present - set(DEFENSE_ORDER))
    out = ["**Table 1** — CA / ASR / clean→target (%) on the same victim per attack; in brackets the paper's CA / ASR "
           "(PreActResNet18). CGD uses outside knowledge (the guide); the `-oracle` rows use 5 % truly clean data "
           "chosen with the poison mask (no user has it); `asd-sc` seeds ASD with ten images per class from CGD's D_c "
           "(the paper's ASD: ten truly clean ones, its number beside).", "",
           "| defense | " + " | ".join(attacks_) + " |", "|---" * (len(attacks_) + 1) + "|"]
    for d in defenses_:
        row = []
        for a in attacks_:
            c = by.get((a, d))
            paper = PAPER_TABLE1.get(a, {}).get(PAPER_ALIAS.get(d, d))
            row.append(_triple(c) + (f" ({paper[0]:g} / {paper[1]:g})" if paper else ""))
        out.append(f"| {d} | " + " | ".join(row) + " |")
    out += ["", "**Table 2** — cost, wall seconds (stages in brackets), × the victim's training time, and CGD's "
            "stages as a share of the defense's cost, same machine; paper total (one GPU, victim included where the "
            "method starts from it) beside.", "",
            "| defense | attack | wall s (stages) | CPU s | × victim | CGD / defense | paper total s |",
            "|---|---|---|---|---|---|---|"]
    for d in defenses_:
        if d == "none":
            continue
        for a in attacks_:
            c = by.get((a, d))
            if c is None:
                continue
            t = c.get("timings", {})
            victim_s = t.get("victim_train_s")
            s = defense_seconds(c)
            cgd = defense_seconds(by[(a, "cgd-cpu")]) if (a, "cgd-cpu") in by else None
            stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in t.items()
                               if k.endswith("_s") and k != "victim_train_s" and v >= 0.5)
            cols = [("–" if s is None else f"{s:.0f}") + (f" ({stages})" if stages else ""),
                    f"{c['cpu_s']:.0f}" if c.get("cpu_s") is not None else "–",
                    f"{s / victim_s:.2f}" if victim_s and s else "–",
                    f"{cgd / s:.2f}" if cgd and s and d != "cgd-cpu" else "–",
                    f"{PAPER_TABLE2_TOTAL[p]:,}" if (p := PAPER_ALIAS.get(d, d)) in PAPER_TABLE2_TOTAL else "–"]
            out.append(f"| {d} | {a} | " + " | ".join(cols) + " |")
    out += ["", "**Table 3** — clean-data defenses: 5 % truly clean data (oracle) vs CGD's split-clean D_c (-SC), "
            "CA / ASR / clean→target (%); the paper's category average (CA / ASR, oracle → SC) beside.", "",
            "| attack | defense | oracle | -SC | paper: oracle → SC |", "|---|---|---|---|---|"]
    for a in attacks_:
        for d in CLEAN_DATA_DEFENSES:
            o, sc = by.get((a, f"{d}-oracle")), by.get((a, f"{d}-sc"))
            if o is None and sc is None:
                continue
            cat = ATTACK_CATEGORY.get(a)
            p = PAPER_TABLE3.get(cat, {}).get(d)
            paper = f"{cat}: {p[0][0]:g} / {p[0][1]:g} → {p[1][0]:g} / {p[1][1]:g}" if p else "–"
            out.append(f"| {a} | {d} | {_triple(o)} | {_triple(sc)} | {paper} |")
    return "\n".join(out) + "\n"

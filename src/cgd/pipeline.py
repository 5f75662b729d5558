"""A defense run over a run directory: the victim, the defense (`cgd.defenses`), the metrics and the outputs,
resumable (used by the CLI and the benchmark)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import CGDError, defenses, models
from .config import dumps_toml, explicit, split_config, train_config
from .data import ImageSet
from .evaluate import ca_asr, clean_accuracy
from .io import atomic_write_text, load_arrays, prepare_dir, read_json, save_arrays, staged_outputs, write_json
from .poisoned import PoisonedSet
from .split import SplitConfig, detection_metrics
from .train import TrainConfig, TrainResult, train


def train_victim(images: np.ndarray, labels: np.ndarray, num_classes: int, config: TrainConfig,
                 out_dir: Path, arch: str = "fastnet", arch_params: dict | None = None,
                 class_names: list[str] | None = None) -> TrainResult:
    """Train (or resume, or reload a finished) victim in `out_dir`: `victim.safetensors`, `snapshot.safetensors`
    (epoch T), `loss_history.safetensors` and `victim.json` (recipe and timings). The models' sidecars record the
    image size and `class_names` (in label order), which `models.check_compatible` holds later data to."""
    out_dir = Path(out_dir)
    done = out_dir / "victim.json"
    params = models.for_input(arch, dict(arch_params or {}, num_classes=num_classes), images.shape[1:3])
    if done.exists():
        meta = json.loads(done.read_text())
        if meta["config"] == asdict(config) and meta["arch"] == arch:
            model = models.load_model(out_dir / "victim.safetensors")
            snap = models.load_model(out_dir / "snapshot.safetensors").state_dict() \
                if (out_dir / "snapshot.safetensors").exists() else None
            hist = load_arrays(out_dir / "loss_history.safetensors")["loss"]
            return TrainResult(model, snap, hist, meta["epoch_seconds"])
    torch.manual_seed(config.seed)  # the initial weights too are fixed by the seed
    model = models.get(arch, **params)
    result = train(model, images, labels, config, checkpoint_dir=out_dir / "checkpoint", desc="victim")
    trained_on = {"input_size": images.shape[1:3], "class_names": class_names}
    models.save_model(result.model, out_dir / "victim.safetensors", **trained_on)
    if result.snapshot is not None:
        snap_model = models.get(arch, **params)
        snap_model.load_state_dict(result.snapshot)
        models.save_model(snap_model, out_dir / "snapshot.safetensors", epoch=config.snapshot_epoch, **trained_on)
    save_arrays(out_dir / "loss_history.safetensors", loss=result.loss_history)
    write_json(done, {"arch": arch, "config": asdict(config), "epoch_seconds": result.epoch_seconds,
                      "threads": torch.get_num_threads()})
    return result


# ------------------------------------------------------------------------------------------------ defend

SPLIT_OUTPUTS = ("scores.csv", "split.json", "entropy_map.png")  # only a defense that splits the data writes these
OUTPUTS = ("config.toml", *SPLIT_OUTPUTS, "defended.safetensors", "defended.safetensors.json", "metrics.json",
           "report.md")
MIN_PER_CLASS = 10  # fewer training samples in a class leave the split's percentile ranks nothing to rank


def data_fingerprint(train_set: ImageSet) -> str:
    """SHA-256 of the images, labels and class names: what the intermediate results of a run belong to."""
    h = hashlib.sha256(np.ascontiguousarray(train_set.images).data)
    h.update(np.ascontiguousarray(train_set.labels, dtype=np.int64).data)
    h.update("\n".join(train_set.class_names).encode())
    return h.hexdigest()


def open_run(run_dir: Path, cfg_text: str, fingerprint: str, log) -> tuple[Path, dict | None]:
    """The run's work folder, ready: (work, None); or (work, its metrics) when `run_dir` already holds a finished
    run of this config on this data. Intermediate results of other data (another `fingerprint`) are dropped."""
    work = run_dir / ".work"
    stamp = work / "data.sha256"
    same_data = stamp.is_file() and stamp.read_text().strip() == fingerprint
    if same_data and (run_dir / "config.toml").is_file() and (run_dir / "config.toml").read_text() == cfg_text \
            and all((run_dir / f).exists() for f in run_outputs(run_dir)):
        log(f"{run_dir}: finished run with this config and data found; nothing to do")
        return work, read_json(run_dir / "metrics.json")
    prepare_dir(prepare_dir(run_dir, "run folder") / ".work", "run folder")
    if stamp.exists() and not same_data:  # (an unstamped folder is an older cgd's: kept)
        log(f"{run_dir}: intermediate results of other training data found: starting over")
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    atomic_write_text(stamp, fingerprint + "\n")
    atomic_write_text(work / "config.toml", cfg_text)
    return work, None


def run_outputs(run_dir: Path) -> tuple[str, ...]:
    """The files a finished run in `run_dir` has: every output, less the split's files when its metrics say the
    defense made no split (EP, FP); all of them while there are no metrics yet."""
    try:
        split = bool(read_json(run_dir / "metrics.json").get("sizes"))
    except (OSError, ValueError, CGDError):
        return OUTPUTS
    return OUTPUTS if split else tuple(f for f in OUTPUTS if f not in SPLIT_OUTPUTS)


def preflight(train_set: ImageSet, scfg: SplitConfig, victim: tuple[str, TrainConfig] | None) -> None:
    """Everything about the training set that can be checked before any work, with what the user must change.
    `victim`: the architecture and recipe of a victim to be trained here (None: the user gives the model)."""
    n, names = len(train_set), train_set.class_names
    if n == 0:
        raise CGDError("the training set is empty: CGD needs the (possibly poisoned) training images the model "
                       "was trained on")
    counts = np.bincount(train_set.labels, minlength=len(names))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise CGDError(f"every training label is {names[present[0]]!r}: CGD weighs each label against the "
                       "others and needs at least two classes")
    few = {names[c]: int(counts[c]) for c in np.flatnonzero(counts < MIN_PER_CLASS)}
    if few:
        raise CGDError(f"too few training samples in class(es) {few}: the split needs at least {MIN_PER_CLASS} "
                       "per class named in class_names; add images or leave those classes out of the data")
    if scfg.purify and n <= scfg.neighbours:
        raise CGDError(f"split.neighbours={scfg.neighbours} needs more than {scfg.neighbours} training "
                       f"samples; got {n}: lower split.neighbours or set split.purify=0")
    if victim is None:
        return
    arch, tcfg = victim
    smallest, (h, w) = models.MODELS.cls(arch).MIN_INPUT, train_set.images.shape[1:3]
    if min(h, w) < smallest:
        raise CGDError(f"the training images are {h}x{w} px but the victim network {arch} (victim.arch) needs at "
                       f"least {smallest}x{smallest} px; upscale the images")
    if scfg.window is not None and scfg.window[1] > tcfg.epochs:
        raise CGDError(f"split.model_score {scfg.score_spec!r} reaches past the victim's {tcfg.epochs} epochs "
                       "(victim.epochs)")


def defend(train_set: ImageSet, cfg: dict, run_dir: Path, *, guide=None, model_path: Path | None = None,
           snapshot_path: Path | None = None, poison_mask: np.ndarray | None = None,
           poisoned: PoisonedSet | None = None, test: ImageSet | None = None, extra_eval=None,
           victim: TrainResult | None = None, clean_indices: np.ndarray | None = None,
           guide_check: dict | None = None, log=print) -> dict:
    """Run the config's defense (`defense.name`, CGD by default) on `train_set` into `run_dir` (the README lists
    the files). Intermediate results live in `run_dir/.work` so an interrupted run resumes; the outputs appear
    only once everything succeeded. A `victim` already trained on `train_set` with the config's recipe may be
    passed in to be shared; `model_path` (and `snapshot_path`) give the user's own suspicious model instead.
    `clean_indices`: trusted clean training samples for the clean-data defenses (FP; the benchmark's oracle).
    `guide_check`: a `GuideCheck.to_dict()` of the guide, kept in metrics.json and warned about in report.md."""
    run_dir = Path(run_dir)
    defense = defenses.DEFENSES.cls(cfg["defense"]["name"]).from_config(cfg, guide=guide)  # checks the settings
    tcfg = train_config(cfg)
    preflight(train_set, split_config(cfg), None if model_path or victim else (cfg["victim"]["arch"], tcfg))
    if poison_mask is not None and len(poison_mask) != len(train_set):
        raise CGDError(f"poison mask has {len(poison_mask)} entries for {len(train_set)} samples")
    cfg_text = dumps_toml(explicit(cfg))  # the recipe spelled out: a changed recipe is a new run
    work, finished = open_run(run_dir, cfg_text, data_fingerprint(train_set), log)
    if finished is not None:
        return finished
    if model_path is not None:
        victim = given_victim(model_path, snapshot_path, train_set, log)
    elif victim is None:
        log("training the victim model (kept: epoch-T snapshot and per-sample losses)")
        victim = train_victim(train_set.images, train_set.labels, train_set.num_classes, tcfg, work / "victim",
                              cfg["victim"]["arch"], cfg["victim"]["arch_params"], class_names=train_set.class_names)
    r = defense.run(train_set, victim, defenses.Context(cfg["seed"], work, extra_eval, log, clean_indices))
    metrics = run_metrics(cfg["defense"]["name"], r, victim, poison_mask, poisoned, test)
    if guide_check is not None:
        metrics["guide_check"] = guide_check
    write_outputs(run_dir, work, cfg_text, r, metrics, train_set, poison_mask, cfg)
    return metrics


def run_metrics(name: str, r: defenses.DefenseResult, victim: TrainResult, poison_mask, poisoned, test) -> dict:
    """metrics.json: the split's sizes and detection against a known poison mask, wall seconds, and CA (and ASR)
    on the test set before and after."""
    timings = {**({"victim_train_s": victim.seconds} if victim.epoch_seconds else {}), **r.timings}
    detection = detection_metrics(poison_mask, r.split) if poison_mask is not None and r.split is not None else {}
    metrics = {"defense": name, **r.info, "timings": timings,
               "sizes": r.split.sizes() if r.split is not None else {}, "detection": detection}
    if test is not None:
        metrics["before"], metrics["after"] = (ca_asr(m, poisoned, test) if poisoned is not None else
                                               {"ca": clean_accuracy(m, test)} for m in (victim.model, r.model))
    return metrics


def given_victim(model_path: Path, snapshot_path: Path | None, train_set: ImageSet, log) -> TrainResult:
    """The user's suspicious model (and its snapshot), checked against the data; it has no training-loss history
    (the defense falls back to what it has, see `CGD.score_config`)."""
    model = models.load_model(model_path)
    snap = None
    if snapshot_path:
        snap_model = models.load_model(snapshot_path)
        mine, theirs = (m.cgd_spec for m in (model, snap_model))
        if (mine["name"], mine["params"]) != (theirs["name"], theirs["params"]):
            raise CGDError(f"snapshot {snapshot_path} is a {theirs['name']} {theirs['params']}, but model "
                           f"{model_path} is a {mine['name']} {mine['params']}: give the snapshot of that model")
        snap = snap_model.state_dict()
    models.check_compatible(model, train_set, f"model {model_path}", "the training data", log=log)
    return TrainResult(model, snap, np.zeros((0, len(train_set)), np.float32))


def write_outputs(run_dir: Path, work: Path, cfg_text: str, r: defenses.DefenseResult, metrics: dict,
                  train_set: ImageSet, poison_mask, cfg: dict) -> None:
    """Everything succeeded: stage the outputs in `work`, then move them into `run_dir` together (metrics.json
    last)."""
    from .report import entropy_map_png, scores_csv

    scfg, s = split_config(cfg), r.split
    with staged_outputs(run_dir, stage_in=work) as out:
        atomic_write_text(out / "config.toml", cfg_text)
        if s is not None:
            scores_csv(s, train_set.labels, poison_mask, out / "scores.csv")
            write_json(out / "split.json", {"sigma1": scfg.sigma1, "sigma2": scfg.sigma2,
                                            "model_score": metrics.get("model_score"), "sizes": s.sizes(),
                                            "clean": s.clean, "poison": s.poison, "mixed": s.mixed})
            entropy_map_png(s, poison_mask, out / "entropy_map.png", sigma1=scfg.sigma1, sigma2=scfg.sigma2,
                            title=f"{run_dir.parent.name}/{run_dir.name}")
        models.save_model(r.model, out / "defended.safetensors", input_size=train_set.images.shape[1:3],
                          class_names=train_set.class_names, defended_by=cfg["defense"]["name"],
                          recipe=cfg["unlearn"] if cfg["defense"]["name"] == "cgd" else cfg["defense"]["params"])
        atomic_write_text(out / "report.md", run_report(run_dir.name, cfg, metrics))
        write_json(out / "metrics.json", metrics)


def run_report(name: str, cfg: dict, m: dict) -> str:
    from .report import markdown_report

    sections = {"Result": {}, "Split": m["sizes"], "Detection against the known poison": m["detection"],
                "Wall time (s)": m["timings"]}
    for when in ("before", "after"):
        for k, v in m.get(when, {}).items():
            sections["Result"][f"{k.upper()} {when}"] = v
    defense = m.get("defense", cfg["defense"]["name"])
    notes = []
    if m.get("unlearn_history"):
        last = m["unlearn_history"][-1]
        notes.append(f"unlearning recipe `{cfg['unlearn']['recipe']}`, {last['epoch']} epoch(s)"
                     + (" (stopped early: held-out clean accuracy fell)" if m.get("stopped_early") else ""))
    if m.get("trigger_check"):
        notes.append("trigger check (the split's trigger estimate on clean images; the share sent to class "
                     f"{m['trigger_check'][0]['target']}): "
                     + "; ".join(f"λ_un {c['lambda_un']:g} → " + ("stopped by the held-out slice, not taken"
                                                                  if c.get("stopped_early") else f"{c['response']:.3f}")
                                 for c in m["trigger_check"]))
    if "model_score" in m:
        notes.append(f"model score: `{cfg['split']['model_score']}` (`{m['model_score']}`), "
                     f"guide: `{cfg['guide']['name']}`")
    if defense != "cgd":
        notes.append(f"defense `{defense}`, params {cfg['defense']['params'] or 'default'}; "
                     + ", ".join(f"{k}: {v}" for k, v in m.items() if k in ("u", "pruned", "clean_source", "clean",
                                                                            "selection")))
    if m.get("guide_check"):
        c = m["guide_check"]
        shift = (f"most-promoted class `{c['target']}`, shift {c['shift']:+.3f} under a universal perturbation of "
                 f"L_inf {c['eps'] * 255:.1f}/255")
        notes.append(f"**Warning: the guide check flags the guide as suspicious** ({shift}): it may carry a "
                     f"backdoor toward `{c['target']}`; purify or replace it before trusting this run (a clean but "
                     "non-robust guide can also be flagged)" if c["verdict"] == "suspicious" else
                     f"guide check: pass ({shift})")
    if m["sizes"]:
        notes.append("entropy map: ![entropy map](entropy_map.png)")
    return markdown_report(f"{'CGD' if defense == 'cgd' else defense.upper()} run {name}", sections, notes)

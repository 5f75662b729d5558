"""Composition of the stages into resumable steps over a run directory (used by the CLI and the benchmark)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import CGDError, models
from .poisoned import PoisonedSet
from .config import dumps_toml, explicit, split_config, train_config, unlearn_config
from .data import ImageSet
from .evaluate import ca_asr, clean_accuracy
from .io import atomic_write_text, load_arrays, prepare_dir, read_json, save_arrays, staged_outputs, write_json
from .split import Split, SplitConfig, detection_metrics, nll, split_by
from .train import TrainConfig, TrainResult, predict_logits, train
from .unlearn import unlearn


def train_victim(images: np.ndarray, labels: np.ndarray, num_classes: int, config: TrainConfig,
                 out_dir: Path, arch: str = "fastnet", arch_params: dict | None = None,
                 class_names: list[str] | None = None) -> TrainResult:
    """Train (or resume, or reload a finished) victim in `out_dir`: `victim.safetensors`, `snapshot.safetensors`
    (epoch T), `loss_history.safetensors` and `victim.json` (recipe and timings). The models' sidecars record the
    image size and `class_names` (in label order), which `models.check_compatible` holds later data to."""
    out_dir = Path(out_dir)
    done = out_dir / "victim.json"
    params = dict(arch_params or {}, num_classes=num_classes)
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

def model_losses(victim: TrainResult, arch_spec: dict, images: np.ndarray, labels: np.ndarray, scfg: SplitConfig
                 ) -> np.ndarray:
    """What the split scores the suspicious model by (`split.find_poison`'s `model_losses`): the (epochs, N)
    recorded training losses for "history" (free, no inference), else the per-sample NLL under the epoch-T
    snapshot ("snapshot", the paper) or the final model ("final", for a user who has neither)."""
    if scfg.model_score == "history":
        return victim.loss_history
    if scfg.model_score == "snapshot":
        if victim.snapshot is None:
            raise CGDError("model_score 'snapshot' needs the epoch-T snapshot; pass --snapshot or use 'final'")
        m = models.get(arch_spec["name"], **arch_spec["params"])
        m.load_state_dict(victim.snapshot)
    else:
        m = victim.model
    return nll(predict_logits(m, images, desc="model scores"), labels)


def _in_work(path: Path, n: int, compute, cols: int | None = None) -> np.ndarray:
    """An (N, …) array kept in the run's work folder: loaded when it holds `n` rows (of `cols` columns, if given),
    else computed and saved."""
    if path.exists():
        a = next(iter(load_arrays(path).values()), np.zeros(0))
        if len(a) == n and (cols is None or a.shape[1:] == (cols,)):
            return a
    a = compute()
    save_arrays(path, array=a)
    return a


def guide_logits(guide, images: np.ndarray, class_names: list[str], work: Path) -> np.ndarray:
    """The guide's logits for every training image, saved in the run's work folder (the guide caches too)."""
    def compute():
        g = np.asarray(guide.class_logits(images, class_names), dtype=np.float32)
        if g.shape != (len(images), len(class_names)):
            raise CGDError(f"guide returned logits of shape {g.shape}; expected {(len(images), len(class_names))}")
        if not np.isfinite(g).all():
            raise CGDError("guide returned NaN or infinite logits")
        return g

    return _in_work(work / "guide_logits.safetensors", len(images), compute, cols=len(class_names))


def guide_features(guide, images: np.ndarray, work: Path) -> np.ndarray:
    """The guide's image features (for the probe refinement), saved in the run's work folder."""
    def compute():
        if not hasattr(guide, "features"):
            raise CGDError(f"guide {getattr(guide, 'id', guide)!r} has no image features: "
                           "set split.refine_rounds = 0")
        f = np.asarray(guide.features(images), dtype=np.float32)
        if f.ndim != 2 or len(f) != len(images) or not np.isfinite(f).all():
            raise CGDError(f"guide features must be finite and (N, D); got shape {f.shape}")
        return f

    return _in_work(work / "guide_features.safetensors", len(images), compute)


def model_features(model, images: np.ndarray, work: Path) -> np.ndarray:
    """The suspicious model's penultimate features of every training image (for the neighbour purification)."""
    return _in_work(work / "model_features.safetensors", len(images),
                    lambda: predict_logits(model, images, desc="model features", features=True))


OUTPUTS = ("config.toml", "scores.csv", "split.json", "entropy_map.png", "defended.safetensors",
           "defended.safetensors.json", "metrics.json", "report.md")
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
            and all((run_dir / f).exists() for f in OUTPUTS):
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
           victim: TrainResult | None = None, log=print) -> dict:
    """Run CGD on `train_set` into `run_dir` (see design.md for the files). Intermediate results live in
    `run_dir/.work` so an interrupted run resumes; the outputs appear only once everything succeeded.
    A `victim` already trained on `train_set` (with the config's recipe) may be passed in to be shared."""
    from . import guides

    run_dir = Path(run_dir)
    ucfg = unlearn_config(cfg)  # validate everything cheap before touching the disk
    tcfg = train_config(cfg)
    scfg = split_config(cfg)
    preflight(train_set, scfg, None if model_path or victim else (cfg["victim"]["arch"], tcfg))
    if poison_mask is not None and len(poison_mask) != len(train_set):
        raise CGDError(f"poison mask has {len(poison_mask)} entries for {len(train_set)} samples")
    if guide is None:
        guide = guides.get(cfg["guide"]["name"], **cfg["guide"]["params"])
    cfg_text = dumps_toml(explicit(cfg))  # the recipe spelled out: a changed recipe is a new run
    work, finished = open_run(run_dir, cfg_text, data_fingerprint(train_set), log)
    if finished is not None:
        return finished
    labels, names, k = train_set.labels, train_set.class_names, train_set.num_classes
    timings: dict[str, float] = {}

    if victim is None and model_path is None:
        log("training the victim model (kept: epoch-T snapshot and per-sample losses)")
        victim = train_victim(train_set.images, labels, k, tcfg, work / "victim", cfg["victim"]["arch"],
                              cfg["victim"]["arch_params"], class_names=names)
    if victim is not None:
        arch = {"name": cfg["victim"]["arch"], "params": dict(cfg["victim"]["arch_params"], num_classes=k)}
        timings["victim_train_s"] = victim.seconds
    else:
        victim, scfg = given_victim(model_path, snapshot_path, train_set, scfg, log)
        arch = victim.model.cgd_spec

    t = time.perf_counter()
    log(f"scoring {len(labels)} samples with guide {getattr(guide, 'id', type(guide).__name__)}")
    g = guide_logits(guide, train_set.images, names, work)
    timings["guide_s"] = time.perf_counter() - t
    t = time.perf_counter()
    losses = model_losses(victim, arch, train_set.images, labels, scfg)
    timings["split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    s = split_by(scfg, labels, g, losses, seed=cfg["seed"],
                 guide_features=guide_features(guide, train_set.images, work) if scfg.refine_rounds else None,
                 model_features=model_features(victim.model, train_set.images, work) if scfg.purify else None)
    timings["refine_split_s"] = time.perf_counter() - t
    how = s.info["model_score"] if scfg.model_score == "history" else scfg.model_score
    log(f"model score {how}; split: {s.sizes()}")

    res = unlearn(victim.model, train_set.images, labels, s, s.guide_logits, ucfg, k, extra_eval=extra_eval)
    timings["unlearn_s"] = res.seconds
    metrics = {"sizes": s.sizes(), "model_score": how, "timings": timings,
               "detection": detection_metrics(poison_mask, s) if poison_mask is not None else {},
               "unlearn_history": res.history, "stopped_early": res.stopped_early}
    if test is not None:
        metrics["before"], metrics["after"] = (ca_asr(m, poisoned, test) if poisoned is not None else
                                               {"ca": clean_accuracy(m, test)} for m in (victim.model, res.model))
    write_outputs(run_dir, work, cfg_text, s, metrics, res.model, train_set, poison_mask, scfg, report_cfg=cfg)
    return metrics


def given_victim(model_path: Path, snapshot_path: Path | None, train_set: ImageSet, scfg: SplitConfig, log
                 ) -> tuple[TrainResult, SplitConfig]:
    """The user's suspicious model (and its snapshot), checked against the data; without a training-loss history
    (or a snapshot) the split falls back to scoring with the snapshot (or the final model)."""
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
    if scfg.model_score == "history" or (scfg.model_score == "snapshot" and snap is None):
        fallback = "snapshot" if snap is not None else "final"
        log(f"a given model has no training-loss history{'' if snap is not None else ' or snapshot'}: "
            f"scoring with the {fallback} model instead of {scfg.score_spec!r}")
        scfg = replace(scfg, model_score=fallback, window=None)
    return TrainResult(model, snap, np.zeros((0, len(train_set)), np.float32)), scfg


def write_outputs(run_dir: Path, work: Path, cfg_text: str, s: Split, metrics: dict, defended, train_set: ImageSet,
                  poison_mask, scfg: SplitConfig, report_cfg: dict) -> None:
    """Everything succeeded: stage the outputs in `work`, then move them into `run_dir` together (metrics.json
    last)."""
    from .report import entropy_map_png, scores_csv

    with staged_outputs(run_dir, stage_in=work) as out:
        atomic_write_text(out / "config.toml", cfg_text)
        scores_csv(s, train_set.labels, poison_mask, out / "scores.csv")
        write_json(out / "split.json", {"sigma1": scfg.sigma1, "sigma2": scfg.sigma2,
                                        "model_score": metrics["model_score"], "sizes": s.sizes(),
                                        "clean": s.clean, "poison": s.poison, "mixed": s.mixed})
        entropy_map_png(s, poison_mask, out / "entropy_map.png", title=f"{run_dir.parent.name}/{run_dir.name}",
                        sigma1=scfg.sigma1, sigma2=scfg.sigma2)
        models.save_model(defended, out / "defended.safetensors", input_size=train_set.images.shape[1:3],
                          class_names=train_set.class_names, defended_by="cgd", recipe=report_cfg["unlearn"])
        atomic_write_text(out / "report.md", run_report(run_dir.name, report_cfg, metrics))
        write_json(out / "metrics.json", metrics)


def run_report(name: str, cfg: dict, m: dict) -> str:
    from .report import markdown_report

    sections = {"Result": {}, "Split": m["sizes"], "Detection against the known poison": m["detection"],
                "Wall time (s)": m["timings"]}
    for when in ("before", "after"):
        for k, v in m.get(when, {}).items():
            sections["Result"][f"{k.upper()} {when}"] = v
    last = m["unlearn_history"][-1]
    notes = [f"unlearning recipe `{cfg['unlearn']['recipe']}`, {last['epoch']} epoch(s)"
             + (" (stopped early: held-out clean accuracy fell)" if m["stopped_early"] else ""),
             f"model score: `{cfg['split']['model_score']}` (`{m['model_score']}`), guide: `{cfg['guide']['name']}`",
             "entropy map: ![entropy map](entropy_map.png)"]
    return markdown_report(f"CGD run {name}", sections, notes)

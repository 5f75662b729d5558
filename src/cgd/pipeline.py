"""Composition of the stages into resumable steps over a run directory (used by the CLI and the benchmark)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import CGDError, models
from .attacks import PoisonedSet
from .config import dumps_toml, explicit, train_config, unlearn_config
from .data import ImageSet
from .evaluate import ca_asr, clean_accuracy
from .io import atomic_write_text, load_arrays, read_json, save_arrays, write_json
from .refine import probe_logits
from .split import (detection_metrics, history_window, nearest_neighbours, neighbour_poison_fraction, nll, purify,
                    split)
from .train import TrainConfig, TrainResult, predict_logits, train
from .unlearn import unlearn


def train_victim(images: np.ndarray, labels: np.ndarray, num_classes: int, config: TrainConfig,
                 out_dir: Path, arch: str = "fastnet", arch_params: dict | None = None) -> TrainResult:
    """Train (or resume, or reload a finished) victim in `out_dir`: `victim.safetensors`, `snapshot.safetensors`
    (epoch T), `loss_history.safetensors` and `victim.json` (recipe and timings)."""
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
    models.save_model(result.model, out_dir / "victim.safetensors")
    if result.snapshot is not None:
        snap_model = models.get(arch, **params)
        snap_model.load_state_dict(result.snapshot)
        models.save_model(snap_model, out_dir / "snapshot.safetensors", epoch=config.snapshot_epoch)
    save_arrays(out_dir / "loss_history.safetensors", loss=result.loss_history)
    write_json(done, {"arch": arch, "config": asdict(config), "epoch_seconds": result.epoch_seconds,
                      "threads": torch.get_num_threads()})
    return result


# ------------------------------------------------------------------------------------------------ defend

def resolve_model_score(how: str, victim: TrainResult, guide_nll: np.ndarray, sigma2: float,
                        rule: str = "level") -> str:
    """"history:auto" → "history:A-B" with the window `split.history_window` finds (by `rule`, "level" unless
    `split.window_rule` says otherwise); other values unchanged."""
    if how != "history:auto":
        return how
    a, b = history_window(victim.loss_history, guide_nll, sigma2, rule=rule)
    return f"history:{a}-{b}"


def model_scores(victim: TrainResult, arch_spec: dict, images: np.ndarray, labels: np.ndarray, how: str
                 ) -> np.ndarray:
    """Per-sample model NLL used by the split.

    * "snapshot": NLL under the epoch-T snapshot (the paper);
    * "final": NLL under the final model (for a user who has no snapshot);
    * "history:A-B": mean recorded training loss over epochs A..B (1-based, inclusive) — free, no inference;
    ("history:auto" is resolved by `resolve_model_score` first.)
    """
    if how.startswith("history:"):
        a, b = (int(v) for v in how.split(":", 1)[1].split("-"))
        if not 1 <= a <= b <= len(victim.loss_history):
            raise CGDError(f"model_score {how!r}: epochs must lie in 1..{len(victim.loss_history)}")
        return victim.loss_history[a - 1:b].mean(axis=0).astype(np.float64)
    if how == "snapshot":
        if victim.snapshot is None:
            raise CGDError("model_score 'snapshot' needs the epoch-T snapshot; pass --snapshot or use 'final'")
        m = models.get(arch_spec["name"], **arch_spec["params"])
        m.load_state_dict(victim.snapshot)
    elif how == "final":
        m = victim.model
    else:
        raise CGDError(f"unknown model_score {how!r}: use snapshot, final or history:A-B")
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
                           "set split.refine = 'none'")
        f = np.asarray(guide.features(images), dtype=np.float32)
        if f.ndim != 2 or len(f) != len(images) or not np.isfinite(f).all():
            raise CGDError(f"guide features must be finite and (N, D); got shape {f.shape}")
        return f

    return _in_work(work / "guide_features.safetensors", len(images), compute)


def model_features(model, images: np.ndarray, work: Path) -> np.ndarray:
    """The suspicious model's penultimate features of every training image (for the neighbour purification)."""
    return _in_work(work / "model_features.safetensors", len(images),
                    lambda: predict_logits(model, images, desc="model features", features=True))


def score_and_split(labels: np.ndarray, g: np.ndarray, model_nll: np.ndarray, scfg: dict, num_classes: int,
                    features=None, model_features=None, seed: int = 0):
    """The split from guide logits and model NLL, with the cpu recipe's two additions (docs/benchmarks.md):

    * `purify = q` (0 < q < 1) keeps in D_c, per class, the share q trusted most (see `split.purify`), using the
      suspicious model's features (`model_features()`) to find D_c samples that sit among D_p;
    * `refine = "probe"` sharpens the guide by a linear probe on its own features (`features()`), fitted on the
      current D_c (out of fold), `refine_rounds` times, re-splitting after each.
    Returns (split, guide logits)."""
    keep = scfg.get("purify", 0)
    if scfg.get("refine", "none") not in ("probe", "none"):
        raise CGDError(f"unknown split.refine {scfg['refine']!r}: use 'probe' or 'none'")
    if not 0 <= keep <= 1:
        raise CGDError(f"split.purify must be 0 (off) or a share in (0, 1]; got {keep}")
    near = nearest_neighbours(model_features(), scfg.get("neighbours", 20)) if keep else None

    def one_split(guide):
        s = split(nll(guide, labels), model_nll, scfg["sigma1"], scfg["sigma2"])
        if keep:
            s = purify(s, neighbour_poison_fraction(near, labels, s.poison), labels, keep)
        return s

    s = one_split(g)
    rounds = scfg.get("refine_rounds", 1) if scfg.get("refine", "none") == "probe" else 0
    for _ in range(rounds):
        g = probe_logits(features(), labels, s.clean, num_classes, seed=seed)
        s = one_split(g)
    return s, g


OUTPUTS = ("scores.csv", "split.json", "entropy_map.png", "defended.safetensors", "metrics.json", "report.md")


def defend(train_set: ImageSet, cfg: dict, run_dir: Path, *, guide=None, model_path: Path | None = None,
           snapshot_path: Path | None = None, poison_mask: np.ndarray | None = None,
           poisoned: PoisonedSet | None = None, test: ImageSet | None = None, extra_eval=None,
           victim: TrainResult | None = None, log=print) -> dict:
    """Run CGD on `train_set` into `run_dir` (see design.md for the files). Intermediate results live in
    `run_dir/.work` so an interrupted run resumes; the outputs appear only once everything succeeded.
    A `victim` already trained on `train_set` (with the config's recipe) may be passed in to be shared."""
    from . import guides
    from .report import entropy_map_png, scores_csv

    run_dir = Path(run_dir)
    ucfg = unlearn_config(cfg)  # validate everything cheap before touching the disk
    tcfg = train_config(cfg)
    scfg = cfg["split"]
    if guide is None:
        guide = guides.get(cfg["guide"]["name"], **cfg["guide"]["params"])
    if poison_mask is not None and len(poison_mask) != len(train_set):
        raise CGDError(f"poison mask has {len(poison_mask)} entries for {len(train_set)} samples")
    cfg_text = dumps_toml(explicit(cfg))  # the recipe spelled out: a changed recipe is a new run
    if (run_dir / "metrics.json").exists() and (run_dir / "config.toml").exists() \
            and (run_dir / "config.toml").read_text() == cfg_text and all((run_dir / f).exists() for f in OUTPUTS):
        log(f"{run_dir}: finished run with this config found; nothing to do")
        return read_json(run_dir / "metrics.json")
    work = run_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "config.toml", cfg_text)
    labels, names, k = train_set.labels, train_set.class_names, train_set.num_classes
    timings: dict[str, float] = {}

    if model_path is None:
        arch = {"name": cfg["victim"]["arch"], "params": dict(cfg["victim"]["arch_params"], num_classes=k)}
    if victim is not None:
        timings["victim_train_s"] = victim.seconds
    elif model_path is None:
        log("training the victim model (kept: epoch-T snapshot and per-sample losses)")
        victim = train_victim(train_set.images, labels, k, tcfg, work / "victim", cfg["victim"]["arch"],
                              cfg["victim"]["arch_params"])
        timings["victim_train_s"] = victim.seconds
    else:
        model = models.load_model(model_path)
        arch = model.cgd_spec
        snap = models.load_model(snapshot_path).state_dict() if snapshot_path else None
        victim = TrainResult(model, snap, np.zeros((0, len(labels)), np.float32))
        wanted = scfg["model_score"]
        if wanted.startswith("history:") or (wanted == "snapshot" and snap is None):
            fallback = "snapshot" if snap is not None else "final"
            log(f"a given model has no training-loss history{'' if snap is not None else ' or snapshot'}: "
                f"scoring with the {fallback} model instead of {wanted!r}")
            scfg = dict(scfg, model_score=fallback)
    n_out = victim.model(torch.zeros(1, 3, *train_set.images.shape[1:3]).contiguous(
        memory_format=torch.channels_last)).shape[1] if model_path else k
    if n_out != k:
        raise CGDError(f"the model has {n_out} outputs but the data has {k} class names")

    t = time.perf_counter()
    log(f"scoring {len(labels)} samples with guide {getattr(guide, 'id', type(guide).__name__)}")
    g = guide_logits(guide, train_set.images, names, work)
    timings["guide_s"] = time.perf_counter() - t
    t = time.perf_counter()
    how = resolve_model_score(scfg["model_score"], victim, nll(g, labels), scfg["sigma2"],
                              scfg.get("window_rule", "level"))
    if how != scfg["model_score"]:
        log(f"model score {scfg['model_score']}: {how}")
    model_nll = model_scores(victim, arch, train_set.images, labels, how)
    timings["split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    s, g = score_and_split(labels, g, model_nll, scfg, k, lambda: guide_features(guide, train_set.images, work),
                           lambda: model_features(victim.model, train_set.images, work), seed=cfg["seed"])
    timings["refine_split_s"] = time.perf_counter() - t
    log(f"split: {s.sizes()}")
    det = detection_metrics(poison_mask, s) if poison_mask is not None else {}

    res = unlearn(victim.model, train_set.images, labels, s, g, ucfg, k, extra_eval=extra_eval)
    timings["unlearn_s"] = res.seconds
    metrics = {"sizes": s.sizes(), "model_score": how, "detection": det, "timings": timings,
               "unlearn_history": res.history, "stopped_early": res.stopped_early}
    if poisoned is not None and test is not None:
        metrics["before"] = ca_asr(victim.model, poisoned, test)
        metrics["after"] = ca_asr(res.model, poisoned, test)
    elif test is not None:
        metrics["before"] = {"ca": clean_accuracy(victim.model, test)}
        metrics["after"] = {"ca": clean_accuracy(res.model, test)}

    # Everything succeeded: write the outputs, each atomically, metrics.json last.
    atomic_write_text(run_dir / "config.toml", cfg_text)
    scores_csv(s, labels, poison_mask, run_dir / "scores.csv")
    write_json(run_dir / "split.json", {"sigma1": scfg["sigma1"], "sigma2": scfg["sigma2"],
                                        "model_score": how, "sizes": s.sizes(),
                                        "clean": s.clean, "poison": s.poison, "mixed": s.mixed})
    entropy_map_png(s, poison_mask, run_dir / "entropy_map.png", title=f"{run_dir.parent.name}/{run_dir.name}",
                    sigma1=scfg["sigma1"], sigma2=scfg["sigma2"])
    models.save_model(res.model, run_dir / "defended.safetensors", defended_by="cgd", recipe=cfg["unlearn"])
    atomic_write_text(run_dir / "report.md", run_report(run_dir.name, cfg, metrics))
    write_json(run_dir / "metrics.json", metrics)
    return metrics


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

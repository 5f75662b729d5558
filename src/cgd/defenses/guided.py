"""CGD as a defense (paper §4): score every sample with the guide and the suspicious model, split, unlearn.

`CGD.run` is what `cgd defend` runs; `defend` runs the same on a classifier of the user's own (any `nn.Module`,
their own input normalisation), in memory.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..io import load_arrays, save_arrays
from ..split import SplitConfig, nll, recheck, split_by
from ..tensors import denormalize, predict_logits
from ..train import TrainResult
from ..unlearn import UnlearnConfig, recipe, unlearn_checked
from .base import DEFENSES, Context, Defense, DefenseResult, timed


@DEFENSES.register("cgd")
class CGD(Defense):
    """CLIP-guided defense: a guide's zero-shot view and the model's early losses split the data; the model
    relearns the clean part, unlearns the poisoned part and distils the guide's view of it."""

    name = "cgd"

    def __init__(self, guide="imagenet-text", guide_params: dict | None = None, split: SplitConfig | None = None,
                 unlearn: UnlearnConfig | None = None):
        from .. import guides

        self.guide = guides.get(guide, **(guide_params or {})) if isinstance(guide, str) else guide
        self.split = split or SplitConfig()  # both default to the cpu recipe, as `cgd defend` runs it
        self.unlearn = unlearn or recipe("cpu")

    @classmethod
    def from_config(cls, cfg: dict, guide=None, **objects) -> "CGD":
        from ..config import split_config, unlearn_config

        if cfg["defense"]["name"] == cls.name and cfg["defense"]["params"]:
            raise CGDError(f"defense.params {sorted(cfg['defense']['params'])}: CGD takes its settings from the "
                           "guide, split and unlearn sections, e.g. --set split.sigma1=0.3")
        return cls(guide if guide is not None else cfg["guide"]["name"], cfg["guide"]["params"],
                   split_config(cfg), unlearn_config(cfg))

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        s, how = self.split_data(train, victim, context, timings)
        res = self._unlearn(train, victim, s, context)
        timings["unlearn_s"] = res.seconds
        info = {}
        if self.split.recheck:
            with timed(timings, "recheck_s"):
                s, res, info = self._recheck(train, victim, s, res, context)
        return DefenseResult(res.model, s, timings, {"model_score": how, "unlearn_history": res.history,
                                                     "stopped_early": res.stopped_early,
                                                     "trigger_check": res.checks,
                                                     "skipped": s.info["skipped"],
                                                     "window_shares": s.info.get("window_shares"), **info})

    def _unlearn(self, train: ImageSet, victim: TrainResult, s, context: Context):
        return unlearn_checked(victim.model, train.images, train.labels, s, s.guide_logits, self.unlearn,
                               train.num_classes, log=context.log, extra_eval=context.extra_eval, groups=train.groups)

    def _recheck(self, train: ImageSet, victim: TrainResult, s, first, context: Context):
        """`split.recheck`: the samples outside D_p whose given label the first pass unfitted join D_p
        (`cgd.split.recheck`), and unlearning starts again from the victim on that split."""
        outside = np.setdiff1d(np.arange(len(train.labels)), s.poison)  # D_p's own shifts are never read
        x, y = train.images[outside], train.labels[outside]
        shift = np.zeros(len(train.labels))
        shift[outside] = (nll(predict_logits(first.model, x, desc="recheck (unlearned)"), y)
                          - nll(predict_logits(victim.model, x, desc="recheck (victim)"), y))
        s, flagged = recheck(s, shift, self.split.recheck, train.labels, self.split.min_clean_per_class)
        context.log(f"recheck: {len(flagged)} samples outside D_p lost their label's fit; split: {s.sizes()}")
        res = self._unlearn(train, victim, s, context) if len(flagged) else first
        return s, res, {"recheck": s.info["recheck"], "first_pass_history": first.history}

    def split_data(self, train: ImageSet, victim: TrainResult, context: Context, timings: dict[str, float]):
        """CGD's scoring stages alone (guide, model score, split; no unlearning): (the split, the model score
        used). Wall seconds per stage are added to `timings`. FP-SC and the other -SC baselines train on its
        `clean` part."""
        images, labels, names, work = train.images, train.labels, train.class_names, context.work
        scfg = self.score_config(victim, context.log)
        with timed(timings, "guide_s"):
            context.log(f"scoring {len(labels)} samples with guide {getattr(self.guide, 'id', self.guide)}")
            g = guide_logits(self.guide, images, names, work)
        with timed(timings, "split_s"):
            losses = model_losses(victim, images, labels, scfg)
        with timed(timings, "refine_split_s"):
            has_features = hasattr(victim.model, "features")
            s = split_by(scfg, labels, g, losses, seed=context.seed, groups=train.groups,
                         guide_features=guide_features(self.guide, images, work) if scfg.refine_rounds else None,
                         model_features=model_features(victim.model, images, work)
                         if scfg.purify and has_features else None)
        how = s.info["model_score"] if scfg.model_score == "history" else scfg.model_score
        context.log(f"model score {how}; split: {s.sizes()}")
        return s, how

    def score_config(self, victim: TrainResult, log) -> SplitConfig:
        """The split settings this victim allows: without a training-loss history (or a snapshot) the model is
        scored with the snapshot (or the final model) instead."""
        scfg, snap = self.split, victim.snapshot is not None
        if (scfg.model_score == "history" and len(victim.loss_history) == 0) or \
                (scfg.model_score == "snapshot" and not snap):
            fallback = "snapshot" if snap else "final"
            log(f"the model comes without a training-loss history{'' if snap else ' or snapshot'}: "
                f"scoring with the {fallback} model instead of {scfg.score_spec!r}")
            scfg = replace(scfg, model_score=fallback, window=None)
        return scfg


class SplitClean:
    """Makes a clean-data defense its "-sc" variant (CGD paper §4.3): its clean data is CGD's split-clean D_c,
    made by CGD's scoring stages alone (guide, model score, split; no unlearning); the split's D_p is reported
    as the samples flagged. Listed first among the bases: `class FPSC(SplitClean, FP)`."""

    clean_source = "split-clean"
    sc_max_clean: int | None = None  # the variant's default cap on D_c (`max_clean`), set where the budget needs one

    def __init__(self, cgd: CGD | None = None, **params):
        if self.sc_max_clean is not None:
            params.setdefault("max_clean", self.sc_max_clean)
        super().__init__(**params)
        self.cgd = cgd

    @classmethod
    def from_config(cls, cfg: dict, guide=None, **objects):
        return cls(CGD.from_config(cfg, guide=guide), **cfg["defense"]["params"])

    def trusted_clean(self, train: ImageSet, victim: TrainResult, context: Context, timings: dict):
        s, _ = (self.cgd or CGD()).split_data(train, victim, context, timings)
        return s.clean, s


# ------------------------------------------------------------------------------------------------ scores

def model_losses(victim: TrainResult, images: np.ndarray, labels: np.ndarray, scfg: SplitConfig) -> np.ndarray:
    """What the split scores the suspicious model by (`find_poison`'s `model_losses`): the (epochs, N) recorded
    training losses for "history" (free, no inference), else the per-sample NLL under the epoch-T snapshot
    ("snapshot", the paper) or the final model ("final", for a user who has neither)."""
    if scfg.model_score == "history":
        return victim.loss_history
    m = victim.model
    if scfg.model_score == "snapshot":
        m = copy.deepcopy(victim.model)
        m.load_state_dict(victim.snapshot)
    return nll(predict_logits(m, images, desc="model scores"), labels)


def _in_work(path: Path | None, n: int, compute, cols: int | None = None) -> np.ndarray:
    """An (N, …) array kept in the run's work folder (when there is one): loaded when it holds `n` rows (of `cols`
    columns, if given), else computed and saved."""
    if path is not None and path.exists():
        a = next(iter(load_arrays(path).values()), np.zeros(0))
        if len(a) == n and (cols is None or a.shape[1:] == (cols,)):
            return a
    a = compute()
    if path is not None:
        save_arrays(path, array=a)
    return a


def _at(work: Path | None, name: str) -> Path | None:
    return None if work is None else work / name


def guide_logits(guide, images: np.ndarray, class_names: list[str], work: Path | None) -> np.ndarray:
    """The guide's logits for every training image, kept in the run's work folder (the guide caches too)."""
    def compute():
        g = np.asarray(guide.class_logits(images, class_names), dtype=np.float32)
        if g.shape != (len(images), len(class_names)):
            raise CGDError(f"guide returned logits of shape {g.shape}; expected {(len(images), len(class_names))}")
        if not np.isfinite(g).all():
            raise CGDError("guide returned NaN or infinite logits")
        return g

    return _in_work(_at(work, "guide_logits.safetensors"), len(images), compute, cols=len(class_names))


def guide_features(guide, images: np.ndarray, work: Path | None) -> np.ndarray:
    """The guide's image features (for the probe refinement), kept in the run's work folder."""
    def compute():
        if not hasattr(guide, "features"):
            raise CGDError(f"guide {getattr(guide, 'id', guide)!r} has no image features: "
                           "set split.refine_rounds = 0")
        f = np.asarray(guide.features(images), dtype=np.float32)
        if f.ndim != 2 or len(f) != len(images) or not np.isfinite(f).all():
            raise CGDError(f"guide features must be finite and (N, D); got shape {f.shape}")
        return f

    return _in_work(_at(work, "guide_features.safetensors"), len(images), compute)


def model_features(model, images: np.ndarray, work: Path | None) -> np.ndarray:
    """The suspicious model's penultimate features of every training image (for the neighbour purification)."""
    return _in_work(_at(work, "model_features.safetensors"), len(images),
                    lambda: predict_logits(model, images, desc="model features", features=True))


# ------------------------------------------------------------------------------------------------ a user's model

class Adapted(nn.Module):
    """A user's classifier behind cgd's input convention: cgd hands models uint8 images as normalised float
    (N, 3, H, W) tensors (`tensors.to_input`); this undoes that to [0, 1] and applies the user's `preprocess`."""

    def __init__(self, model: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.inner = model
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.user_input(x))

    def user_input(self, x: torch.Tensor) -> torch.Tensor:
        x = denormalize(x)
        return self.preprocess(x) if self.preprocess is not None else x


class AdaptedWithFeatures(Adapted):
    """`Adapted`, with penultimate features taken as the input of the submodule named `layer` (e.g. the final
    linear layer "fc"), or from `layer(model, x)` when it is a function."""

    def __init__(self, model, preprocess, layer: str | Callable):
        super().__init__(model, preprocess)
        self.layer = layer
        if isinstance(layer, str) and layer not in dict(model.named_modules()):
            raise CGDError(f"features={layer!r}: the model has no submodule of that name; "
                           f"its last ones are {[n for n, _ in model.named_modules()][-5:]}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.user_input(x)
        if callable(self.layer):
            return self.layer(self.inner, x).flatten(1)
        seen = []
        hook = dict(self.inner.named_modules())[self.layer].register_forward_pre_hook(
            lambda mod, args: seen.append(args[0]))
        try:
            self.inner(x)
        finally:
            hook.remove()
        return seen[0].flatten(1)


def defend(model: nn.Module, images, labels, class_names, *, guide="imagenet-text", loss_history=None,
           snapshot: dict | None = None, preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
           features: str | Callable | None = None, split: SplitConfig | None = None,
           unlearn: UnlearnConfig | None = None, groups=None, seed: int = 0,
           log: Callable[[str], None] | None = None) -> DefenseResult:
    """Defend a classifier of your own with CGD, in memory: the recipe `cgd defend` runs, on your model.

    Parameters
    ----------
    model : torch.nn.Module
        The suspicious classifier (CPU), trained on `images`; maps a batch of preprocessed images to logits over
        `class_names`. It is not modified: the defended copy is returned.
    images : np.ndarray
        (N, H, W, 3) uint8 training images, the (possibly poisoned) data the model was trained on.
    labels : np.ndarray
        (N,) integer labels in 0..len(class_names)-1.
    class_names : list of str
        The class names in label order; the guide reads them as text.
    guide : str or guide object, default "imagenet-text"
        A registered guide name (`cgd.guides.list()`) or an object with `class_logits(images, class_names)`.
    loss_history : np.ndarray, optional
        (epochs, N) per-sample training losses (`cgd.LossRecorder`); the recommended model score. Without it the
        model is scored by its NLL at `snapshot` (if given) or at the end of training, which catches less poison.
    snapshot : dict, optional
        The model's state dict early in training (the paper's epoch T), scored when there is no loss history.
    preprocess : callable, optional
        Maps a float (B, 3, H, W) batch in [0, 1] to your model's input (e.g. your normalisation); identity if
        omitted.
    features : str or callable, optional
        Where the model's penultimate features are: the name of its final classification layer (its input is
        taken, e.g. "fc") or `features(model, x) -> (B, D)`. Without it the neighbour purification is skipped.
    split, unlearn : SplitConfig, UnlearnConfig, optional
        The split and unlearning settings; default: the cpu recipe of `cgd defend`.
    groups : np.ndarray, optional
        (N,) integer ids: samples sharing one are views of one physical object (GTSRB's tracks); the probe's
        folds and the held-out slice that watches clean accuracy during unlearning then take whole groups, and a
        sample's neighbours in the purification exclude its own group.
    seed : int, default 0
        Seed of the split's random steps.
    log : callable, optional
        Receives progress lines (e.g. `print`).

    Returns
    -------
    DefenseResult
        `.model` (the defended copy of `model`), `.split` (the clean / poisoned / mixed indices and scores),
        `.timings` and `.info` (the model score used, the unlearning history, skipped steps).
    """
    train = ImageSet(np.asarray(images).view(), np.asarray(labels, dtype=np.int64).copy(), list(class_names),
                     None if groups is None else np.asarray(groups).copy())
    adapted = Adapted(model, preprocess) if features is None else AdaptedWithFeatures(model, preprocess, features)
    out = predict_logits(adapted, train.images[:2])
    if out.shape != (min(2, len(train)), train.num_classes):
        raise CGDError(f"the model maps 2 images to an output of shape {out.shape}; expected logits over the "
                       f"{train.num_classes} class_names, ({min(2, len(train))}, {train.num_classes})")
    history = np.zeros((0, len(train)), np.float32) if loss_history is None else np.asarray(loss_history)
    snap = None if snapshot is None else {f"inner.{k}": v for k, v in snapshot.items()}
    cgd = CGD(guide, split=split, unlearn=unlearn or recipe("cpu", seed=seed))
    r = cgd.run(train, TrainResult(adapted, snap, history), Context(seed=seed, log=log or (lambda s: None)))
    r.model = r.model.inner.eval()
    return r

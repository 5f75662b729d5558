"""PIPD, Progressive Isolation of Poisoned Data (Chen, Wu & Zhou, "Progressive Poisoned Data Isolation for
Training-Time Backdoor Defense", AAAI 2024; official code RorschachChen/PIPD, main_badnets.py and
none/my_compromised_detection.py): a poisoned-data defense that reads the poison off the victim's convolutional
activations. From a small preset of likely poison and a preset of likely clean samples it ranks every conv channel
by how far the poison preset's largest activation rises above the clean preset's (mean + 3σ), sums each image's
activations over the top channels of every layer, and splits the sums in two by a natural break (Jenks): the upper
class is the poison. Over rounds the clean preset grows by every sample not flagged, so the clean statistics get
sharper. The removal (the paper's "selective training") is not in the public code; ours is described in the class
docstring."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..schema import check_types
from ..split import Split, jenks_two_classes, percentile_rank
from ..tensors import AUGMENTS, one_view, to_input
from ..train import TrainConfig, TrainResult, make_optimizer
from .abl import per_sample_loss, stage
from .base import DEFENSES, Context, Defense, DefenseResult, timed

PRESET_MODELS = ("snapshot", "final")


# ------------------------------------------------------------------------------------------------ activations

def conv_layers(model: nn.Module, skip: int = 0) -> list[str]:
    """The module names of the model's Conv2d layers in definition order, the first `skip` left out."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)][skip:]


@torch.inference_mode()
def channel_maxima(model: nn.Module, images: np.ndarray, layers: list[str], batch_size: int = 1000) \
        -> list[np.ndarray]:
    """Per layer of `layers` (module names), an (N, channels) float32 array: each image's largest activation
    over the layer's output map, channel by channel (forward hooks on the modules; eval mode, one view per image:
    fastnet's flip test-time augmentation off)."""
    mods = dict(model.named_modules())
    caught: dict[str, torch.Tensor] = {}

    def hook(name: str):
        return lambda module, inputs, output: caught.__setitem__(name, output.detach().amax(dim=(2, 3)).float())

    handles = [mods[name].register_forward_hook(hook(name)) for name in layers]
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    try:
        with one_view(model):
            model.eval()
            for b in range(0, len(images), batch_size):
                model(to_input(images[b:b + batch_size]))
                for name in layers:
                    if name not in caught:
                        raise CGDError(f"pipd: the victim's conv layer {name!r} gave no output in its forward pass")
                    out[name].append(caught.pop(name))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(out[name]).numpy() for name in layers]


# ------------------------------------------------------------------------------------------------ isolation

def channel_gap(acts: np.ndarray, poison_preset: np.ndarray, clean_preset: np.ndarray,
                sigmas: float = 3.0) -> np.ndarray:
    """Per channel of one layer's (N, C) maxima: the poison preset's largest activation minus the clean preset's
    mean + `sigmas` standard deviations (population σ, as numpy's default)."""
    clean = acts[clean_preset].astype(np.float64)
    return acts[poison_preset].max(axis=0) - (clean.mean(axis=0) + sigmas * clean.std(axis=0))


def top_channels(gap: np.ndarray, ratio: float) -> np.ndarray:
    """The ceil(ratio · C) channels of largest gap, largest first."""
    return np.argsort(-gap, kind="stable")[:math.ceil(ratio * len(gap))]


def select_channels(acts: list[np.ndarray], poison_preset: np.ndarray, clean_preset: np.ndarray, ratio: float,
                    sigmas: float = 3.0) -> list[np.ndarray]:
    """PIPD's channel selection: in every layer, the top `ratio` of channels by `channel_gap`."""
    return [top_channels(channel_gap(a, poison_preset, clean_preset, sigmas), ratio) for a in acts]


def activation_score(acts: list[np.ndarray], channels: list[np.ndarray]) -> np.ndarray:
    """Each image's activations summed over the chosen channels of every layer (float64, (N,))."""
    return sum(a[:, c].astype(np.float64).sum(axis=1) for a, c in zip(acts, channels))


@dataclass
class IsolationRound:
    detected: np.ndarray  # indices in the upper natural-break class of this round's score
    score: np.ndarray  # (N,) the activation score
    threshold: float  # the natural break (largest score of the lower class)
    clean_preset: int  # size of the clean preset this round used


def progressive_isolation(acts: list[np.ndarray], poison_preset: np.ndarray, clean_preset: np.ndarray, *,
                          rounds: int, ratio: float, sigmas: float = 3.0) -> list[IsolationRound]:
    """PIPD's isolation rounds on fixed per-layer channel maxima. Each round selects channels against the
    presets, scores every image and flags the upper natural-break class; the next round's clean preset is this
    one's plus every sample not flagged ("sure clean", main_badnets.py's `sure_clean` = all minus the flagged
    samples outside the clean preset). The poison preset stays as given, as in the reference."""
    n = len(acts[0])
    poison_preset = np.asarray(poison_preset, dtype=np.int64)
    clean = np.unique(np.asarray(clean_preset, dtype=np.int64))
    out = []
    for _ in range(rounds):
        score = activation_score(acts, select_channels(acts, poison_preset, clean, ratio, sigmas))
        t = jenks_two_classes(score)
        detected = np.flatnonzero(score > t)
        out.append(IsolationRound(detected, score, t, len(clean)))
        clean = np.union1d(clean, np.setdiff1d(np.arange(n), detected))
    return out


def presets(losses: np.ndarray, poison_ratio: float, clean_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """ABL-style pre-isolation (our stand-in for the reference's isolation1%_examples.npy / other20%_examples.npy):
    the int(poison_ratio · N) samples of lowest loss and the int(clean_ratio · N) of highest loss."""
    order = np.argsort(losses, kind="stable")
    n_p, n_c = int(len(losses) * poison_ratio), int(len(losses) * clean_ratio)
    return np.sort(order[:n_p]), np.sort(order[len(order) - n_c:])


def activation_split(score: np.ndarray, detected: np.ndarray) -> Split:
    """D_p = the flagged samples, D_c = the rest, no mixed part. No guide: its columns are 0; the model columns
    hold the negated activation score (low = suspicious, as a loss) and its rank."""
    n = len(score)
    poison = np.sort(np.asarray(detected, dtype=np.int64))
    zeros, neg = np.zeros(n), -np.asarray(score, dtype=np.float64)
    return Split(np.setdiff1d(np.arange(n), poison), poison, np.zeros(0, np.int64), zeros, neg, zeros,
                 percentile_rank(neg), info={"model_score": "pipd activation score, negated"})


# ------------------------------------------------------------------------------------------------ the defense

@DEFENSES.register("pipd")
class PIPD(Defense):
    """PIPD (Chen, Wu & Zhou, AAAI 2024; official RorschachChen/PIPD main_badnets.py and
    none/my_compromised_detection.py `analyze_neuros`) on the poisoned training set and its victim, no clean data.

    Isolation, as the reference: (0) presets — `poison_preset` (1 %) of likely poison and `clean_preset` (20 %) of
    likely clean samples; (1) one forward pass of the victim over the training set records, after every conv layer
    (`skip_convs` first ones left out), each image's largest activation per channel; (2) per layer and channel,
    gap = max over the poison preset − (mean + `sigmas` (3) σ over the clean preset); the top `channel_ratio`
    (4 %, ceil) channels of each layer by gap are kept; (3) each image's score = its activations summed over the
    kept channels of all layers; (4) a two-class Jenks natural break of the scores: the upper class is flagged;
    (5) `rounds` (5) times, the clean preset growing by every sample not flagged ("sure clean"), the poison
    preset unchanged. The last round's flagged samples are the split's D_p (D_c: all others, no mixed part).

    Deviations from the reference:
    - Presets (ours — **not released**: main_badnets.py loads isolation1%_examples.npy and other20%_examples.npy,
      whose making is in neither the code nor its README): ABL's isolation rule on the victim's own per-sample
      losses — the lowest 1 % as the poison preset, the highest 20 % as the clean preset; the losses come from
      the victim's epoch-T snapshot (`preset_model="snapshot"`, an early model, as ABL isolates after a short
      warm-up: poison is learned first) or, without one or with `"final"`, from the victim itself. One forward
      pass; no separate model is trained. The presets matter: on tiny Blend data at 1 % presets, one seed's snapshot
      preset and the other seed's final-model preset held no poison, and the isolation's precision fell to
      0.2–0.3.
    - Layers: the reference hooks the 15 conv outputs of ResNet-18's layer2–4 (leaving out conv1 and layer1, the
      full-resolution stage; the paper says "each convolutional layer"); here every nn.Conv2d of the victim
      in definition order, shortcut convs included, after the first `skip_convs` (1: on fastnet the stem, its only
      conv wholly at full resolution; 0 on another architecture keeps them all).
    - The victim is fixed, so its activations are recorded once and reused by every round (the reference
      re-runs the same forward pass each round: the same numbers, five times the cost).
    - The break: the upper Jenks class, `score > break`; the reference flags `score >= breaks[1]`, where
      jenkspy's breaks[1] is the largest value of the *lower* class, so it adds that one sample (and its ties).
      The break is computed exactly (`jenks_two_classes`, no jenkspy dependency).

    Removal (ours — **not released**: the paper's "selective training" (its Appendix A) is not in the code, and
    the paper's text was not available to us): ABL's last two stages, with ABL's settings
    (`cgd.defenses.abl.stage`), on a copy of the victim — (a) `finetuning_epochs` (5) of cross-entropy on the
    samples not flagged, lr `lr` for the first 2/3 of the epochs and lr/10 after; (b) `unlearning_epochs` (5) of
    gradient ascent on the flagged samples' cross-entropy at `unlearning_lr` (lr/100), the fine-tuning's optimizer
    carrying on. `lr` defaults to the victim recipe's peak lr (0.4 for fastnet; `from_config` takes the run's), as
    ABL's does; SGD nesterov, momentum 0.9, weight decay 1e-4, batch 256, as ABL; the victim recipe's augmentation
    (`augment`, set by `from_config`; "flip" otherwise). Unlike ABL the model is the victim, fine-tuned (PIPD reads
    the victim, which the CGD paper's Table 2 also charges it for), not a network trained afresh. With nothing
    flagged, stage (b) is skipped. On the tiny test data (tests/test_defenses_pipd.py) the ascent is what removes
    a BadNets backdoor (ASR 1.00 → 0.14; fine-tuning alone on the unflagged samples: 0.92); on Blend there,
    fine-tuning alone already removes it (1.00 → 0.19) and the ascent only costs clean accuracy (0.67 → 0.52).

    Cost: one forward pass for the preset losses, one with the hooks (the rounds are numpy on the recorded
    (N, channels) maxima: 50k × 448 floats on fastnet), then `finetuning_epochs` passes over the unflagged data
    and `unlearning_epochs` over the flagged (≈ 5 % on CIFAR-10 at 5 % poison): on CIFAR-10 with fastnet ≈ 6 of
    the victim's 12 epochs at batch 256 ≈ 0.5× the victim's training time (budget ≤ 2×; the CGD paper's Table 2
    records 1,325 s + 438 s for PIPD beside a 997 s victim).
    """

    name = "pipd"
    from_victim = ("lr", "augment")

    def __init__(self, rounds: int = 5, channel_ratio: float = 0.04, sigmas: float = 3.0,
                 poison_preset: float = 0.01, clean_preset: float = 0.2, preset_model: str = "snapshot",
                 skip_convs: int = 1, finetuning_epochs: int = 5, unlearning_epochs: int = 5,
                 lr: float | None = None, unlearning_lr: float | None = None, momentum: float = 0.9,
                 weight_decay: float = 1e-4, batch_size: int = 256, augment: str = "flip"):
        check_types(self.name, ints=dict(rounds=rounds, skip_convs=skip_convs, finetuning_epochs=finetuning_epochs,
                                         unlearning_epochs=unlearning_epochs, batch_size=batch_size),
                    reals=dict(channel_ratio=channel_ratio, sigmas=sigmas, poison_preset=poison_preset,
                               clean_preset=clean_preset, lr=lr, unlearning_lr=unlearning_lr, momentum=momentum,
                               weight_decay=weight_decay),
                    texts=dict(preset_model=preset_model, augment=augment))
        problems = [what for ok, what in [
            (rounds >= 1, "rounds >= 1"), (0 < channel_ratio <= 1, "0 < channel_ratio <= 1"),
            (sigmas >= 0, "sigmas >= 0"),
            (0 < poison_preset < 1 and 0 < clean_preset < 1 and poison_preset + clean_preset <= 1,
             "0 < poison_preset, clean_preset < 1 with poison_preset + clean_preset <= 1"),
            (preset_model in PRESET_MODELS, f"preset_model {' or '.join(PRESET_MODELS)}"),
            (skip_convs >= 0, "skip_convs >= 0"),
            (min(finetuning_epochs, unlearning_epochs) >= 0, "epochs >= 0"),
            (all(v is None or v > 0 for v in (lr, unlearning_lr)), "lr, unlearning_lr > 0"),
            (0 <= momentum < 1 and weight_decay >= 0, "0 <= momentum < 1, weight_decay >= 0"),
            (batch_size >= 1, "batch_size >= 1"),
            (augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}")] if not ok]
        if problems:
            raise CGDError(f"pipd: needs {'; '.join(problems)}")
        self.rounds, self.channel_ratio, self.sigmas = int(rounds), float(channel_ratio), float(sigmas)
        self.poison_preset, self.clean_preset = float(poison_preset), float(clean_preset)
        self.preset_model, self.skip_convs = preset_model, int(skip_convs)
        self.finetuning_epochs, self.unlearning_epochs = int(finetuning_epochs), int(unlearning_epochs)
        self.lr = float(lr) if lr is not None else TrainConfig().lr
        self.unlearning_lr = float(unlearning_lr) if unlearning_lr is not None else self.lr / 100
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.batch_size, self.augment = int(batch_size), augment

    def settings(self) -> dict:
        return {"rounds": self.rounds, "channel_ratio": self.channel_ratio, "sigmas": self.sigmas,
                "presets": [self.poison_preset, self.clean_preset], "skip_convs": self.skip_convs,
                "epochs": [self.finetuning_epochs, self.unlearning_epochs], "lr": self.lr,
                "unlearning_lr": self.unlearning_lr, "augment": self.augment}

    def preset_losses(self, train: ImageSet, victim: TrainResult, context: Context) -> tuple[np.ndarray, str]:
        """Per-sample CE under the model the presets are ranked by (and which one it was)."""
        model, which = victim.model, "final"
        if self.preset_model == "snapshot":
            if victim.snapshot is None:
                context.log("PIPD: the victim comes without an epoch-T snapshot: presets from the final model")
            else:
                model, which = copy.deepcopy(victim.model), "snapshot"
                model.load_state_dict(victim.snapshot)
        return per_sample_loss(model, train.images, train.labels), which

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        n = len(train)
        if int(n * self.poison_preset) < 1 or int(n * self.clean_preset) < 2:
            raise CGDError(f"pipd: presets of {self.poison_preset:g} and {self.clean_preset:g} of {n} samples "
                           "leave the poison preset empty or the clean preset under 2 samples")
        layers = conv_layers(victim.model, self.skip_convs)
        if not layers:
            raise CGDError(f"pipd reads conv activations: the victim has no nn.Conv2d layer after the first "
                           f"{self.skip_convs}")
        info: dict = {**self.settings(), "layers": layers}
        with timed(timings, "presets_s"):
            losses, info["preset_model"] = self.preset_losses(train, victim, context)
            poison_pre, clean_pre = presets(losses, self.poison_preset, self.clean_preset)
        with timed(timings, "isolation_s"):
            acts = channel_maxima(victim.model, train.images, layers)
            rounds = progressive_isolation(acts, poison_pre, clean_pre, rounds=self.rounds,
                                           ratio=self.channel_ratio, sigmas=self.sigmas)
        info["rounds"] = [{"flagged": int(len(r.detected)), "clean_preset": r.clean_preset,
                           "threshold": round(r.threshold, 6) if math.isfinite(r.threshold) else None}
                          for r in rounds]
        last = rounds[-1]
        flagged, others = last.detected, np.setdiff1d(np.arange(n), last.detected)
        info["flagged"] = int(len(flagged))
        context.log(f"PIPD flagged {len(flagged)} samples after {self.rounds} rounds "
                    f"({', '.join(str(r['flagged']) for r in info['rounds'])})")
        model = copy.deepcopy(victim.model)
        data = (torch.from_numpy(np.array(train.images)), torch.from_numpy(np.array(train.labels, dtype=np.int64)))
        gen = torch.Generator().manual_seed(context.seed)
        info["loss"] = {}

        def log(line: str) -> None:  # abl.stage's progress lines, marked as PIPD's
            context.log(f"PIPD: {line}")

        with timed(timings, "finetuning_s"):
            opt = make_optimizer(model, self.lr, self.momentum, self.weight_decay)
            decay_at = int(round(self.finetuning_epochs * 2 / 3))
            lrs = [self.lr if e < decay_at else self.lr / 10 for e in range(self.finetuning_epochs)]
            info["loss"]["finetuning"] = stage(model, opt, data, others, lrs, F.cross_entropy, self.batch_size,
                                               self.augment, gen, "fine-tuning (CE, unflagged)", log)
        with timed(timings, "unlearning_s"):
            epochs = self.unlearning_epochs if len(flagged) else 0
            info["loss"]["unlearning"] = stage(model, opt, data, flagged, [self.unlearning_lr] * epochs,
                                               F.cross_entropy, self.batch_size, self.augment, gen,
                                               "unlearning (CE on the flagged set, ascended)", log,
                                               ascent=True)
        if context.extra_eval is not None:
            info["eval"] = context.extra_eval(model)
        return DefenseResult(model.eval(), activation_split(last.score, flagged), timings, info)

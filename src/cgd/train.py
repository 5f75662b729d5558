"""Victim training on CPU: deterministic, resumable, and recording every sample's loss every epoch.

The per-sample losses come for free from the forward pass that training does anyway; CGD's split can use the
whole trajectory instead of one snapshot. The snapshot at epoch T (the paper's suspicious model) is kept too.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import CGDError
from .io import atomic_write_bytes, atomic_write_text
from .progress import progress
from .tensors import augment, to_input

@dataclass
class TrainConfig:
    """The victim recipe. Defaults: the fast CPU recipe measured in docs/benchmarks.md."""

    epochs: int = 12
    batch_size: int = 512
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    warmup: float = 0.2  # fraction of steps with a linearly rising lr, then linear decay to 0
    augment: str = "flip"  # "none", "flip", or "flip+translate" (2 px; hides corner patches, see notes)
    snapshot_epoch: int = 3  # T: keep the model after this epoch for CGD's model score
    seed: int = 0


@dataclass
class TrainResult:
    model: nn.Module
    snapshot: dict[str, torch.Tensor] | None  # state_dict after `snapshot_epoch`
    loss_history: np.ndarray  # (epochs, N) float32: each sample's unsmoothed CE, in train mode, every epoch
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(self.epoch_seconds))


class LossRecorder:
    """Per-sample training losses of a training loop of your own, epoch by epoch — the (epochs, N) history
    `cgd.find_poison` scores the model by. Two lines in the loop::

        recorder = LossRecorder(len(train_set))
        for epoch in range(epochs):
            for indices, x, y in loader:                     # indices: the samples' positions in the training set
                losses = F.cross_entropy(model(x), y, reduction="none")
                recorder.update(indices, losses)             # before .mean().backward()
        history = recorder.history

    An epoch ends when a sample comes round again (or at `end_epoch()`). Without a history, `find_poison` takes
    one NLL per sample (e.g. under an early snapshot) and loses the loss-window model score, which is what
    catches the clean-label attacks a zero-shot guide cannot see (docs/benchmarks.md)."""

    def __init__(self, n_samples: int):
        self.n = int(n_samples)
        self._epochs: list[np.ndarray] = []
        self._current = np.full(self.n, np.nan, np.float32)

    def update(self, indices, losses) -> None:
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).ravel()
        val = losses.detach().float().cpu().numpy() if isinstance(losses, torch.Tensor) else np.asarray(losses)
        val = np.asarray(val, np.float32).ravel()
        if len(idx) != len(val) or (len(idx) and (idx.min() < 0 or idx.max() >= self.n)):
            raise CGDError(f"update needs one loss per index, indices in 0..{self.n - 1}; got {len(idx)} indices "
                           f"and {len(val)} losses")
        if (~np.isnan(self._current[idx])).any():
            self.end_epoch()
        self._current[idx] = val

    def end_epoch(self) -> None:
        if not np.isnan(self._current).all():
            self._epochs.append(self._current)
            self._current = np.full(self.n, np.nan, np.float32)

    @property
    def history(self) -> np.ndarray:
        """(epochs, N) float32, the current epoch included once every sample has a loss in it."""
        rows = self._epochs + ([self._current] if not np.isnan(self._current).any() else [])
        h = np.stack(rows) if rows else np.zeros((0, self.n), np.float32)
        missing = np.isnan(h).any(axis=1)
        if missing.any():
            e = int(np.flatnonzero(missing)[0]) + 1
            raise CGDError(f"epoch {e} has no loss for {int(np.isnan(h[e - 1]).sum())} samples (a loader with "
                           "drop_last, or a subset?): every sample needs a loss every epoch")
        return h


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    w = max(1, int(warmup * total))
    if step < w:
        return peak * (0.1 + 0.9 * step / w)
    return peak * max(0.0, (total - step) / max(1, total - w))


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool = True) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, config: TrainConfig,
          checkpoint_dir: Path | None = None, on_epoch: Callable[[int, nn.Module], dict] | None = None,
          desc: str = "train") -> TrainResult:
    """Train `model` on uint8 `images` with integer `labels`. With `checkpoint_dir`, every epoch is saved and a
    rerun continues from the last finished epoch, bit-for-bit as if never interrupted."""
    torch.manual_seed(config.seed)
    n = len(labels)
    x_all = torch.from_numpy(np.array(images))  # a writable copy
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64))
    model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    history = np.zeros((config.epochs, n), dtype=np.float32)
    snapshot, seconds, start_epoch = None, [], 0

    if checkpoint_dir is not None:
        start_epoch, snapshot, seconds = _resume(checkpoint_dir, model, opt, history, config)

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        bar = progress(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{config.epochs}")
        for b in bar:
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + b, total, config.lr, config.warmup)
            x = augment(to_input(x_all[idx]), config.augment, gen)
            y = y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                history[epoch, idx.numpy()] = F.cross_entropy(logits.detach(), y, reduction="none").numpy()
        seconds.append(time.perf_counter() - t0)
        if epoch + 1 == config.snapshot_epoch:
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, model, opt, history, snapshot, seconds, epoch + 1, config)
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
    return TrainResult(model.eval(), snapshot, history, seconds)


def _save_checkpoint(d: Path, model, opt, history, snapshot, seconds, epoch, config) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.{i}"] = buf.contiguous()
    if snapshot is not None:
        tensors.update({f"snapshot.{k}": v.contiguous() for k, v in snapshot.items()})
    tensors["history"] = torch.from_numpy(history[:epoch].copy())
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / "checkpoint.safetensors", save(tensors))
    atomic_write_text(d / "checkpoint.json", json.dumps({"epoch": epoch, "seconds": seconds,
                                                         "config": asdict(config)}) + "\n")


def _resume(d: Path, model, opt, history, config):
    from safetensors.torch import load_file

    meta_path = d / "checkpoint.json"
    if not meta_path.exists():
        return 0, None, []
    meta = json.loads(meta_path.read_text())
    if meta["config"] != asdict(config):
        return 0, None, []  # a different recipe: start over rather than mix two runs
    t = load_file(str(d / "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}" in t:
            opt.state[p]["momentum_buffer"] = t[f"opt.{i}"].clone()
    snap = {k[9:]: v for k, v in t.items() if k.startswith("snapshot.")} or None
    history[:meta["epoch"]] = t["history"].numpy()
    return meta["epoch"], snap, list(meta["seconds"])

"""The defense interface: one class per defense, one `run(train, victim, context) -> DefenseResult`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..registry import Registry
from ..split import Split
from ..tensors import augment, to_input
from ..train import TrainResult

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]

DEFENSES: Registry["Defense"] = Registry("defense")


def get(name: str, **params) -> "Defense":
    """`cgd.defenses.get("cgd", guide="imagenet-text")`."""
    return DEFENSES.get(name, **params)


def list(filter: str = "*") -> dict[str, str]:  # noqa: A001 - `cgd.defenses.list()`, like the other registries
    """Registered defenses matching the shell-style `filter`, each with its one-line summary."""
    return DEFENSES.list(filter)


@dataclass
class Context:
    """What a run hands every defense besides the data and the model."""

    seed: int = 0
    work: Path | None = None  # a folder for intermediate results (an interrupted run resumes); None: memory only
    extra_eval: Callable[[nn.Module], dict] | None = None  # logged for analysis only; never steers a defense
    log: Callable[[str], None] = lambda s: None
    # trusted clean training indices for the clean-data defenses (FP, ...); in the benchmark an *oracle* drawn
    # with the known poison mask (no real user has one); None: the defense has none
    clean_indices: np.ndarray | None = None


@dataclass
class DefenseResult:
    model: nn.Module  # the defended model
    split: Split | None = None  # the clean / poisoned / mixed split the defense made, if it makes one
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    info: dict = field(default_factory=dict)  # what the defense reports about its run (JSON-able)


class Defense:
    """Base class. Subclasses set `name` (their registry key) and implement `run`; `from_config` builds one from
    the run's dict config (parsed into typed settings there, once)."""

    name = "base"
    from_victim: tuple[str, ...] = ()  # settings taken from the run's victim recipe unless `defense.params` sets them

    @classmethod
    def from_config(cls, cfg: dict, **objects) -> "Defense":
        return cls(**{**{k: cfg["victim"][k] for k in cls.from_victim}, **cfg["defense"]["params"]})

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        raise NotImplementedError


class CleanDataDefense(Defense):
    """Base of the clean-data defenses (FP, I-BAU): `clean_data` gives the trusted clean training indices —
    `Context.clean_indices` here (the benchmark's 5 % oracle), CGD's split-clean D_c in the "-sc" variants
    (`cgd.defenses.guided.SplitClean`)."""

    clean_source = "given"
    min_clean = 1  # fewer trusted samples than this is an error
    max_clean: int | None = None  # use at most this many of the trusted samples (None: all; `set_max_clean`)

    def clean_data(self, train: ImageSet, victim: TrainResult, context: Context, timings: dict):
        """(trusted clean indices, the split that made them or None), from `trusted_clean` and checked: distinct
        indices into `train`, at least `min_clean` of them, whichever source gave them."""
        clean, split = self.trusted_clean(train, victim, context, timings)
        clean = np.asarray(clean)
        if clean.ndim != 1 or not np.issubdtype(clean.dtype, np.integer) or len(clean) and (
                clean.min() < 0 or clean.max() >= len(train) or len(np.unique(clean)) != len(clean)):
            raise CGDError(f"{self.name}: the trusted clean indices must be distinct sample indices in "
                           f"0..{len(train) - 1}")
        if len(clean) < self.min_clean:
            raise CGDError(f"{self.name}: {len(clean)} trusted clean samples ({self.clean_source}), fewer than the "
                           f"{self.min_clean} it needs")
        return clean.astype(np.int64), split

    def set_max_clean(self, value: int | None) -> None:
        """Check and keep the cap on trusted samples: a whole number ≥ `min_clean`, or None or 0 (what a `--param`
        can say) for all of them. The "-sc" variants cap CGD's D_c to fit the CPU budget."""
        if value is not None and not (type(value) is int and (value == 0 or value >= self.min_clean)):
            raise CGDError(f"{self.name}: max_clean must be a whole number >= {self.min_clean} (0: all); got "
                           f"{value!r}")
        self.max_clean = value or None

    def capped(self, clean: np.ndarray, seed: int) -> np.ndarray:
        """At most `max_clean` of the trusted `clean` indices, drawn with `seed` (sorted); all when uncapped."""
        if self.max_clean is None or len(clean) <= self.max_clean:
            return clean
        return np.sort(np.random.default_rng(seed).choice(clean, self.max_clean, replace=False))

    def trusted_clean(self, train: ImageSet, victim: TrainResult, context: Context, timings: dict):
        """The source of the clean indices: `Context.clean_indices` here; CGD's D_c in the "-sc" variants."""
        if context.clean_indices is None:
            raise CGDError(f"{self.name} is a clean-data defense: it needs trusted clean training indices "
                           "(Context.clean_indices; the benchmark passes a 5 % oracle); or run "
                           f"{self.name}-sc, which takes CGD's split-clean D_c")
        return context.clean_indices, None


@contextmanager
def timed(timings: dict[str, float], key: str):
    """Add the wall seconds of the `with` block to `timings[key]`."""
    t = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t


def eval_after(context: Context, model: nn.Module, info: dict, stage: str, who: str) -> None:
    """`Context.extra_eval` of `model` after `stage`, kept in `info["eval"]` and logged; it never steers."""
    if context.extra_eval is not None:
        info["eval"][stage] = context.extra_eval(model)
        context.log(f"{who} after {stage}: {info['eval'][stage]}")


# ------------------------------------------------------------------------------------------------ training loops

def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, aug: str, gen: torch.Generator) -> Batches:
    """One shuffled pass over uint8 images `x` (N, H, W, 3) and labels `y`: (model input with `aug`, labels). A
    last batch of one sample joins the batch before it (BatchNorm in train mode needs two)."""
    order = torch.randperm(len(y), generator=gen)
    ends = [*range(batch_size, len(y), batch_size), len(y)]
    if len(ends) > 1 and ends[-1] - ends[-2] == 1:
        del ends[-2]
    start = 0
    for end in ends:
        idx = order[start:end]
        start = end
        yield augment(to_input(x[idx]), aug, gen), y[idx]


def sgd_epochs(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, aug: str,
               gen: torch.Generator, log: Callable[[str], None] | None = None, label: str = "") -> list[float]:
    """`epochs` shuffled passes of one optimiser step per batch on `loss_fn(input, labels)` (the gradient cleared
    before each), the lr annealed by a cosine over the epochs (BackdoorBench's CosineAnnealingLR, stepped per
    epoch). Returns each epoch's mean loss; `log`, when given, hears about every tenth of the epochs."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    losses = []
    for _ in range(epochs):
        total = 0.0
        for xb, yb in batches(x, y, batch_size, aug, gen):
            loss = loss_fn(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
        sched.step()
        losses.append(total / max(1, len(y)))
        if log is not None and (len(losses) % max(1, epochs // 10) == 0 or len(losses) == epochs):
            log(f"{label} epoch {len(losses)}/{epochs}: loss {losses[-1]:.4f}")
    return losses

"""ASD, Adaptive Splitting Defense (Gao et al., CVPR 2023, "Backdoor Defense via Adaptively Splitting Poisoned
Dataset"; official code KuofengGao/ASD: ASD.py, config/baseline_asd.yaml, utils/trainer/semi.py): a poisoned-data
defense that trains one network of its own with MixMatch, the data split anew every epoch into a labeled pool
(trusted labels) and the rest (used as unlabeled images) by each sample's symmetric cross-entropy under the network
being trained. Three phases: class-aware (a few seed images per class plus the lowest-loss n per class, n growing),
class-agnostic (the lowest-loss half), and the meta-split (the half whose loss falls least in one epoch of a
"virtual" copy trained on the poisoned labels: poison, learned easily, falls most)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..schema import check_types
from ..tensors import AUGMENTS
from ..train import TrainResult
from .abl import fresh_model, per_sample_loss, run_epoch
from .base import DEFENSES, Context, Defense, DefenseResult, eval_after, timed
from .guided import SplitClean
from .semisup import MixMatch, check_pool_share, lowest, mixmatch_epoch, per_sample_sce, pool_split

SEED_SOURCES = ("victim-loss", "given")  # asd-sc: "split-clean"
# the parameters ASD's virtual model trains in the meta-split: the official code's ResNet-18 layer3, layer4 and
# linear head, i.e. the stages at 1/4 and 1/8 of the input resolution and the head; the same stages here
META_LAYERS = {"fastnet": ("groups.1.", "groups.2.", "head."),
               "preact-resnet18": ("layers.4.", "layers.5.", "layers.6.", "layers.7.", "bn.", "head.")}


# ------------------------------------------------------------------------------------------------ pure arrays

def per_class_lowest(losses: np.ndarray, labels: np.ndarray, k: int, candidates: np.ndarray | None = None
                     ) -> np.ndarray:
    """Per class, the indices of the `k` samples of lowest loss among `candidates` (all when None), sorted; a class
    with fewer candidates gives them all. Ties are broken by index."""
    cand = np.arange(len(losses)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if k <= 0 or len(cand) == 0:
        return np.zeros(0, np.int64)
    order = cand[np.lexsort((cand, losses[cand], labels[cand]))]  # by class, then loss, then index
    lab = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(lab, lab, side="left")  # position within its class
    return np.sort(order[rank < k])


def class_aware_pool(losses: np.ndarray, labels: np.ndarray, seeds: np.ndarray, choice_num: int) -> np.ndarray:
    """ASD's class-aware loss-guided split: the seeds, plus per class the `choice_num` non-seed samples of lowest
    loss."""
    others = np.setdiff1d(np.arange(len(losses)), seeds)
    return np.union1d(seeds, per_class_lowest(losses, labels, choice_num, others))


def choice_num(epoch: int, t: int, n: int) -> int:
    """How many lowest-loss samples per class the class-aware split adds at `epoch` (0-based): n more every t
    epochs after the first (the official code's `epoch % t == 0 and epoch != 0` counter)."""
    return n * (epoch // t)


def meta_parameters(model: nn.Module) -> tuple[list[nn.Parameter], str]:
    """The parameters the virtual model trains (`META_LAYERS` of the model's architecture) and which those are;
    an architecture not listed trains all of them."""
    prefixes = META_LAYERS.get(getattr(model, "cgd_spec", {}).get("name"))
    if prefixes is None:
        return list(model.parameters()), "all"
    return [p for name, p in model.named_parameters() if name.startswith(prefixes)], ",".join(prefixes)


# ------------------------------------------------------------------------------------------------ the defense

@DEFENSES.register("asd")
class ASD(Defense):
    """ASD (Gao et al., CVPR 2023; KuofengGao/ASD ASD.py, config/baseline_asd.yaml) on the poisoned training set,
    by default at 8 epochs of 192 MixMatch steps against the official 120 of 1024 (ASD at ≈ 1/50 of its budget, see
    Scaling). A new network of the victim's architecture (the victim's weights are not used; the victim only ranks
    the seed candidates) is trained with MixMatch (`cgd.defenses.semisup`: batch 64, K = 2, T 0.5, mixup α 0.75,
    λ_u 15 ramped linearly over all epochs) by Adam, lr `lr` 0.002. Before each epoch every sample's SCE
    (α 0.1, β 1) under the network in training ranks the data and the labeled pool is made anew:

    - epochs [0, `aware_epochs`): class-aware — the seeds (`seed_num` 10 per class) plus, per class, the
      `choice_num(epoch, t, n)` other samples of lowest loss;
    - the next `agnostic_epochs`: class-agnostic — the lowest `epsilon` (50 %);
    - the last `meta_epochs`: meta-split — a copy of the network (the virtual model) trains `meta_virtual_epochs`
      (1) of CE on all the poisoned data (batch 128, Adam lr `meta_lr` 0.015, only its last two stages and the
      head, `META_LAYERS`: the official layer3, layer4 and linear); the pool is the `epsilon` whose loss fell
      least (SCE − SCE after, lowest).

    Everything outside the pool is MixMatch's unlabeled set. The defended model is the network after the last
    epoch; the split reported is that epoch's pool as D_c and the rest as D_p (no mixed part), with the score the
    pool was chosen by (SCE, or the meta-split's difference) as the model score.

    Seeds. The official code draws its 10 seeds per class at random among the samples the ground-truth poison mask
    says are clean; no user has that mask, and this never reads it. `seed_source` says where they come from:
    "victim-loss" (default; needs nothing else): per class the `seed_num` samples of lowest CE under the victim
    (one view, eval mode); "given": per class the `seed_num` of `Context.clean_indices` of lowest victim CE (in
    the benchmark an oracle, truly clean, chosen with the mask — say so beside a result); `asd-sc`: the same from
    CGD's split-clean D_c. The victim-loss seeds are a guess that a backdoor can defeat: a backdoored victim fits
    its poison at least as well as clean images, so the target class's seeds can be poison, and then the network
    learns the trigger from its own labeled pool (on the tiny BadNets data of tests/test_defenses_asd_dbd.py 3 of
    the target class's 10 are; on conftest's `synthetic` data all 10).

    Scaling (CPU budget of issue 14, ≤ 1× the victim's training time here). Cost in full-set epochs E (one victim
    epoch: 50,000 images at batch 512), measured for fastnet on one thread: a MixMatch step (64 labeled + 2 × 64
    unlabeled images trained, the 128 forwarded once more to guess their labels) ≈ 0.0039 E, a scoring pass
    ≈ 0.36 E, a virtual epoch with its scoring ≈ 0.8 E. The official run, 120 epochs of 1024 steps with 30
    meta-split epochs: ≈ 479 + 43 + 24 ≈ 546 E, ≈ 45× our 12-epoch victim. The defaults keep the phases'
    proportions (60 : 30 : 30) at **4 + 2 + 2 epochs of 192 steps** (1,536 steps, 1/80 of the official 122,880):
    ≈ 6.0 (MixMatch) + 2.5 (7 scoring passes) + 1.6 (2 virtual epochs) + 0.4 (the victim's scoring for the seeds)
    ≈ 10.5 E ≈ 0.9× the victim (the benchmark records the seconds). The class-aware schedule is tied to the epoch
    count: the official n = 10 every t = 5 of 60 epochs grows each class's pool from 10 seeds to 120 by the end of
    the phase; at 4 epochs the defaults are t = 1, n = 37 (10 → 121).

    Other deviations from the official code:
    - learning rates: Adam's 0.002 and the virtual model's 0.015 are kept (Adam's steps do not scale with the
      network's gradients; the victim recipe's SGD lr, tied to our victim network, plays no part).
    - augmentation: one of cgd's modes (`augment`, default "flip+translate": flips and a 2 px shift drawn per
      batch), not random crop (4 px, reflect, per image) + flip.
    - the per-sample losses are computed on one un-augmented view in eval mode; the official code records them
      through its training loader's random crop and flip. At epoch 0 (pool = the seeds) no scoring pass is run.
    - seeds: per class the lowest victim CE among the candidates, not a random draw (see Seeds).
    - MixMatch's labeled and unlabeled images go through one forward pass together (batch norm over all 192) in
      place of the official three interleaved batches of 64; a pool smaller than a batch is used whole each step.
    - the per-epoch test-set evaluations and best-checkpoint selection on test CA are not run (the model returned
      is the last; `Context.extra_eval`, when given, is called after each phase and only logged).
    """

    name = "asd"

    def __init__(self, aware_epochs: int = 4, agnostic_epochs: int = 2, meta_epochs: int = 2,
                 iterations: int = 192, batch_size: int = 64, temperature: float = 0.5, mixup_alpha: float = 0.75,
                 lambda_u: float = 15.0, seed_num: int = 10, t: int = 1, n: int = 37, epsilon: float = 0.5,
                 sce_alpha: float = 0.1, sce_beta: float = 1.0, lr: float = 0.002, meta_lr: float = 0.015,
                 meta_virtual_epochs: int = 1, meta_batch_size: int = 128, augment: str = "flip+translate",
                 seed_source: str = "victim-loss"):
        check_types(self.name, ints=dict(aware_epochs=aware_epochs, agnostic_epochs=agnostic_epochs,
                                         meta_epochs=meta_epochs, seed_num=seed_num, t=t, n=n,
                                         meta_virtual_epochs=meta_virtual_epochs, meta_batch_size=meta_batch_size),
                    reals=dict(epsilon=epsilon, sce_alpha=sce_alpha, sce_beta=sce_beta, lr=lr, meta_lr=meta_lr),
                    texts=dict(augment=augment, seed_source=seed_source))
        problems = [what for ok, what in [
            (min(aware_epochs, agnostic_epochs, meta_epochs) >= 0, "epochs >= 0"),
            (aware_epochs + agnostic_epochs + meta_epochs >= 1, "at least one epoch"),
            (seed_num >= 1 and t >= 1 and n >= 0, "seed_num >= 1, t >= 1, n >= 0"),
            (0 < epsilon < 1, "0 < epsilon < 1"),
            (sce_alpha >= 0 and sce_beta >= 0 and sce_alpha + sce_beta > 0, "sce_alpha, sce_beta >= 0, not both 0"),
            (lr > 0 and meta_lr > 0, "lr, meta_lr > 0"),
            (meta_virtual_epochs >= 1 and meta_batch_size >= 1, "meta_virtual_epochs, meta_batch_size >= 1"),
            (augment in AUGMENTS, f"augment {'|'.join(AUGMENTS)}"),
            (seed_source in SEED_SOURCES, f"seed_source {'|'.join(SEED_SOURCES)}")] if not ok]
        if problems:
            raise CGDError(f"asd: needs {'; '.join(problems)}")
        self.mm = MixMatch(iterations, batch_size, temperature, mixup_alpha, lambda_u, augment)  # checks its own
        self.phases = (int(aware_epochs), int(agnostic_epochs), int(meta_epochs))
        self.seed_num, self.t, self.n, self.epsilon = int(seed_num), int(t), int(n), float(epsilon)
        self.sce = (float(sce_alpha), float(sce_beta))
        self.lr, self.meta_lr = float(lr), float(meta_lr)
        self.meta_virtual_epochs, self.meta_batch_size = int(meta_virtual_epochs), int(meta_batch_size)
        self.seed_source = seed_source

    def settings(self) -> dict:
        return {"epochs": list(self.phases), "iterations": self.mm.iterations, "batch_size": self.mm.batch_size,
                "temperature": self.mm.temperature, "mixup_alpha": self.mm.alpha, "lambda_u": self.mm.lambda_u,
                "seed_num": self.seed_num, "t": self.t, "n": self.n, "epsilon": self.epsilon,
                "sce": list(self.sce), "lr": self.lr, "meta_lr": self.meta_lr, "augment": self.mm.augment,
                "seed_source": self.seed_source}

    def trusted_clean(self, train: ImageSet, victim: TrainResult, context: Context, timings: dict):
        """The seed candidates of `seed_source` "given": `Context.clean_indices` (asd-sc: CGD's split-clean D_c)."""
        if context.clean_indices is None:
            raise CGDError("asd: seed_source 'given' takes its seeds from trusted clean indices "
                           "(Context.clean_indices; the benchmark passes an oracle); none were given. Run "
                           "asd-sc to seed from CGD's split-clean D_c")
        return context.clean_indices, None

    def seeds(self, train: ImageSet, victim: TrainResult, context: Context, timings: dict) -> np.ndarray:
        """`seed_num` per class of lowest victim CE among the candidates `seed_source` names (all samples for
        "victim-loss")."""
        labels = np.asarray(train.labels)
        if self.seed_source == "victim-loss":
            if context.clean_indices is not None:
                context.log("ASD: trusted clean indices were given but seed_source is 'victim-loss': not used "
                            "(seed_source='given' seeds from them)")
            candidates = np.arange(len(train))
        else:
            given, _ = self.trusted_clean(train, victim, context, timings)
            candidates = np.asarray(given)
            if candidates.ndim != 1 or not np.issubdtype(candidates.dtype, np.integer) or len(candidates) and (
                    candidates.min() < 0 or candidates.max() >= len(train)):
                raise CGDError(f"asd: the seed candidates ({self.seed_source}) must be sample indices in "
                               f"0..{len(train) - 1}")
            candidates = np.unique(candidates)
        with timed(timings, "seed_s"):
            loss = np.full(len(train), np.inf)
            loss[candidates] = per_sample_loss(victim.model, train.images[candidates], labels[candidates])
            seeds = per_class_lowest(loss, labels, self.seed_num, candidates)
        missing = np.setdiff1d(np.arange(train.num_classes), labels[seeds])
        if len(missing):
            raise CGDError(f"asd: no seed candidate ({self.seed_source}) of class {int(missing[0])}: every class "
                           "needs one")
        return seeds

    def meta_losses(self, model: nn.Module, data, gen: torch.Generator) -> tuple[np.ndarray, list[float]]:
        """Each sample's SCE after the virtual model's epoch(s) of CE (a copy; `model` is untouched)."""
        virtual = copy.deepcopy(model)
        params, _ = meta_parameters(virtual)
        trained = {id(p) for p in params}
        for p in virtual.parameters():  # the rest frozen: no gradient is computed for them (the same steps)
            p.requires_grad_(id(p) in trained)
        opt = torch.optim.Adam(params, lr=self.meta_lr)
        everyone = np.arange(len(data[1]))
        ce = [run_epoch(virtual, opt, *data, everyone, self.meta_batch_size, F.cross_entropy, self.mm.augment, gen)
              for _ in range(self.meta_virtual_epochs)]
        return per_sample_sce(virtual, data[0].numpy(), data[1].numpy(), *self.sce), ce

    def run(self, train: ImageSet, victim: TrainResult, context: Context) -> DefenseResult:
        timings: dict[str, float] = {}
        n, labels = len(train), np.asarray(train.labels)
        check_pool_share(self.name, self.epsilon, n)
        model = fresh_model(victim, context.seed, self.name)
        data = (torch.from_numpy(np.array(train.images)), torch.from_numpy(np.array(labels, dtype=np.int64)))
        gen = torch.Generator().manual_seed(context.seed)
        info: dict = {**self.settings(), "epochs_run": [], "eval": {}}
        seeds = self.seeds(train, victim, context, timings)
        info["seeds"] = int(len(seeds))
        _, info["meta_layers"] = meta_parameters(model)
        context.log(f"ASD: {len(seeds)} seeds ({self.seed_source}), {sum(self.phases)} epochs "
                    f"{'/'.join(map(str, self.phases))} of {self.mm.iterations} MixMatch steps")
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        total = sum(self.phases)
        bounds = np.cumsum(self.phases)
        losses = np.zeros(n)
        for epoch in range(total):
            phase = ("class-aware", "class-agnostic", "meta")[int(np.searchsorted(bounds, epoch, side="right"))]
            record: dict = {"epoch": epoch, "phase": phase}
            with timed(timings, "score_s"):
                k = choice_num(epoch, self.t, self.n)
                if phase != "class-aware" or k > 0:
                    losses = per_sample_sce(model, train.images, labels, *self.sce)
                if phase == "class-aware":
                    pool = class_aware_pool(losses, labels, seeds, k)
                elif phase == "class-agnostic":
                    pool = lowest(losses, self.epsilon)
            if phase == "meta":
                with timed(timings, "meta_s"):
                    meta, record["virtual_ce"] = self.meta_losses(model, data, gen)
                    losses = losses - meta  # what the meta-split ranks (and the split reports)
                    pool = lowest(losses, self.epsilon)
            unlabeled = np.setdiff1d(np.arange(n), pool)
            with timed(timings, "mixmatch_s"):
                record.update(mixmatch_epoch(model, opt, *data, pool, unlabeled, self.mm, gen,
                                             (epoch / total, (epoch + 1) / total), train.num_classes))
            record["labeled"] = int(len(pool))
            info["epochs_run"].append(record)
            context.log(f"ASD epoch {epoch + 1}/{total} ({phase}): {len(pool)} labeled, loss {record['loss']:.4f} "
                        f"(L_x {record['lx']:.4f}, L_u {record['lu']:.4f}, λ_u {record['lambda_u']:.2f})")
            if epoch + 1 in bounds:
                eval_after(context, model, info, phase, "ASD")
        score = "asd meta-split score (SCE − SCE after the virtual epoch)" if phase == "meta" else "asd SCE loss"
        return DefenseResult(model.eval(), pool_split(losses, pool, score), timings, info)


@DEFENSES.register("asd-sc")
class ASDSC(SplitClean, ASD):
    """ASD seeded from CGD's split-clean D_c (the issue's alternative to the official code's ground-truth seeds):
    CGD's scoring stages alone (guide, model score, split; no unlearning) make D_c, and the seeds are, per class,
    the `seed_num` samples of D_c of lowest victim CE. Every other setting is ASD's; the split reported is ASD's
    last pool (CGD's split only chose the seeds). CGD's scoring adds its seconds (`guide_s`, `split_s`, ...)."""

    name = "asd-sc"

    def __init__(self, cgd=None, **params):
        if "seed_source" in params:
            raise CGDError("asd-sc: its seeds come from CGD's split-clean D_c; seed_source is asd's setting")
        super().__init__(cgd, seed_source="given", **params)
        self.seed_source = self.clean_source  # "split-clean"

"""CGD's guided unlearning (paper §4.2): fine-tune the backdoored model with

    L = L_re(CE on D_c) + λ_un · L_un(on D_p) + λ_distill · T² · KL(softmax(guide/T) ‖ softmax(model/T)) on D_p

bounded in steps, with early stopping on a held-out slice of D_c (never on test data).

`L_un` comes in two forms:
* "log-p" (the paper): mean log(p_y + ε) over D_p. Its gradient (1 − p_y) vanishes exactly when the model is
  confident in the poisoned label, which is when it is needed most.
* "log-not-p": mean −log(1 − p_y + ε), the cross-entropy toward "any class but y": its gradient grows as p_y → 1.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import CGDError
from .progress import progress
from .split import Split, dp_shares, oversample_clean, suspected_target
from .tensors import MEAN, STD, accuracy, augment, one_view, predict_logits, to_input
from .train import make_optimizer


@dataclass
class UnlearnConfig:
    """Defaults are the paper's recipe (§5.1.3); `RECIPES` holds the named variants."""

    lambda_un: float = 0.025
    lambda_distill: float = 5e-4
    temperature: float = 3.0
    unlearn_loss: str = "log-p"  # or "log-not-p"
    eps: float = 1e-6
    lr: float = 0.01
    momentum: float = 0.0
    lr_decay: bool = False  # decay the learning rate linearly to zero over the bounded steps
    weight_decay: float = 5e-4
    epochs: int = 10  # passes over the oversampled D_c; bounded
    max_steps: int | None = None  # optional hard cap on optimiser steps
    min_steps: int = 0  # run more passes than `epochs` when a small D_c would give fewer steps than this
    batch_size: int = 256  # D_c samples per step
    poison_batch: int | None = None  # D_p samples per step; None: proportional to |D_p| / |D_c|
    augment: str = "flip"
    label_smoothing: float = 0.0  # on L_re; the victim recipe trains with 0.2
    freeze_bn: bool = False  # keep the victim's batch-norm statistics instead of re-estimating them on D_c + D_p
    prior: str = "labels"  # D_c is oversampled to the class shares of "labels" (all training labels, the paper) or
    # "guide" (the guide's mean predicted probabilities: poisoned labels do not inflate the target class)
    amplify_eps: float = 0.0  # > 0: each D_p batch is unlearned beside a copy pushed, within an L∞ ball of this
    # radius (pixels in [0, 1]), toward its given label under the model being unlearned (`amplify`), the copies'
    # L_un added at full weight (the history's loss_un is then the sum); 0: off; under study, issue 13
    amplify_steps: int = 3  # sign-gradient steps of that push
    relabel: float = 0.0  # > 0: D_p members whose (refined) guide's top class is not their given label are also
    # relearned toward that class, cross-entropy at this weight (label repair, for relabelled poison: FLIP, and the
    # triggered images of poison-label attacks); 0: off; under study, issue 13
    escalate: int = 0  # > 0: after the pass, a trigger estimated from the split (`estimate_trigger`) is added to
    # clean images; while the model still sends more than `escalate_at` of them to the suspected target, unlearning
    # is redone from the victim at twice λ_un, at most this many times (`unlearn_checked`); 0: off; issue 13
    escalate_at: float = 0.5
    escalate_scale: float = 4.0  # the estimate is added this many times over (its mean residual is diluted by
    # D_p's clean false alarms and by the trigger's own variation)
    escalate_classes: int = 1  # the check estimates a trigger for each of this many classes D_p is richest in and
    # reads the largest response (CTRL's target is second by a hair; under study, issue 13)
    holdout: float = 0.05  # share of D_c held out to watch clean accuracy
    tau: float = 0.02  # stop when held-out accuracy falls more than this (plus its noise, `allowed_drop`) below
    # its starting value (with lr_decay: when the final model does; the original model is returned then)
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise CGDError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.prior not in ("labels", "guide"):
            raise CGDError(f"unknown unlearning prior {self.prior!r}: use 'labels' or 'guide'")
        if not (type(self.escalate) is int and 0 <= self.escalate <= 8 and 0 < self.escalate_at < 1
                and self.escalate_scale > 0 and type(self.escalate_classes) is int and self.escalate_classes >= 1):
            raise CGDError(f"need escalate an integer in [0, 8], 0 < escalate_at < 1, escalate_scale > 0 and "
                           f"escalate_classes an integer ≥ 1; got {self.escalate}, {self.escalate_at}, "
                           f"{self.escalate_scale}, {self.escalate_classes}")
        if not 0 <= self.relabel <= 10:
            raise CGDError(f"need 0 <= relabel <= 10; got {self.relabel}")
        if not (0 <= self.amplify_eps <= 1 and type(self.amplify_steps) is int and self.amplify_steps >= 1):
            raise CGDError(f"need 0 <= amplify_eps <= 1 and amplify_steps >= 1; got {self.amplify_eps}, "
                           f"{self.amplify_steps}")


RECIPES: dict[str, dict] = {
    "paper": {},
    # The paper's losses with momentum 0.9, the learning rate decayed to zero over one pass of the purified D_c, twice
    # the unlearning weight, at least 60 steps (a 10k subset gets a few passes) and L_re smoothed by 0.2 like the
    # victim recipe's own loss, and the trigger check (up to two doublings of the unlearning weight, `unlearn_checked`);
    # each choice and the training-data measurements behind it: docs/benchmarks.md.
    "cpu": dict(epochs=1, momentum=0.9, lr_decay=True, min_steps=60, lambda_un=0.05, label_smoothing=0.2,
                escalate=2),
}


def recipe(name: str, **overrides) -> UnlearnConfig:
    if name not in RECIPES:
        raise CGDError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return UnlearnConfig(**{**RECIPES[name], **overrides})


@dataclass
class UnlearnResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # `unlearn_checked`'s rounds: λ_un and the response to it


def unlearning_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    p_y = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    if kind == "log-p":
        return torch.log(p_y + eps).mean()
    if kind == "log-not-p":
        return -torch.log1p(-p_y + eps).mean()
    raise CGDError(f"unknown unlearn_loss {kind!r}: use 'log-p' or 'log-not-p'")


def relabel_loss(logits: torch.Tensor, labels: torch.Tensor, guide_logits: torch.Tensor, smoothing: float
                 ) -> torch.Tensor:
    """Cross-entropy toward the guide's top class, over the members of a D_p batch whose top class is not their
    given label, summed and divided by the batch's size: a batch where few disagree is pulled less."""
    seen = guide_logits.argmax(1)
    off = seen != labels
    if not off.any():
        return logits.sum() * 0.0
    per = F.cross_entropy(logits[off], seen[off], label_smoothing=smoothing, reduction="sum")
    return per / len(labels)


def amplify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """`x` (model inputs) moved by sign-gradient steps, within an L∞ ball of `eps` in [0, 1] pixel units and the
    valid pixel range, toward a higher probability of the labels `y` under `model` (eval mode, one view per image
    as training sees it; the model's weights get no gradient). On a suspected-poison batch this strengthens
    whatever the model links to the given label. On tiny data that is the trigger, and a trigger planted weaker
    than it is used at test time is then unlearned at the attack's strength; on CIFAR-10's Ada-SIG it is the
    object as much as the trigger, and the trigger stays (docs/benchmarks.md, 2026-12-04)."""
    modes = {m: m.training for m in model.modules()}  # restored as they were (frozen batch-norm stays frozen)
    model.eval()
    r, lo, hi = eps / STD, (0 - MEAN) / STD, (1 - MEAN) / STD
    delta = torch.zeros_like(x, requires_grad=True)
    with torch.enable_grad(), one_view(model):
        for _ in range(steps):
            logp = F.log_softmax(model(x + delta), 1).gather(1, y[:, None]).sum()
            (g,) = torch.autograd.grad(logp, delta)
            with torch.no_grad():
                delta += 2.5 * r / steps * g.sign()
                delta.clamp_(-r, r)
                delta.copy_((x + delta).clamp(lo, hi) - x)
    for m, mode in modes.items():
        m.training = mode
    return (x + delta).detach()


def distill_loss(student_logits: torch.Tensor, guide_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(guide_logits / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def allowed_drop(tau: float, start: float, n: int) -> float:
    """τ plus two standard errors of the difference of two accuracies near `start` on `n` held-out samples: on a
    small D_c (a 10k demo holds out ~160 images) a few flipped predictions are noise, not a lost model."""
    return tau + 2 * float(np.sqrt(2 * start * (1 - start) / max(n, 1)))


def step_lr(config: UnlearnConfig, step: int, total: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total`: constant, or decayed linearly to zero."""
    return config.lr * (1 - step / total) if config.lr_decay else config.lr


def hold_out(clean: np.ndarray, share: float, rng: np.random.Generator, groups: np.ndarray | None = None,
             labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(held, rest): a random `share` of the clean indices held out to watch clean accuracy (sorted), and the rest.
    With `groups` (one id per training sample, `ImageSet.groups`) whole groups are held out, at least `share` of
    D_c, so that no frame of a held-out GTSRB sign is trained on: near-copies on both sides would flatter the
    held-out accuracy and hide a falling one. With `labels` too, a class's last group in D_c is never held out:
    the class keeps something to relearn (a small GTSRB class may have one track in D_c)."""
    clean = rng.permutation(clean)
    n_hold = int(round(share * len(clean)))
    if groups is None:
        return np.sort(clean[:n_hold]), clean[n_hold:]
    g = np.asarray(groups)[clean]
    ids, first, sizes = np.unique(g, return_index=True, return_counts=True)
    cls = np.asarray(labels)[clean][first] if labels is not None else np.zeros(len(ids), np.int64)
    left = dict(zip(*np.unique(cls, return_counts=True)))  # groups of each class still on the training side
    taken, total = [], 0
    for i in rng.permutation(len(ids)):  # one step per group (GTSRB: ~1,300), not per sample
        if total >= n_hold:
            break
        if labels is not None and left[cls[i]] <= 1:
            continue
        left[cls[i]] -= 1
        taken.append(ids[i])
        total += sizes[i]
    held = np.isin(g, taken)
    return np.sort(clean[held]), clean[~held]


def unlearn(model: nn.Module, images: np.ndarray, labels: np.ndarray, s: Split, guide_logits: np.ndarray,
            config: UnlearnConfig, num_classes: int, extra_eval=None, groups: np.ndarray | None = None
            ) -> UnlearnResult:
    """Fine-tune a copy of `model` by CGD's objective. `extra_eval(model) -> dict` (optional) is logged each
    epoch for analysis only; it never influences training or stopping. `groups` (optional, one id per sample):
    the held-out slice takes whole groups (`hold_out`)."""
    if len(s.clean) == 0:
        raise CGDError("the clean subset D_c is empty: nothing to relearn from")
    if not np.isfinite(guide_logits).all():
        raise CGDError("guide logits contain NaN or infinity")
    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    labels = np.asarray(labels, dtype=np.int64)

    held, train_clean = hold_out(s.clean, config.holdout, rng, groups, labels)
    n_hold = len(held)
    prior = torch.softmax(torch.from_numpy(np.asarray(guide_logits, np.float32)), 1).mean(0).numpy() \
        if config.prior == "guide" else None
    relearn = oversample_clean(train_clean, labels, num_classes, seed=config.seed, prior=prior)
    poison = s.poison

    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, config.lr, config.momentum, config.weight_decay)
    x_all = torch.from_numpy(np.array(images))
    y_all = torch.from_numpy(labels.copy())
    g_all = torch.from_numpy(np.asarray(guide_logits, dtype=np.float32))
    steps = (len(relearn) + config.batch_size - 1) // config.batch_size
    pb = config.poison_batch or max(1, int(round(config.batch_size * len(poison) / max(len(relearn), 1))))
    gen = torch.Generator().manual_seed(config.seed)
    epochs = max(config.epochs, -(-config.min_steps // steps))
    total = min(steps * epochs, config.max_steps or steps * epochs)

    def held_acc(m):
        return accuracy(m, images[held], labels[held]) if n_hold else float("nan")

    start = held_acc(model)
    history = [{"epoch": 0, "held_acc": start, **(extra_eval(model) if extra_eval else {})}]
    best, stopped, done_steps = copy.deepcopy(model.state_dict()), False, 0
    for epoch in range(1, epochs + 1):
        model.train()
        if config.freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        order = rng.permutation(relearn)
        p_order = rng.permutation(poison) if len(poison) else poison
        sums = {"re": 0.0, "un": 0.0, "distill": 0.0, "relabel": 0.0}
        for b in progress(range(steps), desc=f"unlearn epoch {epoch}/{epochs}"):
            ic = torch.from_numpy(order[b * config.batch_size:(b + 1) * config.batch_size])
            x = augment(to_input(x_all[ic]), config.augment, gen)
            if len(poison) and (config.lambda_un or config.lambda_distill or config.relabel):
                j = (b * pb) % len(p_order)
                ip = torch.from_numpy(np.take(p_order, np.arange(j, j + pb), mode="wrap"))
                xp = augment(to_input(x_all[ip]), config.augment, gen)
                if config.amplify_eps:  # each image beside its amplified copy (an amplified confident sample
                    # alone gives log-p's push less to act on)
                    xp = torch.cat([xp, amplify(model, xp, y_all[ip], config.amplify_eps, config.amplify_steps)])
                logits = model(torch.cat([x, xp]))
                lc, lp, la = logits[:len(ic)], logits[len(ic):len(ic) + len(ip)], logits[len(ic) + len(ip):]
                l_un = unlearning_loss(lp, y_all[ip], config.unlearn_loss, config.eps)
                if len(la):  # the copies' term at the full weight, beside the originals'
                    l_un = l_un + unlearning_loss(la, y_all[ip], config.unlearn_loss, config.eps)
                l_di = distill_loss(lp, g_all[ip], config.temperature)
                l_rl = relabel_loss(lp, y_all[ip], g_all[ip], config.label_smoothing) if config.relabel \
                    else torch.zeros(())
            else:
                lc = model(x)
                l_un = l_di = l_rl = torch.zeros(())
            l_re = F.cross_entropy(lc, y_all[ic], label_smoothing=config.label_smoothing)
            loss = l_re + config.lambda_un * l_un + config.lambda_distill * l_di + config.relabel * l_rl
            for group in opt.param_groups:
                group["lr"] = step_lr(config, done_steps, total)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (("re", l_re), ("un", l_un), ("distill", l_di), ("relabel", l_rl)):
                sums[k] += float(v.detach()) / steps
            done_steps += 1
            if config.max_steps and done_steps >= config.max_steps:
                break
        acc = held_acc(model)
        history.append({"epoch": epoch, "held_acc": acc, **{f"loss_{k}": v for k, v in sums.items()},
                        **(extra_eval(model) if extra_eval else {})})
        last = epoch == epochs or bool(config.max_steps and done_steps >= config.max_steps)
        # With the decay, mid-run epochs still run at a high learning rate and dip before they recover: only the
        # final model is judged, against the starting one.
        judged = last or not config.lr_decay
        if n_hold and judged and start - acc > allowed_drop(config.tau, start, n_hold):
            model.load_state_dict(best)
            stopped = True
            break
        if not config.lr_decay:
            best = copy.deepcopy(model.state_dict())
        if last:
            break
    return UnlearnResult(model.eval(), history, stopped, time.perf_counter() - t0, asdict(config))


@dataclass(frozen=True)
class TriggerEstimate:
    """What a split says the trigger looks like: `residual` (H, W, C float32, pixel units) is the mean of D_p's
    images in `target` (the class D_p takes the largest share of, or the one asked for) minus the mean of the D_c
    images of the classes the guide sees in them; `probe` holds the indices of D_c images of other classes it is
    added to."""

    target: int
    residual: np.ndarray
    probe: np.ndarray


def estimate_trigger(images: np.ndarray, labels: np.ndarray, s: Split, guide_logits: np.ndarray, *,
                     num_classes: int, n_probe: int = 1000, seed: int = 0, target: int | None = None
                     ) -> TriggerEstimate | None:
    """The split's trigger estimate (`TriggerEstimate`), or None when the suspected target has no D_p images
    the guide sees a class with D_c images in, or no other class has D_c images. Reads the split and the guide,
    never a poison mask. Each D_p image is compared with D_c's mean image of the class the guide sees in it: a
    relabelled image (dirty label) with its source class, a clean-label one with its own class, so the objects
    cancel and an additive trigger (a patch, a blend, a signal) stays; a warp or a per-image trigger leaves
    little, and the check then rarely escalates."""
    labels = np.asarray(labels)
    target = suspected_target(labels, s.poison, num_classes) if target is None else target
    dp = s.poison[labels[s.poison] == target]
    seen = np.asarray(guide_logits)[dp].argmax(1)
    n_clean = np.bincount(labels[s.clean], minlength=num_classes)
    dp, seen = dp[n_clean[seen] > 0], seen[n_clean[seen] > 0]
    others = s.clean[labels[s.clean] != target]
    if not (len(dp) and len(others)):
        return None
    reference = np.zeros(images.shape[1:], np.float64)
    for c, n in zip(*np.unique(seen, return_counts=True)):  # at most num_classes means
        reference += n / len(dp) * images[s.clean[labels[s.clean] == c]].mean(0, dtype=np.float64)
    residual = (images[dp].mean(0, dtype=np.float64) - reference).astype(np.float32)
    probe = np.sort(np.random.default_rng(seed).choice(others, min(n_probe, len(others)), replace=False))
    return TriggerEstimate(target, residual, probe)


def trigger_response(model: nn.Module, images: np.ndarray, est: TriggerEstimate, scale: float) -> float:
    """Share of the probe images, the estimate added `scale` times (clipped to [0, 255]), that `model` sends to
    the suspected target."""
    x = np.clip(images[est.probe] + scale * est.residual, 0, 255).astype(np.uint8)
    return float((predict_logits(model, x).argmax(1) == est.target).mean())


def unlearn_checked(model: nn.Module, images: np.ndarray, labels: np.ndarray, s: Split, guide_logits: np.ndarray,
                    config: UnlearnConfig, num_classes: int, log=print, **kwargs) -> UnlearnResult:
    """`unlearn`, then with `config.escalate` the trigger check: while the split's trigger estimate still moves
    more than `escalate_at` of its probe images to the suspected target, unlearning is redone from `model` at
    twice λ_un; with `escalate_classes` > 1 an estimate is made for each of that many classes D_p is richest in
    and the largest response counts. A stronger pass that the held-out slice stops is not taken: the last complete
    one is returned.
    Each round's λ_un and response are in the result's `checks`. Why: a trigger planted weaker than it is used
    at test time (Ada-SIG) outlives the default weight, while a stronger constant weight costs clean accuracy
    where it is not needed (docs/benchmarks.md, issue 13)."""
    res = unlearn(model, images, labels, s, guide_logits, config, num_classes, **kwargs)
    if not config.escalate:
        return res
    richest = np.argsort(-dp_shares(labels, s.poison, num_classes), kind="stable")[:config.escalate_classes]
    ests = [e for c in richest
            if (e := estimate_trigger(images, labels, s, guide_logits, num_classes=num_classes, seed=config.seed,
                                      target=int(c))) is not None]
    if not ests:
        return res
    cfg, checks, first_s, t0 = config, [], res.seconds, time.perf_counter()
    for rnd in range(config.escalate + 1):
        responses = [trigger_response(res.model, images, e, config.escalate_scale) for e in ests]
        top = int(np.argmax(responses))
        response, target = responses[top], ests[top].target
        checks.append({"lambda_un": cfg.lambda_un, "response": response, "target": target,
                       **({"responses": dict(zip((e.target for e in ests), responses))} if len(ests) > 1 else {})})
        log(f"trigger check: λ_un {cfg.lambda_un:g} leaves response {response:.3f} to the estimate "
            f"(target {target}; escalate above {config.escalate_at:g})")
        if response <= config.escalate_at or rnd == config.escalate:
            break
        cfg = replace(cfg, lambda_un=2 * cfg.lambda_un)
        nxt = unlearn(model, images, labels, s, guide_logits, cfg, num_classes, **kwargs)
        if nxt.stopped_early:
            checks.append({"lambda_un": cfg.lambda_un, "stopped_early": True})
            log(f"trigger check: λ_un {cfg.lambda_un:g} was stopped by the held-out slice; keeping "
                f"λ_un {cfg.lambda_un / 2:g}")
            break
        res = nxt
    res.checks, res.seconds = checks, first_s + time.perf_counter() - t0  # every pass and check
    return res

"""Clean-image attacks: only labels change in the training set; the images stay exactly as they were.

* FLIP (Jha, Hayase & Oh 2023, "Label poisoning is all you need"): an expert is trained on a BadNets-poisoned copy of
  the data; soft labels of the clean images are optimised so that one SGD step on (clean image, soft label) moves the
  expert's checkpoints like one step on the expert's poisoned batch (trajectory matching); the labels whose learned
  target logit most exceeds the true one are flipped. Test trigger: the expert's BadNets patch.
* GCB (Xu et al. 2025, "Generative Clean-Image Backdoors", C-InfoGAN): a generator G(x, c) learns an image feature
  switched on by a bit c, a class-conditional discriminator keeps G(x, c) on the data manifold, and a recognition
  network Q(x, y) learns to read c back; the training images Q scores highest already carry the feature naturally and
  are relabelled to the target. Test trigger: G(x, c=1).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import CGDError
from ..data import ImageSet
from ..tensors import normalize, predict_logits
from ..train import TrainConfig, train
from .base import ATTACKS, Attack
from .classic import BadNets
from .learned import _classifier
from .resources import (Resource, Timer, batches, fingerprint, get_or_create, get_or_create_on, load_module,
                        map_batches, module_arrays, pad_to_multiple, random_flip, seeded, to_unit,
                        training_subset)

log = logging.getLogger("cgd.attacks")


class _LabelOnly(Attack):
    """Shared poisoning step: flip the `rate`·N highest-scoring non-target labels to the target; images untouched."""

    clean_image = True
    learned = True

    def scores(self, ds: ImageSet) -> np.ndarray:
        """One score per training sample (after `prepare(ds)`): the highest non-target ones are relabelled."""
        raise NotImplementedError

    def choose(self, ds: ImageSet, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        s = np.asarray(self.scores(ds), dtype=np.float64)
        tie = rng.random(len(pool))  # highest score first; ties broken by a seeded random key, deterministically
        return np.sort(pool[np.lexsort((tie, -s[pool]))[:n]])


# ============================================================================================= FLIP

@ATTACKS.register("flip")
class FLIP(_LabelOnly):
    """FLIP clean-image attack; see the module docstring. Labels are optimised on one expert trajectory, then the
    `rate`·N non-target images with the largest (learned target logit − learned true-class logit) are relabelled to
    the target (all-to-one). Test trigger: the BadNets patch the expert was poisoned with."""

    name = "flip"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, size: int = 3, margin: int = 0,
                 value: int = 255, expert: str = "fastnet", expert_kwargs: dict | None = None,
                 expert_epochs: int = 6, expert_batch_size: int = 256, expert_poison_rate: float = 0.1,
                 iterations: int = 3, label_lr: float = 150.0, label_momentum: float = 0.5,
                 one_hot_temp: float = 5.0, match_batch_size: int = 256):
        super().__init__(target, rate, seed)
        self.size, self.margin, self.value = int(size), int(margin), int(value)
        self.expert, self.expert_kwargs = str(expert), dict(expert_kwargs or {})
        self.expert_epochs, self.expert_batch_size = int(expert_epochs), int(expert_batch_size)
        self.expert_poison_rate = float(expert_poison_rate)
        self.iterations, self.label_lr, self.label_momentum = int(iterations), float(label_lr), float(label_momentum)
        self.one_hot_temp, self.match_batch_size = float(one_hot_temp), int(match_batch_size)
        if self.iterations < 1 or self.iterations > self.expert_epochs:
            raise CGDError(f"flip: iterations must be in 1..expert_epochs ({self.expert_epochs}); got {iterations}")
        self._badnets = BadNets(target, 0.5, seed, size=self.size, margin=self.margin, value=self.value)
        self._logits: np.ndarray | None = None

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        return self._badnets.apply_trigger(images)

    def _expert_params(self) -> dict[str, Any]:
        return {"target": self.target, "size": self.size, "margin": self.margin, "value": self.value,
                "model": self.expert, "model_kwargs": self.expert_kwargs, "epochs": self.expert_epochs,
                "batch_size": self.expert_batch_size, "poison_rate": self.expert_poison_rate}

    def _label_params(self) -> dict[str, Any]:
        return {"expert": self._expert_params(), "iterations": self.iterations, "label_lr": self.label_lr,
                "label_momentum": self.label_momentum, "one_hot_temp": self.one_hot_temp,
                "batch_size": self.match_batch_size}

    def _expert_set(self, ds: ImageSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The expert's training set: all clean images plus BadNets copies of a random share of the non-target
        images labelled `target` (FLIP adds poisons rather than replacing). Returns (images, labels, source index
        of each row in `ds`)."""
        rng = np.random.default_rng(self.seed)
        pool = np.flatnonzero(ds.labels != self.target)
        k = min(len(pool), int(round(self.expert_poison_rate * len(ds))))
        src = np.sort(rng.choice(pool, size=k, replace=False))
        images = np.concatenate([ds.images, self.apply_trigger(ds.images[src])])
        labels = np.concatenate([ds.labels, np.full(k, self.target, dtype=np.int64)])
        return images, labels, np.concatenate([np.arange(len(ds)), src])

    def expert_trajectory(self, ds: ImageSet, fp: str | None = None) -> tuple[list[dict[str, torch.Tensor]], Resource]:
        """The expert's state after every epoch (index 0 = initialisation), trained with `cgd.train.train`."""
        fp = fp or fingerprint(ds)

        def build():
            seeded(self.seed)
            model = _classifier(self.expert, self.expert_kwargs, ds.num_classes)
            states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
            images, labels, _ = self._expert_set(ds)

            def keep(epoch, m):
                states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
                return {}

            cfg = TrainConfig(epochs=self.expert_epochs, batch_size=self.expert_batch_size, seed=self.seed)
            res = train(model, images, labels, cfg, on_epoch=keep, desc="flip expert")
            arrays = {}
            for e, st in enumerate(states):
                arrays.update({f"e{e}.{k}": v.contiguous().numpy().copy() for k, v in st.items()})
            trig = self.apply_trigger(ds.images[ds.labels != self.target][:1000])
            hit = predict_logits(res.model, trig, batch_size=500).argmax(1) == self.target
            asr = float(hit.mean()) if len(trig) else float("nan")
            return arrays, {"epoch_seconds": res.epoch_seconds, "expert_train_asr": asr}

        r = get_or_create("flip-expert", self._expert_params(), self.seed, ds, build, fp)
        states = []
        for e in range(self.expert_epochs + 1):
            p = f"e{e}."
            states.append({k[len(p):]: torch.from_numpy(np.array(v)) for k, v in r.arrays.items() if k.startswith(p)})
        return states, r

    def prepare(self, ds: ImageSet) -> list[Resource]:
        self.check_target(ds)
        fp = fingerprint(ds)

        def build(states, r_exp):
            t = Timer()
            logits, losses = self._match(ds, states)
            return {"logits": logits}, {"matching_seconds": t(), "loss_first": losses[:5], "loss_last": losses[-5:],
                                        "expert": r_exp.meta["info"]}

        r, touched = get_or_create_on(lambda: self.expert_trajectory(ds, fp), "flip", self._label_params(), self.seed,
                                      ds, build, fp)
        self._logits, self._fp = r.arrays["logits"], fp
        return touched

    def _match(self, ds: ImageSet, states: list[dict[str, torch.Tensor]]) -> tuple[np.ndarray, list[float]]:
        """Optimise soft labels (logits, N×C) by one-step trajectory matching against the expert checkpoints."""
        gen = seeded(self.seed + 1)
        images, labels, src = self._expert_set(ds)
        x_exp = torch.tensor(images)
        y_exp = torch.from_numpy(labels)
        x_clean = torch.tensor(np.ascontiguousarray(ds.images))
        n_cls = ds.num_classes
        init = F.one_hot(torch.tensor(ds.labels), n_cls).float()
        syn = (init * self.one_hot_temp).requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=self.label_lr, momentum=self.label_momentum)
        model = _classifier(self.expert, self.expert_kwargs, n_cls)
        # start points spread over the trajectory (the last state is an end point, never a start)
        starts = np.unique(np.linspace(0, self.expert_epochs - 1, self.iterations).round().astype(int))
        src_t = torch.from_numpy(src)
        losses: list[float] = []
        for s in starts:
            model.load_state_dict(states[int(s)])  # parameters never step here, only the labels do
            model.train()
            for b in batches(len(labels), self.match_batch_size, gen):
                flip = torch.rand(len(b), generator=gen) < 0.5  # the same augmentation for both sides
                xe = normalize(x_exp[b].permute(0, 3, 1, 2).float() / 255)
                xs = normalize(x_clean[src_t[b]].permute(0, 3, 1, 2).float() / 255)
                xe = torch.where(flip[:, None, None, None], xe.flip(3), xe)
                xs = torch.where(flip[:, None, None, None], xs.flip(3), xs)
                q = torch.softmax(syn[src_t[b]], dim=1)
                grad_q, loss = matching_grad(model, xe, y_exp[b], xs, q.detach())
                opt.zero_grad(set_to_none=True)
                q.backward(grad_q)
                opt.step()
                losses.append(round(loss, 5))
        return syn.detach().numpy().astype(np.float32), losses

    def scores(self, ds: ImageSet) -> np.ndarray:
        lg = self._logits
        return lg[:, self.target] - lg[np.arange(len(lg)), ds.labels]


def matching_grad(model: nn.Module, xe: torch.Tensor, ye: torch.Tensor, xs: torch.Tensor, q: torch.Tensor
                  ) -> tuple[torch.Tensor, float]:
    """FLIP's one-step trajectory-matching loss and its gradient with respect to the soft labels q (B×C).

    From a checkpoint θ (with the expert's optimiser state) one SGD step on the expert's poisoned batch (xe, ye) and
    one on the clean images xs with soft labels q differ by lr·(g_s − g_e), so the matching loss is
    ‖g_s(q) − g_e‖² / ‖g_e‖². g_s is linear in q, hence ∂/∂q_ic = 2/(B‖g_e‖²)·⟨g_s − g_e, ∇θ ℓ_ic⟩ with
    ℓ_ic = −log p_c(x_i; θ): the inner products for every sample and class come from one forward-mode pass (a
    Jacobian-vector product along g_s − g_e). Same gradient as FLIP's double backward (tested), about half the cost.
    `model` is used in its current (train) mode; its parameters are not changed."""
    from torch.func import functional_call, jvp

    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    g_e = torch.autograd.grad(F.cross_entropy(model(xe), ye), params)
    loss_s = -(q * F.log_softmax(model(xs), dim=1)).sum(1).mean()
    g_s = torch.autograd.grad(loss_s, params)
    v = {k: a - e for k, a, e in zip(names, g_s, g_e)}
    den = float(sum((e ** 2).sum() for e in g_e)) + 1e-12
    buffers = dict(model.named_buffers())

    def nll(p):  # train-mode BN updates fresh copies of its running statistics, never the model's
        return -F.log_softmax(functional_call(model, (p, {k: t.clone() for k, t in buffers.items()}), (xs,)), dim=1)

    with warnings.catch_warnings():  # torch's forward-AD decompositions still use torch.jit.script internally
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        _, dl = jvp(nll, ({k: p.detach() for k, p in zip(names, params)},), (v,))
    loss = float(sum((t ** 2).sum() for t in v.values())) / den
    return dl * (2.0 / (len(xs) * den)), loss


# ============================================================================================== GCB

class _Down(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class _Up(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.conv(torch.cat([x, skip], 1))


class TriggerUNet(nn.Module):
    """G(x, c): a three-level U-Net on (image, c-plane) whose output is added to the image. The last layer starts at
    zero, so G starts as the identity and keeps the image's appearance; c switches the learned feature on."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.inc = nn.Sequential(nn.Conv2d(4, w, 3, padding=1), nn.LeakyReLU(0.2))
        self.d1, self.d2 = _Down(w, 2 * w), _Down(2 * w, 4 * w)
        self.u2, self.u1 = _Up(6 * w, 2 * w), _Up(3 * w, w)
        self.out = nn.Conv2d(w, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.to(memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU

    def forward(self, x01: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x01, 4)
        plane = c.float().view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        a = self.inc(torch.cat([x - 0.5, plane * 2 - 1], 1).contiguous(memory_format=torch.channels_last))
        b = self.d1(a)
        d = self.d2(b)
        u = self.u1(self.u2(d, b), a)
        return (x + self.out(u)).clamp(0, 1)[..., :h, :w]


class ProjectionNet(nn.Module):
    """A small conv net with a class-projection head: f(x)·w + f(x)·embed(y) (a class-conditional score)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.LeakyReLU(0.2))
        self.lin = nn.Linear(4 * w, 1)
        self.embed = nn.Embedding(num_classes, 4 * w)
        self.to(memory_format=torch.channels_last)

    def forward(self, x01: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.body(normalize(x01).contiguous(memory_format=torch.channels_last)).sum(dim=(2, 3)) / 16.0
        return self.lin(f).squeeze(1) + (self.embed(y) * f).sum(1)


@ATTACKS.register("gcb")
class GCB(_LabelOnly):
    """Generative clean-image backdoor with a conditional InfoGAN; see the module docstring. Loss
    L = L_GAN + λ·L_info (non-saturating GAN loss, binary cross-entropy for c). The `rate`·N non-target training
    images with the highest Q(x, y) are relabelled to the target; test trigger G(x, c=1)."""

    name = "gcb"

    def __init__(self, target: int = 0, rate: float = 0.05, seed: int = 0, epochs: int = 10, batch_size: int = 128,
                 lr: float = 2e-4, lambda_info: float = 1.0, width: int = 16, train_subset: int | None = 10000):
        super().__init__(target, rate, seed)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.lambda_info, self.width = float(lambda_info), int(width)
        self.train_subset = None if train_subset is None else int(train_subset)
        self._G: TriggerUNet | None = None
        self._scores: np.ndarray | None = None

    def _resource_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ["epochs", "batch_size", "lr", "lambda_info", "width", "train_subset"]}

    def prepare(self, ds: ImageSet) -> list[Resource]:
        # C-InfoGAN does not depend on the target: one trained GAN serves every target and rate
        fp = fingerprint(ds)
        r = get_or_create("gcb", self._resource_params(), self.seed, ds, lambda: self._train(ds), fp)
        self._G = load_module(TriggerUNet(self.width), r.arrays, "G")
        self._scores, self._fp = r.arrays["scores"], fp
        return [r]

    def _train(self, ds: ImageSet):
        sub = training_subset(ds, self.train_subset, self.seed)
        gen = seeded(self.seed)
        n_cls = ds.num_classes
        G, D, Q = TriggerUNet(self.width), ProjectionNet(n_cls, self.width), ProjectionNet(n_cls, self.width)
        opt_d = torch.optim.Adam(D.parameters(), self.lr, betas=(0.5, 0.999))
        opt_gq = torch.optim.Adam([*G.parameters(), *Q.parameters()], self.lr, betas=(0.5, 0.999))
        x_all = to_unit(sub.images)
        y_all = torch.tensor(np.asarray(sub.labels, dtype=np.int64))
        bce = F.binary_cross_entropy_with_logits
        t = Timer()
        last = {}
        for _ in range(self.epochs):
            for b in batches(len(sub), self.batch_size, gen):
                x, y = random_flip(x_all[b], gen), y_all[b]
                c = (torch.rand(len(b), generator=gen) < 0.5).float()
                fake = G(x, c)
                # discriminator: real vs generated, both conditioned on the class
                d_real, d_fake = D(x, y), D(fake.detach(), y)
                loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                # generator + recognition network: fool D, and make c recoverable from G(x, c)
                d_fake = D(fake, y)
                loss_gan = bce(d_fake, torch.ones_like(d_fake))
                loss_info = bce(Q(fake, y), c)
                loss_g = loss_gan + self.lambda_info * loss_info
                opt_gq.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_gq.step()
                last = {"loss_d": loss_d.item(), "loss_gan": loss_gan.item(), "loss_info": loss_info.item()}
        G.eval()
        Q.eval()
        scores = []
        y_full = torch.tensor(np.asarray(ds.labels, dtype=np.int64))
        with torch.no_grad():  # every training image is scored, not only the subset the GAN saw
            for i in range(0, len(ds), 500):
                scores.append(Q(to_unit(ds.images[i:i + 500]), y_full[i:i + 500]))
            k = min(len(sub), 500)
            on = Q(G(x_all[:k], torch.ones(k)), y_all[:k])
            off = Q(G(x_all[:k], torch.zeros(k)), y_all[:k])
            q_acc = float(((on > 0).float().mean() + (off <= 0).float().mean()) / 2)
            l1 = float((G(x_all[:k], torch.ones(k)) - x_all[:k]).abs().mean() * 255)
        info = {"seconds": t(), "last_batch": last, "q_accuracy_on_generated": q_acc, "trigger_mean_abs_255": l1}
        return {**module_arrays("G", G), **module_arrays("Q", Q), "scores": torch.cat(scores).numpy()}, info

    def scores(self, ds: ImageSet) -> np.ndarray:
        return self._scores

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        if self._G is None:
            raise CGDError("gcb: the trigger generator is trained on the training set: call poison(train) or "
                           "prepare(train) before apply_trigger")
        G = self._G
        return map_batches(lambda x: G(x, torch.ones(len(x))), images)

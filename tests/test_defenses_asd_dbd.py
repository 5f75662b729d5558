"""ASD and DBD on tiny data: their shared semi-supervised parts (SCE, MixMatch's pieces), DBD's SimCLR parts, then
ASD whole and DBD up to its warm-up split on a tiny BadNets set — the poison stays out of the labeled pool (and ASD's
network learns no backdoor), over several seeds since one seed's outcome depends on the CPU's kernels — and the `*_core_step_is_what_the_test_sees` controls: with ASD's loss-guided split replaced by a random
one, or DBD's SimCLR encoder left untrained, the poison enters the pool and the assertions fail."""

import math

import numpy as np
import pytest
import torch

from cgd import CGDError, attacks, defenses
from cgd.data import ImageSet
from cgd.defenses import asd, dbd, semisup
from cgd.pipeline import SPLIT_OUTPUTS, defend
from cgd.split import Split, detection_metrics
from cgd.tensors import accuracy, denormalize

from conftest import synthetic
from test_defenses_abl_ibau import faint, stand_in_victim
from test_defenses_reback import tiny_victim
from test_pipeline import tiny_cfg

HUES = np.array([[230, 20, 20], [120, 230, 20], [20, 230, 230], [120, 20, 230]])  # hues 90° apart


def hues(n: int, seed: int, size: int = 16, side: int = 6) -> ImageSet:
    """Four classes told apart by the colour of a square (hues 90° apart) at a random place on noise: what SimCLR's
    views keep (crops and flips move a square, ±36° of hue jitter does not merge two classes). `faint`'s classes,
    told apart by *where* a square sits, are what SimCLR's crops and flips are built to forget."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    x = rng.integers(0, 100, size=(n, size, size, 3)).astype(np.int16)
    r0, c0 = rng.integers(0, size - side + 1, (2, n))
    pos = np.arange(size)
    rows = (pos >= r0[:, None]) & (pos < r0[:, None] + side)
    cols = (pos >= c0[:, None]) & (pos < c0[:, None] + side)
    inside = rows[:, :, None] & cols[:, None, :]
    x = np.where(inside[..., None], HUES[labels][:, None, None, :], x)
    return ImageSet(x.astype(np.uint8), labels.astype(np.int64), ["red", "lime", "cyan", "violet"])


def badnets(clean: ImageSet):
    return attacks.get("badnets", target=0, rate=0.1, seed=0).poison(clean)


def asr(model, ps, test) -> float:
    bd = ps.triggered_test(test)
    return accuracy(model, bd.images, bd.labels)


# ------------------------------------------------------------------------------------------------ shared parts

def test_sce_is_alpha_ce_plus_beta_rce():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)
    ce = -torch.log(p[[0, 1], y])
    rce = -math.log(1e-4) * (1 - p[[0, 1], y])  # −Σ_k p_k log(max(onehot_k, 1e-4))
    got = semisup.sce_loss(logits, y, 0.1, 1.0, reduction="none")
    assert torch.allclose(got, 0.1 * ce + rce)
    assert torch.isclose(semisup.sce_loss(logits, y, 0.1, 1.0), got.mean())
    assert torch.allclose(semisup.sce_loss(logits, y, 1.0, 0.0, reduction="none"), ce)
    # RCE is bounded (≤ −log 1e-4 · (1 − 1/C) at chance): a confident wrong label costs ~9.2, not ∞
    wrong = semisup.sce_loss(torch.tensor([[50.0, 0.0]]), torch.tensor([1]), 0.0, 1.0)
    assert torch.isclose(wrong, torch.tensor(-math.log(1e-4)), rtol=1e-4)


def test_sharpen_mixup_and_the_mixmatch_losses():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    s = semisup.sharpen(p, 0.5)
    assert torch.allclose(s, p ** 2 / (p ** 2).sum()) and s[0, 0] > p[0, 0]
    x, t = torch.arange(8.0).view(4, 2), torch.eye(4)
    mx, mt = semisup.mixup(x, t, 0.2, torch.Generator().manual_seed(0))  # λ kept ≥ 0.5: 0.8 of each row's own
    assert torch.allclose(mt.sum(1), torch.ones(4)) and torch.all(mt.diagonal() >= 0.8 - 1e-6)
    assert torch.allclose(mx.sum(), x.sum())  # a permutation's convex mix keeps the batch's total
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    lx, lu = semisup.mixmatch_losses(logits, targets, 1)
    assert torch.isclose(lx, -torch.log_softmax(logits[0], 0)[0])
    q = torch.softmax(logits[1:], 1)
    assert torch.isclose(lu, ((q - targets[1:]) ** 2).mean())  # over every element of the unlabeled rows


def test_batches_cycle_like_drop_last_loaders():
    gen = torch.Generator().manual_seed(0)
    out = semisup.batches(np.arange(10, 20), 4, 5, gen)
    assert [len(b) for b in out] == [4] * 5
    assert len(set(out[0].tolist()) | set(out[1].tolist())) == 8  # one pass: disjoint batches, the tail dropped
    assert set(torch.cat(out).tolist()) <= set(range(10, 20))
    small = semisup.batches(np.array([3, 7]), 4, 3, gen)
    assert all(sorted(b.tolist()) == [3, 7] for b in small)  # a pool below a batch: all of it, each step
    with pytest.raises(CGDError, match="non-empty"):
        semisup.batches(np.zeros(0, np.int64), 4, 1, gen)


def test_mixmatch_checks_its_settings():
    for bad, what in [({"iterations": 0}, "iterations"), ({"temperature": 0.0}, "temperature"),
                      ({"augment": "rotate"}, "augment"), ({"lambda_u": -1.0}, "lambda_u")]:
        with pytest.raises(CGDError, match=f"mixmatch: needs .*{what}"):
            semisup.MixMatch(**bad)
    with pytest.raises(CGDError, match="mixmatch: batch_size must be an integer"):
        semisup.MixMatch(batch_size=6.4)


def test_per_class_lowest_and_the_class_aware_schedule():
    losses = np.array([0.5, 0.1, 0.9, 0.2, 0.3, 0.05, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    assert asd.per_class_lowest(losses, labels, 2).tolist() == [0, 1, 3, 5]
    assert asd.per_class_lowest(losses, labels, 1, np.array([0, 2, 4, 6])).tolist() == [0, 4]
    assert asd.per_class_lowest(losses, labels, 5).tolist() == list(range(7))  # a class short of k: all of it
    pool = asd.class_aware_pool(losses, labels, np.array([2, 6]), 1)  # the seeds, + the lowest other per class
    assert pool.tolist() == [1, 2, 5, 6]
    assert [asd.choice_num(e, 5, 10) for e in (0, 4, 5, 59)] == [0, 0, 10, 110]  # official: 10 → 120 per class
    assert semisup.lowest(losses, 0.5).tolist() == [1, 3, 5]


def test_meta_split_trains_only_the_later_stages(stand_in):
    params, names = asd.meta_parameters(stand_in.model)
    got = {id(p) for p in params}
    chosen = {n for n, p in stand_in.model.named_parameters() if id(p) in got}
    assert chosen and all(n.startswith(("groups.1.", "groups.2.", "head.")) for n in chosen)
    assert "head.weight" in chosen and not any(n.startswith(("stem", "groups.0")) for n in chosen)


# ------------------------------------------------------------------------------------------------ DBD's SimCLR

def test_simclr_loss_is_the_positive_s_softmax_among_all_other_views():
    z = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    same = dbd.simclr_loss(z[:1].expand(4, 8), z[:1].expand(4, 8), 0.5)
    assert torch.isclose(same, torch.tensor(math.log(7.0)))  # all alike: 1 positive among 2B − 1 = 7
    eye = torch.eye(4)
    aligned = dbd.simclr_loss(eye, eye, 0.5)  # each view's twin identical, the others orthogonal
    assert aligned < dbd.simclr_loss(eye, eye.roll(1, 0), 0.5)
    assert torch.isclose(aligned, -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 6)))


def test_simclr_views_are_batched_random_augmentations():
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(dbd.hsv_to_rgb(dbd.rgb_to_hsv(x)), x, atol=1e-5)
    assert torch.allclose(dbd.gaussian_blur(x, torch.full((5,), 0.1)), x, atol=1e-4)  # σ 0.1: (almost) none
    blurred = dbd.gaussian_blur(x, torch.full((5,), 2.0))
    assert blurred.std() < 0.6 * x.std() and torch.allclose(blurred.mean(), x.mean(), atol=0.02)
    same = dbd.color_jitter(x, torch.Generator().manual_seed(0), (0.4, 0.4, 0.4, 0.1), 0.0)
    assert torch.equal(same, x)  # p 0: untouched
    imgs = torch.from_numpy(np.array(hues(16, 0).images))
    a = dbd.simclr_views(imgs, torch.Generator().manual_seed(0))
    b = dbd.simclr_views(imgs, torch.Generator().manual_seed(0))
    c = dbd.simclr_views(imgs, torch.Generator().manual_seed(1))
    assert a.shape == (16, 3, 16, 16) and torch.equal(a, b) and not torch.allclose(a, c)
    px = denormalize(a)
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5
    theta = dbd.crop_flip_theta(1000, torch.Generator().manual_seed(0))
    area = theta[:, 0, 0].abs() * theta[:, 1, 1]
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1.0 and 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6


# ------------------------------------------------------------------------------------------------ ASD

# tiny data, few steps: 60 MixMatch steps of 32 per epoch; Adam at 0.01 (the official 0.002 needs more steps than a
# test has); the virtual model at batch 16 (at the official 128 its epoch over 800 images is 7 steps)
ASD_TINY = dict(iterations=60, batch_size=32, n=20, lr=0.01, meta_batch_size=16, augment="flip")


@pytest.fixture(scope="module")
def stand_in():
    return stand_in_victim(800)


@pytest.fixture(scope="module")
def sq_poisoned():
    """`faint`'s squares at +40: the tiny victim learns them and the BadNets corner (CA ≈ 1, ASR 1)."""
    return badnets(faint(800, 0, contrast=40))


@pytest.fixture(scope="module")
def sq_test():
    return faint(400, 100, contrast=40)


@pytest.fixture(scope="module")
def sq_victim(sq_poisoned):
    return tiny_victim(sq_poisoned.train.images, sq_poisoned.train.labels)


def oracle_context(ps) -> defenses.Context:
    """The tests' trusted clean set, as the benchmark's oracle: chosen with the poison mask."""
    return defenses.Context(clean_indices=np.flatnonzero(~ps.poison_mask))


def run_asd(ps, victim, context, **params):
    return defenses.get("asd", **{**ASD_TINY, "seed_source": "given", **params}).run(ps.train, victim, context)


def test_asd_keeps_the_poison_out_of_its_pool_and_learns_no_backdoor(sq_poisoned, sq_test, sq_victim):
    ps = sq_poisoned
    assert asr(sq_victim.model, ps, sq_test) > 0.95  # the baseline: no defense
    # One seed's run is at the mercy of the machine's kernels: on AVX-512 seeds 0–4 keep the pool clean (ASR ≤ 0.007),
    # under AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) seed 0 lets 24 poisoned in (ASR 0.33) and
    # seeds 1–4 do not; seed 5 fails on AVX-512. So five seeds, and most must hold.
    held = []
    for seed in range(5):
        context = oracle_context(ps)
        context.seed = seed
        r = run_asd(ps, sq_victim, context)
        d = detection_metrics(ps.poison_mask, r.split)
        held.append(d["poison_in_clean"] == 0 and d["tpr"] == 1.0 and asr(r.model, ps, sq_test) < 0.1
                    and accuracy(r.model, sq_test.images, sq_test.labels) > 0.9)
        assert r.split.sizes() == {"clean": 400, "poison": 400, "mixed": 0}
    assert sum(held) >= 3, held
    phases = [e["phase"] for e in r.info["epochs_run"]]
    assert phases == ["class-aware"] * 4 + ["class-agnostic"] * 2 + ["meta"] * 2
    assert [e["labeled"] for e in r.info["epochs_run"]] == [40, 120, 200, 280] + [400] * 4
    assert all(len(e["virtual_ce"]) == 1 for e in r.info["epochs_run"][6:])
    assert r.info["seeds"] == 40 and r.info["seed_source"] == "given"
    assert set(r.timings) == {"seed_s", "score_s", "meta_s", "mixmatch_s"}
    assert r.model.cgd_spec == sq_victim.model.cgd_spec and r.model is not sq_victim.model


def test_asd_core_step_is_what_the_test_sees(sq_poisoned, sq_test, sq_victim, monkeypatch):
    ps = sq_poisoned
    rng = np.random.default_rng(0)
    monkeypatch.setattr(asd, "class_aware_pool", lambda losses, labels, seeds, k: np.sort(
        rng.choice(len(losses), len(seeds) + 4 * k, replace=False)))
    monkeypatch.setattr(asd, "lowest", lambda losses, ratio: np.sort(
        rng.choice(len(losses), int(len(losses) * ratio), replace=False)))
    r = run_asd(ps, sq_victim, oracle_context(ps))  # the loss-guided split replaced by random pools, same sizes
    d = detection_metrics(ps.poison_mask, r.split)
    assert d["poison_in_clean"] > 20  # the pool assertion fails
    assert asr(r.model, ps, sq_test) > 0.5  # and so does the ASR one


def test_asd_seeds_never_read_the_mask_and_victim_loss_seeds_can_be_poison(sq_poisoned, sq_victim):
    ps, labels = sq_poisoned, sq_poisoned.train.labels
    given = defenses.get("asd", seed_source="given").seeds(ps.train, sq_victim, oracle_context(ps), {})
    guessed = defenses.get("asd").seeds(ps.train, sq_victim, defenses.Context(), {})
    for s in (given, guessed):
        assert np.bincount(labels[s], minlength=4).tolist() == [10] * 4
    assert ps.poison_mask[given].sum() == 0
    # the label-free default ranks by victim loss, and a backdoored victim fits its poison well: some of the
    # target class's seeds are poison here (all 10 on conftest's `synthetic` data) — see ASD's docstring
    assert 0 < ps.poison_mask[guessed].sum() == ps.poison_mask[guessed[labels[guessed] == 0]].sum()


def test_asd_sc_seeds_from_cgds_split_clean(sq_poisoned, sq_victim):
    ps = sq_poisoned
    clean = np.flatnonzero(~ps.poison_mask)[::3]

    class SplitOnly:  # stands in for CGD's scoring stages: its D_c is `clean`
        def split_data(self, train, victim, context, timings):
            timings["guide_s"] = 0.0
            z = np.zeros(len(train))
            return Split(clean, np.zeros(0, np.int64), np.setdiff1d(np.arange(len(train)), clean), z, z, z, z), None

    d = defenses.DEFENSES.cls("asd-sc")(SplitOnly(), **{**ASD_TINY, "aware_epochs": 1, "agnostic_epochs": 0,
                                                         "meta_epochs": 0, "iterations": 2})
    assert d.seed_source == "split-clean"
    seeds = d.seeds(ps.train, sq_victim, defenses.Context(), {})
    assert set(seeds) <= set(clean) and len(seeds) == 40
    r = d.run(ps.train, sq_victim, defenses.Context(extra_eval=lambda m: {"seen": True}))
    assert r.info["seed_source"] == "split-clean" and "guide_s" in r.timings and r.split.sizes()["clean"] == 40
    assert r.info["eval"] == {"class-aware": {"seen": True}}  # logged after each phase, nothing more
    with pytest.raises(CGDError, match="asd-sc: its seeds come from CGD"):
        defenses.get("asd-sc", seed_source="given")


def test_asd_checks_its_params_and_its_inputs(sq_poisoned, stand_in):
    for bad, what in [({"epsilon": 1.0}, "epsilon"), ({"aware_epochs": -1}, "epochs >= 0"),
                      ({"aware_epochs": 0, "agnostic_epochs": 0, "meta_epochs": 0}, "at least one epoch"),
                      ({"t": 0}, "t >= 1"), ({"lr": 0.0}, "lr, meta_lr > 0"), ({"augment": "rotate"}, "augment"),
                      ({"seed_source": "mask"}, "seed_source"), ({"sce_alpha": 0.0, "sce_beta": 0.0}, "not both")]:
        with pytest.raises(CGDError, match=f"asd: needs .*{what}"):
            defenses.get("asd", **bad)
    for bad in ({"seed_num": "10"}, {"epsilon": float("nan")}, {"seed_source": 1}, {"iterations": 1.5}):
        key = next(iter(bad))
        with pytest.raises(CGDError, match=f"(asd|mixmatch): {key} must be"):
            defenses.get("asd", **bad)
    train = sq_poisoned.train
    with pytest.raises(CGDError, match="none were given"):
        defenses.get("asd", seed_source="given").run(train, stand_in, defenses.Context())
    with pytest.raises(CGDError, match="sample indices"):
        defenses.get("asd", seed_source="given").run(train, stand_in, defenses.Context(clean_indices=np.array([900])))
    with pytest.raises(CGDError, match="of class 3"):  # no candidate of some class: no seed for it
        defenses.get("asd", seed_source="given").run(
            train, stand_in, defenses.Context(clean_indices=np.flatnonzero(train.labels != 3)))


# ------------------------------------------------------------------------------------------------ DBD

# tiny data: 30 SimCLR epochs of 7 steps (batch 128), 10 warm-up epochs of 50 (batch 16), 3 MixMatch epochs of 60;
# Adam at the reference's 0.002
DBD_TINY = dict(simclr_epochs=30, warmup_epochs=10, mixmatch_epochs=3, iterations=60, batch_size=32,
                simclr_batch_size=128, warmup_batch_size=16, augment="flip")


@pytest.fixture(scope="module")
def hue_poisoned():
    return badnets(hues(800, 0))


@pytest.fixture(scope="module")
def hue_test():
    return hues(400, 100)


def run_dbd(ps, seed=0, **params):
    return defenses.get("dbd", **{**DBD_TINY, **params}).run(ps.train, stand_in_victim(len(ps.train)),
                                                              defenses.Context(seed=seed))


def warm_up_splits(ps):
    """DBD's split after SimCLR and the linear warm-up (no MixMatch yet), seeds 0–3: the poison-in-pool count and
    the SCE loss's AUROC for the poison, averaged. One seed is too fragile for a test: on this data the counts are
    0/21/0/0 (AUROC 0.997/0.62/0.79/1.0) on AVX-512 and 2/2/0/0 (0.87/0.92/0.94/1.0) under AVX2 kernels."""
    got = [detection_metrics(ps.poison_mask, run_dbd(ps, seed, mixmatch_epochs=0).split) for seed in range(4)]
    return np.mean([d["poison_in_clean"] for d in got]), np.mean([d["auroc_model"] for d in got])


def test_dbd_s_self_supervised_features_keep_the_poison_out_of_its_pool(hue_poisoned):
    in_pool, auroc = warm_up_splits(hue_poisoned)
    assert in_pool <= 10 and auroc > 0.75  # of 80 poisoned; the pool is the lowest-loss half, 400


def test_dbd_core_step_is_what_the_test_sees(hue_poisoned, monkeypatch):
    monkeypatch.setattr(dbd, "simclr_epoch", lambda *a, **kw: 0.0)  # the encoder stays as initialised
    in_pool, auroc = warm_up_splits(hue_poisoned)
    assert in_pool > 20 and auroc < 0.7  # measured 42.5 and 0.54 on both kernels: both assertions above fail


def test_dbd_runs_its_three_stages(hue_poisoned, hue_test):
    # the whole defense, for its schedule and records. Its outcome is left to the warm-up tests above: on this data
    # three MixMatch epochs move the pool by seed and kernel (seeds 0–5: 0/32/21/0/21/9 poisoned in the pool on
    # AVX-512, 41/21/21/0/28/31 under AVX2 kernels; CA 0.5–0.75), where the warm-up's split is steady.
    ps = hue_poisoned
    victim = tiny_victim(ps.train.images, ps.train.labels)
    assert asr(victim.model, ps, hue_test) > 0.95  # the baseline: no defense
    r = run_dbd(ps)
    assert r.split.sizes() == {"clean": 400, "poison": 400, "mixed": 0}
    assert accuracy(r.model, hue_test.images, hue_test.labels) > 0.4  # 4 classes: above chance
    assert r.info["loss"]["simclr"][-1] < r.info["loss"]["simclr"][0]  # the contrastive loss fell
    assert len(r.info["loss"]["warmup"]) == 10 and len(r.info["loss"]["mixmatch"]) == 3
    assert r.info["loss"]["mixmatch"][-1]["lambda_u"] < 15 * 110 / 190  # BackdoorBench's ramp, never at full λ_u
    assert set(r.timings) == {"simclr_s", "warmup_s", "score_s", "mixmatch_s"}


def test_dbd_checks_its_params_and_its_victim():
    for bad, what in [({"epsilon": 0.0}, "epsilon"), ({"simclr_epochs": -1}, "epochs >= 0"),
                      ({"temperature": 0.0}, "temperature"), ({"simclr_batch_size": 1}, "negatives"),
                      ({"lr": -1.0}, "simclr_lr, lr > 0"), ({"augment": "rotate"}, "augment")]:
        with pytest.raises(CGDError, match=f"dbd: needs .*{what}"):
            defenses.get("dbd", **bad)
    for bad in ({"simclr_epochs": "3"}, {"temperature": float("inf")}, {"augment": 2}):
        with pytest.raises(CGDError, match=f"dbd: {next(iter(bad))} must be"):
            defenses.get("dbd", **bad)
    with pytest.raises(CGDError, match="mixmatch: iterations must be an integer"):
        defenses.get("dbd", iterations=2.5)
    r = defenses.get("dbd", simclr_epochs=1, warmup_epochs=1, mixmatch_epochs=1, iterations=1).run(
        synthetic(40, 0), stand_in_victim(40), defenses.Context(extra_eval=lambda m: {"seen": True}))
    assert r.info["eval"] == {s: {"seen": True} for s in ("simclr", "warmup", "mixmatch")}
    user_model = stand_in_victim(40)
    user_model.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    with pytest.raises(CGDError, match="encoder and a head"):
        defenses.get("dbd").run(synthetic(40, 0), user_model, defenses.Context())


def test_dbd_run_directory_reports_its_pool_as_the_split(tmp_path):
    ps = badnets(synthetic(400, 0))
    cfg = tiny_cfg(**{"defense.name": "dbd", "defense.params.simclr_epochs": 1, "defense.params.warmup_epochs": 1,
                      "defense.params.mixmatch_epochs": 1, "defense.params.iterations": 2,
                      "defense.params.simclr_batch_size": 128})
    run = tmp_path / "run"
    said = []
    m = defend(ps.train, cfg, run, poison_mask=ps.poison_mask, poisoned=ps, test=synthetic(100, 1), log=said.append)
    assert m["defense"] == "dbd" and m["sizes"] == {"clean": 200, "poison": 200, "mixed": 0}
    assert {"tpr", "fpr", "auroc_model"} <= set(m["detection"]) and "auroc_guide" not in m["detection"]
    assert "simclr_s" in m["timings"] and "asr" in m["after"] and m["epochs"] == [1, 1, 1]
    assert all((run / f).exists() for f in SPLIT_OUTPUTS)
    assert any("DBD MixMatch epoch 1/1: 200 labeled" in s for s in said)

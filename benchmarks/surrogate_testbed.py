"""Build the issue-15 testbed: an aligned surrogate, poisoned surrogates grown from it, and their zero-shot CA / ASR
on held-out images (stages cached under $CGD_CACHE/surrogates; see docs/purification.md).

    OMP_NUM_THREADS=2 python benchmarks/surrogate_testbed.py --data tiny-imagenet --attacks badnets,blend \\
        --target banana --align-steps 2000 --poison-steps 1000 --json benchmarks/results/<date>-surrogate.json

With `--purifiers finetune,par,abd,invertune` each poisoned surrogate is also purified on `--purify-pairs` clean
training images (a stratified draw with seed 1) and scored the same way, and `--check` adds the guide check's
verdict for every surrogate. Rows already in the `--json` file are kept, so an interrupted run resumes.

Not yet run at this size: the step counts and learning rates are starting points, not measured choices.
`--tiny` swaps in the tests' tiny random towers (a smoke run on any small dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from cgd import attacks, purifiers
from cgd.data import load_dataset, stratified_subset
from cgd.guides import surrogate as sg
from cgd.purifiers import StageConfig, attack_success_rate, check_guide, zero_shot_accuracy
from cgd.purifiers.stages import with_target
from cgd.purifiers.testbed import aligned_surrogate, poisoned_surrogate

def attack_params(name: str, side: int) -> dict:
    """The papers' settings scaled to the images' own side: a 16 px patch on 224 px, blend alpha 0.2."""
    return {"badnets": {"size": max(3, round(16 * side / 224))}, "blend": {"alpha": 0.2}}.get(name, {})


def evaluate(path: Path, test, attack_names: list[str], target: str, check: bool = False) -> dict:
    guide = sg.surrogate_guide(sg.load_surrogate(path))
    out = {"ca": zero_shot_accuracy(guide, test.images, test.labels, test.class_names)}
    for name in attack_names:
        trig = attacks.get(name, **attack_params(name, test.images.shape[1])).apply_trigger
        out[f"asr_{name}"] = attack_success_rate(guide, test.images, test.labels, test.class_names, trig, target)
    if check:
        names = with_target(test, target)[0].class_names  # the target among the candidates
        c = check_guide(guide, test.images[:64], names)
        out["check"] = {"verdict": c.verdict, "target": c.target, "shift": c.shift, "seconds": c.seconds}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="tiny-imagenet")
    p.add_argument("--attacks", default="badnets,blend")
    p.add_argument("--target", default="banana")
    p.add_argument("--rate", type=float, default=0.01)
    p.add_argument("--align-steps", type=int, default=2000)
    p.add_argument("--poison-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--purifiers", default="", help="comma-separated purifiers run on every poisoned surrogate")
    p.add_argument("--purify-pairs", type=int, default=5000)
    p.add_argument("--purify-steps", type=int, default=500)
    p.add_argument("--purify-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--check", action="store_true", help="the guide check's verdict for every surrogate")
    p.add_argument("--tiny", action="store_true", help="tiny random towers (smoke run)")
    p.add_argument("--root", default=None, help="stage cache folder (default: $CGD_CACHE/surrogates)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    ds = load_dataset(a.data)
    test = stratified_subset(ds.test, a.test_images, 0)
    cfg = sg.default_config(tiny=a.tiny)
    root = Path(a.root) if a.root else None
    base, rep = aligned_surrogate(ds.train, StageConfig(a.align_steps, a.batch_size, a.lr), cfg, root=root, log=log)
    names = [s for s in a.attacks.split(",") if s]
    done = json.loads(Path(a.json).read_text()).get("rows", {}) if a.json and Path(a.json).exists() else {}
    rows = {"aligned": done.get("aligned") or {"file": str(base), "seconds": rep.seconds,
                                               **evaluate(base, test, names, a.target, a.check)}}
    clean = stratified_subset(ds.train, a.purify_pairs, 1)
    for name in names:
        path, rep = poisoned_surrogate(base, ds.train, name, a.target, a.rate,
                                       StageConfig(a.poison_steps, a.batch_size, a.lr, seed=1), root=root, log=log,
                                       **attack_params(name, ds.train.images.shape[1]))
        rows[name] = done.get(name) or {"file": str(path), "seconds": rep.seconds, "poisoned": rep.poisoned,
                                        **evaluate(path, test, [name], a.target, a.check)}
        for pname in [s for s in a.purifiers.split(",") if s]:
            key = f"{name}+{pname}"
            if key in done:
                rows[key] = done[key]
                continue
            stage = StageConfig(a.purify_steps, a.batch_size, a.purify_lr or a.lr, seed=2)
            model, report = purifiers.get(pname).clean(sg.load_surrogate(path), clean, stage, log=log)
            out = Path(path).with_name(f"{Path(path).stem}-{pname}.safetensors")
            sg.save_surrogate(model, out)
            rows[key] = {"file": str(out), "seconds": report.seconds, "drift": report.drift,
                         "info": report.info, **evaluate(out, test, [name], a.target, a.check)}
            if a.json:  # a finished purifier row survives an interruption
                Path(a.json).write_text(json.dumps({"rows": rows}, indent=2, default=str) + "\n")
    result = {"surrogate": "EfficientNet-Lite0 + MiniLM surrogate (not CLIP)" if not a.tiny else "tiny random towers",
              "data": a.data, "train_pairs": len(ds.train), "test_images": len(test), "target": a.target,
              "rate": a.rate, "resolution": cfg["image"]["resolution"], "args": vars(a), "rows": rows,
              "seconds": time.perf_counter() - t0}
    text = json.dumps(result, indent=2, default=str)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()

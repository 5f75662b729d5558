"""Build the issue-15 testbed: an aligned surrogate, poisoned surrogates grown from it, and their zero-shot CA / ASR
on held-out images (stages cached under $CGD_CACHE/surrogates; see docs/purification.md).

    OMP_NUM_THREADS=2 python benchmarks/surrogate_testbed.py --data tiny-imagenet --attacks badnets,blend \\
        --target banana --align-steps 2000 --poison-steps 1000 --json benchmarks/results/<date>-surrogate.json

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

from cgd import attacks
from cgd.data import load_dataset, stratified_subset
from cgd.guides import surrogate as sg
from cgd.purifiers import StageConfig, attack_success_rate, zero_shot_accuracy
from cgd.purifiers.testbed import aligned_surrogate, poisoned_surrogate

def attack_params(name: str, side: int) -> dict:
    """The papers' settings scaled to the images' own side: a 16 px patch on 224 px, blend alpha 0.2."""
    return {"badnets": {"size": max(3, round(16 * side / 224))}, "blend": {"alpha": 0.2}}.get(name, {})


def evaluate(path: Path, test, attack_names: list[str], target: str) -> dict:
    guide = sg.surrogate_guide(sg.load_surrogate(path))
    out = {"ca": zero_shot_accuracy(guide, test.images, test.labels, test.class_names)}
    for name in attack_names:
        trig = attacks.get(name, **attack_params(name, test.images.shape[1])).apply_trigger
        out[f"asr_{name}"] = attack_success_rate(guide, test.images, test.labels, test.class_names, trig, target)
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
    rows = {"aligned": {"file": str(base), "seconds": rep.seconds, **evaluate(base, test, names, a.target)}}
    for name in names:
        path, rep = poisoned_surrogate(base, ds.train, name, a.target, a.rate,
                                       StageConfig(a.poison_steps, a.batch_size, a.lr, seed=1), root=root, log=log,
                                       **attack_params(name, ds.train.images.shape[1]))
        rows[name] = {"file": str(path), "seconds": rep.seconds, "poisoned": rep.poisoned,
                      **evaluate(path, test, [name], a.target)}
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

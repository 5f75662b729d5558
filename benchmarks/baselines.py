"""One baseline cell of issue 14: `python benchmarks/baselines.py --attack badnets --defense ep` (resumable; see
`cgd.bench.run_baseline`). Clean-data defenses: `--oracle 0.05` (5 % truly clean, chosen with the poison mask)."""

import argparse
import sys
from pathlib import Path

import torch

from cgd.bench import run_baseline
from cgd.config import apply_overrides, defaults

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", required=True)
    p.add_argument("--defense", required=True)
    p.add_argument("--oracle", type=float, default=None, help="share of truly clean training data to pass")
    p.add_argument("--root", default="benchmarks")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (e.g. defense.params.u=3)")
    a = p.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    cfg = apply_overrides(defaults(), a.set)
    print(run_baseline(a.attack, a.defense, cfg, Path(a.root), a.data, a.oracle,
                       log=lambda s: print(s, file=sys.stderr, flush=True)))

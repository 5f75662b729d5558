"""One baseline cell of issue 14: `python benchmarks/baselines.py --attack badnets --defense ep` (resumable; see
`cgd.bench.run_baseline`). Clean-data defenses: `--oracle 0.05` (5 % truly clean, chosen with the poison mask).
`python benchmarks/baselines.py --tables 'benchmarks/results/2026-12-04-badnets-*.json' …` prints issue 14's three
tables from finished cells (`cgd.bench.baseline_tables`)."""

import argparse
import glob
import json
import sys
from pathlib import Path

import torch

from cgd.bench import baseline_tables, run_baseline
from cgd.config import apply_overrides, defaults

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack")
    p.add_argument("--defense")
    p.add_argument("--tables", metavar="GLOB", nargs="+", help="print the three tables of the cells matching the "
                   "GLOBs (one victim per attack; later files win), and stop")
    p.add_argument("--oracle", type=float, default=None, help="share of truly clean training data to pass")
    p.add_argument("--root", default="benchmarks")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (e.g. defense.params.u=3)")
    a = p.parse_args()
    if a.tables:
        cells = [json.loads(Path(f).read_text()) for g in a.tables for f in sorted(glob.glob(g))]
        print(baseline_tables([c for c in cells if "attack" in c and "defense" in c]))
        sys.exit(0)
    if not (a.attack and a.defense):
        p.error("--attack and --defense are required (or --tables)")
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    cfg = apply_overrides(defaults(), a.set)
    print(run_baseline(a.attack, a.defense, cfg, Path(a.root), a.data, a.oracle,
                       log=lambda s: print(s, file=sys.stderr, flush=True)))

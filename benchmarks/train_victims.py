"""Train (or resume) the benchmark victims one after another, so `cgd bench` later finds them finished.

    OMP_NUM_THREADS=1 python benchmarks/train_victims.py blend sig
"""

import json
import sys
from pathlib import Path

from cgd import attacks
from cgd.config import defaults, train_config
from cgd.data import load_dataset
from cgd.evaluate import ca_asr
from cgd.pipeline import train_victim

ROOT = Path(__file__).resolve().parent

if __name__ == "__main__":
    cfg = defaults()
    ds = load_dataset("cifar10")
    for name in sys.argv[1:]:
        clean_label = attacks.ATTACKS.cls(name).clean_label
        ps = attacks.get(name, target=0, seed=0, **({} if clean_label else {"rate": 0.05})).poison(ds.train)
        r = train_victim(ps.train.images, ps.train.labels, 10, train_config(cfg), ROOT / "runs" / name / "victim")
        print(json.dumps({"attack": name, **ca_asr(r.model, ps, ds.test), "seconds": r.seconds}), flush=True)

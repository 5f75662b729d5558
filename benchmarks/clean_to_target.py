"""Add the clean→target rate to benchmark cells written before `ca_asr` measured it.

The rate is the share of untriggered non-target test images a model assigns to the target class: the level a
model that ignores the trigger still shows as "ASR" (see `cgd.evaluate.clean_to_target_rate`). It is measured on
the saved model of each cell (the victim for "none", `defended.safetensors` for a defense) and written into the
cell with the date it was measured.

    OMP_NUM_THREADS=1 python benchmarks/clean_to_target.py [--attacks badnets,blend,sig]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cgd.data import load_dataset
from cgd.evaluate import clean_to_target_rate
from cgd.io import write_json
from cgd.models import load_model

ROOT = Path(__file__).resolve().parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="", help="comma-separated; default: every cell without the rate")
    a = p.parse_args()
    wanted = set(filter(None, a.attacks.split(",")))
    test = load_dataset("cifar10").test
    for path in sorted((ROOT / "results").glob("*.json")):
        cell = json.loads(path.read_text())
        if "defense" not in cell or "clean_to_target" in cell or (wanted and cell["attack"] not in wanted):
            continue
        run = ROOT / "runs" / cell["attack"]
        model_path = run / "victim" / "victim.safetensors" if cell["defense"] == "none" \
            else run / cell["defense"] / "defended.safetensors"
        if not model_path.exists():
            print(f"{path.name}: no saved model at {model_path}; skipped")
            continue
        cell["clean_to_target"] = clean_to_target_rate(load_model(model_path), test, cell["attack_params"]["target"])
        cell["clean_to_target_measured"] = time.strftime("%Y-%m-%d")
        write_json(path, cell)
        print(f"{cell['attack']} {cell['defense']}: ASR {cell['asr']:.4f}, clean→target {cell['clean_to_target']:.4f}")


if __name__ == "__main__":
    main()

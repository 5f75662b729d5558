"""SHA-256 of every registered attack's poisoned set on a small fixed ImageSet (refactor check: run before and after).

Usage: OMP_NUM_THREADS=1 python scripts/poison_hashes.py > hashes.json   (uses a fresh CGD_CACHE in a temp dir)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

NET = {"widths": [8, 16, 16], "stem": 8}
TINY = {  # the smallest settings, as in tests/test_attacks_learned.py
    "lc": dict(surrogate_kwargs=NET, surrogate_epochs=2, surrogate_batch_size=64, steps=3),
    "iab": dict(mask_epochs=1, epochs=1, width=4, depth=2, batch_size=64, classifier_kwargs=NET),
    "ssba": dict(bits=8, epochs=1, width=8, batch_size=64),
    "flip": dict(expert_kwargs=NET, expert_epochs=2, iterations=2, expert_batch_size=64, match_batch_size=64),
    "gcb": dict(epochs=1, width=8, batch_size=64),
}


def sha(a) -> str | None:
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def main() -> None:
    os.environ["CGD_CACHE"] = tempfile.mkdtemp(prefix="cgd-hash-cache-")
    torch.set_num_threads(1)
    from cgd import attacks
    from cgd.data import ImageSet

    rng = np.random.default_rng(0)
    ds = ImageSet(rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), np.arange(200, dtype=np.int64) % 10,
                  [str(c) for c in range(10)])
    out = {}
    for name in sorted(attacks.ATTACKS.names() if hasattr(attacks.ATTACKS, "names") else attacks.list()):
        torch.manual_seed(0)
        ps = attacks.get(name, target=0, seed=0, **TINY.get(name, {})).poison(ds)
        out[name] = {"images": sha(ps.train.images), "labels": sha(ps.train.labels), "mask": sha(ps.poison_mask),
                     "cross_mask": sha(ps.cross_mask), "trigger": sha(ps.trigger(ds.images[:20].copy()))}
        print(name, file=sys.stderr, flush=True)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()

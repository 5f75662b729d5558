"""Guide quality and speed on CIFAR-10.

    python benchmarks/guide_quality.py                         # imagenet-text defaults, test metrics + 50k timing
    python benchmarks/guide_quality.py --params '{"resolution": 128}' --skip-train
    python benchmarks/guide_quality.py --guide noisy --params '{"gumbel_scale": 2.0}'

Prints zero-shot top-1 and flip-AUROC on the 10,000 test images (flip-AUROC: NLL of the given label separating
true labels from labels flipped to class t, averaged over the 10 targets t; the airplane-only value is printed too),
end-to-end images/s on a cold per-image cache, then the wall (and CPU) seconds to score the 50,000 training images
cold, warm (cache hit), and after changing 5 % of them (only those are rescored). `--json PATH` saves the numbers.
Scores go to a temporary per-image cache so every run measures cold scoring; the ONNX export and the text
embeddings stay in the normal cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guide", default="imagenet-text")
    ap.add_argument("--params", default="{}", help="JSON keyword arguments for the guide")
    ap.add_argument("--test-n", type=int, default=10000, help="random test subset size (default: all)")
    ap.add_argument("--skip-train", action="store_true", help="skip the 50k training-set timing")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    from cgd import guides
    from cgd.data import load_dataset

    ds = load_dataset("cifar10")
    names = ds.class_names
    params = json.loads(args.params)
    tmp = tempfile.mkdtemp(prefix="cgd-guide-bench-")
    if args.guide == "noisy":
        inner = guides.get(params.pop("guide", "imagenet-text"), cache=tmp, **params.pop("guide_params", {}))
        guide = guides.get("noisy", guide=inner, **params)
    else:
        guide = guides.get(args.guide, cache=tmp, **params)
    res = {"guide": repr(guide), "threads": os.cpu_count(), "command": " ".join([sys.executable] + sys.argv)}

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(ds.test), min(args.test_n, len(ds.test)), replace=False))
    x, y = ds.test.images[idx], ds.test.labels[idx]
    guide.class_logits(x[:8], names)  # warm-up: ONNX export / session, text embeddings (not counted)
    logits, wall, cpu = timed(lambda: guide.class_logits(x, names))
    fa = guides.flip_auroc(logits, y)
    res.update(test_n=len(x), top1=guides.zero_shot_top1(logits, y), flip_auroc=fa["mean"],
               flip_auroc_airplane=fa["per_target"][0], flip_auroc_per_target=fa["per_target"],
               test_wall_s=wall, test_cpu_s=cpu, images_per_s=len(x) / wall, finite=bool(np.isfinite(logits).all()))
    print(f"test n={len(x)}  top-1 {res['top1']:.4f}  flip-AUROC mean {fa['mean']:.4f} "
          f"(airplane {fa['per_target'][0]:.4f})  {res['images_per_s']:.1f} img/s end to end "
          f"({wall:.1f} s wall, {cpu:.1f} s CPU)", flush=True)

    if not args.skip_train:
        tr = ds.train.images
        _, wall, cpu = timed(lambda: guide.class_logits(tr, names))
        print(f"train 50k cold: {wall:.1f} s wall, {cpu:.1f} s CPU ({len(tr) / wall:.1f} img/s)", flush=True)
        _, wall2, _ = timed(lambda: guide.class_logits(tr, names))
        print(f"train 50k warm (cache hit): {wall2:.2f} s", flush=True)
        poisoned = tr.copy()
        changed = rng.choice(len(tr), len(tr) // 20, replace=False)
        poisoned[changed, -4:-1, -4:-1] = 255  # a BadNets-like corner patch on 5 %
        _, wall3, _ = timed(lambda: guide.class_logits(poisoned, names))
        print(f"train 50k with 5 % changed: {wall3:.1f} s", flush=True)
        res.update(train_wall_s=wall, train_cpu_s=cpu, train_warm_s=wall2, train_poisoned_s=wall3)
    if args.json:
        from cgd.io import write_json

        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()

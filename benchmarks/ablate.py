"""Ablations of CGD's split and unlearning on a finished benchmark victim (see docs/benchmarks.md).

Choices are made on TRAINING data only: detection against the known training poison mask, and `train_asr` (the
trigger applied to 1,000 clean non-target *training* images). Test CA/ASR are recorded beside them for the report,
never used to choose.

    python benchmarks/ablate.py split --attack badnets
    python benchmarks/ablate.py purify --attack sig
    python benchmarks/ablate.py window --attack ctrl
    python benchmarks/ablate.py unlearn --attack badnets --recipe cpu --name lam05 '{"lambda_un": 0.5}'
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from cgd import attacks, guides
from cgd.bench import train_asr_probe
from cgd.config import defaults, train_config
from cgd.data import load_dataset
from cgd.evaluate import ca_asr
from cgd.io import write_json
from cgd.pipeline import guide_features, guide_logits, model_features, model_losses, train_victim
from cgd.split import SplitConfig, auroc, detection_metrics, nll, percentile_rank, split_by
from cgd.unlearn import recipe, unlearn

ROOT = Path(__file__).resolve().parent
SCORES = ["snapshot", "final", "history:1-1", "history:1-2", "history:1-3", "history:2-3", "history:2-4",
          "history:1-6", "history:3-6", "history:1-12"]


def setup(attack: str):
    cfg = defaults()
    ds = load_dataset("cifar10")
    cls = attacks.ATTACKS.cls(attack)
    ps = attacks.get(attack, target=0, seed=0, **({} if cls.clean_label else {"rate": 0.05})).poison(ds.train)
    victim = train_victim(ps.train.images, ps.train.labels, 10, train_config(cfg), ROOT / "runs" / attack / "victim")
    guide = guides.get(cfg["guide"]["name"], **cfg["guide"]["params"])
    work = ROOT / "runs" / attack / "ablation"
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    g = guide_logits(guide, ps.train.images, ds.class_names, work)
    print(f"guide logits in {time.perf_counter() - t:.1f} s", flush=True)
    arch = {"name": cfg["victim"]["arch"], "params": {"num_classes": 10}}
    feats = lambda: guide_features(guide, ps.train.images, work)  # noqa: E731
    zfeats = lambda: model_features(victim.model, ps.train.images, work)  # noqa: E731
    return ds, ps, victim, g, arch, feats, zfeats


def split_table(attack: str) -> None:
    ds, ps, victim, g, arch, feats, _ = setup(attack)
    rows = {}
    for how in SCORES:
        base = SplitConfig.from_dict({"model_score": how, "purify": 0})
        ms = model_losses(victim, arch, ps.train.images, ps.train.labels, base)
        for rounds in (0, 1, 2):
            s = split_by(replace(base, refine_rounds=rounds), ps.train.labels, g, ms, guide_features=feats())
            key = f"{how} probe x{rounds}"
            rows[key] = detection_metrics(ps.poison_mask, s)
            print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[key].items()}, flush=True)
    write_json(ROOT / "results" / "ablation" / f"{attack}-split.json", rows)


def purify_table(attack: str) -> None:
    """The cpu recipe's split with and without the neighbour purification of D_c, per probe round count."""
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    base = SplitConfig()
    ms = model_losses(victim, arch, ps.train.images, ps.train.labels, base)
    rows = {}
    for rounds in (0, 2):
        for keep in (0, 0.3, 0.5, 0.7):
            s = split_by(replace(base, refine_rounds=rounds, purify=keep), ps.train.labels, g, ms,
                         guide_features=feats(), model_features=zfeats())
            key = f"probe x{rounds} purify {keep}"
            rows[key] = detection_metrics(ps.poison_mask, s)
            print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[key].items()}, flush=True)
    write_json(ROOT / "results" / "ablation" / f"{attack}-purify.json", rows)


def window_table(attack: str) -> None:
    """Per epoch of the victim's loss history: AUROC of "low loss => poison" over all samples and within the target
    class, and the share of guide-suspicious samples (guide rank > 1 - sigma2) among the fastest-learned sigma2,
    the quantity `history:auto` maximises (chance = sigma2)."""
    ds, ps, victim, g, *_ = setup(attack)
    s2 = defaults()["split"]["sigma2"]
    suspicious = percentile_rank(nll(g, ps.train.labels)) > 1 - s2
    target = ps.train.labels == ps.target
    rows = []
    for e, loss in enumerate(victim.loss_history, start=1):
        rows.append({"epoch": e, "auroc_all": auroc(-loss, ps.poison_mask),
                     "auroc_target_class": auroc(-loss[target], ps.poison_mask[target]),
                     "suspicious_share": float((percentile_rank(loss)[suspicious] < s2).mean())})
        print({k: round(v, 3) for k, v in rows[-1].items()}, flush=True)
    write_json(ROOT / "results" / "ablation" / f"{attack}-window.json", rows)


def unlearn_variant(attack: str, base: str, overrides: dict, model_score: str, name: str) -> None:
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    scfg = SplitConfig.from_dict(dict(defaults()["split"], model_score=model_score))  # the cpu split
    ms = model_losses(victim, arch, ps.train.images, ps.train.labels, scfg)
    s = split_by(scfg, ps.train.labels, g, ms, guide_features=feats(), model_features=zfeats())
    g = s.guide_logits
    res = unlearn(victim.model, ps.train.images, ps.train.labels, s, g, recipe(base, **overrides), 10,
                  extra_eval=train_asr_probe(ps))
    out = {"attack": attack, "recipe": base, "overrides": overrides, "model_score": s.info["model_score"],
           "split": scfg.to_dict(),
           "detection": detection_metrics(ps.poison_mask, s), "history": res.history,
           "stopped_early": res.stopped_early, "unlearn_s": res.seconds,
           "test_before": ca_asr(victim.model, ps, ds.test), "test_after": ca_asr(res.model, ps, ds.test),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({k: out[k] for k in ("history", "test_before", "test_after", "unlearn_s")}, indent=1))
    write_json(ROOT / "results" / "ablation" / f"{attack}-unlearn-{name}.json", out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["split", "purify", "window", "unlearn"])
    p.add_argument("--attack", default="badnets")
    p.add_argument("--recipe", default="cpu")
    p.add_argument("--model-score", default=defaults()["split"]["model_score"])
    p.add_argument("--name", default=None)
    p.add_argument("overrides", nargs="?", default="{}", help="JSON of UnlearnConfig overrides")
    a = p.parse_intermixed_args()
    if a.what == "split":
        split_table(a.attack)
    elif a.what == "purify":
        purify_table(a.attack)
    elif a.what == "window":
        window_table(a.attack)
    else:
        unlearn_variant(a.attack, a.recipe, json.loads(a.overrides), a.model_score, a.name or a.recipe)


if __name__ == "__main__":
    main()

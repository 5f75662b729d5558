"""Ablations of CGD's split and unlearning on a finished benchmark victim (see docs/benchmarks.md).

Choices are made on TRAINING data only: detection against the known training poison mask, and `train_asr` (the
trigger applied to 1,000 clean non-target *training* images). Test CA/ASR are recorded beside them for the report,
never used to choose.

    python benchmarks/ablate.py split --attack badnets
    python benchmarks/ablate.py purify --attack sig
    python benchmarks/ablate.py window --attack ctrl
    python benchmarks/ablate.py unlearn --attack badnets --recipe cpu --name lam05 '{"lambda_un": 0.5}'
    python benchmarks/ablate.py shift --attack bpp     # re-split by the loss shift after a first pass
    python benchmarks/ablate.py spectral --attack ctrl --root benchmarks/runs/bench2   # victims of another root
    python benchmarks/ablate.py window --demo benchmarks/runs/demo-fm --data fashion-mnist  # the demo's victim

`--root R` reads the victim from R/runs/<attack>/victim (a `cgd bench --root R` run) and writes its results as
`<attack>-R_NAME-*.json`; `--demo RUN` reads the victim and cached scores of a `cgd demo --out RUN` run (default
demo subset and settings) and writes `demo-<data>-*.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cgd import attacks, guides
from cgd.bench import train_asr_probe
from cgd.config import apply_overrides, defaults, train_config
from cgd.data import Dataset, load_dataset, stratified_subset
from cgd.evaluate import ca_asr
from cgd.io import write_json
from cgd.defenses.guided import guide_features, guide_logits, model_features, model_losses
from cgd.pipeline import train_victim
from cgd.tensors import predict_logits
from cgd.split import (WINDOW_RULES, Split, SplitConfig, auroc, bimodality, detection_metrics, history_window,
                       into_poison, nll, per_class_rank, spectral_scores, split_by, window_shares)
from cgd.unlearn import recipe, unlearn, unlearn_checked

ROOT = Path(__file__).resolve().parent
SCORES = ["snapshot", "final", "history:1-1", "history:1-2", "history:1-3", "history:2-3", "history:2-4",
          "history:1-6", "history:3-6", "history:1-12"]


OPTS = {"root": None, "demo": None, "data": "cifar10", "seed": 0}  # set by main()


def tag(attack: str) -> str:
    """The file-name stem of this run's ablation results."""
    if OPTS["demo"]:
        return f"demo-{OPTS['data']}" + (f"-seed{OPTS['seed']}" if OPTS["seed"] else "")
    return f"{attack}-{Path(OPTS['root']).name}" if OPTS["root"] else attack


def setup(attack: str):
    if OPTS["demo"]:
        return setup_demo(Path(OPTS["demo"]), OPTS["data"], seed=OPTS["seed"])
    cfg = defaults()
    ds = load_dataset(OPTS["data"])
    cls = attacks.ATTACKS.cls(attack)
    ps = attacks.get(attack, target=0, seed=0, **({} if cls.clean_label else {"rate": 0.05})).poison(ds.train)
    runs = Path(OPTS["root"]) / "runs" if OPTS["root"] else ROOT / "runs"
    victim = train_victim(ps.train.images, ps.train.labels, 10, train_config(cfg), runs / attack / "victim")
    guide = guides.get(cfg["guide"]["name"], **cfg["guide"]["params"])
    work = runs / attack / "ablation"
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    g = guide_logits(guide, ps.train.images, ds.class_names, work)
    print(f"guide logits in {time.perf_counter() - t:.1f} s", flush=True)
    arch = {"name": cfg["victim"]["arch"], "params": {"num_classes": 10}}
    feats = lambda: guide_features(guide, ps.train.images, work)  # noqa: E731
    zfeats = lambda: model_features(victim.model, ps.train.images, work)  # noqa: E731
    return ds, ps, victim, g, arch, feats, zfeats


def setup_demo(run: Path, data: str, train_size: int = 10000, test_size: int = 2000, seed: int = 0):
    """The poisoned subset, victim and cached guide/model features of `cgd demo --data DATA --out RUN` (default
    settings: the same stratified subsets, BadNets at 5 %, the demo's victim batch 128 / lr 0.1)."""
    from cgd.cli import DEMO_VICTIM

    cfg = apply_overrides(defaults(), [f"victim.{k}={v}" for k, v in DEMO_VICTIM.items()])
    cfg["seed"] = cfg["victim"]["seed"] = seed  # as `cgd demo --seed`
    full = load_dataset(data)
    train = stratified_subset(full.train, train_size, cfg["seed"])
    test = stratified_subset(full.test, test_size, cfg["seed"])
    ps = attacks.get(cfg["attack"]["name"], target=cfg["attack"]["target"], rate=cfg["attack"]["rate"],
                     seed=cfg["seed"], **cfg["attack"]["params"]).poison(train)
    work = run / ".work"
    k = train.num_classes
    victim = train_victim(ps.train.images, ps.train.labels, k, train_config(cfg), work / "victim")
    guide = guides.get(cfg["guide"]["name"], **cfg["guide"]["params"])
    g = guide_logits(guide, ps.train.images, full.class_names, work)
    arch = {"name": cfg["victim"]["arch"], "params": {"num_classes": k}}
    feats = lambda: guide_features(guide, ps.train.images, work)  # noqa: E731
    zfeats = lambda: model_features(victim.model, ps.train.images, work)  # noqa: E731
    return Dataset(train, test, full.name), ps, victim, g, arch, feats, zfeats


def run_split(victim, arch, ps, g, feats, zfeats, scfg: dict) -> tuple[Split, str]:
    """The pipeline's split for a dict of split settings (ablation-only keys such as `spectral_*` are left to
    `extra_rank`); returns it and the model score used."""
    fields = SplitConfig().to_dict()
    config = SplitConfig.from_dict({k: v for k, v in scfg.items() if k in fields})
    ms = model_losses(victim, ps.train.images, ps.train.labels, config)
    s = split_by(config, ps.train.labels, g, ms, guide_features=feats() if config.refine_rounds else None,
                 model_features=zfeats() if config.purify else None)
    return s, s.info["model_score"] if config.model_score == "history" else config.model_score


def split_table(attack: str) -> None:
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    rows = {}
    for how in SCORES:
        for rounds in (0, 1, 2):
            s, _ = run_split(victim, arch, ps, g, feats, zfeats, {"model_score": how, "refine_rounds": rounds,
                                                                  "purify": 0})
            key = f"{how} probe x{rounds}"
            rows[key] = detection_metrics(ps.poison_mask, s)
            print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[key].items()}, flush=True)
    write_json(ROOT / "results" / "ablation" / f"{tag(attack)}-split.json", rows)


def purify_table(attack: str) -> None:
    """The cpu recipe's split with and without the neighbour purification of D_c, per probe round count."""
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    base = defaults()["split"]
    rows = {}
    for rounds in (0, 2):
        for keep in (0, 0.3, 0.5, 0.7):
            s, _ = run_split(victim, arch, ps, g, feats, zfeats, dict(base, refine_rounds=rounds, purify=keep))
            key = f"probe x{rounds} purify {keep}"
            rows[key] = detection_metrics(ps.poison_mask, s)
            print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[key].items()}, flush=True)
    write_json(ROOT / "results" / "ablation" / f"{tag(attack)}-purify.json", rows)


def window_table(attack: str) -> None:
    """Per epoch of the victim's loss history: AUROC of "low loss => poison" over all samples and within the target
    class, and the two statistics `history_window` picks its epoch by (`split.window_shares`: the level and the
    gain share of guide-suspicious samples, chance = sigma2); then the window each rule picks."""
    ds, ps, victim, g, *_ = setup(attack)
    s2 = defaults()["split"]["sigma2"]
    g_nll = nll(g, ps.train.labels)
    shares = window_shares(victim.loss_history, g_nll, s2, first=1)
    target = ps.train.labels == ps.target
    rows = []
    for e, loss in enumerate(victim.loss_history, start=1):
        rows.append({"epoch": e, "auroc_all": auroc(-loss, ps.poison_mask),
                     "auroc_target_class": auroc(-loss[target], ps.poison_mask[target]),
                     "level_share": shares["level"][e - 1], "gain_share": shares["gain"][e - 1] if e > 1 else None})
        print({k: round(v, 3) for k, v in rows[-1].items() if v is not None}, flush=True)
    picks = {rule: "{}-{}".format(*history_window(victim.loss_history, g_nll, s2, rule=rule))
             for rule in WINDOW_RULES}
    print("chance", s2, "margin", round(shares["margin"], 4), "windows", picks, flush=True)
    write_json(ROOT / "results" / "ablation" / f"{tag(attack)}-window.json",
               {"epochs": rows, "chance": s2, "margin": shares["margin"], "windows": picks})


def with_oracle(s: Split, mask, oracle: str) -> Split:
    """DIAGNOSIS ONLY (reads the poison mask; never a defense): "dc" moves the known poison out of D_c into mixed,
    "dp" also moves every poisoned sample into D_p, "none" keeps the split."""
    if oracle == "none":
        return s
    bad = np.flatnonzero(mask)
    clean = np.setdiff1d(s.clean, bad)
    poison = np.union1d(s.poison, bad) if oracle == "dp" else s.poison
    mixed = np.setdiff1d(np.arange(len(mask)), np.union1d(clean, poison))
    return Split(clean, poison, mixed, s.guide_nll, s.model_nll, s.guide_rank, s.model_rank)


def unlearn_variant(attack: str, base: str, overrides: dict, model_score: str, name: str,
                    split_overrides: dict | None = None, oracle: str = "none") -> None:
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    scfg = dict(defaults()["split"], model_score=model_score, **(split_overrides or {}))  # the cpu split
    s, how = run_split(victim, arch, ps, g, feats, zfeats, scfg)
    g = s.guide_logits
    s = extra_rank(s, ps, zfeats, scfg)
    s = with_oracle(s, ps.poison_mask, oracle)
    det = detection_metrics(ps.poison_mask, s)
    print("model score", how, {k: round(v, 4) if isinstance(v, float) else v for k, v in det.items()}, flush=True)
    res = unlearn_checked(victim.model, ps.train.images, ps.train.labels, s, g, recipe(base, **overrides),
                          ps.train.num_classes, extra_eval=train_asr_probe(ps))
    outside = clean_outside_dc(ps, s)
    out = {"attack": attack, "recipe": base, "overrides": overrides, "model_score": model_score,
           "model_score_resolved": how, "split": scfg, "oracle": oracle,
           "detection": det, "history": res.history, "trigger_check": res.checks,
           "stopped_early": res.stopped_early, "unlearn_s": res.seconds,
           "clean_outside_dc_before": outside(victim.model), "clean_outside_dc_after": outside(res.model),
           "test_before": ca_asr(victim.model, ps, ds.test), "test_after": ca_asr(res.model, ps, ds.test),
           "victim_root": OPTS["root"] or OPTS["demo"], "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps({k: out[k] for k in ("history", "clean_outside_dc_before", "clean_outside_dc_after",
                                          "test_before", "test_after", "unlearn_s")}, indent=1))
    write_json(ROOT / "results" / "ablation" / f"{tag(attack)}-unlearn-{name}.json", out)


def clean_outside_dc(ps, s: Split):
    """DIAGNOSIS (reads the poison mask): a training-data stand-in for the clean accuracy that held-out D_c cannot
    give when D_c holds only easy samples (held-out D_c accuracy 1.0 on Fashion-MNIST): accuracy on the truly
    clean training samples outside D_c, in D_p (which unlearning pushes away from their labels) and in the mixed
    subset (not trained on during unlearning), and the target class's recall among them."""
    clean = ~ps.poison_mask
    parts = {"dp": np.intersect1d(s.poison, np.flatnonzero(clean)),
             "mixed": np.intersect1d(s.mixed, np.flatnonzero(clean))}
    x, y = ps.train.images, ps.train.labels

    def measure(model):
        out = {}
        for name, idx in parts.items():
            pred = predict_logits(model, x[idx]).argmax(1)
            t = y[idx] == ps.target
            out[name] = {"n": int(len(idx)), "acc": float((pred == y[idx]).mean()),
                         "target_recall": float((pred[t] == ps.target).mean()) if t.any() else None}
        return out
    return measure


def extra_rank(s: Split, ps, zfeats, scfg: dict) -> Split:
    """Ablation-only split additions from the victim's own features (spectral axis; off unless asked):
    `spectral_dp = q` moves samples whose per-class spectral rank is > 1 − q into D_p (out of D_c and mixed);
    `spectral_out = q` only moves them out of D_c (into mixed). `spectral_orient`: "none" (squared projection),
    "skew" (signed, longer tail positive) or "fast" (signed, toward the side the model learned faster: low model
    rank of the split). `spectral_classes` limits both to the listed classes (a known target is diagnosis only)."""
    q_dp, q_out = scfg.get("spectral_dp", 0), scfg.get("spectral_out", 0)
    if not (q_dp or q_out):
        return s
    labels = ps.train.labels
    orient = scfg.get("spectral_orient", "none")
    if orient not in ("none", "skew", "fast"):
        raise ValueError(f"spectral_orient {orient!r}")
    sc = spectral_scores(zfeats(), labels, signed=orient == "skew",
                         toward=-s.model_rank if orient == "fast" else None)
    r = per_class_rank(sc, labels)
    only = scfg.get("spectral_classes")
    if only == "bimodal":  # label-free: the classes whose signed projection is bimodal (coefficient > 5/9)
        b = bimodality(spectral_scores(zfeats(), labels, signed=True), labels)
        only = [c for c, v in b.items() if v > 5 / 9]
        print("spectral classes (bimodal):", only, {c: round(v, 3) for c, v in b.items()}, flush=True)
    inside = np.isin(labels, only) if only is not None else np.ones(len(labels), bool)
    flag_dp = np.flatnonzero(inside & (r > 1 - q_dp)) if q_dp else np.zeros(0, int)
    flag_out = np.flatnonzero(inside & (r > 1 - max(q_dp, q_out)))
    poison = np.union1d(s.poison, flag_dp)
    clean = np.setdiff1d(s.clean, np.union1d(flag_out, poison))
    mixed = np.setdiff1d(np.arange(len(labels)), np.union1d(clean, poison))
    return Split(clean, poison, mixed, s.guide_nll, s.model_nll, s.guide_rank, s.model_rank)


def shift_variant(attack: str, base: str, overrides: dict, model_score: str, name: str,
                  split_overrides: dict | None = None, shares=(0.02, 0.05, 0.1), thresholds=(),
                  starts=("unlearned",), crossfit: bool = False) -> None:
    """The loss shift: after one unlearning pass, each sample's NLL of its given label under the unlearned model
    minus that under the victim. Unlearning D_p's poison generalises to the poison left outside D_p (its trigger
    no longer earns the target label) while relearning D_c keeps the clean samples fit, so a large shift marks
    poison the split missed. Prints the shift's AUROC against the poison mask (diagnosis) in each subset, then,
    per share q (or shift threshold t), a second pass on the split with the top-q shift (or shift > t) of D_c ∪ mixed
    moved into D_p, beside a second pass on the first split (equal steps); each from the unlearned model
    ("unlearned") and/or again from the victim ("victim": the first pass only finds what to move)."""
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    scfg = dict(defaults()["split"], model_score=model_score, **(split_overrides or {}))
    s, how = run_split(victim, arch, ps, g, feats, zfeats, scfg)
    g = s.guide_logits
    s = extra_rank(s, ps, zfeats, scfg)
    x, y, mask, k = ps.train.images, ps.train.labels, ps.poison_mask, ps.train.num_classes
    cfg = recipe(base, **overrides)
    probe, outside = train_asr_probe(ps), clean_outside_dc(ps, s)
    r1 = unlearn(victim.model, x, y, s, g, cfg, k, extra_eval=probe)
    before, after = nll(predict_logits(victim.model, x), y), nll(predict_logits(r1.model, x), y)
    shift = after - before
    if crossfit:  # D_c's own shift from two probe passes that each relearn one half of D_c and leave the other out
        halves = np.array_split(np.random.default_rng(0).permutation(s.clean), 2)
        for mine, other in (halves, halves[::-1]):
            sp = Split(np.sort(other), s.poison, np.union1d(s.mixed, mine), s.guide_nll, s.model_nll,
                       s.guide_rank, s.model_rank)
            rp = unlearn(victim.model, x, y, sp, g, replace(cfg, min_steps=cfg.min_steps // 2), k)
            shift[mine] = nll(predict_logits(rp.model, x[mine]), y[mine]) - before[mine]
    parts = {"all": np.arange(len(y)), "clean": s.clean, "mixed": s.mixed, "poison": s.poison,
             "outside_dp": np.setdiff1d(np.arange(len(y)), s.poison)}
    det = {p: {"n": int(len(i)), "poisoned": int(mask[i].sum()),
               "auroc_shift": auroc(shift[i], mask[i]) if 0 < mask[i].sum() < len(i) else None}
           for p, i in parts.items()}
    print("model score", how, "first pass", r1.history[-1], flush=True)
    out_dp = parts["outside_dp"]
    dump = ROOT / "runs" / "shift" / f"{tag(attack)}-{name}.npz"  # for one-off looks at the distribution
    dump.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dump, shift=shift, before=before, after=after, mask=mask, labels=y,
             subset=s.subset_names().astype(str), model_rank=s.model_rank, guide_rank=s.guide_rank)
    for t in (0.5, 1.0, 2.0, 3.0):
        above = out_dp[shift[out_dp] > t]
        det["outside_dp"][f"above_{t}"] = {"n": int(len(above)), "poisoned": int(mask[above].sum())}
    print("shift AUROC", det, flush=True)
    rows = {"first pass": {"history": r1.history, "detection": detection_metrics(mask, s),
                           "clean_outside_dc": outside(r1.model), "test": ca_asr(r1.model, ps, ds.test)}}
    order = out_dp[np.argsort(-shift[out_dp], kind="stable")]
    cuts = [("top", q, order[:int(round(q * len(y)))]) for q in (0, *shares)]
    cuts += [("shift >", t, out_dp[shift[out_dp] > t]) for t in thresholds]
    for (how_cut, q, moved), start in ((c, m) for c in cuts for m in starts):
        s2 = into_poison(s, moved)
        r2 = unlearn(r1.model if start == "unlearned" else victim.model, x, y, s2, g, cfg, k, extra_eval=probe)
        key = (f"{'second pass' if start == 'unlearned' else 'from the victim'}, "
               + (f"{how_cut} {q} of the shift into D_p" if q else "same split"))
        rows[key] = {"moved": int(len(moved)), "moved_poisoned": int(mask[moved].sum()),
                     "detection": detection_metrics(mask, s2), "history": r2.history,
                     "clean_outside_dc": clean_outside_dc(ps, s2)(r2.model), "test": ca_asr(r2.model, ps, ds.test)}
        print(key, {kk: rows[key][kk] for kk in ("moved", "moved_poisoned")}, r2.history[-1], rows[key]["test"],
              flush=True)
    out = {"attack": attack, "recipe": base, "overrides": overrides, "model_score_resolved": how, "split": scfg,
           "crossfit": crossfit, "shift_auroc": det, "rows": rows, "victim_root": OPTS["root"] or OPTS["demo"],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    write_json(ROOT / "results" / "ablation" / f"{tag(attack)}-shift-{name}.json", out)


def spectral_table(attack: str) -> None:
    """Per class: AUROC against the training poison mask of the spectral score (squared projection on the top
    singular vector of the centred penultimate features of the final victim) and of the signed projection (skew
    orientation, the orientation toward the faster-learned side, and the better one for reference); then the
    default split, and the split with the spectral rank added, per share q."""
    ds, ps, victim, g, arch, feats, zfeats = setup(attack)
    labels, mask = ps.train.labels, ps.poison_mask
    f = zfeats()
    base = defaults()["split"]
    s, how = run_split(victim, arch, ps, g, feats, zfeats, base)
    ms = s.model_nll
    sq, sg = spectral_scores(f, labels), spectral_scores(f, labels, signed=True)
    sf = spectral_scores(f, labels, toward=-s.model_rank)
    per_class = {}
    for c in range(ps.train.num_classes):
        m = labels == c
        if mask[m].any() and (~mask[m]).any():
            a_sg = auroc(sg[m], mask[m])
            per_class[int(c)] = {"n": int(m.sum()), "poisoned": int(mask[m].sum()), "auroc_sq": auroc(sq[m], mask[m]),
                                 "auroc_signed_skew": a_sg, "auroc_signed_fast": auroc(sf[m], mask[m]),
                                 "auroc_signed_best_orientation": max(a_sg, 1 - a_sg),
                                 "auroc_model_score": auroc(-ms[m], mask[m])}
            print(c, {k: round(v, 3) for k, v in per_class[int(c)].items()}, flush=True)
    rows = {"default": detection_metrics(mask, s)}
    for orient in ("none", "skew", "fast"):
        for kind in ("dp", "out"):
            for q in (0.1, 0.3, 0.5):
                for cls in (None, [ps.target]):
                    sc = dict(base, **{f"spectral_{kind}": q, "spectral_orient": orient, "spectral_classes": cls})
                    key = f"orient {orient} {kind} q{q} {'target class (known)' if cls else 'all classes'}"
                    rows[key] = detection_metrics(mask, extra_rank(s, ps, lambda: f, sc))
                    d = rows[key]
                    print(key, {k: round(d[k], 4) if isinstance(d[k], float) else d[k]
                                for k in ("tpr", "fpr", "poison_in_clean", "n_clean", "n_poison")}, flush=True)
    out = {"attack": attack, "model_score": how, "victim_root": OPTS["root"] or OPTS["demo"],
           "per_class": per_class, "splits": rows, "date": time.strftime("%Y-%m-%d %H:%M")}
    write_json(ROOT / "results" / "ablation" / f"{tag(attack)}-spectral.json", out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["split", "purify", "window", "unlearn", "spectral", "shift"])
    p.add_argument("--attack", default="badnets")
    p.add_argument("--recipe", default="cpu")
    p.add_argument("--model-score", default=defaults()["split"]["model_score"])
    p.add_argument("--name", default=None)
    p.add_argument("--root", default=None, help="a `cgd bench --root` folder whose victims to use")
    p.add_argument("--demo", default=None, help="a `cgd demo --out` run directory whose victim to use")
    p.add_argument("--seed", type=int, default=0, help="with --demo: the demo's --seed")
    p.add_argument("--data", default="cifar10", help="dataset of the victims (with --demo: the demo's --data)")
    p.add_argument("--split", default="{}", help="JSON of split overrides for `unlearn` (e.g. spectral_dp)")
    p.add_argument("--oracle", default="none", choices=["none", "dc", "dp"],
                   help="DIAGNOSIS ONLY: move the known poison out of D_c (dc) or into D_p (dp)")
    p.add_argument("--shares", type=float, nargs="*", default=[0.02, 0.05, 0.1], help="shift: top shares moved")
    p.add_argument("--thresholds", type=float, nargs="*", default=[], help="shift: thresholds of the shift")
    p.add_argument("--starts", nargs="*", default=["unlearned"], choices=["unlearned", "victim"],
                   help="shift: the second pass continues the unlearned model or starts again from the victim")
    p.add_argument("--crossfit", action="store_true", help="shift: D_c's shift from two half-D_c probe passes")
    p.add_argument("overrides", nargs="?", default="{}", help="JSON of UnlearnConfig overrides")
    a = p.parse_intermixed_args()
    OPTS.update(root=a.root, demo=a.demo, data=a.data, seed=a.seed)
    if a.what == "split":
        split_table(a.attack)
    elif a.what == "purify":
        purify_table(a.attack)
    elif a.what == "window":
        window_table(a.attack)
    elif a.what == "spectral":
        spectral_table(a.attack)
    elif a.what == "shift":
        shift_variant(a.attack, a.recipe, json.loads(a.overrides), a.model_score, a.name or a.recipe,
                      json.loads(a.split), tuple(a.shares), tuple(a.thresholds), tuple(a.starts), a.crossfit)
    else:
        unlearn_variant(a.attack, a.recipe, json.loads(a.overrides), a.model_score, a.name or a.recipe,
                        json.loads(a.split), a.oracle)


if __name__ == "__main__":
    main()

"""Issue 13 diagnosis: the split's trigger estimate (`cgd.unlearn.estimate_trigger`; a defender can make it),
added k times to 1,000 clean non-target training images, and the victim's / unlearned models' response to it,
beside the true train_asr (which reads the real trigger). The first version (2026-12-04, `-trigger-estimate.json`)
compared D_p with D_c of the target class itself; v2 compares each D_p image with D_c of the class the guide sees. `OMP_NUM_THREADS=1 python benchmarks/trigger_estimate.py ATTACK` on the cached victim of
benchmarks/runs/ATTACK; writes benchmarks/results/ablation/<date>-ATTACK-trigger-estimate.json."""
import sys
import time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import numpy as np, torch
import ablate
from cgd.config import defaults
from cgd.bench import train_asr_probe
from cgd.unlearn import estimate_trigger, recipe, trigger_response, unlearn
from cgd.io import write_json
torch.set_num_threads(1)
attack = sys.argv[1]
ds, ps, victim, g, arch, feats, zfeats = ablate.setup(attack)
scfg = dict(defaults()["split"])
s, how = ablate.run_split(victim, arch, ps, g, feats, zfeats, scfg)
y, x = ps.train.labels, ps.train.images
est = estimate_trigger(x, y, s, s.guide_logits, num_classes=ps.train.num_classes)
print("suspected target", est.target, "residual mean abs", float(np.abs(est.residual).mean()), flush=True)
probe = train_asr_probe(ps)
ks = [0, 2, 4, 8, 16]
row = lambda m: {"train_asr": probe(m)["train_asr"], **{f"k{k}": trigger_response(m, x, est, k) for k in ks}}
out = {"target": est.target, "true_target": ps.target, "victim": row(victim.model)}
print(out, flush=True)
for lam in [0.05, 0.1]:
    r = unlearn(victim.model, x, y, s, s.guide_logits, recipe("cpu", lambda_un=lam), ps.train.num_classes)
    out[f"lambda{lam}"] = {**row(r.model), "held_acc": r.history[-1]["held_acc"]}
    print(lam, out[f"lambda{lam}"], flush=True)
write_json(ablate.ROOT / "results" / "ablation" / f"{time.strftime('%Y-%m-%d')}-{attack}-trigger-estimate-v2.json", out)

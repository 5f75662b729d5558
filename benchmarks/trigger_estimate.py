"""Issue 13 diagnosis (2026-12-04): a trigger estimate a defender can make — the mean image of D_p minus that of
D_c within the class D_p is richest in (the suspected target), added k times to 1,000 clean non-target training
images — and the victim's / unlearned models' response to it, beside the true train_asr (which reads the real
trigger). `OMP_NUM_THREADS=1 python benchmarks/trigger_estimate.py ATTACK` on the cached victim of
benchmarks/runs/ATTACK; writes benchmarks/results/ablation/<date>-ATTACK-trigger-estimate.json."""
import sys
import time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import numpy as np, torch
import ablate
from cgd.config import defaults
from cgd.bench import train_asr_probe
from cgd.unlearn import recipe, unlearn
from cgd.io import write_json
from cgd.tensors import predict_logits
torch.set_num_threads(1)
attack = sys.argv[1]
ds, ps, victim, g, arch, feats, zfeats = ablate.setup(attack)
scfg = dict(defaults()["split"])
s, how = ablate.run_split(victim, arch, ps, g, feats, zfeats, scfg)
y = ps.train.labels
share = np.bincount(y[s.poison], minlength=10) / np.bincount(y, minlength=10)
t = int(np.argmax(share))
print("D_p share per class", np.round(share, 3), "-> suspected target", t, flush=True)
x = ps.train.images.astype(np.float32)
dp_t = s.poison[y[s.poison] == t]; dc_t = s.clean[y[s.clean] == t]
resid = x[dp_t].mean(0) - x[dc_t].mean(0)
print("residual |max|", np.abs(resid).max(), "mean abs", np.abs(resid).mean(), flush=True)
rng = np.random.default_rng(0)
others = rng.choice(s.clean[y[s.clean] != t], 1000, replace=False)
def response(model, k):
    xx = np.clip(x[others] + k * resid, 0, 255).astype(np.uint8)
    return float((predict_logits(model, xx).argmax(1) == t).mean())
probe = train_asr_probe(ps)
ks = [0, 2, 4, 8]
out = {"victim": {"train_asr": probe(victim.model)["train_asr"], **{f"k{k}": response(victim.model, k) for k in ks}}}
print(out, flush=True)
for lam in [0.05, 0.1]:
    r = unlearn(victim.model, ps.train.images, y, s, s.guide_logits, recipe("cpu", lambda_un=lam), 10)
    out[f"lambda{lam}"] = {"train_asr": probe(r.model)["train_asr"], **{f"k{k}": response(r.model, k) for k in ks}}
    print(lam, out[f"lambda{lam}"], flush=True)
write_json(ablate.ROOT / "results" / "ablation" / f"{time.strftime('%Y-%m-%d')}-{attack}-trigger-estimate.json", out)

"""Issue 13 diagnosis (2026-12-04): on CTRL the trigger check's suspected target is class 1, not the target. What the
split's per-class D_p shares say (all of D_p, its model-flagged and its guide-only members), and what the check
and train_asr read with the estimate made for the true target's class, after unlearning at λ_un 0.05 / 0.1 / 0.2.
`OMP_NUM_THREADS=1 python benchmarks/ctrl_target_probe.py ATTACK` on the cached victim of benchmarks/runs/ATTACK;
writes benchmarks/results/ablation/<date>-ATTACK-target-probe.json. Reads the poison's target only to force the
estimate's class — a diagnosis, never a defense."""
import sys
import time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import numpy as np, torch
import ablate
import cgd.unlearn as U
from cgd.config import defaults
from cgd.bench import train_asr_probe
from cgd.io import write_json
from cgd.split import dp_shares
torch.set_num_threads(1)
attack = sys.argv[1]
ds, ps, victim, g, arch, feats, zfeats = ablate.setup(attack)
s, how = ablate.run_split(victim, arch, ps, g, feats, zfeats, dict(defaults()["split"]))
y, x, k = ps.train.labels, ps.train.images, ps.train.num_classes
model_flag = s.poison[s.model_rank[s.poison] < 0.1]
guide_only = np.setdiff1d(s.poison, model_flag)
shares = {name: np.round(dp_shares(y, idx, k), 4).tolist()
          for name, idx in (("dp", s.poison), ("model_flagged", model_flag), ("guide_only", guide_only))}
print(how, shares, flush=True)
est = U.estimate_trigger(x, y, s, s.guide_logits, num_classes=k, target=ps.target)  # DIAGNOSIS: the true target
probe = train_asr_probe(ps)
row = lambda m: {"train_asr": probe(m)["train_asr"], "response_k4": U.trigger_response(m, x, est, 4.0)}
out = {"model_score": how, "shares": shares, "true_target": ps.target, "victim": row(victim.model)}
print(out, flush=True)
for lam in [0.05, 0.1, 0.2]:
    r = U.unlearn(victim.model, x, y, s, s.guide_logits, U.recipe("cpu", lambda_un=lam, escalate=0), k)
    out[f"lambda{lam}"] = {**row(r.model), "held_acc": [r.history[0]["held_acc"], r.history[-1]["held_acc"]]}
    print(lam, out[f"lambda{lam}"], flush=True)
write_json(ablate.ROOT / "results" / "ablation" / f"{time.strftime('%Y-%m-%d')}-{attack}-target-probe.json", out)

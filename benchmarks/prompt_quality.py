"""Zero-shot top-1 and flip-AUROC of the imagenet-text guide on GTSRB's training images under several prompts (docs/benchmarks.md,
GTSRB).  CGD_DATA=/work/shared/data OMP_NUM_THREADS=1 python benchmarks/prompt_quality.py"""
import numpy as np, time, torch
torch.set_num_threads(1)
from cgd.data import load_dataset
from cgd import guides
from cgd.split import nll, auroc
ds = load_dataset("/work/shared/data/gtsrb.tar.gz")
x, y = ds.train.images, ds.train.labels
print(ds.train.class_names[:5], len(x))
g = guides.get("imagenet-text")
rng = np.random.default_rng(0); flip = rng.random(len(y)) < 0.05
yf = y.copy(); yf[flip] = 0  # labels flipped to class 0, as a poison-label attack would
for p in ["a photo of a {label}", "a photo of a {label} traffic sign", "a traffic sign: {label}", "a road sign showing {label}"]:
    t = time.time(); g.prompt = p
    L = g.class_logits(x, ds.train.class_names)
    print(repr(p), "top1 vs train labels %.4f" % (L.argmax(1) == y).mean(), "flip-AUROC %.4f" % auroc(nll(L, yf)[yf == 0], flip[yf == 0]), "%.0f s" % (time.time() - t), flush=True)

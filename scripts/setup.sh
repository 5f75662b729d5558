#!/usr/bin/env bash
# Create .venv in the project root, install CGD with its dependencies (torch 2.13.0 CPU from the local wheel, no
# torchvision), install Fashion-MNIST as the fallback dataset where apt works, then run `cgd demo`.
# Usage: bash scripts/setup.sh [--no-demo]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
if ! [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || sudo -n apt-get install -y -qq dataset-fashion-mnist \
    >/dev/null 2>&1) || echo "note: could not install dataset-fashion-mnist (only needed when CIFAR-10 is absent)"
fi
if [ "${1:-}" != "--no-demo" ]; then
  HF_HUB_OFFLINE=1 .venv/bin/cgd demo
fi

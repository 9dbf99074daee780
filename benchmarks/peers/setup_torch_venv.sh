#!/usr/bin/env bash
# Creates benchmarks/peers/.venv-torch: PyTorch's CPU build (oneDNN convolutions) for
# `benchmarks/cnn_step.py --onednn-python benchmarks/peers/.venv-torch/bin/python`, which times the
# EMNIST CNN's convolutions and training step with another library's kernels on the same machine.
# PyTorch is not a dependency of fedjax_sim. 2.13.0 is the CPU build this project's machines hold;
# on another machine `pip install torch --index-url https://download.pytorch.org/whl/cpu` is the
# CPU build of any version.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-torch"
python="${PYTHON:-python3}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" numpy
"$venv/bin/python" -c "import torch; print(torch.__version__, 'oneDNN:', torch.backends.mkldnn.is_available())"

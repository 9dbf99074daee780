#!/usr/bin/env bash
# Creates benchmarks/peers/.venv-fedjax: FedJAX 0.0.17 on Python 3.11 with pinned dependencies.
#
# fedjax 0.0.17's METADATA asks for absl-py, dm-haiku, jax>=0.4.4, jaxlib, msgpack, optax,
# requests, scipy (no TensorFlow: only fedjax.datasets' downloaders use it, lazily). Unpinned, pip
# picks today's jax, which FedJAX 0.0.17 predates; jax 0.5.3 is the pin the project's issue 14
# found working. With it, dm-haiku 0.0.17 + optax 0.2.8 and dm-haiku 0.0.14 + optax 0.2.4 both
# import and train here at the same speed (CNN 1.43 s/round); the newer pair is used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-fedjax"
python="${PYTHON:-python3.11}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet \
  "jax==0.5.3" "jaxlib==0.5.3" "dm-haiku==0.0.17" "optax==0.2.8" \
  "numpy<2.3" "scipy" "absl-py" "msgpack" "requests" "fedjax==0.0.17"
"$venv/bin/python" -c "from importlib.metadata import version as v; import fedjax; print({p: v(p) for p in ('fedjax', 'jax', 'jaxlib', 'dm-haiku', 'optax')})"

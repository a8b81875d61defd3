#!/bin/bash
# The model-stage benchmarks on a lent GPU, in one call of about 5 minutes: CapFilt against the
# naive loop and the models alone (bench/capfilt.py), grounding against the per-image loop
# (bench/grounding.py). The GPU machine has torch and transformers but no spaCy or open_clip, so
# the phrases and the CLIP tokenizer are prepared here first, on CPU:
#     python bench/grounding.py --prepare bench/out/grounding
# then, from the repository root on the GPU machine (device tool: carry bench/out/grounding):
#     bash bench/gpu.sh [CAPFILT_IMAGES] [GROUNDING_IMAGES]
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f bench/out/grounding/phrases.json ] || { echo "run 'python bench/grounding.py --prepare bench/out/grounding' first"; exit 2; }
package=$(mktemp -d) && ln -s "$PWD" "$package/mmcurate"  # the checkout as the mmcurate package, uninstalled
export PYTHONPATH="$package" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
timeout 170 python3 bench/capfilt.py --device cuda --images "${1:-32}" --batch-size 32
timeout 120 python3 bench/grounding.py --prepared bench/out/grounding --device cuda --images "${2:-64}" --batch-size 16

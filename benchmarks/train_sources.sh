#!/usr/bin/env bash
# The Fashion-MNIST source models the benchmarks share (the same commands as docs/results.md), written to
# $MODELLEGO_SHARED_MODELS (default runs/models); a model already there is kept. About 15 min on a quiet 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${MODELLEGO_SHARED_MODELS:-runs/models}"
M="${MODELLEGO:-.venv/bin/modellego}"
mkdir -p "$OUT"
[ -f "$OUT/lenet5.safetensors" ] || "$M" train --model lenet5 --data fashion-mnist --epochs 8 --width 1.0 --lr 0.002 --seed 0 --out "$OUT/lenet5.safetensors"
[ -f "$OUT/vgg16-w0.25.safetensors" ] || "$M" train --model vgg16 --data fashion-mnist --epochs 5 --width 0.25 --lr 0.002 --seed 0 --out "$OUT/vgg16-w0.25.safetensors"
[ -f "$OUT/resnet18-w0.25.safetensors" ] || "$M" train --model resnet18 --data fashion-mnist --epochs 5 --width 0.25 --lr 0.002 --seed 0 --out "$OUT/resnet18-w0.25.safetensors"

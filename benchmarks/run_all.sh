#!/bin/sh
# Regenerates every table and figure of the paper-application benchmarks (issue 12): α/β sweeps, compression
# against FPGM / L1 / HRank, distillation, decision routes and heat maps. Tables go into docs/results.md
# (between each benchmark's markers), figures into docs/figures/, raw numbers into runs/paper/*.json.
# Needs the shared Fashion-MNIST source models (MODELLEGO_SHARED_MODELS, default runs/models, made by benchmarks/train_sources.sh: lenet5,
# vgg16-w0.25, resnet18-w0.25 trained with the commands in benchmarks/paper_common.py); digits models are
# trained on the way. Sized for a 2-core CPU: each step prints its elapsed time.
#   usage: benchmarks/run_all.sh [PYTHON]     (default: .venv/bin/python, else python3)
set -eu
cd "$(dirname "$0")/.."
PYTHON=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
start=$(date +%s)
for step in figures sweeps compression distillation; do
    echo "== benchmarks/$step.py"
    t=$(date +%s)
    nice -n 10 "$PYTHON" "benchmarks/$step.py"
    echo "== $step: $(( $(date +%s) - t )) s"
done
echo "== all: $(( $(date +%s) - start )) s"

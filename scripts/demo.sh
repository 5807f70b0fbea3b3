#!/usr/bin/env bash
# The README's first command: set up from nothing, build small local Llama models, merge them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/make_demo_models.py demo-out/models
echo "--- plan (reads headers only) ---"
.venv/bin/fusekit plan configs/linear.yaml
echo "--- merge ---"
.venv/bin/fusekit merge configs/linear.yaml demo-out/merged-linear --overwrite
.venv/bin/fusekit merge configs/task_arithmetic.yaml demo-out/merged-task-arithmetic --overwrite
.venv/bin/fusekit merge configs/frankenmerge.yaml demo-out/merged-frankenmerge --overwrite
echo "merged models are in demo-out/ (each loads with transformers.AutoModelForCausalLM)"

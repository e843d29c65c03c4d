#!/usr/bin/env bash
# The served runtime on a GPU, one command: export the packaged SmolLM2-135M (fp32 + int8 + int4,
# each quality-gated), then `newsrec bench models --device cuda --fast` (CUDA execution provider,
# KV cache bound through IOBinding; plain and prompt lookup + early stop). The torch row runs
# on the CPU (models/torch_lm.py is CPU only). Exports are reused on later runs.
#
#   tools/gpu_bench.sh [OUT_DIR]     env: DATA (dataset dir, default .newsrec/data/sim500 if present),
#                                         USERS (default 100), BATCH_SIZES (default 1,8,32)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${1:-bench-results/gpu}
DATA=${DATA:-.newsrec/data/sim500}

$PY - <<'PY'
import sys
import onnxruntime as ort
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider: install onnxruntime-gpu with CUDA")
PY
nvidia-smi -L

HF=$($PY -c "from models.bootstrap import smollm2_hf_dir; print(smollm2_hf_dir())")
if [ ! -f "$OUT/student-int4/manifest.json" ]; then
  .venv/bin/newsrec export --model "$HF" --out "$OUT/student" --int8 --int4 --overwrite
fi
eval_args=()
if [ -d "$DATA" ]; then eval_args=(--data "$DATA" --users "${USERS:-100}"); fi
.venv/bin/newsrec bench models --device cuda --fast --student "$HF" --student-onnx "$OUT/student" \
  --student-int8 "$OUT/student-int8" --student-int4 "$OUT/student-int4" \
  --batch-sizes "${BATCH_SIZES:-1,8,32}" "${eval_args[@]}" --out "$OUT/models.json"

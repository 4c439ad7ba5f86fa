#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, on one CUDA machine with this checkout installed
# (`pip install -e .` or `make install TORCH=...`): the training bench, the clean-protocol estimate and the
# decoded-store benchmark. Results land in OUT (default bench-out/): bench-cuda.json, estimate.txt,
# decode.json, versions.txt. About 6-8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
RUNS=$OUT/runs
mkdir -p "$OUT" "$RUNS"
PY=${PYTHON:-python3}
STUDY=("$PY" -m studylib.cli)
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF' | tee "$OUT/versions.txt"
import torch, timm
print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
EOF

# 1. training throughput: authors-style loop, single run, fused M = 1, 4, 16, 64 (pre-training, segmentation);
#    --runs stores the rates for the estimate below
"${STUDY[@]}" bench --device cuda --json --runs "$RUNS" | tee "$OUT/bench-cuda.json"

# 2. the paper grid under the clean protocol (3 seeds, shared intermediates) from those rates
"${STUDY[@]}" plan params/clean.yaml --estimate --runs "$RUNS" | tail -n 12 | tee "$OUT/estimate.txt"

# 3. decoding ImageNet-sized synthetic JPEGs into the store: 1 worker, every core, nvJPEG
"$PY" benchmarks/decode.py --n 20000 --single-n 2000 --gpu --json | tee "$OUT/decode.json"

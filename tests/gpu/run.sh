#!/usr/bin/env bash
# On a GPU machine with CUDA, PyTorch, numpy and pytest (no TensorFlow needed): builds the LoRA GPU kernels
# with nvcc for this GPU, checks every kernel against a float64 numpy reference over the full shape sweep,
# then times them against PyTorch in one run and prints one table. About 2 minutes on an H200.
#
#   tests/gpu/run.sh                 # OUT=/tmp/tf_lora_gpu: the library, ptxas report, bench table
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/tf_lora_gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
ARCH=${ARCH:-$($PYTHON -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")}

echo "== build (nvcc, sm_$ARCH)"
nvcc -std=c++17 -O3 -x cu -shared -Xcompiler -fPIC -I. -Xptxas -v \
  -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
  core/kernels/lora_gpu.cu.cc core/kernels/lora_gpu_launch.cu.cc tests/gpu/harness.cu.cc \
  -o "$OUT/liblora_gpu_cuda.so" 2> "$OUT/ptxas.txt"
grep -c "spill stores" "$OUT/ptxas.txt" > /dev/null && grep -E "spill (stores|loads)" "$OUT/ptxas.txt" \
  | grep -v " 0 bytes spill stores, 0 bytes spill loads" || echo "no register spills"

echo "== tests (every kernel against numpy, full sweep)"
TF_LORA_GPU_BACKEND=cuda TF_LORA_GPU_LIB="$OUT/liblora_gpu_cuda.so" \
  $PYTHON -m pytest -q -p no:cacheprovider -c /dev/null --noconftest tests/gpu/test_lora_gpu.py

echo "== benchmark"
$PYTHON tests/gpu/bench_lora_gpu.py --lib "$OUT/liblora_gpu_cuda.so" | tee "$OUT/bench.txt"

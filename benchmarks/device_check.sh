#!/usr/bin/env bash
# The GPU device check of issue 8, in one call that ends within 8 minutes:
# full-size Mixtral-8x7B with random weights built on the GPU, 128 greedy tokens at batch 1;
# prints the GPU, tokens/s, peak memory and the fraction of the memory-bandwidth bound
# (against the copy bandwidth measured in the same run and against the vendor's figure),
# after timing the big matrix-vector products alone (--kernel-bench).
#   bf16 needs a 141 GB H200; on an 80 GB H100 run with QUANT=int8.
# Usage (repository root, on the GPU machine): OUT=/some/dir bash benchmarks/device_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  # 0. decisive correctness check (added after the H200 runs in README.md, not yet run there): two
  #    full-width layers in float32, where the fast step's logits must match Mixtral.forward's to ~1e-6
  timeout "${T0:-90}" python3 benchmarks/decode.py --config full --random-weights --layers 2 --dtype float32 \
      --tokens 16 --quant none,int8 --modes graph --json "$OUT/decode_check.json" 2>&1 | grep --line-buffered -e "\[" -e FAILED
  timeout "${T1:-400}" python3 benchmarks/decode.py --config full --random-weights --tokens 128 \
      --quant "${QUANT:-none,int8}" --modes "${MODES:-graph,compile}" --kernel-bench --json "$OUT/decode.json" \
      2>&1 | grep --line-buffered -v -e "UserWarning" -e "Online softmax" -e "split the reduction" -e "important use case" -e "softmax.$" -e "warnings.warn" -e "^$"
  date -u
} 2>&1 | tee "$OUT/log"

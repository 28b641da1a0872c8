#!/usr/bin/env bash
# The GPU device check (issues 8 and 30), in one call that ends within 8 minutes, on random full-size weights:
#   0. fast against eager: two full-width layers in float32, FastDecoder's logits against Mixtral.forward's
#   1. decode tokens/s at batch 1, 128 greedy tokens: bf16 when the GPU holds the 93.4 GB (an H200),
#      else int8 (an 80 GB H100), with the fraction of the memory-bandwidth bound and the matrix-vector
#      products timed alone (--kernel-bench)
#   2. expert offloading: cache hit rate, bytes copied per token and tokens/s (8 full-width layers, 13 slots:
#      the 24 GB plan's 51 slots for 32 layers, scaled)
# Usage (repository root, on the GPU machine): OUT=/some/dir bash benchmarks/device_check.sh
# QUANT=none|int8|none,int8 and MODES=graph,compile override step 1's choices; T0, T1, T2 its time limits.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ -z "${QUANT:-}" ]; then
  if [ "${MEM_MIB:-0}" -gt 120000 ]; then QUANT=none; else QUANT=int8; fi
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null | cut -c1-120
  echo "step 1 runs quant=$QUANT (GPU memory ${MEM_MIB} MiB)"
  timeout "${T0:-90}" python3 benchmarks/decode.py --config full --random-weights --layers 2 --dtype float32 \
      --tokens 16 --quant none,int8 --modes graph --json "$OUT/decode_check.json" \
      2>&1 | grep --line-buffered -e "\[" -e FAILED -e Error
  timeout "${T1:-270}" python3 benchmarks/decode.py --config full --random-weights --tokens 128 \
      --quant "$QUANT" --modes "${MODES:-graph}" --kernel-bench --json "$OUT/decode.json" \
      2>&1 | grep --line-buffered -v -e "UserWarning" -e "Online softmax" -e "split the reduction" \
      -e "important use case" -e "softmax.$" -e "warnings.warn" -e "^$"
  timeout "${T2:-100}" python3 benchmarks/offload_check.py --layers 8 --slots 13 --tokens 32 \
      --json "$OUT/offload.json" 2>&1 | grep --line-buffered -e "\[offload\]" -e Error
  date -u
} 2>&1 | tee "$OUT/log"

#!/usr/bin/env bash
# The REFRAG GPU check (issue 8: time to first token at 512 / 2K / 8K context tokens on a GPU), the command of the
# third device call (bench/device/README.md, "REFRAG"): the CUDA tests against the CPU, then bench/refrag.py on
# CUDA; logs and results go to $OUT. About 2-3 minutes on an H100/H200 once the machine is up.
# SIEVE_GPU_DEVICE=cpu SIEVE_GPU_SIZES=512 rehearse it on this machine (the tests then skip).
. .gpu/scripts/boot.sh
OUT=${OUT:-/tmp/refrag-gpu-out}; mkdir -p "$OUT"
device=${SIEVE_GPU_DEVICE:-cuda} sizes=${SIEVE_GPU_SIZES:-512,2048,8192}
set -o pipefail
$PY -m pytest -q -p no:cacheprovider tests/gpu/test_refrag_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -5
# bfloat16 is the dtype a CUDA server runs by default (SIEVE_DTYPE=auto)
$PY bench/refrag.py --device "$device" --sizes "$sizes" --ks 8,16,32 --expansions 0.25 --repeat 3 \
  --name "refrag-speed-$device" 2>&1 | tee "$OUT/bench.log"
cp bench/results/refrag-speed-"$device".json bench/results/refrag-speed-"$device".png "$OUT/" 2>/dev/null
ls "$OUT"

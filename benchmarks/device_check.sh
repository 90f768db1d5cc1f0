#!/usr/bin/env bash
# The GPU checks of the engine, as one prepared run for a session that is lent a device (an H200):
# the CUDA tests, then benchmarks/perf.py at the Llama-2-7B shape with the full 256 x 2048 calibration,
# a GQA shape and a 70B shape with a few blocks. Everything lands in $OUT (JSON + logs).
#
# Before calling it, here: the data files the CUDA tests read must travel inside the checkout
# (../shared does not):
#   mkdir -p .devdata/wikitext-2-v1 .devdata/wikitext-2-raw-v1 && echo /.devdata/ >> .git/info/exclude
#   cp ../shared/data/wikitext-2-v1/valid.txt .devdata/wikitext-2-v1/
#   cp ../shared/data/wikitext-2-raw-v1/test.jsonl .devdata/wikitext-2-raw-v1/
# then: run(command="bash benchmarks/device_check.sh", carry=[".devdata"], timeout_s=600)
set -uo pipefail
export PYTHONUNBUFFERED=1 SVDBENCH_DATA="$PWD/.devdata" SVDBENCH_CACHE=/tmp/svdbench-cache HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
timeout 300 python3 -m benchmarks.perf --shape llama-2-7b --blocks 32 --calib-samples 256 --calib-seqlen 2048 \
  --eval-windows 166 --eval-seqlen 2048 --rate-size 8192 --out "$OUT/perf-llama-2-7b.json" 2>&1 | tee "$OUT/perf-7b.log"
timeout 90 python3 -m benchmarks.perf --shape llama-3-8b --blocks 4 --calib-samples 256 --calib-seqlen 2048 \
  --eval-windows 32 --eval-seqlen 2048 --rate-size 4096 --out "$OUT/perf-llama-3-8b.json" 2>&1 | tail -20
timeout 120 python3 -m benchmarks.perf --shape llama-2-70b --blocks 8 --calib-samples 64 --calib-seqlen 2048 \
  --eval-windows 16 --eval-seqlen 2048 --eval-offload always --rate-size 4096 --out "$OUT/perf-llama-2-70b-8blocks.json" 2>&1 | tail -20

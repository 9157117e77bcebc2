#!/usr/bin/env bash
# Issue 2 baseline on the GPU host: llama-3-8b shape, bf16, reference-class attention (sdpa),
# beside transformers in the same run. Writes JSON to $OUT (or bench/results) and a short table.
set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -m pytest tests/gpu -q -x 2>&1 | tail -3 | tee "$out/gpu-tests.log"
run() { timeout "$1" python3 -m rayfleet.cli bench offline --model-shape llama-3-8b --device cuda \
  --dtype bfloat16 --compare-hf "${@:2}" 2>&1 | grep -v Warning | tail -4; }
run 150 --num-requests 1 --input-len 512 --output-len 256 --output-json "$out/offline-llama-3-8b-batch1.json"
run 400 --num-requests 256 --input-len 512 --output-len 256 --output-json "$out/offline-llama-3-8b-256x512-256.json"

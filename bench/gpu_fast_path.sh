#!/usr/bin/env bash
# Issue 3 on the GPU host, llama-3-8b bf16 on the fast path (Triton kernels, decode CUDA graphs,
# overlapped scheduling). Phases (default: all; each fits one 10-minute device call):
#   tests     GPU tests + engine-on-Triton test
#   profile   per-step wall vs GPU kernel time (bench/profile_step.py)
#   latency   batch-1 decode; 1000 x 1000/1000
#   caching   1000 x 128/128 without / with / without prefix caching (alternating, so warm-up
#             and order effects show), the middle run beside transformers generate_batch
#   fp8kv     1000 x 1000/1000 and 1000 x 128/128 with the fp8 KV cache (--kv-cache-dtype fp8) and
#             up to FP8_MAX_NUM_SEQS (512) running requests
# JSON to $OUT (default bench/results); a short table last.
set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
phases=${*:-tests profile latency caching}
run() { timeout "$1" python3 -m rayfleet.cli bench offline --model-shape llama-3-8b --device cuda \
  --dtype bfloat16 "${@:2}" 2>&1 | grep -E "^rayfleet|^transformers|Error|error" | tail -3; }
for phase in $phases; do
  case $phase in
    tests)
      timeout 280 python3 -m pytest tests/gpu tests/kernels/test_engine_triton.py -q -x 2>&1 \
        | tail -4 | tee "$out/gpu-tests.log" ;;
    profile)
      timeout 300 python3 bench/profile_step.py --output-json "$out/profile-step-overlap-H100.json" \
        2>&1 | tail -4 ;;
    latency)
      run 100 --num-requests 1 --input-len 512 --output-len 256 \
        --output-json "$out/fast-llama-3-8b-batch1.json"
      run 330 --num-requests 1000 --input-len 1000 --output-len 1000 \
        --output-json "$out/fast-llama-3-8b-1000x1000-1000.json" ;;
    caching)
      run 80 --num-requests 1000 --input-len 128 --output-len 128 --no-prefix-caching \
        --output-json "$out/prefix-cost-128x128-nocache-a-H100.json"
      run 420 --num-requests 1000 --input-len 128 --output-len 128 --compare-hf \
        --output-json "$out/fast-llama-3-8b-1000x128-128.json"
      run 80 --num-requests 1000 --input-len 128 --output-len 128 --no-prefix-caching \
        --output-json "$out/prefix-cost-128x128-nocache-b-H100.json" ;;
    fp8kv)
      # twice the KV tokens: let the batch grow past the bf16 run's 256 (eager past the graphs)
      seqs=${FP8_MAX_NUM_SEQS:-512}
      run 330 --num-requests 1000 --input-len 1000 --output-len 1000 --kv-cache-dtype fp8 \
        --max-num-seqs "$seqs" --output-json "$out/fast-llama-3-8b-1000x1000-1000-fp8kv-$seqs.json"
      run 80 --num-requests 1000 --input-len 128 --output-len 128 --kv-cache-dtype fp8 \
        --max-num-seqs "$seqs" --output-json "$out/fast-llama-3-8b-1000x128-128-fp8kv-$seqs.json" ;;
  esac
done
python3 - "$out" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    if not (f.name.startswith("fast-") or f.name.startswith("prefix-cost")):
        continue
    d = json.loads(f.read_text()); r = d["rayfleet"]; hf = d.get("transformers", {})
    print(f"{f.name:46s} out {r['output_tok_s']:9.1f} tok/s  TTFT p50 {r['ttft_s']['p50']*1e3:8.1f} ms  "
          f"ITL p50 {r['itl_s'].get('p50', 0)*1e3:6.2f} ms  hf {hf.get('output_tok_s', 0):7.1f}")
PY

#!/usr/bin/env bash
# Issue 3 on the GPU host: GPU tests, then llama-3-8b bf16 on the fast path (Triton attention and
# fused ops, decode CUDA graphs): batch-1 decode, 1000 x 1000/1000, 1000 x 128/128 with and
# without prefix caching. JSON to $OUT (default bench/results); a short table last.
set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
timeout 280 python3 -m pytest tests/gpu tests/kernels/test_engine_triton.py -q -x 2>&1 | tail -4 | tee "$out/gpu-tests.log"
run() { timeout "$1" python3 -m rayfleet.cli bench offline --model-shape llama-3-8b --device cuda \
  --dtype bfloat16 "${@:2}" 2>&1 | grep -E "^rayfleet|^transformers|Error|error" | tail -3; }
run 120 --num-requests 1 --input-len 512 --output-len 256 --output-json "$out/fast-llama-3-8b-batch1.json"
run 420 --num-requests 1000 --input-len 1000 --output-len 1000 --output-json "$out/fast-llama-3-8b-1000x1000-1000.json"
run 90 --num-requests 1000 --input-len 128 --output-len 128 --output-json "$out/fast-llama-3-8b-1000x128-128.json"
run 90 --num-requests 1000 --input-len 128 --output-len 128 --no-prefix-caching --output-json "$out/fast-llama-3-8b-1000x128-128-nocache.json"
python3 - "$out" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("fast-*.json")):
    d = json.loads(f.read_text()); r = d["rayfleet"]
    print(f"{f.name:44s} out {r['output_tok_s']:9.1f} tok/s  decode/req p50 "
          f"{r['decode_tok_s_per_request'].get('p50', 0):7.1f}  TTFT p50 {r['ttft_s']['p50']*1e3:8.1f} ms  "
          f"ITL p50 {r['itl_s'].get('p50', 0)*1e3:6.2f} ms  graphs {d.get('cuda_graphs')}  "
          f"roofline {d.get('roofline_batch1_tok_s', 0):.0f}")
PY

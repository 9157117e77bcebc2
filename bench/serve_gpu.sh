#!/usr/bin/env bash
# Serving benchmark on the GPU host: `rayfleet serve` with a Llama-3.2-1B-shaped random model,
# `rayfleet bench serve` at several Poisson rates (JSON + latency-vs-load plot under
# bench/results/), then `rayfleet bench offline` on the same shape for the serving-overhead
# comparison, then SIGTERM the server (it drains and stops its Ray head).
#
# Usage: bench/serve_gpu.sh [RATES] [NUM_REQUESTS]     (defaults: "2,4,8,16,inf" 200)
# Env:   SHAPE (llama-3.2-1b) INPUT_LEN (512) OUTPUT_LEN (128) GRPC_PORT (50051)
#        HTTP_PORT (8000) NUM_REPLICAS (1) GPUS_PER_REPLICA (1) MAX_NUM_SEQS (256)
#        MAX_ONGOING (256) PYTHON (python3) EXTRA_SERVE_ARGS ("")
set -euo pipefail

RATES="${1:-2,4,8,16,inf}"
NUM_REQUESTS="${2:-200}"
SHAPE="${SHAPE:-llama-3.2-1b}"
INPUT_LEN="${INPUT_LEN:-512}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
GRPC_PORT="${GRPC_PORT:-50051}"
HTTP_PORT="${HTTP_PORT:-8000}"
NUM_REPLICAS="${NUM_REPLICAS:-1}"
GPUS_PER_REPLICA="${GPUS_PER_REPLICA:-1}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-256}"
MAX_ONGOING="${MAX_ONGOING:-256}"
MAX_MODEL_LEN=$((INPUT_LEN + OUTPUT_LEN + 64))

cd "$(dirname "$0")/.."
mkdir -p bench/results
# `python -m rayfleet.cli` from the repository root: no install needed.
RAYFLEET=("${PYTHON:-python3}" -m rayfleet.cli)
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="bench/results/serve-${SHAPE}-${STAMP}.server.log"

# shellcheck disable=SC2086
"${RAYFLEET[@]}" serve --model-shape "$SHAPE" --device cuda \
    --num-replicas "$NUM_REPLICAS" --num-gpus-per-replica "$GPUS_PER_REPLICA" \
    --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
    --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN" \
    --max-ongoing-requests "$MAX_ONGOING" --max-queued-requests -1 \
    ${EXTRA_SERVE_ARGS:-} >"$LOG" 2>&1 &
SERVER=$!

stop_server() {
    if kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER"
        wait "$SERVER" || true
    fi
}
trap stop_server EXIT

echo "waiting for the server (log: $LOG)"
for _ in $(seq 1 600); do
    if grep -q "^rayfleet ready" "$LOG"; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "server exited:"; tail -50 "$LOG"; exit 1
    fi
    sleep 1
done
grep "^rayfleet ready" "$LOG" || { echo "server not ready after 600 s"; tail -50 "$LOG"; exit 1; }

"${RAYFLEET[@]}" bench serve --target "127.0.0.1:${GRPC_PORT}" --rate "$RATES" \
    --num-requests "$NUM_REQUESTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --output-json "bench/results/serve-${SHAPE}-${INPUT_LEN}x${OUTPUT_LEN}-${STAMP}.json"

stop_server
trap - EXIT

# The same workload through the engine alone (no Ray, no gRPC): the serving overhead baseline.
"${RAYFLEET[@]}" bench offline --model-shape "$SHAPE" --device cuda \
    --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN" \
    --num-requests "$NUM_REQUESTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"

#!/usr/bin/env bash
# Routing benchmark: `rayfleet serve` with several fractional-GPU replicas of a Llama-3.2-1B-shaped
# random model, then `rayfleet bench routing` (all four routing modes on the same replicas, mode
# chosen per request by gRPC metadata) over a short rate sweep: JSON + plot under $OUT. Then
# SIGTERM the server (it drains and stops its Ray head). About 5 minutes on one H100.
#
# Usage: bench/routing_gpu.sh [RATES] [NUM_REQUESTS]      (defaults: "8,16,32" 160)
# Env:   OUT (bench/results) DEVICE (cuda) SHAPE (llama-3.2-1b; "" = bundled demo model)
#        NUM_REPLICAS (4) GPUS_PER_REPLICA (0.2) KV_BYTES (2 GiB per replica: every replica
#        gets its own pool of this size, so 4 replicas never each claim 90% of the GPU; small
#        enough that one replica cannot hold every tenant's prefix, which is what routing is for)
#        TENANTS (32) USERS (4) PREFIX_LEN (1024) USER_PREFIX_LEN (128) QUERY_LEN (128)
#        OUTPUT_LEN (64) MAX_NUM_SEQS (128) GRPC_PORT (50051) HTTP_PORT (8000)
#        EXTRA_SERVE_ARGS ("") EXTRA_BENCH_ARGS ("")
# CPU smoke test (tiny scale):
#   DEVICE=cpu SHAPE= NUM_REPLICAS=3 TENANTS=4 USERS=2 PREFIX_LEN=64 USER_PREFIX_LEN=16 \
#   QUERY_LEN=16 OUTPUT_LEN=4 bench/routing_gpu.sh 4 24
set -euo pipefail

RATES="${1:-8,16,32}"
NUM_REQUESTS="${2:-160}"
OUT="${OUT:-bench/results}"
DEVICE="${DEVICE:-cuda}"
SHAPE="${SHAPE-llama-3.2-1b}"
NUM_REPLICAS="${NUM_REPLICAS:-4}"
GPUS_PER_REPLICA="${GPUS_PER_REPLICA:-0.2}"
KV_BYTES="${KV_BYTES:-$((2 * 1024 * 1024 * 1024))}"
TENANTS="${TENANTS:-32}"
USERS="${USERS:-4}"
PREFIX_LEN="${PREFIX_LEN:-1024}"
USER_PREFIX_LEN="${USER_PREFIX_LEN:-128}"
QUERY_LEN="${QUERY_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-64}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-128}"
GRPC_PORT="${GRPC_PORT:-50051}"
HTTP_PORT="${HTTP_PORT:-8000}"
MAX_MODEL_LEN=$((PREFIX_LEN + USER_PREFIX_LEN + QUERY_LEN + OUTPUT_LEN + 64))

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
NAME="routing-${SHAPE:-demo}-${DEVICE}-${STAMP}"
LOG="$OUT/${NAME}.server.log"

MODEL_ARGS=()
if [ -n "$SHAPE" ]; then MODEL_ARGS=(--model-shape "$SHAPE"); fi
if [ "$DEVICE" = cuda ]; then
    DEVICE_ARGS=(--device cuda --num-gpus-per-replica "$GPUS_PER_REPLICA"
                 --kv-cache-memory-bytes "$KV_BYTES" --max-model-len "$MAX_MODEL_LEN")
else
    # CPU: the demo model's own context; replicas ask for a sliver of a CPU each.
    DEVICE_ARGS=(--device cpu --num-cpus-per-replica 0.1 --num-cpus 8
                 --kv-cache-memory-bytes "$((64 * 1024 * 1024))")
fi

# shellcheck disable=SC2086
rayfleet serve "${MODEL_ARGS[@]}" "${DEVICE_ARGS[@]}" \
    --num-replicas "$NUM_REPLICAS" --routing prefix_precise \
    --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" --max-num-seqs "$MAX_NUM_SEQS" \
    --max-ongoing-requests "$MAX_NUM_SEQS" --max-queued-requests -1 \
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
for _ in $(seq 1 300); do
    if grep -q "^rayfleet ready" "$LOG"; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "server exited:"; tail -50 "$LOG"; exit 1
    fi
    sleep 1
done
grep "^rayfleet ready" "$LOG" || { echo "server not ready after 300 s"; tail -50 "$LOG"; exit 1; }

# shellcheck disable=SC2086
rayfleet bench routing --target "127.0.0.1:${GRPC_PORT}" --rate "$RATES" \
    --num-requests "$NUM_REQUESTS" --tenants "$TENANTS" --users "$USERS" \
    --prefix-len "$PREFIX_LEN" --user-prefix-len "$USER_PREFIX_LEN" --query-len "$QUERY_LEN" \
    --output-len "$OUTPUT_LEN" --output-json "$OUT/${NAME}.json" ${EXTRA_BENCH_ARGS:-}

stop_server
trap - EXIT

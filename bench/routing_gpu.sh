#!/usr/bin/env bash
# Routing benchmark: `rayfleet serve` with several fractional-GPU replicas of a Llama-3.2-1B-shaped
# random model, then `rayfleet bench routing`: all four routing modes on the same replicas (mode
# chosen per request by gRPC metadata), a multi-tenant shared-prefix workload (tenants x users,
# long shared prefixes), Poisson arrivals over a rate sweep that ends past saturation. JSON + plot
# under $OUT; then SIGTERM the server (it drains and stops its Ray head). About 4-5 minutes on one
# H100: server start ~1 min, then 16 runs (4 modes x 4 rates) of 256 requests, each lasting
# 256 / min(rate, capacity) s. Round-robin, whose every request prefills ~1.5k uncached tokens,
# saturates near 30 req/s; prefix routing, prefilling ~0.2k, several times higher; "inf" (all
# at once) is past saturation for every mode. The last lines printed compare prefix_precise with
# round_robin per rate (throughput ratio, TTFT p90 ratio, which modes were saturated).
#
# Usage: bench/routing_gpu.sh [RATES] [NUM_REQUESTS]      (defaults: "24,48,96,inf" 256)
# Env:   OUT (bench/results) DEVICE (cuda) SHAPE (llama-3.2-1b; "" = bundled demo model)
#        PYTHON (python3) NUM_REPLICAS (4) GPUS_PER_REPLICA (0.2)
#        KV_BYTES (1.5 GiB per replica = 49k tokens of llama-3.2-1b: every replica gets its own
#        pool of this size, so 4 replicas never each claim 90% of the GPU. The workload's shared
#        context is 32 x 2048 + 128 x 256 = 98k tokens: one replica holds its quarter plus the
#        running requests, not all of it, so round-robin keeps evicting what the next request
#        needs while prefix routing keeps each tenant on one replica; llm-d's benchmark does the
#        same.)
#        TENANTS (32) USERS (4 per tenant) PREFIX_LEN (2048) USER_PREFIX_LEN (256) QUERY_LEN (128)
#        OUTPUT_LEN (64) MAX_NUM_SEQS (64) MAX_ONGOING (4 x MAX_NUM_SEQS: past saturation the
#        excess waits in the engines' queues, which the router weighs, instead of in Serve's
#        router, which would probe replica queue lengths in a loop) STREAM_MSGS (1000 stream
#        messages/s through the ingress) GRPC_PORT (50051) HTTP_PORT (8000)
#        EXTRA_SERVE_ARGS ("") EXTRA_BENCH_ARGS ("")
# CPU smoke test (tiny scale, ~4 minutes on 2 cores):
#   DEVICE=cpu SHAPE= NUM_REPLICAS=2 TENANTS=8 USERS=2 PREFIX_LEN=256 USER_PREFIX_LEN=32 \
#   QUERY_LEN=16 OUTPUT_LEN=16 MAX_NUM_SEQS=16 KV_BYTES=$((20 * 1024 * 1024)) \
#   bench/routing_gpu.sh 2,4,8,inf 48
set -euo pipefail

RATES="${1:-24,48,96,inf}"
NUM_REQUESTS="${2:-256}"
OUT="${OUT:-bench/results}"
DEVICE="${DEVICE:-cuda}"
SHAPE="${SHAPE-llama-3.2-1b}"
PYTHON="${PYTHON:-python3}"
NUM_REPLICAS="${NUM_REPLICAS:-4}"
GPUS_PER_REPLICA="${GPUS_PER_REPLICA:-0.2}"
KV_BYTES="${KV_BYTES:-$((3 * 512 * 1024 * 1024))}"
TENANTS="${TENANTS:-32}"
USERS="${USERS:-4}"
PREFIX_LEN="${PREFIX_LEN:-2048}"
USER_PREFIX_LEN="${USER_PREFIX_LEN:-256}"
QUERY_LEN="${QUERY_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-64}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-64}"
MAX_ONGOING="${MAX_ONGOING:-$((4 * MAX_NUM_SEQS))}"
STREAM_MSGS="${STREAM_MSGS:-1000}"
GRPC_PORT="${GRPC_PORT:-50051}"
HTTP_PORT="${HTTP_PORT:-8000}"
MAX_MODEL_LEN=$((PREFIX_LEN + USER_PREFIX_LEN + QUERY_LEN + OUTPUT_LEN + 64))

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
NAME="routing-${SHAPE:-demo}-${DEVICE}-${STAMP}"
LOG="$OUT/${NAME}.server.log"
# `python -m rayfleet.cli` from the repository root: no install needed (PYTHONPATH may add a
# site bundle for Ray).
RAYFLEET=("$PYTHON" -m rayfleet.cli)

MODEL_ARGS=()
if [ -n "$SHAPE" ]; then MODEL_ARGS=(--model-shape "$SHAPE"); fi
if [ "$DEVICE" = cuda ]; then
    DEVICE_ARGS=(--device cuda --num-gpus-per-replica "$GPUS_PER_REPLICA"
                 --max-model-len "$MAX_MODEL_LEN")
else
    # CPU: the demo model's own context; replicas ask for a sliver of a CPU each.
    DEVICE_ARGS=(--device cpu --num-cpus-per-replica 0.1 --num-cpus 8)
fi

SECONDS=0
# shellcheck disable=SC2086
"${RAYFLEET[@]}" serve "${MODEL_ARGS[@]}" "${DEVICE_ARGS[@]}" \
    --num-replicas "$NUM_REPLICAS" --routing prefix_precise \
    --kv-cache-memory-bytes "$KV_BYTES" --max-num-seqs "$MAX_NUM_SEQS" \
    --max-ongoing-requests "$MAX_ONGOING" --max-queued-requests -1 \
    --stream-messages-per-s "$STREAM_MSGS" \
    --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
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
echo "server ready after ${SECONDS} s"

# shellcheck disable=SC2086
"${RAYFLEET[@]}" bench routing --target "127.0.0.1:${GRPC_PORT}" --rate "$RATES" \
    --num-requests "$NUM_REQUESTS" --tenants "$TENANTS" --users "$USERS" \
    --prefix-len "$PREFIX_LEN" --user-prefix-len "$USER_PREFIX_LEN" --query-len "$QUERY_LEN" \
    --output-len "$OUTPUT_LEN" --output-json "$OUT/${NAME}.json" ${EXTRA_BENCH_ARGS:-}

stop_server
trap - EXIT
echo "done in ${SECONDS} s: $OUT/${NAME}.json"

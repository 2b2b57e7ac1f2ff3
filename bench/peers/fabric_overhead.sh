#!/usr/bin/env bash
# The fabric's own cost: the same 16-token streamed completions from (a) a direct aiohttp
# server that streams from its handler and (b) chatfabric up with a synthetic worker (gateway +
# NATS + worker, no model), at concurrency 1 and 32, one after the other.
#
#   bench/peers/fabric_overhead.sh OUT.jsonl
set -euo pipefail
OUT=${1:?output jsonl}
cd "$(dirname "$0")/../.."
PY=.venv/bin/python; CF=.venv/bin/chatfabric
LOGS=$(mktemp -d)
BENCH=(--endpoint completions --concurrency 1,32 --num-requests "${REQUESTS:-2000}" --warmup 50
       --output-len 16 --input-len 8 --output "$OUT" --no-progress)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

$PY -m chatfabric.bench.direct --port 8301 >"$LOGS/direct.log" 2>&1 & pids+=($!)
sleep 2
$CF bench --base-url http://127.0.0.1:8301/v1 --model direct --label direct-aiohttp "${BENCH[@]}"
cleanup; pids=()

$CF up --port 8302 --backend synthetic --max-concurrency 64 --data-dir "$LOGS/cf" >"$LOGS/cf.log" 2>&1 & pids+=($!)
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8302/v1/models | grep -q SmolLM2 && break; sleep 1; done
$CF bench --base-url http://127.0.0.1:8302/v1 --model SmolLM2-135M-Instruct --label chatfabric-synthetic "${BENCH[@]}"

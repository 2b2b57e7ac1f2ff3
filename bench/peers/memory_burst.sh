#!/usr/bin/env bash
# Worker memory across two bursts of 200 requests (concurrency 16, 32 tokens each) on the real
# model: RSS before, at the end of each burst, and after each drain.
#
#   bench/peers/memory_burst.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
LOGS=$(mktemp -d)
.venv/bin/chatfabric up --port 8303 --data-dir "$LOGS/cf" >"$LOGS/cf.log" 2>&1 &
PID=$!
trap 'kill -INT $PID 2>/dev/null || true; wait' EXIT
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8303/v1/models | grep -q SmolLM2 && break; sleep 1; done
.venv/bin/python -m chatfabric.bench.memory --pid "$PID" --base-url http://127.0.0.1:8303/v1 \
  --model SmolLM2-135M-Instruct --requests "${REQUESTS:-200}"

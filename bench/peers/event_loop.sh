#!/usr/bin/env bash
# The event loop under the token path: `python -m chatfabric.bench.token_path` with the standard
# library's asyncio loop (CHATFABRIC_LOOP=asyncio) and with uvloop (the default), alternating,
# ROUNDS times, on this tree.
#
#   bench/peers/event_loop.sh OUT.jsonl [ROUNDS]
set -euo pipefail
OUT=${1:?output jsonl}
ROUNDS=${2:-3}
cd "$(dirname "$0")/../.."
PY=$PWD/.venv/bin/python
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round"
    CHATFABRIC_LOOP=asyncio "$PY" -m chatfabric.bench.token_path --label "asyncio loop" --output "$OUT"
    "$PY" -m chatfabric.bench.token_path --label uvloop --output "$OUT"
done

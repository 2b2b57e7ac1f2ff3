#!/usr/bin/env bash
# What metrics and tracing cost: the fabric overhead benchmark (16-token streamed completions
# from `chatfabric up --backend synthetic`, concurrency 1 and 32) against three builds, in
# alternating rounds on the same machine:
#   baseline  the code at BASE_REV (default: the commit before observability), no metrics, no spans
#   metrics   this tree, tracing off (metrics are always on)
#   tracing   this tree with --tracing file:... (every span exported from the SDK's thread)
#
#   bench/peers/observability_overhead.sh OUT.jsonl [ROUNDS]
set -euo pipefail
OUT=${1:?output jsonl}
ROUNDS=${2:-2}
cd "$(dirname "$0")/../.."
ROOT=$PWD
CF=$ROOT/.venv/bin/chatfabric
BASE_REV=${BASE_REV:-56be5b9}
WORK=$(mktemp -d)
git worktree add -f "$WORK/base" "$BASE_REV" >/dev/null 2>&1
mkdir -p "$WORK/path" && ln -s "$WORK/base" "$WORK/path/chatfabric"
BENCH=(--endpoint completions --concurrency 1,32 --num-requests "${REQUESTS:-1000}" --warmup 50
       --output-len 16 --input-len 8 --output "$OUT" --no-progress)
pid=
cleanup() { [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null; wait 2>/dev/null || true; git worktree remove --force "$WORK/base" || true; }
trap cleanup EXIT

run() {  # label, then env/flags
  local label=$1; shift
  local port=8310
  env "$@" "$CF" up --port $port --backend synthetic --max-concurrency 64 --no-arena \
      --data-dir "$WORK/data-$label" $EXTRA >"$WORK/$label.log" 2>&1 & pid=$!
  for _ in $(seq 1 120); do curl -sf http://127.0.0.1:$port/v1/models | grep -q SmolLM2 && break; sleep 1; done
  "$CF" bench --base-url http://127.0.0.1:$port/v1 --model SmolLM2-135M-Instruct --label "$label" "${BENCH[@]}"
  kill -INT "$pid"; wait "$pid" || true; pid=
}

for round in $(seq 1 "$ROUNDS"); do
  EXTRA="" run baseline PYTHONPATH="$WORK/path"
  EXTRA="" run metrics CHATFABRIC_TRACING=
  EXTRA="--tracing file:$WORK/spans.jsonl" run tracing CHATFABRIC_TRACING=
done

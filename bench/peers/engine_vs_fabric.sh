#!/usr/bin/env bash
# The whole fabric against its engine alone, on this CPU with a tiny random-weight model with
# SmolLM2's vocabulary (fast steps, so that what the fabric costs per token shows, as it does on a GPU): the padded engine
# alone (python -m chatfabric.bench.engine), then `chatfabric up` serving the same model, driven
# by `chatfabric bench`; for the build at REF (a git worktree imported ahead of this checkout) and
# for this tree, alternating, ROUNDS times.
#
#   bench/peers/engine_vs_fabric.sh REF OUT.jsonl [ROUNDS]
set -euo pipefail
REF=${1:?git ref of the build before}
OUT=${2:?output jsonl}
ROUNDS=${3:-3}
cd "$(dirname "$0")/../.."
PY=$PWD/.venv/bin/python
MODEL=smollm2-tiny
WORK=$(mktemp -d)
git worktree add --detach -f "$WORK/tree" "$REF" >/dev/null
mkdir -p "$WORK/path" && ln -s "$WORK/tree" "$WORK/path/chatfabric"
UP=
trap '[ -n "$UP" ] && kill -INT $UP 2>/dev/null; git worktree remove --force "$WORK/tree"; rm -rf "$WORK"' EXIT
TOKENIZER=$("$PY" -c "from chatfabric.models.default_model import ensure_default_model as e; print(e())")
"$PY" -m chatfabric.bench.engine --model-config $MODEL --device cpu --save-model "$WORK/$MODEL" \
    --tokenizer "$TOKENIZER" >/dev/null
fabric() {  # label, PYTHONPATH
    local port nport data
    port=$("$PY" -c "from chatfabric.proto.embedded import free_port; print(free_port())")
    nport=$("$PY" -c "from chatfabric.proto.embedded import free_port; print(free_port())")
    data=$(mktemp -d -p "$WORK")
    env PYTHONPATH="$2" "$PY" -m chatfabric.deploy.cli up --no-arena --port "$port" --nats-port "$nport" \
        --model-path "$WORK/$MODEL" --device cpu --max-concurrency 64 --data-dir "$data" >"$data/up.log" 2>&1 &
    UP=$!
    for _ in $(seq 300); do
        curl -s "http://127.0.0.1:$port/v1/models" | grep -q "\"$MODEL\"" && break
        sleep 0.5
    done
    "$PY" -m chatfabric.deploy.cli bench --base-url "http://127.0.0.1:$port/v1" --model $MODEL --endpoint completions \
        --input-len 128 --output-len 64 --concurrency 16,64 --num-requests 256 --warmup 16 --no-progress \
        --label "fabric $1" --output "$OUT" | tail -4
    kill -INT $UP; wait $UP || true; UP=
}
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round"
    "$PY" -m chatfabric.bench.engine --model-config $MODEL --device cpu --engines padded --concurrency 16,64 \
        --input-len 128 --output-len 64 --output "$OUT" 2>&1 | grep -v Warning | tail -3
    fabric "before $REF" "$WORK/path"
    fabric after ""
done

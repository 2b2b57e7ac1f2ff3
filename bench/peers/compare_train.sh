#!/usr/bin/env bash
# SFT throughput side by side on this machine: FastChat 0.2.36's train.py (every sample padded
# to --model_max_length) and `chatfabric train sft` (padding-free packed batches), full
# fine-tuning of the same SmolLM2 weights on the same conversations with the same settings,
# one after the other. Each run's tokens/s and peak RSS (GNU time) go to OUT.jsonl.
#
#   bench/peers/compare_train.sh FASTCHAT_VENV OUT.jsonl
#
# FASTCHAT_VENV: torch==2.13.0, fschat==0.2.36, transformers==4.57.6, accelerate (docs/performance.md).
# STEPS (8), BATCH (4), MAX_LENGTH (512), DATA (the shared ShareGPT file) override the settings.
set -euo pipefail
FS_VENV=${1:?fastchat venv}; OUT=${2:?output jsonl}
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-8}; BATCH=${BATCH:-4}; MAX_LENGTH=${MAX_LENGTH:-512}
DATA=${DATA:-${CHATFABRIC_SHARED_DATA:-../shared/data}/sharegpt/dummy_conversation.json}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
peak_mib() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2 / 1024}' "$1"; }

.venv/bin/python bench/peers/fastchat_model.py "$WORK/smollm2"

echo "== FastChat train.py" >&2
/usr/bin/time -v -o "$WORK/fs.time" "$FS_VENV/bin/python" bench/peers/fastchat_train.py \
  --model_name_or_path "$WORK/smollm2" --data_path "$DATA" --output_dir "$WORK/fs-out" \
  --model_max_length "$MAX_LENGTH" --per_device_train_batch_size "$BATCH" --max_steps "$STEPS" \
  --learning_rate 2e-5 --bf16 False --report_to none --logging_steps 1 --save_strategy no \
  --dataloader_num_workers 0 --seed 42 >"$WORK/fs.log" 2>&1
tail -1 "$WORK/fs.log" | .venv/bin/python -c "import json,sys; r=json.loads(sys.stdin.read()); r['peak_rss_mib']=int(sys.argv[1]); print(json.dumps(r))" "$(peak_mib "$WORK/fs.time")" >>"$OUT"
echo "   mismatched samples: $(grep -c 'tokenization mismatch' "$WORK/fs.log" || true)" >&2

echo "== chatfabric train sft" >&2
/usr/bin/time -v -o "$WORK/cf.time" .venv/bin/chatfabric train sft --model-path "$WORK/smollm2" --data "$DATA" \
  --output "$WORK/cf-out" --max-length "$MAX_LENGTH" --batch-size "$BATCH" --max-steps "$STEPS" \
  --lr 2e-5 --save-steps 100000 >"$WORK/cf.log" 2>&1
grep '^saved ' "$WORK/cf.log" | .venv/bin/python -c "
import json, re, sys
line = sys.stdin.read()
metrics = dict((k, float(v)) for k, v in re.findall(r'(\w+) (-?[0-9.]+)', line.split(': ', 1)[1]))
print(json.dumps({'system': 'chatfabric train sft', **metrics, 'peak_rss_mib': int(sys.argv[1])}))" "$(peak_mib "$WORK/cf.time")" >>"$OUT"
tail -2 "$OUT"

#!/usr/bin/env bash
# The token path before and after: `python -m chatfabric.bench.token_path` on a build of REF (a
# git worktree imported ahead of this checkout) and on this tree, alternating, ROUNDS times;
# this tree also with --stream-interval-ms 0 (every engine step sent).
#
#   bench/peers/token_path.sh REF OUT.jsonl [ROUNDS]
#
# ONLY="ttft-1 stepped-128" runs those scenarios alone, and without the interval-0 run.
set -euo pipefail
REF=${1:?git ref of the build before}
OUT=${2:?output jsonl}
ROUNDS=${3:-3}
ONLY=${ONLY:-}
SCENARIOS=()
[ -n "$ONLY" ] && SCENARIOS=(--only $ONLY)
cd "$(dirname "$0")/../.."
PY=$PWD/.venv/bin/python
OLD=$(mktemp -d)
git worktree add --detach -f "$OLD/tree" "$REF" >/dev/null
mkdir -p "$OLD/path" && ln -s "$OLD/tree" "$OLD/path/chatfabric"
trap 'git worktree remove --force "$OLD/tree"; rm -rf "$OLD"' EXIT
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round"
    # a build older than a685fbb has no --synthetic-step-ms: its streams sleep 10 ms per token
    # each instead (NO_STEPS= for a newer one)
    "$PY" -m chatfabric.bench.token_path --label "before $REF" ${NO_STEPS---no-steps} --output "$OUT" \
        --chatfabric "env PYTHONPATH=$OLD/path $PY -m chatfabric.deploy.cli" "${SCENARIOS[@]}"
    "$PY" -m chatfabric.bench.token_path --label after --output "$OUT" "${SCENARIOS[@]}"
    [ -n "$ONLY" ] || "$PY" -m chatfabric.bench.token_path --label "after, interval 0" --flags "--stream-interval-ms 0" \
        --only free-16 free-256 stepped-128 --output "$OUT"
done

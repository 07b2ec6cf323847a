#!/usr/bin/env bash
# Held-out accuracy of the plain packaged SmolLM2-135M-Instruct, a fresh (untrained)
# MemGen on it, and the trained demo checkpoint: the same 100 held-out problems
# (bench/data/arith_heldout.jsonl), greedy, at most 256 tokens, each through `memgen eval`.
#   bash demo/evaluate.sh              # after demo/train.sh (it needs $WORK/init)
# Writes $WORK/eval/*.jsonl and demo/results.json, and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/memgen-demo}
export OMP_NUM_THREADS=${THREADS:-1}
DATA=bench/data/arith_heldout.jsonl
mkdir -p "$WORK/eval"
run() {  # name, extra memgen eval arguments
    local name=$1; shift
    memgen eval "$DATA" -o "$WORK/eval/$name.jsonl" --overwrite --max-tokens 256 --temperature 0 --no-progress "$@"
}
run plain
run fresh-init --memgen "$WORK/init"
run trained --memgen demo/smollm2-arith
python demo/table.py "$DATA" "$WORK/eval" demo/results.json

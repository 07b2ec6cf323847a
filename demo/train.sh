#!/usr/bin/env bash
# Train the demo checkpoint demo/smollm2-arith from scratch: a fresh MemGen on the
# packaged SmolLM2-135M-Instruct (memgen init), weaver SFT on the generated arithmetic
# problems (memgen train sft), then stored in float16 (memgen convert).
#   bash demo/train.sh                 # THREADS=1 by default; 2 on a quiet 2-core machine
# Work files go to $WORK (default /tmp/memgen-demo); the result replaces demo/smollm2-arith.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/memgen-demo}
THREADS=${THREADS:-1}
start=$(date +%s)
python bench/data/make_arith.py --splits                   # seeded: the same files as shipped
memgen init "$WORK/init" --overwrite --format safetensors \
    --prompt-latents 8 --inference-latents 8 --budget 2 --no-trigger-active --init-seed 0
rm -rf "$WORK/sft"
memgen train sft --memgen "$WORK/init" --data bench/data/arith_train.jsonl --output-dir "$WORK/sft" \
    --lr 2e-3 --epochs 1 --batch-size 4 --max-steps 64 --seed 0 --threads "$THREADS" --format safetensors
rm -rf demo/smollm2-arith
memgen convert "$WORK/sft/export" demo/smollm2-arith --format safetensors --dtype float16
echo "demo/train.sh: $(( $(date +%s) - start )) s with $THREADS thread(s)"

#!/usr/bin/env bash
# The shipped default model, end to end and resumable: tokenizer (trained inside the warmup stage, held-out
# articles excluded), warmup, continual training with memory, SFT, export, evaluation bank, eval.
# Rerun after an interruption: finished stages are skipped, an interrupted one resumes from its checkpoint.
#   RUNS=runs/default OUT=models/default bash converters/recipes/default.sh
set -euo pipefail
RUNS="${RUNS:-runs/default}"
OUT="${OUT:-models/default}"
mkdir -p "$RUNS"

# stage NAME ARGS...: start the stage, or resume it when its run directory holds a checkpoint
stage() {
  local name="$1"; shift
  local dir="$RUNS/$name"
  if [ -f "$dir/run.json" ]; then
    python -m converters.train --resume --out "$dir"
  else
    python -m converters.train --stage "$name" --out "$dir" "$@"
  fi
}

# ~1.1M training tokens of English wiki summaries plus ~0.5M of Debian's dictionaries (when installed) at vocab
# 8192; 700 x 16 x 256 = 2.9M tokens (35-60 min on 2 cores)
stage warmup --preset default --corpus wiki:en,dict --dict-max-chars 2000000 --steps 700 --batch 16 \
  --seq-len 256 --lr 1e-3 --warmup-steps 100 --schedule wsd --save-every 100
# continual training with memory: each 64-token chunk attends to 5 references encoded in the forward pass;
# wiki only, whose sequences retrieve related references (a dictionary entry's rarely relate to any)
stage memory --model "$RUNS/warmup" --corpus wiki:en --steps 350 --batch 16 --seq-len 256 --lr 5e-4 --warmup-steps 20 \
  --schedule wsd --save-every 50
# SFT: questions from the articles' own fields, memories retrieved by the question, loss on the answers
stage sft --model "$RUNS/memory" --steps 600 --batch 16 --seq-len 256 --lr 3e-4 --warmup-steps 20 \
  --schedule cosine --save-every 50
python -m converters.train export "$RUNS/sft" --out "$OUT" --dtype float16   # 17 MB instead of 34

# evaluation on the held-out 10% (never seen in any stage, tokenizer included)
m3lite bank build wiki:en:heldout --out "$RUNS/eval-bank" --model "$OUT"   # resumes; skips what it holds
m3lite eval --model "$OUT" --bank "$RUNS/eval-bank" --limit 400 --report "$RUNS/eval.md" --json > "$RUNS/eval.json"
# the card: shape, data, tokens and wall time per stage, loss curves, the eval table and the goals
python -m converters.model_card --runs "$RUNS" --model "$OUT" --eval "$RUNS/eval.json"

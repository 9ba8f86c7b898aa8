#!/usr/bin/env bash
# The default model's memory adapter, end to end and resumable (~2 h on 2 CPU cores): SmolLM2-135M-Instruct
# imported with memory at every layer (32 tokens per KV head), the RAG teacher's answers on made-up facts
# (train split) and held-in Wikipedia, LoRA distillation into memory mode, the adapted model, and its evaluation
# on the made-up facts' eval split and the held-out Wikipedia articles, next to none and rag.
# Rerun after an interruption: finished steps are skipped, the training resumes from its checkpoint.
#   RUNS=runs/memory-adapter bash converters/recipes/memory-adapter.sh
# Ship the result: cp "$RUNS/distill/adapter.safetensors" m3lite/models/smollm2-135m-memory.safetensors
set -euo pipefail
RUNS="${RUNS:-runs/memory-adapter}"
LAYERS="${LAYERS:-all}"     # memory layers: half (the paper), all, or a list
TOKENS="${TOKENS:-32}"      # tokens kept per KV head: a number or all
STEPS="${STEPS:-700}"
mkdir -p "$RUNS"
GGUF="$(python -c 'from m3lite.pull import checkpoint; print(checkpoint())')"

# 1. the base model with the memory settings to adapt
[ -f "$RUNS/base/config.json" ] || m3lite import "$GGUF" --out "$RUNS/base" --memory-layers "$LAYERS" \
  --memory-tokens "$TOKENS" --weights int8
# 2. questions, 3 references each (gold + 2 BM25 distractors), the teacher's answers (gold note in the prompt),
#    brief (no "The answer to this question is:", one sentence, then the end of the turn); ~1,000 made-up-fact
#    and ~600 Wikipedia questions kept, and 300 Wikipedia questions asked without references, ~20 min
[ -f "$RUNS/data/meta.json" ] || python -m converters.distill_data --model "$RUNS/base" --out "$RUNS/data" \
  --facts 700 --wiki 300 --none 300 --refs 3 --max-new 48 --brief
# 3. LoRA rank 16 on every linear weight of every layer, KL to the teacher on its answer tokens (62-68 min);
#    the adapted model reads one reference per retrieval (it answers best so: see the model card)
if [ -f "$RUNS/distill/run.json" ]; then
  python -m converters.train --resume --out "$RUNS/distill"
else
  python -m converters.train --stage distill --model "$RUNS/base" --data "$RUNS/data" --out "$RUNS/distill" \
    --steps "$STEPS" --batch 4 --lr 1e-3 --rank 16 --alpha 32 --eval-every 100 --save-every 25 --retrieval-top-k 1
fi
# 4. the adapted model: adapter merged into the float weights, then int8
[ -f "$RUNS/adapted/config.json" ] || m3lite import "$GGUF" --adapter "$RUNS/distill/adapter.safetensors" \
  --out "$RUNS/adapted"
# 5. evaluation: made-up facts (eval split: templates and names training never saw) and held-out Wikipedia
[ -f "$RUNS/facts/qa.jsonl" ] || python -m converters.facts --out "$RUNS/facts"
m3lite bank build "$RUNS/facts/notes.jsonl" --out "$RUNS/facts.bank" --model "$RUNS/adapted"
m3lite eval --model "$RUNS/adapted" --bank "$RUNS/facts.bank" --qa "$RUNS/facts/qa.jsonl" --limit 100 \
  --json > "$RUNS/eval-facts.json"
m3lite bank build wiki:en:heldout --out "$RUNS/wiki.bank" --model "$RUNS/adapted"
m3lite eval --model "$RUNS/adapted" --bank "$RUNS/wiki.bank" --limit 50 --json > "$RUNS/eval-wiki.json"

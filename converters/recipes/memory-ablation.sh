#!/usr/bin/env bash
# The memory ablation (issue 13): memory layers {first half, all} x tokens per KV head {8, 32, all} x {unadapted,
# adapted}, on made-up facts (1 and 5 references per question) and 50 held-out Wikipedia articles (1 reference),
# with bank bytes per reference, references encoded per second, TTFT and decode speed; then the table and chart:
#   RUNS/ablation/ablation.md and RUNS/ablation/ablation.png (python -m converters.ablation report).
# Needs the teacher data of memory-adapter.sh (step 2) in $DATA. Resumable: finished steps are skipped, a
# training resumes from its checkpoint. About 25 min per adapted setting (200 steps) and 5 min per unadapted one
# on 2 CPU cores; ~3 h in all.
#   RUNS=runs/ablation DATA=runs/memory-adapter/data bash converters/recipes/memory-ablation.sh
set -euo pipefail
RUNS="${RUNS:-runs/ablation}"
DATA="${DATA:-runs/memory-adapter/data}"
STEPS="${STEPS:-200}"
OUT="$RUNS/ablation"
mkdir -p "$OUT"
GGUF="$(python -c 'from m3lite.pull import checkpoint; print(checkpoint())')"
[ -f "$RUNS/facts/qa.jsonl" ] || python -m converters.facts --out "$RUNS/facts"

measure() {  # model dir, results folder [, extra modes for the facts eval]
  local M="$1" R="$2" MODES="${3:-memory}"
  mkdir -p "$R"
  [ -f "$R/build.json" ] || { rm -rf "$R/facts.bank"
    m3lite bank build "$RUNS/facts/notes.jsonl" --out "$R/facts.bank" --model "$M" --encode all --json > "$R/build.json.tmp"
    mv "$R/build.json.tmp" "$R/build.json"; }
  m3lite bank info "$R/facts.bank" --json > "$R/info.json"
  for K in 1 5; do
    [ -f "$R/facts-r$K.json" ] || { m3lite eval --model "$M" --bank "$R/facts.bank" --qa "$RUNS/facts/qa.jsonl" \
      --limit 100 --refs "$K" --modes "$MODES" --json > "$R/facts-r$K.json.tmp" && mv "$R/facts-r$K.json.tmp" \
      "$R/facts-r$K.json"; } || true  # --refs 5 is refused for a model that reads 1 reference
  done
  [ -f "$R/wiki-r1.json" ] || { rm -rf "$R/wiki.bank"
    python -m converters.ablation wiki-bank --model "$M" --out "$R/wiki.bank" --articles 50 > /dev/null
    m3lite eval --model "$M" --bank "$R/wiki.bank" --limit 50 --refs 1 --modes "$MODES" --json > "$R/wiki-r1.json.tmp"
    mv "$R/wiki-r1.json.tmp" "$R/wiki-r1.json"; }
}

for L in half all; do
  for T in 8 32 all; do
    BASE="$RUNS/models/$L-$T"
    [ -f "$BASE/config.json" ] || m3lite import "$GGUF" --out "$BASE" --memory-layers "$L" --memory-tokens "$T" \
      --weights int8
    EXTRA=memory; [ "$L-$T" = all-32 ] && EXTRA=none,memory,rag   # the baselines, once per variant
    measure "$BASE" "$OUT/$L-$T-unadapted" "$EXTRA"
    D="$RUNS/distill/$L-$T"
    if [ -f "$D/run.json" ] && [ ! -f "$D/adapter.safetensors.done" ]; then
      python -m converters.train --resume --out "$D"
    elif [ ! -f "$D/run.json" ]; then
      python -m converters.train --stage distill --model "$BASE" --data "$DATA" --out "$D" --steps "$STEPS" \
        --batch 4 --lr 1e-3 --rank 16 --alpha 32 --eval-every 100 --save-every 25
    fi
    touch "$D/adapter.safetensors.done"
    ADAPTED="$RUNS/models/$L-$T-adapted"
    [ -f "$ADAPTED/config.json" ] || m3lite import "$GGUF" --adapter "$D/adapter.safetensors" --out "$ADAPTED"
    measure "$ADAPTED" "$OUT/$L-$T-adapted" "$EXTRA"
    echo "$STEPS" > "$OUT/$L-$T-adapted/steps.txt"
  done
done
# 4-bit memories of the shipped setting
R="$OUT/all-32-adapted-int4"
mkdir -p "$R"
[ -f "$R/build.json" ] || m3lite bank build "$RUNS/facts/notes.jsonl" --out "$R/facts.bank" \
  --model "$RUNS/models/all-32-adapted" --quant int4 --encode all --json > "$R/build.json"
m3lite bank info "$R/facts.bank" --json > "$R/info.json"
[ -f "$R/facts-r1.json" ] || m3lite eval --model "$RUNS/models/all-32-adapted" --bank "$R/facts.bank" \
  --qa "$RUNS/facts/qa.jsonl" --limit 100 --refs 1 --modes memory --json > "$R/facts-r1.json"
python -m converters.ablation report "$OUT"

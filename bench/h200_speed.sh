#!/usr/bin/env bash
# The GPU speed grid (issue #14) in one device call: every configuration of the training step
# (compile scope and mode, loss head, optimizer, micro-batch) and the nanoGPT reference, timed
# one at a time on an otherwise idle GPU, each with a torch.profiler summary.
#
#   OUT=/tmp/speed bash bench/h200_speed.sh explore     # the grid of levers
#   OUT=/tmp/speed bash bench/h200_speed.sh final       # the default path vs the references
#                                     (PAR > 3 runs out of GPU memory at 128 x 512 in the warm-up)
#   OUT=/tmp/speed bash bench/h200_speed.sh trainer     # `deeplm run`'s trainer on the anchor
#   OUT=/tmp/speed bash bench/h200_speed.sh graphs      # CUDA graphs: a whole phase's loss A/B,
#                                                       # then the trainer traced with them
#   OUT=/tmp/speed bash bench/h200_speed.sh finetune    # the fine-tune's step (40 frozen,
#                                                       # 16 x 512): compiled (cold) vs eager
#
# Compilation dominates a cold configuration (~1 min each for the whole 60-layer model), so a
# warm-up pass first runs every configuration for one step, three at a time, to fill the
# inductor cache; the timed pass then runs them one by one. Results: $OUT/<name>.json and
# $OUT/<name>.log; first-step times of both passes are in the JSON and logs.
set -uo pipefail
GRID=${1:-explore}
OUT=${OUT:-/tmp/speed}
PAR=${PAR:-3}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}
COMMON="--preset 60m --seq-len 512 --precision bf16 --compile on"

if [ "$GRID" = explore ]; then
  CONFIGS=(
    "block-chunked|--batch 64 --compile-scope block --head chunked --optimizer muon"
    "model-chunked|--batch 64 --compile-scope model --compile-mode default --head chunked --optimizer muon"
    "model-logits|--batch 64 --compile-scope model --compile-mode default --head logits --optimizer muon"
    "model-logits-autotune|--batch 64 --compile-scope model --compile-mode max-autotune-no-cudagraphs --head logits --optimizer muon"
    "model-logits-adamw|--batch 64 --compile-scope model --compile-mode default --head logits --optimizer adamw"
    "model-liger|--batch 64 --compile-scope model --compile-mode default --head liger --optimizer muon"
    "model-logits-cudagraphs|--batch 64 --compile-scope model --compile-mode reduce-overhead --head logits --optimizer muon"
  )
else  # the table re-measured side by side, each configuration cold, one at a time
  CONFIGS=(
    "nanogpt-b128|--batch 128 --nanogpt --skip-grid"
    "default-b128|--batch 128 --compile-scope model --compile-mode auto --head auto --optimizer muon"
    "block-b128|--batch 128 --compile-scope block --compile-mode default --head chunked --optimizer adamw"
    "model-b128|--batch 128 --compile-scope model --compile-mode default --head chunked --optimizer adamw"
    "default-b64|--batch 64 --compile-scope model --compile-mode auto --head auto --optimizer muon"
  )
fi

run() {  # name, args, steps, extra
  local name=$1 args=$2 steps=$3 extra=$4
  # shellcheck disable=SC2086
  $PY bench/throughput.py $COMMON $args --steps "$steps" --warmup 3 $extra
}
export -f run
export PY COMMON

if [ "$GRID" = trainer ]; then  # the trainer itself (compare.py = PhaseTrainer) on the anchor
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
  # shellcheck disable=SC2086
  $PY bench/recipe_grid.py --anchor .anchor --data /tmp/anchor-run --grid none \
    --micro-batch 8 --tokens "${TOKENS:-6000000}" --parallel "${TRAINER_PAR:-1}" \
    --deadline-s "${DEADLINE:-200}" --out "$OUT/trainer" ${TRAINER_CANDIDATES:---candidate default=60m}
  exit $?
fi

if [ "$GRID" = graphs ]; then
  # 1. one phase's loss with and without CUDA graphs, side by side: same seed, data and schedule
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
  $PY bench/recipe_grid.py --anchor .anchor --data /tmp/anchor-run --grid none --micro-batch 8 \
    --tokens "${TOKENS:-20000000}" --parallel 2 --deadline-s "${DEADLINE:-320}" --out "$OUT/ab" \
    --candidate graphs=60m,train.compile_mode=reduce-overhead --candidate default=60m \
    > "$OUT/ab.log" 2>&1 &
  ab=$!
  # meanwhile: regional compilation's gradients on this torch (12 blocks of the 60m shape)
  timeout "${REGIONAL_TIMEOUT:-300}" $PY bench/regional_compile_check.py --preset 60m \
    --layers 12 --device cuda --dtype bf16 --backend inductor aot_eager > "$OUT/regional.log" 2>&1
  echo "regional rc=$? $(date +%T)"
  wait $ab
  echo "a/b rc=$? $(date +%T)"; tail -5 "$OUT/ab.log"
  # 2. the trainer alone under CUDA graphs for 200 steps: the slow steps, the heap's collections
  timeout "${TRACE_TIMEOUT:-130}" $PY bench/trace_trainer.py /tmp/anchor-run --phase 0 \
    --out "$OUT/trace-graphs" --warmup 10 --timed "${TRACE_TIMED:-200}" --synced 8 --profiled 4 \
    --set train.compile_mode=reduce-overhead > "$OUT/trace-graphs.log" 2>&1
  echo "trace rc=$? $(date +%T)"; grep -E "tokens/s|slow step|collections" "$OUT/trace-graphs.log"
  exit 0
fi

if [ "$GRID" = finetune ]; then  # first step (cold compile) and tokens/s, on the anchor shards
  [ -f /tmp/anchor-run/config.json ] || $PY -m deeplm.cli import --preset 60m \
    --train .anchor/train.bin --val .anchor/val.bin --tokenizer .anchor/tokenizer.json \
    --run-dir /tmp/anchor-run > "$OUT/import.log" 2>&1
  FT=(--set 'phases.0.freeze=[{at=0.0,layers=40}]' --set phases.0.micro_batch=16
      --set phases.0.grad_accum=1)
  for mode in compiled eager; do
    extra=(); [ "$mode" = eager ] && extra=(--set train.compile=off)
    timeout "${TRACE_TIMEOUT:-150}" $PY bench/trace_trainer.py /tmp/anchor-run --phase 0 \
      --out "$OUT/finetune-$mode" --warmup 10 --timed 100 --synced 8 --profiled 4 "${FT[@]}" \
      "${extra[@]}" > "$OUT/finetune-$mode.log" 2>&1
    echo "finetune $mode rc=$? $(date +%T)"
    grep -E "first step|tokens/s|synced" "$OUT/finetune-$mode.log" | tr '\r' '\n' | grep -E "first|tok|sync"
  done
  exit 0
fi

if [ "${WARM:-1}" = 1 ]; then
  echo "== warm-up pass ($PAR at a time) $(date +%T)"
  printf '%s\n' "${CONFIGS[@]}" | xargs -P "$PAR" -I{} bash -c \
    'c="{}"; n=${c%%|*}; a=${c#*|}; timeout ${WARM_TIMEOUT:-240} bash -c "run $n \"$a\" 1 \"--json '"$OUT"'/warm-$n.json\"" > '"$OUT"'/warm-$n.log 2>&1; echo "warm $n rc=$?"'
fi
echo "== timed pass $(date +%T)"
for c in "${CONFIGS[@]}"; do
  n=${c%%|*}; a=${c#*|}
  timeout "${TIMED_TIMEOUT:-150}" bash -c "run $n \"$a\" $STEPS \"--profile --json $OUT/$n.json\"" \
    > "$OUT/$n.log" 2>&1
  echo "timed $n rc=$? $(date +%T)"; grep -E "tok/s|FAILED" "$OUT/$n.log" | cut -c1-260
done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1 || true

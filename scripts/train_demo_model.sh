#!/usr/bin/env bash
# Reproduce the bundled demo model models/demo/apr_demo.safetensors (MS-Transformer + PAE + iAPR on the synthetic
# benchmark) on a CPU (about an hour on 2 cores) or a GPU (pass DEVICE=cuda):
#   scripts/train_demo_model.sh [WORK_DIR]
# Steps: render the dataset (4 rooms, 3 train + 1 test handheld sequences of 250 frames, 320x240), train the
# MS-Transformer (shallow 2+2/2+2 transformers, 128x128 input), distil the PAE from it, train the iAPR regressor on
# pairs with the MS-Transformer frozen and shared, evaluate MS-Transformer vs iAPR on the test sequences, and write the
# fp16 bundle + its model card.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh
scripts/setup_venv.sh
W="${1:-runs/demo}"
DEVICE="${DEVICE:-auto}"
BIN="$VENV/bin"
PY="$VENV/bin/python"
IMG=(--set data.resize=146 --set data.crop=128)
mkdir -p "$W"

[ -f "$W/synth/train.csv" ] || "$PY" -m apr_training.synthetic.handheld "$W/synth" \
  --scenes office,kitchen,library,warehouse --train-seqs 3 --test-seqs 1 --frames 250 --width 320 --height 240 --seed 0

"$BIN/apr-train" ms-transformer --config synthetic --data "$W/synth" --labels "$W/synth/train.csv" --out "$W/ms" \
  "${IMG[@]}" --epochs 12 --set optim.lr_scheduler_step_size=9 --device "$DEVICE" --no-progress --overwrite
"$BIN/apr-train" pae --config synthetic --data "$W/synth" --labels "$W/synth/train.csv" --out "$W/pae" \
  --teacher "$W/ms/best.safetensors" "${IMG[@]}" --epochs 12 --device "$DEVICE" --no-progress --overwrite
"$BIN/apr-train" iapr --config synthetic --data "$W/synth" --labels "$W/synth/train.csv" --out "$W/iapr" \
  --teacher "$W/ms/best.safetensors" --pae "$W/pae/best.safetensors" "${IMG[@]}" \
  --set data.pair_max_distance_m=1.5 --set data.pair_max_angle_deg=40 --epochs 2 --max-steps "${IAPR_STEPS:-1000}" \
  --device "$DEVICE" --no-progress --overwrite

"$PY" -m apr_training.package_model "$W/iapr/best.safetensors" models/demo/apr_demo.safetensors --fp16 \
  --command "scripts/train_demo_model.sh $W"
"$BIN/apr-eval" --model models/demo/apr_demo.safetensors --data "$W/synth" --labels "$W/synth/test.csv" \
  --iterations 3 --stride 2 --out "$W/eval" --no-plots

#!/usr/bin/env bash
# `make demo`: the whole product on a CPU-only machine, from a fresh clone, with the bundled demo model.
#   1. set up the environment (make venv: pinned wheels, tf2_msgs, the package);
#   2. render a test bag with apr-synth: a handheld walk (sequence 5, never seen in training) through a synthetic room
#      the demo model was trained on, with the demo model's camera (70-degree horizontal field of view);
#   3. offline: MS-Transformer alone vs + iAPR (1..3 iterations) on every frame of the bag (apr-eval-bag offline);
#   4. live: start localizer_node, replay the bag into it at the recorded rate, record its poses, and report
#      accuracy and end-to-end latency (apr-eval-bag live);
#   5. print the tables (accuracy; hint success: within 0.5 m & 10 deg and within 1.5 m; uncertainty: AUROC, coverage at
#      95 % precision, within 1/2 sigma or "not calibrated"; risk-coverage), then a summary and the plot paths
#      (top-down trajectory, risk-coverage); JSON/Markdown reports and TUM trajectories are left in $DEMO_OUT.
# Every ROS process runs with ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a private domain and temp log dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

OUT="${DEMO_OUT:-demo_out}"
MODEL="${DEMO_MODEL:-models/demo/apr_demo.safetensors}"
SCENE="${DEMO_SCENE:-office}"
FRAMES="${DEMO_FRAMES:-250}"
BACKEND="${DEMO_BACKEND:-auto}"
START=$(date +%s)

scripts/setup_venv.sh
PY="$VENV/bin/python"
BIN="$VENV/bin"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( RANDOM % 100 + 1 ))}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d)}"
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$PWD/config/fastdds_shm_big.xml}"
export AMENT_PREFIX_PATH="${AMENT_PREFIX_PATH:-$VENV}"

[ -f "$MODEL" ] || { echo "demo: the demo model $MODEL is missing (it is part of the repository)" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== demo: rendering the test bag ($SCENE, test walk seq 5, $FRAMES frames at 640x480, 15 Hz)"
"$BIN/apr-synth" bag --out "$OUT/test_bag" --scene "$SCENE" --seq 5 --frames "$FRAMES" --fps 15 --size 640x480 \
  --hfov 70 --seed 0

echo "== demo: offline evaluation, MS-Transformer alone vs + iAPR"
"$BIN/apr-eval-bag" offline --model "$MODEL" --bag "$OUT/test_bag" --image-topic /camera/image_raw \
  --gt pose:/ground_truth/pose --scene "$SCENE" --iterations 3 --backend "$BACKEND" --out "$OUT/offline"

echo "== demo: live replay through localizer_node (bag player → node → recorder)"
"$BIN/apr-eval-bag" live --model "$MODEL" --bag "$OUT/test_bag" --image-topic /camera/image_raw \
  --gt pose:/ground_truth/pose --scene "$SCENE" --iterations "${DEMO_ITERATIONS:-3}" --backend "$BACKEND" --out "$OUT/live"

rm -rf "$OUT/test_bag.frames"
echo
echo "== demo: summary (accuracy, hint success, uncertainty; from $OUT/{offline,live}/report.json)"
"$PY" - "$OUT/offline/report.json" "$OUT/live/report.json" <<'PYEOF'
import json
import sys

def pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"

def num(v, unit=""):
    return "n/a" if v is None else f"{v:.3f}{unit}"

print(f"{'method':<34} {'median pos / rot':>20} {'<=0.5m&10deg':>13} {'<=1.5m':>7} {'AUROC':>6} {'cov@95%':>8}  sigma")
for path, where in zip(sys.argv[1:], ("offline", "live")):
    for m in json.load(open(path))["methods"]:
        o, h, u = m["overall"], m["hint"], m["uncertainty"]
        rot = o["median_orientation_deg"]
        acc = f"{num(o['median_position_m'], ' m')} / {'n/a' if rot is None else f'{rot:.1f}'}°"
        sig = (f"1σ {pct(u['within_1sigma'])}, 2σ {pct(u['within_2sigma'])}" if u["calibrated"] else "not calibrated")
        name = m["name"] if where in m["name"] else f"{m['name']} ({where})"
        print(f"{name:<34} {acc:>20} {pct(h['within_0_5m_10deg']):>13} "
              f"{pct(h['within_1_5m']):>7} {num(u['auroc']):>6} {pct(u['coverage_at_95_precision']):>8}  {sig}")
PYEOF
for plot in "$OUT/offline/plots/trajectory.png" "$OUT/offline/plots/risk_coverage.png" "$OUT/live/plots/trajectory.png"; do
  [ -f "$plot" ] || { echo "demo: the plot $plot was not written" >&2; exit 1; }
done
echo
echo "== demo finished in $(( $(date +%s) - START )) s. Reports, plots and TUM trajectories:"
echo "   top-down trajectory: $OUT/offline/plots/trajectory.png (live: $OUT/live/plots/trajectory.png)"
echo "   risk-coverage:       $OUT/offline/plots/risk_coverage.png"
echo "   $OUT/offline/  (table.txt, report.md, report.json, plots/, tum/)"
echo "   $OUT/live/     (table.txt, report.md, report.json, plots/, tum/, node.log)"

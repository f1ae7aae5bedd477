#!/usr/bin/env bash
# One GPU check for a machine with CUDA torch (+ torchvision, onnxruntime) and NO network; fits ~8 minutes.
#
# Usage: scripts/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_check_out)
#        scripts/gpu_check.sh --fetch-wheels DIR PYVER     (on a machine WITH network: small wheels for PYVER, e.g. 3.12)
#
# Steps (each under a timeout that keeps the total within GPU_CHECK_BUDGET_S, default 480 s):
#   1. environment: python, torch, CUDA device, compute capability; missing small packages are installed from
#      $APR_WHEELS (default <repo>/wheels, made with --fetch-wheels) with pip --no-index, never from the network
#   2. the gpu-marked tests (pytest -m gpu), including the TensorRT plumbing probe: the tests' fake TensorRT engines
#      on REAL device memory through the backend's own stream and aligned addresses
#   3. apr-bench --device cuda --backends torch for fp32/fp16/bf16 (per-stage latency of the published architecture)
#   4. torch run_steps (APR + 3 iAPR, batch 1, published architecture) with and without CUDA graphs, fp32/fp16/bf16
#   5. a short GPU training run (apr-synth data, apr-train ms-transformer --amp): images/s
# Everything lands in OUT_DIR; OUT_DIR/gpu_check.md is the compact table (the card is named in it).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SMALL_PKGS=(safetensors onnx pyyaml transforms3d pillow psutil tqdm pytest pytest-timeout hypothesis opencv-python-headless)

if [ "${1:-}" = "--fetch-wheels" ]; then
    dir="${2:?--fetch-wheels DIR PYVER}"; pyver="${3:?--fetch-wheels DIR PYVER}"
    "$PY" -m pip download --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$dir" "${SMALL_PKGS[@]}"
    du -sh "$dir"
    exit $?
fi

OUT_DIR="${1:-${OUT:-$REPO/gpu_check_out}}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
WHEELS="${APR_WHEELS:-$REPO/wheels}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 APR_LOCALIZER_CACHE_DIR="$WORK/cache"
cd "$REPO"
T0=$(date +%s)
: >"$OUT_DIR/steps.tsv"

# step NAME LIMIT_S CMD...: run CMD with timeout min(LIMIT_S, time left - 15 s); log to OUT_DIR/NAME.log
step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( BUDGET - ($(date +%s) - T0) - 15 ))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -le 5 ]; then
        printf '%s\tskipped\t0\tno time left\n' "$name" >>"$OUT_DIR/steps.tsv"; return 0
    fi
    local t=$(date +%s) rc
    timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1; rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" "limit ${limit}s" >>"$OUT_DIR/steps.tsv"
    echo "gpu_check: $name rc=$rc ($(( $(date +%s) - t )) s)"
    return 0
}

# 1. environment and small packages ------------------------------------------------------------------------------
"$PY" - >"$OUT_DIR/env.json" <<'PY'
import json, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    d.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))))
for m in ("torchvision", "onnxruntime", "tensorrt"):
    try:
        d[m] = __import__(m).__version__
    except Exception as e:
        d[m] = f"missing ({type(e).__name__})"
print(json.dumps(d))
PY
missing=()
for pair in safetensors:safetensors onnx:onnx yaml:pyyaml transforms3d:transforms3d PIL:pillow psutil:psutil \
            tqdm:tqdm pytest:pytest pytest_timeout:pytest-timeout hypothesis:hypothesis cv2:opencv-python-headless; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -d "$WHEELS" ]; then
        "$PY" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}" >"$OUT_DIR/pip.log" 2>&1 \
            || echo "gpu_check: some wheels are not in $WHEELS (see pip.log): ${missing[*]}"
    else
        echo "gpu_check: missing ${missing[*]} and no wheel dir $WHEELS (scripts/gpu_check.sh --fetch-wheels)"
    fi
fi

# 2. gpu-marked tests (incl. the TensorRT plumbing probe) -----------------------------------------------------------
step tests 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -o addopts="" \
    --junitxml="$OUT_DIR/tests.xml" test/

# 3. apr-bench, torch on CUDA --------------------------------------------------------------------------------------
step bench 90 "$PY" -c "import sys; from apr_training.cli import bench_main; sys.exit(bench_main(sys.argv[1:]))" \
    --device cuda --backends torch --precisions fp32,fp16,bf16 --iterations 3 --runs 60 --rounds 3 --warmup 10 \
    --no-end-to-end --no-flops --no-seed-loop --json "$OUT_DIR/bench.json"

# 4. run_steps with / without CUDA graphs ---------------------------------------------------------------------------
cat >"$WORK/graphs.py" <<'PY'
import json, statistics, sys, time
import torch
from apr_localizer import geometry as g
from apr_localizer.backends.base import BackendOptions
from apr_localizer.backends.torch_backend import TorchBackend
from apr_training.bench.backends import build_random_bundle

bundle = build_random_bundle("published")
x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
ref = TorchBackend(bundle, BackendOptions(device="cuda")).run_steps(x, 3)
rows = []
for precision in ("fp32", "fp16", "bf16"):
    for graphs in (False, True):
        be = TorchBackend(bundle, BackendOptions(device="cuda", precision=precision, cuda_graphs=graphs))
        for _ in range(20):
            be.run_steps(x, 3)
        times = []
        for _ in range(200):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = be.run_steps(x, 3)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        rows.append({
            "precision": precision, "cuda_graphs": graphs, "median_ms": statistics.median(times),
            "p90_ms": sorted(times)[int(0.9 * len(times))],
            "pos_diff_vs_fp32": float((out.pose[:, :3] - ref.pose[:, :3]).abs().max()),
            "deg_vs_fp32": float(g.rotation_error_deg_torch(out.pose.double(), ref.pose.double()).max()),
            "same_scene": bool(torch.equal(out.scene, ref.scene)),
        })
        print(rows[-1], flush=True)
json.dump({"gpu": torch.cuda.get_device_name(0), "iterations": 3, "batch": 1, "rows": rows},
          open(sys.argv[1], "w"), indent=2)
PY
step graphs 60 "$PY" "$WORK/graphs.py" "$OUT_DIR/graphs.json"

# 5. GPU training throughput -----------------------------------------------------------------------------------------
step synth 60 "$PY" -c "import sys; from apr_training.cli import synth_main; sys.exit(synth_main(sys.argv[1:]))" \
    dataset --out "$WORK/synth" --scenes office,kitchen --train-seqs 1 --test-seqs 1 --frames 48 \
    --workers "$(nproc)" \
    --no-progress
step train 90 "$PY" -c "import sys; from apr_training.cli import train_main; sys.exit(train_main(sys.argv[1:]))" \
    ms-transformer --config synthetic --data "$WORK/synth" --labels "$WORK/synth/synthetic_train.csv" --out "$WORK/train" \
    --max-steps 80 --batch-size 32 --device cuda --amp --workers 6 --no-progress
[ -f "$WORK/train/metrics.jsonl" ] && cp "$WORK/train/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl"

# table ---------------------------------------------------------------------------------------------------------------
"$PY" - "$OUT_DIR" <<'PY' >"$OUT_DIR/gpu_check.md"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
load = lambda n: json.loads((out / n).read_text()) if (out / n).is_file() else None  # noqa: E731
env = load("env.json") or {}
print(f"# GPU check: {env.get('gpu', 'no GPU')} (sm {env.get('capability', '?')}), torch {env.get('torch')} "
      f"CUDA {env.get('cuda')}, Python {env.get('python')}\n")
print("| step | exit | seconds | note |\n| --- | --- | --- | --- |")
for line in (out / "steps.tsv").read_text().splitlines():
    print("| " + " | ".join(line.split("\t")) + " |")
if (out / "tests.xml").is_file():
    root = ET.parse(out / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib
    print(f"\ngpu tests: {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, "
          f"{a.get('skipped')} skipped")
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped") is not None
        if bad is not None or "plumbing" in case.get("name", ""):
            verdict = "FAILED " + (bad.get("message") or "")[:160] if bad is not None else "skipped" if skipped else "passed"
            print(f"- {case.get('name')}: {verdict}")
bench = load("bench.json")
if bench:
    print("\n| apr-bench torch cuda | apr graph ms (median) | apr + 3 iapr ms (median) |\n| --- | --- | --- |")
    for r in bench.get("results", []):
        st = r.get("stages", {})
        loop = next((v for k, v in st.items() if k.startswith("apr + ")), {})
        print(f"| {r['precision']} b{r['batch']} | {st.get('apr graph', {}).get('median', float('nan')):.3f} | "
              f"{loop.get('median', float('nan')):.3f} |")
graphs = load("graphs.json")
if graphs:
    print("\n| run_steps (APR + 3 iAPR, b1) | CUDA graphs | median ms | p90 ms | pos diff vs fp32 | deg vs fp32 | scene |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in graphs["rows"]:
        print(f"| {r['precision']} | {r['cuda_graphs']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
              f"{r['pos_diff_vs_fp32']:.2e} | {r['deg_vs_fp32']:.3f} | {'same' if r['same_scene'] else 'DIFFERENT'} |")
metrics = out / "train_metrics.jsonl"
if metrics.is_file():
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if '"images_per_s"' in x]
    if recs:
        print(f"\ntraining (ms-transformer, synthetic config, batch 32, AMP): {recs[-1]['images_per_s']:.1f} images/s "
              f"(last logged window, step {recs[-1].get('step')})")
PY
cat "$OUT_DIR/gpu_check.md"
echo "gpu_check: $(( $(date +%s) - T0 )) s in total; files in $OUT_DIR"

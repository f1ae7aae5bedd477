#!/usr/bin/env bash
# The full hostile-input campaign of issue 12 (opt-in: make fuzz), with a report.
#
# Usage: scripts/fuzz.sh [report dir [pytest args...]]     (default dir: build/fuzz)
#   APR_FUZZ_EXAMPLES=<n>   hypothesis examples per property (default here 1500; make test uses 40)
#   APR_FUZZ_STORM=<n>      malformed messages per storm and transport (default here 3000; make test uses 120)
#   APR_FUZZ_STORM_HZ=<hz>  storm rate (default 200; 0 = as fast as possible)
#   APR_FUZZ_FLOOD_S=<s>    mixed valid/malformed flood per transport (default here 60; skipped in make test)
#   APR_FUZZ_FLOOD_HZ=<hz>  flood rate (default 100)
#
# Runs test/test_fuzz_imaging.py, test/test_model_files.py and test/test_fuzz_node.py through scripts/run_tests.sh
# (the mandatory ROS environment, loopback-only) and writes <dir>/junit.xml, <dir>/records.json (measurements),
# <dir>/report.json and <dir>/summary.txt. The exit code is non-zero when a test failed.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

out="${1:-build/fuzz}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f -- "$out/junit.xml" "$out/records.json" "$out/report.json" "$out/summary.txt"
export APR_FUZZ_REPORT_DIR="$out"
export APR_FUZZ_EXAMPLES="${APR_FUZZ_EXAMPLES:-1500}"
export APR_FUZZ_STORM="${APR_FUZZ_STORM:-3000}"
export APR_FUZZ_STORM_HZ="${APR_FUZZ_STORM_HZ:-200}"
export APR_FUZZ_FLOOD_S="${APR_FUZZ_FLOOD_S:-60}"
export APR_FUZZ_FLOOD_HZ="${APR_FUZZ_FLOOD_HZ:-100}"
log "report in $out (examples $APR_FUZZ_EXAMPLES, storm $APR_FUZZ_STORM at $APR_FUZZ_STORM_HZ Hz, flood ${APR_FUZZ_FLOOD_S} s)"

rc=0
scripts/run_tests.sh test/test_fuzz_imaging.py test/test_model_files.py test/test_fuzz_node.py \
    -p no:cacheprovider -q -rxXs --junitxml="$out/junit.xml" "${@:2}" || rc=$?
PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" test/fuzz_report.py "$out" \
    "APR_FUZZ_EXAMPLES=$APR_FUZZ_EXAMPLES" "APR_FUZZ_STORM=$APR_FUZZ_STORM" "APR_FUZZ_STORM_HZ=$APR_FUZZ_STORM_HZ" \
    "APR_FUZZ_FLOOD_S=$APR_FUZZ_FLOOD_S" "APR_FUZZ_FLOOD_HZ=$APR_FUZZ_FLOOD_HZ" "pytest_exit=$rc" || true
exit "$rc"

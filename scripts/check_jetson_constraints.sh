#!/usr/bin/env bash
# Check that constraints/jetson-jp6.txt resolves for a Jetson (JetPack 6: CPython 3.10, manylinux aarch64) WITHOUT
# installing anything: pip resolves binary wheels for that interpreter/platform and writes a JSON report.
#
# Usage: scripts/check_jetson_constraints.sh [REPORT.json]       (needs the package index; exit 0 = resolves)
#   PIP=<pip>   pip to use (default: <repo>/.venv/bin/pip, else pip3); exit 3 when the index cannot be reached.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP="${PIP:-$REPO_ROOT/.venv/bin/pip}"
[ -x "$PIP" ] || PIP="$(command -v pip3)"
REPORT="${1:-$(mktemp "${TMPDIR:-/tmp}/jetson_resolve.XXXXXX.json")}"
TARGET="$(mktemp -d "${TMPDIR:-/tmp}/jetson_target.XXXXXX")"
trap 'rm -rf "$TARGET"' EXIT
LOG="$TARGET/pip.log"
set +e
"$PIP" install --dry-run --ignore-installed --quiet --report "$REPORT" --target "$TARGET/site" \
    --python-version 3.10 --implementation cp --abi cp310 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    --only-binary=:all: -r "$REPO_ROOT/constraints/jetson-jp6.txt" >"$LOG" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
    if grep -qiE "connection|network is unreachable|temporary failure in name resolution|max retries" "$LOG"; then
        echo "check_jetson_constraints: the package index is unreachable (no verdict)" >&2
        exit 3
    fi
    grep -v "is ignored" "$LOG" >&2
    echo "check_jetson_constraints: constraints/jetson-jp6.txt does NOT resolve for cp310 aarch64" >&2
    exit 1
fi
"${PYTHON:-python3}" - "$REPORT" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
items = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"])
print(f"constraints/jetson-jp6.txt resolves for CPython 3.10 / manylinux aarch64 ({len(items)} wheels):")
print("  " + "\n  ".join(items))
PY

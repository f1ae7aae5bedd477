#!/usr/bin/env bash
# Create or update the project venv: pinned requirements, locally generated tf2_msgs, editable apr_localizer.
#
# Usage: scripts/setup_venv.sh        (what `make venv` runs)
#   VENV=<path>    venv location (default: <repo>/.venv)
#   PYTHON=<exe>   interpreter used to create a missing venv (default: python3.11, else python3)
#
# The venv is stale when requirements.txt, setup.py, setup.cfg, this script or the interpreter changed since the last
# successful run (hash stamp $VENV/.apr_venv.stamp). A stale venv gets `pip install -r requirements.txt` and
# `pip install -e .`; an up-to-date one is left alone. tf2_msgs is built by scripts/build_tf2_msgs.sh, which keeps its
# own stamp and skips the build when tf2_msgs is installed and current.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

sanitize_ros_bootstrap_env
cd "$REPO_ROOT"

# One setup at a time per venv: concurrent pip runs into one prefix corrupt it.
if command -v flock >/dev/null; then
    lock="${TMPDIR:-/tmp}/apr_venv_$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
    exec 9>"$lock"
    if ! flock -n 9; then
        log "another setup of $VENV is running; waiting for it to finish."
        flock 9
    fi
fi

PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c 'import sys' >/dev/null 2>&1; then
    [ ! -e "$VENV" ] || [ -z "$(ls -A "$VENV" 2>/dev/null)" ] \
        || die "$VENV exists but has no working python; remove it (make clean) and run make venv again."
    base="${PYTHON:-}"
    if [ -z "$base" ]; then
        if command -v python3.11 >/dev/null; then base=python3.11; else base=python3; fi
    fi
    command -v "$base" >/dev/null || die "interpreter '$base' not found; set PYTHON=<python3.10..3.13 executable>."
    "$base" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' \
        || die "'$base' is Python $("$base" -c 'import platform; print(platform.python_version())'); the ROS 2 Kilted wheels need 3.10 to 3.13 (3.11 is tested)."
    log "creating $VENV with $("$base" -c 'import sys; print(sys.executable)')."
    "$base" -m venv "$VENV"
fi

STAMP="$VENV/.apr_venv.stamp"
want_stamp="$(hash_inputs "$REPO_ROOT/requirements.txt" "$REPO_ROOT/setup.py" "$REPO_ROOT/setup.cfg" \
    "$REPO_ROOT/scripts/setup_venv.sh"; "$PY" -VV)"

# True when apr_localizer imports from this checkout (editable install present and pointing here).
editable_ok() {
    (cd / && "$PY" -c 'import sys, apr_localizer; print(apr_localizer.__file__)' 2>/dev/null) \
        | grep -qxF "$REPO_ROOT/apr_localizer/__init__.py"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ]; then
    log "venv $VENV is up to date (stamp matches)."
    "$REPO_ROOT/scripts/build_tf2_msgs.sh"
    if ! editable_ok; then
        log "apr_localizer is not installed from $REPO_ROOT; reinstalling it (editable)."
        "$PY" -m pip install --progress-bar off --no-build-isolation -e "$REPO_ROOT"
    fi
    exit 0
fi

start=$(date +%s)
rm -f "$STAMP"
log "installing requirements.txt into $VENV."
"$PY" -m pip install --progress-bar off -r "$REPO_ROOT/requirements.txt"
"$REPO_ROOT/scripts/build_tf2_msgs.sh"
log "installing apr_localizer (editable) from $REPO_ROOT."
# No build isolation: setuptools is already in the venv (torch and ament_index_python require it).
"$PY" -m pip install --progress-bar off --no-build-isolation -e "$REPO_ROOT"
editable_ok || die "apr_localizer does not import from $REPO_ROOT after pip install -e."
printf '%s\n' "$want_stamp" > "$STAMP"
log "venv $VENV ready in $(( $(date +%s) - start )) s."

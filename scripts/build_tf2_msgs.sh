#!/usr/bin/env bash
# Generate tf2_msgs (TFMessage only) from scripts/tf2_msgs and install it into the venv prefix.
#
# Usage: scripts/build_tf2_msgs.sh [--force]
#   VENV=<path>  venv to build against and install into (default: <repo>/.venv); it must already hold the ROS build
#                set of requirements.txt (rosidl-default-generators, ament-cmake, ...).
#   --force      rebuild even if the install stamp says tf2_msgs is up to date.
#
# Recipe (docs: ros2_environment.md section 6): patch the wheels' exported CMake files that point at the manylinux
# build interpreter, then cmake configure/build/install with AMENT_PREFIX_PATH/CMAKE_PREFIX_PATH set to the venv and
# the venv's python as Python3_EXECUTABLE. Skipped when the stamp matches and the generated package imports.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXPECTED_HASH="RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087"
SRC="$REPO_ROOT/scripts/tf2_msgs"
STAMP="$VENV/.apr_tf2_msgs.stamp"

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown argument '$arg' (expected --force)" ;;
    esac
done

PY="$VENV/bin/python"
[ -x "$PY" ] || die "no python at $PY: create the venv first (make venv)."
command -v cmake >/dev/null || die "cmake not found on PATH; it is needed to build tf2_msgs."
sanitize_ros_bootstrap_env

# Installed type hash, or empty when tf2_msgs is missing/broken in this venv.
installed_hash() {
    "$PY" - "$VENV" <<'EOF' 2>/dev/null || true
import json
import sys
from pathlib import Path

from tf2_msgs.msg import TFMessage  # noqa: F401  (fails when the typesupport libraries are missing)

desc = json.loads((Path(sys.argv[1]) / "share/tf2_msgs/msg/TFMessage.json").read_text())
print(next(h["hash_string"] for h in desc["type_hashes"] if h["type_name"] == "tf2_msgs/msg/TFMessage"))
EOF
}

want_stamp="$(hash_inputs "$SRC/CMakeLists.txt" "$SRC/package.xml" "$SRC/msg/TFMessage.msg" \
    "$REPO_ROOT/scripts/build_tf2_msgs.sh" "$REPO_ROOT/requirements.txt"; "$PY" -VV)"
if [ "$force" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
        && [ "$(installed_hash)" = "$EXPECTED_HASH" ]; then
    log "tf2_msgs is up to date in $VENV (stamp matches); skipping the build."
    exit 0
fi

for pkg in rosidl_default_generators ament_cmake ament_cmake_include_directories rosidl_core_generators \
        ament_cmake_ros_core geometry_msgs builtin_interfaces; do
    [ -d "$VENV/share/$pkg" ] || die "$VENV/share/$pkg is missing: install requirements.txt (ROS build set) first."
done

start=$(date +%s)
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PYTAG="cp${PYVER/./}"
PYINC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
NPINC="$("$PY" -c "import numpy; print(numpy.get_include())")"
[ -f "$PYINC/Python.h" ] || die "Python.h not found in $PYINC: the interpreter's development headers are needed."

# Fix the exported include dirs of the *_rosidl_generator_py targets (they name the wheel builder's interpreter).
# Idempotent: patched files no longer contain the tag.
patched=0
while IFS= read -r -d '' f; do
    sed -i -E \
        -e "s#[^\";]*/${PYTAG}-${PYTAG}/lib/python${PYVER//./\\.}/site-packages/numpy/_core/include#${NPINC}#g" \
        -e "s#[^\";]*/${PYTAG}-${PYTAG}/include/python${PYVER//./\\.}#${PYINC}#g" \
        "$f"
    patched=$((patched + 1))
done < <(grep -rlZ --include='*.cmake' -e "${PYTAG}-${PYTAG}/" "$VENV/share" || true)
log "patched $patched CMake export file(s) for $PYTAG (include: $PYINC, numpy: $NPINC)."
if grep -rlq --include='*.cmake' -e "${PYTAG}-${PYTAG}/include/python" "$VENV/share"; then
    die "some CMake export files under $VENV/share still point at the ${PYTAG} build interpreter after the sed fix."
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs_build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" PATH="$VENV/bin:$PATH"
{
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PY" \
        -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release \
        && cmake --build "$BUILD" -j"$(nproc)" \
        && cmake --install "$BUILD"
} > "$BUILD/build.log" 2>&1 || { tail -n 60 "$BUILD/build.log" >&2; die "building tf2_msgs failed (log above)."; }

got="$(installed_hash)"
[ "$got" = "$EXPECTED_HASH" ] \
    || die "tf2_msgs built, but its TFMessage type hash is '${got:-<not importable>}', expected $EXPECTED_HASH."
printf '%s\n' "$want_stamp" > "$STAMP"
log "built and installed tf2_msgs into $VENV in $(( $(date +%s) - start )) s (type hash $got)."

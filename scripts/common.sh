# Shared helpers for the scripts in this directory; source it, do not run it.
# Sets REPO_ROOT and VENV (default: $REPO_ROOT/.venv, override with the VENV environment variable).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# The ros-wheels-bootstrapper .pth of a venv re-execs python with LD_LIBRARY_PATH extended by that venv's libraries
# and sets _ROS_WHEELS_BOOTSTRAP_COMPLETE so that children skip the step. When this script was started from a process
# of ANOTHER ROS venv, drop that venv's library dirs and the guard so our venv's python bootstraps itself.
sanitize_ros_bootstrap_env() {
    [ -n "${_ROS_WHEELS_BOOTSTRAP_COMPLETE:-}" ] || return 0
    local kept=() part prefix
    local IFS=':'
    for part in ${LD_LIBRARY_PATH:-}; do
        [ -n "$part" ] || continue
        case "$part" in
            */site-packages/ros_*.libs) [[ "$part" == "$VENV"/* ]] || continue ;;
            */lib)
                prefix="${part%/lib}"
                if [ -f "$prefix/pyvenv.cfg" ] && [ "$prefix" != "$VENV" ]; then continue; fi
                ;;
        esac
        kept+=("$part")
    done
    if [ "${#kept[@]}" -gt 0 ]; then
        LD_LIBRARY_PATH="${kept[*]}"
        export LD_LIBRARY_PATH
    else
        unset LD_LIBRARY_PATH
    fi
    unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
}

# Print "sha256  name" lines for the given files (missing files hash as "missing") and the python version.
hash_inputs() {
    local f
    for f in "$@"; do
        if [ -f "$f" ]; then
            printf '%s  %s\n' "$(sha256sum "$f" | cut -d' ' -f1)" "${f#"$REPO_ROOT"/}"
        else
            printf 'missing  %s\n' "${f#"$REPO_ROOT"/}"
        fi
    done
}

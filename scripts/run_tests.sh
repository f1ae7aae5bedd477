#!/usr/bin/env bash
# Run pytest in the project venv with the mandatory ROS 2 environment; arguments go to pytest.
#
# Usage: scripts/run_tests.sh [pytest args...]     e.g. scripts/run_tests.sh -k geometry -x
#   VENV=<path>            venv to use (default: <repo>/.venv; create it with make venv)
#   APR_ROS_DOMAIN_ID=<n>  use this ROS_DOMAIN_ID instead of a random one in 1..100
#   APR_NO_NETNS=1         do not run inside a private network namespace even when root
#
# Every run gets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a private ROS_DOMAIN_ID, a fresh ROS_LOG_DIR,
# AMENT_PREFIX_PATH=$VENV and FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_shm_big.xml. As root, pytest runs inside
# `unshare -n` with only loopback up (a second safety layer: no DDS packet can leave the machine). The exit code is
# pytest's; 5 (no tests collected) is a failure.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

sanitize_ros_bootstrap_env
cd "$REPO_ROOT"
PY="$VENV/bin/python"
[ -x "$PY" ] || die "no venv at $VENV: run 'make venv' first."

if [ -n "${ROS_AUTOMATIC_DISCOVERY_RANGE:-}" ] && [ "$ROS_AUTOMATIC_DISCOVERY_RANGE" != LOCALHOST ]; then
    warn "ROS_AUTOMATIC_DISCOVERY_RANGE=$ROS_AUTOMATIC_DISCOVERY_RANGE overridden with LOCALHOST (mandatory for tests)."
fi
if [ -n "${RMW_IMPLEMENTATION:-}" ] && [ "$RMW_IMPLEMENTATION" != rmw_fastrtps_cpp ]; then
    warn "RMW_IMPLEMENTATION=$RMW_IMPLEMENTATION unset: only rmw_fastrtps_cpp exists in the PyPI wheels."
    unset RMW_IMPLEMENTATION
fi

domain="${APR_ROS_DOMAIN_ID:-$(( RANDOM % 100 + 1 ))}"
[[ "$domain" =~ ^[0-9]+$ ]] && [ "$domain" -ge 1 ] && [ "$domain" -le 100 ] \
    || die "APR_ROS_DOMAIN_ID='$domain' must be an integer in 1..100."
ROS_LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/apr_ros_log.XXXXXX")"
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID="$domain" ROS_LOG_DIR
export AMENT_PREFIX_PATH="$VENV"
export FASTDDS_DEFAULT_PROFILES_FILE="$REPO_ROOT/config/fastdds_shm_big.xml"
[ -f "$FASTDDS_DEFAULT_PROFILES_FILE" ] || die "Fast DDS profile $FASTDDS_DEFAULT_PROFILES_FILE is missing."

cmd=("$PY" -m pytest "$@")
# SIOCGIFFLAGS = 0x8913, SIOCSIFFLAGS = 0x8914, IFF_UP = 1.
LO_UP_PY='
import fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
get = lambda: struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, struct.pack("16sH14x", b"lo", 0)))[1]
if not get() & 1:
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", get() | 1))
sys.exit(0 if get() & 1 else "loopback interface lo is down in the test network namespace")
'

netns=0
if [ "$(id -u)" = 0 ] && [ "${APR_NO_NETNS:-0}" != 1 ]; then
    if command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
        netns=1
    else
        warn "running as root but 'unshare -n' is not permitted here; running without a private network namespace" \
            "(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST still keeps DDS on this host)."
    fi
fi
log "ROS_DOMAIN_ID=$ROS_DOMAIN_ID ROS_LOG_DIR=$ROS_LOG_DIR netns=$netns: ${cmd[*]}"

set +e
if [ "$netns" = 1 ]; then
    # Bring lo up inside the new namespace (it starts down), then check its IFF_UP flag with ioctl (sysfs would show
    # the parent namespace). Without iproute2 the ioctl sets the flag itself.
    unshare -n -- bash -c '
        set -e
        if command -v ip >/dev/null; then ip link set lo up; fi
        "$1" -c "$2"
        shift 2
        exec "$@"
    ' bash "$PY" "$LO_UP_PY" "${cmd[@]}"
    rc=$?
else
    "${cmd[@]}"
    rc=$?
fi
set -e

[ "$rc" != 5 ] || warn "pytest collected no tests (exit code 5); this counts as a failure."
if [ "$rc" = 0 ] || [ -z "$(ls -A "$ROS_LOG_DIR")" ]; then
    rm -rf "$ROS_LOG_DIR"
else
    log "pytest exit code $rc; ROS logs kept in $ROS_LOG_DIR"
fi
exit "$rc"

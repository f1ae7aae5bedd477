"""The one ROS harness of the tools (``apr-eval-bag live``, ``apr-bench node``, the bag player) and of the tests.

* Environment: :func:`prepare_ros_environment` / :func:`ros_environment` make a process safe for rclpy (one policy:
  ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, a private ``ROS_DOMAIN_ID`` in :data:`DOMAIN_RANGE`, a temporary
  ``ROS_LOG_DIR``, the shared-memory Fast DDS profile, ``AMENT_PREFIX_PATH``). Call it before ``import rclpy``.
* The node as a process: :func:`node_command`, :func:`write_params` (a ``--params-file``), :class:`NodeProcess`
  (start, log, wait for a log line, SIGINT stop with the exit code).
* In-process rclpy: :class:`RosHarness` (a private ``rclpy.Context`` with one node spun in a background thread;
  publishers, subscriptions that collect messages, waits on counts/predicates with timeouts — never fixed sleeps —,
  service calls and lifecycle transitions).
* The node's outputs: :func:`diag_values` parses its ``DiagnosticArray`` status; :class:`NodeMonitor` records its
  ``~/pose`` and ``/diagnostics`` and waits until it is active and subscribed.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apr_localizer.fileio import atomic_write_text

__all__ = [
    "DOMAIN_RANGE",
    "NODE_NAME",
    "WAIT_S",
    "HarnessError",
    "NodeExitedError",
    "NodeMonitor",
    "NodeProcess",
    "NodeTimeoutError",
    "RosHarness",
    "diag_values",
    "node_command",
    "prepare_ros_environment",
    "send_until",
    "subprocess_env",
    "ros_environment",
    "wait_until",
    "write_params",
]

DOMAIN_RANGE = range(1, 101)  # 0 is everybody's default; ids above 100 can collide with ephemeral ports
NODE_NAME = "apr_localizer"
WAIT_S = 20.0  # default timeout of every wait (well above DDS discovery time, see docs/performance.md)
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the directory holding apr_localizer/ and apr_training/
_ENV_KEYS = (
    "ROS_AUTOMATIC_DISCOVERY_RANGE",
    "ROS_DOMAIN_ID",
    "ROS_LOG_DIR",
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "AMENT_PREFIX_PATH",
)


class HarnessError(RuntimeError):
    """A ROS process or graph did not behave as needed (one sentence naming the node, topic or option)."""


class NodeExitedError(HarnessError):
    """The node process exited while it was needed (the message holds its log tail)."""


class NodeTimeoutError(HarnessError):
    """The node did not reach a state in time (one sentence saying what was awaited)."""


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition", poll: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value (returned) or raise ``AssertionError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def send_until(
    send: Callable[[], Any],
    reply: Callable[[Any], Any],
    timeout: float = WAIT_S,
    what: str = "a reply",
    resend_s: float = 5.0,
) -> tuple[Any, Any]:
    """Send once, then again every ``resend_s`` until ``reply(key)`` is truthy for a sent key; return (key, reply).

    ``send()`` publishes one message and returns its key (e.g. its stamp). For the first message after discovery on a
    best-effort subscription: the publisher sees the match before the subscriber does, and a message sent in between
    is dropped without a trace. Every key sent stays eligible, so a slow (not lost) reply is still accepted.
    """
    keys: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys.append(send())
        resend_at = min(time.monotonic() + resend_s, deadline)
        while time.monotonic() < resend_at:
            for key in keys:
                value = reply(key)
                if value:
                    return key, value
            time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} ({len(keys)} sent)")


# --------------------------------------------------------------------------------------------- environment
def _valid_domain(value: str | None) -> bool:
    return value is not None and value.isdigit() and int(value) in DOMAIN_RANGE


def prepare_ros_environment(
    env: MutableMapping[str, str] | None = None, fastdds_profile: str | Path | None = None
) -> dict[str, str]:
    """Make ``env`` (default ``os.environ``) safe for rclpy; return the variables that were set or replaced.

    ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` always; ``ROS_DOMAIN_ID`` a random id of :data:`DOMAIN_RANGE` when
    unset or outside it; ``ROS_LOG_DIR`` a new temporary directory when unset; ``FASTDDS_DEFAULT_PROFILES_FILE``
    ``fastdds_profile`` or the package's ``config/fastdds_shm_big.xml`` when unset; ``AMENT_PREFIX_PATH``
    ``sys.prefix`` when unset (``ament_index_python`` raises without it).
    """
    env = os.environ if env is None else env
    changed: dict[str, str] = {}
    if env.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = changed["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if not _valid_domain(env.get("ROS_DOMAIN_ID")):
        env["ROS_DOMAIN_ID"] = changed["ROS_DOMAIN_ID"] = str(random.SystemRandom().choice(DOMAIN_RANGE))
    if not env.get("ROS_LOG_DIR"):
        env["ROS_LOG_DIR"] = changed["ROS_LOG_DIR"] = tempfile.mkdtemp(prefix="apr_ros_log_")
    if not env.get("FASTDDS_DEFAULT_PROFILES_FILE"):
        profile = Path(fastdds_profile) if fastdds_profile else _default_fastdds_profile()
        if profile is not None and profile.is_file():
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = changed["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    if not env.get("AMENT_PREFIX_PATH"):
        env["AMENT_PREFIX_PATH"] = changed["AMENT_PREFIX_PATH"] = sys.prefix
    return changed


def subprocess_env(
    log_dir: str | Path,
    *,
    exclude_domain: int | None = None,
    pythonpath: str | Path | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for ROS processes started by a tool or a test: a private domain, their own ``ROS_LOG_DIR``.

    A copy of ``base`` (default ``os.environ``) with LOCALHOST discovery, a random ``ROS_DOMAIN_ID`` of
    :data:`DOMAIN_RANGE` other than ``exclude_domain`` (so processes of one test never meet another's), ``ROS_LOG_DIR``
    ``log_dir``, unbuffered Python output, ``pythonpath`` (e.g. a source checkout) first on ``PYTHONPATH``, and the
    defaults of :func:`prepare_ros_environment` (Fast DDS shared-memory profile, ``AMENT_PREFIX_PATH``).
    """
    env = dict(os.environ if base is None else base)
    env.update(
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(random.SystemRandom().choice([d for d in DOMAIN_RANGE if d != exclude_domain])),
        ROS_LOG_DIR=str(log_dir),
        PYTHONUNBUFFERED="1",
    )
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p)
    prepare_ros_environment(env)
    return env


@contextlib.contextmanager
def ros_environment(announce: Callable[[str], None] | None = None) -> Iterator[dict[str, str]]:
    """Apply :func:`prepare_ros_environment` to ``os.environ`` for a block, then restore it.

    Yields the variables that were set (each is passed to ``announce`` as ``NAME=value`` first); a ``ROS_LOG_DIR``
    created here is removed with its contents on exit.
    """
    before = {k: os.environ.get(k) for k in _ENV_KEYS}
    changes = prepare_ros_environment()
    for name, value in changes.items():
        if announce is not None:
            announce(f"{name}={value}")
    try:
        yield changes
    finally:
        if "ROS_LOG_DIR" in changes:
            shutil.rmtree(changes["ROS_LOG_DIR"], ignore_errors=True)
        for key, old in before.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _default_fastdds_profile() -> Path | None:
    from apr_localizer.resources import config_path

    try:
        return config_path("fastdds_shm_big.xml")
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------------- node process
def node_command(module: bool = False) -> list[str]:
    """Return the node's console script from this environment, else (or with ``module``) ``python -m ...node``."""
    if not module:
        for directory in (Path(sys.prefix) / "bin", Path(sys.prefix) / "lib" / "apr_localizer"):
            exe = directory / "localizer_node"
            if exe.is_file() and os.access(exe, os.X_OK):
                return [str(exe)]
    return [sys.executable, "-m", "apr_localizer.node"]


def write_params(path: str | Path, params: Mapping[str, Any], node_name: str = "/**") -> Path:
    """Write a ``--params-file`` YAML for ``node_name``; ``params`` may be nested dicts or dotted keys."""
    import yaml

    nested: dict[str, Any] = {}
    for key, value in params.items():
        parts = key.split(".")
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        if isinstance(value, Mapping) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]].update(value)
        else:
            d[parts[-1]] = dict(value) if isinstance(value, Mapping) else value
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump({node_name: {"ros__parameters": nested}}, sort_keys=False))
    return path


class NodeProcess:
    """``localizer_node`` as a subprocess (``--ros-args [-r __node:=NAME] --params-file ...``), output to a log file.

    Later parameter files override earlier ones. The source tree this module was imported from is put first on the
    child's ``PYTHONPATH`` so the node runs the same code. :meth:`stop` sends SIGINT and returns the exit code.
    """

    def __init__(
        self,
        params_file: str | Path | Sequence[str | Path],
        env: Mapping[str, str],
        log_path: str | Path,
        extra_args: Sequence[str] | None = None,
        module: bool = False,
        node_name: str | None = None,
    ) -> None:
        files = [params_file] if isinstance(params_file, (str, Path)) else list(params_file)
        self.node_name = node_name or NODE_NAME
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        child_env = dict(env)
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), child_env.get("PYTHONPATH", "")) if p)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        rename = ["-r", f"__node:={node_name}"] if node_name else []
        params = [arg for f in files for arg in ("--params-file", str(f))]
        self.command = [*node_command(module), "--ros-args", *rename, *params, *(extra_args or [])]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command, env=child_env, cwd=SOURCE_ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """Return the node's whole output so far."""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self, what: str) -> None:
        """Raise :class:`NodeExitedError` with the log tail when the node has exited."""
        if not self.alive():
            raise NodeExitedError(
                f"localizer_node exited with code {self.proc.returncode} while {what}; last lines of "
                f"{self.log_path}:\n{self.log_tail()}"
            )

    def wait_log(self, text: str, timeout: float = WAIT_S) -> None:
        """Wait until ``text`` appears in the node's output (fails early if the process exits)."""

        def seen() -> bool:
            if text in self.log():
                return True
            if not self.alive():
                raise AssertionError(f"node exited with {self.proc.returncode} before logging {text!r}:\n{self.log()}")
            return False

        wait_until(seen, timeout, f"node log line {text!r}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT, wait up to ``timeout`` s (then SIGKILL: a negative code); return the exit code. Idempotent."""
        if self.returncode is not None:
            return self.returncode
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.returncode = int(self.proc.returncode)
        finally:
            self._log.close()
        return self.returncode


# --------------------------------------------------------------------------------------------- in-process rclpy
class RosHarness:
    """A private ``rclpy.Context`` with one node, spun by a ``SingleThreadedExecutor`` in a background thread.

    ``domain_id`` defaults to ``$ROS_DOMAIN_ID``; the environment must be prepared (:func:`prepare_ros_environment`).
    """

    def __init__(self, domain_id: int | None = None, name: str = "apr_harness") -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
            raise HarnessError("ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST (call prepare_ros_environment first)")
        self.domain_id = int(os.environ.get("ROS_DOMAIN_ID", "0")) if domain_id is None else int(domain_id)
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._spin, name=f"{name}_spin", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, RuntimeError):
            pass

    # -- topics
    def subscribe(self, msg_type, topic: str, qos: Any = 10) -> list:
        """Subscribe and return the list that received messages are appended to (under ``self.lock``)."""
        received: list = []

        def cb(msg) -> None:
            with self.lock:
                received.append(msg)

        self.node.create_subscription(msg_type, topic, cb, qos)
        return received

    def publisher(self, msg_type, topic: str, qos: Any = 10):
        return self.node.create_publisher(msg_type, topic, qos)

    def count(self, received: list) -> int:
        with self.lock:
            return len(received)

    def snapshot(self, received: list) -> list:
        with self.lock:
            return list(received)

    def wait_count(self, received: list, n: int, timeout: float = WAIT_S, what: str = "messages") -> list:
        wait_until(lambda: self.count(received) >= n, timeout, f"{n} {what}")
        return self.snapshot(received)

    def wait_subscribers(self, pub, n: int = 1, timeout: float = WAIT_S) -> None:
        wait_until(lambda: pub.get_subscription_count() >= n, timeout, f"{n} subscriber(s) on {pub.topic_name}")

    def wait_no_subscribers(self, pub, timeout: float = WAIT_S) -> None:
        wait_until(lambda: pub.get_subscription_count() == 0, timeout, f"no subscriber on {pub.topic_name}")

    def wait_publishers(self, topic: str, n: int = 1, timeout: float = WAIT_S) -> None:
        wait_until(lambda: self.node.count_publishers(topic) >= n, timeout, f"{n} publisher(s) on {topic}")

    # -- services
    def call(self, srv_type, name: str, request, timeout: float = WAIT_S):
        """Call a service (waiting for it first) and return the response."""
        client: Any = self.node.create_client(srv_type, name)
        try:
            wait_until(lambda: client.service_is_ready(), timeout, f"service {name}")
            future = client.call_async(request)
            wait_until(future.done, timeout, f"response of {name}")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def lifecycle_state(self, node_name: str) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"/{node_name}/get_state", GetState.Request()).current_state.label

    def change_state(self, node_name: str, transition: str, timeout: float = 60.0) -> bool:
        """Trigger a lifecycle transition by label (configure, activate, deactivate, cleanup, shutdown)."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        request = ChangeState.Request(transition=Transition(label=transition))
        return bool(self.call(ChangeState, f"/{node_name}/change_state", request, timeout).success)

    def close(self) -> None:
        """Shut the context down and release the node (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.context.try_shutdown()
        self._thread.join(timeout=5.0)
        self.executor.shutdown()
        self.node.destroy_node()

    def __enter__(self) -> RosHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- the node's outputs
def diag_values(msg: Any, node_name: str = NODE_NAME) -> dict[str, Any] | None:
    """Key/value dict (plus int ``_level`` and ``_message``) of ``node_name``'s status in a ``DiagnosticArray``."""
    for status in msg.status:
        if status.name.startswith(f"{node_name}: "):
            values: dict[str, Any] = {kv.key: kv.value for kv in status.values}
            level = status.level
            values["_level"] = int.from_bytes(level, "little") if isinstance(level, bytes) else int(level)
            values["_message"] = status.message
            return values
    return None


class NodeMonitor:
    """Records a node's ``~/pose`` and ``/diagnostics`` (with receipt times) on a :class:`RosHarness` node."""

    def __init__(self, harness: RosHarness, node_name: str = NODE_NAME) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped

        from .bags.recorder import TopicRecorder

        self.node_name = node_name
        self.pose_topic = f"/{node_name}/pose"
        self.recorder = TopicRecorder(harness.node, {self.pose_topic: PoseStamped, "/diagnostics": DiagnosticArray})

    def poses(self) -> list[tuple[int, int, np.ndarray]]:
        """``(stamp_ns, receipt_ns, pose (7,))`` of every received ``~/pose`` in receipt order."""
        from apr_localizer.ros_convert import pose_from_msg, time_to_ns

        return [
            (time_to_ns(r.msg.header.stamp), r.receipt_ns, pose_from_msg(r.msg.pose))
            for r in self.recorder.snapshot(self.pose_topic)
        ]

    def pose_stamps(self) -> set[int]:
        """``header.stamp`` (ns) of every received ``~/pose``."""
        from apr_localizer.ros_convert import time_to_ns

        return {time_to_ns(r.msg.header.stamp) for r in self.recorder.snapshot(self.pose_topic)}

    def pose_count(self) -> int:
        return self.recorder.count(self.pose_topic)

    def last_diag(self, after_ns: int = 0) -> dict[str, Any] | None:
        """Return the newest diagnostics of the node received after ``after_ns`` (wall clock), or None."""
        for r in reversed(self.recorder.snapshot("/diagnostics")):
            if r.receipt_ns < after_ns:
                break
            values = diag_values(r.msg, self.node_name)
            if values is not None:
                return values
        return None

    def wait_diag(self, after_ns: int, timeout: float) -> dict[str, Any] | None:
        """Wait for diagnostics received after ``after_ns``; None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.last_diag(after_ns)
            if d is not None:
                return d
            time.sleep(0.05)
        return None

    def wait_active(self, process: NodeProcess, image_publishers: Sequence[Any], timeout: float) -> None:
        """Wait until the node subscribes to the images and its ``~/pose`` publisher is matched.

        Fails early with the node's log when it exits, and with its diagnostics message when configure failed.
        """
        deadline = time.monotonic() + timeout
        pose_sub = self.recorder.subscriptions[self.pose_topic]
        while True:
            process.check_alive("starting up")
            subscribed = all(p.get_subscription_count() >= 1 for p in image_publishers)
            if subscribed and pose_sub.get_publisher_count() >= 1:
                return
            d = self.last_diag()
            if d is not None and d.get("_level") == 2 and "configure failed" in d.get("_message", ""):
                raise HarnessError(f"localizer_node: {d['_message']} (log: {process.log_path})")
            if time.monotonic() > deadline:
                state = d.get("state", "unknown") if d else "no diagnostics received"
                raise NodeTimeoutError(
                    f"localizer_node did not become active and subscribed within {timeout:g} s (state: {state}); "
                    f"raise --startup-timeout or see {process.log_path}:\n{process.log_tail()}"
                )
            time.sleep(0.05)

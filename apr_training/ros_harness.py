"""Helpers for tests that drive real ROS 2 processes: a node subprocess and an in-process rclpy harness.

The harness runs its own ``rclpy.Context`` on the test's private ``ROS_DOMAIN_ID`` (from the ``ros_env`` fixture)
and spins a ``SingleThreadedExecutor`` in a background thread; received messages are appended to lists, and tests
wait on counts/predicates with a timeout (never fixed sleeps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 20.0  # default timeout of every wait (>= 10 s: discovery alone can take ~2.7 s)


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition", poll: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def write_params(path: Path, params: dict[str, Any], node_name: str = "/**") -> Path:
    """Write a ``--params-file`` YAML for ``node_name`` with (possibly nested) ``params``."""
    path.write_text(yaml.safe_dump({node_name: {"ros__parameters": params}}, sort_keys=False))
    return path


def node_command(module: bool = False) -> list[str]:
    """Return the node's console script from this venv, else (or with ``module``) ``python -m apr_localizer.node``."""
    if module:
        return [sys.executable, "-m", "apr_localizer.node"]
    for directory in (Path(sys.prefix) / "bin", Path(sys.prefix) / "lib" / "apr_localizer"):
        exe = directory / "localizer_node"
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    return [sys.executable, "-m", "apr_localizer.node"]


class NodeProcess:
    """The localizer node as a subprocess (``--ros-args --params-file ...``); stdout+stderr go to a log file."""

    def __init__(
        self,
        params_file: Path | list[Path],
        env: dict[str, str],
        log_path: Path,
        extra_args: list[str] | None = None,
        module: bool = False,
    ):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        files = params_file if isinstance(params_file, list) else [params_file]
        params = [arg for f in files for arg in ("--params-file", str(f))]  # later files override earlier ones
        cmd = [*node_command(module), "--ros-args", *params, *(extra_args or [])]
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

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
        """SIGINT, wait, return the exit code (kills after ``timeout`` and fails)."""
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGINT)
                try:
                    return self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"node did not exit within {timeout} s of SIGINT:\n{self.log()}") from None
            return self.proc.returncode
        finally:
            self._log.close()


class RosHarness:
    """An in-process rclpy node (private context, ``domain_id``) spun in a background thread."""

    def __init__(self, domain_id: int, name: str = "test_driver"):
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor

        self._rclpy = rclpy
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self._spin, daemon=True)
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
        client = self.node.create_client(srv_type, name)
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
        self.context.try_shutdown()
        self._thread.join(timeout=5.0)
        self.executor.shutdown()
        self.node.destroy_node()


def diag_values(msg, node_name: str = "apr_localizer") -> dict[str, str] | None:
    """Key/value dict of the localizer node ``node_name``'s DiagnosticStatus in ``msg`` (None if absent)."""
    for status in msg.status:
        if status.name.startswith(f"{node_name}: "):
            values = {kv.key: kv.value for kv in status.values}
            level = status.level
            values["_level"] = int.from_bytes(level, "little") if isinstance(level, bytes) else int(level)
            values["_message"] = status.message
            return values
    return None

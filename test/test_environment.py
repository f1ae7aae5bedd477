"""The ROS 2 environment the package relies on: locally generated tf2_msgs and real cross-process DDS traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

TF_MESSAGE_HASH = "RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087"
MATCH_TIMEOUT_S = 20.0
N_MESSAGES = 10

# Publishes TFMessage on /tf (KEEP_LAST 100, reliable) once a subscriber is matched, one message per 20 ms, and a
# latched /tf_static (depth 1, transient local) at start-up. Runs until SIGINT and then exits 0.
PUBLISHER = textwrap.dedent(
    """
    import os
    import sys

    import rclpy
    from geometry_msgs.msg import TransformStamped
    from rclpy.executors import ExternalShutdownException
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from tf2_msgs.msg import TFMessage

    print("range=" + os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "<unset>"), flush=True)
    rclpy.init()
    node = rclpy.create_node("tf_test_publisher")
    tf_pub = node.create_publisher(TFMessage, "/tf", 100)
    static_qos = QoSProfile(
        depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
    )
    static_pub = node.create_publisher(TFMessage, "/tf_static", static_qos)

    def transform(parent, child, x):
        t = TransformStamped()
        t.header.stamp = node.get_clock().now().to_msg()
        t.header.frame_id = parent
        t.child_frame_id = child
        t.transform.translation.x = float(x)
        t.transform.rotation.w = 1.0
        return t

    static_pub.publish(TFMessage(transforms=[transform("base_link", "camera_optical", -1.5)]))
    count = 0

    def tick():
        global count
        if tf_pub.get_subscription_count() > 0:
            tf_pub.publish(TFMessage(transforms=[transform("map", "camera_optical", count)]))
            count += 1

    node.create_timer(0.02, tick)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    print(f"published={count}", flush=True)
    sys.exit(0)
    """
)


def test_discovery_range_is_localhost_in_test_process() -> None:
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 1 <= int(os.environ["ROS_DOMAIN_ID"]) <= 100
    assert Path(os.environ["ROS_LOG_DIR"]).is_dir()


def test_ros_env_fixture_is_private(ros_env: dict[str, str], tmp_path: Path) -> None:
    assert ros_env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert ros_env["ROS_DOMAIN_ID"] != os.environ["ROS_DOMAIN_ID"]
    assert 1 <= int(ros_env["ROS_DOMAIN_ID"]) <= 100
    assert Path(ros_env["ROS_LOG_DIR"]).is_dir()
    assert Path(ros_env["ROS_LOG_DIR"]).is_relative_to(tmp_path)
    assert Path(ros_env["FASTDDS_DEFAULT_PROFILES_FILE"]).is_file()


def test_tf2_msgs_importable_with_expected_type_hash() -> None:
    from tf2_msgs.msg import TFMessage

    msg = TFMessage()
    assert list(msg.transforms) == []
    description = Path(sys.prefix) / "share" / "tf2_msgs" / "msg" / "TFMessage.json"
    assert description.is_file(), f"{description} missing: tf2_msgs is not installed into the venv (make venv)"
    hashes = {h["type_name"]: h["hash_string"] for h in json.loads(description.read_text())["type_hashes"]}
    assert hashes["tf2_msgs/msg/TFMessage"] == TF_MESSAGE_HASH


def test_rmw_is_fastrtps() -> None:
    from rclpy.utilities import get_rmw_implementation_identifier

    assert get_rmw_implementation_identifier() == "rmw_fastrtps_cpp"


def _spin_until(executor, condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        executor.spin_once(timeout_sec=0.05)
    return True


@pytest.mark.ros
def test_tf_message_crosses_processes(ros_env: dict[str, str], rclpy_context) -> None:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from tf2_msgs.msg import TFMessage

    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER],
        env=ros_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    node = Node("tf_test_subscriber", context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    received: list[TFMessage] = []
    static: list[TFMessage] = []
    try:
        sub = node.create_subscription(TFMessage, "/tf", received.append, 100)
        static_qos = QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
        )
        node.create_subscription(TFMessage, "/tf_static", static.append, static_qos)

        assert _spin_until(executor, lambda: sub.get_publisher_count() >= 1, MATCH_TIMEOUT_S), (
            f"no /tf publisher matched within {MATCH_TIMEOUT_S} s on ROS_DOMAIN_ID={ros_env['ROS_DOMAIN_ID']}"
        )
        assert _spin_until(executor, lambda: len(received) >= N_MESSAGES and static, MATCH_TIMEOUT_S), (
            f"received {len(received)} /tf and {len(static)} /tf_static messages within {MATCH_TIMEOUT_S} s"
        )
        infos = node.get_publishers_info_by_topic("/tf")
        assert [info.topic_type for info in infos] == ["tf2_msgs/msg/TFMessage"]
        assert str(infos[0].topic_type_hash) == TF_MESSAGE_HASH
    finally:
        executor.remove_node(node)
        node.destroy_node()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()

    assert proc.returncode == 0, f"publisher exited with {proc.returncode}:\n{out}"
    assert "range=LOCALHOST" in out.splitlines()
    xs = [msg.transforms[0].transform.translation.x for msg in received]
    start = int(xs[0])
    assert xs[:N_MESSAGES] == [float(x) for x in range(start, start + N_MESSAGES)], "messages lost or reordered"
    first = received[0].transforms[0]
    assert (first.header.frame_id, first.child_frame_id) == ("map", "camera_optical")
    assert first.transform.rotation.w == 1.0
    latched = static[0].transforms[0]
    assert (latched.header.frame_id, latched.child_frame_id, latched.transform.translation.x) == (
        "base_link",
        "camera_optical",
        -1.5,
    )

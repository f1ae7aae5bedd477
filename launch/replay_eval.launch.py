"""Replay a bag into the apr_localizer node on simulated time (full ROS 2 installs with rosbag2).

    ros2 launch apr_localizer replay_eval.launch.py bag:=/data/run1 model:=/path/model.safetensors \
        image_topic:=/camera/image_raw rate:=1.0

Starts the lifecycle node with ``use_sim_time:=true`` (it configures and activates itself, parameter ``autostart``)
and, once it reports the ``active`` state, ``ros2 bag play --clock BAG --rate RATE`` so that no frame is played
before the model is loaded. The node publishes ``~/pose`` and ``~/pose_with_covariance`` (calibrated σ² with a
calibrated model; gated frames publish nothing) stamped with the recorded image stamps, by default the camera's pose
(``output_pose camera``: no base ← camera extrinsic needed) and no TF (``publish_tf`` is off by default); record
them with ``ros2 bag record`` or compare against the bag's ground truth with ``evo``. Environments without rosbag2
(the PyPI wheels) use ``apr-eval-bag live`` instead, which plays the bag itself and computes accuracy and latency.

Arguments: ``bag`` (required), ``model`` (overrides ``model.path``), ``params_file`` (default: the installed
config/localizer.yaml), ``rate`` (playback speed factor), ``image_topic`` (overrides the file's value when not empty),
``output_pose`` (default ``camera``: the pose the bag's ground truth describes), ``log_level``. Set
``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` when the replay must stay on this machine.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction, RegisterEventHandler
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition

PACKAGE = "apr_localizer"
EXECUTABLE = "localizer_node"
NODE_NAME = "apr_localizer"


def _actions(context, *args, **kwargs):
    """Build the node (with the overrides whose arguments are set) and the bag player started on ``active``."""
    bag = LaunchConfiguration("bag").perform(context)
    if not bag:
        raise RuntimeError("launch argument bag is required: bag:=/path/to/rosbag2_directory")
    overrides = {"use_sim_time": True, "autostart": True}
    model = LaunchConfiguration("model").perform(context)
    if model:
        overrides["model.path"] = model
    image_topic = LaunchConfiguration("image_topic").perform(context)
    if image_topic:
        overrides["image_topic"] = image_topic
    output_pose = LaunchConfiguration("output_pose").perform(context)
    if output_pose:
        overrides["output_pose"] = output_pose
    node = LifecycleNode(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace="",
        parameters=[LaunchConfiguration("params_file").perform(context), overrides],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level").perform(context)],
        output="screen",
        emulate_tty=True,
    )
    play = ExecuteProcess(
        cmd=["ros2", "bag", "play", bag, "--clock", "--rate", LaunchConfiguration("rate").perform(context)],
        output="screen",
    )
    start_play = RegisterEventHandler(
        OnStateTransition(target_lifecycle_node=node, goal_state="active", entities=[play])
    )
    return [node, start_play]


def generate_launch_description():
    """Declare the arguments, the node and the bag player."""
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "localizer.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument("bag", description="rosbag2 directory (or .mcap file) to replay."),
            DeclareLaunchArgument("model", default_value="", description="Model file (.safetensors or .pth)."),
            DeclareLaunchArgument("params_file", default_value=default_params, description="Node parameters."),
            DeclareLaunchArgument("rate", default_value="1.0", description="Playback speed factor."),
            DeclareLaunchArgument("image_topic", default_value="", description="Image topic; empty = from file."),
            DeclareLaunchArgument(
                "output_pose",
                default_value="camera",
                description="camera (compare with camera ground truth, as apr-eval-bag live does) or base "
                "(needs the base <- camera extrinsic in the bag's /tf_static); empty = from the parameter file.",
            ),
            DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error."),
            OpaqueFunction(function=_actions),
        ]
    )

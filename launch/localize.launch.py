"""Launch the apr_localizer lifecycle node.

    ros2 launch apr_localizer localize.launch.py model:=/path/to/model.safetensors image_topic:=/camera/image_raw

Arguments: ``model`` (overrides ``model.path``), ``params_file`` (default: the installed config/localizer.yaml),
``image_topic`` (overrides the file's value when not empty), ``namespace``, ``use_sim_time``, ``log_level``.
The node configures and activates itself (parameter ``autostart``, true in the default file); with
``autostart: false`` a lifecycle manager drives it through ``/<namespace>/apr_localizer/change_state``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

PACKAGE = "apr_localizer"
EXECUTABLE = "localizer_node"


def _node(context, *args, **kwargs):
    """Build the node with only the overrides whose launch arguments are set."""
    params_file = LaunchConfiguration("params_file").perform(context)
    overrides = {"use_sim_time": LaunchConfiguration("use_sim_time").perform(context).lower() in ("true", "1")}
    model = LaunchConfiguration("model").perform(context)
    if model:
        overrides["model.path"] = model
    image_topic = LaunchConfiguration("image_topic").perform(context)
    if image_topic:
        overrides["image_topic"] = image_topic
    return [
        LifecycleNode(
            package=PACKAGE,
            executable=EXECUTABLE,
            name="apr_localizer",
            namespace=LaunchConfiguration("namespace").perform(context),
            parameters=[params_file, overrides],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level").perform(context)],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description():
    """Declare the arguments and the node."""
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "localizer.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument("model", default_value="", description="Model file (.safetensors or .pth)."),
            DeclareLaunchArgument("params_file", default_value=default_params, description="Node parameters."),
            DeclareLaunchArgument("image_topic", default_value="", description="Image topic; empty = from file."),
            DeclareLaunchArgument("namespace", default_value="", description="Node namespace."),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay)."),
            DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error."),
            OpaqueFunction(function=_node),
        ]
    )

"""Launch the apr_localizer lifecycle node (and optionally RViz2).

    ros2 launch apr_localizer localize.launch.py model:=/path/to/model.safetensors image_topic:=camera/image_raw
    ros2 launch apr_localizer localize.launch.py model:=... publish_tf:=true tf_mode:=map_to_odom rviz:=true
    ros2 launch apr_localizer localize.launch.py model:=... managed:=true   # under nav2_lifecycle_manager

Arguments (empty = keep the params file's value): ``model``, ``params_file`` (default: the installed
config/localizer.yaml), ``image_topic``, ``namespace``, ``map_frame``, ``odom_frame``, ``base_frame``,
``output_pose`` (base | camera), ``publish_tf`` (true | false), ``tf_mode``, ``qos`` (sensor_data | reliable),
``use_sim_time``, ``log_level``, ``managed`` (true: ``autostart`` off, a lifecycle manager drives the node through
``<namespace>/apr_localizer/change_state``; give the manager ``bond_timeout: 0.0``, the node has no bond),
``rviz`` (true: also start RViz2 with ``rviz_config``, default the installed rviz/localizer.rviz).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

PACKAGE = "apr_localizer"
EXECUTABLE = "localizer_node"
# launch argument -> node parameter, forwarded only when the argument is not empty
STRING_OVERRIDES = {
    "model": "model.path",
    "image_topic": "image_topic",
    "map_frame": "map_frame",
    "odom_frame": "odom_frame",
    "base_frame": "base_frame",
    "output_pose": "output_pose",
    "tf_mode": "tf_mode",
    "qos": "qos",
}


def _flag(context, name: str) -> bool:
    return LaunchConfiguration(name).perform(context).strip().lower() in ("true", "1", "yes")


def _actions(context, *args, **kwargs):
    """Build the node (and RViz2) with only the overrides whose launch arguments are set."""
    params_file = LaunchConfiguration("params_file").perform(context)
    overrides = {"use_sim_time": _flag(context, "use_sim_time")}
    for argument, parameter in STRING_OVERRIDES.items():
        value = LaunchConfiguration(argument).perform(context)
        if value:
            overrides[parameter] = value
    publish_tf = LaunchConfiguration("publish_tf").perform(context)
    if publish_tf:
        overrides["publish_tf"] = publish_tf.strip().lower() in ("true", "1", "yes")
    if _flag(context, "managed"):
        overrides["autostart"] = False
    namespace = LaunchConfiguration("namespace").perform(context)
    actions = [
        LifecycleNode(
            package=PACKAGE,
            executable=EXECUTABLE,
            name="apr_localizer",
            namespace=namespace,
            parameters=[params_file, overrides],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level").perform(context)],
            output="screen",
            emulate_tty=True,
        )
    ]
    if _flag(context, "rviz"):
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="apr_localizer_rviz",
                namespace=namespace,
                arguments=["-d", LaunchConfiguration("rviz_config").perform(context)],
                parameters=[{"use_sim_time": overrides["use_sim_time"]}],
                output="screen",
            )
        )
    return actions


def generate_launch_description():
    """Declare the arguments, the node and the optional RViz2."""
    share = get_package_share_directory(PACKAGE)
    default_params = os.path.join(share, "config", "localizer.yaml")
    default_rviz = os.path.join(share, "rviz", "localizer.rviz")
    return LaunchDescription(
        [
            DeclareLaunchArgument("model", default_value="", description="Model file (.safetensors or .pth)."),
            DeclareLaunchArgument("params_file", default_value=default_params, description="Node parameters."),
            DeclareLaunchArgument("image_topic", default_value="", description="Image topic; empty = from file."),
            DeclareLaunchArgument("namespace", default_value="", description="Node namespace."),
            DeclareLaunchArgument("map_frame", default_value="", description="Map frame; empty = from file."),
            DeclareLaunchArgument("odom_frame", default_value="", description="Odometry frame; empty = from file."),
            DeclareLaunchArgument("base_frame", default_value="", description="Robot base frame; empty = from file."),
            DeclareLaunchArgument("output_pose", default_value="", description="base or camera; empty = from file."),
            DeclareLaunchArgument("publish_tf", default_value="", description="true/false; empty = from file."),
            DeclareLaunchArgument("tf_mode", default_value="", description="map_to_odom, map_to_base, map_to_camera."),
            DeclareLaunchArgument("qos", default_value="", description="sensor_data or reliable; empty = from file."),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay)."),
            DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error."),
            DeclareLaunchArgument("managed", default_value="false", description="true: a lifecycle manager starts it."),
            DeclareLaunchArgument("rviz", default_value="false", description="true: also open RViz2."),
            DeclareLaunchArgument("rviz_config", default_value=default_rviz, description="RViz2 config file."),
            OpaqueFunction(function=_actions),
        ]
    )

"""Launch the blockpilot planner as a managed (lifecycle) node; launch drives its transitions.

    ros2 launch blockpilot_ros planner.launch.py params_file:=/path/to/planner.yaml
    ros2 launch blockpilot_ros planner.launch.py bag:=/data/drive_0001 rate:=1.0 record_out:=/data/run_0001

Arguments:
  params_file  ROS 2 params file of the planner (default: this package's config/planner.yaml)
  namespace    namespace of the nodes (default: none)
  autostart    true: emit *configure*, then *activate* once configuring has ended in *inactive*;
               false: leave the node unconfigured for a lifecycle manager (default: true)
  bag          optional rosbag2 to replay into the planner (camera, odometry, route command), played
               once the planner has subscribed to them
  rate         replay speed (default: 1.0)
  record_out   optional rosbag2 directory to record the planner's outputs and the odometry into
               (score it with `blockpilot ros score --recorded RECORD_OUT --source BAG`)

The node process starts with ``--no-autostart`` so that only launch (or a lifecycle manager) moves it.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

PACKAGE = "blockpilot_ros"
NODE_NAME = "blockpilot_planner"  # the section name in the params file
REPLAYED_TOPICS = ["/camera/front/image_raw/compressed", "/odom", "/route_command"]


def _is_set(name: str) -> IfCondition:
    return IfCondition(PythonExpression(["'", LaunchConfiguration(name), "' != ''"]))


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "planner.yaml")
    arguments = [
        DeclareLaunchArgument("params_file", default_value=default_params, description="planner params YAML"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the nodes"),
        DeclareLaunchArgument("autostart", default_value="true", description="configure and activate at start"),
        DeclareLaunchArgument("bag", default_value="", description="rosbag2 to replay into the planner"),
        DeclareLaunchArgument("rate", default_value="1.0", description="replay speed"),
        DeclareLaunchArgument("record_out", default_value="", description="rosbag2 to record the outputs into"),
    ]
    namespace = LaunchConfiguration("namespace")
    planner = LifecycleNode(
        package=PACKAGE, executable="planner_node", name=NODE_NAME, namespace=namespace, output="screen",
        arguments=["--params", LaunchConfiguration("params_file"), "--no-autostart"])
    configure = EmitEvent(
        event=ChangeState(lifecycle_node_matcher=matches_action(planner),
                          transition_id=Transition.TRANSITION_CONFIGURE),
        condition=IfCondition(LaunchConfiguration("autostart")))
    # Only the inactive state reached by configuring leads on to activate: a later deactivate stays put.
    activate = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=planner, start_state="configuring", goal_state="inactive",
            entities=[
                LogInfo(msg="blockpilot planner configured; activating"),
                EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(planner),
                                            transition_id=Transition.TRANSITION_ACTIVATE)),
            ]),
        condition=IfCondition(LaunchConfiguration("autostart")))
    recorder = Node(
        package=PACKAGE, executable="recorder_node", name="blockpilot_recorder", namespace=namespace,
        output="screen", arguments=["--out", LaunchConfiguration("record_out")], condition=_is_set("record_out"))
    replay = Node(
        package=PACKAGE, executable="replay_node", name="blockpilot_replay", namespace=namespace, output="screen",
        arguments=[LaunchConfiguration("bag"), "--rate", LaunchConfiguration("rate"), "--topics", *REPLAYED_TOPICS,
                   "--wait-for-subscribers", "1", "--wait-timeout", "300", "--delay", "1.0"],
        condition=_is_set("bag"))
    return LaunchDescription([*arguments, planner, activate, configure, recorder, replay])

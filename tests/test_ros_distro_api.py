"""The package uses only rclpy and message APIs that ROS 2 Humble (rclpy 3.3, JetPack 6) provides.

Humble has no wheel on the package index, so its API is a list kept in the repository:
``tests/data/humble_rclpy_api.json`` (written by ``scripts/extract_rclpy_api.py`` from the ``humble``
branch of github.com/ros2/rclpy at the commit it names) and ``tests/data/humble_ros_interfaces.json``
(``scripts/extract_ros_interfaces.py``: the messages and services of ros2/common_interfaces and
ros2/rcl_interfaces at their ``humble`` commits). Every module of ``blockpilot``
is checked statically against it (``tests/rclpy_api_check.py``); only the compatibility module
``blockpilot/ros_nodes/rclpy_compat.py`` may use a newer API, and only one it tests for with
``hasattr``/``getattr``. Jazzy and the current release run the ROS tests themselves
(``scripts/test_ros_jazzy.sh``, CI).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from rclpy_api_check import UNANNOTATED_RETURNS, check_source, load_api

ROOT = Path(__file__).resolve().parents[1]
COMPAT = ROOT / "blockpilot" / "ros_nodes" / "rclpy_compat.py"


@pytest.fixture(scope="module")
def humble() -> dict:
    return load_api("humble")


def _rclpy_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "blockpilot").rglob("*.py") if "rclpy" in p.read_text())


def test_the_list_names_its_source(humble: dict) -> None:
    assert humble["label"].startswith("Humble (rclpy 3.3.")
    assert humble["classes"]["nav_msgs.msg.Odometry"]["field_types"]["header"] == "std_msgs.msg.Header"
    source = humble["source"]
    assert source["repository"] == "https://github.com/ros2/rclpy"
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert source["rclpy_version"].startswith("3.3.")  # Humble's rclpy line
    # what the nodes lean on is in it (so a truncated list cannot pass the check by accident)
    node = humble["classes"]["rclpy.node.Node"]["attributes"]
    assert {"create_subscription", "declare_parameter", "add_on_set_parameters_callback"} <= set(node)
    assert humble["modules"]["rclpy.lifecycle"]["LifecycleNode"] == "rclpy.lifecycle.node.LifecycleNode"
    for cls in UNANNOTATED_RETURNS.values():
        assert cls in humble["classes"]


def test_every_module_uses_only_humble_rclpy(humble: dict) -> None:
    modules = _rclpy_modules()
    assert {p.name for p in modules} >= {"planner_node.py", "replay_node.py", "recorder_node.py"}
    problems = []
    for path in modules:
        rel = str(path.relative_to(ROOT))
        problems += check_source(path.read_text(), rel, humble, allow_feature_checked=path == COMPAT)
    assert not problems, "rclpy API outside Humble (route it through ros_nodes/rclpy_compat.py):\n" + \
        "\n".join(problems)


def test_compat_module_is_small_and_feature_checks() -> None:
    source = COMPAT.read_text()
    assert len(source.splitlines()) < 120
    tree = ast.parse(source)
    assert not any(isinstance(n, ast.Compare) and "version" in ast.unparse(n).lower() for n in ast.walk(tree)), \
        "pick by feature (hasattr), not by version number"
    assert "hasattr" in source


POST_SET = '''
from rclpy.node import Node

class Talker(Node):
    def __init__(self):
        super().__init__("talker")
        self.add_on_set_parameters_callback(self.check)
        self.add_post_set_parameters_callback(self.apply)

    def check(self, parameters):
        return None

    def apply(self, parameters):
        pass
'''


@pytest.mark.parametrize(("source", "expected"), [
    (POST_SET, "rclpy.node.Node.add_post_set_parameters_callback: not in Humble"),
    ("from std_msgs.msg import Header\nh = Header(frame_id='a', seq=3)\n",  # seq left with ROS 1
     "std_msgs.msg.Header(): no keyword 'seq'"),
    ("from nav_msgs.msg import Odometry\ndef f(m: Odometry):\n    return m.header.stamp.nanosec + m.header.seq\n",
     "std_msgs.msg.Header.seq: not in Humble"),
    ("from lifecycle_msgs.srv import ChangeState\nChangeState.Event\n",  # service events came with Iron
     "lifecycle_msgs.srv.ChangeState.Event: not in Humble"),
    ("from vision_msgs.msg import Detection2D\n", "from vision_msgs.msg import ...: no such module in Humble"),
    ("import rclpy\nrclpy.init(args=[], domain_id=0, context_options=None)\n",
     "rclpy.init: no keyword 'context_options'"),
    ("from rclpy.executors import SingleThreadedExecutor\nex = SingleThreadedExecutor()\nex.spin_forever()\n",
     "rclpy.executors.SingleThreadedExecutor.spin_forever: not in Humble"),
    ("from rclpy.event_handler import SubscriptionEventCallbacks\n",  # Iron renamed qos_event
     "from rclpy.event_handler import ...: no such module in Humble"),
    ("from rclpy.qos import QoSProfile, HistoryPolicy\nq = QoSProfile(depth=1)\nh = HistoryPolicy.KEEP_NEWEST\n",
     "rclpy.qos.HistoryPolicy.KEEP_NEWEST: not in Humble"),
    ("from rclpy.lifecycle import LifecycleNode\nclass N(LifecycleNode):\n    def go(self):\n"
     "        self.get_clock().now().to_nanoseconds()\n",
     "rclpy.time.Time.to_nanoseconds: not in Humble"),
    ("import rclpy\ndef f(node: 'rclpy.node.Node'):\n    node.get_logger().warn_once('x')\n",
     "rclpy.impl.rcutils_logger.RcutilsLogger.warn_once: not in Humble"),
])
def test_the_check_finds_what_humble_lacks(humble: dict, source: str, expected: str) -> None:
    problems = check_source(source, "snippet.py", humble)
    assert any(expected in p for p in problems), problems


def test_the_check_passes_what_humble_has(humble: dict) -> None:
    source = ('import rclpy\nfrom rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn\n'
              'from rclpy.parameter import Parameter\n'
              'class N(LifecycleNode):\n    def on_configure(self, state):\n'
              '        self.declare_parameter("t", Parameter.Type.STRING_ARRAY)\n'
              '        self.get_logger().warning("x", throttle_duration_sec=1.0)\n'
              '        self.create_subscription(int, "t", print, 10, raw=True)\n'
              '        return TransitionCallbackReturn.SUCCESS\n'
              'rclpy.try_shutdown()\n')
    assert check_source(source, "snippet.py", humble) == []


def test_a_feature_checked_name_passes_only_in_the_compat_module(humble: dict) -> None:
    source = POST_SET + "        if hasattr(self, 'add_post_set_parameters_callback'):\n            return\n"
    assert check_source(source, "compat.py", humble, allow_feature_checked=True) == []
    assert check_source(source, "other.py", humble)

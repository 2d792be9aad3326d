"""The rclpy differences between ROS 2 Humble (rclpy 3.3, JetPack 6), Jazzy (7.1, JetPack 7) and the current
release, each picked by a feature check (never by version number).

Every other module of the package uses only what Humble's rclpy provides; ``tests/test_ros_distro_api.py``
holds them to the list of Humble's API in ``tests/data/humble_rclpy_api.json``. A newer API goes here,
behind ``hasattr``, with the Humble way beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node

# rclpy gained post-set parameter callbacks in Iron (ros2/rclpy#966); Humble has only on-set callbacks.
HAS_POST_SET_PARAMETERS_CALLBACK = hasattr(Node, "add_post_set_parameters_callback")

ParametersCheck = Callable[[list[Any]], SetParametersResult]
ParametersApply = Callable[[list[Any]], None]


def add_parameters_callbacks(node: Node, check: ParametersCheck, apply: ParametersApply) -> None:
    """``check(parameters)`` accepts or refuses a change; ``apply(parameters)`` runs once it is accepted.

    Since Iron ``apply`` is a post-set callback. On Humble it runs inside the on-set callback right
    after ``check`` accepted, before rclpy stores the values; so ``apply`` must take the new values
    from its ``parameters`` argument, not from ``node.get_parameter``, and then it behaves the same on both.
    """
    if HAS_POST_SET_PARAMETERS_CALLBACK:
        node.add_on_set_parameters_callback(check)
        node.add_post_set_parameters_callback(apply)
        return

    def check_then_apply(parameters: list[Any]) -> SetParametersResult:
        result = check(parameters)
        if result.successful:
            apply(parameters)
        return result

    node.add_on_set_parameters_callback(check_then_apply)

"""The planner node's parameter handling behaves the same on the Humble route of ``rclpy_compat`` (one
on-set callback that checks, then applies) as on the post-set route of Iron and later.

The Humble route runs here on the current rclpy with ``add_post_set_parameters_callback`` taken away
from the node class, so a direct call to it would fail the test. Each case runs in a loopback-only
network namespace (ros_harness), in-process: parameters go through ``Node.set_parameters`` and
``set_parameters_atomically``, which run the same callbacks as the parameter services.
"""

from __future__ import annotations

from typing import Any

import pytest
from ros_harness import run_in_loopback


def scenario_parameter_route(post_set: bool) -> dict[str, Any]:
    import rclpy
    from rclpy.parameter import Parameter

    from blockpilot.ros_nodes import planner_node, rclpy_compat

    node_class: Any = planner_node.PlannerNode
    if not post_set:
        def missing(*_: Any, **__: Any) -> None:
            raise AttributeError("add_post_set_parameters_callback: not in Humble's rclpy")

        rclpy_compat.HAS_POST_SET_PARAMETERS_CALLBACK = False
        node_class = type("HumblePlannerNode", (node_class,), {"add_post_set_parameters_callback": missing})
    rclpy.init()
    try:
        node = node_class(planner_node.PlannerParams(deadline_ms=400.0))
        out: dict[str, Any] = {"start": node.params.deadline_ms}
        steps: dict[str, list[Any]] = {
            "good": [Parameter("deadline_ms", value=900.0)],
            "negative": [Parameter("deadline_ms", value=-5.0)],
            "wrong_type": [Parameter("deadline_ms", value="fast")],
            "frame": [Parameter("output_frame", value="map")],
            "bad_kind": [Parameter("output_kind", value="bogus")],
        }
        for name, params in steps.items():
            result = node.set_parameters(params)[0]
            out[name] = {"ok": bool(result.successful), "deadline_ms": node.params.deadline_ms,
                         "declared": node.get_parameter("deadline_ms").value,
                         "output_frame": node.params.output_frame, "output_kind": node.params.output_kind}
        # atomically: the pair is refused together (a bundle and a checkpoint backend), nothing applied
        pair = node.set_parameters_atomically([Parameter("bundle", value="/some/bundle"),
                                               Parameter("backend", value="torch")])
        out["pair"] = {"ok": bool(pair.successful), "bundle": node.params.bundle,
                       "declared": node.get_parameter("bundle").value}
        both = node.set_parameters_atomically([Parameter("deadline_ms", value=250.0),
                                               Parameter("max_odom_age_ms", value=120.0)])
        out["both"] = {"ok": bool(both.successful), "deadline_ms": node.params.deadline_ms,
                       "max_odom_age_ms": node.params.max_odom_age_ms}
        out["matches_declared"] = node.params == node._read_params()
        node.destroy_node()
        return out
    finally:
        rclpy.try_shutdown()


@pytest.fixture(scope="module")
def routes() -> dict[bool, dict[str, Any]]:
    return {post_set: run_in_loopback(scenario_parameter_route, post_set=post_set) for post_set in (True, False)}


def test_the_humble_route_behaves_as_the_post_set_route(routes: dict[bool, dict[str, Any]]) -> None:
    assert routes[False] == routes[True]


@pytest.mark.parametrize("post_set", [True, False], ids=["post_set", "humble"])
def test_accepted_changes_apply_and_refused_ones_do_not(routes: dict[bool, dict[str, Any]], post_set: bool) -> None:
    out = routes[post_set]
    assert out["start"] == 400.0
    assert out["good"] == {"ok": True, "deadline_ms": 900.0, "declared": 900.0, "output_frame": "base_link",
                           "output_kind": "path"}
    for refused in ("negative", "wrong_type"):
        assert out[refused]["ok"] is False
        assert out[refused]["deadline_ms"] == out[refused]["declared"] == 900.0
    assert out["frame"]["ok"] is True and out["frame"]["output_frame"] == "map"
    assert out["bad_kind"]["ok"] is False and out["bad_kind"]["output_kind"] == "path"
    assert out["pair"] == {"ok": False, "bundle": "", "declared": ""}
    assert out["both"] == {"ok": True, "deadline_ms": 250.0, "max_odom_age_ms": 120.0}
    assert out["matches_declared"] is True

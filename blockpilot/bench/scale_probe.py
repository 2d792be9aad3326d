"""The stages of ``blockpilot bench scale`` that are not a ``blockpilot`` command, each run as
``python -m blockpilot.bench.scale_probe STAGE ...`` in a fresh process; the last stdout line is
``SCALE_RESULT {json}`` with what the stage measured.

- ``write SHAPE OUT``: the random-weight checkpoint (and a two-sample nuScenes dataroot for ``eval``);
- ``load CHECKPOINT [--dtype auto]``: the model as the torch backend loads it (auto: in the checkpoint's dtype);
- ``plan MODEL --backend torch|onnxruntime --steps N [--dtype auto]``: a plan through the Planner (the real decoder
  loop, scaffold decoder) on a checkpoint (torch) or a bundle (ONNX Runtime), a camera frame for a VLA, stopped
  after N block steps; prefill and per-step times are reported;
- ``ros MODEL``: the ROS 2 planner node constructed and taken through its ``configure`` transition (run
  inside a loopback-only network namespace by the runner).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BlockpilotError
from ..vla.dtypes import add_dtype_option

RESULT_PREFIX = "SCALE_RESULT "


def _emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _write(shape_name: str, out: Path, dataroot: Path | None) -> dict[str, Any]:
    from .scale_shapes import SCALE_SHAPES, write_checkpoint

    written = write_checkpoint(SCALE_SHAPES[shape_name], out)
    result: dict[str, Any] = {"parameters": written.parameters, "weight_bytes": written.weight_bytes,
                              "shards": written.shards}
    if dataroot is not None:
        from ..sim.generator import generate_scene
        from ..sim.writers.nuscenes import write_nuscenes

        write_nuscenes([generate_scene(7)], dataroot)
        result["dataroot"] = str(dataroot)
    return result


def _load(checkpoint: Path, dtype: str) -> dict[str, Any]:
    from ..vla.loader import load_model

    t0 = time.perf_counter()
    model = load_model(checkpoint, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {"load_s": time.perf_counter() - t0, "parameters": params, "dtypes": dtypes}


def _observation(config: Any) -> Any:
    import numpy as np

    from ..runtime.plan_types import Observation
    from ..vla.prompt import ROUTE_COMMANDS, EgoState

    vision = config.vision
    side = vision.window_size if vision is not None else 0
    images = [np.full((side, side, 3), 127, np.uint8)] if vision is not None else []
    ego = EgoState(past_waypoints=np.array([[-7.5, 0.0], [-5.0, 0.0], [-2.5, 0.0], [0.0, 0.0]]), speed_mps=5.0,
                   accel_mps2=0.0)
    return Observation(images=images, ego=ego, route_command=ROUTE_COMMANDS[1])


class _Budget(BlockpilotError):
    """Raised by the counting wrapper once the plan has made its budget of block steps."""


def _plan(model: Path, backend: str, steps: int, dtype: str = "auto") -> dict[str, Any]:
    """One plan through the Planner's real decoder loop (scaffold decoder), stopped after ``steps`` block steps
    (0: the whole plan): random weights make the step count of a whole plan arbitrary, so a fixed budget is timed."""
    from ..runtime.plan_types import DecoderSettings
    from ..runtime.sources import open_planner

    t0 = time.perf_counter()
    planner = open_planner(model, backend=backend, decoder=DecoderSettings(name="scaffold"), device="cpu",
                           dtype=dtype, kinds=("checkpoint", "bundle"))
    setup_s = time.perf_counter() - t0
    real_prefill, real_step = planner.backend.prefill, planner.backend.step
    times: dict[str, list[float]] = {"prefill": [], "step": []}

    def prefill(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = real_prefill(*args, **kwargs)
        times["prefill"].append(time.perf_counter() - t)
        return out

    def step(*args: Any, **kwargs: Any) -> Any:
        if steps and len(times["step"]) >= steps:
            raise _Budget
        t = time.perf_counter()
        out = real_step(*args, **kwargs)
        times["step"].append(time.perf_counter() - t)
        return out

    planner.backend.prefill, planner.backend.step = prefill, step  # type: ignore[method-assign]
    t0 = time.perf_counter()
    parsed: bool | None = None
    with contextlib.suppress(_Budget):
        parsed = planner.plan(_observation(planner.config)).ok
    done = len(times["step"])
    return {"setup_s": setup_s, "plan_s": time.perf_counter() - t0, "prefill_s": sum(times["prefill"]),
            "steps": done, "s_per_step": sum(times["step"]) / done if done else None,
            "whole_plan": parsed is not None, "parsed": parsed, "dtype": getattr(planner.backend, "dtype", None)}


def _ros(model: Path, is_bundle: bool) -> dict[str, Any]:
    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn

    from ..ros_nodes.params import PlannerParams
    from ..ros_nodes.planner_node import PlannerNode

    params = PlannerParams(bundle=str(model)) if is_bundle else PlannerParams(checkpoint=str(model))
    rclpy.init()
    try:
        node = PlannerNode(params)
        t0 = time.perf_counter()
        outcome = node.trigger_configure()
        configure_s = time.perf_counter() - t0
        if outcome == TransitionCallbackReturn.SUCCESS:
            node.trigger_cleanup()
        node.destroy_node()
    finally:
        rclpy.shutdown()
    if outcome != TransitionCallbackReturn.SUCCESS:
        raise RuntimeError(f"the planner node's configure returned {outcome.name} (its log above says why)")
    return {"configure_s": configure_s, "outcome": outcome.name}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockpilot.bench.scale_probe")
    sub = parser.add_subparsers(dest="stage", required=True)
    w = sub.add_parser("write")
    w.add_argument("shape")
    w.add_argument("out")
    w.add_argument("--dataroot", default=None)
    ld = sub.add_parser("load")
    ld.add_argument("checkpoint")
    p = sub.add_parser("plan")
    p.add_argument("model")
    for each in (ld, p):
        add_dtype_option(each)  # a bundle (onnxruntime) runs in its exported dtype
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--steps", type=int, default=8, help="block steps to time (0: the whole plan)")
    r = sub.add_parser("ros")
    r.add_argument("model")
    r.add_argument("--bundle", action="store_true")
    args = parser.parse_args(argv)
    if args.stage == "write":
        result = _write(args.shape, Path(args.out), Path(args.dataroot) if args.dataroot else None)
    elif args.stage == "load":
        result = _load(Path(args.checkpoint), args.dtype)
    elif args.stage == "plan":
        result = _plan(Path(args.model), args.backend, args.steps, args.dtype)
    else:
        result = _ros(Path(args.model), args.bundle)
    _emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

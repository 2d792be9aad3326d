"""``blockpilot eval ... --ray [ADDRESS]``: the options and :class:`RaySession`, which the replay
(:mod:`.cli`) and the closed loops (:mod:`.robot_closed_loop_cli`, :mod:`.drive_closed_loop_cli`) enter in place of
opening their planner. The planning happens on the workers of :class:`~.ray_pool.RayPlannerPool`; the command itself
(the driver) writes ``results.jsonl`` in the single-process run's order and the report, exactly as without Ray.
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import Any

from ..cli_common import positive_int
from .ray_pool import (
    LOCAL,
    RayError,
    RayPlannerPool,
    connect,
    default_workers,
    episode_mapper,
    replay_mapper,
    require_ray,
    robot_replay_mapper,
)
from .ray_worker import WorkerSpec


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray (pip install 'blockpilot[ray]')")
    group.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                       help="shard the replay samples or closed-loop episodes over Ray workers, one planner each: a "
                            "local cluster (no ADDRESS) or the cluster at ADDRESS (e.g. auto, ray://head:10001)")
    group.add_argument("--ray-workers", type=positive_int, default=None,
                       help="Ray workers (default: one per GPU with --device cuda, else the cluster's CPUs over "
                            "--threads); each plans with --threads threads")


def check_ray_arguments(args: argparse.Namespace) -> None:
    from .replay import EvalUsageError

    if getattr(args, "ray_workers", None) and not getattr(args, "ray", None):
        raise EvalUsageError("--ray-workers applies with --ray")
    if getattr(args, "ray", None):
        require_ray()  # before any work: says how to install it


class RaySession:
    """Ray started (or joined) and a pool of planner workers; ``planner`` stands in for the planner where a command
    states its settings (``settings``, ``schema``, ``backend.dtype``)."""

    def __init__(self, args: argparse.Namespace, found: Any, options: dict[str, Any],
                 errors: tuple[type[BaseException], ...] = ()) -> None:
        threads = getattr(args, "threads", None) or 1
        gpus = str(options.get("device", getattr(args, "device", "cpu"))).startswith("cuda")
        local_cpus = args.ray_workers * threads if args.ray_workers else (os.cpu_count() or 1)
        self.started = connect(args.ray, local_cpus)
        try:
            workers = default_workers(args.ray_workers, threads, gpus)
            options = {k: v for k, v in options.items() if k != "threads"}
            self.pool = RayPlannerPool(WorkerSpec(found, options, threads, errors), workers, gpus=gpus)
            self.planner: Any = None
            if found is not None:
                settings, schema, dtype = self.pool.facts()
                self.planner = SimpleNamespace(settings=settings, schema=schema, backend=SimpleNamespace(dtype=dtype))
        except BaseException:
            self._stop()
            raise

    def replay_mapper(self) -> Any:
        return replay_mapper(self.pool)

    def robot_replay_mapper(self) -> Any:
        return robot_replay_mapper(self.pool)

    def drive_mapper(self, config: Any) -> Any:
        from .drive_closed_loop import failed_record

        return episode_mapper(self.pool, "drive", (config,),
                              lambda job, exc: (failed_record(job[1], job[0], exc), None))

    def robot_mapper(self, names: list[str], config: Any, execute: int | None) -> Any:
        def lost(job: tuple[Any, ...], exc: BaseException) -> Any:
            raise RayError(f"--ray: workers died on every try of {names[job[0]]}/{job[1]} ({exc}); the results "
                           "written so far are kept: run the command again to resume")

        return episode_mapper(self.pool, "robot", (names, config, execute), lost)

    def _stop(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
        if self.started:
            import ray

            ray.shutdown()

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

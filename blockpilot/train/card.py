"""``DATA_CARD.md`` of a trained reference checkpoint: what it saw, how it learned, how to redo it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write


def seed_spec(seeds: Sequence[int]) -> str:
    """``lo:hi`` for a contiguous run, else a comma list (the ``--train-seeds`` syntax)."""
    s = list(seeds)
    if s and s == list(range(s[0], s[0] + len(s))):
        return f"{s[0]}:{s[0] + len(s)}"
    return ",".join(str(x) for x in s)


def write_data_card(path: Path, train_seeds: Sequence[int], eval_seeds: Sequence[int], train_stats: dict[str, Any],
                    eval_stats: dict[str, Any], recipe: dict[str, Any], metrics: dict[str, Any]) -> None:
    objective = recipe["objective"]
    command = (f"blockpilot train-reference --out {path.parent} --steps {metrics['steps']} --batch {metrics['batch']} "
               f"--lr {metrics['lr']} --seed {metrics['seed']} --train-seeds {seed_spec(train_seeds)} "
               f"--eval-seeds {seed_spec(eval_seeds)} --keyframe-stride {train_stats.get('keyframe_stride', 1)} "
               f"--ar-weight {objective['ar_weight']}")
    final = metrics.get("final_eval", {})
    lines = [
        "# Data card: blockpilot reference VLA",
        "",
        "**All data is synthetic.** Scenes come from `blockpilot.sim` (seeded procedural roads, ego and",
        "agent tracks, rendered 112x112 front camera). No real-world driving data, no downloaded model.",
        "This checkpoint exists to exercise the deployment pipeline; it must not drive anything.",
        "",
        "## Data",
        f"- training scenes: seeds `{seed_spec(train_seeds)}` ({train_stats['scenes']} scenes, "
        f"{train_stats['examples']} examples: a keyframe every {0.5 * train_stats.get('keyframe_stride', 1):g} s "
        f"with a full 3 s future; {train_stats['skipped_keyframes']} keyframes skipped, future past the scene end)",
        f"- held-out scenes: seeds `{seed_spec(eval_seeds)}` ({eval_stats['scenes']} scenes, "
        f"{eval_stats['examples']} examples); disjoint from training",
        f"- longitudinal labels (train): {json.dumps(train_stats['longitudinal'])}",
        f"- lateral labels (train): {json.dumps(train_stats['lateral'])}",
        f"- critical-object flags set (train): {json.dumps(train_stats.get('critical_objects', {}))}",
        "- input: front camera, ego past trajectory / speed / acceleration, route command (the planner's prompt)",
        "- labels (rule-based, from scene ground truth): 2 Hz x 3 s future trajectory in the ego frame;",
        "  longitudinal from the speed change over the horizon; lateral from the heading change (lane change:",
        "  a sideways shift off the lane centreline);",
        "  critical objects = vehicles / pedestrians / cyclists near the future path ahead, stop lines ahead;",
        "  explanation = a template sentence built from those facts",
        "",
        "## Recipe",
        f"- block-diffusion adaptation (Fast-dLLM v2 / BD3-LM style), block size {recipe['block_size']}: a clean",
        "  block-causal copy and one noisy copy per view (noisy block i sees clean blocks < i and itself);",
        f"  complementary masks, per-block ratio uniform in {list(objective['mask_ratio'])}; shifted prediction",
        f"- auxiliary causal next-token loss, weight {objective['ar_weight']}",
        f"- section weights {json.dumps(objective['section_weights'])}; null padding x{objective['null_weight']},"
        f" template tokens x{objective['structure_weight']}, end-token tail x{objective['tail_weight']}",
        f"- optimizer: {json.dumps(recipe['optimizer'])}",
        f"- {metrics['steps']} steps x batch {metrics['batch']}, peak lr {metrics['lr']}, seed {metrics['seed']}, "
        f"device {metrics['device']}, {metrics['parameters_m']} M parameters",
        "",
        "## Result",
        f"- final training loss (mean of the last steps): {metrics['final_train_loss']:.4f}",
        f"- held-out: {json.dumps(final)}",
        f"- throughput {metrics['examples_per_second']} examples/s; training {metrics['train_seconds']} s, "
        f"data {metrics['data_seconds']} s",
        "",
        "## Reproduce",
        "```",
        command,
        "```",
        "Runs on the CPU repeat bit for bit for the same seed and torch version; CUDA runs (bf16) do not.",
        "",
    ]
    atomic_write(path, "\n".join(lines))

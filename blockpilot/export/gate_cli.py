"""``blockpilot export --gate-closed-loop EPISODES``: the bundle just written must still drive.

The checkpoint (in float32 on torch; for a quantize output, the checkpoint it was made from) and the new bundle (on
its default backend, ONNX Runtime) drive the same held-out seeds of the synthetic driving world; the export fails
(exit status 1, ``<bundle>-gate/gate.json`` beside the bundle holding the numbers) when the bundle's mean PDMS drops
by more than ``--gate-pdms-bound``. The decision is the quantize gate's (:mod:`blockpilot.quant.gate`); the
bundle stays where it was written, so a failed build can be inspected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..quant.gate import CLOSED_LOOP_DIR, finish_gate, run_closed_loop_gate, with_closed_loop


def gate_dir_for(bundle: Path) -> Path:
    """Where the gate of ``bundle`` writes: a sibling directory (the bundle itself holds only what its manifest
    lists)."""
    return bundle.parent / f"{bundle.name}-gate"


def run_export_gate(args: argparse.Namespace, bundle: Path) -> int:
    """Gate ``bundle`` against ``args.checkpoint`` in the closed loop; 0 when it passed, else
    :class:`~blockpilot.quant.gate.QualityGateError`."""
    from ..eval.drive_closed_loop_cli import drive_config
    from ..eval.replay import driving_schema
    from ..quant.cli import closed_loop_line
    from ..runtime.sources import detect_source, open_planner

    found = detect_source(args.checkpoint, flag="--checkpoint", kinds=("checkpoint", "quantized"))
    checkpoint = found.checkpoint or found.path
    fp32 = open_planner(checkpoint, backend="torch", schema=driving_schema(checkpoint, args.schema),
                        kinds=("checkpoint",), flag="--checkpoint")
    candidate = open_planner(bundle, kinds=("bundle",), flag="--out")
    gate_dir = gate_dir_for(bundle)
    config = drive_config(args.gate_max_steps, flag="--gate-max-steps")
    paired = run_closed_loop_gate(fp32, candidate, gate_dir / CLOSED_LOOP_DIR, episodes=args.gate_closed_loop,
                                  config=config, candidate="bundle",
                                  progress=not (args.quiet or getattr(args, "json", False)))
    result = with_closed_loop(None, paired, pdms_bound=args.gate_pdms_bound, run_dir=gate_dir / CLOSED_LOOP_DIR)
    return finish_gate(result, gate_dir, closed_loop_line(paired, args.gate_pdms_bound),
                       stream=sys.stderr if getattr(args, "json", False) else None)

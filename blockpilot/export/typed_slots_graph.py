"""Typed value slots in the exported ``lm_step`` graph: two inputs with defaults that mask the logits.

``allowed_table`` ``(C, V)`` bool and ``token_class`` ``(1, Tc)`` int64 (``Tc`` = 1 or the window's ``T``):
the graph gathers ``allowed_table[token_class]`` and sets every logit it does not allow to ``-inf`` before the
softmax and the top-1 (a ``Gather`` and a ``Where``), so only ``top1`` / ``prob`` still leave the device.

Both are also initializers of the graph (an ONNX input with a default): ``allowed_table`` defaults to one row
that allows everything and ``token_class`` to ``[[0]]``, which broadcasts over the window. A caller that feeds
neither (an older runtime, a verification script) runs the graph unconstrained, exactly as before. The ONNX
Runtime backend feeds both where the spec records ``typed_slots``. A TensorRT parser would turn defaulted inputs
into constants, so :func:`blockpilot.export.trt_build.build_engine` parses a copy without the defaults of the
inputs it has profiles for (:func:`~blockpilot.export.trt_build.profiles_from_spec` gives both), and the
TensorRT backend feeds them (:mod:`blockpilot.runtime.trt_slots`); engines built before that run unconstrained
and the stats say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..formats.onnx_spec import TYPED_SLOT_INPUTS

TYPED_SLOT_AXES: dict[str, dict[int, str]] = {"allowed_table": {0: "C"}, "token_class": {1: "Tc"}}


def typed_slot_specs(vocab_size: int) -> list[dict[str, Any]]:
    """The spec entries of the two inputs (``default`` marks them optional)."""
    return [{"name": "allowed_table", "shape": ["C", vocab_size], "dtype": "bool", "default": "allow all"},
            {"name": "token_class", "shape": [1, "Tc"], "dtype": "int64", "default": "[[0]]"}]


def add_typed_slot_defaults(path: str | Path, vocab_size: int) -> None:
    """Give the graph at ``path`` default values for its typed-slot inputs (written in place)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    names = {i.name for i in model.graph.input}
    missing = [n for n in TYPED_SLOT_INPUTS if n not in names]
    if missing:
        raise ValueError(f"{path}: the lm_step graph has no input {missing}; export it with the typed-slot inputs")
    have = {t.name for t in model.graph.initializer}
    defaults = {"allowed_table": np.ones((1, vocab_size), dtype=np.bool_),
                "token_class": np.zeros((1, 1), dtype=np.int64)}
    for name, value in defaults.items():
        if name not in have:
            model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.save(model, str(path))

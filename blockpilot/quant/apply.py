"""Run a Model Optimizer config on a model, record what it actually quantized, save and restore it.

:func:`quantize_model` calls ``mtq.quantize`` (switching NVFP4 to the CPU emulation of
:mod:`blockpilot.quant.emulation` when the model is not on CUDA) and reads the precision map back
from the enabled quantizers, so the report says what the model does rather than what the config
asked for. :func:`save_quantized` writes three files; :func:`load_quantized` puts them back onto a
freshly loaded full-precision model of the same checkpoint.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic_io import atomic_open, atomic_write
from ..errors import BlockpilotError
from ..runtime.sources import QUANTIZED_MAP
from .emulation import emulation_active, enable_cpu_nvfp4_emulation

STATE_FILE = "modelopt_state.pth"
WEIGHTS_FILE = "quantized_weights.pth"
MAP_FILE = QUANTIZED_MAP  # how runtime.sources recognises a quantize output
EMULATION_NOTE = "NVFP4 emulated on CPU"

ForwardLoop = Callable[[nn.Module], Any]

_FLOAT_NAMES: dict[tuple[int, ...], str] = {
    (4, 3): "fp8_e4m3", (5, 2): "fp8_e5m2", (2, 1): "fp4_e2m1", (3, 2): "fp6_e3m2", (2, 3): "fp6_e2m3",
}
_MX_NAMES: dict[tuple[int, ...], str] = {(4, 3): "mxfp8", (2, 1): "mxfp4", (3, 2): "mxfp6", (2, 3): "mxfp6_e2m3"}


class QuantizedCheckpointError(BlockpilotError, ValueError):
    """A saved quantized model cannot be restored; the message names the file."""


def _bits(value: Any) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return int(value)


def _float_name(bits: tuple[int, ...]) -> str:
    return "fp_" + "_".join(str(b) for b in bits) if len(bits) != 2 else f"fp{sum(bits) + 1}_e{bits[0]}m{bits[1]}"


def format_label(num_bits: Any, block_sizes: Mapping[Any, Any] | None = None) -> str:
    """A short name for a quantizer format: ``fp8_e4m3``, ``nvfp4``, ``mxfp8``, ``int8``, ``int4`` ...
    (E2M1 with E4M3 block scales over blocks other than NVFP4's 16 reads ``nvfp4_b32`` and so on)."""
    blocks = block_sizes or {}
    bits = _bits(num_bits)
    scale = _bits(blocks.get("scale_bits"))
    if isinstance(bits, tuple):
        if bits == (2, 1) and scale == (4, 3):
            block = blocks.get(-1, blocks.get("-1"))
            return "nvfp4" if block in (None, 16) else f"nvfp4_b{block}"
        if scale == (8, 0):
            return _MX_NAMES.get(bits, "mx" + _float_name(bits))
        return _FLOAT_NAMES.get(bits, _float_name(bits))
    if bits is None:
        return "unknown"
    return f"mxint{bits}" if scale == (8, 0) else f"int{bits}"


def _is_quantizer(module: nn.Module) -> bool:
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    return isinstance(module, (TensorQuantizer, SequentialQuantizer))


def quantizer_label(quantizer: nn.Module) -> str | None:
    """The format of an enabled quantizer (a sequential one joins its stages with ``+``), else ``None``."""
    from modelopt.torch.quantization.nn import SequentialQuantizer

    if isinstance(quantizer, SequentialQuantizer):
        labels = [label for q in quantizer if (label := quantizer_label(q)) is not None]
        return "+".join(labels) or None
    if not getattr(quantizer, "is_enabled", False):
        return None
    return format_label(getattr(quantizer, "num_bits", None), getattr(quantizer, "block_sizes", None))


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(module name, role, quantizer)`` for every quantizer attribute (``weight_quantizer`` -> ``weight``)."""
    for name, module in model.named_modules():
        parent, _, attr = name.rpartition(".")
        if attr.endswith("_quantizer") and _is_quantizer(module):
            yield parent, attr[: -len("_quantizer")], module


def precision_map(model: nn.Module) -> dict[str, dict[str, str]]:
    """Module name -> {role: format} over the quantizers that are enabled (roles: weight, input, output ...)."""
    out: dict[str, dict[str, str]] = {}
    for module, role, quantizer in iter_quantizers(model):
        label = quantizer_label(quantizer)
        if label is not None:
            out.setdefault(module, {})[role] = label
    return out


def has_quantizers(model: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(model))


def _is_nvfp4_cfg(cfg: Mapping[str, Any]) -> bool:
    blocks = cfg.get("block_sizes")
    scale = blocks.get("scale_bits") if isinstance(blocks, Mapping) else None
    return _bits(cfg.get("num_bits")) == (2, 1) and _bits(scale) == (4, 3)


def config_uses_nvfp4(config: Any) -> bool:
    """Whether a modelopt config (list or dict form, nested anywhere) sets an NVFP4 quantizer."""
    if isinstance(config, Mapping):
        if config.get("enable", True) is not False and _is_nvfp4_cfg(config):
            return True
        return any(config_uses_nvfp4(v) for v in config.values())
    if isinstance(config, (list, tuple)):
        return any(config_uses_nvfp4(v) for v in config)
    return False


def model_on_cuda(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, keys as strings and unknown objects as their ``str``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    dump = getattr(value, "model_dump", None)  # pydantic configs
    return jsonable(dump()) if callable(dump) else str(value)


def format_counts(precision: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """Role -> {format: number of modules}."""
    counts: dict[str, Counter[str]] = {}
    for roles in precision.values():
        for role, label in roles.items():
            counts.setdefault(role, Counter())[label] += 1
    return {role: dict(sorted(c.items())) for role, c in sorted(counts.items())}


@dataclass(frozen=True)
class QuantReport:
    """What one quantization run did: the precision map read back from the model and its inputs."""

    precision: dict[str, dict[str, str]]
    config: dict[str, Any]
    emulated: bool
    modelopt_version: str

    @property
    def quantized_modules(self) -> int:
        return len(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modelopt_version": self.modelopt_version,
            "emulated": self.emulated,
            "emulation": EMULATION_NOTE if self.emulated else None,
            "quantized_modules": self.quantized_modules,
            "formats": format_counts(self.precision),
            "precision": jsonable(self.precision),
            "config": jsonable(self.config),
        }


def modelopt_version() -> str:
    import modelopt

    return str(getattr(modelopt, "__version__", "unknown"))


def prepare_emulation(model: nn.Module, config: Any) -> bool:
    """Turn on the CPU NVFP4 emulation when ``config`` needs NVFP4 and the model is not on CUDA."""
    if config_uses_nvfp4(config) and not model_on_cuda(model):
        enable_cpu_nvfp4_emulation()
        return True
    return False


def is_emulated(model: nn.Module, precision: Mapping[str, Mapping[str, str]]) -> bool:
    uses_nvfp4 = any("nvfp4" in label for roles in precision.values() for label in roles.values())
    return uses_nvfp4 and not model_on_cuda(model) and emulation_active()


def quantize_model(model: nn.Module, config: dict[str, Any], forward_loop: ForwardLoop | None) -> QuantReport:
    """``mtq.quantize(model, config, forward_loop)`` in place, then the precision map it produced."""
    import modelopt.torch.quantization as mtq

    prepare_emulation(model, config)
    mtq.quantize(model, config, forward_loop=forward_loop)
    precision = precision_map(model)
    return QuantReport(precision, config, is_emulated(model, precision), modelopt_version())


def save_quantized(model: nn.Module, out_dir: str | Path, report: QuantReport,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``modelopt_state.pth``, ``quantized_weights.pth`` (state dict with the quantizers' amax
    buffers) and ``precision_map.json`` (the report plus ``extra``) into ``out_dir``, each atomically."""
    import modelopt.torch.opt as mto

    out = Path(out_dir)
    info = report.to_dict()
    clash = sorted(set(info) & set(extra or {}))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the report's")
    info.update(jsonable(dict(extra or {})))
    out.mkdir(parents=True, exist_ok=True)
    state = mto.modelopt_state(model)
    with atomic_open(out / STATE_FILE, "wb") as fh:
        torch.save(state, fh)
    weights = model.state_dict()
    with atomic_open(out / WEIGHTS_FILE, "wb") as fh:
        torch.save(weights, fh)
    text = json.dumps(info, indent=2, sort_keys=False) + "\n"
    atomic_write(out / MAP_FILE, text)
    return out


def read_precision_file(out_dir: str | Path) -> dict[str, Any]:
    """The saved ``precision_map.json`` (report and extra), checked to hold a precision map."""
    path = Path(out_dir) / MAP_FILE
    if not path.is_file():
        raise QuantizedCheckpointError(f"{path}: missing (not a quantized model directory?)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizedCheckpointError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("precision"), dict):
        raise QuantizedCheckpointError(f"{path}: holds no 'precision' map")
    return info


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_tensor_file(path: Path, device: torch.device) -> Any:
    if not path.is_file():
        raise QuantizedCheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated zip, foreign pickle or short read all mean "corrupt"
        raise QuantizedCheckpointError(f"{path}: unreadable ({type(exc).__name__}: {_short(exc)})") from exc


def load_quantized(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """Restore a :func:`save_quantized` directory onto ``model``, a freshly loaded full-precision model
    of the same checkpoint; returns the quantized model (the same object, converted in place)."""
    import modelopt.torch.opt as mto

    out = Path(out_dir)
    info = read_precision_file(out)
    for name in (STATE_FILE, WEIGHTS_FILE):
        if not (out / name).is_file():
            raise QuantizedCheckpointError(f"{out / name}: missing")
    if has_quantizers(model):
        raise QuantizedCheckpointError(f"{out / STATE_FILE}: the model already holds quantizers; "
                                       "restore onto a freshly loaded model")
    saved: dict[str, dict[str, str]] = info["precision"]
    if any("nvfp4" in str(label) for roles in saved.values() for label in roles.values()) \
            and not model_on_cuda(model):
        enable_cpu_nvfp4_emulation()
    device = next(model.parameters()).device
    state = _load_tensor_file(out / STATE_FILE, device)
    try:
        model = mto.restore_from_modelopt_state(model, state)
    except Exception as exc:
        raise QuantizedCheckpointError(f"{out / STATE_FILE}: does not restore onto this model "
                                       f"({type(exc).__name__}: {_short(exc)})") from exc
    weights = _load_tensor_file(out / WEIGHTS_FILE, device)
    if not isinstance(weights, dict):
        raise QuantizedCheckpointError(f"{out / WEIGHTS_FILE}: not a state dict")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise QuantizedCheckpointError(f"{out / WEIGHTS_FILE}: does not match the model ({_short(exc)})") from exc
    restored = precision_map(model)
    if restored != saved:
        raise QuantizedCheckpointError(f"{out / MAP_FILE}: the restored model's precision map differs from the "
                                       "saved one")
    return model

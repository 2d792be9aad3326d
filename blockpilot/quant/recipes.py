"""Quantization recipes as data: which format each module of a VLA model gets.

A :class:`Recipe` is an ordered list of :class:`Rule` s (an ``fnmatch`` pattern on module names and
a format name; later rules win) plus the calibration algorithm and an optional FP8 KV cache. It
turns into a Model Optimizer (``modelopt``) list-form ``quant_cfg`` with :meth:`Recipe.modelopt_config`
and into a planned precision map with :meth:`Recipe.assign`. Quantizer settings are read from
modelopt's own preset constants each time they are needed (see :data:`FORMATS`), never retyped, and
always deep-copied so the constants are never mutated.

Every built-in recipe keeps ``lm.lm_head``, ``lm.embed_tokens`` and ``visual.patch_embed.*``
unquantized: the head is tied to the embeddings in small checkpoints and decides every token, and
the patch embedding runs as ``F.linear`` on the Conv3d weight, so its quantizers would never fire.

``kv_cache="fp8"`` puts an FP8 ``output_quantizer`` on every ``*.k_proj`` and ``*.v_proj``. In this
emulation K is quantized before RoPE is applied; deployment engines quantize the cache itself (after
RoPE), so the emulated error is close to, not equal to, the deployed one.

A pattern may hold ``{last}``: the highest layer index found after the pattern's prefix among the
module names given to :meth:`Recipe.modelopt_config` / :meth:`Recipe.assign`, so one recipe fits
models of any depth. modelopt itself is imported only when a config is built.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any

from torch import nn

from ..errors import BlockpilotError

NONE = "none"
AUTO = "auto"  # the precision map's value for a module an auto recipe leaves to the search
LAST = "{last}"
PROTECTED = ("lm.lm_head", "lm.embed_tokens", "visual.patch_embed.*")
KV_PROJECTIONS = ("*.k_proj", "*.v_proj")


class RecipeError(BlockpilotError, ValueError):
    """An unknown recipe, knob or format, or a recipe that cannot be built as asked."""


def _modelopt_constant(name: str) -> dict[str, Any]:
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:  # pragma: no cover - the quant extra is missing
        raise RecipeError("building a modelopt config needs nvidia-modelopt: pip install 'blockpilot[quant]'") from exc
    value = getattr(mtq, name, None)
    if not isinstance(value, dict):
        raise RecipeError(f"modelopt has no preset {name!r}; blockpilot follows nvidia-modelopt 0.47")
    return value


def _preset_cfg(constant: str, quantizer: str) -> dict[str, Any]:
    """A deep copy of the ``cfg`` a modelopt preset gives ``quantizer`` (e.g. ``*weight_quantizer``)."""
    quant_cfg = _modelopt_constant(constant)["quant_cfg"]
    if isinstance(quant_cfg, dict):  # the older dict form: pattern -> attributes
        found = quant_cfg.get(quantizer)
    else:
        found = next((e.get("cfg") for e in quant_cfg if e.get("quantizer_name") == quantizer and "cfg" in e), None)
    if not isinstance(found, dict):
        raise RecipeError(f"modelopt's {constant} has no cfg for {quantizer!r}")
    return copy.deepcopy(found)


@dataclass(frozen=True)
class Format:
    """A weight/activation format; its quantizer cfgs come from the modelopt preset ``preset``."""

    name: str
    effective_bits: float  # storage bits per weight, block scales included
    preset: str | None  # e.g. "FP8_DEFAULT_CFG"; None for unquantized
    algorithm: str
    description: str

    @property
    def weight_cfg(self) -> dict[str, Any] | None:
        return None if self.preset is None else _preset_cfg(self.preset, "*weight_quantizer")

    @property
    def input_cfg(self) -> dict[str, Any] | None:
        return None if self.preset is None else _preset_cfg(self.preset, "*input_quantizer")

    def modelopt_preset(self) -> dict[str, Any]:
        """A deep copy of the whole modelopt preset (what ``mtq.auto_quantize`` takes as a candidate)."""
        if self.preset is None:
            raise RecipeError(f"format {self.name!r} has no modelopt preset")
        return copy.deepcopy(_modelopt_constant(self.preset))


FORMATS: Mapping[str, Format] = MappingProxyType({
    "fp8": Format("fp8", 8.0, "FP8_DEFAULT_CFG", "max", "FP8 e4m3 weights and activations, per-tensor scales"),
    "nvfp4": Format("nvfp4", 4.5, "NVFP4_DEFAULT_CFG", "max",
                    "NVFP4 (e2m1) weights and activations, dynamic blocks of 16 with FP8 scales"),
    # modelopt's W4A8_NVFP4_FP8_CFG uses weight blocks of 32: 4 + 8/32 bits per weight.
    "w4a8": Format("w4a8", 4.25, "W4A8_NVFP4_FP8_CFG", "max",
                   "NVFP4 weights (blocks of 32, FP8 scales), FP8 per-tensor activations"),
    "int8_sq": Format("int8_sq", 8.0, "INT8_SMOOTHQUANT_CFG", "smoothquant",
                      "INT8 weights per output channel, INT8 per-tensor activations, SmoothQuant"),
    NONE: Format(NONE, 16.0, None, "max", "unquantized (FP16/BF16)"),
})
KV_FORMATS: Mapping[str, str] = MappingProxyType({"fp8": "FP8_KV_CFG"})


def _check_format(value: object, what: str, allowed: Iterable[str] = FORMATS) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise RecipeError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
    return value


def _check_kv(value: str | None) -> str | None:
    return None if value in (None, NONE) else _check_format(value, "kv_cache format", KV_FORMATS)


@dataclass(frozen=True)
class Rule:
    """Modules whose name matches ``pattern`` (``fnmatch``, ``*`` spans dots) get ``format``."""

    pattern: str
    format: str

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError(f"a rule needs a non-empty module-name pattern, got {self.pattern!r}")
        _check_format(self.format, f"format in rule {self.pattern!r}")


@dataclass(frozen=True)
class AutoSpec:
    """A per-layer search (``mtq.auto_quantize``) under a weight-bits budget; "none" is always a candidate."""

    effective_bits: float = 6.0
    formats: tuple[str, ...] = ("nvfp4", "fp8")
    excluded: tuple[str, ...] = PROTECTED

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "excluded", tuple(self.excluded))
        if not self.formats:
            raise RecipeError("an auto recipe needs at least one candidate format")
        for name in self.formats:
            _check_format(name, "auto candidate format", [f for f in FORMATS if f != NONE])
        if isinstance(self.effective_bits, bool) or not isinstance(self.effective_bits, (int, float)):
            raise RecipeError(f"auto effective_bits must be a number, got {self.effective_bits!r}")
        lowest = min(FORMATS[f].effective_bits for f in self.formats)
        if not lowest <= self.effective_bits <= 16:
            raise RecipeError(f"auto effective_bits must lie in [{lowest}, 16] for candidates "
                              f"{', '.join(self.formats)}; got {self.effective_bits}")


def _resolve(pattern: str, names: list[str] | None) -> str | None:
    """``pattern`` with ``{last}`` replaced by the highest index found; None when no name has one."""
    if LAST not in pattern:
        return pattern
    if names is None:
        raise RecipeError(f"pattern {pattern!r} needs the model's module names to find its last layer")
    prefix = pattern.split(LAST, 1)[0]
    indices = [int(n[len(prefix):].split(".", 1)[0]) for n in names
               if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()]
    return pattern.replace(LAST, str(max(indices))) if indices else None


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the modules modelopt puts weight quantizers on: ``nn.Linear`` and ``nn.Conv1d/2d/3d``."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def as_module_names(modules: Iterable[str] | nn.Module | None) -> list[str] | None:
    """Module names as given, or a model's quantizable ones (:func:`quantizable_modules`)."""
    if modules is None:
        return None
    return quantizable_modules(modules) if isinstance(modules, nn.Module) else list(modules)


@dataclass(frozen=True)
class Recipe:
    """Ordered rules (later win; unmatched modules stay "none"), the modelopt calibration algorithm,
    an optional KV-cache format, and, for a searched recipe, its :class:`AutoSpec` (then no rules)."""

    name: str
    rules: tuple[Rule, ...]
    algorithm: str = "max"
    kv_cache: str | None = None
    description: str = ""
    auto: AutoSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if not all(isinstance(r, Rule) for r in self.rules):
            raise RecipeError(f"recipe {self.name!r}: rules must be Rule objects")
        object.__setattr__(self, "kv_cache", _check_kv(self.kv_cache))
        if not isinstance(self.algorithm, str) or not self.algorithm:
            raise RecipeError(f"recipe {self.name!r}: algorithm must be a modelopt algorithm name")
        if self.auto is not None and self.rules:
            raise RecipeError(f"auto recipe {self.name!r}: list exclusions in AutoSpec.excluded, not as rules")

    @property
    def formats_used(self) -> tuple[str, ...]:
        """Quantized formats the recipe can give a module or the KV cache ("none" left out), sorted."""
        used = {r.format for r in self.rules} | set(self.auto.formats if self.auto else ())
        if self.kv_cache:
            used.add(self.kv_cache)
        return tuple(sorted(used - {NONE}))

    def _resolved_rules(self, names: list[str] | None) -> list[Rule]:
        out: list[Rule] = []
        for rule in self.rules:
            pattern = _resolve(rule.pattern, names)
            if pattern is not None:
                out.append(Rule(pattern, rule.format))
        return out

    def assign(self, modules: Iterable[str] | nn.Module) -> dict[str, str]:
        """The planned format of each module (last matching rule wins; unmatched: "none").

        Pass module names or a model (then :func:`quantizable_modules` picks the names). In an auto
        recipe, excluded modules map to "none" and all others to ``"auto"`` (the search decides).
        """
        names = as_module_names(modules) or []
        if self.auto is not None:
            return {n: NONE if any(fnmatchcase(n, p) for p in self.auto.excluded) else AUTO for n in names}
        rules = self._resolved_rules(names)
        plan: dict[str, str] = {}
        for n in names:
            plan[n] = next((r.format for r in reversed(rules) if fnmatchcase(n, r.pattern)), NONE)
        return plan

    def kv_cache_entries(self) -> list[dict[str, Any]]:
        """List-form ``quant_cfg`` entries for the KV cache (empty without one)."""
        if self.kv_cache is None:
            return []
        cfg = _preset_cfg(KV_FORMATS[self.kv_cache], "*[kv]_bmm_quantizer")
        return [{"quantizer_name": f"{p}.output_quantizer", "cfg": copy.deepcopy(cfg)} for p in KV_PROJECTIONS]

    def modelopt_config(self, module_names: Iterable[str] | nn.Module | None = None) -> dict[str, Any]:
        """The ``mtq.quantize`` config: disable all, then each rule's quantizers, then the KV cache.

        ``module_names`` (or a model) is needed only by patterns holding ``{last}``.
        """
        if self.auto is not None:
            raise RecipeError(f"recipe {self.name!r} is an auto recipe: give auto_quantize_kwargs() to "
                              "mtq.auto_quantize instead of a fixed config")
        entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
        for rule in self._resolved_rules(as_module_names(module_names)):
            fmt = FORMATS[rule.format]
            for kind, cfg in (("weight", fmt.weight_cfg), ("input", fmt.input_cfg)):
                name = f"{rule.pattern}.{kind}_quantizer"
                entries.append({"quantizer_name": name, "enable": False} if cfg is None
                               else {"quantizer_name": name, "cfg": cfg})
        entries.extend(self.kv_cache_entries())
        return {"quant_cfg": entries, "algorithm": self.algorithm}

    def auto_quantize_kwargs(self) -> dict[str, Any]:
        """``constraints``, ``quantization_formats`` and ``disabled_layers`` for ``mtq.auto_quantize``.

        The KV cache is not part of the search: apply :meth:`kv_cache_entries` afterwards.
        """
        if self.auto is None:
            raise RecipeError(f"recipe {self.name!r} is not an auto recipe; use modelopt_config()")
        return {
            "constraints": {"effective_bits": self.auto.effective_bits},
            "quantization_formats": [FORMATS[f].modelopt_preset() for f in self.auto.formats],
            "disabled_layers": list(self.auto.excluded),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` gives back an equal recipe."""
        auto = None if self.auto is None else {
            "effective_bits": self.auto.effective_bits, "formats": list(self.auto.formats),
            "excluded": list(self.auto.excluded)}
        return {"name": self.name, "rules": [{"pattern": r.pattern, "format": r.format} for r in self.rules],
                "algorithm": self.algorithm, "kv_cache": self.kv_cache, "description": self.description,
                "auto": auto}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        known = {"name", "rules", "algorithm", "kv_cache", "description", "auto"}
        if not isinstance(data, Mapping) or "name" not in data:
            raise RecipeError("a recipe dict needs at least a 'name'")
        if extra := sorted(set(data) - known):
            raise RecipeError(f"unknown recipe field(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
        try:
            rules = tuple(Rule(r["pattern"], r["format"]) for r in data.get("rules", ()))
            raw_auto = data.get("auto")
            auto = None if raw_auto is None else AutoSpec(
                float(raw_auto["effective_bits"]), tuple(raw_auto["formats"]), tuple(raw_auto["excluded"]))
        except (KeyError, TypeError) as exc:
            raise RecipeError(f"malformed recipe dict: {exc!r}") from exc
        return cls(str(data["name"]), rules, data.get("algorithm", "max"), data.get("kv_cache"),
                   data.get("description", ""), auto)


def _protected() -> tuple[Rule, ...]:
    return tuple(Rule(p, NONE) for p in PROTECTED)


def _first_last(fmt: str | None) -> tuple[Rule, ...]:
    if fmt is None:
        return ()
    _check_format(fmt, "first_last_layers format")
    return Rule("lm.layers.0.*", fmt), Rule(f"lm.layers.{LAST}.*", fmt)


_VISION_DEFAULT = {"fp8": "fp8", "nvfp4": "fp8", "w4a8": "fp8", "int8_sq": "int8_sq"}


def _plain(fmt: str, vision: str | None, first_last_layers: str | None, kv_cache: str | None) -> Recipe:
    vision = _check_format(_VISION_DEFAULT[fmt] if vision is None else vision, "vision format")
    rules = (Rule("lm.layers.*", fmt), Rule("visual.*", vision), *_first_last(first_last_layers), *_protected())
    extra = f", first/last decoder layers {first_last_layers}" if first_last_layers else ""
    return Recipe(fmt, rules, FORMATS[fmt].algorithm, kv_cache,
                  f"decoder layers {fmt}, vision tower {vision}{extra}; lm_head, embeddings, patch embedding "
                  "unquantized")


def fp8(*, vision: str | None = None, first_last_layers: str | None = None, kv_cache: str | None = None) -> Recipe:
    """FP8 everywhere (decoder and vision tower)."""
    return _plain("fp8", vision, first_last_layers, kv_cache)


def nvfp4(*, vision: str | None = None, first_last_layers: str | None = None, kv_cache: str | None = None) -> Recipe:
    """NVFP4 decoder layers; the vision tower stays FP8 unless ``vision`` says otherwise (it is sensitive)."""
    return _plain("nvfp4", vision, first_last_layers, kv_cache)


def w4a8(*, vision: str | None = None, first_last_layers: str | None = None, kv_cache: str | None = None) -> Recipe:
    """NVFP4 weights with FP8 activations in the decoder; vision FP8 by default."""
    return _plain("w4a8", vision, first_last_layers, kv_cache)


def int8_sq(*, vision: str | None = None, first_last_layers: str | None = None,
            kv_cache: str | None = None) -> Recipe:
    """INT8 SmoothQuant for the decoder and the vision tower: the low-precision path Orin has."""
    return _plain("int8_sq", vision, first_last_layers, kv_cache)


def mixed(*, vision: str = "fp8", first_last_layers: str | None = None, kv_cache: str | None = None) -> Recipe:
    """Attention projections FP8, MLP NVFP4, vision tower ``vision``; ``first_last_layers`` overrides
    the first and last decoder layer (e.g. "fp8" or "none")."""
    vision = _check_format(vision, "vision format")
    rules = (Rule("lm.layers.*.self_attn.*", "fp8"), Rule("lm.layers.*.mlp.*", "nvfp4"), Rule("visual.*", vision),
             *_first_last(first_last_layers), *_protected())
    extra = f", first/last decoder layers {first_last_layers}" if first_last_layers else ""
    return Recipe("mixed", rules, "max", kv_cache,
                  f"attention fp8, MLP nvfp4, vision tower {vision}{extra}; lm_head, embeddings, patch embedding "
                  "unquantized")


def _split(value: Iterable[str] | str) -> tuple[str, ...]:
    """A comma-separated string (as a command line gives it) or a sequence, as a tuple."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def auto(*, effective_bits: float = 6.0, formats: Iterable[str] | str = ("nvfp4", "fp8"),
         exclude: Iterable[str] | str = (), kv_cache: str | None = None) -> Recipe:
    """Per-layer search (``mtq.auto_quantize``) over ``formats`` and "none" under a weight-bits budget;
    ``exclude`` adds module patterns to the always-unquantized lm_head, embeddings and patch embedding."""
    try:
        bits = float(effective_bits)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"effective_bits must be a number, got {effective_bits!r}") from exc
    spec = AutoSpec(bits, _split(formats), PROTECTED + _split(exclude))
    return Recipe("auto", (), "max", kv_cache,
                  f"auto_quantize over {', '.join(spec.formats)} and none at {bits:g} effective weight bits; "
                  "lm_head, embeddings, patch embedding unquantized", spec)


RECIPES: Mapping[str, Callable[..., Recipe]] = MappingProxyType({
    "fp8": fp8, "nvfp4": nvfp4, "w4a8": w4a8, "int8_sq": int8_sq, "mixed": mixed, "auto": auto})


def recipe_knobs(name: str) -> tuple[str, ...]:
    """The keyword knobs recipe ``name`` takes."""
    return tuple(inspect.signature(RECIPES[name]).parameters)


def resolve_recipe(name: str, **knobs: Any) -> Recipe:
    """Build built-in recipe ``name`` with ``knobs``; a :class:`RecipeError` lists what exists."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    allowed = recipe_knobs(name)
    if unknown := sorted(set(knobs) - set(allowed)):
        raise RecipeError(f"recipe {name!r} has no knob(s) {', '.join(unknown)}; its knobs: {', '.join(allowed)}")
    return RECIPES[name](**knobs)

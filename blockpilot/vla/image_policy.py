"""The image-size policy of a checkpoint: how any camera frame is resized before the vision tower.

Qwen2.5-VL's processor resizes every image by *smart resize* (:func:`blockpilot.vla.image_grid.smart_resize`):
both sides become multiples of ``patch_size * merge_size`` and the pixel count lands inside
``[min_pixels, max_pixels]``, the aspect ratio kept as well as whole merged patches allow. A checkpoint's
``preprocessor_config.json`` sets those numbers (Qwen2.5-VL ships ``min_pixels`` 3136 and ``max_pixels``
12845056); without one the Qwen2-VL processor defaults apply (3136 and 1003520).

A bundle's vision graphs are traced for fixed patch grids, so a bundle's policy also lists the exported
``sizes``: a frame whose smart-resized size is not one of them is resized to the exported size whose aspect
ratio is closest to the frame's (ties: the larger size), never refused. Torch-free: the planner core and
the one host-side preprocessing every backend shares (:mod:`blockpilot.vla.image`) ask this one type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_io import atomic_write
from ..errors import BlockpilotError
from .config import VisionConfig, read_json_object
from .image_grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize

PREPROCESSOR_FILE = "preprocessor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Prompt budget: the chat text around the images (system prompt, ego history, route command) is well under this
# on every tokenizer we ship or load, and the budget never drops below the historical 1,024-token default.
TEXT_TOKENS = 256
MIN_PROMPT_TOKENS = 1024
TOKENS_PER_IMAGE_FRAME = 2  # <|vision_start|> and <|vision_end|> around each image's placeholders

Size = tuple[int, int]


class ImagePolicyError(BlockpilotError, ValueError):
    """An unusable image policy (bad ``preprocessor_config.json`` field, inconsistent sizes); names the field."""


@dataclass(frozen=True)
class ImagePolicy:
    """How frames are resized and normalized for one vision tower (see the module docstring).

    ``sizes``: the only target ``(height, width)`` sizes allowed (a bundle's exported vision graphs), empty for
    any size smart resize gives. ``source``: where the numbers came from, for ``inspect`` and errors.
    """

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    sizes: tuple[Size, ...] = ()
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for name in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ImagePolicyError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ImagePolicyError(f"{where}: min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.max_pixels < self.factor ** 2:
            raise ImagePolicyError(f"{where}: max_pixels ({self.max_pixels}) is below one merged patch "
                                   f"({self.factor}x{self.factor} = {self.factor ** 2} pixels)")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, float) and math.isfinite(v) for v in values):
                raise ImagePolicyError(f"{where}: {name} must be three finite numbers, got {values!r}")
        if not all(v > 0 for v in self.image_std):
            raise ImagePolicyError(f"{where}: image_std must be positive, got {self.image_std!r}")
        for h, w in self.sizes:
            if h <= 0 or w <= 0 or h % self.factor or w % self.factor:
                raise ImagePolicyError(f"{where}: size {h}x{w} is not a positive multiple of {self.factor} "
                                       "(patch_size * merge_size)")

    @property
    def factor(self) -> int:
        """Pixels per merged token along one side (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    @classmethod
    def for_vision(cls, vision: VisionConfig, **overrides: Any) -> ImagePolicy:
        """The processor defaults for ``vision``'s patch sizes (``overrides`` replace fields)."""
        fields: dict[str, Any] = {"patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size,
                                  "temporal_patch_size": vision.temporal_patch_size, **overrides}
        return cls(**fields)

    def smart_size(self, height: int, width: int) -> Size:
        """What smart resize makes of a ``height x width`` frame under this policy's pixel budget."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def target_size(self, height: int, width: int) -> Size:
        """The ``(height, width)`` a frame is resized to: its smart size, or with fixed :attr:`sizes` the
        exported size nearest in aspect ratio (ties: the larger) when its smart size is not exported."""
        size = self.smart_size(height, width)
        if not self.sizes or size in self.sizes:
            return size
        aspect = width / height
        return min(self.sizes, key=lambda s: (round(abs(math.log(aspect * s[0] / s[1])), 9), -s[0] * s[1]))

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The ``(t, h, w)`` patch grid of a ``height x width`` still frame."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def tokens(self, height: int, width: int) -> int:
        """LM tokens (merged patches) of a ``height x width`` frame."""
        h, w = self.target_size(height, width)
        return (h // self.factor) * (w // self.factor)

    @property
    def max_tokens_per_image(self) -> int:
        """The most LM tokens one frame can become: the largest fixed size, else ``max_pixels / factor²``."""
        if self.sizes:
            return max((h // self.factor) * (w // self.factor) for h, w in self.sizes)
        return self.max_pixels // self.factor ** 2

    def with_sizes(self, sizes: tuple[Size, ...], source: str | None = None) -> ImagePolicy:
        """This policy restricted to ``sizes`` (already smart-resized target sizes)."""
        return ImagePolicy(self.min_pixels, self.max_pixels, self.patch_size, self.merge_size,
                           self.temporal_patch_size, self.image_mean, self.image_std, tuple(sizes),
                           source or self.source)

    def check_vision(self, vision: VisionConfig) -> None:
        """Refuse a policy whose patch sizes disagree with the vision tower's config."""
        for name, ours, theirs in (("patch_size", self.patch_size, vision.patch_size),
                                   ("merge_size", self.merge_size, vision.spatial_merge_size),
                                   ("temporal_patch_size", self.temporal_patch_size, vision.temporal_patch_size)):
            if ours != theirs:
                raise ImagePolicyError(f"{self.source}: {name} {ours} disagrees with the vision config's {theirs}")

    def to_dict(self) -> dict[str, Any]:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                "merge_size": self.merge_size, "temporal_patch_size": self.temporal_patch_size,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "sizes": [list(s) for s in self.sizes], "source": self.source}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ImagePolicy:
        """Read :meth:`to_dict`'s output back (a bundle's spec); raises :class:`ImagePolicyError` naming ``where``."""
        if not isinstance(data, dict):
            raise ImagePolicyError(f"{where}: the image policy must be a JSON object, got {type(data).__name__}")
        try:
            sizes = tuple((int(h), int(w)) for h, w in data.get("sizes", []))
            return cls(min_pixels=data["min_pixels"], max_pixels=data["max_pixels"], patch_size=data["patch_size"],
                       merge_size=data["merge_size"], temporal_patch_size=data["temporal_patch_size"],
                       image_mean=_triple(data.get("image_mean", CLIP_MEAN), where, "image_mean"),
                       image_std=_triple(data.get("image_std", CLIP_STD), where, "image_std"),
                       sizes=sizes, source=str(data.get("source", where)))
        except KeyError as exc:
            raise ImagePolicyError(f"{where}: the image policy has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ImagePolicyError):
                raise
            raise ImagePolicyError(f"{where}: malformed image policy ({exc})") from None

    def describe(self) -> str:
        """One line for ``inspect``."""
        sizes = ", ".join(f"{w}x{h}" for h, w in self.sizes) if self.sizes else "any (smart resize)"
        return (f"min_pixels {self.min_pixels}, max_pixels {self.max_pixels} (patch {self.patch_size}, merge "
                f"{self.merge_size}: up to {self.max_tokens_per_image} tokens per image); sizes {sizes}; "
                f"from {self.source}")


def _triple(value: Any, where: str, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3  # the processor accepts one number for all channels
    if not isinstance(value, (list, tuple)) or len(value) != 3 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ImagePolicyError(f"{where}: {name} must be a number or three numbers, got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def _positive_int(raw: dict[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise ImagePolicyError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    return value


def load_image_policy(checkpoint_dir: str | Path, vision: VisionConfig) -> ImagePolicy:
    """The policy of a checkpoint: ``preprocessor_config.json`` when present (``min_pixels`` / ``max_pixels``,
    else ``size.shortest_edge`` / ``size.longest_edge`` as newer processors write them; patch sizes must
    match the config), else the processor defaults for ``vision``."""
    path = Path(checkpoint_dir) / PREPROCESSOR_FILE
    if not path.is_file():
        return ImagePolicy.for_vision(vision, source="processor defaults (no preprocessor_config.json)")
    where = str(path)
    raw = read_json_object(path, ImagePolicyError)
    size = raw.get("size")
    if size is not None and not isinstance(size, dict):
        raise ImagePolicyError(f"{where}: field 'size' must be an object, got {size!r}")
    size = size or {}
    # As the processor does: explicit min_pixels / max_pixels win over the size dict.
    min_pixels = _positive_int(raw, "min_pixels", where) or _positive_int(size, "shortest_edge", where + " size")
    max_pixels = _positive_int(raw, "max_pixels", where) or _positive_int(size, "longest_edge", where + " size")
    fields: dict[str, Any] = {"source": where}
    if min_pixels is not None:
        fields["min_pixels"] = min_pixels
    if max_pixels is not None:
        fields["max_pixels"] = max_pixels
    for key, name in (("patch_size", "patch_size"), ("merge_size", "merge_size"),
                      ("temporal_patch_size", "temporal_patch_size")):
        if (value := _positive_int(raw, key, where)) is not None:
            fields[name] = value
    for key in ("image_mean", "image_std"):
        if key in raw:
            fields[key] = _triple(raw[key], where, key)
    policy = ImagePolicy(**{**{"patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size,
                               "temporal_patch_size": vision.temporal_patch_size}, **fields})
    policy.check_vision(vision)
    return policy


def parse_image_size(text: str) -> Size:
    """``"1600x900"`` (width x height, as cameras are named) -> ``(height, width)``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not all(int(p) > 0 for p in parts):
        raise ImagePolicyError(f"image size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1600x900")
    return int(parts[1]), int(parts[0])


def prompt_budget(policy: ImagePolicy | None, cameras: int, *, image_hw: Size | None = None,
                  text_tokens: int = TEXT_TOKENS) -> int:
    """Prompt tokens a KV cache should hold for ``cameras`` frames under ``policy``: per camera its image tokens
    (the exact count of ``image_hw`` when given, else :attr:`ImagePolicy.max_tokens_per_image`) plus the two
    vision delimiters, plus ``text_tokens``; never below :data:`MIN_PROMPT_TOKENS`. ``policy=None``: no
    vision tower (text only)."""
    if cameras < 0:
        raise ImagePolicyError(f"cameras must be zero or more, got {cameras}")
    per_image = 0
    if policy is not None and cameras:
        per_image = (policy.tokens(*image_hw) if image_hw is not None else policy.max_tokens_per_image)
        per_image += TOKENS_PER_IMAGE_FRAME
    return max(MIN_PROMPT_TOKENS, cameras * per_image + text_tokens)


def budget_line(policy: ImagePolicy | None, cameras: tuple[int, ...] = (1, 6, 8)) -> str:
    """``prompt budget`` line: the default KV-cache prompt budget for a few camera counts."""
    if policy is None:
        return f"prompt budget {prompt_budget(None, 0)} tokens (text only: no vision tower)"
    parts = ", ".join(f"{n} camera{'s' if n > 1 else ''} {prompt_budget(policy, n)}" for n in cameras)
    return (f"prompt budget {parts} tokens (per camera up to {policy.max_tokens_per_image} image tokens + "
            f"{TOKENS_PER_IMAGE_FRAME}, plus {TEXT_TOKENS} text, at least {MIN_PROMPT_TOKENS})")


def frame_line(policy: ImagePolicy, frames: tuple[Size, ...] = ((900, 1600), (1280, 1920))) -> str:
    """How a few camera sizes resize under ``policy`` (nuScenes 1600x900, WOD 1920x1280)."""
    out = []
    for h, w in frames:
        th, tw = policy.target_size(h, w)
        out.append(f"{w}x{h} -> {tw}x{th} ({policy.tokens(h, w)} tokens)")
    return "frames       " + "; ".join(out)


def describe_checkpoint_images(checkpoint_dir: str | Path) -> str:
    """``inspect`` lines for a checkpoint: its image policy and the prompt budget it implies."""
    from .hf_config import load_config

    config = load_config(checkpoint_dir)
    if config.vision is None:
        return "images       none (text-only model)\n" + budget_line(None)
    policy = load_image_policy(checkpoint_dir, config.vision)
    return "\n".join([f"image policy {policy.describe()}", frame_line(policy), budget_line(policy)])


def write_preprocessor_config(checkpoint_dir: str | Path, policy: ImagePolicy) -> Path:
    """Write ``preprocessor_config.json`` in the Qwen2.5-VL processor's layout (its pixel budget, patch sizes and
    normalization), so a checkpoint trained on small frames resizes large ones down to its trained budget."""
    data = {"min_pixels": policy.min_pixels, "max_pixels": policy.max_pixels, "patch_size": policy.patch_size,
            "merge_size": policy.merge_size, "temporal_patch_size": policy.temporal_patch_size,
            "image_mean": list(policy.image_mean), "image_std": list(policy.image_std),
            "size": {"shortest_edge": policy.min_pixels, "longest_edge": policy.max_pixels},
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"}
    path = Path(checkpoint_dir) / PREPROCESSOR_FILE
    atomic_write(path, json.dumps(data, indent=2) + "\n")
    return path

"""Training examples from synthetic scenes: front image, chat prompt ids and scaffolded answer ids.

One example per keyframe whose future lies inside its scene: the prompt is exactly what the
planner sends at run time (system prompt, one camera's image placeholders, ego state and route
command), the answer is the label plan encoded through the scaffold (slots null-padded) and
closed by the end token. Sets are cached on disk as ``.npz`` keyed by a hash of everything that
shapes them (seeds, schema, tokenizer, label rules, vision patching, the simulator's sources).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic_io import atomic_open
from ..sim.types import Scene
from ..vla.config import VisionConfig
from ..vla.image_grid import image_token_count
from ..vla.plans import DrivingPlan, DrivingSchema
from ..vla.prompt import DRIVING_SYSTEM_PROMPT, EgoState, driving_prompt_ids
from ..vla.scaffold import Scaffold
from ..vla.schema_io import schema_to_dict
from ..vla.tokenizer import Tokenizer
from .labels import KeyframeLike, LabelRules, derive_plan

DATA_VERSION = 1
IntArray = npt.NDArray[np.int64]
SceneFn = Callable[[int], Scene]
KeyframesFn = Callable[[Scene], Sequence[KeyframeLike]]
CameraFn = Callable[[Scene, int], npt.NDArray[np.uint8]]


@dataclass(frozen=True, eq=False)
class ExampleSet:
    """Tokenized examples, row ``i`` of every array belonging to example ``i``."""

    images: npt.NDArray[np.uint8]  # (N, H, W, 3) front camera
    prompts: tuple[IntArray, ...]  # chat prompt ids (lengths may differ)
    answers: IntArray  # (N, A): scaffold ids of the label plan, then the end token
    seeds: IntArray  # scene seed of each example
    steps: IntArray  # scene step of each keyframe
    waypoints: npt.NDArray[np.float64]  # (N, W, 2) label trajectory, for metrics
    longitudinal: npt.NDArray[np.str_]
    lateral: npt.NDArray[np.str_]
    stats: dict[str, Any]

    def __len__(self) -> int:
        return int(self.answers.shape[0])

    def subset(self, count: int) -> ExampleSet:
        """At most ``count`` examples spread evenly over the set (stats count the kept ones)."""
        if count >= len(self):
            return self
        idx = np.linspace(0, len(self) - 1, count).round().astype(np.int64)
        return ExampleSet(self.images[idx], tuple(self.prompts[i] for i in idx), self.answers[idx], self.seeds[idx],
                          self.steps[idx], self.waypoints[idx], self.longitudinal[idx], self.lateral[idx],
                          {**self.stats, "examples": count, "longitudinal": _counts(list(self.longitudinal[idx])),
                           "lateral": _counts(list(self.lateral[idx]))})

    def save(self, path: Path) -> None:
        save_npz(path, self.prompts, images=self.images, answers=self.answers, seeds=self.seeds, steps=self.steps,
                 waypoints=self.waypoints, longitudinal=self.longitudinal, lateral=self.lateral,
                 stats=np.array(json.dumps(self.stats)))

    @classmethod
    def load(cls, path: Path) -> ExampleSet:
        with np.load(path, allow_pickle=False) as z:
            return cls(images=z["images"], prompts=load_prompts(z),
                       answers=z["answers"], seeds=z["seeds"], steps=z["steps"], waypoints=z["waypoints"],
                       longitudinal=z["longitudinal"], lateral=z["lateral"], stats=json.loads(str(z["stats"])))


def save_npz(path: Path, prompts: Sequence[IntArray], **arrays: Any) -> None:
    """An example set's arrays and its ragged prompts (flattened, with offsets) as one compressed ``.npz``,
    written atomically."""
    offsets = np.cumsum([0, *(len(p) for p in prompts)])
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, prompt_flat=np.concatenate(prompts), offsets=offsets, **arrays)


def load_prompts(archive: Any) -> tuple[IntArray, ...]:
    """The ragged prompts :func:`save_npz` wrote, from the open archive."""
    flat, off = archive["prompt_flat"], archive["offsets"]
    return tuple(flat[a:b] for a, b in pairwise(off))


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """Hash of a tokenizer's vocabulary and rules (part of an example cache's key)."""
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()


def prompt_ids(keyframe: KeyframeLike, tokenizer: Tokenizer, schema: DrivingSchema, image_tokens: int) -> IntArray:
    ego = EgoState(past_waypoints=np.asarray(keyframe.past_xy, dtype=np.float64), speed_mps=float(keyframe.speed),
                   accel_mps2=float(keyframe.accel))
    return np.array(driving_prompt_ids(tokenizer, schema, ego, keyframe.route_command, [image_tokens]),
                    dtype=np.int64)


def answer_ids(plan: DrivingPlan, scaffold: Scaffold[DrivingPlan]) -> IntArray:
    return np.append(scaffold.encode_plan(plan), scaffold.tokenizer.special.end).astype(np.int64)


def answer_sections(scaffold: Scaffold[Any]) -> tuple[tuple[str, ...], npt.NDArray[np.int8], npt.NDArray[np.bool_]]:
    """Section names and, per answer token (scaffold then end token), its section index and frozen flag.

    The end token is its own section, ``"end"``, the last name.
    """
    names = (*(s.key for s in scaffold.sections), "end")
    ids = np.full(len(scaffold) + 1, len(names) - 1, dtype=np.int8)
    for i, section in enumerate(scaffold.sections):
        ids[section.start:section.end] = i
    return names, ids, np.append(scaffold.frozen, True)


def _sim_functions() -> tuple[SceneFn, KeyframesFn, CameraFn]:
    from ..sim.cameras import FRONT_CAMERA
    from ..sim.generator import generate_scene
    from ..sim.render import render_camera
    from ..sim.samples import keyframes

    def camera(scene: Scene, step: int) -> npt.NDArray[np.uint8]:
        return np.asarray(render_camera(scene, step, FRONT_CAMERA), dtype=np.uint8)

    return generate_scene, keyframes, camera


def _sim_digest() -> str:
    sim_dir = Path(__file__).resolve().parents[2] / "sim"
    digest = hashlib.sha256()
    for path in sorted(sim_dir.rglob("*.py")):
        digest.update(path.relative_to(sim_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_key(seeds: Sequence[int], scaffold: Scaffold[DrivingPlan], tokenizer: Tokenizer, vision: VisionConfig,
              rules: LabelRules, source: str) -> str:
    """Content hash of everything an example set depends on."""
    schema = scaffold.schema
    assert isinstance(schema, DrivingSchema)
    content = {
        "version": DATA_VERSION, "seeds": [int(s) for s in seeds], "schema": schema_to_dict(schema),
        "tokenizer": tokenizer_digest(tokenizer),
        "special": asdict(tokenizer.special), "rules": asdict(rules), "source": source,
        "vision": [vision.patch_size, vision.spatial_merge_size], "system": DRIVING_SYSTEM_PROMPT,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def build_examples(
    seeds: Iterable[int],
    tokenizer: Tokenizer,
    scaffold: Scaffold[DrivingPlan],
    vision: VisionConfig,
    *,
    cache_dir: str | Path | None = None,
    rules: LabelRules | None = None,
    stride: int = 1,
    sim: tuple[SceneFn, KeyframesFn, CameraFn] | None = None,
) -> ExampleSet:
    """Examples of every ``stride``-th keyframe with a full future (2 Hz keyframes: stride 2 keeps one a
    second) of the scenes of ``seeds``, loaded from the cache when present.

    ``sim`` replaces the simulator's (generate_scene, keyframes, camera) functions, for tests.
    """
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    seeds = [int(s) for s in seeds]
    rules = rules or LabelRules()
    schema = scaffold.schema
    if not isinstance(schema, DrivingSchema):
        raise TypeError("build_examples needs a driving schema scaffold")
    source = _sim_digest() if sim is None else ":".join(f"{f.__module__}.{f.__qualname__}" for f in sim)
    path = None
    if cache_dir is not None:
        key = cache_key(seeds, scaffold, tokenizer, vision, rules, f"{source}/stride={stride}")
        path = Path(cache_dir) / f"examples-{key}.npz"
        if path.is_file():
            return ExampleSet.load(path)
    scene_fn, keyframes_fn, camera_fn = sim if sim is not None else _sim_functions()
    rows: dict[str, list[Any]] = {k: [] for k in ("images", "prompts", "answers", "seeds", "steps", "waypoints",
                                                  "longitudinal", "lateral")}
    skipped = 0
    flags: dict[str, int] = {}
    for seed in seeds:
        scene = scene_fn(seed)
        frames = keyframes_fn(scene)
        valid = [kf for kf in frames if kf.future_valid]
        skipped += len(frames) - len(valid)
        for kf in valid[::stride]:
            plan = derive_plan(scene, kf, schema, rules)
            for key in (k for k, v in plan.critical_objects.items() if v):
                flags[key] = flags.get(key, 0) + 1
            image = camera_fn(scene, kf.step)
            rows["images"].append(image)
            n_image = image_token_count(image.shape[0], image.shape[1], vision)
            rows["prompts"].append(prompt_ids(kf, tokenizer, schema, n_image))
            rows["answers"].append(answer_ids(plan, scaffold))
            rows["seeds"].append(seed)
            rows["steps"].append(kf.step)
            rows["waypoints"].append(plan.waypoints)
            rows["longitudinal"].append(plan.longitudinal)
            rows["lateral"].append(plan.lateral)
    if not rows["answers"]:
        raise ValueError(f"no scene of seeds {seeds[:5]}... has a keyframe with a valid future")
    examples = ExampleSet(
        images=np.stack(rows["images"]), prompts=tuple(rows["prompts"]), answers=np.stack(rows["answers"]),
        seeds=np.array(rows["seeds"], dtype=np.int64), steps=np.array(rows["steps"], dtype=np.int64),
        waypoints=np.stack(rows["waypoints"]), longitudinal=np.array(rows["longitudinal"]),
        lateral=np.array(rows["lateral"]),
        stats={"scenes": len(seeds), "examples": len(rows["answers"]), "skipped_keyframes": skipped,
               "keyframe_stride": stride,
               "longitudinal": _counts(rows["longitudinal"]), "lateral": _counts(rows["lateral"]),
               "critical_objects": flags},
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        examples.save(path)
    return examples


def _counts(values: list[str]) -> dict[str, int]:
    keys, counts = np.unique(np.array(values), return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}

"""Calibration sets for post-training quantization, drawn from replay sources (torch-free).

``size`` planning instants picked evenly across route command x ego speed-bin strata (turns and stops
as well as cruising), ordered within a stratum by a seeded hash of ``sample_id``. Images are decoded
only for the picked samples; one that fails is replaced by the next of its stratum. Sets are cached as
``<cache_dir>/<key>/samples.npz`` + ``manifest.json``; one failing its content hash is rebuilt.
Each sample keeps the source's ground-truth future (when it has one): teacher-forced calibration
renders it through the answer schema (:mod:`blockpilot.calibration.teacher`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
import os
import zipfile
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic_io import atomic_dir
from ..errors import BlockpilotError
from ..eval.types import EvalSample, ImageArray, SampleError, SampleFailure, Source, Trajectory
from ..runtime.plan_types import Observation
from ..vla.prompt import ROUTE_COMMANDS, EgoState

log = logging.getLogger(__name__)

CALIBRATION_SEED_BASE = 2_000_000  # training uses seeds below 1_000_000, held-out evaluation 1_000_000..
DEFAULT_SPEED_BINS = (0.0, 2.0, 6.0, 10.0)  # lower edges in m/s: [0, 2), [2, 6), [6, 10), [10, inf)
FORMAT_VERSION = 2  # 2: samples keep the ground-truth future
FAILURE_EXAMPLES = 5
_LOAD_ERRORS = (SampleError, OSError, ValueError)
_TEXT_FIELDS = {"sample_ids": "sample_id", "sources": "source", "commands": "route_command", "speed_bins": "speed_bin"}


class CalibrationError(BlockpilotError, ValueError):
    """A calibration set cannot be built as asked; the message names the source and the counts."""


@dataclass(frozen=True, eq=False)
class CalibrationSample:
    """One planning instant with its decoded camera images (``HxWx3`` uint8, prompt order) and the
    source's ground-truth future (``None`` where the recording has none)."""

    sample_id: str
    source: str
    images: tuple[ImageArray, ...]
    ego: EgoState
    route_command: str
    speed_bin: str
    future: Trajectory | None = None

    def observation(self) -> Observation:
        return Observation(images=list(self.images), ego=self.ego, route_command=self.route_command)


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Samples (stored order) and the manifest of how they were drawn. ``from_cache``: this call read the
    cache; ``rebuilt_reason``: why this call rebuilt a cached copy (the manifest keeps the stored copy's)."""

    samples: tuple[CalibrationSample, ...]
    manifest: dict[str, Any]
    path: Path | None = None
    from_cache: bool = False
    rebuilt_reason: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def observations(self) -> list[Observation]:
        """Planner inputs, one per sample, in stored order."""
        return [s.observation() for s in self.samples]


def speed_bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    """``[0,2)``-style labels for lower bin edges; the last bin is open above."""
    return tuple(f"[{lo:g},{hi:g})" for lo, hi in zip(edges, [*edges[1:], math.inf], strict=True))


def _check_bins(speed_bins: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in speed_bins)
    if not edges or not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in itertools.pairwise(edges)):
        raise CalibrationError(f"speed_bins must be finite, strictly increasing lower edges, got {list(speed_bins)}")
    return edges


def content_hash(samples: Sequence[CalibrationSample]) -> str:
    """sha256 over ids, sources, commands, bins, ego arrays and image bytes, in the given order."""
    digest = hashlib.sha256(f"blockpilot-calibration/v{FORMAT_VERSION}".encode())

    def put(data: bytes) -> None:  # length-prefixed, so no two payloads share a byte stream
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for s in samples:
        for text in (s.sample_id, s.source, s.route_command, s.speed_bin):
            put(text.encode())
        past = np.ascontiguousarray(s.ego.past_waypoints, dtype="<f8")
        put(np.asarray(past.shape, dtype="<i8").tobytes() + past.tobytes())
        put(np.asarray([s.ego.speed_mps, s.ego.accel_mps2], dtype="<f8").tobytes())
        put(len(s.images).to_bytes(8, "little"))
        for image in s.images:
            put(np.asarray(image.shape, dtype="<i8").tobytes() + np.ascontiguousarray(image).tobytes())
        put(b"" if s.future is None else _future_array(s.future).tobytes())
    return digest.hexdigest()


def _future_array(future: Trajectory) -> np.ndarray:
    """``(N, 4)`` little-endian float64 rows: time, x, y, valid (1.0 / 0.0)."""
    return np.ascontiguousarray(np.column_stack([future.times_s, future.xy, future.valid.astype(np.float64)]),
                                dtype="<f8")


def _load_images(sample: EvalSample) -> tuple[ImageArray, ...]:
    out = tuple(_readonly(np.array(image)) for image in sample.load_images())  # private copies
    if not out or any(a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.size == 0 for a in out):
        raise SampleError(f"{sample.sample_id}: expected one or more non-empty HxWx3 uint8 images, got "
                          f"{[(str(a.dtype), a.shape) for a in out]}")
    return out


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


Stratum = tuple[int, int]  # (index in ROUTE_COMMANDS, speed bin)


def quotas(available: dict[Stratum, int], size: int) -> dict[Stratum, int]:
    """Each stratum's share of ``size`` when taken round-robin (strata in key order) and every image loads."""
    quota = dict.fromkeys(available, 0)
    while size > 0 and (open_ := [k for k in sorted(available) if quota[k] < available[k]]):
        for k in open_[:size]:
            quota[k] += 1
        size -= min(size, len(open_))
    return quota


def select_samples(source: Source, size: int, seed: int = 0,
                   speed_bins: Sequence[float] = DEFAULT_SPEED_BINS) -> tuple[list[CalibrationSample], dict[str, Any]]:
    """Up to ``size`` samples round-robin over the non-empty strata (commands in :data:`ROUTE_COMMANDS`
    order, then speed bins), and the manifest facts. Pass 1 keeps only ids; pass 2 only the candidates
    the quotas need plus spares (WOD and rosbag2 samples hold encoded images); spent spares cost a pass."""
    edges = _check_bins(speed_bins)
    labels = speed_bin_labels(edges)
    counts = {"source_error": 0, "source_skipped": 0, "invalid": 0, "image_error": 0}
    examples: list[str] = []

    def fail(kind: str, sample_id: str, reason: str) -> None:
        counts[kind] += 1
        if len(examples) < FAILURE_EXAMPLES:
            examples.append(f"{kind} {sample_id}: {reason}")

    ranked: dict[Stratum, list[tuple[bytes, str]]] = {}
    ids: set[str] = set()
    seen = 0
    for item in source:
        seen += 1
        if isinstance(item, SampleFailure):
            fail("source_skipped" if item.kind == "skipped" else "source_error", item.sample_id, item.reason)
        elif item.route_command not in ROUTE_COMMANDS or not math.isfinite(item.ego.speed_mps) or item.sample_id in ids:
            fail("invalid", item.sample_id, f"route command {item.route_command!r}, speed {item.ego.speed_mps} m/s"
                 + (", a repeated sample_id" if item.sample_id in ids else ""))
        else:  # a speed below the first edge (reversing) falls into the first bin
            ids.add(item.sample_id)
            key = (ROUTE_COMMANDS.index(item.route_command), max(0, bisect.bisect_right(edges, item.ego.speed_mps) - 1))
            rank = hashlib.sha256(f"{seed}\x00{item.sample_id}".encode()).digest()
            ranked.setdefault(key, []).append((rank, item.sample_id))
    queues = {k: [sid for _, sid in sorted(v)] for k, v in sorted(ranked.items())}
    caps = {k: len(v) for k, v in queues.items()}  # candidates not yet known to fail
    fetched = dict.fromkeys(queues, 0)
    ready: dict[Stratum, deque[EvalSample]] = {k: deque() for k in queues}
    picked: dict[Stratum, list[CalibrationSample]] = {k: [] for k in queues}
    passes = [1]

    def fetch(need: dict[Stratum, int]) -> None:  # one more pass: the next need[k] candidates of each stratum
        passes[0] += 1
        wanted = {sid: k for k, n in need.items() for sid in queues[k][fetched[k]:fetched[k] + n]}
        for k, n in need.items():
            fetched[k] = min(len(queues[k]), fetched[k] + n)
        found: dict[str, EvalSample] = {}
        for item in source:
            if isinstance(item, EvalSample) and item.sample_id in wanted:
                found.setdefault(item.sample_id, item)
        for sid, k in wanted.items():  # rank order within each stratum
            if sid in found:
                ready[k].append(found[sid])
            else:
                caps[k] -= 1
                fail("image_error", sid, "missing when the source was read again")

    quota = quotas(caps, size)
    fetch({k: q + q // 4 + 2 for k, q in quota.items() if q})
    # Round-robin with replacement: each stratum fills to its share of the candidates that load.
    while any(len(picked[k]) < q for k, q in quota.items()):
        for k, q in quota.items():
            while len(picked[k]) < min(q, caps[k]):
                if not ready[k]:
                    fetch({k: max(8, q)})
                    continue
                candidate = ready[k].popleft()
                try:
                    images = _load_images(candidate)
                except _LOAD_ERRORS as exc:
                    caps[k] -= 1
                    fail("image_error", candidate.sample_id, str(exc))
                    continue
                picked[k].append(CalibrationSample(candidate.sample_id, candidate.source, images, candidate.ego,
                                                   candidate.route_command, labels[k[1]], candidate.future))
        quota = quotas(caps, size)  # strata that ran short leave their share to the others
    lists = list(picked.values())  # stored in round-robin order
    chosen = [p[r] for r in range(max(map(len, lists), default=0)) for p in lists if r < len(p)]
    strata = {f"{ROUTE_COMMANDS[c]} {labels[b]}": {"available": len(queues[(c, b)]), "selected": len(picked[(c, b)])}
              for c, b in queues}
    return chosen, {"items_seen": seen, "usable": sum(len(v) for v in queues.values()), "selected": len(chosen),
                    "source_passes": passes[0], "strata": strata, "failures": counts, "failure_examples": examples}


def default_cache_dir() -> Path:
    """``$BLOCKPILOT_CACHE/calibration`` when the variable is set, else ``~/.cache/blockpilot/calibration``."""
    root = os.environ.get("BLOCKPILOT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "blockpilot") / "calibration"


def cache_key(source: Source, size: int, seed: int = 0, speed_bins: Sequence[float] = DEFAULT_SPEED_BINS) -> str:
    """sha256 of the source (name and ``describe()``), the selection parameters and the format version."""
    payload = {"format": FORMAT_VERSION, "source": source.name, "describe": source.describe(), "size": size,
               "seed": seed, "speed_bins": list(_check_bins(speed_bins))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_calibration_set(source: Source, size: int, *, cache_dir: str | Path | None = None, seed: int = 0,
                          speed_bins: Sequence[float] = DEFAULT_SPEED_BINS) -> CalibrationSet:
    """A stratified calibration set of up to ``size`` samples (fewer when the source has fewer usable
    ones: the manifest says how many), from the cache when a valid copy exists."""
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (size, seed)) or size < 1:
        raise CalibrationError(f"calibration set size must be a positive integer and seed an integer, got {size!r}, "
                               f"{seed!r}")
    if getattr(source, "robot", False):  # robot frames for an action-chunk model: not cached (a local dataset)
        from .robot import build_robot_calibration_set

        return build_robot_calibration_set(source, size, seed)  # type: ignore[arg-type]
    edges = _check_bins(speed_bins)
    key = cache_key(source, size, seed, edges)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    where = root / key
    reason = None
    if where.exists():
        try:
            cached, stored_manifest = _read(where, key)
            return CalibrationSet(tuple(cached), stored_manifest, where, from_cache=True)
        except _StaleCache as exc:
            reason = str(exc)
            log.warning("calibration cache %s is unusable (%s); rebuilding it", where, reason)
    samples, facts = select_samples(source, size, seed, edges)
    describe = source.describe()
    if not samples:
        raise CalibrationError(f"source {source.name!r} ({json.dumps(describe, default=str)[:300]}) has no usable "
                               f"calibration sample: {facts['items_seen']} items, failures {facts['failures']}; "
                               f"first: {facts['failure_examples'][:3]}")
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION, "cache_key": key, "source": {"name": source.name, "describe": describe},
        "selection": {"size": size, "seed": seed, "speed_bins": list(edges), "commands": list(ROUTE_COMMANDS),
                      "speed_bin_labels": list(speed_bin_labels(edges)),
                      "order": "round-robin over command x speed-bin strata; sha256(seed, sample_id) within"},
        **facts, "sample_ids": [s.sample_id for s in samples], "content_hash": content_hash(samples),
        "rebuilt_reason": reason,
    }
    stored = _write(root, key, samples, manifest)
    return CalibrationSet(tuple(samples), manifest, where if stored else None, rebuilt_reason=reason)


class _StaleCache(BlockpilotError):
    """A cached set that must not be used; the message says why."""


def _to_arrays(samples: Sequence[CalibrationSample]) -> dict[str, np.ndarray]:
    arrays = {name: np.array([getattr(s, attr) for s in samples], dtype=str) for name, attr in _TEXT_FIELDS.items()}
    arrays["speed_accel"] = np.array([[s.ego.speed_mps, s.ego.accel_mps2] for s in samples], dtype=np.float64)
    arrays["num_images"] = np.array([len(s.images) for s in samples], dtype=np.int64)
    for i, s in enumerate(samples):
        arrays[f"past_{i}"] = np.asarray(s.ego.past_waypoints, dtype=np.float64)
        for j, image in enumerate(s.images):
            arrays[f"image_{i}_{j}"] = image
        if s.future is not None:
            arrays[f"future_{i}"] = _future_array(s.future)
    return arrays


def _from_arrays(npz: Any) -> list[CalibrationSample]:
    ids, sources, commands, bins, num, speed_accel = (npz[k] for k in [*_TEXT_FIELDS, "num_images", "speed_accel"])
    if len({len(ids), len(num), len(sources), len(commands), len(bins), len(speed_accel)}) != 1:
        raise ValueError("samples.npz: per-sample arrays differ in length")
    out = []
    for i in range(len(ids)):  # the content hash, checked next, catches any other change
        images = tuple(_readonly(np.array(npz[f"image_{i}_{j}"], dtype=np.uint8)) for j in range(int(num[i])))
        ego = EgoState(npz[f"past_{i}"], float(speed_accel[i, 0]), float(speed_accel[i, 1]))
        future = None
        if f"future_{i}" in npz.files:
            rows = np.asarray(npz[f"future_{i}"], dtype=np.float64).reshape(-1, 4)
            future = Trajectory(times_s=rows[:, 0], xy=rows[:, 1:3], valid=rows[:, 3] > 0.5)
        out.append(CalibrationSample(str(ids[i]), str(sources[i]), images, ego, str(commands[i]), str(bins[i]),
                                     future))
    return out


def _read(where: Path, key: str) -> tuple[list[CalibrationSample], dict[str, Any]]:
    try:
        manifest = json.loads((where / "manifest.json").read_text(encoding="utf-8"))
        with np.load(where / "samples.npz", allow_pickle=False) as npz:
            samples = _from_arrays(npz)
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _StaleCache(f"unreadable cache ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or manifest.get("cache_key") != key:
        raise _StaleCache("manifest.json is not a calibration manifest of this format and key")
    if (digest := content_hash(samples)) != manifest.get("content_hash") or not samples:
        raise _StaleCache(f"content hash mismatch: manifest {manifest.get('content_hash')}, payload {digest}")
    if manifest.get("sample_ids") != [s.sample_id for s in samples]:
        raise _StaleCache("manifest sample_ids do not match the stored samples")
    return samples, manifest


def _write(root: Path, key: str, samples: Sequence[CalibrationSample], manifest: dict[str, Any]) -> bool:
    """Store atomically (a staging dir renamed into place, a stale copy replaced); False (logged) when the
    cache is not writable."""
    try:
        with atomic_dir(root / key) as tmp:
            np.savez_compressed(tmp / "samples.npz", **_to_arrays(samples))  # type: ignore[arg-type]
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str),
                                               encoding="utf-8")
        return True
    except OSError as exc:
        log.warning("calibration set not cached under %s (%s)", root, exc)
        return False

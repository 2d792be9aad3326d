"""Time-series helpers of the rosbag2 source: the odometry track interpolated at any instant, keyframe
selection on a fixed time grid, and look-ups of the nearest or latest message. Times are integer
nanoseconds; interpolation runs in seconds after the first odometry message so no precision is lost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class OdomTrack:
    """Odometry sorted by stamp (duplicates dropped): position, unwrapped yaw and forward speed."""

    t_ns: npt.NDArray[np.int64]
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    yaw: npt.NDArray[np.float64]
    speed: npt.NDArray[np.float64]

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, float, float, float, float]]) -> OdomTrack:
        """From ``(stamp_ns, x, y, yaw, speed)`` rows in any order."""
        ordered = sorted(rows, key=lambda r: r[0])
        stamps = np.array([r[0] for r in ordered], dtype=np.int64)
        _, first = np.unique(stamps, return_index=True)
        cols = np.array([r[1:] for r in ordered], dtype=np.float64).reshape(-1, 4)[first]
        return cls(stamps[first], cols[:, 0], cols[:, 1], np.unwrap(cols[:, 2]) if len(cols) else cols[:, 2],
                   cols[:, 3])

    def __len__(self) -> int:
        return len(self.t_ns)

    @property
    def first_ns(self) -> int:
        return int(self.t_ns[0])

    @property
    def last_ns(self) -> int:
        return int(self.t_ns[-1])

    def _rel(self, t_ns: int | Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return (np.asarray(t_ns, dtype=np.int64) - self.t_ns[0]).astype(np.float64) / 1e9

    def at(self, t_ns: int) -> tuple[float, float, float, float]:
        """(x, y, yaw, speed) at ``t_ns``, linearly interpolated (held at the ends)."""
        grid, q = self._rel(self.t_ns), self._rel(t_ns)
        x, y, yaw, speed = (float(np.interp(q, grid, col)) for col in (self.x, self.y, self.yaw, self.speed))
        return x, y, yaw, speed

    def xy_at(self, t_ns: Sequence[int]) -> npt.NDArray[np.float64]:
        """Positions (N, 2) at the given stamps, linearly interpolated (held at the ends)."""
        grid, q = self._rel(self.t_ns), self._rel(t_ns)
        return np.column_stack([np.interp(q, grid, self.x), np.interp(q, grid, self.y)])


def select_keyframes(image_ns: Sequence[int], odom: OdomTrack, history_ns: int, period_ns: int) -> list[int]:
    """Indices of the images taken as keyframes: the first at or after ``odom.first_ns + history_ns``, then
    the first at or after each later grid point ``period_ns`` apart, while odometry covers the image."""
    if not len(odom):
        return []
    target, out = odom.first_ns + history_ns, []
    for index, stamp in enumerate(image_ns):
        if stamp < target or stamp > odom.last_ns:
            continue
        out.append(index)
        target += ((stamp - target) // period_ns + 1) * period_ns  # the first grid point after this image
    return out


def nearest_value(stamps: npt.NDArray[np.int64] | None, values: npt.NDArray[np.float64] | None, t_ns: int,
                  max_gap_ns: int) -> float | None:
    """The value of the message nearest ``t_ns`` (sorted ``stamps``), or ``None`` if none is within the gap."""
    if stamps is None or values is None or not len(stamps):
        return None
    i = int(np.searchsorted(stamps, t_ns))
    best = min((j for j in (i - 1, i) if 0 <= j < len(stamps)), key=lambda j: abs(int(stamps[j]) - t_ns))
    return float(values[best]) if abs(int(stamps[best]) - t_ns) <= max_gap_ns else None


def latest_at_or_before(stamps: npt.NDArray[np.int64] | None, values: Sequence[T], t_ns: int) -> T | None:
    """The value of the last message stamped at or before ``t_ns`` (sorted ``stamps``), or ``None``."""
    if stamps is None or not len(stamps):
        return None
    i = int(np.searchsorted(stamps, t_ns, side="right")) - 1
    return values[i] if i >= 0 else None

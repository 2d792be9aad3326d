"""Lane paths parameterised by arc length: built from curvature segments, offset, reversed, queried.

Vehicles in the synthetic world move along a path by arc length ``s``; a pose is an interpolation
of the path samples, so the ego, a lead car and the map all share one geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blockpilot.sim.types import FloatArray

# A segment whose curvature changes linearly from k_start to k_end over its length (1/m, left > 0);
# k_start == k_end is a circular arc, both zero a straight line, otherwise a clothoid.
Segment = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Path:
    """Samples of a planar curve: arc length (N,), points (N, 2), unwrapped heading (N,), curvature (N,)."""

    s: FloatArray
    xy: FloatArray
    yaw: FloatArray
    kappa: FloatArray

    def __post_init__(self) -> None:
        n = self.s.shape[0]
        if n < 2 or self.xy.shape != (n, 2) or self.yaw.shape != (n,) or self.kappa.shape != (n,):
            raise ValueError("Path needs at least two samples with matching s, xy, yaw, kappa shapes")
        if not (np.diff(self.s) > 0).all():
            raise ValueError("Path arc length must increase strictly")

    @classmethod
    def from_segments(
        cls, start_xy: Sequence[float] | FloatArray, start_yaw: float, segments: Sequence[Segment], ds: float = 0.25
    ) -> Path:
        s_parts, k_parts = [np.zeros(1)], [np.array([segments[0][1]])]
        s0 = 0.0
        for length, k0, k1 in segments:
            if length <= 0:
                raise ValueError(f"segment length must be positive, got {length}")
            n = max(1, math.ceil(length / ds))
            u = np.arange(1, n + 1) / n
            s_parts.append(s0 + u * length)
            k_parts.append(k0 + u * (k1 - k0))
            s0 += length
        s = np.concatenate(s_parts)
        kappa = np.concatenate(k_parts)
        h = np.diff(s)
        dyaw = 0.5 * (kappa[:-1] + kappa[1:]) * h
        yaw = start_yaw + np.concatenate([[0.0], np.cumsum(dyaw)])
        # Exact chord of a circular arc between samples: length * sin(dyaw/2) / (dyaw/2).
        chord = h * np.sinc(dyaw / (2 * np.pi))
        mid = 0.5 * (yaw[:-1] + yaw[1:])
        steps = np.stack([chord * np.cos(mid), chord * np.sin(mid)], axis=1)
        xy = np.asarray(start_xy, dtype=np.float64) + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
        return cls(s, xy, yaw, kappa)

    @classmethod
    def from_polyline(cls, points: FloatArray) -> Path:
        """A path through dense polyline points (N, 2); heading and curvature by finite differences."""
        xy = np.asarray(points, dtype=np.float64)
        d = np.diff(xy, axis=0)
        seg = np.hypot(d[:, 0], d[:, 1])
        keep = np.concatenate([[True], seg > 1e-9])
        xy = xy[keep]
        d = np.diff(xy, axis=0)
        seg = np.hypot(d[:, 0], d[:, 1])
        s = np.concatenate([[0.0], np.cumsum(seg)])
        seg_yaw = np.unwrap(np.arctan2(d[:, 1], d[:, 0]))
        yaw = np.concatenate([seg_yaw, seg_yaw[-1:]])
        yaw[1:-1] = 0.5 * (seg_yaw[:-1] + seg_yaw[1:])
        kappa = np.gradient(yaw, s) if len(s) > 2 else np.zeros(len(s))
        return cls(s, xy, yaw, kappa)

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def pose(self, s: FloatArray | float) -> tuple[FloatArray, FloatArray]:
        """Points (..., 2) and headings (...) at arc lengths ``s``, clamped to the path's ends."""
        q = np.clip(np.asarray(s, dtype=np.float64), 0.0, self.length)
        x = np.interp(q, self.s, self.xy[:, 0])
        y = np.interp(q, self.s, self.xy[:, 1])
        return np.stack([x, y], axis=-1), np.interp(q, self.s, self.yaw)

    def curvature(self, s: FloatArray | float) -> FloatArray:
        return np.interp(np.asarray(s, dtype=np.float64), self.s, self.kappa)

    def offset(self, d: float) -> Path:
        """The parallel curve ``d`` metres to the left (negative: right), resampled by its own arc length."""
        normal = np.stack([-np.sin(self.yaw), np.cos(self.yaw)], axis=1)
        xy = self.xy + d * normal
        step = np.hypot(*np.diff(xy, axis=0).T)
        s = np.concatenate([[0.0], np.cumsum(step)])
        kappa = self.kappa / np.maximum(1.0 - d * self.kappa, 1e-3)
        return Path(s, xy, self.yaw.copy(), kappa)

    def extended(self, length: float, ds: float = 0.5) -> Path:
        """This path followed by a straight of ``length`` metres along its final heading."""
        u = np.arange(1, math.ceil(length / ds) + 1) * (length / math.ceil(length / ds))
        yaw = float(self.yaw[-1])
        xy = self.xy[-1] + np.outer(u, [np.cos(yaw), np.sin(yaw)])
        return Path(np.concatenate([self.s, self.length + u]), np.concatenate([self.xy, xy]),
                    np.concatenate([self.yaw, np.full(u.shape, yaw)]), np.concatenate([self.kappa, np.zeros(u.shape)]))

    def reversed(self) -> Path:
        return Path(self.length - self.s[::-1], self.xy[::-1].copy(), self.yaw[::-1] + np.pi, -self.kappa[::-1])

    def project(self, point: Sequence[float] | FloatArray) -> float:
        """Arc length of the sample nearest to ``point`` (the paths here are sampled every ~0.25 m)."""
        p = np.asarray(point, dtype=np.float64)
        i = int(np.argmin(np.sum((self.xy - p) ** 2, axis=1)))
        return float(self.s[i])

    def to_frenet(self, point: Sequence[float] | FloatArray) -> tuple[float, float]:
        """(arc length, signed left offset) of ``point`` relative to its nearest sample."""
        s = self.project(point)
        xy, yaw = self.pose(s)
        d = np.asarray(point, dtype=np.float64) - xy
        return s + float(d[0] * np.cos(yaw) + d[1] * np.sin(yaw)), float(-d[0] * np.sin(yaw) + d[1] * np.cos(yaw))

"""Writers that put synthetic scenes into real dataset formats, each labelled synthetic.

- :func:`write_nuscenes` (``nuscenes``): a nuScenes dataroot with the 13 tables, images, lidar, map, CAN bus;
- :func:`write_wod_e2e` (``wod_e2e``): a WOD-E2E TFRecord of ``E2EDFrame`` protos (needs ``protobuf``);
- :func:`write_rosbag2` (``mcap_writer``): a rosbag2 MCAP recording (needs ``rosbags``).

The TFRecord framing and the WOD protos live in :mod:`blockpilot.formats`, which the readers share.

Imported lazily so that each format's dependency is needed only by the writer that uses it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "write_nuscenes": f"{__name__}.nuscenes",
    "write_wod_e2e": f"{__name__}.wod_e2e",
    "write_rosbag2": f"{__name__}.mcap_writer",
    "write_tfrecord": "blockpilot.formats.tfrecord",
    "read_tfrecord": "blockpilot.formats.tfrecord",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

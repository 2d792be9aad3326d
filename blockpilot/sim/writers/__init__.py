"""Writers that put synthetic scenes into real dataset formats, each labelled synthetic.

- :func:`write_nuscenes` (``nuscenes``): a nuScenes dataroot with the 13 tables, images, lidar, map, CAN bus;
- :func:`write_wod_e2e` (``wod_e2e``): a WOD-E2E TFRecord of ``E2EDFrame`` protos (needs ``protobuf``);
- :func:`write_rosbag2` (``mcap_writer``): a rosbag2 MCAP recording (needs ``rosbags``).

Imported lazily so that each format's dependency is needed only by the writer that uses it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "write_nuscenes": "nuscenes",
    "write_wod_e2e": "wod_e2e",
    "write_rosbag2": "mcap_writer",
    "write_tfrecord": "tfrecord",
    "read_tfrecord": "tfrecord",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)

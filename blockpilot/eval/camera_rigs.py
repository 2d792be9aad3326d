"""The camera rigs of the replayed datasets, in the prompt order a multi-camera checkpoint is given them.

One ``<|vision_start|> ... <|vision_end|>`` block per camera, in this order, and no camera names in the text
(the chat prompt of :func:`blockpilot.vla.prompt.chat_prompt_ids`; a single-camera prompt is unchanged):

* nuScenes (6): front, front right, front left, back, back left, back right: the order of the nuScenes
  devkit's ``CAM_*`` sensor list used by the BEV planners (UniAD, VAD) trained on it.
* WOD-E2E (8): front, front left, front right, side left, side right, rear left, rear, rear right: clockwise
  from the front as WOD's ``CameraName`` numbers them, the rear cameras last.
"""

from __future__ import annotations

from .types import DatasetError

NUSCENES_CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
WOD_E2E_CAMERAS = ("FRONT", "FRONT_LEFT", "FRONT_RIGHT", "SIDE_LEFT", "SIDE_RIGHT", "REAR_LEFT", "REAR", "REAR_RIGHT")
RIGS = {"nuscenes": NUSCENES_CAMERAS, "wod": WOD_E2E_CAMERAS}


def rig_cameras(source: str) -> tuple[str, ...]:
    """Every camera of ``source``'s rig in prompt order (``--cameras all``)."""
    if source not in RIGS:
        raise DatasetError(f"--cameras all: the {source} source has one camera stream; name it instead "
                           f"(rigs: {', '.join(RIGS)})")
    return RIGS[source]

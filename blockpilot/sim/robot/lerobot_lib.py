"""LeRobot's own dataset class (``LeRobotDataset``, from the ``lerobot-dataset`` distribution: module ``ledataset``).

We use LeRobot's library, not a reader of our own, so the files are LeRobot's v3.0 layout by construction. Two
facts of this machine shape how it is loaded:

- ``lerobot`` itself (0.4.x, the releases for Python 3.11) pins ``torch<2.11``; the standalone ``lerobot-dataset``
  0.4.4 holds the same dataset code with looser pins, but still declares ``huggingface-hub<0.36`` (transformers 5
  needs 1.x) and ``opencv-python-headless<4.13``. It works with the versions in constraints.txt, so
  ``scripts/setup.sh`` installs it with ``--no-deps`` and the ``robot`` extra lists what it really imports.
- It imports ``torchvision`` at module level, for ``transforms.ToTensor`` only on the image path, and the package
  index's torchvision does not load beside the CPU torch 2.13 wheel ("operator torchvision::nms does not exist").
  Where torchvision is not installed, :func:`lerobot_dataset_class` lends the import a stand-in ``torchvision``
  holding only ``transforms.ToTensor`` (uint8 HWC -> float CHW in [0, 1], what torchvision's does), and takes it
  out of ``sys.modules`` once LeRobot's modules are loaded, so no other code sees it. Video decoding needs the real
  torchvision or torchcodec: :mod:`.lerobot_io` stores frames as images and refuses video features without them.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from functools import cache
from typing import Any

from blockpilot.errors import require_extra

_EXTRA = "robot"


def _stand_in_torchvision() -> dict[str, types.ModuleType]:
    import numpy as np
    import torch

    class ToTensor:
        """PIL image or HWC array -> float CHW tensor, uint8 scaled to [0, 1] (torchvision's ``ToTensor``)."""

        def __call__(self, picture: Any) -> Any:
            array = np.asarray(picture)
            if array.ndim == 2:
                array = array[:, :, None]
            tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
            return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor

    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = ToTensor  # type: ignore[attr-defined]
    root.transforms = transforms  # type: ignore[attr-defined]
    for module in (root, transforms):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    return {"torchvision": root, "torchvision.transforms": transforms}


def video_decoding_available() -> bool:
    """Whether LeRobot can decode video features here (it needs torchcodec or torchvision)."""
    return any(importlib.util.find_spec(name) is not None for name in ("torchcodec", "torchvision"))


@cache
def lerobot_dataset_class() -> Any:
    """``LeRobotDataset``, imported once; a :class:`MissingExtraError` naming the ``robot`` extra if absent."""
    require_extra("torch", _EXTRA, "LeRobot datasets")
    require_extra("ledataset", _EXTRA, "LeRobot datasets (the lerobot-dataset package)")
    stand_in = {} if importlib.util.find_spec("torchvision") is not None else _stand_in_torchvision()
    sys.modules.update(stand_in)
    try:
        from ledataset.datasets.lerobot_dataset import LeRobotDataset
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    return LeRobotDataset

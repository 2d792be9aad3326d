"""Read safetensors files tensor by tensor straight into a model's parameters.

A safetensors file is an 8-byte little-endian header length, a JSON header (``name -> {dtype, shape,
data_offsets}``) and the raw bytes. :func:`read_header` checks a file from its header alone (no weight is read), so a
checkpoint is validated in full before the model is touched; :func:`read_into` then reads each tensor with
``readinto`` directly into the parameter's storage when the dtypes match, or through one temporary tensor of that
size when they differ. Peak memory is the model plus the largest tensor: no second copy of the weights, and no
memory-mapped pages held while the model is filled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BlockpilotError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20


class SafetensorsFormatError(BlockpilotError, ValueError):
    """A safetensors file whose header or layout is broken; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | Path) -> list[TensorEntry]:
    """The tensors of one safetensors file from its header, each checked to fit inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsFormatError(f"{path}: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object")
    base = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed or unsupported header entry "
                                         f"{json.dumps(info)[:120]}") from exc
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} spans bytes {begin}..{end} of the data, but "
                                         f"shape {shape} {info['dtype']} needs {nbytes} and the data holds "
                                         f"{size - base}")
        entries.append(TensorEntry(name, dtype, shape, base + begin, nbytes))
    return entries


def _readinto(fh: Any, entry: TensorEntry, dst: torch.Tensor, path: Path) -> None:
    view = memoryview(dst.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes
    fh.seek(entry.start)
    done = 0
    while done < entry.nbytes:
        n = fh.readinto(view[done:])
        if not n:
            raise SafetensorsFormatError(f"{path}: tensor {entry.name!r} ends {entry.nbytes - done} bytes early")
        done += n


def read_into(fh: Any, entry: TensorEntry, target: torch.Tensor, path: Path) -> None:
    """Fill ``target`` (a contiguous CPU tensor of ``entry``'s shape) from the open file ``fh``."""
    with torch.no_grad():
        if target.dtype == entry.dtype and target.is_contiguous():
            _readinto(fh, entry, target, path)
        else:
            tmp = torch.empty(entry.shape, dtype=entry.dtype)
            _readinto(fh, entry, tmp, path)
            target.copy_(tmp)

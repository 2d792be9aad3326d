"""TFRecord framing without TensorFlow.

Each record is: uint64 little-endian length, masked CRC32C of those 8 bytes (uint32 LE), the data,
masked CRC32C of the data (uint32 LE). CRC32C is the Castagnoli polynomial (reflected 0x82F63B78);
the mask rotates right by 15 bits and adds 0xA282EAD8.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record's bytes as they go into the file."""
    length = struct.pack("<Q", len(data))
    return b"".join((length, struct.pack("<I", masked_crc32c(length)), data,
                     struct.pack("<I", masked_crc32c(data))))


class TFRecordWriter:
    """Appends framed records to a file; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: BinaryIO | None = self.path.open("wb")
        self.count = 0

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"TFRecord writer for {self.path} is closed")
        self._file.write(frame_record(data))
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_tfrecord(path: str | Path, records: Iterable[bytes]) -> int:
    """Write every record to ``path``; returns how many were written."""
    with TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.count


def read_tfrecord(path: str | Path) -> Iterator[bytes]:
    """Yield each record's data, checking both CRCs; raises ValueError on a corrupt or cut file."""
    with Path(path).open("rb") as f:
        index = 0
        while header := f.read(12):
            if len(header) != 12:
                raise ValueError(f"{path}: record {index} header cut short")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != length_crc:
                raise ValueError(f"{path}: record {index} length CRC mismatch")
            data = f.read(length)
            footer = f.read(4)
            if len(data) != length or len(footer) != 4:
                raise ValueError(f"{path}: record {index} cut short")
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path}: record {index} data CRC mismatch")
            yield data
            index += 1

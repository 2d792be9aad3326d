"""TFRecord framing without TensorFlow.

Each record is: uint64 little-endian length, masked CRC32C of those 8 bytes (uint32 LE), the data,
masked CRC32C of the data (uint32 LE). CRC32C is the Castagnoli polynomial (reflected 0x82F63B78);
the mask rotates right by 15 bits and adds 0xA282EAD8.

Readers use :func:`scan_tfrecord`, which reports a broken record in its place and goes on where the
framing still lets it; :func:`count_tfrecords` counts the same items by walking the headers only.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ..errors import BlockpilotError

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8
_HEADER = 12  # length (8) + its CRC (4)
_FOOTER = 4  # data CRC


class TFRecordError(BlockpilotError, ValueError):
    """One record of a TFRecord file is broken; the message names the file and the record index."""

    def __init__(self, path: str | Path, index: int, problem: str) -> None:
        super().__init__(f"{path}: record {index} {problem}")
        self.path = Path(path)
        self.index = index
        self.problem = problem


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c_python(data: bytes | bytearray | memoryview) -> int:
    """CRC32C in pure Python (table driven); slow on megabyte records."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _fast_crc32c() -> Callable[[bytes], int] | None:
    try:
        import google_crc32c  # optional: a C implementation, much faster on real camera records
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", "") != "c":
        return None
    value: Callable[[bytes], int] = google_crc32c.value
    return value


_FAST = _fast_crc32c()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` (the C implementation of ``google-crc32c`` when installed, else pure Python)."""
    return _FAST(bytes(data)) if _FAST is not None else crc32c_python(data)


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


def _next_length(f: BinaryIO, path: str | Path, index: int, size: int) -> int | TFRecordError | None:
    """The next record's data length, ``None`` at a clean end of file, or the error that ends the file."""
    header = f.read(_HEADER)
    if not header:
        return None
    if len(header) != _HEADER:
        return TFRecordError(path, index, "header cut short")
    (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
    if masked_crc32c(header[:8]) != length_crc:
        return TFRecordError(path, index, "length CRC mismatch")
    if f.tell() + length + _FOOTER > size:
        return TFRecordError(path, index, "cut short")
    return int(length)


def _lengths(f: BinaryIO, path: str | Path) -> Iterator[tuple[int, int | TFRecordError]]:
    """``(index, data length)`` of each record from ``f``'s position, or ``(index, TFRecordError)`` as the last item
    where an error ends the file. Before taking the next item the caller moves ``f`` past the record's data and
    footer (reading or seeking)."""
    size = os.fstat(f.fileno()).st_size
    index = 0
    while (length := _next_length(f, path, index, size)) is not None:
        yield index, length
        if isinstance(length, TFRecordError):
            return
        index += 1


def scan_tfrecord(path: str | Path) -> Iterator[tuple[int, bytes | TFRecordError]]:
    """Yield ``(index, data)`` for each record, or ``(index, TFRecordError)`` for a broken one.

    A data CRC mismatch spoils only that record (its length was trustworthy), so the scan goes on with
    the next; a length CRC mismatch or a file cut short yields one error and ends the file. Opening the
    file may raise ``OSError``.
    """
    with Path(path).open("rb") as f:
        for index, length in _lengths(f, path):
            if isinstance(length, TFRecordError):
                yield index, length
                return
            data = f.read(length)
            (data_crc,) = struct.unpack("<I", f.read(_FOOTER))
            if masked_crc32c(data) != data_crc:
                yield index, TFRecordError(path, index, "data CRC mismatch")
            else:
                yield index, data


def count_tfrecords(path: str | Path) -> int:
    """How many items :func:`scan_tfrecord` yields, found by walking the headers (data is not read)."""
    count = 0
    with Path(path).open("rb") as f:
        for index, length in _lengths(f, path):
            count = index + 1
            if not isinstance(length, TFRecordError):
                f.seek(length + _FOOTER, os.SEEK_CUR)
    return count


def read_tfrecord(path: str | Path) -> Iterator[bytes]:
    """Yield each record's data, checking both CRCs; raises :class:`TFRecordError` (a ValueError) at the
    first corrupt record or where the file is cut short."""
    for _, item in scan_tfrecord(path):
        if isinstance(item, TFRecordError):
            raise item
        yield item

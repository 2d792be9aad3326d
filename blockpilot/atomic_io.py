"""Crash-safe writes (standard library only): a file or a directory tree appears whole at its path or not at all.

A file is written to a hidden temporary beside its destination, flushed and fsynced, then renamed over it, and
the directory entry is fsynced where the platform allows; any exception (``KeyboardInterrupt`` included) removes
the temporary and leaves the old file as it was. A tree is built in a hidden staging directory beside its
destination and renamed into place (an old tree is moved aside first, and put back if the rename fails).

Files get mode 0644 and directories 0755, less the process umask (0640 and 0750 under umask 027), as
``open`` and ``mkdir`` would give them; ``tempfile`` alone would leave 0600 and 0700.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o644
DIR_MODE = 0o755
TEXT_MODES = ("w",)
BINARY_MODES = ("wb",)


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` says it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def masked(mode: int) -> int:
    """``mode`` less the process umask."""
    return mode & ~current_umask()


def make_dirs(path: str | Path, perms: int = DIR_MODE) -> Path:
    """``mkdir -p`` whose every new level gets ``perms`` less the umask (``Path.mkdir`` gives parents 0777)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.is_dir()]
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
            level.mkdir(mode=perms)
    return path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk; best effort, as not every platform can."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every regular file under ``root`` and every directory, ``root`` included (links not followed)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


class AtomicFile:
    """An open temporary file beside ``path`` (``.file``): :meth:`commit` renames it over ``path``,
    :meth:`discard` removes it. For writers whose file stays open across calls; otherwise use
    :func:`atomic_open` or :func:`atomic_write`. Text files default to UTF-8."""

    def __init__(self, path: str | Path, mode: str = "wb", *, perms: int = FILE_MODE, encoding: str | None = None,
                 newline: str | None = None) -> None:
        if mode not in TEXT_MODES + BINARY_MODES:
            raise ValueError(f"{path}: atomic files open as 'w' or 'wb', not {mode!r}")
        self.path = Path(path)
        make_dirs(self.path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp = Path(tmp)
        try:
            os.fchmod(fd, masked(perms))
            text = mode in TEXT_MODES
            # reopened by name, so ``file.name`` is the temporary's path (libraries that save next to it use it)
            self.file: IO[Any] = open(self.tmp, mode, encoding=(encoding or "utf-8") if text else None,  # noqa: SIM115
                                      newline=newline if text else None)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.done = False

    def commit(self) -> Path:
        """Flush, fsync and close the file, rename it to ``path`` and fsync the directory; returns ``path``."""
        if self.done:
            raise ValueError(f"{self.path}: this atomic file is already committed or discarded")
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self.done = True
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` is left as it was. Idempotent."""
        self.done = True
        with contextlib.suppress(OSError, ValueError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, perms: int = FILE_MODE, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w"|"wb") as fh:`` writes ``fh`` to a temporary file that replaces ``path``
    when the block ends cleanly and is removed if it raises."""
    out = AtomicFile(path, mode, perms=perms, encoding=encoding, newline=newline)
    try:
        yield out.file
    except BaseException:
        out.discard()
        raise
    out.commit()


def atomic_write(path: str | Path, data: str | bytes | bytearray | memoryview, *, perms: int = FILE_MODE,
                 encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``data`` (text in ``encoding``, or bytes) atomically; returns ``path``."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb", perms=perms,
                     encoding=encoding if isinstance(data, str) else None) as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, perms: int = FILE_MODE) -> Iterator[Path]:
    """``with atomic_path(path) as tmp:`` for libraries that write only to a file name (safetensors'
    ``save_file``): they write ``tmp`` (beside ``path``), which is fsynced and renamed over ``path`` when the
    block ends cleanly and removed if it raises."""
    path = Path(path)
    make_dirs(path.parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, masked(perms))  # the library may have made a new file, with its own mode
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def staging_dir(dest: str | Path, *, perms: int = DIR_MODE) -> Path:
    """A new empty hidden directory ``.<name>.partial-XXXX`` beside ``dest`` (same file system, so it can be
    renamed onto ``dest``)."""
    dest = Path(dest)
    make_dirs(dest.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    os.chmod(staging, masked(perms))
    return staging


def replace_dir(staging: str | Path, dest: str | Path, *, overwrite: bool = True, fsync: bool = True) -> Path:
    """Rename directory ``staging`` to ``dest`` (after fsyncing its files when ``fsync``). An existing ``dest``
    is moved aside, the new tree renamed in, the old one deleted: a reader sees the old tree, none, or the new
    one, never a mix; if the rename fails the old tree is put back. ``overwrite=False`` raises
    :class:`FileExistsError` for an existing ``dest`` instead. Returns ``dest``."""
    staging, dest = Path(staging), Path(dest)
    if fsync:
        fsync_tree(staging)
    exists = dest.exists() or dest.is_symlink()
    if exists and not overwrite:
        raise FileExistsError(f"{dest} exists already")
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent)) if exists else None
    old = None if aside is None else aside / dest.name
    try:
        if old is not None:
            os.rename(dest, old)
        try:
            os.rename(staging, dest)
        except BaseException:
            if old is not None and old.exists() and not dest.exists():
                os.rename(old, dest)
            raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(dest.parent)
    return dest


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, overwrite: bool = True, perms: int = DIR_MODE) -> Iterator[Path]:
    """``with atomic_dir(dest) as tmp:`` fills ``tmp`` (a staging directory beside ``dest``), which
    :func:`replace_dir` renames to ``dest`` when the block ends cleanly; it is deleted if the block raises."""
    staging = staging_dir(dest, perms=perms)
    try:
        yield staging
        replace_dir(staging, dest, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename

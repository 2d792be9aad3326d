"""The one crash-safe write helper: old files survive a failed write, no temporaries are left, modes follow umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockpilot.atomic_io import (
    AtomicFile,
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_write,
    current_umask,
    make_dirs,
    replace_dir,
    staging_dir,
)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test (``umask(0o027)``), restoring it afterwards."""
    saved = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    try:
        yield set_mask
    finally:
        os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


class Boom(Exception):
    pass


def test_str_and_bytes_replace_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    assert atomic_write(path, "héllo\n") == path
    assert path.read_bytes() == "héllo\n".encode()
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, memoryview(b"xyz"))
    assert path.read_bytes() == b"xyz"
    assert listing(tmp_path) == ["a.json"]


def test_missing_parents_are_made(tmp_path: Path) -> None:
    path = tmp_path / "x" / "y" / "z.txt"
    atomic_write(path, "z")
    assert path.read_text() == "z"


@pytest.mark.parametrize("exc", [Boom("midway"), KeyboardInterrupt()])
def test_a_write_that_raises_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                          exc: BaseException) -> None:
    path = tmp_path / "results.json"
    path.write_text("old contents\n")
    with pytest.raises(type(exc)), atomic_open(path, "w") as fh:
        fh.write("new contents, half written")
        fh.flush()
        assert len(listing(tmp_path)) == 2  # the temporary sits beside the file while writing
        raise exc
    assert path.read_text() == "old contents\n"
    assert listing(tmp_path) == ["results.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_open(tmp_path / "new.bin", "wb") as fh:
        fh.write(b"partial")
        raise Boom
    assert listing(tmp_path) == []


def test_streamed_writes_appear_only_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "stream.txt"
    with atomic_open(path, "w") as fh:
        for i in range(100):
            fh.write(f"line {i}\n")
        assert not path.exists()
        assert Path(fh.name).parent == tmp_path  # a named file beside the target, for libraries that use it
    assert path.read_text().splitlines()[-1] == "line 99"
    assert listing(tmp_path) == ["stream.txt"]


def test_atomic_file_commit_and_discard(tmp_path: Path) -> None:
    kept, dropped = AtomicFile(tmp_path / "kept.bin"), AtomicFile(tmp_path / "dropped.bin")
    kept.file.write(b"k")
    dropped.file.write(b"d")
    kept.commit()
    dropped.discard()
    dropped.discard()  # idempotent
    assert listing(tmp_path) == ["kept.bin"]
    with pytest.raises(ValueError, match="already committed"):
        kept.commit()
    with pytest.raises(ValueError, match="'a'"):
        AtomicFile(tmp_path / "x", "a")


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(Boom), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert path.read_bytes() == b"old" and listing(tmp_path) == ["weights.bin"]
    with atomic_path(path) as tmp:
        tmp.unlink()  # a library that writes a new file rather than into the one made for it
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and listing(tmp_path) == ["weights.bin"]


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_modes_follow_the_umask(tmp_path: Path, umask: Callable[[int], None], mask: int, file_mode: int,
                                dir_mode: int) -> None:
    umask(mask)
    assert current_umask() == mask
    atomic_write(tmp_path / "text.txt", "t")
    with atomic_open(tmp_path / "stream.bin", "wb") as fh:
        fh.write(b"s")
    with atomic_path(tmp_path / "named.bin") as tmp:
        tmp.write_bytes(b"n")
    for name in ("text.txt", "stream.bin", "named.bin"):
        assert mode(tmp_path / name) == file_mode, name
    make_dirs(tmp_path / "a" / "b")
    assert mode(tmp_path / "a") == dir_mode and mode(tmp_path / "a" / "b") == dir_mode
    with atomic_dir(tmp_path / "tree") as staging:
        (staging / "f").write_text("f")
    assert mode(tmp_path / "tree") == dir_mode
    assert mode(staging_dir(tmp_path / "other")) == dir_mode


def test_a_directory_is_renamed_into_place_whole(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    with atomic_dir(dest) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.txt").write_text("one")
        assert not dest.exists()
        assert staging.name.startswith(".bundle.partial-")
    assert (dest / "sub" / "a.txt").read_text() == "one"
    with atomic_dir(dest) as staging:  # replaces the old tree
        (staging / "b.txt").write_text("two")
    assert listing(dest) == ["b.txt"]
    assert listing(tmp_path) == ["bundle"]  # no staging or set-aside directories left


def test_a_failed_directory_write_keeps_the_old_tree(tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(dest) as staging:
        (staging / "new.txt").write_text("new")
        raise Boom
    assert listing(dest) == ["old.txt"]
    assert listing(tmp_path) == ["cache"]


def test_replace_dir_without_overwrite_refuses_an_existing_target(tmp_path: Path) -> None:
    staging = staging_dir(tmp_path / "bag")
    (staging / "data").write_text("d")
    (tmp_path / "bag").mkdir()  # even an empty directory, which a bare rename would replace
    with pytest.raises(FileExistsError, match="bag"):
        replace_dir(staging, tmp_path / "bag", overwrite=False)
    assert (staging / "data").is_file() and listing(tmp_path / "bag") == []
    (tmp_path / "bag").rmdir()
    replace_dir(staging, tmp_path / "bag", overwrite=False)
    assert (tmp_path / "bag" / "data").read_text() == "d"


def test_a_bundle_is_readable_by_others_under_umask_022(tmp_path: Path, umask: Callable[[int], None]) -> None:
    """The staging directory comes from mkdtemp (0700) and is renamed to be the bundle: it must not stay 0700."""
    from blockpilot.formats.bundle import BundleWriter

    umask(0o022)
    (src := tmp_path / "config.json").write_text("{}")
    with BundleWriter(tmp_path / "bundle") as writer:
        writer.model_config, writer.schema = {}, {}
        writer.add_file(src, "model")
    assert mode(tmp_path / "bundle") == 0o755 and mode(tmp_path / "bundle" / "manifest.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "config.json"]

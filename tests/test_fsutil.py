"""hvdlm.fsutil: the one atomic write keeps its promises (mode, links, failures, no temporary files left)."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import old_file_kept

from hvdlm import fsutil
from hvdlm.fsutil import atomic_write, atomic_writer, fsync_directory


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_bytes_and_text_and_leaves_only_the_file(tmp_path):
    out = tmp_path / "f"
    assert atomic_write(out, b"\x00\x01") == out
    assert out.read_bytes() == b"\x00\x01"
    atomic_write(out, "héllo\n")
    assert out.read_text(encoding="utf-8") == "héllo\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_an_existing_file_keeps_its_mode(tmp_path):
    out = tmp_path / "script.sh"
    out.write_text("old\n")
    out.chmod(0o750)
    atomic_write(out, "new\n")
    assert out.read_text() == "new\n" and _mode(out) == 0o750


def test_a_new_file_gets_the_umask_default(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new") == 0o640


def test_a_symlink_is_followed_and_stays(tmp_path):
    target = tmp_path / "shared" / "hosts"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "hosts"
    link.symlink_to(target)
    assert atomic_write(link, "new\n") == target
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["hosts"]


def test_a_failed_rename_keeps_the_old_file_and_no_temporary(tmp_path, full_disk_rename):
    with old_file_kept(tmp_path / "f") as out, pytest.raises(OSError, match="No space left"):
        atomic_write(out, "new\n")


def test_an_error_of_the_writer_keeps_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "ckpt.pt"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(out) as f:
            f.write(b"half of the ne")
            raise KeyboardInterrupt  # an interrupt mid-write
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_the_temporary_file_is_beside_the_target_under_its_documented_name(tmp_path):
    out = tmp_path / "step-0000001.pt"
    with atomic_writer(out) as f:
        staged = sorted(p.name for p in tmp_path.iterdir())
        f.write(b"x")
    assert staged == [f".step-0000001.pt.tmp-{os.getpid()}"]  # checkpoint.store's remove_stale_temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001.pt"]


def test_a_stale_temporary_of_the_same_name_is_replaced(tmp_path):
    out = tmp_path / "f"
    fsutil.temporary_path(out).write_text("left by a killed writer with this process id")
    atomic_write(out, "new\n")
    assert out.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_directory_cannot_be_replaced(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "d", "x")
    assert (tmp_path / "d").is_dir() and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_fsync_directory_with_its_files(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "sub").mkdir()
    fsync_directory(tmp_path)
    fsync_directory(tmp_path, files=True)
    with pytest.raises(FileNotFoundError):
        fsync_directory(tmp_path / "missing")

"""-o onto special files (issue 18, defect 1): '-' is stdout, a FIFO or a character device is written as a stream
and never replaced by a regular file, /dev/stdout keeps what the shell redirected into; only regular files get the
atomic rename. For every command with -o: hostfile, sbatch, config."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import REPO

# Each command with -o, and the first line of what it writes.
COMMANDS = {
    "hostfile": (["hostfile", "--from", "hosts", "a:2"], "a slots=2"),
    "sbatch": (["sbatch", "jobs/demo.toml"], "#!/bin/bash"),
    "config": (["config", "jobs/demo.toml"], "[model]"),
}


def run(args: list[str], stdout=subprocess.PIPE, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hvdlm", *args],
        cwd=REPO,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_a_fifo_is_written_as_a_stream_and_stays_a_fifo(tmp_path, command):
    args, first = COMMANDS[command]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    proc = run([*args, "-o", str(fifo)])
    reader.join(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not replaced by a regular file
    assert received and received[0].startswith(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary file left beside it


@pytest.mark.parametrize("command", COMMANDS)
def test_a_character_device_stays_a_device(tmp_path, command):
    args, _ = COMMANDS[command]
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a device node like /dev/null, made here
    proc = run([*args, "-o", str(null)])
    assert proc.returncode == 0, proc.stderr
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


@pytest.mark.parametrize("command", COMMANDS)
def test_dash_is_stdout_not_a_file(tmp_path, command):
    args, first = COMMANDS[command]
    proc = subprocess.run(
        [sys.executable, "-m", "hvdlm", *[str(REPO / a) if a.startswith("jobs/") else a for a in args], "-o", "-"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(first)
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mode", ["a", "r+"])
def test_dev_stdout_keeps_what_the_shell_redirected_into(tmp_path, command, mode):
    """`>> log` (append) or `1<>log` (read-write, offset 0): the earlier content must stay either way."""
    args, first = COMMANDS[command]
    log = tmp_path / "log"
    log.write_text("earlier output\n")
    with log.open(mode) as out:
        proc = run([*args, "-o", "/dev/stdout"], stdout=out)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("earlier output\n") and text[len("earlier output\n") :].startswith(first)


def test_a_regular_file_still_gets_the_atomic_write(tmp_path):
    out = tmp_path / "hosts"
    out.write_text("old\n")
    os.chmod(out, 0o640)
    proc = run(["hostfile", "--from", "hosts", "a:2", "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "a slots=2\n" and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_a_block_device_is_refused_and_kept(tmp_path):
    block = tmp_path / "disk"
    os.mknod(block, stat.S_IFBLK | 0o600, os.makedev(7, 200))  # a loop device number; never opened
    proc = run(["hostfile", "--from", "hosts", "a:2", "-o", str(block)])
    assert proc.returncode == 2 and "is a block device" in proc.stderr and "Traceback" not in proc.stderr
    assert stat.S_ISBLK(os.lstat(block).st_mode)


def test_sbatch_to_a_stream_names_no_file_to_submit(tmp_path):
    """The header's 'sbatch FILE' hint must not name /dev/stdout or a FIFO as the script's file."""
    proc = run(["sbatch", "jobs/demo.toml", "-o", "-"])
    assert proc.returncode == 0, proc.stderr
    assert "sbatch FILE" in proc.stdout and "sbatch -\n" not in proc.stdout


def test_write_output_routes_by_kind(tmp_path, capsys):
    from hvdlm.launch.hostfile import output_is_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-stdout"
    link.symlink_to("/dev/stdout")
    assert output_is_file(str(tmp_path / "new.txt"))
    assert not output_is_file("-")
    assert not output_is_file("/dev/stdout") and not output_is_file("/dev/fd/1")
    assert not output_is_file(str(link))  # a link to a descriptor is a stream too
    assert not output_is_file(str(fifo))
    assert Path("/proc/self/status").exists() and output_is_file("/proc/self/status")  # refused by the write

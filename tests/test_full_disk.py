"""A full disk (ENOSPC) and a read-only one under `hvdlm data prepare`, `hvdlm plot` and `hvdlm export`: one line
naming the path and the cause, exit 2, no traceback, nothing half-written, and what was there before intact.

The disks are real: small tmpfs file systems mounted in the test's temporary directory (as root), never the
system's own. Without permission to mount, the tests skip and say why.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import train_once

PNGS = ["loss.png", "loss_tokens.png", "throughput.png"]


@pytest.fixture
def tmpfs(tmp_path, request):
    """mount(name, size, read_only=False) -> the mount point, a fresh tmpfs unmounted when the test ends."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "64k", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=True)


def _text_folder(path: Path, files: int, size: int) -> Path:
    """FILES documents of about SIZE bytes each: with byte tokens a dataset takes about twice that (uint16)."""
    path.mkdir()
    for i in range(files):
        line = f"document {i}: the quick brown fox jumps over the lazy dog.\n"
        (path / f"doc{i}.txt").write_text(line * (size // len(line) + 1))
    return path


def _fill(directory: Path) -> None:
    """Take every free byte of the file system (a file grown until ENOSPC)."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _one_error_line(r, *parts: str) -> None:
    assert r.code == 2, r.out
    assert "Traceback" not in r.out, r.out
    errors = [line for line in r.out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.out
    for part in parts:
        assert part in errors[0], r.out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_prepare_on_a_full_disk_keeps_the_old_dataset(hvdlm, tmpfs, tmp_path):
    # 128k: room for the small dataset (36k on tmpfs) while it is prepared: its work units beside its shards.
    disk = tmpfs("disk", "128k")
    out = disk / "ds"
    r = hvdlm("data", "prepare", str(_text_folder(tmp_path / "small", 4, 2_000)), "--out", str(out))
    assert r.code == 0, r.out
    before = _files(out)
    r = hvdlm("data", "prepare", str(_text_folder(tmp_path / "large", 8, 20_000)), "--out", str(out))
    _one_error_line(r, f"'{out}'", "No space left on device", "the dataset there is unchanged")
    assert _files(out) == before  # the old dataset, whole
    assert sorted(p.name for p in disk.iterdir()) == ["ds"]  # its staging directory is gone


def test_prepare_on_a_full_disk_leaves_nothing(hvdlm, tmpfs, tmp_path):
    disk = tmpfs("disk", "64k")
    r = hvdlm("data", "prepare", str(_text_folder(tmp_path / "large", 8, 20_000)), "--out", str(disk / "ds"))
    _one_error_line(r, f"'{disk / 'ds'}'", "No space left on device", "nothing was left behind")
    assert list(disk.iterdir()) == []


def test_prepare_onto_a_read_only_disk(hvdlm, tmpfs, tmp_path):
    disk = tmpfs("ro", "64k", read_only=True)
    r = hvdlm("data", "prepare", str(_text_folder(tmp_path / "src", 2, 1_000)), "--out", str(disk / "ds"))
    _one_error_line(r, f"'{disk / 'ds'}'", "Read-only file system")
    assert list(disk.iterdir()) == []


def _metrics_run(path: Path, steps: int = 30, scale: float = 1.0) -> Path:
    path.mkdir()
    rows = [{"step": 0, "tokens": 0, "val_loss": 5.5}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": scale * (5.5 - 0.05 * s), "tokens": 64 * s, "tokens_per_s": 900.0 + s})
    rows.append({"step": steps, "tokens": 64 * steps, "val_loss": 4.5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_on_a_full_disk_keeps_the_old_charts(hvdlm, tmpfs, tmp_path):
    disk = tmpfs("disk", "512k")
    charts = disk / "charts"
    r = hvdlm("plot", str(_metrics_run(tmp_path / "run")), "-o", str(charts))
    assert r.code == 0, r.out
    before = _files(charts)
    assert sorted(before) == PNGS
    _fill(disk)
    r = hvdlm("plot", str(_metrics_run(tmp_path / "other", scale=0.5)), "-o", str(charts))
    _one_error_line(r, str(charts / "loss.png"), "No space left on device")
    assert _files(charts) == before  # no 0-byte or half PNG, no temporary file beside them


def test_plot_on_a_full_disk_leaves_no_empty_chart(hvdlm, tmpfs, tmp_path):
    disk = tmpfs("disk", "16k")
    r = hvdlm("plot", str(_metrics_run(tmp_path / "run")), "-o", str(disk / "charts"))
    _one_error_line(r, str(disk / "charts"), "No space left on device")
    assert list(disk.iterdir()) == []  # the directory it made for the charts went with them


def test_plot_into_a_read_only_directory(hvdlm, tmpfs, tmp_path):
    disk = tmpfs("ro", "64k", read_only=True)
    run = _metrics_run(tmp_path / "run")
    r = hvdlm("plot", str(run), "-o", str(disk))  # exists, but nothing can be created in it
    _one_error_line(r, f"'{disk}'", "Read-only file system")
    r = hvdlm("plot", str(run), "-o", str(disk / "charts"))
    _one_error_line(r, f"'{disk / 'charts'}'", "Read-only file system")
    assert list(disk.iterdir()) == []


@pytest.fixture(scope="module")
def small_run(job, cache_dir, tmp_path_factory) -> Path:
    """A 2-step run with its final checkpoint (about 140 KB of weights)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    settings = ("train.max_steps=2", "train.sample_tokens=0", "train.tensorboard=false", "train.eval_interval=0")
    return train_once(job, run_dir, *settings, cache=cache_dir).run_dir


def test_export_onto_a_full_disk_leaves_nothing(hvdlm, tmpfs, small_run):
    disk = tmpfs("export", "64k")  # safetensors' weights file does not fit
    r = hvdlm("export", str(small_run), "-o", str(disk / "hf"))
    _one_error_line(r, str(disk / "hf"), "No space left on device", "Nothing was written")
    assert list(disk.iterdir()) == []


def test_export_onto_a_read_only_disk(hvdlm, tmpfs, small_run):
    disk = tmpfs("export-ro", read_only=True)
    r = hvdlm("export", str(small_run), "-o", str(disk / "hf"))
    _one_error_line(r, str(disk / "hf"), "Read-only file system")

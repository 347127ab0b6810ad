"""Training onto a file system that fills up: every rank stops together with one line naming the file and the
cause, and what was written before (the earlier checkpoint) is intact. Real tmpfs mounts, real ranks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import Result, sets

from hvdlm.checkpoint.reshard import load_full_state
from hvdlm.checkpoint.store import find_checkpoints

pytestmark = pytest.mark.distributed


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size under tmp_path; unmounted afterwards."""
    mounts = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if proc.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here (root in a VM or container that allows mounts is needed): {proc.stderr!r}"
            )
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)])


def launch_onto_a_full_disk(hvdlm, job: Path, run_dir: Path, *overrides: str) -> Result:
    """`hvdlm launch JOB --np 2` with its run directory on a disk too small for it: exit 2, one error line for all
    the ranks (one rank speaks for all), and no traceback."""
    r = hvdlm("launch", str(job), "--np", "2", "--run-dir", str(run_dir), *sets(*overrides, "train.tensorboard=false"))
    assert r.code == 2, r.out[-3000:]
    assert r.out.count("Error: ") == 1, r.out[-3000:]
    assert "Traceback" not in r.out and "HorovodInternalError" not in r.out
    return r


def test_a_full_disk_at_a_checkpoint_stops_every_rank_and_keeps_the_earlier_one(hvdlm, tiny_job, small_disk):
    # The tiny job's checkpoint takes about 450 KB: the one of step 4 fits, the one of step 8 does not.
    run_dir = small_disk("700k") / "run"
    r = launch_onto_a_full_disk(hvdlm, tiny_job, run_dir, "train.checkpoint_interval=4")
    assert f"cannot write checkpoint '{run_dir}/checkpoints/step-0000008.pt': No space left on device" in r.out
    assert "the checkpoint of step 4 is intact" in r.out
    assert [saved.step for saved in find_checkpoints(run_dir)] == [4]
    assert load_full_state(run_dir / "checkpoints" / "step-0000004.pt")["step"] == 4
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "a half-written temporary file was left"


def test_a_full_disk_at_a_zero_checkpoint_keeps_the_earlier_one_whole(hvdlm, tiny_job, small_disk):
    """ZeRO-1: a save is the shard file and one optimizer-state slice per DP rank, written by different ranks; the
    disk fills somewhere among them. The earlier save stays complete and loads; nothing of the broken one is left."""
    run_dir = small_disk("700k") / "run"
    r = launch_onto_a_full_disk(hvdlm, tiny_job, run_dir, "train.checkpoint_interval=4", "train.zero=1")
    assert f"cannot write checkpoint '{run_dir}/checkpoints/step-0000008" in r.out, r.out[-3000:]
    assert "No space left on device" in r.out and "the checkpoint of step 4 is intact" in r.out
    assert [saved.step for saved in find_checkpoints(run_dir)] == [4]
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-0000004*.pt"))
    assert names == ["step-0000004.pt", "step-0000004.zero0-of-2.pt", "step-0000004.zero1-of-2.pt"]
    state = load_full_state(run_dir / "checkpoints" / "step-0000004.pt")
    assert state["step"] == 4 and state["optimizer"]["state"], "the slices did not assemble to the whole state"
    # The ranks whose files of step 8 were written whole took them back: nothing of the failed save is left.
    assert not list((run_dir / "checkpoints").glob("step-0000008*")), "a file of the failed save was left"
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "a half-written temporary file was left"


def test_a_full_disk_under_the_metrics_stops_every_rank_naming_the_file(hvdlm, tiny_job, small_disk):
    # Two pages: config.toml takes one, metrics.jsonl fills the other within a few dozen rows.
    run_dir = small_disk("8k") / "run"
    r = launch_onto_a_full_disk(hvdlm, tiny_job, run_dir, "train.max_steps=200", "train.eval_interval=0")
    assert f"cannot write '{run_dir}/metrics.jsonl': No space left on device" in r.out

"""Checksums of real saves: every file of a save in its manifest (one rank, and two ranks with ZeRO-1 slices),
`hvdlm checkpoint verify` on good and damaged checkpoints, and the readers refusing a damaged file by name while
`--resume auto` passes over it to the checkpoint before. One tiny run is trained once per module."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import mpirun, sets, train_argv, train_once

SETTINGS = ("train.checkpoint_interval=4", "train.sample_tokens=0", "train.tensorboard=false")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, job, cache_dir) -> Path:
    """An 8-step run with checkpoints at steps 4 and 8."""
    return train_once(job, tmp_path_factory.mktemp("verify") / "run", *SETTINGS, cache=cache_dir).run_dir


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _manifest(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:07d}.manifest.json").read_text())


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the tensors: torch would load it without a word
    path.write_bytes(bytes(data))


def test_a_clean_run_has_a_manifest_per_save_and_verifies(hvdlm, trained):
    for step in (4, 8):
        manifest = _manifest(trained, step)
        ckpt = trained / "checkpoints" / f"step-{step:07d}.pt"
        assert manifest["step"] == step and manifest["digest"] == "sha256"
        assert manifest["files"] == {
            ckpt.name: {"bytes": ckpt.stat().st_size, "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
        }
    r = hvdlm("checkpoint", "verify", trained)
    assert r.code == 0, r.out
    assert "step-0000008: ok" in r.out and "step-0000004: ok" in r.out and "2 of 2 checkpoint(s) good" in r.out
    one = hvdlm("checkpoint", "verify", trained / "checkpoints" / "step-0000004.pt")
    assert one.code == 0 and "step-0000004: ok" in one.out and "step-0000008" not in one.out, one.out


def test_a_flipped_byte_is_named_refused_and_resume_falls_back(hvdlm, copy, job):
    newest = copy / "checkpoints" / "step-0000008.pt"
    _flip_byte(newest)
    r = hvdlm("checkpoint", "verify", copy)
    assert r.code == 2, r.out
    assert "step-0000008: FAILED: step-0000008.pt differs from what was written" in r.out, r.out
    assert "step-0000004: ok" in r.out and "Traceback" not in r.out
    merge = hvdlm("checkpoint", "merge", newest, "-o", copy / "merged.pt")
    assert merge.code == 2 and "fails its checksum" in merge.out and str(newest) in merge.out, merge.out
    assert "Traceback" not in merge.out and not (copy / "merged.pt").exists()
    # --resume auto: the damaged step 8 is passed over with a warning; steps 5 to 8 are trained again from step 4.
    again = hvdlm(*train_argv(job, copy, "--resume", "auto", *sets(*SETTINGS))[3:])
    assert again.code == 0, again.out[-3000:]
    assert "WARNING: skipping checkpoint step 8" in again.out and "step-0000008.pt differs" in again.out
    assert hvdlm("checkpoint", "verify", copy).code == 0  # step 8 written again, with its new manifest


def test_a_truncated_file_and_a_missing_file_are_one_message_each(hvdlm, copy):
    folder = copy / "checkpoints"
    four, eight = folder / "step-0000004.pt", folder / "step-0000008.pt"
    size = eight.stat().st_size
    eight.write_bytes(eight.read_bytes()[:1000])
    four.unlink()
    r = hvdlm("checkpoint", "verify", copy)
    assert r.code == 2 and "Traceback" not in r.out, r.out
    assert f"step-0000008: FAILED: step-0000008.pt is truncated (1,000 bytes, {size:,} written)" in r.out, r.out
    assert "step-0000004: FAILED: step-0000004.pt is missing (its manifest lists it)" in r.out, r.out
    assert len(r.out.strip().splitlines()) == 3  # one line per checkpoint, and the total
    init = hvdlm("checkpoint", "merge", eight, "-o", copy / "merged.pt")
    assert init.code == 2 and "is truncated" in init.out and "Traceback" not in init.out, init.out


def test_a_checkpoint_without_a_manifest_loads_as_before(hvdlm, copy):
    for step in (4, 8):
        (copy / "checkpoints" / f"step-{step:07d}.manifest.json").unlink()
    r = hvdlm("checkpoint", "verify", copy)
    assert r.code == 0 and "step-0000008: ok (no manifest" in r.out, r.out
    merge = hvdlm("checkpoint", "merge", copy / "checkpoints" / "step-0000008.pt", "-o", copy / "merged.pt")
    assert merge.code == 0, merge.out


def test_a_two_rank_zero_save_lists_every_file(hvdlm, job, tmp_path, cache_dir):
    run_dir = tmp_path / "zero"
    r = mpirun(2, train_argv(job, run_dir, *sets(*SETTINGS, "train.zero=1")), cache=cache_dir)
    assert r.code == 0, r.out[-3000:]
    for step in (4, 8):
        on_disk = {p.name for p in (run_dir / "checkpoints").glob(f"step-{step:07d}*.pt")}
        assert len(on_disk) == 3  # the shard and its two ZeRO slices
        assert set(_manifest(run_dir, step)["files"]) == on_disk
    assert hvdlm("checkpoint", "verify", run_dir).code == 0
    _flip_byte(run_dir / "checkpoints" / "step-0000008.zero1-of-2.pt")
    bad = hvdlm("checkpoint", "verify", run_dir)
    assert bad.code == 2 and "step-0000008.zero1-of-2.pt differs" in bad.out, bad.out

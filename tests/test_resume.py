"""Runs that survive: exact resume after SIGKILL, damaged checkpoints, preemption signals, bad checkpoints.

Real ranks under mpirun (2 unless said otherwise), no mocks. The reference is one uninterrupted 2-rank run with
dropout (so the resumed run must restore the random streams too), a checkpoint every 2 steps and 2 kept; every
interrupted run must end with the same metrics.jsonl (every step's loss compared with ==, bit-identical on CPU
in fp32) and the same final parameters (summary.json's replica checksums).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import run_cli, sets, summary, train_argv
from survive import (
    Job,
    ckpt_steps,
    comparable,
    last_step,
    rows,
    run,
    snapshot,
    wait_for_step,
)

pytestmark = pytest.mark.distributed

STEPS = 40
COMMON = (
    f"train.max_steps={STEPS}",
    "model.dropout=0.1",
    "train.checkpoint_interval=2",
    "train.keep_checkpoints=2",
    "train.eval_interval=8",
    "train.sample_tokens=0",
    "train.log_interval=1",
    "train.tensorboard=false",
)
# The step to kill at is random, from a seed printed with every failure; HVDLM_TEST_SEED=N replays one.
SEED = int(os.environ.get("HVDLM_TEST_SEED") or random.SystemRandom().randrange(1 << 30))


@pytest.fixture
def jobs():
    """Background jobs of a test; any still running at its end are killed."""
    started: list[Job] = []
    yield started
    for j in started:
        if j.proc.poll() is None:
            j.kill()


def reference_run(np: int, job: Path, run_dir: Path, cache: Path, *extra: str, flags: tuple[str, ...] = ()) -> Path:
    proc = run(np, train_argv(job, run_dir, *flags, *sets(*COMMON, *extra)), cache)
    assert proc.code == 0, proc.out[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory, cache_dir) -> Path:
    return reference_run(2, job, tmp_path_factory.mktemp("resume-ref") / "run", cache_dir)


def assert_same_run(got: Path, ref: Path, note: str = "") -> None:
    a, b = comparable(got), comparable(ref)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"{note}row {i} differs: resumed {x} vs uninterrupted {y}"
    assert len(a) == len(b), f"{note}{len(a)} rows vs {len(b)} uninterrupted"
    s, r = summary(got), summary(ref)
    assert s["replica_checksums"] == r["replica_checksums"], note
    assert s["replicas_identical"]


def copy_run(ref: Path, dest: Path) -> Path:
    shutil.copytree(ref, dest)
    return dest


def resume(np: int, job: Path, run_dir: Path, cache: Path, *extra: str):
    return run(np, train_argv(job, run_dir, "--resume", "auto", *sets(*COMMON, *extra)), cache)


# --- the reference itself -----------------------------------------------------------------------------------


def test_the_reference_keeps_the_two_newest_checkpoints_and_learns(reference):
    assert ckpt_steps(reference) == [STEPS - 2, STEPS]  # keep_checkpoints = 2, checkpoint_interval = 2
    losses = [r["loss"] for r in rows(reference) if "loss" in r]
    assert [r["step"] for r in rows(reference) if "loss" in r] == list(range(1, STEPS + 1))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    state = torch.load(reference / "checkpoints" / f"step-{STEPS:07d}.pt", weights_only=True)
    assert state["step"] == STEPS
    assert {"model", "optimizer", "config", "tp", "data", "rng"} <= state.keys()
    assert len(state["rng"]) == 2  # one random state per rank of the DP group


# --- SIGKILL at a random step -------------------------------------------------------------------------------


def kill_and_resume(
    np: int, job: Path, run_dir: Path, cache: Path, kill_at: int, jobs: list, *extra: str, says: str = ""
):
    """Start the run, SIGKILL all its processes once metrics.jsonl shows step kill_at, resume (its output saying
    `says`); returns the step seen and the checkpoints there were at the kill."""
    j = Job(np, train_argv(job, run_dir, *sets(*COMMON, *extra)), cache, run_dir.parent / f"{run_dir.name}.log")
    jobs.append(j)
    seen = wait_for_step(j, run_dir, kill_at)
    j.kill()
    assert j.proc.returncode == -signal.SIGKILL
    assert last_step(run_dir) < STEPS, "the run finished before the kill: nothing was tested"
    at_kill = ckpt_steps(run_dir) if (run_dir / "checkpoints").is_dir() else []
    r = resume(np, job, run_dir, cache, *extra)
    assert r.code == 0, r.out[-4000:]
    assert not at_kill or says in r.out, r.out[-4000:]
    return seen, at_kill


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, job, tmp_path, cache_dir, jobs):
    kill_at = random.Random(SEED).randint(3, STEPS - 15)
    note = f"(HVDLM_TEST_SEED={SEED}: kill at step >= {kill_at}) "
    seen, at_kill = kill_and_resume(2, job, tmp_path / "run", cache_dir, kill_at, jobs)
    print(note, f"killed after step {seen} with checkpoints {at_kill}")
    assert at_kill, "killed before the first checkpoint: the resume was not tested"
    assert_same_run(tmp_path / "run", reference, note)
    assert ckpt_steps(tmp_path / "run") == [STEPS - 2, STEPS]


def test_one_rank_killed_before_its_first_checkpoint_starts_fresh_and_matches(job, tmp_path, cache_dir, jobs):
    """1 rank; the kill comes at step 1, before any checkpoint: --resume auto starts over, and the file of rows
    still equals the uninterrupted run's (no duplicate step-0 evaluation, no stale rows). The uninterrupted run
    itself starts with --resume auto in a new directory, as the first start of a requeueable Slurm job does."""
    extra = ("train.checkpoint_interval=10",)
    ref = reference_run(1, job, tmp_path / "ref", cache_dir, *extra, flags=("--resume", "auto"))
    assert [r["step"] for r in rows(ref) if "loss" in r] == list(range(1, STEPS + 1))
    seen, at_kill = kill_and_resume(1, job, tmp_path / "run", cache_dir, 1, jobs, *extra)
    assert at_kill == [], f"killed after step {seen}, past the first checkpoint: not the case this test is for"
    assert_same_run(tmp_path / "run", ref, f"(killed after step {seen}) ")


def test_tp2_killed_at_a_random_step_resumes_bit_identical(job, tmp_path, cache_dir, jobs):
    """Tensor parallel, tp = 2 on 2 ranks: each rank writes its shard; both shards and the RNG come back, each rank
    reading only its own shard file. With 2 micro-batches per step (the data position counts them) and an EMA
    (sharded too; validation uses it)."""
    extra = ("parallel.tp=2", "train.accumulation_steps=2", "train.ema_decay=0.9")
    ref = reference_run(2, job, tmp_path / "ref", cache_dir, *extra)
    assert sorted(p.name for p in (ref / "checkpoints").glob("*.pt")) == [
        f"step-{s:07d}.tp{r}-of-2.pt" for s in (STEPS - 2, STEPS) for r in (0, 1)
    ]
    kill_at = random.Random(SEED + 1).randint(3, STEPS - 15)
    own = "(each rank read its own files)"
    seen, at_kill = kill_and_resume(2, job, tmp_path / "run", cache_dir, kill_at, jobs, *extra, says=own)
    assert at_kill, "killed before the first checkpoint: the resume was not tested"
    assert_same_run(tmp_path / "run", ref, f"(HVDLM_TEST_SEED={SEED}: tp2 killed after step {seen}) ")


# --- damaged checkpoints ------------------------------------------------------------------------------------


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, job, tmp_path, cache_dir):
    run_dir = copy_run(reference, tmp_path / "run")
    newest = run_dir / "checkpoints" / f"step-{STEPS:07d}.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn: half of it
    r = resume(2, job, run_dir, cache_dir)
    assert r.code == 0, r.out[-4000:]
    assert r.out.count(f"skipping checkpoint step {STEPS}") == 1, r.out[-4000:]
    assert "Traceback" not in r.out
    # Resumed from step 38: steps 39 and 40 retrained, exactly as the first time.
    assert_same_run(run_dir, reference)
    assert torch.load(newest, weights_only=True)["step"] == STEPS  # rewritten whole
    assert ckpt_steps(run_dir) == [STEPS - 2, STEPS]


def test_resume_from_a_named_older_checkpoint_recomputes_the_steps_after_it(reference, job, tmp_path, cache_dir):
    run_dir = copy_run(reference, tmp_path / "run")
    r = run(
        2,
        train_argv(job, run_dir, "--resume", str(run_dir / "checkpoints" / f"step-{STEPS - 2:07d}.pt"), *sets(*COMMON)),
        cache_dir,
    )
    assert r.code == 0, r.out[-4000:]
    assert_same_run(run_dir, reference)  # the rows of steps 39 and 40 were dropped and written again


def test_no_readable_checkpoint_is_an_error_and_changes_nothing(reference, job, tmp_path, cache_dir):
    run_dir = copy_run(reference, tmp_path / "run")
    for p in (run_dir / "checkpoints").iterdir():
        p.write_bytes(b"garbage, not a checkpoint\n")
    before, metrics = snapshot(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_bytes()
    r = resume(2, job, run_dir, cache_dir)
    assert r.code == 2, r.out[-4000:]
    assert "Traceback" not in r.out
    assert f"skipping checkpoint step {STEPS}" in r.out and f"skipping checkpoint step {STEPS - 2}" in r.out
    assert snapshot(run_dir / "checkpoints") == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


# --- preemption: SIGUSR1 / SIGTERM --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, sig", [("rank 1", signal.SIGUSR1), ("rank 0", signal.SIGTERM), ("mpirun", signal.SIGUSR1)]
)
def test_a_preemption_signal_checkpoints_exits_75_and_resumes_exactly(
    reference, job, tmp_path, cache_dir, jobs, target, sig
):
    """The signal reaches one rank (not the one that reports) or mpirun, which forwards SIGUSR1 to the ranks.
    (SIGTERM to mpirun is no case here: Open MPI answers it by SIGTERM to the ranks and SIGKILL soon after.)"""
    run_dir = tmp_path / "run"
    j = Job(2, train_argv(job, run_dir, *sets(*COMMON)), cache_dir, tmp_path / "run.log")
    jobs.append(j)
    pids = j.rank_pids()
    wait_for_step(j, run_dir, 3)
    os.kill(j.proc.pid if target == "mpirun" else pids[int(target[-1])], sig)
    code = j.wait(120)
    out = j.out
    assert code == 75, f"mpirun exit {code}:\n{out[-4000:]}"
    # The contract's line; a note before the colon, "(SIGUSR1)" or "(signal on another rank)", is welcome.
    m = re.search(r"preempted at step (\d+)(?: \([^)]*\))?: checkpoint written; resume with --resume auto", out)
    assert m, out[-4000:]
    stop = int(m.group(1))
    assert 3 <= stop < STEPS
    assert out.count("preempted at step") == 1  # rank 0 alone reports
    assert stop in ckpt_steps(run_dir), (stop, ckpt_steps(run_dir))
    assert last_step(run_dir) == stop
    assert "Traceback" not in out
    if target != "rank 1":
        return  # the resume is the same whichever signal stopped the run: one case pays for it
    r = resume(2, job, run_dir, cache_dir)
    assert r.code == 0, r.out[-4000:]
    assert_same_run(run_dir, reference, f"(preempted at step {stop}) ")


def test_local_sgd_preempted_runs_on_to_its_averaging_step_and_resumes_exactly(job, tmp_path, cache_dir, jobs):
    """Local SGD (H = 4): replicas agree only where they average, so the stop and its checkpoint land there."""
    extra = ("train.optimizer=sgd", "train.lr=0.3", "train.local_sgd_interval=4", "train.checkpoint_interval=4")
    ref = reference_run(2, job, tmp_path / "ref", cache_dir, *extra)
    run_dir = tmp_path / "run"
    j = Job(2, train_argv(job, run_dir, *sets(*COMMON, *extra)), cache_dir, tmp_path / "run.log")
    jobs.append(j)
    pids = j.rank_pids()
    wait_for_step(j, run_dir, 5)
    os.kill(pids[1], signal.SIGUSR1)
    code = j.wait(120)
    assert code == 75, f"mpirun exit {code}:\n{j.out[-4000:]}"
    stop = int(re.search(r"preempted at step (\d+)", j.out).group(1))
    assert stop % 4 == 0 and stop < STEPS and stop in ckpt_steps(run_dir), (stop, ckpt_steps(run_dir))
    r = resume(2, job, run_dir, cache_dir, *extra)
    assert r.code == 0, r.out[-4000:]
    assert_same_run(run_dir, ref, f"(local SGD preempted at step {stop}) ")


# --- bad checkpoints and names: exit 2, no traceback, nothing changed --------------------------------------


def test_resume_with_a_checkpoint_of_another_shape_is_refused(reference, job, tmp_path, cache_dir):
    run_dir = copy_run(reference, tmp_path / "run")
    before, metrics = snapshot(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_bytes()
    config = (run_dir / "config.toml").read_bytes()
    r = resume(2, job, run_dir, cache_dir, "model.d_model=64")
    assert r.code == 2, r.out[-4000:]
    assert "d_model" in r.out and "Traceback" not in r.out, r.out[-4000:]
    assert snapshot(run_dir / "checkpoints") == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert (run_dir / "config.toml").read_bytes() == config


def test_resume_past_max_steps_damages_no_checkpoint(reference, job, tmp_path, cache_dir):
    """The newest checkpoint is at step 40 and max_steps is lowered to 38: there is nothing to train, and the
    step-38 checkpoint must not be overwritten by the weights of step 40 (a clear error, exit 2, is best)."""
    run_dir = copy_run(reference, tmp_path / "run")
    before, metrics = snapshot(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_bytes()
    r = resume(2, job, run_dir, cache_dir, f"train.max_steps={STEPS - 2}")
    assert "Traceback" not in r.out
    assert snapshot(run_dir / "checkpoints") == before, f"exit {r.code}, checkpoints rewritten:\n{r.out[-3000:]}"
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert r.code == 2, r.out[-3000:]


@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("foreign")
    torch.save(torch.zeros(3), d / "tensor.pt")
    (d / "text.pt").write_text("not a checkpoint\n")
    return d


@pytest.mark.parametrize(
    "option, name, message",
    [
        ("--init-from", "missing.pt", "missing.pt"),
        ("--init-from", "tensor.pt", "holds a Tensor, not a checkpoint"),
        ("--init-from", "text.pt", "truncated, damaged or not a checkpoint"),
        ("--resume", "text.pt", "truncated, damaged or not a checkpoint"),
        ("--resume", "missing.pt", "missing.pt"),
    ],
)
def test_a_missing_or_foreign_checkpoint_is_refused(job, tmp_path, cache_dir, foreign_files, option, name, message):
    before = snapshot(foreign_files)
    run_dir = tmp_path / "run"
    r = run(0, train_argv(job, run_dir, option, str(foreign_files / name), *sets(*COMMON)), cache_dir)
    assert r.code == 2, r.out[-4000:]
    assert message in r.out and "Traceback" not in r.out, r.out[-4000:]
    assert snapshot(foreign_files) == before
    assert not (run_dir / "metrics.jsonl").exists()


def test_init_from_a_run_directory_starts_at_step_0_from_its_weights(reference, job, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    before = snapshot(reference / "checkpoints")
    r = run(2, train_argv(job, run_dir, "--init-from", str(reference), *sets(*COMMON, "train.max_steps=4")), cache_dir)
    assert r.code == 0, r.out[-4000:]
    got = [row for row in rows(run_dir) if "loss" in row]
    assert [row["step"] for row in got] == [1, 2, 3, 4]  # a new run: step 0, its own schedule
    first_fresh = next(row["loss"] for row in rows(reference) if "loss" in row)
    assert got[0]["loss"] < first_fresh - 0.5  # trained weights, not a fresh initialisation
    assert snapshot(reference / "checkpoints") == before


def test_launch_passes_resume_and_init_from_to_every_rank(tmp_path, job):
    (tmp_path / "other").mkdir()  # the launcher checks that --init-from is there (a transformers directory here)
    (tmp_path / "other" / "config.json").write_text("{}")
    r = run_cli(
        *("launch", job, "--np", "2", "--dry-run", "--run-dir", tmp_path / "r"),
        *("--resume", "auto", "--init-from", tmp_path / "other"),
        timeout=60,
    )
    assert r.code == 0, r.out
    assert "--resume auto" in r.out, r.out
    # --init-from X is --set train.init_from=X: either spelling reaches the ranks.
    other = re.escape(str(tmp_path / "other"))
    assert re.search(rf"--init-from {other}|train\.init_from=\"?{other}", r.out), r.out

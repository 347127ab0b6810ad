"""`hvdlm runs [DIR]`: run directories and their state, from a real run copied into every state it can be in.

One tiny real run is trained once per module; the other states are that run's files as a crash, a preemption or a
live run leaves them (summary.json gone, rows after a checkpoint, modification times moved).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, train_once

from hvdlm.watch.runs import list_runs, render_table

HOUR_AGO = time.time() - 3600


@pytest.fixture(scope="module")
def trained(tmp_path_factory, job, cache_dir) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("runs-src") / "done"
    settings = ["train.checkpoint_interval=4", "train.sample_tokens=0", "train.tensorboard=false"]
    return train_once(job, run_dir, *settings, cache=cache_dir).run_dir


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _age(run: Path, when: float) -> None:
    for p in [run, *run.rglob("*")]:
        os.utime(p, (when, when))


def _variant(trained: Path, dest: Path, keep_rows_to: int | None = None, drop_steps: tuple[int, ...] = ()) -> Path:
    """A copy of the run without summary.json, its metrics cut after step `keep_rows_to`, some checkpoints gone."""
    shutil.copytree(trained, dest)
    (dest / "summary.json").unlink()
    if keep_rows_to is not None:
        rows = [r for r in _rows(dest) if r["step"] <= keep_rows_to]
        (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in drop_steps:
        (dest / "checkpoints" / f"step-{step:07d}.pt").unlink()
    return dest


@pytest.fixture(scope="module")
def runs_dir(trained, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(trained, root / "finished")
    _variant(trained, root / "running", keep_rows_to=6, drop_steps=(8,))  # fresh files: still writing
    # Stopped at its checkpoint of step 4 (a preemption: the agreed step is checkpointed, then the ranks exit).
    _age(_variant(trained, root / "preempted", keep_rows_to=4, drop_steps=(8,)), HOUR_AGO)
    # Logged steps 5..8 after its last checkpoint, then died.
    _age(_variant(trained, root / "crashed", drop_steps=(8,)), HOUR_AGO)
    _age(_variant(trained, root / "no-checkpoint", keep_rows_to=3, drop_steps=(4, 8)), HOUR_AGO)
    # A finished run resumed with more steps, and stopped: its old summary covers 8 of 16.
    grown = root / "grown"
    shutil.copytree(trained, grown)
    config = (grown / "config.toml").read_text()
    (grown / "config.toml").write_text(config.replace("max_steps = 8", "max_steps = 16"))
    _age(grown, HOUR_AGO)
    (root / "notes").mkdir()  # not a run: no config.toml, no metrics.jsonl
    (root / "README.txt").write_text("my runs\n")
    return root


def _by_name(runs) -> dict:
    return {r["name"] if isinstance(r, dict) else r.name: r for r in runs}


def test_states_from_the_files(runs_dir):
    runs = _by_name(list_runs(runs_dir))
    assert sorted(runs) == ["crashed", "finished", "grown", "no-checkpoint", "preempted", "running"]
    states = {name: r.state for name, r in runs.items()}
    assert states == {
        "finished": "finished",
        "running": "running",
        "preempted": "preempted",
        "crashed": "failed",
        "no-checkpoint": "failed",
        "grown": "preempted",  # stopped at its step-8 checkpoint, 8 of 16 steps done
    }
    # The same files an hour later: nothing is running any more.
    later = _by_name(list_runs(runs_dir, now=time.time() + 3600))
    assert later["running"].state == "failed"  # rows up to 6, checkpoint at 4


def test_progress_losses_throughput_and_checkpoint(runs_dir, trained):
    rows = _rows(trained)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    runs = _by_name(list_runs(runs_dir))
    done = runs["finished"]
    assert (done.step, done.max_steps) == (8, 8)
    assert done.loss == train[-1]["loss"] and done.val_loss == val[-1]["val_loss"]
    assert done.tokens_per_s == train[-1]["tokens_per_s"]
    assert done.checkpoint == str(runs_dir / "finished" / "checkpoints" / "step-0000008.pt")
    preempted = runs["preempted"]
    assert (preempted.step, preempted.checkpoint_step) == (4, 4)
    assert preempted.loss == train[3]["loss"] and preempted.val_loss == val[1]["val_loss"]  # evaluated at 0, 4
    assert runs["grown"].max_steps == 16
    nothing = runs["no-checkpoint"]
    assert nothing.checkpoint is None and nothing.val_loss == val[0]["val_loss"]


def test_the_table_and_json_from_the_command(hvdlm, runs_dir):
    r = hvdlm("runs", str(runs_dir))
    assert r.code == 0, r.out
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STATE", "STEP"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert table["finished"][1:3] == ["finished", "8/8"] and "step-0000008.pt" in table["finished"]
    assert table["preempted"][1:3] == ["preempted", "4/8"] and "step-0000004.pt" in table["preempted"]
    assert table["grown"][2] == "8/16"
    r = hvdlm("runs", str(runs_dir), "--json")
    assert r.code == 0, r.out
    runs = _by_name(json.loads(r.out))
    assert runs["crashed"]["state"] == "failed" and runs["crashed"]["checkpoint_step"] == 4
    assert runs["finished"]["max_steps"] == 8 and runs["finished"]["step"] == 8
    # A run directory named itself is listed alone.
    r = hvdlm("runs", str(runs_dir / "finished"), "--json")
    assert [x["name"] for x in json.loads(r.out)] == ["finished"]


def test_the_default_directory_and_bad_input(hvdlm, tmp_path):
    r = hvdlm("runs")  # runs/ of the working directory (the repository root here), which need not exist
    assert r.code in (0, 2) and "Traceback" not in r.out
    r = hvdlm("runs", str(tmp_path / "missing"))
    assert r.code == 2 and "does not exist" in r.out and "Traceback" not in r.out
    (tmp_path / "file").write_text("x")
    r = hvdlm("runs", str(tmp_path / "file"))
    assert r.code == 2 and "is a file" in r.out
    (tmp_path / "empty").mkdir()
    r = hvdlm("runs", str(tmp_path / "empty"))
    assert r.code == 0 and "no runs under" in r.out
    assert hvdlm("runs", str(tmp_path / "empty"), "--json").out.strip() == "[]"


def test_a_damaged_config_and_torn_metrics_are_shown_not_fatal(tmp_path):
    run = tmp_path / "runs" / "odd"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[train\nmax_steps = ")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "tokens_per_s": 10}\n{"step": 2, "lo')
    [info] = list_runs(tmp_path / "runs", now=time.time() + 3600)
    assert (info.step, info.loss, info.max_steps, info.state) == (1, 2.5, None, "failed")
    assert "config.toml unreadable" in info.note
    assert "odd: config.toml unreadable" in render_table([info])


def test_the_last_rows_of_a_long_metrics_file(tmp_path):
    """Read from the end in blocks: the last evaluation row lies many blocks before the last training row."""
    run = tmp_path / "runs" / "long"
    run.mkdir(parents=True)
    rows = [{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 4.25}]
    rows += [{"step": s, "loss": 1000.0 / s, "tokens_per_s": float(s), "pad": "x" * 40} for s in range(11, 20_011)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (run / "metrics.jsonl").stat().st_size > 1_000_000
    [info] = list_runs(tmp_path / "runs")
    assert (info.step, info.loss, info.val_loss, info.tokens_per_s) == (20_010, 1000.0 / 20_010, 4.25, 20_010.0)


def test_runs_never_imports_torch_horovod_mpi4py_or_numpy(runs_dir):
    code = (
        "import sys\n"
        "from hvdlm.cli import main\n"
        "try:\n"
        "    main(['runs', sys.argv[1], '--json'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted({'torch', 'horovod', 'mpi4py', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, f'hvdlm runs imported {heavy}'"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(runs_dir)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

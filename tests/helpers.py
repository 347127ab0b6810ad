"""What the tests share, in one place: the repository, a tiny job, running the real `hvdlm` CLI in a subprocess,
starting programs on real MPI ranks, reading a run directory, and the check that a command imports nothing heavy.

Fixtures built on these are in conftest.py; tests import from here, never from conftest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small enough that a multi-rank run takes seconds on 2 cores, big enough to learn something.
TINY_JOB = """
[model]
n_layer = 2
n_head = 2
d_model = 32
seq_len = 32

[train]
batch_size = 4
max_steps = 8
lr = 3e-3
warmup_steps = 2
log_interval = 1
eval_interval = 4
eval_batches = 2
sample_tokens = 16
"""

# What job preparation (hostfile, sbatch, launch, data prepare) must never import: it answers at once on a login
# node, where loading these takes seconds.
HEAVY = ("torch", "horovod", "mpi4py", "numpy")


# ------------------------------------------------------------------------------------------------------------
# A run directory
# ------------------------------------------------------------------------------------------------------------


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a finished run, every row."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir) if "loss" in row]


def assert_losses_match(reference: Path, run: Path, steps: int, name: str, rel: float = 1e-5) -> None:
    """`run` logged a loss at each of `steps` steps equal to `reference`'s within `rel`, and the reference learned
    (so a wrong gradient anywhere would have shown)."""
    ref, got = losses(reference), losses(run)
    assert len(ref) == len(got) == steps
    for step, (a, b) in enumerate(zip(ref, got), start=1):
        assert abs(a - b) / abs(a) <= rel, f"step {step}: reference {a} vs {name} {b}"
    assert ref[-1] < ref[0] - 0.3


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def sets(*overrides: str) -> list[str]:
    """`--set` before each override."""
    return [a for o in overrides for a in ("--set", o)]


@contextmanager
def old_file_kept(path: Path) -> Iterator[Path]:
    """`path`, holding "old\n": a write of it in the block must fail and leave it so, with no temporary file left
    beside it (the test's full_disk_rename fixture makes it fail)."""
    path.write_text("old\n")
    yield path
    assert path.read_text() == "old\n"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "a temporary file was left behind"


def demo_sbatch_spec(**changes):
    """The batch script of a small CPU job (jobs/demo.toml on the shared file system; 1 node, 2 ranks of 1 CPU, an
    hour) as an SbatchSpec, with `changes` to its fields."""
    from hvdlm.launch.sbatch import SbatchSpec  # here, so that conftest (which imports this file) imports no hvdlm

    fields = dict(job_name="demo", job_file="/shared/jobs/demo.toml", nodes=1, gpus_per_node=0, ntasks_per_node=2)
    return SbatchSpec(**{**fields, "cpus_per_task": 1, "time": "01:00:00", **changes})


# ------------------------------------------------------------------------------------------------------------
# Running programs
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str  # stdout, with stderr in it unless run with split=True
    run_dir: Path | None = None  # the --run-dir of the command, if it named one
    err: str = ""  # stderr, when run with split=True

    def metrics(self) -> list[dict]:
        return metrics(self.run_dir)

    def losses(self) -> list[float]:
        return losses(self.run_dir)

    def summary(self) -> dict:
        return summary(self.run_dir)


def run_process(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 300,
    split: bool = False,
) -> Result:
    """Run `argv` to its end; its output as text, stderr apart (`err`) only when `split`."""
    proc = subprocess.run(
        list(argv),
        cwd=cwd,
        env=dict(os.environ if env is None else env),
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if split else subprocess.STDOUT,
        text=True,
    )
    run_dir = Path(argv[argv.index("--run-dir") + 1]) if "--run-dir" in argv else None
    return Result(proc.returncode, proc.stdout, run_dir, proc.stderr or "")


def hvdlm_argv(*args: str) -> list[str]:
    """`python -m hvdlm ARGS` with this interpreter."""
    return [sys.executable, "-m", "hvdlm", *map(str, args)]


def train_argv(job: Path, run_dir: Path, *args: str) -> list[str]:
    """`python -m hvdlm train JOB --run-dir RUN_DIR ARGS`."""
    return hvdlm_argv("train", job, "--run-dir", run_dir, *args)


def cli_env(cache: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's hvdlm: `base` (this process's by default), unbuffered, with the test's corpus
    cache when one is given (apart from the user's own)."""
    env = {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1"}
    if cache is not None:
        env["HVDLM_CACHE"] = str(cache)
    return env


def run_cli(
    *args: str,
    cache: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 300,
    split: bool = False,
) -> Result:
    """The real `python -m hvdlm ARGS` in a subprocess (from the repository root unless `cwd`); `env` is the
    environment to start from (this process's by default), `cache` the corpus cache."""
    return run_process(hvdlm_argv(*args), cli_env(cache, env), cwd=cwd, timeout=timeout, split=split)


def train_once(job: Path, run_dir: Path, *overrides: str, cache: Path | None = None) -> Result:
    """`hvdlm train JOB --run-dir RUN_DIR` with a `--set` for each override, which must succeed: the run a module
    trains once and looks at many times."""
    r = run_cli("train", job, "--run-dir", run_dir, *sets(*overrides), cache=cache)
    assert r.code == 0, r.out[-3000:]
    return r


def mpirun_argv(np: int, program: list[str]) -> tuple[list[str], dict[str, str]]:
    """mpirun's argv for `program` on np ranks of this machine, as `hvdlm launch` would build it but allowing more
    ranks than cores (--oversubscribe: the 4-rank TP x DP tests run on 2-core CI machines), and the environment it
    needs (this process's and the launch plan's)."""
    # Imported here, so that conftest (which imports this file) imports no hvdlm.
    from hvdlm.launch.commands import LaunchOptions, LaunchRequest, plan_launch

    # The launch plan of one rank on this machine gives the flags and variables hvdlm uses (root permission,
    # yielding when idle, the BTL choices); only the rank count and --oversubscribe differ.
    plan = plan_launch(LaunchRequest("mpirun", 1, program, threads=1), LaunchOptions(cycle_time_ms=5.0))
    argv = list(plan.argv)
    i = argv.index("-np")
    argv[i : i + 2] = ["-np", str(np), "--oversubscribe"]
    return argv, {**os.environ, **plan.env, "PYTHONUNBUFFERED": "1"}


def mpirun(np: int, program: list[str], cache: Path | None = None, timeout: float = 300) -> Result:
    """Run `program` on np real MPI ranks to the end (with the test's corpus cache, when given)."""
    argv, env = mpirun_argv(np, program)
    return run_process(argv, cli_env(cache, env), timeout=timeout)


def rank_check_rows(np: int, script: Path, timeout: float = 240) -> dict[str, dict]:
    """One run of every check in `script` (a tests/*_checks.py) on np MPI ranks: rank 0's JSON line of each check
    by its name, and the whole output as "_output"."""
    proc = mpirun(np, [sys.executable, str(script)], timeout=timeout)
    rows = [json.loads(line) for line in proc.out.splitlines() if line.startswith('{"check"')]
    return {"_output": proc.out, **{row["check"]: row for row in rows}}


def reported(results: dict[str, dict], name: str) -> dict:
    """The row of check `name` in `rank_check_rows`, which must have reported."""
    assert name in results, f"check {name} did not report:\n{results['_output'][-3000:]}"
    return results[name]


def checks_on_ranks(np: int, script: str, names: Sequence[str]):
    """A test, one for each check in `names`, of tests/SCRIPT run on np MPI ranks (once for the module, through the
    check_row fixture): the check reported, and is ok. A module assigns it to the test's name."""
    path = Path(__file__).with_name(script)

    @pytest.mark.parametrize("name", names)
    def test(check_row, name):
        row = check_row(np, path, name)
        worst = f"worst error {row['error']} at {row['worst']}" if "worst" in row else "failed"
        assert row["ok"], f"{name}: {worst}\n{row['detail']}"

    return test


# ------------------------------------------------------------------------------------------------------------
# Import cost
# ------------------------------------------------------------------------------------------------------------


def assert_imports_nothing_heavy(what: str | Sequence[str], modules: Sequence[str] = HEAVY) -> None:
    """In a fresh interpreter: `what`, Python code (a str) or the argv of an hvdlm command (a list, which must
    succeed), loads none of `modules`."""
    if isinstance(what, str):
        code = what
    else:
        code = (
            f"from hvdlm.cli import main; sys.argv = ['hvdlm'] + {list(map(str, what))!r}\n"
            "try: main()\nexcept SystemExit as e: assert not e.code, f'exit {e.code}'\n"
        )
    code = f"import sys\n{code}\nheavy = sorted(set({list(modules)!r}) & set(sys.modules))\nassert not heavy, heavy"
    r = run_process([sys.executable, "-c", code], timeout=60)
    assert r.code == 0, f"{what!r} imported something heavy, or failed:\n{r.out}"

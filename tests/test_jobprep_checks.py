"""Checks at job-preparation time (issue 18, items 4 to 7): --set lists in sbatch, job names, Slurm times, --venv,
the rank count, bounded sizes, messages that name the real problem, and `hvdlm config`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib
from helpers import REPO, TINY_JOB

from hvdlm.config import load_config
from hvdlm.errors import InputError


def sbatch_refuses(hvdlm, *args: str) -> str:
    """`hvdlm sbatch ARGS`, which must end as bad input does (exit 2, no traceback): its output, for the message."""
    r = hvdlm("sbatch", *args)
    assert r.code == 2 and "Traceback" not in r.out, r.out
    return r.out


def test_sbatch_takes_a_toml_list_through_set(hvdlm):
    r = hvdlm("sbatch", "jobs/demo.toml", "--set", 'slurm.directives=["--mem=4G", "--constraint=a100"]')
    assert r.code == 0, r.out
    assert "#SBATCH --mem=4G" in r.out and "#SBATCH --constraint=a100" in r.out


@pytest.mark.parametrize(
    "item, message",
    [
        ('train.sample_prompt="a # $(reboot)"', "contains '#'"),
        ("train.lr=1e-3 # $(reboot)", "contains '#'"),
        ('slurm.setup=["module list", "echo `id`"]', "contains '`'"),
        ('train.sample_prompt="it\'s"', 'contains "\'"'),
    ],
)
def test_sbatch_still_refuses_shell_syntax_around_or_inside_toml_values(hvdlm, item, message):
    out = sbatch_refuses(hvdlm, "jobs/demo.toml", "--set", item)
    assert message in out, out


def test_a_job_file_with_a_space_in_its_name_gets_a_safe_job_name(hvdlm, tmp_path):
    job = tmp_path / "my job.toml"
    job.write_text(TINY_JOB)
    r = hvdlm("sbatch", str(job))
    assert r.code == 0, r.out
    assert "#SBATCH --job-name=my_job" in r.out and '"runs/my_job-${SLURM_JOB_ID}"' in r.out
    r = hvdlm("sbatch", str(job), "--job-name", "gpt-small")
    assert r.code == 0 and "#SBATCH --job-name=gpt-small" in r.out, r.out
    out = sbatch_refuses(hvdlm, str(job), "--job-name", "a;b")
    assert "--job-name 'a;b' is not a plain name" in out, out


# Slurm time limits: those sbatch refuses (ones Slurm would misread), each with its reason, and every form it takes.
REFUSED_TIMES = {
    "99:99:99": "minutes must be below 60, got 99",
    "1:60": "seconds must be below 60, got 60",
    "1-24": "hours must be below 24, got 24",
    "1-23:60": "minutes must be below 60, got 60",
    "2-00:00:61": "seconds must be below 60, got 61",
    "99999999": "longer than Slurm can count",
    "1:2:3:4": "not a Slurm time limit",
    "-5": "not a Slurm time limit",
}
TIMES = ["90", "90:30", "48:00:00", "1-12", "1-12:30", "7-00:00:00", "0", "UNLIMITED"]


@pytest.mark.parametrize("time, message", REFUSED_TIMES.items())
def test_sbatch_refuses_times_slurm_would_misread(hvdlm, time, message):
    out = sbatch_refuses(hvdlm, "jobs/demo.toml", "--time", time)
    assert message in out, out


@pytest.mark.parametrize("time", TIMES)
def test_sbatch_takes_every_slurm_time_form(time):
    from hvdlm.launch.sbatch import check_time

    check_time(time)


def test_sbatch_refuses_a_venv_that_is_not_one(hvdlm, tmp_path):
    out = sbatch_refuses(hvdlm, "jobs/demo.toml", "--venv", str(tmp_path / "nonexistent"))
    assert "does not exist" in out and "python -m venv" in out, out
    out = sbatch_refuses(hvdlm, "jobs/demo.toml", "--venv", str(tmp_path))
    assert "is not a virtual environment (it has no bin/activate)" in out, out
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "activate").write_text("")
    r = hvdlm("sbatch", "jobs/demo.toml", "--venv", str(tmp_path))
    assert r.code == 0 and f"source {tmp_path}/bin/activate" in r.out, r.out


def test_sbatch_says_when_the_ranks_differ_from_launch_np():
    proc = subprocess.run(
        [sys.executable, "-m", "hvdlm", "sbatch", "jobs/demo.toml", "--nodes", "2", "--gpus-per-node", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "starts 8 rank(s) (2 node(s) x 4 GPU(s) per node, one rank per GPU), not launch.np = 2" in proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "note:" not in proc.stdout


@pytest.mark.parametrize(
    "key, limit",
    [
        ("model.n_layer", "1,024"),
        ("model.n_head", "1,024"),
        ("model.d_model", "65,536"),
        ("model.seq_len", "1,048,576"),
        ("model.vocab_size", "4,194,304"),
        ("train.batch_size", "1,048,576"),
        ("train.max_steps", "1,000,000,000"),
        ("train.accumulation_steps", "1,048,576"),
        ("launch.np", "1,048,576"),
        ("train.seed", "9,223,372,036,854,775,807"),
    ],
)
def test_sizes_are_bounded(key, limit):
    with pytest.raises(InputError, match=f"'{key}' must be at most {limit}, got 99,999,999,999,999,999,999,999"):
        load_config(None, [f"{key}=99999999999999999999999"])


def test_the_bounds_leave_real_models_alone():
    load_config(None, ["model.n_layer=96", "model.d_model=12288", "model.n_head=96", "model.seq_len=8192"])


def test_a_key_outside_any_section_says_where_it_belongs(tmp_path):
    job = tmp_path / "top.toml"
    job.write_text("n_layer = 2\n[train]\nlr = 1e-3\n")
    with pytest.raises(InputError, match=r"key 'n_layer' in .* is outside any section.*under \[model\]"):
        load_config(job)
    job.write_text("n_layers = 2\n")
    with pytest.raises(InputError, match=r"no section has a key of that name. Did you mean model.n_layer\?"):
        load_config(job)


@pytest.mark.parametrize(
    "args",
    [
        ["config", "DIR"],
        ["hostfile", "--from", "file", "DIR"],
        ["launch", "jobs/demo.toml", "--dry-run", "--hostfile", "DIR"],
        ["hostfile", "--from", "pbs", "DIR"],
    ],
)
def test_a_directory_where_a_file_belongs_is_named_as_such(hvdlm, tmp_path, args):
    r = hvdlm(*[str(tmp_path) if a == "DIR" else a for a in args])
    assert r.code == 2 and "is a directory" in r.out and "does not exist" not in r.out, r.out


def test_a_job_file_that_is_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(InputError, match="is a directory, not a file"):
        load_config(tmp_path)


def test_doctor_names_a_missing_interpreter(hvdlm, tmp_path):
    r = hvdlm("doctor", "--python", str(tmp_path / "nonexistent"))
    assert r.code == 2 and "does not exist" in r.out and "Pass the path of a Python interpreter" in r.out, r.out
    assert "wheels" not in r.out and "Traceback" not in r.out


def test_config_prints_the_resolved_toml(hvdlm, tiny_job, tmp_path):
    r = hvdlm("config", str(tiny_job), "--set", "train.lr=5e-4", "--set", 'slurm.directives=["--mem=4G"]')
    assert r.code == 0, r.out
    resolved = tomllib.loads(r.out)
    assert resolved["train"]["lr"] == 5e-4 and resolved["model"]["n_layer"] == 2
    assert resolved["slurm"]["directives"] == ["--mem=4G"] and resolved["train"]["tensorboard"] is True
    again = tmp_path / "resolved.toml"
    again.write_text(r.out)
    assert load_config(again) == load_config(tiny_job, ["train.lr=5e-4", 'slurm.directives=["--mem=4G"]'])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.n_head=3"], "must divide model.d_model"),
        (["--set", "model.n_layer=99999999999999999999999"], "'model.n_layer' must be at most 1,024"),
        (["--set", "train.lrr=1"], "Did you mean 'lr'?"),
    ],
)
def test_config_refuses_bad_input(hvdlm, tiny_job, args, message):
    r = hvdlm("config", str(tiny_job), *args)
    assert r.code == 2 and message in r.out and "Traceback" not in r.out, r.out


def test_config_never_imports_torch_or_horovod():
    code = (
        "import sys; from hvdlm.cli import main; sys.argv = ['hvdlm', 'config', 'jobs/demo.toml']\n"
        "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
        "heavy = sorted({'torch', 'horovod', 'mpi4py', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, f'config imported {heavy}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO, timeout=60)

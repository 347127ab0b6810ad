"""Fuzzing the job-preparation parsers: any input gives a result or an InputError, never a traceback, and what
comes out is safe to put into a command line."""

from __future__ import annotations

import shlex
import string
from contextlib import suppress
from pathlib import Path

from helpers import demo_sbatch_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvdlm.errors import InputError
from hvdlm.launch.hostfile import FORMATS, render_hostfile
from hvdlm.launch.hostlist import expand_nodelist, expand_tasks_per_node
from hvdlm.launch.hosts import Host, parse_hosts, read_hostfile
from hvdlm.launch.sbatch import SbatchSpec, render
from hvdlm.launch.shell import HOSTNAME
from hvdlm.launch.sources import from_lsf, from_pbs

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Host-list syntax, digits and names, plus the characters most likely to break a parser or a shell.
NODELIST_CHARS = "n0123456789[],-_.x" + ";$`|& ()\n\t:#*'\"\\"
nodelists = st.text(alphabet=NODELIST_CHARS, max_size=40)
tasks = st.text(alphabet="0123456789(x),- ", max_size=20)
lines = st.text(alphabet=string.printable + "é\x00", max_size=200)
name = st.from_regex(r"[a-z][a-z0-9\-]{0,8}", fullmatch=True)
hosts = st.lists(st.builds(Host, name, st.integers(1, 64)), min_size=1, max_size=6, unique_by=lambda h: h.name)


def _safe(names: list[str]) -> None:
    assert names and all(HOSTNAME.fullmatch(n) for n in names)


@FUZZ
@given(nodelists)
def test_nodelist_expansion_never_crashes(expression):
    with suppress(InputError):
        _safe(expand_nodelist(expression, use_scontrol=False))


@FUZZ
@given(tasks)
def test_tasks_per_node_never_crashes(spec):
    with suppress(InputError):
        assert all(c > 0 for c in expand_tasks_per_node(spec))


@FUZZ
@given(st.text(max_size=60))
def test_hosts_option_never_crashes(spec):
    with suppress(InputError):
        result = parse_hosts(spec)
        _safe([h.name for h in result])
        assert all(h.slots > 0 for h in result)


@FUZZ
@given(lines)
def test_hostfile_reader_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "hosts"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with suppress(InputError):
        _safe([h.name for h in read_hostfile(path)])
    with suppress(InputError):
        _safe([h.name for h in from_pbs(str(path), {})])


@FUZZ
@given(st.text(max_size=60))
def test_lsf_hosts_never_crash(spec):
    with suppress(InputError):
        _safe([h.name for h in from_lsf(spec, {})])


@FUZZ
@given(hosts, st.sampled_from(sorted(FORMATS)))
def test_openmpi_hostfiles_read_back(tmp_path_factory, host_list, fmt):
    path = tmp_path_factory.mktemp("roundtrip") / "hosts"
    path.write_text(render_hostfile(host_list, fmt))
    if fmt in ("openmpi", "mpich"):
        assert read_hostfile(path) == host_list
    elif fmt == "horovod":
        assert parse_hosts(path.read_text().strip()) == host_list


def _spec(**changes) -> SbatchSpec:
    return demo_sbatch_spec(**{"partition": "p", "modules": ["m"], **changes})


@FUZZ
@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=30))
def test_scripts_never_carry_unchecked_text(partition, module, time):
    spec = _spec(time=time, partition=partition, modules=[module])
    try:
        script = render(spec)
    except InputError:
        return
    # Accepted values are plain words: nothing in them can end a line or start another command.
    for value in (partition, module, time):
        assert not set(value) & set(";&|$`()<>\n\"' \\")
    lines = script.split("\n")
    # Each value landed on its own line, in its place, and added no line of its own (a plain script has as many).
    assert len(lines) == len(render(_spec(partition="p" if partition else "")).split("\n"))
    assert f"#SBATCH --time={time}" in lines and f"module load {shlex.quote(module)}" in lines
    assert (f"#SBATCH --partition={partition}" in lines) == bool(partition)


free_text = st.text(alphabet=string.printable + "é", min_size=1, max_size=30)
directive = st.one_of(free_text, st.from_regex(r"--[a-z][a-z0-9\-]{0,6}(=[A-Za-z0-9_.:]{1,5})?", fullmatch=True))


@FUZZ
@given(
    free_text, free_text, st.lists(free_text, max_size=3), st.lists(directive, max_size=3), st.lists(lines, max_size=3)
)
def test_free_text_in_scripts_stays_one_value(venv, run_dir, overrides, directives, setup):
    """venv, run directory, --set items, extra #SBATCH options and setup lines: refused, or each exactly once,
    where it belongs (paths and overrides as single shell words of the launch line)."""
    spec = _spec(venv=venv, run_dir=run_dir, overrides=overrides, directives=directives, setup=setup)
    try:
        script = render(spec)
    except InputError:
        return
    lines = script.split("\n")  # bash's line breaks (str.splitlines also splits at \f, \v, \x1c, ...)
    plain = _spec(venv="/v", run_dir="r", overrides=["a.b=1"] * len(overrides), directives=[], setup=[])
    assert len(lines) == len(render(plain).split("\n")) + len(directives) + len(setup) + (2 if setup else 0)
    assert f"source {shlex.quote(str(Path(venv) / 'bin' / 'activate'))}" in lines
    for directive in directives:
        assert f"#SBATCH {directive}" in lines
    assert all(item in lines for item in setup)  # as written, one item per line (by design: the user's shell)
    # The program line: the launcher's continuation line, started in the background (the trap needs the shell).
    launch = [line for line in lines if line.startswith("    ") and line.endswith(" &")]
    assert len(launch) == 1, script
    program = shlex.split(launch[0].removesuffix(" &"))
    assert program[program.index("--run-dir") + 1] == run_dir
    assert [program[i + 1] for i, word in enumerate(program) if word == "--set"] == overrides

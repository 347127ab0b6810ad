"""Slurm host lists and the schedulers' host sources; expansion compared with the real `scontrol show hostnames`."""

from __future__ import annotations

import os
import subprocess

import pytest

import slurm_cluster
from hvdlm.errors import InputError
from hvdlm.launch.hostlist import expand_nodelist, expand_tasks_per_node
from hvdlm.launch.hosts import Host
from hvdlm.launch.sources import hosts_from

# Every form Slurm documents, and the corners around them: zero padding, padding that grows, several ranges in
# one bracket, several bracket groups, hyphens and dots in names, mixed lists.
EXPRESSIONS = [
    "node[001-003]", "node[01-04,07]", "x[1-2]y[3-4]", "b04-[09-10]", "a,b[001,003],c", "node7", "a,b,c",
    "node[7]", "n[0-0]", "n[1-1]", "n[00-10]", "n[9-11]", "n[98-101]", "n[098-101]", "n[009-11]", "n[01-1]",
    "n1-[1-2]", "gpu-a100-[001-002,010]", "rack[1-2]-node[01-02]", "rack[1-2]node[01-02]", "n[1-2],m[3-4]",
    "node_[1-2]", "n[1-2]x[3-4],y", "n[1-3,5-6,9]", "n[1-2]-[3-4]", "a.example.org,b[1-2]", "[1-2]", ",a", "a,",
    "n[1-256]", "cn-[0001-0003,0100]",
]  # fmt: skip
# Refused by us and by Slurm (scontrol prints "Invalid hostlist" or, for node[1-, the nonsense host "node]").
MALFORMED = ["node[1-", "n[3-1]", "n[1-2]]", "n[a-b]", "n[1,,2]", "n[1-2]x", "n[1-2].cluster.org", "n[]", "n[-1]"]
# Names Slurm would pass through but a generated command must never contain.
UNSAFE = ["a;b", "a b", "$(reboot)", "n`id`", "n[1-2];rm", "a|b", "n\n1", "-rf"]


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    """The real scontrol with a minimal slurm.conf (installed from Debian's slurm-client when missing, as root)."""
    reason = slurm_cluster.ensure_installed(slurm_cluster.CLIENT_TOOLS)
    if reason:
        pytest.skip(f"no scontrol to compare with: {reason}")
    conf = slurm_cluster.minimal_conf(tmp_path_factory.mktemp("slurm-offline"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # for expand_nodelist's own scontrol calls too

    def hostnames(expression: str) -> tuple[list[str], str]:
        proc = subprocess.run(["scontrol", "show", "hostnames", expression], capture_output=True, text=True)
        return proc.stdout.split(), proc.stderr

    yield hostnames
    if old is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = old


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_expansion_equals_scontrol(scontrol, expression):
    expected, err = scontrol(expression)
    assert expected and not err, f"scontrol refused a test expression: {err}"
    assert expand_nodelist(expression, use_scontrol=False) == expected  # python-hostlist
    assert expand_nodelist(expression, use_scontrol=True) == expected


def test_three_bracket_groups_give_slurms_hosts(scontrol):
    # Slurm orders a product of three groups its own way; python-hostlist gives the same hosts, nested in order.
    expected, _ = scontrol("x[1-2]y[3-4]z[5-6]")
    assert expand_nodelist("x[1-2]y[3-4]z[5-6]", use_scontrol=True) == expected
    assert sorted(expand_nodelist("x[1-2]y[3-4]z[5-6]", use_scontrol=False)) == sorted(expected)


@pytest.mark.parametrize("expression", MALFORMED)
def test_malformed_node_lists_are_refused_like_slurm_does(scontrol, expression):
    names, err = scontrol(expression)
    assert "Invalid" in err or not names or names == ["node]"]
    for use_scontrol in (False, True):
        with pytest.raises(InputError, match="node list"):
            expand_nodelist(expression, use_scontrol=use_scontrol)


@pytest.mark.parametrize("expression", UNSAFE)
def test_shell_metacharacters_are_refused(expression):
    with pytest.raises(InputError):
        expand_nodelist(expression, use_scontrol=False)


def test_without_a_usable_scontrol_the_library_answers(monkeypatch, tmp_path):
    # A login node of another cluster: scontrol on the PATH but no slurm.conf it can read.
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    assert expand_nodelist("node[01-02]") == ["node01", "node02"]


@pytest.mark.parametrize(
    "spec, counts",
    [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,2,3", [1, 2, 3]), ("8(x2)", [8, 8]), (" 3(x1) ", [3])],
)
def test_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "x", "0", "2(x0)", "2(x3", "2x3", "-1", "2(x3),", "1,,2", "2 (x3)"])
def test_malformed_tasks_per_node(spec):
    with pytest.raises(InputError, match="tasks per node"):
        expand_tasks_per_node(spec)


def test_slurm_allocation_from_the_environment():
    env = {"SLURM_JOB_NODELIST": "gpu-[01-03],cpu7", "SLURM_TASKS_PER_NODE": "4(x3),2"}
    expected = [Host("gpu-01", 4), Host("gpu-02", 4), Host("gpu-03", 4), Host("cpu7", 2)]
    assert hosts_from("slurm", None, env=env) == expected
    assert hosts_from("slurm", None, env=env, slots=1)[0] == Host("gpu-01", 1)
    # An explicit node list ignores the job's task counts (they describe another list).
    assert hosts_from("slurm", "n[1-2]", env=env) == [Host("n1", 1), Host("n2", 1)]
    assert hosts_from("slurm", "n[1-2]", env=env, tasks_per_node="3(x2)") == [Host("n1", 3), Host("n2", 3)]


@pytest.mark.parametrize(
    "env, spec, tasks, message",
    [
        ({}, None, None, "not a Slurm job"),
        ({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"}, None, None, "2 count\\(s\\) for the 3"),
        ({}, "n1,n[1-2]", None, "'n1' appears twice"),
        ({}, "n[1-2]", "0(x2)", "must be positive"),
    ],
)
def test_slurm_sources_refuse_bad_allocations(env, spec, tasks, message):
    with pytest.raises(InputError, match=message):
        hosts_from("slurm", spec, env=env, tasks_per_node=tasks)


def test_pbs_nodefile_counts_repeated_hosts(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\n\n# spare\nn1\nn3\n")
    assert hosts_from("pbs", None, env={"PBS_NODEFILE": str(nodefile)}) == [Host("n1", 3), Host("n2", 1), Host("n3", 1)]
    nodefile.write_text("n1\nn2;reboot\n")
    with pytest.raises(InputError, match=r"nodes:2: 'n2;reboot' is not a valid host name"):
        hosts_from("pbs", str(nodefile), env={})
    with pytest.raises(InputError, match="not a PBS job"):
        hosts_from("pbs", None, env={})


def test_lsf_hosts_in_both_forms():
    assert hosts_from("lsf", None, env={"LSB_MCPU_HOSTS": "h1 4 h2 2"}) == [Host("h1", 4), Host("h2", 2)]
    assert hosts_from("lsf", None, env={"LSB_HOSTS": "h1 h1 h2"}) == [Host("h1", 2), Host("h2", 1)]
    assert hosts_from("lsf", "h1 4 h2 4", env={}) == [Host("h1", 4), Host("h2", 4)]
    with pytest.raises(InputError, match="slots must be a positive whole number, got '0'"):
        hosts_from("lsf", None, env={"LSB_MCPU_HOSTS": "h1 0"})
    with pytest.raises(InputError, match="appears twice"):
        hosts_from("lsf", None, env={"LSB_MCPU_HOSTS": "h1 2 h1 2"})
    with pytest.raises(InputError, match="not an LSF job"):
        hosts_from("lsf", None, env={})

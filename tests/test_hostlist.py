"""Slurm host lists and the schedulers' host sources; expansion compared with the real `scontrol show hostnames`."""

from __future__ import annotations

import os
import shutil
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
    "node[001-003]",
    "node[01-04,07]",
    "x[1-2]y[3-4]",
    "b04-[09-10]",
    "a,b[001,003],c",
    "node7",
    "a,b,c",
    "node[7]",
    "n[0-0]",
    "n[1-1]",
    "n[00-10]",
    "n[9-11]",
    "n[98-101]",
    "n[098-101]",
    "n[009-11]",
    "n[01-1]",
    "n1-[1-2]",
    "gpu-a100-[001-002,010]",
    "rack[1-2]-node[01-02]",
    "rack[1-2]node[01-02]",
    "n[1-2],m[3-4]",
    "node_[1-2]",
    "n[1-2]x[3-4],y",
    "n[1-3,5-6,9]",
    "n[1-2]-[3-4]",
    "a.example.org,b[1-2]",
    "[1-2]",
    ",a",
    "a,",
    "n[1-256]",
    "cn-[0001-0003,0100]",
]
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


# Three or more bracket groups, where Slurm's order is not left-to-right nesting: lists inside brackets, padding,
# repeats, groups side by side, hyphens between groups, several items. Compared as ordered lists: tasks per node
# apply in list order.
MANY_GROUPS = [
    "x[1-2]y[3-4]z[5-6]",
    "x[1-3]y[3-4]z[5-6]",
    "x[1-2]y[3-5]z[5-7]",
    "a[1-2]b[1-2]c[1-2]d[1-2]",
    "n[5,1-2]y[3,1]z[2-3]",
    "n[01-2]x[1-2]y[009-11]",
    "x[1-2]y[3-4]z[5-6]w[1-2],q,r[1-2]",
    "a[1-2]-b[3]-c[1-3]",
    "[1-2]x[1-2][3-4]",
    "n[1-2][3-4][5-6]",
    "r[1-2]c[1-3]n[01-02]s[7]",
    "x1y[1-2]z[3-4]w[5-6]",
    "a[1-2]b[1-2]c[1-2],a3",
    "g[1,1]h[2-3]i[4]",
    "p[1-3]q[1-2]r[1-2]s[1-2]t[1-2]",
    "rack[1-2]-node[01-03]-gpu[0-1]",
]


@pytest.mark.parametrize("expression", MANY_GROUPS)
def test_three_or_more_bracket_groups_come_in_slurms_order(scontrol, expression):
    expected, err = scontrol(expression)
    assert expected and not err, f"scontrol refused a test expression: {err}"
    assert expand_nodelist(expression, use_scontrol=False) == expected
    assert expand_nodelist(expression, use_scontrol=True) == expected


def test_slurms_order_is_not_left_to_right_nesting(scontrol):
    # The comparison above has teeth: plain nesting (python-hostlist's order) differs from Slurm's here.
    import hostlist

    expected, _ = scontrol("x[1-2]y[3-4]z[5-6]")
    assert expected[:3] == ["x1y3z5", "x1y3z6", "x2y3z5"]
    assert hostlist.expand_hostlist("x[1-2]y[3-4]z[5-6]") != expected


@pytest.mark.parametrize("expression", ["--version", "-a", "a,-b", "-n[1-2]"])
def test_a_leading_hyphen_never_reaches_scontrol_as_an_option(scontrol, expression):
    for use_scontrol in (False, True):
        with pytest.raises(InputError, match="starts with '-', which scontrol would read as an option"):
            expand_nodelist(expression, use_scontrol=use_scontrol)


def test_hostfile_from_slurm_refuses_an_option_as_node_list(scontrol, hvdlm):
    r = hvdlm("hostfile", "--from", "slurm", "--", "--version")
    assert r.code == 2 and "starts with '-'" in r.out and "slurm-wlm" not in r.out, r.out


def test_a_failing_scontrol_is_an_input_error(monkeypatch, tmp_path):
    bad = tmp_path / "slurm.conf"
    bad.write_text("")  # scontrol: "ClusterName needs to be specified", exit 1
    monkeypatch.setenv("SLURM_CONF", str(bad))
    if not shutil.which("scontrol"):
        pytest.skip("no scontrol")
    with pytest.raises(InputError, match="scontrol could not expand node list 'n1'"):
        expand_nodelist("n1", use_scontrol=True)
    assert expand_nodelist("n[1-2]") == ["n1", "n2"]  # asked for by choice: the library answers instead


NINES = "9" * 5000


@pytest.mark.parametrize(
    "expression, message",
    [
        (f"n[1-{NINES}]", "at most 18 digits"),
        (f"n[{NINES}]", "at most 18 digits"),
        ("n[1-99999999]", "more than 65536 hosts"),
        ("n[1-65537]", "more than 65536 hosts"),  # scontrol's own range limit, too
        ("n[1-60000],m[1-60000]", "more than 65536 hosts"),  # scontrol would expand it: we cap totals on both paths
        ("n[1-300]y[1-300]", "more than 65536 hosts"),
        ("n[١-٢]", "characters a Slurm node list cannot have"),  # Arabic-Indic digits are not numbers here
    ],
)
def test_huge_numbers_and_lists_are_refused_the_same_on_both_paths(scontrol, expression, message):
    for use_scontrol in (False, True):
        with pytest.raises(InputError, match=message) as e:
            expand_nodelist(expression, use_scontrol=use_scontrol)
        assert len(str(e.value)) < 400  # the message shows the start of a pasted run of digits, not all of it


def test_the_host_cap_itself_is_reachable_on_both_paths(scontrol):
    expected, _ = scontrol("n[1-65536]")
    assert expand_nodelist("n[1-65536]", use_scontrol=False) == expected == [f"n{i}" for i in range(1, 65537)]
    assert expand_nodelist("n[1-65536]", use_scontrol=True) == expected


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


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "x",
        "0",
        "2(x0)",
        "2(x3",
        "2x3",
        "-1",
        "2(x3),",
        "1,,2",
        "2 (x3)",
        "\u0663",
        "2(x\u0663)",
        "9" * 5000,
        f"2(x{'9' * 5000})",
        "1000000",
        "1(x65537)",
        "4(x65536),1",
    ],
)
def test_malformed_tasks_per_node(spec):
    with pytest.raises(InputError, match="tasks per node") as e:
        expand_tasks_per_node(spec)
    assert len(str(e.value)) < 400


def test_tasks_per_node_caps_match_the_slot_and_host_caps():
    assert expand_tasks_per_node("999999") == [999999]  # make_host's slot cap
    assert len(expand_tasks_per_node("1(x65536)")) == 65536  # the node list's host cap


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

"""hostfiles/ holds examples written by `hvdlm hostfile`: each command in hostfiles/README.md, run again, writes
exactly the file that is there (so the examples can never drift from what the CLI writes)."""

from __future__ import annotations

import shlex

import pytest
from helpers import REPO, run_cli

COMMANDS = [line for line in (REPO / "hostfiles" / "README.md").read_text().splitlines() if line.startswith("hvdlm ")]


def test_every_example_has_its_command():
    written = {shlex.split(c)[-1] for c in COMMANDS}
    present = {f"hostfiles/{p.name}" for p in (REPO / "hostfiles").iterdir() if p.name != "README.md"}
    assert written == present


@pytest.mark.parametrize("command", COMMANDS)
def test_example_hostfile_is_what_the_cli_writes(command, tmp_path):
    argv = shlex.split(command)
    assert argv[-2] == "-o"
    example = REPO / argv[-1]
    argv[-1] = str(tmp_path / example.name)
    assert argv[0] == "hvdlm"
    r = run_cli(*argv[1:], timeout=60)
    assert r.code == 0, r.out
    assert (tmp_path / example.name).read_text() == example.read_text()

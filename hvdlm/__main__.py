"""`python -m hvdlm`: the same CLI as the `hvdlm` command."""

from hvdlm.cli import main

main(prog_name="hvdlm")

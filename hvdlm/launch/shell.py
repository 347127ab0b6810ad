"""Shell safety for everything hvdlm writes into a command line or a batch script.

Generated scripts must never run text a user did not mean as a command, so names that end up in them (hosts,
partitions, modules, interfaces, variables) must be plain words, and free-form values (paths, --set overrides)
must not carry shell syntax even though they are quoted anyway: a value with `$(...)` in it is far more likely
a mistake, or an attack, than a real path.
"""

from __future__ import annotations

import re
import shlex

from hvdlm.errors import InputError

# A host name as DNS and Slurm allow it: letters, digits, dots, hyphens, underscores; no leading hyphen (it would
# read as an option).
HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# Slurm partitions, accounts, QOS; environment-module names ("openmpi/4.1.5", "cuda/12.2+gcc"); interface names.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/+,:=@%]*")
ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Characters the shell treats specially, also inside double quotes, or that end a line.
_META = re.compile(r"[`$;&|<>(){}\\\"'!*?~\n\r\t\x00#]")


# What each pattern allows, in words, for the error message.
_ALLOWED = {
    HOSTNAME: "letters, digits, '.', '-' and '_', not starting with '-' or '.'",
    NAME: "letters, digits and . _ - / + , : = @ %, starting with a letter, a digit or '_'",
    ENV_VAR: "letters, digits and '_', not starting with a digit",
}


def check_name(what: str, value: str, pattern: re.Pattern[str] = NAME) -> str:
    if not pattern.fullmatch(value):
        raise InputError(
            f"{what} '{value}' is not a plain name (allowed: {_ALLOWED[pattern]}). Shell metacharacters and spaces "
            "are refused so that generated commands never run text you did not mean."
        )
    return value


def check_text(what: str, value: str, allowed: str = "") -> str:
    """Free-form values (paths, overrides): quoted when rendered, but shell syntax in them is refused, except for
    the `allowed` characters (the quotes of a TOML string in an override)."""
    bad = next((m for m in _META.finditer(value) if m.group() not in allowed), None)
    if bad or not value:
        shown = repr(bad.group()) if bad else "an empty value"
        raise InputError(
            f"{what} '{value}' contains {shown}. Shell metacharacters are refused in generated commands and "
            "scripts; rename the file or directory, or pick another value."
        )
    return value


class ShellVar(str):
    """An argv item that the batch script expands at run time: "${SLURM_NTASKS}", "runs/demo-${SLURM_JOB_ID}".

    Only `${NAME}` references are expanded; the literal rest must be free of shell syntax, so the whole item can
    be written inside double quotes.
    """

    def __new__(cls, template: str) -> "ShellVar":
        literal = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", template)
        if _META.search(literal) or template == literal:
            raise ValueError(f"not a plain ${{NAME}} template: {template!r}")
        return super().__new__(cls, template)

    def rendered(self) -> str:
        return f'"{self}"'


def join(argv: list[str]) -> str:
    """Like shlex.join, except that ShellVar items stay expandable (double-quoted `"${NAME}"`)."""
    return " ".join(a.rendered() if isinstance(a, ShellVar) else shlex.quote(a) for a in argv)

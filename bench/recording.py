"""Appending a benchmark's figures to bench/RESULTS.md, always with the command, the date and the machine."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(software: str = "") -> str:
    """This machine in one line: cores, CPU, OS, Python and any `software` versions the figures depend on."""
    system = f"{platform.system()} {platform.machine()}; Python {platform.python_version()}"
    line = f"{os.cpu_count()} cores ({cpu_model()}), {system}"
    return f"{line}, {software}" if software else line


def record(title: str, lines: list[str], software: str = "") -> None:
    """Append a section: the title and today's date, the command as it was typed, the machine, then `lines`."""
    command = "python bench/" + Path(sys.argv[0]).name + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    block = [
        f"\n## {title}, {date.today().isoformat()}",
        f"- command: `{command}`",
        f"- machine: {machine(software)}",
        *lines,
    ]
    with open(RESULTS, "a") as f:
        f.write("\n".join(block) + "\n")

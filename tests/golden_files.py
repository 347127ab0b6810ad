"""Golden files: generated text compared with tests/golden/NAME; HVDLM_UPDATE_GOLDEN=1 rewrites them instead.

Review a rewritten golden file's diff like code: it is the specification of what users get.
"""

from __future__ import annotations

import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HVDLM_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.is_file(), f"no golden file {path}: run with HVDLM_UPDATE_GOLDEN=1 once and review it"
    expected = path.read_text()
    assert text == expected, f"{name} differs from its golden file (HVDLM_UPDATE_GOLDEN=1 rewrites it):\n{text}"

"""Rank-0 reporting: a progress bar, a log line per interval, and metrics.jsonl in the run directory.

Every other rank gets a logger whose methods do nothing, so the training loop calls it unconditionally.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(
        self, run_dir: Path | None, max_steps: int, enabled: bool, tensorboard: bool = False,
        resume_step: int | None = None,
    ):  # fmt: skip
        self.enabled = enabled
        if enabled and run_dir and resume_step is not None and (run_dir / "metrics.jsonl").exists():
            path = run_dir / "metrics.jsonl"
            keep = [line for line in path.read_text().splitlines(keepends=True)
                    if resume_step and json.loads(line).get("step", 0) <= resume_step]  # fmt: skip
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1) if enabled and run_dir else None
        self._bar = None
        # A bar only where someone watches: a terminal, or `hvdlm launch` run from one (HVDLM_PROGRESS=1).
        if enabled and (os.environ.get("HVDLM_PROGRESS") == "1" or sys.stderr.isatty()):
            self._bar = tqdm(total=max_steps, desc="train", unit="step", ncols=100, mininterval=0.5, file=sys.stderr)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def record(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl."""
        if self._file:
            self._file.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")

    def advance(self, steps: int = 1, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file:
            self._file.close()
            self._file = None

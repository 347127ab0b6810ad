"""train.profile_steps: rank 0 records that many whole steps with torch.profiler and writes RUN_DIR/profile.txt, the
operators (and on GPUs the kernels) by their own time, so that a slow step can be taken apart without editing
code. The recording starts after the run's first log interval (a resumed run's too): compilation and warm-up are
over by then."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

ROWS = 40


class StepProfiler:
    """Wraps each step of the loop; records steps [start, start + steps) on rank 0 and writes the table after them
    (or at the end of the loop, when the run ends first)."""

    def __init__(self, steps: int, log_interval: int, first_step: int, run_dir: Path, device: torch.device, rank: int):
        self.steps, self.run_dir, self.device = steps, run_dir, device
        self.start = first_step + log_interval  # the loop's step index (its log numbers the step start + 1)
        self.enabled = steps > 0 and rank == 0
        self._profile: torch.profiler.profile | None = None
        self._recorded = 0

    @contextlib.contextmanager
    def around(self, step: int):
        if self.enabled and step == self.start:  # the loop's steps are consecutive from first_step <= start
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()
        yield
        if self._profile is not None:
            self._recorded += 1
            if self._recorded == self.steps:
                self.finish()

    def finish(self) -> None:
        """Stop recording (if recording) and write the table."""
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels belong to it
        profile.__exit__(None, None, None)
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=sort, row_limit=ROWS, max_name_column_width=70)
        header = (
            f"torch.profiler over {self._recorded} step(s) from step {self.start + 1}, rank 0, {self.device.type}; "
            f"sorted by {sort}; totals are for all {self._recorded} step(s)\n"
        )
        try:
            (self.run_dir / "profile.txt").write_text(header + table + "\n")
        except OSError as e:  # a full or read-only disk costs the profile, not the run
            print(f"warning: the profile was not written ({e})", file=sys.stderr, flush=True)

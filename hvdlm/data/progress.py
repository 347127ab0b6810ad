"""How far the encoding is: a bar on a terminal (tqdm, already the trainer's bar: units and input bytes done, MB/s,
time left), else a plain log line every few seconds and one at the end (none for work done in less), which a batch
job's log keeps readable."""

from __future__ import annotations

import time

from hvdlm.units import format_count

LOG_EVERY_S = 5.0  # a log line this often when standard error is not a terminal


class Progress:
    def __init__(self, total_bytes: int, total_units: int, bar: bool, log, label: str = "encode"):
        self.total_bytes, self.total_units, self.log, self.label = total_bytes, total_units, log, label
        self.done_bytes = self.done_units = 0
        self.start = self.last = time.monotonic()
        self._bar = None
        self.logged = False  # a log line was written (a run shorter than LOG_EVERY_S writes none)
        if bar:
            from tqdm import tqdm  # only where a bar is drawn

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, ncols=100)

    def advance(self, input_bytes: int) -> None:
        """One unit more is done, of `input_bytes` bytes of input."""
        self.done_bytes += input_bytes
        self.done_units += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.done_units}/{self.total_units} units", refresh=False)
            self._bar.update(input_bytes)
        elif time.monotonic() - self.last >= LOG_EVERY_S:
            self.log(self.line())
            self.last, self.logged = time.monotonic(), True

    def line(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-9)
        rate = self.done_bytes / seconds
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0.0
        share = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        return (
            f"  {self.label}: {self.done_units}/{self.total_units} units, {format_count(self.done_bytes)}B of "
            f"{format_count(self.total_bytes)}B ({share:.0%}), {format_count(rate)}B/s, about {left:.0f} s left"
        )

    def close(self, finished: bool = True) -> None:
        """End the bar; in a log that has progress lines, the last one (only when the work finished: an error says
        enough)."""
        if self._bar is not None:
            self._bar.close()
        elif self.logged and finished:
            self.log(self.line())

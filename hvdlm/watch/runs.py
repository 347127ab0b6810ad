"""`hvdlm runs [DIR]`: the run directories under DIR with their state, read from their files alone.

Standard library only, so it answers at once on a login node: config.toml through tomllib, metrics.jsonl read
from its end, checkpoints found by their names (hvdlm.checkpoint.store, which imports torch only to read one).
The VERIFIED column is the newest complete checkpoint whose manifest checks out (`_verified`: by size; with
`hvdlm runs --verify`, by sha256).

A run's state, from its files (the first rule that applies):

    finished   summary.json is there and covers train.max_steps (a run resumed with more steps is not finished)
    ended      status.json (hvdlm.runfiles) says how the run ended, with its exit code, cause and step:
                 preempted  it stopped at a checkpoint (a preemption signal, Ctrl-C) and that checkpoint, at the
                            step where it stopped, is the newest: `hvdlm train ... --resume auto` loses nothing
                 failed     it failed (bad input, the watchdog, an exception), or stopped behind its newest checkpoint
    running    its process runs: rank 0's process named in status.json (or a rank's in its heartbeat) when it is on
               this host; otherwise a heartbeat fresher than a few of its intervals (heartbeats/: the watchdog's);
               only when neither is there (a run from before status.json, the watchdog off, another host), a file
               of the run changed in the last --active-minutes
    failed     it is gone without saying how it ended (status.json still says running: killed by SIGKILL, out of
               memory, its node lost)
    preempted  a run without status.json whose newest complete checkpoint is at or after the step it stopped at
               (the last logged step, or its heartbeats' step where that is later); failed otherwise
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from hvdlm.checkpoint.manifest import problem, read_manifest
from hvdlm.checkpoint.store import find_checkpoints
from hvdlm.errors import InputError
from hvdlm.runfiles import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FAILED,
    FINISHED,
    HEARTBEAT_DIR,
    METRICS_FILE,
    PREEMPTED,
    RUNNING,
    STATUS_FILE,
    SUMMARY_FILE,
    process_start,
    read_status,
    steps_done,
)
from hvdlm.units import format_count

_RUN_FILES = (CONFIG_FILE, METRICS_FILE)  # either makes a directory a run directory
_TAIL_BLOCK = 64 << 10  # metrics.jsonl is read backwards in blocks of this size, until both last rows are found
# A heartbeat is stale (its process is gone or stopped) after this many of its intervals, plus a margin for clocks
# that differ between nodes and for a shared file system's delays in showing a new file.
_STALE_BEATS, _STALE_MARGIN_S = 3, 30.0


@dataclass
class RunInfo:
    """One run directory as `hvdlm runs` shows it; None where the files do not say."""

    name: str
    path: str
    state: str  # finished, running, preempted or failed (see the module)
    step: int | None  # the last logged step
    max_steps: int | None  # train.max_steps of config.toml
    loss: float | None  # of the last training row
    val_loss: float | None  # of the last evaluation row
    tokens_per_s: float | None  # of the last training row
    checkpoint: str | None  # the newest complete checkpoint (its first file, for sharded ones)
    checkpoint_step: int | None
    verified: str | None  # the newest complete checkpoint whose manifest checks out (see `_verified`)
    verified_step: int | None
    updated: float | None  # when a file of the run last changed (seconds since the epoch)
    note: str | None = None  # something unreadable, e.g. a damaged config.toml
    exit_code: int | None = None  # how it ended (status.json); None while it runs, or where nothing says
    cause: str | None = None  # why it ended so (status.json), or why it counts as failed
    stopped_step: int | None = None  # the steps complete where it stopped (can be past `step`, the last logged)
    host: str | None = None  # where rank 0 runs or ran (status.json)
    pid: int | None = None  # rank 0's process there


def find_runs(root: str | Path) -> list[Path]:
    """The run directories under ROOT (its direct subdirectories holding config.toml or metrics.jsonl), by name;
    ROOT alone when it is a run directory itself."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"'{root}' does not exist. Name the directory that holds your run directories (runs/).")
    if not root.is_dir():
        raise InputError(f"'{root}' is a file, not a directory. Name the directory that holds your run directories.")
    if _is_run(root):
        return [root]
    try:
        return sorted((p for p in root.iterdir() if p.is_dir() and _is_run(p)), key=lambda p: p.name)
    except OSError as e:
        raise InputError(f"cannot list '{root}': {e.strerror or e}. Name a directory you can read.") from None


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in _RUN_FILES)


def list_runs(
    root: str | Path, active_seconds: float = 600, now: float | None = None, digests: bool = False
) -> list[RunInfo]:
    """Every run under ROOT with its state; a run is running when a file of it changed within `active_seconds`.
    `digests`: the verified checkpoint is checked by sha256 (every byte read), not by size (see `_verified`)."""
    now = time.time() if now is None else now
    return [run_info(path, active_seconds, now, digests) for path in find_runs(root)]


def run_info(path: Path, active_seconds: float, now: float, digests: bool = False) -> RunInfo:
    max_steps, note = _max_steps(path)
    last, train, val = _last_rows(path / METRICS_FILE)
    saved = _newest_checkpoint(path)
    verified = _verified(path, digests)
    info = RunInfo(
        name=path.resolve().name,
        path=str(path),
        state="",
        step=_number(last, "step"),
        max_steps=max_steps,
        loss=_number(train, "loss"),
        val_loss=_number(val, "val_loss"),
        tokens_per_s=_number(train, "tokens_per_s"),
        checkpoint=str(saved.paths[0]) if saved else None,
        checkpoint_step=saved.step if saved else None,
        verified=str(verified.paths[0]) if verified else None,
        verified_step=verified.step if verified else None,
        updated=_last_change(path),
        note=note,
    )
    info.state = _state(info, path, active_seconds, now)
    return info


def _state(info: RunInfo, path: Path, active_seconds: float, now: float) -> str:
    """The rules of the module docstring, in order."""
    record = read_status(path)
    if record is not None:
        info.host, info.pid = _text(record, "host"), _integer(record, "pid")
    summary_steps = _summary_steps(path)
    if summary_steps is not None and (info.max_steps is None or summary_steps >= info.max_steps):
        return FINISHED
    if record is not None and record["state"] != RUNNING:
        return _ended(info, record)
    beats = _heartbeats(path, record)
    if _alive(record, beats, info.updated, active_seconds, now):
        return RUNNING
    return _gone(info, record, beats)


def _ended(info: RunInfo, record: dict) -> str:
    """The state of a run whose status.json says how it ended."""
    stopped = info.stopped_step = _integer(record, "step")
    info.exit_code, info.cause = _integer(record, "exit_code"), _text(record, "cause")
    if record["state"] == FAILED:
        return FAILED
    if record["state"] == FINISHED and stopped is not None and info.max_steps is not None and stopped >= info.max_steps:
        return FINISHED  # (its summary.json is gone)
    # Stopped at a checkpoint (finished: a run whose train.max_steps has grown since): resumable without a loss
    # only while that checkpoint is still the newest.
    if stopped is not None and info.checkpoint_step is not None and info.checkpoint_step >= stopped:
        return PREEMPTED
    behind = "no checkpoint is left" if info.checkpoint_step is None else "its newest checkpoint is behind it"
    info.cause = f"{info.cause or record['state']}; but {behind}"
    return FAILED


def _alive(record: dict | None, beats: list[dict], updated: float | None, active_seconds: float, now: float) -> bool:
    """Whether the run's processes still run: asked of the system where they are on this host, judged by their
    heartbeats' age where they are elsewhere, by the files' age where nothing else tells."""
    here = socket.gethostname()
    local = [r for r in ([record] if record else []) + beats if r.get("host") == here and _integer(r, "pid")]
    if local:
        return any(_process_runs(r["pid"], r.get("process_start")) for r in local)
    if beats:
        return any(now - b["time"] <= _STALE_BEATS * (_number(b, "every") or 0) + _STALE_MARGIN_S for b in beats)
    return updated is not None and now - updated <= active_seconds


def _process_runs(pid: int, started: int | None) -> bool:
    """Whether process `pid` runs, and is the one that started at `started` (not a reuse of its pid)."""
    now_started = process_start(pid)
    if now_started is not None and started is not None:
        return now_started == started
    if Path("/proc/self/stat").exists():  # /proc is there, and has no live process of this pid
        return now_started is not None
    try:  # no /proc (not Linux): whether a process of that pid exists at all
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _gone(info: RunInfo, record: dict | None, beats: list[dict]) -> str:
    """The state of a run that no longer runs and did not say how it ended."""
    beaten = [steps_done(b.get("phase", ""), _integer(b, "step")) for b in beats]
    info.stopped_step = max((s for s in [info.step, *beaten] if s is not None), default=None)
    if record is not None:  # it recorded its start, and ended before it could record its end
        where = f" (pid {info.pid} on {info.host})" if info.pid else ""
        info.cause = (
            f"its process{where} is gone without saying how it ended: killed (SIGKILL, out of memory) or its node "
            "was lost"
        )
        return FAILED
    if info.checkpoint_step is not None and info.checkpoint_step >= (info.stopped_step or 0):
        return PREEMPTED
    return FAILED


def _heartbeats(path: Path, record: dict | None) -> list[dict]:
    """The ranks' heartbeats (hvdlm.training.watchdog) of the attempt status.json names (beats older than its
    start, less a margin for clocks, are an earlier attempt's)."""
    since = record["time"] - _STALE_MARGIN_S if record and isinstance(record.get("time"), (int, float)) else 0
    beats = []
    for p in (path / HEARTBEAT_DIR).glob("rank-*.json"):
        try:
            beat = json.loads(p.read_text())
        except (OSError, ValueError):  # being replaced, or torn
            continue
        if isinstance(beat, dict) and isinstance(beat.get("time"), (int, float)) and beat["time"] >= since:
            beats.append(beat)
    return beats


def _max_steps(path: Path) -> tuple[int | None, str | None]:
    config = path / CONFIG_FILE
    if not config.is_file():
        return None, "no config.toml"
    try:
        steps = tomllib.loads(config.read_text()).get("train", {}).get("max_steps")
    except (OSError, ValueError) as e:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"config.toml unreadable ({e})"
    return (steps, None) if isinstance(steps, int) else (None, "config.toml has no train.max_steps")


def _summary_steps(path: Path) -> int | None:
    try:
        steps = json.loads((path / SUMMARY_FILE).read_text()).get("steps")
    except (OSError, ValueError, AttributeError):  # missing, torn, or not an object
        return None
    return steps if isinstance(steps, int) else None


def _last_rows(path: Path) -> tuple[dict | None, dict | None, dict | None]:
    """The last row, the last training row (with "loss") and the last evaluation row (with "val_loss")."""
    last = train = val = None
    for row in _rows_from_end(path):
        last = last or row
        if train is None and "loss" in row:
            train = row
        if val is None and "val_loss" in row:
            val = row
        if train is not None and val is not None:
            break
    return last, train, val


def _rows_from_end(path: Path):
    """The JSON-object rows of a metrics.jsonl, last first; lines that do not parse (a torn last line) skipped.

    Read backwards in blocks: a long run's file has many thousand rows, and only the last few are wanted.
    """
    try:
        f = open(path, "rb")
    except OSError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        rest = b""  # the start of the line that begins before the block read last
        while end > 0:
            start = max(0, end - _TAIL_BLOCK)
            f.seek(start)
            lines = (f.read(end - start) + rest).split(b"\n")
            rest = lines.pop(0) if start > 0 else b""
            for line in reversed(lines):
                if (row := _parse(line)) is not None:
                    yield row
            end = start


def _parse(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _integer(row: dict, key: str) -> int | None:
    value = row.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    return value if isinstance(value, str) else None


def _number(row: dict | None, key: str) -> Any:
    value = (row or {}).get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _newest_checkpoint(path: Path):
    try:
        saves = find_checkpoints(path)
    except OSError:
        return None
    return saves[0] if saves else None


def _verified(path: Path, digests: bool):
    """The newest complete checkpoint whose manifest (hvdlm.checkpoint.manifest) lists exactly its files, each
    there with the size written, or with `digests` also the sha256 written (every byte read: about 1 GB/s). By size
    it is a few stat calls, fast enough for every listing, and finds a truncated or missing file, not a flipped
    byte. A save without a manifest (from before checksums, or killed before its manifest) is not verified."""
    try:
        saves = find_checkpoints(path)
    except OSError:
        return None
    for saved in saves:
        try:
            listed = read_manifest(saved.manifest)
        except InputError:
            continue  # a damaged manifest: this save cannot be vouched for
        if listed is None or set(listed) != {p.name for p in saved.files}:
            continue
        check = problem if digests else _size_problem
        if not any(check(p, listed[p.name]) for p in saved.files):
            return saved
    return None


def _size_problem(path: Path, entry: dict) -> str | None:
    try:
        return None if path.stat().st_size == entry["bytes"] else "size"
    except OSError:
        return "missing"


def _last_change(path: Path) -> float | None:
    """When the run last wrote: its metrics, its config, or a checkpoint (also a save in progress)."""
    candidates = [path / name for name in (*_RUN_FILES, SUMMARY_FILE, STATUS_FILE)]
    checkpoints = path / CHECKPOINT_DIR
    if checkpoints.is_dir():
        candidates += list(checkpoints.glob("*step-*"))
    times = []
    for p in candidates:
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=None)


# -- rendering ---------------------------------------------------------------------------------------------------

_COLUMNS = ("RUN", "STATE", "STEP", "LOSS", "VAL LOSS", "TOK/S", "CHECKPOINT", "VERIFIED", "UPDATED")


def render_json(runs: list[RunInfo]) -> str:
    return json.dumps([asdict(r) for r in runs], indent=2)


def render_table(runs: list[RunInfo], now: float | None = None) -> str:
    """A fixed-width table, one run per line, notes below it."""
    now = time.time() if now is None else now
    rows = [_COLUMNS] + [_cells(r, now) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{r.name}: {r.note}" for r in runs if r.note]
    lines += [_failure(r) for r in runs if r.state == FAILED]
    return "\n".join(lines)


def _failure(r: RunInfo) -> str:
    """One line under the table for a failed run: where and how it ended, and what a resume would redo."""
    where = "" if r.stopped_step is None else f" at step {r.stopped_step}"
    code = "" if r.exit_code is None else f" (exit {r.exit_code})"
    cause = "" if r.cause is None else f": {' '.join(r.cause.split())}"
    if r.checkpoint_step is None:
        resume = "no checkpoint, so --resume auto starts over"
    elif r.stopped_step is not None and r.stopped_step > r.checkpoint_step:
        lost = r.stopped_step - r.checkpoint_step
        resume = f"--resume auto goes back to its checkpoint of step {r.checkpoint_step} ({lost} step(s) redone)"
    else:
        resume = f"--resume auto continues from its checkpoint of step {r.checkpoint_step}"
    return f"{r.name}: failed{where}{code}{cause}; {resume}"


def _cells(r: RunInfo, now: float) -> tuple[str, ...]:
    step = "-" if r.step is None else str(r.step)
    if r.max_steps is not None:
        step += f"/{r.max_steps}"
    return (
        r.name,
        r.state,
        step,
        _float(r.loss),
        _float(r.val_loss),
        "-" if r.tokens_per_s is None else format_count(r.tokens_per_s),
        "-" if r.checkpoint is None else Path(r.checkpoint).name,
        "-" if r.verified is None else Path(r.verified).name,
        "-" if r.updated is None else f"{_age(now - r.updated)} ago",
    )


def _float(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"

"""`hvdlm plot`: charts that compare runs, from their metrics.jsonl.

    loss.png         training loss and validation loss against the step
    loss_tokens.png  the same against the tokens trained on (runs with other batch sizes line up)
    throughput.png   tokens per second against the step

Every input is read and checked before anything is written, so bad input leaves no half set of charts behind.
matplotlib is imported only when drawing (with the Agg backend: no display needed on a cluster node).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write
from hvdlm.runfiles import METRICS_FILE

CHARTS = ("loss.png", "loss_tokens.png", "throughput.png")


@dataclass
class RunMetrics:
    """The rows of one run's metrics.jsonl, split by kind."""

    name: str  # the run directory's name: the charts' legend
    train: list[dict[str, Any]] = field(default_factory=list)  # rows with "loss"
    val: list[dict[str, Any]] = field(default_factory=list)  # rows with "val_loss"


def read_run(run_dir: str | Path) -> RunMetrics:
    """The metrics of RUN_DIR; InputError for a missing file, a line that is not a JSON row, or no training row.

    A last line without its newline that does not parse is a row being written (or torn by a kill): skipped.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.exists():
        raise InputError(
            f"run directory '{run_dir}' does not exist. Check the path: name the directory given to "
            "`hvdlm train --run-dir` (or printed as 'run directory:' by a run)."
        )
    if not run_dir.is_dir():
        raise InputError(
            f"'{run_dir}' is a file, not a run directory. Name the directory that holds its {METRICS_FILE}."
        )
    if not path.is_file():
        raise InputError(
            f"'{run_dir}' has no {METRICS_FILE}: it is not a run directory, or its run has not logged a step yet. "
            "Name the directory given to `hvdlm train --run-dir` (or printed as 'run directory:' by a run)."
        )
    run = RunMetrics(name=run_dir.resolve().name)
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines) and not line.endswith("\n"):
                break
            row = None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            raise InputError(
                f"{path}, line {number}, is not a metrics row (a JSON object with a 'step'): {line.strip()[:80]!r}. "
                "Delete or repair that line (metrics.jsonl holds one JSON object per line), then plot again."
            )
        if _is_number(row.get("loss")):
            run.train.append(row)
        if _is_number(row.get("val_loss")):
            run.val.append(row)
    if not run.train:
        raise InputError(
            f"{path} has no training rows (rows with a 'loss'), so there is nothing to plot. Plot a run that has "
            "trained at least train.log_interval steps."
        )
    return run


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_out_dir(run_dirs: list[str | Path]) -> Path:
    return Path(run_dirs[0]) / "plots"


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Write the charts comparing RUN_DIRS into OUT_DIR (default: plots/ in the first run); their paths."""
    if not run_dirs:
        raise InputError("name at least one run directory to plot.")
    runs = [read_run(d) for d in run_dirs]  # every input checked before anything is written
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    if out.exists() and not out.is_dir():
        raise InputError(f"the output '{out}' is a file, not a directory. Pass another -o OUT_DIR.")

    created = not out.exists()
    _make_out_dir(out)
    try:
        return _draw_and_write(runs, out)
    except BaseException:
        if created:  # a directory this call made and could not fill goes too
            shutil.rmtree(out, ignore_errors=True)
        raise


def _draw_and_write(runs: list[RunMetrics], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: cluster nodes have no display
    import matplotlib.pyplot as plt

    # Every chart is drawn before any is written, and each is written atomically: a full disk or a failing
    # chart leaves the old file or the new one, never a 0-byte or half PNG.
    images = []
    for chart, draw in zip(CHARTS, (_loss_by_step, _loss_by_tokens, _throughput)):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        try:
            draw(ax, runs)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            images.append((out / chart, buffer.getvalue()))
        finally:
            plt.close(fig)
    return [_write_chart(path, data) for path, data in images]


def _make_out_dir(out: Path) -> None:
    """Create OUT_DIR and make sure files can be created in it, before anything is drawn."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create '{out}': {e.strerror or e}. Pass an -o OUT_DIR you can write to.") from None
    if not os.access(out, os.W_OK | os.X_OK):  # access() also says no on a read-only file system, even to root
        raise InputError(f"cannot write into '{out}': {_why_not_writable(out)}. Pass an -o OUT_DIR you can write to.")


def _why_not_writable(directory: Path) -> str:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        pass
    return os.strerror(errno.EACCES)


def _write_chart(path: Path, data: bytes) -> Path:
    try:
        atomic_write(path, data)
    except OSError as e:
        fix = "Free space on that disk, or pass" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "Pass"
        raise InputError(
            f"cannot write '{path}': {e.strerror or e} (nothing was written there). {fix} an -o OUT_DIR you can "
            "write to."
        ) from None
    return path


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in rows if _is_number(r.get(x)) and _is_number(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _loss_by(ax, runs: list[RunMetrics], x: str, label: str) -> None:
    for i, run in enumerate(runs):
        color = f"C{i % 10}"  # one color per run; dashed for its validation loss
        xs, ys = _series(run.train, x, "loss")
        if xs:
            ax.plot(xs, ys, color=color, linewidth=1, label=f"{run.name} train")
        xs, ys = _series(run.val, x, "val_loss")
        if xs:
            ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{run.name} val")
    ax.set_xlabel(label)
    ax.set_ylabel("loss (cross-entropy, nats per token)")


def _loss_by_step(ax, runs: list[RunMetrics]) -> None:
    _loss_by(ax, runs, "step", "step")
    ax.set_title("loss")


def _loss_by_tokens(ax, runs: list[RunMetrics]) -> None:
    _loss_by(ax, runs, "tokens", "tokens trained on")
    ax.set_title("loss against tokens")
    missing = [r.name for r in runs if not _series(r.train, "tokens", "loss")[0]]
    if missing:  # runs written before metrics rows carried "tokens"
        ax.text(
            0.5,
            0.02,
            f"no 'tokens' in the rows of: {', '.join(missing)}",
            transform=ax.transAxes,
            ha="center",
            fontsize="small",
            color="gray",
        )


def _throughput(ax, runs: list[RunMetrics]) -> None:
    for i, run in enumerate(runs):
        xs, ys = _series(run.train, "step", "tokens_per_s")
        if xs:
            ax.plot(xs, ys, color=f"C{i % 10}", linewidth=1, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s (whole job)")
    ax.set_title("throughput")

"""Checkpoints in a run directory: their names, finding the newest complete one, pruning, setting aside.

With pipeline stages a save has one file per (stage, TP rank): `step-0000100.pp1-of-2.tp0-of-2.pt` (the `.ppS-of-P`
part only when pp > 1, the `.tpR-of-T` part only when tp > 1), in stage-major order. A ZeRO-1 save adds, beside
each shard file, one file per DP rank d of Z holding its slice of the optimizer state (hvdlm.checkpoint.slices):
`step-0000100.pp1-of-2.tp0-of-2.zero1-of-2.pt`.

A save is complete when every shard file is there, and every slice file of every shard (Z of them, as the slice
files' names say) when any is; a save killed between shards leaves an incomplete set, which is passed over and
never pruned. Nothing here builds a model or reads tensors beyond `newest_loadable` and `newest_intact`, and only
they import torch (inside them): `hvdlm runs` lists checkpoints on a login node with the rest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdlm.errors import InputError
from hvdlm.runfiles import CHECKPOINT_DIR, MANIFEST_SUFFIX

_SHARD_NAME = re.compile(
    r"^(?P<stem>.+?)(?:\.pp(?P<pp_rank>\d+)-of-(?P<pp>\d+))?(?:\.tp(?P<rank>\d+)-of-(?P<size>\d+))?\.pt$"
)


_STEP_STEM = re.compile(r"^step-(?P<step>\d+)$")

# A ZeRO slice file: its shard's name with `.zeroD-of-Z` before `.pt` (the shard pattern reads it as another stem).
_SLICE_NAME = re.compile(r"^(?P<shard>.+)\.zero(?P<rank>\d+)-of-(?P<size>\d+)\.pt$")


def checkpoint_path(run_dir: Path, step: int, tp_rank: int = 0, tp: int = 1, pp_rank: int = 0, pp: int = 1) -> Path:
    """The file of TP rank `tp_rank` (of `tp`) of stage `pp_rank` (of `pp`) at `step`; one unsharded file when
    tp = pp = 1."""
    return Path(run_dir) / CHECKPOINT_DIR / shard_name(f"step-{step:07d}", tp_rank, tp, pp_rank, pp)


def shard_name(stem: str, tp_rank: int, tp: int, pp_rank: int, pp: int) -> str:
    stage = f".pp{pp_rank}-of-{pp}" if pp > 1 else ""
    shard = f".tp{tp_rank}-of-{tp}" if tp > 1 else ""
    return f"{stem}{stage}{shard}.pt"


def slice_name(shard: str, dp_rank: int, dp: int) -> str:
    """The file of DP rank `dp_rank` (of `dp`)'s ZeRO slice of the optimizer state beside shard file `shard`."""
    return f"{shard.removesuffix('.pt')}.zero{dp_rank}-of-{dp}.pt"


def _shard_of(name: str) -> tuple[str, int, tuple[int, int]] | None:
    """(stem, index, (pp, tp)) of a checkpoint file name: its shard's index among all (stage-major) and the
    layout it belongs to; None for other names."""
    m = _SHARD_NAME.match(name)
    if not m:
        return None
    pp_rank, pp = int(m["pp_rank"] or 0), int(m["pp"] or 1)
    tp_rank, tp = int(m["rank"] or 0), int(m["size"] or 1)
    if pp_rank >= pp or tp_rank >= tp:
        return None
    return m["stem"], pp_rank * tp + tp_rank, (pp, tp)


def _layout_paths(folder: Path, stem: str, layout: tuple[int, int]) -> list[Path]:
    pp, tp = layout
    return [folder / shard_name(stem, r % tp, tp, r // tp, pp) for r in range(pp * tp)]


@dataclass(frozen=True)
class SavedCheckpoint:
    """One save in a run directory: its step, its shard files (one per (stage, TP rank), stage-major) and its ZeRO
    slice files (none for a save without ZeRO)."""

    step: int
    paths: tuple[Path, ...]
    slices: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Every checkpoint file of the save (what its manifest lists)."""
        return self.paths + self.slices

    @property
    def manifest(self) -> Path:
        """The save's checksum manifest (hvdlm.checkpoint.manifest); absent for a save from before checksums."""
        return self.paths[0].with_name(f"step-{self.step:07d}{MANIFEST_SUFFIX}")

    @property
    def all_files(self) -> tuple[Path, ...]:
        """The files and the manifest: what pruning deletes and setting aside moves (the manifest last, so a save
        interrupted while pruned never looks verified without its files)."""
        return self.files + (self.manifest,)


def find_checkpoints(run_dir: str | Path) -> list[SavedCheckpoint]:
    """The complete checkpoints in RUN_DIR/checkpoints, newest first.

    Complete means every shard file is there (a save killed between shards leaves an incomplete set, which is
    skipped); whether the files read is for `load_checkpoint` to say.
    """
    return [saved for saved, missing in _scan(run_dir) if not missing]


def every_save(run_dir: str | Path) -> list[tuple[SavedCheckpoint, list[str]]]:
    """Every save in RUN_DIR/checkpoints, complete or not, newest first, with the names of its missing files."""
    return _scan(run_dir)


def _scan(run_dir: str | Path) -> list[tuple[SavedCheckpoint, list[str]]]:
    """Every save in RUN_DIR/checkpoints, newest first, with the names of its missing shard and slice files."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found: dict[tuple[int, tuple[int, int]], set[int]] = {}
    sliced: dict[tuple[int, tuple[int, int]], set[int]] = {}  # the save's slice counts Z (one, unless damaged)
    for p in folder.glob("step-*.pt"):
        m = _SLICE_NAME.match(p.name)
        if m and (shard := _shard_of(m["shard"] + ".pt")) and (s := _STEP_STEM.match(shard[0])):
            sliced.setdefault((int(s["step"]), shard[2]), set()).add(int(m["size"]))
        elif (shard := _shard_of(p.name)) and (s := _STEP_STEM.match(shard[0])):
            found.setdefault((int(s["step"]), shard[2]), set()).add(shard[1])
    saves = []
    for key in sorted(found.keys() | sliced.keys(), reverse=True):
        step, layout = key
        paths = tuple(_layout_paths(folder, f"step-{step:07d}", layout))
        ranks = found.get(key, set())
        slices = tuple(
            folder / slice_name(p.name, d, z) for z in sorted(sliced.get(key, ())) for p in paths for d in range(z)
        )
        missing = [p.name for r, p in enumerate(paths) if r not in ranks] + [p.name for p in slices if not p.is_file()]
        saves.append((SavedCheckpoint(step, paths, slices), missing))
    return saves


def newest_loadable(
    run_dir: str | Path, warn=print, mmap: bool = False
) -> tuple[SavedCheckpoint, list[dict[str, Any]]] | None:
    """The newest checkpoint of RUN_DIR whose every shard reads, with the shards' states (`mmap`: memory-mapped, for
    readers that only describe them); None if there is no complete checkpoint at all.

    A damaged, unreadable or incomplete newer one is reported through `warn` and passed over for the one before;
    complete checkpoints none of which reads are an InputError (nothing is changed).
    """
    from hvdlm.checkpoint.format import load_checkpoint  # torch: only for the functions that read tensors

    return _newest(run_dir, warn, lambda saved: [load_checkpoint(p, mmap=mmap) for p in saved.paths])


def newest_intact(run_dir: str | Path, warn=print) -> SavedCheckpoint | None:
    """`newest_loadable`'s choice without holding any of its states: each file checked against the save's manifest
    and opened mapped (a resume at the layout that saved then reads only its own files)."""
    from hvdlm.checkpoint.format import check_loadable

    found = _newest(run_dir, warn, lambda saved: check_loadable(list(saved.paths)))
    return found[0] if found else None


def _newest(run_dir: str | Path, warn, read: Callable[[SavedCheckpoint], Any]) -> tuple[SavedCheckpoint, Any] | None:
    """The newest complete save that `read` takes without an InputError, with what it returned (see
    `newest_loadable`)."""
    damaged = 0
    for saved, missing in _scan(run_dir):
        if missing:
            warn(f"WARNING: skipping checkpoint step {saved.step}: incomplete, {', '.join(missing)} missing.")
            continue
        try:
            return saved, read(saved)
        except InputError as e:
            damaged += 1
            warn(f"WARNING: skipping checkpoint step {saved.step}: {e}")
    if damaged:
        raise InputError(
            f"none of the checkpoints in '{Path(run_dir) / 'checkpoints'}' reads ({damaged} tried, see the warnings "
            "above). "
            "Restore them from a copy, or name a good checkpoint file; hvdlm leaves them as they are."
        )
    return None


def run_directory(path: str | Path) -> Path | None:
    """The run directory `path` names (RUN_DIR, or RUN_DIR/checkpoints), or None: it names a file."""
    path = Path(path)
    if path.is_dir() and path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir():
        return path.parent  # RUN_DIR/checkpoints named instead of RUN_DIR
    return path if path.is_dir() else None


def refuse_missing_run(path: str | Path) -> None:
    """A run directory named on the command line that is not there, said as such (a name ending in .pt is a
    checkpoint's, which shard_paths looks for, its shards included)."""
    if not Path(path).exists() and Path(path).suffix != ".pt":
        raise InputError(
            f"run directory '{path}' does not exist. Name a run directory (its newest checkpoint is used) or a "
            "checkpoint file (RUN_DIR/checkpoints/step-N.pt)."
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint named by a run directory (its newest complete checkpoint) or by a file (or any shard)."""
    run_dir = run_directory(path)
    if run_dir is not None:
        path = run_dir
        saved = find_checkpoints(path)
        if not saved:
            raise InputError(
                f"'{path}' holds no complete checkpoint (looked in {path / 'checkpoints'}). Name a run directory "
                "that has written one, or a checkpoint file."
            )
        return saved[0].paths[0]
    return path


def shard_paths(path: str | Path) -> list[Path]:
    """The files of the checkpoint `path` names, in (stage, TP rank) order.

    `path` may be an unsharded file, any one shard (`step-0000100.tp0-of-2.pt`, `step-0000100.pp1-of-2.pt`), or
    the unsharded name of a sharded checkpoint (`step-0000100.pt` when only its shards exist).
    """
    path = Path(path)
    shard = _shard_of(path.name)
    if shard and shard[2] != (1, 1):
        stem, layout = shard[0], shard[2]
    elif path.is_file():
        return [path]
    else:
        stem = path.name[: -len(".pt")] if path.name.endswith(".pt") else path.name
        layouts = {s[2] for p in path.parent.glob(f"{stem}.*-of-*.pt") if (s := _shard_of(p.name)) and s[0] == stem}
        if not layouts:
            raise InputError(f"no checkpoint at '{path}': neither that file nor its shards ({stem}.tpN-of-M.pt) exist.")
        if len(layouts) > 1:
            sizes = sorted(_describe_layout(k) for k in layouts)
            raise InputError(f"'{path.parent}' holds shards of '{stem}' for several layouts {sizes}; name one shard.")
        layout = layouts.pop()
    paths = _layout_paths(path.parent, stem, layout)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(
            f"checkpoint '{stem}' in '{path.parent}' is incomplete: {len(missing)} of its {len(paths)} shards are "
            f"missing ({', '.join(missing)})."
        )
    return paths


def _describe_layout(layout: tuple[int, int]) -> str:
    pp, tp = layout
    return f"tp {tp}" if pp == 1 else f"pp {pp} x tp {tp}"


def prune_checkpoints(run_dir: str | Path, keep: int, newest: int) -> list[int]:
    """Delete all but the `keep` newest complete checkpoints up to step `newest`, the one just written (keep = 0
    keeps all); returns the deleted steps.

    Called after a save is complete on every rank, so the newest is whole before an older one goes. Incomplete
    sets (a save killed between shards) and anything newer than `newest` are left alone.
    """
    if keep <= 0:
        return []
    removed = [saved for saved in find_checkpoints(run_dir) if saved.step <= newest][keep:]
    for saved in removed:
        for p in saved.all_files:
            p.unlink(missing_ok=True)
    return [saved.step for saved in removed]


def set_aside_newer(run_dir: str | Path, step: int) -> Path | None:
    """Move the checkpoint files of steps after `step` into checkpoints/set-aside-after-NNNNNNN/.

    A run resumed from step S writes its own checkpoints after S; those an abandoned attempt left there (after a
    resume from an earlier step by choice, or a damaged newest file that was passed over) would otherwise outrank
    them in the next `--resume auto` and in pruning. They are kept, not deleted: they may be someone's evidence.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    newer = [p for saved, _ in _scan(run_dir) if saved.step > step for p in saved.all_files if p.exists()]
    if not newer:
        return None
    aside = folder / f"set-aside-after-{step:07d}"
    aside.mkdir(exist_ok=True)
    for p in newer:
        os.replace(p, aside / p.name)
    return aside


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Temporary files of saves killed mid-write: never a checkpoint, only wasted space.

    hvdlm.fsutil.atomic_writer names them `.NAME.tmp-PID` (temporary_path), here `.step-*.pt.tmp-PID`.
    """
    for p in (Path(run_dir) / CHECKPOINT_DIR).glob(".step-*.pt.tmp-*"):
        p.unlink(missing_ok=True)

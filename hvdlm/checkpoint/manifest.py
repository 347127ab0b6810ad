"""Checksums of a save: every file's digest in a small manifest written last, and the files checked against it.

A save at step N leaves `step-000000N.manifest.json` (hvdlm.runfiles.MANIFEST_SUFFIX) beside its shard and ZeRO
slice files in RUN_DIR/checkpoints, written by rank 0 once every file of the save is on disk (the "saved.N"
agreement of hvdlm.checkpoint.manager), atomically (hvdlm.fsutil):

    {"format": 1, "step": N, "digest": "sha256", "files": {NAME: {"bytes": SIZE, "sha256": HEX}, ...}}

Each writer hashes its file while torch.save streams it out (HashingWriter), so a save reads nothing back.
`check_files` is what every reader of a checkpoint calls before loading it (hvdlm.checkpoint.format
load_checkpoint): a file that is missing, truncated or not what was written is one InputError naming it; a save
without a manifest (written before hvdlm recorded checksums) loads as it always did. `verify_save` checks a whole
save (hvdlm.checkpoint.verify). Standard library only: `hvdlm checkpoint verify` runs on login nodes without torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write
from hvdlm.runfiles import MANIFEST_SUFFIX

# sha256: hashlib always has it, and with the CPU's SHA instructions (x86 SHA-NI, ARMv8 SHA2) it ran at about
# 1,800 MB/s on a 100 MB buffer on this project's 2-core AMD EPYC machine, faster than the disks a checkpoint is
# written to and read from, so a save hashing while it writes loses nothing measurable. xxhash is faster still but
# an extra dependency, and its speed would buy nothing here; crc32 is fast too, but too weak to tell a file from a
# deliberately or accidentally similar one.
DIGEST = "sha256"
_FORMAT = 1
_CHUNK = 1 << 20  # the block read while verifying: large enough that hashing, not the loop, takes the time


class HashingWriter:
    """A binary file that hashes every byte written through it (torch.save streams into it: no second read)."""

    def __init__(self, f: BinaryIO):
        self._f, self._hash, self.size = f, hashlib.new(DIGEST), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += len(view)
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()

    def entry(self) -> dict[str, Any]:
        """The manifest's record of the file written: its size and digest."""
        return {"bytes": self.size, DIGEST: self._hash.hexdigest()}


def manifest_path(path: Path) -> Path:
    """The manifest of the save that checkpoint file `path` belongs to (its step: the name's first part)."""
    return path.with_name(path.name.split(".")[0] + MANIFEST_SUFFIX)


def write_manifest(path: Path, step: int, files: dict[str, dict[str, Any]]) -> Path:
    """Write the manifest of the save at `step` (`files`: name -> HashingWriter.entry) atomically."""
    record = {"format": _FORMAT, "step": step, "digest": DIGEST, "files": dict(sorted(files.items()))}
    return atomic_write(path, json.dumps(record, indent=1) + "\n")


def read_manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    """The files a manifest lists (name -> entry), or None when there is none (a save from before checksums)."""
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record.get("digest") != DIGEST or not all({"bytes", DIGEST} <= set(e) for e in files.values()):
            raise ValueError("unknown digest or entries")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"the checksum manifest '{path}' is damaged or not hvdlm's ({type(e).__name__}: {e}), so its checkpoint "
            "cannot be verified. Copy it again from the run directory, or delete it to load the files unverified."
        ) from None
    return files


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, DIGEST).hexdigest()


def problem(path: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with the file at `path` against its manifest entry, or None: it is what was written."""
    if not path.is_file():
        return f"{path.name} is missing (its manifest lists it)"
    size = path.stat().st_size
    if size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "longer than written"
        return f"{path.name} is {state} ({size:,} bytes, {entry['bytes']:,} written)"
    if file_digest(path) != entry[DIGEST]:
        return f"{path.name} differs from what was written (its {DIGEST} does not match the manifest)"
    return None


def verify_save(manifest: Path, files: Iterable[Path] = ()) -> list[str]:
    """Every problem of the save `manifest` describes: each file it lists checked, and `files` of the save that
    it does not list. Raises InputError for a damaged manifest; [] when there is none to check against."""
    listed = read_manifest(manifest)
    if listed is None:
        return []
    found = [problem(manifest.parent / name, entry) for name, entry in listed.items()]
    found += [f"{p.name} is not in its manifest" for p in files if p.name not in listed]
    return [p for p in found if p]


def check_files(paths: Iterable[Path]) -> None:
    """Refuse files that are not what their save wrote (one InputError naming them); files whose save has no
    manifest pass unchecked, as before checksums."""
    for path in paths:
        listed = read_manifest(manifest_path(path))
        if listed is None:
            continue
        entry = listed.get(path.name)
        found = f"{path.name} is not in its manifest" if entry is None else problem(path, entry)
        if found:
            raise InputError(
                f"checkpoint file '{path}' fails its checksum: {found} ({manifest_path(path).name}). Copy the "
                "checkpoint again from where it was written, or name another step's checkpoint."
            )

"""The Horovod wheel carried between GPU lends, so that a lend installs it (seconds) instead of building it (about
170 s of a 15-minute lend). Standard library only: it runs before anything is installed.

A wheel is kept under bench/gpu_wheels/KEY/ (git-ignored; carried to the device machine with the tree), KEY being
hvdlm/install/setup.sh's cache key: Horovod's version, torch's (with its CUDA build), Python's, the CUDA version,
the GPU architectures and the patches, e.g. horovod-0.28.1-torch2.11.0+cu130-py3.12-cuda13.0-nccl-sm90-1a2b3c4d.
setup.sh picks a wheel by that key from its cache, so a carried wheel is used exactly when the machine matches it.

    python bench/wheel_cache.py seed CARRIED CACHE         # before setup.sh: carried wheels into its cache
    python bench/wheel_cache.py export CARRIED CACHE OUT   # after: a wheel it built, in parts, for $OUT
    python bench/wheel_cache.py keep OUT CARRIED           # on the session's machine: the parts back into a wheel

Why parts: the device tool brings back files of at most 16 MiB, named in letters, digits, '.', '_' and '-'
(bench/log/RESULTS.md); Horovod's CUDA wheel is larger, and keys hold a '+'. `export` writes OUT/wheel/key.json
(key, wheel name, size, sha256) and OUT/wheel/part-NN of at most 15 MiB each; `keep` joins them, checks the size
and sha256, and files the wheel under CARRIED/KEY/.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

PART_BYTES = 15 * 2**20  # under the device tool's 16 MiB a file


def _wheels(folder: Path) -> dict[str, Path]:
    """KEY -> its wheel, for every KEY/horovod-*.whl under folder."""
    if not folder.is_dir():
        return {}
    return {w.parent.name: w for w in sorted(folder.glob("*/horovod-*.whl"))}


def seed(carried: Path, cache: Path) -> list[str]:
    """Copy every carried wheel into setup.sh's cache (CACHE/wheels/KEY/); the keys copied."""
    for key, wheel in _wheels(carried).items():
        target = cache / "wheels" / key
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, target / wheel.name)
    return sorted(_wheels(carried))


def export(carried: Path, cache: Path, out: Path, part_bytes: int = PART_BYTES) -> str | None:
    """The wheel setup.sh built on this machine (a cache key not carried), as parts under OUT/wheel/; its key, or
    None when every wheel in the cache came carried."""
    built = {k: w for k, w in _wheels(cache / "wheels").items() if k not in _wheels(carried)}
    if not built:
        return None
    key, wheel = sorted(built.items())[-1]
    data = wheel.read_bytes()
    folder = out / "wheel"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    parts = [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]
    for n, part in enumerate(parts):
        (folder / f"part-{n:02d}").write_bytes(part)
    meta = {"key": key, "wheel": wheel.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "key.json").write_text(json.dumps({**meta, "parts": len(parts)}, indent=1))
    return key


def keep(out: Path, carried: Path) -> Path:
    """Join OUT/wheel's parts into CARRIED/KEY/WHEEL after checking them; the wheel's path."""
    folder = out / "wheel"
    meta = json.loads((folder / "key.json").read_text())
    data = b"".join((folder / f"part-{n:02d}").read_bytes() for n in range(meta["parts"]))
    if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise SystemExit(f"{folder}: the parts do not make the wheel recorded in key.json (size or sha256 differ)")
    if "/" in meta["key"] or meta["key"].startswith("."):
        raise SystemExit(f"{folder}/key.json: not a cache key: {meta['key']!r}")
    target = carried / meta["key"] / meta["wheel"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def main(argv: list[str]) -> int:
    verb, *paths = argv
    if verb == "seed" and len(paths) == 2:
        keys = seed(Path(paths[0]), Path(paths[1]))
        print(f"carried Horovod wheels: {', '.join(keys) if keys else 'none'}")
    elif verb == "export" and len(paths) == 3:
        key = export(Path(paths[0]), Path(paths[1]), Path(paths[2]))
        print(f"built here, left in {paths[2]}/wheel for the next lend: {key}" if key else "no new wheel to keep")
    elif verb == "keep" and len(paths) == 2:
        print(f"kept: {keep(Path(paths[0]), Path(paths[1]))}")
    else:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

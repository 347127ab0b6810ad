"""`hvdlm checkpoint verify PATH`: every save of a run directory, or one checkpoint, checked against its manifest
(hvdlm.checkpoint.manifest). Standard library only, like the manifest: it runs on login nodes without torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hvdlm.checkpoint.manifest import verify_save
from hvdlm.checkpoint.store import every_save, run_directory, shard_paths
from hvdlm.errors import InputError
from hvdlm.runfiles import CHECKPOINT_DIR, MANIFEST_SUFFIX


@dataclass(frozen=True)
class Verified:
    """One checkpoint as `hvdlm checkpoint verify` found it."""

    name: str  # its stem, step-0000100
    problems: list[str]  # [] when good
    size: int  # the bytes read to check it
    has_manifest: bool  # False: written before checksums, checked only for missing files


def verify_target(path: str | Path) -> list[Verified]:
    """`hvdlm checkpoint verify PATH`: every save of a run directory (newest first), or the one checkpoint a file
    or shard names, checked against its manifest."""
    run_dir = run_directory(path)
    if run_dir is None:
        stem = Path(path).name.split(".")[0]
        manifest = Path(path).with_name(stem + MANIFEST_SUFFIX)
        if not manifest.is_file():
            return [_verify_one(stem, manifest, shard_paths(path))]  # (shard_paths refuses missing shards)
        return [_verify_one(stem, manifest, sorted(Path(path).parent.glob(f"{stem}.*pt")))]
    results, seen = [], set()
    for saved, missing in every_save(run_dir):
        seen.add(saved.manifest.name)
        present = [p for p in saved.files if p.is_file()]
        # Without a manifest there is no record to check against: every file must at least be there.
        unlisted = [] if saved.manifest.is_file() else [f"{name} is missing" for name in missing]
        results.append(_verify_one(saved.paths[0].name.split(".")[0], saved.manifest, present, unlisted))
    for manifest in sorted((Path(run_dir) / CHECKPOINT_DIR).glob(f"*{MANIFEST_SUFFIX}"), reverse=True):
        if manifest.name not in seen:  # a manifest whose files are all gone
            results.append(_verify_one(manifest.name.removesuffix(MANIFEST_SUFFIX), manifest, []))
    return results


def _verify_one(stem: str, manifest: Path, files: list[Path], found: list[str] | None = None) -> Verified:
    has_manifest, problems = manifest.is_file(), list(found or [])
    try:
        problems += verify_save(manifest, files) if has_manifest else []
    except InputError as e:  # a damaged manifest: this checkpoint's problem, the others are still checked
        problems.append(str(e))
    return Verified(stem, problems, sum(p.stat().st_size for p in files if p.is_file()), has_manifest)

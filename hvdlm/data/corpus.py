"""The embedded default corpus: the running interpreter's standard-library sources, as byte-level tokens.

Every machine with Python has this real text, so the demo and the tests need no download. Documents (files) are
assigned to train or validation by a hash of their path, so the split is stable across machines and runs.
The token arrays are cached on disk (written to a temporary directory, then renamed into place, so concurrent
ranks or an interrupted run never leave a half-written cache) and memory-mapped by every rank.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdlm.cache import cache_root
from hvdlm.errors import InputError

# Files are separated by a blank line, so a window that straddles two files still reads as source text.
_DOC_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray  # (N_train,) uint8 byte tokens, memory-mapped
    val: np.ndarray  # (N_val,) uint8 byte tokens, memory-mapped
    directory: Path  # where the arrays live


def stdlib_root() -> Path:
    return Path(sysconfig.get_path("stdlib"))


def stdlib_files() -> list[Path]:
    """The standard library's .py files, in a fixed order (installed packages are not part of it)."""
    root = stdlib_root()
    return sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Stable document-level split: the same file lands in the same split on every machine."""
    h = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def load_corpus(name: str, val_fraction: float) -> TokenSplits:
    """Token arrays of a named corpus, built on first use and cached."""
    if name != "stdlib":
        raise InputError(f"unknown corpus '{name}'. The available corpus is 'stdlib'.")
    root, files = stdlib_root(), stdlib_files()
    if not files:
        raise InputError(
            f"found no .py files under {root}: this Python ships without its standard library sources. Use a "
            "Python installation that includes them."
        )
    # The cache key covers the interpreter, the file list with sizes and mtimes, and the split.
    key = hashlib.sha256()
    key.update(f"{sys.version}|{val_fraction}".encode())
    for p in files:
        st = p.stat()
        key.update(f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}".encode())
    directory = cache_root() / "corpus" / f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-{key.hexdigest()[:12]}"
    if not (directory / "val.bin").exists():
        _build(files, root, val_fraction, directory)
    return TokenSplits(
        train=np.memmap(directory / "train.bin", dtype=np.uint8, mode="r"),
        val=np.memmap(directory / "val.bin", dtype=np.uint8, mode="r"),
        directory=directory,
    )


def _build(files: list[Path], root: Path, val_fraction: float, directory: Path) -> None:
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    for p in files:
        split = "val" if is_validation(p.relative_to(root).as_posix(), val_fraction) else "train"
        parts[split].append(p.read_bytes())
    if not parts["val"]:  # a tiny corpus can hash every file into train; keep the split non-empty
        parts["val"].append(parts["train"].pop())
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    for split, docs in parts.items():
        (staging / f"{split}.bin").write_bytes(_DOC_SEPARATOR.join(docs))
    try:
        staging.rename(directory)
    except OSError:  # another rank finished first: its copy is identical
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()

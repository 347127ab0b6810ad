"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash never leaves a torn file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint file is data and never runs code.
    return torch.load(path, map_location="cpu", weights_only=True)
